"""PANNs-style CNN audio encoder: log-mel [B, T, M] -> frame features [B, T', C], and PANNs' clip embedding [B, C].

Layout follows the PANNs CNN family: a BatchNorm over mel bins (``bn0``), then conv blocks of two 3x3 conv + BN + ReLU
each followed by 2x2 average pooling over (time, frequency), and frequency averaged out at the end. Two outputs share
the conv features (:meth:`AudioEncoder.conv_frames`):

- frames (``forward`` / :meth:`AudioEncoder.frame_embedding`): the ReLU'd linear layer ``fc1`` applied to every frame,
  for the segment and frame levels;
- the clip (:meth:`AudioEncoder.clip_embedding`): PANNs' own path, max + mean over (valid) time of the conv
  features, then ``fc1`` + ReLU, so with a PANNs checkpoint it is PANNs' ``embedding`` output.

Two sizes:

- ``cnn-small``: 3 blocks, widths ``w, 2w, 4w`` (``config.model.audio_width``); T' = T // 8. Trains in minutes on CPU.
- ``cnn14``: the PANNs Cnn14 layout (6 blocks 64..2048, the last without pooling, fc1 2048->2048), module names
  matching the published checkpoint so :func:`load_panns_checkpoint` can fill it; T' = T // 32.

Training-only regularisers, off by default (then outputs are exactly those of an encoder without them): SpecAugment
(torchaudio ``TimeMasking`` / ``FrequencyMasking`` stripes set to 0 after ``bn0``, i.e. to each bin's mean, as PANNs
does), dropout after every conv block (PANNs: 0.2) and dropout on ``fc1``'s input (PANNs: 0.5).

Padding: padded frames (mask 0) are zeroed after every layer, which is exactly what the convolution's own zero
padding does at the end of a sequence, and pooled frames are valid only when both inputs were valid (floor, like
``avg_pool``). So, in eval mode, appending padded frames does not change any valid output frame nor the clip
embedding. (In training mode the BatchNorm batch statistics include padded positions; batches cropped to a fixed
length have none.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from hci_atr.errors import ModelLoadError

log = logging.getLogger(__name__)


class ConvBlock(nn.Module):
    """Two 3x3 conv + BN + ReLU, then average pooling. Input/output [B, C, T, F] with a time mask [B, T]."""

    def __init__(self, in_ch: int, out_ch: int, pool: tuple[int, int] = (2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.pool = pool

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask[:, None, :, None].to(x.dtype)
        x = F.relu(self.bn1(self.conv1(x))) * m
        x = F.relu(self.bn2(self.conv2(x))) * m
        pt, pf = self.pool
        if (pt, pf) != (1, 1):
            x = F.avg_pool2d(x, (pt, pf))
            t = x.shape[2]
            # a pooled frame is valid only if every frame in its window was valid
            mask = mask[:, : t * pt].reshape(mask.shape[0], t, pt).all(dim=2)
            x = x * mask[:, None, :, None].to(x.dtype)
        return x, mask


@dataclass(frozen=True)
class AudioEncoderSpec:
    widths: tuple[int, ...]
    pools: tuple[tuple[int, int], ...]
    out_dim: int


def encoder_spec(name: str, width: int = 32) -> AudioEncoderSpec:
    if name == "cnn-small":
        w = (width, width * 2, width * 4)
        return AudioEncoderSpec(w, ((2, 2),) * 3, w[-1])
    if name == "cnn14":
        return AudioEncoderSpec((64, 128, 256, 512, 1024, 2048), ((2, 2),) * 5 + ((1, 1),), 2048)
    raise ModelLoadError(f"unknown audio encoder '{name}' (model.audio_encoder: use 'cnn-small' or 'cnn14')")


class AudioEncoder(nn.Module):
    """log-mel [B, T, M] + mask [B, T] -> frames [B, T', C] + mask [B, T'] (C = ``out_dim``); the clip embedding
    [B, C] from :meth:`clip_embedding`.

    ``spec_augment``: in training mode, ``time_masks`` time stripes of up to ``time_mask_width`` frames and
    ``freq_masks`` frequency stripes of up to ``freq_mask_width`` mel bins, drawn per example (PANNs: 2 x 64 frames,
    2 x 8 bins). ``dropout``: after every conv block; ``fc_dropout``: on ``fc1``'s input (frames and clip). All only
    in training mode; the defaults turn them off.
    """

    def __init__(self, name: str = "cnn-small", n_mels: int = 64, width: int = 32, *, spec_augment: bool = False,
                 time_masks: int = 2, time_mask_width: int = 64, freq_masks: int = 2, freq_mask_width: int = 8,
                 dropout: float = 0.0, fc_dropout: float = 0.0):
        super().__init__()
        spec = encoder_spec(name, width)
        for arg, value in (("time_masks", time_masks), ("time_mask_width", time_mask_width),
                           ("freq_masks", freq_masks), ("freq_mask_width", freq_mask_width)):
            if int(value) < 0:
                raise ValueError(f"{arg} must be >= 0, got {value}")
        for arg, value in (("dropout", dropout), ("fc_dropout", fc_dropout)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{arg} must be in [0, 1), got {value}")
        self.name = name
        self.out_dim = spec.out_dim
        self.bn0 = nn.BatchNorm2d(n_mels)
        ch = 1
        for i, (w, p) in enumerate(zip(spec.widths, spec.pools), start=1):
            setattr(self, f"conv_block{i}", ConvBlock(ch, w, p))
            ch = w
        self.n_blocks = len(spec.widths)
        self.conv_dim = ch
        self.fc1 = nn.Linear(ch, spec.out_dim, bias=True)
        self.dropout = float(dropout)
        self.fc_dropout = float(fc_dropout)
        # no parameters or buffers: the state dict (and PANNs checkpoint loading) is the same with or without
        self.spec_augment = bool(spec_augment)
        self.time_masking = nn.ModuleList(torchaudio.transforms.TimeMasking(int(time_mask_width), iid_masks=True)
                                          for _ in range(int(time_masks) if spec_augment else 0))
        self.freq_masking = nn.ModuleList(torchaudio.transforms.FrequencyMasking(int(freq_mask_width), iid_masks=True)
                                          for _ in range(int(freq_masks) if spec_augment else 0))

    @property
    def time_reduction(self) -> int:
        r = 1
        for i in range(1, self.n_blocks + 1):
            r *= getattr(self, f"conv_block{i}").pool[0]
        return r

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """SpecAugment on normalised log-mel ``[B, 1, T, M]`` (stripes set to 0); identity unless training with
        ``spec_augment``."""
        if not (self.training and self.spec_augment):
            return x
        y = x.transpose(2, 3)  # torchaudio masks (..., freq, time)
        for m in self.time_masking:
            y = m(y)
        for m in self.freq_masking:
            y = m(y)
        return y.transpose(2, 3)

    def conv_frames(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, T, M], mask [B, T] (bool or 0/1; None = all valid) -> (conv features [B, T', conv_dim] with the
        frequency averaged out (0 on padded frames), mask [B, T'] bool): what both :meth:`frame_embedding` and
        :meth:`clip_embedding` take."""
        if mel.dim() != 3:
            raise ValueError(f"expected log-mel [B, T, M], got shape {tuple(mel.shape)}")
        b, t, _ = mel.shape
        mask = torch.ones(b, t, dtype=torch.bool, device=mel.device) if mask is None else mask.to(torch.bool)
        x = mel.unsqueeze(1)  # [B, 1, T, M]
        # bn0 normalises each mel bin (PANNs: transpose so mel bins are the BN channels)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        x = self.augment(x)
        x = x * mask[:, None, :, None].to(x.dtype)
        for i in range(1, self.n_blocks + 1):
            x, mask = getattr(self, f"conv_block{i}")(x, mask)
            if self.dropout:
                x = F.dropout(x, self.dropout, self.training)
        return x.mean(dim=3).transpose(1, 2), mask  # frequency pooled out -> [B, T', C]

    def _fc1(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_dropout:
            x = F.dropout(x, self.fc_dropout, self.training)
        return F.relu(self.fc1(x))

    def frame_embedding(self, conv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """conv features [B, T', conv_dim] + mask [B, T'] -> frames [B, T', out_dim]: ``fc1`` + ReLU per frame,
        0 on padded frames."""
        return self._fc1(conv) * mask[..., None].to(conv.dtype)

    def clip_embedding(self, conv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """conv features [B, T', conv_dim] + mask [B, T'] -> clip [B, out_dim], PANNs' pooling: max + mean over the
        valid frames (all frames = PANNs exactly), dropout, ``fc1``, ReLU. A clip with no valid frame pools to 0."""
        m = mask.to(torch.bool)[..., None]
        has = m.any(dim=1)  # [B, 1]
        top = conv.masked_fill(~m, torch.finfo(conv.dtype).min).amax(dim=1)
        top = torch.where(has, top, torch.zeros_like(top))
        mean = (conv * m.to(conv.dtype)).sum(dim=1) / m.to(conv.dtype).sum(dim=1).clamp(min=1.0)
        return self._fc1(top + mean)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, T, M], mask [B, T] (bool or 0/1; None = all valid) -> (frames [B, T', C], mask [B, T'] bool)."""
        conv, mask = self.conv_frames(mel, mask)
        return self.frame_embedding(conv, mask), mask


# -- PANNs checkpoint loading ----------------------------------------------------------------------------------------

# Keys of the PANNs checkpoint that belong to parts we do not have (STFT/mel front end, AudioSet classifier).
_SKIP_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.", "fc_audioset.", "spec_augmenter.")


@dataclass
class LoadReport:
    """What :func:`load_panns_checkpoint` did with each key."""

    used: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # front-end / classifier keys and keys we have no module for
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape"
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint did not provide

    def summary(self) -> str:
        return (f"{len(self.used)} used, {len(self.skipped)} skipped, {len(self.mismatched)} shape mismatches, "
                f"{len(self.missing)} missing")


def load_panns_checkpoint(encoder: AudioEncoder, path: str | Path) -> LoadReport:
    """Fill ``encoder`` from a PANNs checkpoint file (``{"model": state_dict}``, keys like ``conv_block1.conv1.weight``).

    Shape mismatches are skipped and reported, never fatal. A file that is not such a checkpoint raises
    :class:`ModelLoadError` naming the path.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: PANNs checkpoint not found (model.audio_checkpoint); download Cnn14 .pth or unset it")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ModelLoadError(f"{p}: not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{p}: not a PANNs checkpoint (expected a dict with a 'model' state_dict of tensors)")
    if not any(k.startswith("conv_block1.") for k in state):
        raise ModelLoadError(f"{p}: not a PANNs CNN checkpoint (no 'conv_block1.*' keys in its 'model' state_dict)")
    own = encoder.state_dict()
    report = LoadReport()
    new_state = {}
    for k, v in state.items():
        if k.startswith(_SKIP_PREFIXES) or k not in own:
            report.skipped.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            report.mismatched.append(f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}")
        else:
            new_state[k] = v
            report.used.append(k)
    report.missing = [k for k in own if k not in new_state]
    encoder.load_state_dict(new_state, strict=False)
    log.info("loaded PANNs checkpoint %s: %s", p, report.summary())
    return report
