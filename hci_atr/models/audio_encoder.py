"""PANNs-style CNN audio encoder: log-mel [B, T, M] -> frame features [B, T', C].

Layout follows the PANNs CNN family: a BatchNorm over mel bins (``bn0``), then conv blocks of two 3x3 conv + BN + ReLU
each followed by 2x2 average pooling over (time, frequency), and frequency averaged out at the end; a ReLU'd linear
layer (``fc1``) maps every frame to the output width.

Two sizes:

- ``cnn-small``: 3 blocks, widths ``w, 2w, 4w`` (``config.model.audio_width``); T' = T // 8. Trains in minutes on CPU.
- ``cnn14``: the PANNs Cnn14 layout (6 blocks 64..2048, the last without pooling, fc1 2048->2048), module names
  matching the published checkpoint so :func:`load_panns_checkpoint` can fill it; T' = T // 32.

Padding: padded frames (mask 0) are zeroed after every layer, which is exactly what the convolution's own zero
padding does at the end of a sequence, and pooled frames are valid only when both inputs were valid (floor, like
``avg_pool``). So, in eval mode, appending padded frames does not change any valid output frame. (In training mode the
BatchNorm batch statistics include padded positions; batches cropped to a fixed length have none.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
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
    """log-mel [B, T, M] + mask [B, T] -> frames [B, T', C] + mask [B, T'] (C = ``out_dim``)."""

    def __init__(self, name: str = "cnn-small", n_mels: int = 64, width: int = 32):
        super().__init__()
        spec = encoder_spec(name, width)
        self.name = name
        self.out_dim = spec.out_dim
        self.bn0 = nn.BatchNorm2d(n_mels)
        ch = 1
        for i, (w, p) in enumerate(zip(spec.widths, spec.pools), start=1):
            setattr(self, f"conv_block{i}", ConvBlock(ch, w, p))
            ch = w
        self.n_blocks = len(spec.widths)
        self.fc1 = nn.Linear(ch, spec.out_dim, bias=True)

    @property
    def time_reduction(self) -> int:
        r = 1
        for i in range(1, self.n_blocks + 1):
            r *= getattr(self, f"conv_block{i}").pool[0]
        return r

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, T, M], mask [B, T] (bool or 0/1; None = all valid) -> (frames [B, T', C], mask [B, T'] bool)."""
        if mel.dim() != 3:
            raise ValueError(f"expected log-mel [B, T, M], got shape {tuple(mel.shape)}")
        b, t, _ = mel.shape
        mask = torch.ones(b, t, dtype=torch.bool, device=mel.device) if mask is None else mask.to(torch.bool)
        x = mel.unsqueeze(1)  # [B, 1, T, M]
        # bn0 normalises each mel bin (PANNs: transpose so mel bins are the BN channels)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        x = x * mask[:, None, :, None].to(x.dtype)
        for i in range(1, self.n_blocks + 1):
            x, mask = getattr(self, f"conv_block{i}")(x, mask)
        x = x.mean(dim=3).transpose(1, 2)  # frequency pooled out -> [B, T', C]
        x = F.relu(self.fc1(x)) * mask[..., None].to(x.dtype)
        return x, mask


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
