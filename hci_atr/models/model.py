"""HciAtrModel: audio and text encoders, the three HCI levels and the AC uses behind an open_clip-like API.

```
model = HciAtrModel(cfg)
text = model.tokenize(["a dog barks"])                 # TextBatch
t = model.encode_text(text)                            # TextEmbeddings
a = model.encode_audio(mel, mel_mask, aux, aux_mask)   # AudioEmbeddings
s = model.score(a, t)                                  # Scores: levels dict + fused, each [B_a, B_t]
model.save_pretrained(d); HciAtrModel.from_pretrained(d)
```

Every module exists whatever the switches say (so a checkpoint's keys do not depend on the ablation and the same seed
gives the same weights); switches only decide what is computed. Parameters of switched-off parts are frozen
(``requires_grad=False``) so DistributedDataParallel sees no unused trainable parameter.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hci_atr.config import Config, read_yaml
from hci_atr.files import atomic_write_bytes
from hci_atr.errors import ModelLoadError
from hci_atr.losses import LevelTemperatures, hierarchical_loss, positives_mask
from hci_atr.models.ac import CaptionFusion, branch_similarity
from hci_atr.models.audio_encoder import AudioEncoder, load_panns_checkpoint
from hci_atr.models.hci import LEVELS, clip_similarity, fuse, masked_mean, segment_pool, set_similarity
from hci_atr.models.text_encoder import TextBatch, TextEncoder

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
TEXT_DIR = "text_encoder"
LOSS_LEVELS = ("clip", "segment", "frame", "ac_branch", "fused")

Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AudioEmbeddings:
    """L2-normalised audio embeddings (padded units are zero vectors).

    clip [B, D]; segments [B, S, D] + segment_mask [B, S]; frames [B, T', D] + frame_mask [B, T'];
    aux_sentence [B, D] (generated caption's sentence embedding, zero where missing) + aux_mask [B], or None.
    """

    clip: torch.Tensor
    segments: torch.Tensor
    segment_mask: torch.Tensor
    frames: torch.Tensor
    frame_mask: torch.Tensor
    aux_sentence: torch.Tensor | None = None
    aux_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.clip.shape[0]

    def select(self, idx) -> "AudioEmbeddings":
        return AudioEmbeddings(*(None if v is None else v[idx] for v in self._values()))

    def _values(self):
        return (self.clip, self.segments, self.segment_mask, self.frames, self.frame_mask, self.aux_sentence,
                self.aux_mask)


@dataclass
class TextEmbeddings:
    """L2-normalised text embeddings: sentence [B, D]; phrases [B, P, D] + phrase_mask [B, P];
    words [B, L, D] + word_mask [B, L]."""

    sentence: torch.Tensor
    phrases: torch.Tensor
    phrase_mask: torch.Tensor
    words: torch.Tensor
    word_mask: torch.Tensor

    def __len__(self) -> int:
        return self.sentence.shape[0]

    def select(self, idx) -> "TextEmbeddings":
        return TextEmbeddings(self.sentence[idx], self.phrases[idx], self.phrase_mask[idx], self.words[idx],
                              self.word_mask[idx])


@dataclass
class Scores:
    """levels: {"clip"|"segment"|"frame"|"ac_branch": [B_a, B_t]} for the enabled parts; fused [B_a, B_t]."""

    levels: dict[str, torch.Tensor]
    fused: torch.Tensor


@dataclass
class LossOutput:
    """losses: {level: scalar, ..., "total": scalar}; scores: the Scores they were computed from."""

    losses: dict[str, torch.Tensor]
    scores: Scores = field(repr=False)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-8)


class HciAtrModel(nn.Module):
    def __init__(self, cfg: Config, text_source: str | Path | None = None, pretrained: bool = True):
        """Build from a config.

        text_source: overrides ``cfg.model.text_encoder`` (from_pretrained uses the saved copy);
        pretrained: False builds the transformer from its config only and skips the PANNs checkpoint
        (weights then come from a saved model).
        """
        super().__init__()
        m = cfg.model
        # the library's sections only (a caller may pass a richer config with the same sections)
        self.cfg = Config(audio=cfg.audio, model=cfg.model, train=cfg.train)
        d = m.embed_dim
        self.text = TextEncoder(str(text_source or m.text_encoder), freeze=m.freeze_text, max_words=m.max_words,
                                out_dim=d, pretrained=pretrained, phrase_mode=m.phrase_mode, phrase_n=m.phrase_n)
        self.audio = AudioEncoder(m.audio_encoder, cfg.audio.n_mels, m.audio_width)
        self.audio_checkpoint_report = None
        if pretrained and m.audio_checkpoint:
            self.audio_checkpoint_report = load_panns_checkpoint(self.audio, m.audio_checkpoint)
        self.audio_proj = nn.Linear(self.audio.out_dim, d)
        # one head per level and modality: each level gets its own joint space
        self.clip_head, self.segment_head, self.frame_head = (nn.Linear(d, d) for _ in range(3))
        self.sentence_head, self.phrase_head, self.word_head = (nn.Linear(d, d) for _ in range(3))
        self.fusion = CaptionFusion(d)
        w = torch.tensor([max(float(x), 1e-6) for x in m.level_weights])
        self.level_logits = nn.Parameter(w.log())  # softmax over enabled levels when learn_level_weights
        self.temps = LevelTemperatures(LOSS_LEVELS, m.init_temperature)
        self._freeze_unused()

    # -- switches -------------------------------------------------------------------------------------------------
    @property
    def enabled_levels(self) -> tuple[str, ...]:
        m = self.cfg.model
        return tuple(lv for lv, on in zip(LEVELS, (m.use_clip, m.use_segment, m.use_frame)) if on)

    @property
    def uses_aux(self) -> bool:
        return self.cfg.model.ac_fusion or self.cfg.model.ac_branch

    def _freeze_unused(self) -> None:
        m = self.cfg.model
        off = []
        if not m.use_clip:
            off += [self.clip_head, self.sentence_head]
        if not m.use_segment:
            off += [self.segment_head, self.phrase_head]
        if not m.use_frame:
            off += [self.frame_head, self.word_head]
        if not m.ac_fusion:
            off.append(self.fusion)
        for mod in off:
            for p in mod.parameters():
                p.requires_grad_(False)
        if not m.learn_level_weights:
            self.level_logits.requires_grad_(False)

    def level_weights(self) -> dict[str, torch.Tensor | float]:
        """Weights of the enabled levels in the fused score (+ ac_branch_weight when the branch is on)."""
        names = self.enabled_levels
        if self.cfg.model.learn_level_weights:
            idx = [LEVELS.index(n) for n in names]
            w = torch.softmax(self.level_logits[idx], dim=0)
            out: dict[str, torch.Tensor | float] = {n: w[k] for k, n in enumerate(names)}
        else:
            out = {n: float(self.cfg.model.level_weights[LEVELS.index(n)]) for n in names}
        if self.cfg.model.ac_branch:
            out["ac_branch"] = float(self.cfg.model.ac_branch_weight)
        return out

    @property
    def device(self) -> torch.device:
        return self.audio_proj.weight.device

    # -- text -----------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], pad_words_to: int | None = None) -> TextBatch:
        """Captions -> TextBatch (on the model's device). ``pad_words_to`` fixes L/P (shapes equal across workers)."""
        return self.text.tokenize(list(texts), pad_words_to).to(self.device)

    def _text_units(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text(batch)  # words [B, L, D], sentence [B, D] (shared projection)

    def encode_text(self, batch: TextBatch) -> TextEmbeddings:
        """TextBatch -> TextEmbeddings (sentence [B, D], phrases [B, P, D], words [B, L, D], masks)."""
        words, sentence = self._text_units(batch)
        phrases = torch.einsum("bpl,bld->bpd", batch.phrase_matrix.to(words.dtype), words)
        wm, pm = batch.word_mask.to(torch.bool), batch.phrase_mask.to(torch.bool)
        return TextEmbeddings(
            sentence=_norm(self.sentence_head(sentence)),
            phrases=_norm(self.phrase_head(phrases)) * pm[..., None].to(words.dtype),
            phrase_mask=pm,
            words=_norm(self.word_head(words)) * wm[..., None].to(words.dtype),
            word_mask=wm,
        )

    @torch.no_grad()
    def embed_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Clip-level (sentence) embeddings of captions, [N, D], L2-normalised; eval mode, no gradients."""
        was = self.training
        self.eval()
        try:
            out = [self.encode_text(self.tokenize(texts[i:i + batch_size])).sentence
                   for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.cfg.model.embed_dim)

    # -- audio ----------------------------------------------------------------------------------------------------
    def encode_audio(self, mel: torch.Tensor, mel_mask: torch.Tensor | None = None, aux: TextBatch | None = None,
                     aux_mask: torch.Tensor | None = None) -> AudioEmbeddings:
        """mel [B, T, M], mel_mask [B, T]; aux: generated captions (one per clip, "" where missing), aux_mask [B].

        Returns AudioEmbeddings: clip [B, D], segments [B, S, D], frames [B, T', D] (+ masks), aux sentence.
        """
        feats, fmask = self.audio(mel, mel_mask)  # [B, T', C], [B, T']
        h = self.audio_proj(feats) * fmask[..., None].to(feats.dtype)
        aux_sentence = has_aux = None
        if self.uses_aux and aux is not None:
            has_aux = (torch.ones(len(aux), dtype=torch.bool, device=h.device) if aux_mask is None
                       else aux_mask.to(torch.bool).to(h.device)) & aux.word_mask.any(1)
            aux_words, aux_sent = self._text_units(aux)
            if self.cfg.model.ac_fusion:
                h = self.fusion(h, aux_words, aux.word_mask, has_aux) * fmask[..., None].to(h.dtype)
            if self.cfg.model.ac_branch:
                aux_sentence = _norm(self.sentence_head(aux_sent)) * has_aux[:, None].to(h.dtype)
        # clip: PANNs-style mean + max over valid frames
        neg = torch.finfo(h.dtype).min
        hmax = h.masked_fill(~fmask[..., None], neg).amax(1)
        hmax = torch.where(fmask.any(1, keepdim=True), hmax, torch.zeros_like(hmax))
        clip = masked_mean(h, fmask[..., None], 1) + hmax
        seg, smask = segment_pool(h, fmask, self.cfg.model.segment_size, self.cfg.model.segment_stride)
        return AudioEmbeddings(
            clip=_norm(self.clip_head(clip)),
            segments=_norm(self.segment_head(seg)) * smask[..., None].to(h.dtype),
            segment_mask=smask,
            frames=_norm(self.frame_head(h)) * fmask[..., None].to(h.dtype),
            frame_mask=fmask,
            aux_sentence=aux_sentence,
            aux_mask=has_aux if aux_sentence is not None else None,
        )

    # -- scoring --------------------------------------------------------------------------------------------------
    def score(self, a: AudioEmbeddings, t: TextEmbeddings, max_elems: int = 1 << 24) -> Scores:
        """Similarity of every audio with every text: Scores.levels[name] and Scores.fused, each [B_a, B_t].

        Fine-grained levels are computed in blocks of at most ``max_elems`` unit pairs (bounded memory).
        """
        levels: dict[str, torch.Tensor] = {}
        if self.cfg.model.use_clip:
            levels["clip"] = clip_similarity(a.clip, t.sentence)
        if self.cfg.model.use_segment:
            levels["segment"] = set_similarity(a.segments, a.segment_mask, t.phrases, t.phrase_mask, max_elems)
        if self.cfg.model.use_frame:
            levels["frame"] = set_similarity(a.frames, a.frame_mask, t.words, t.word_mask, max_elems)
        if self.cfg.model.ac_branch:
            if a.aux_sentence is None:
                cap = torch.zeros_like(a.clip)
                has = torch.zeros(len(a), dtype=torch.bool, device=a.clip.device)
            else:
                cap, has = a.aux_sentence, a.aux_mask
            levels["ac_branch"] = branch_similarity(t.sentence, cap, has)
        return Scores(levels, fuse(levels, self.level_weights()))

    # -- training forward -----------------------------------------------------------------------------------------
    def forward(self, mel: torch.Tensor, mel_mask: torch.Tensor, text: TextBatch, audio_keys: torch.Tensor,
                text_keys: torch.Tensor, pair_weight: torch.Tensor | None = None, aux: TextBatch | None = None,
                aux_mask: torch.Tensor | None = None, gather: Gather | None = None) -> LossOutput:
        """Contrastive losses of a batch (a DDP-wrapped model calls this through ``__call__``).

        mel [B_a, T, M], mel_mask [B_a, T]; text: B_t captions; audio_keys [B_a], text_keys [B_t] (float64 clip
        identities: equal keys are positives); pair_weight [B_t]. ``gather`` all-gathers a tensor across workers
        with gradient: the texts of every worker are gathered, this worker's audio is scored against all of them,
        and the losses are this worker's share of the global-batch loss times the number of workers (their mean
        over workers is the global loss; see :func:`hci_atr.losses.sharded_info_nce`). ``scores`` are then
        ``[B_a local, B_t global]``.
        """
        a = self.encode_audio(mel, mel_mask, aux, aux_mask)
        t = self.encode_text(text)
        if pair_weight is None:
            pair_weight = torch.ones(len(t), device=t.sentence.device)
        if gather is not None:
            t, pair_weight, text_keys = _gather_text(t, pair_weight, text_keys, gather)
        scores = self.score(a, t)
        pos = positives_mask(audio_keys, text_keys)
        levels = dict(scores.levels)
        weights: dict[str, float | torch.Tensor] = {
            n: float(self.cfg.model.level_weights[LEVELS.index(n)]) for n in self.enabled_levels}
        if self.cfg.model.ac_branch:
            weights["ac_branch"] = float(self.cfg.model.ac_branch_weight)
        if self.cfg.model.learn_level_weights:  # the learnt mixture is trained through the fused score
            levels["fused"] = scores.fused
            weights["fused"] = 1.0
        return LossOutput(hierarchical_loss(levels, pos, self.temps, weights, pair_weight, gather), scores)

    # -- persistence ----------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write model.safetensors, config.yaml and text_encoder/ (HF tokenizer + config) into ``path``.

        Everything is written into a temporary sibling directory first and renamed into place, so a reader never
        sees a half-written model.
        """
        from safetensors.torch import save

        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            atomic_write_bytes(tmp / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
            self.cfg.save(tmp / CONFIG_NAME)
            self.text.tokenizer.save_pretrained(tmp / TEXT_DIR)
            self.text.transformer.config.save_pretrained(tmp / TEXT_DIR)
            old = None
            if dest.exists():
                old = dest.parent / f".{dest.name}.old-{tmp.name}"
                dest.rename(old)
            tmp.rename(dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "HciAtrModel":
        """Load a directory written by :meth:`save_pretrained`; needs no network and no original text model."""
        from safetensors.torch import load_file

        p = Path(path)
        for name in (WEIGHTS_NAME, CONFIG_NAME, TEXT_DIR):
            if not (p / name).exists():
                raise ModelLoadError(f"{p}: not a saved hci-atr model (missing {name}); point to a directory written "
                                     "by save_pretrained / hci-atr train")
        # older models saved the app's sections too: only audio/model/train matter here
        cfg = Config.from_dict(read_yaml(p / CONFIG_NAME), str(p / CONFIG_NAME), strict=False)
        model = cls(cfg, text_source=p / TEXT_DIR, pretrained=False)
        try:
            state = load_file(str(p / WEIGHTS_NAME), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - corrupt file
            raise ModelLoadError(f"{p / WEIGHTS_NAME}: cannot read weights ({type(e).__name__}: {e})") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"{p / WEIGHTS_NAME}: weights do not fit {p / CONFIG_NAME} (missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]})")
        return model.to(map_location).eval()


def _gather_packed(gather: Gather, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather several ``[B, ...]`` tensors (same B) in ONE collective: flatten each to ``[B, k]`` float32,
    concatenate, gather ``[world * B, sum k]``, split back. One call instead of one per tensor matters: on CPU each
    collective has a fixed cost. Bool masks travel as 0/1 and come back bool; gradients flow through the
    concatenation into the gather. (float64 keys must be split first: see :func:`_split_key`.)"""
    flat = [x.to(torch.float32).reshape(x.shape[0], -1) for x in tensors]
    out = gather(torch.cat(flat, dim=1))  # [world * B, sum k]
    res = []
    for x, part in zip(tensors, torch.split(out, [f.shape[1] for f in flat], dim=1)):
        y = part.reshape(-1, *x.shape[1:])
        res.append(y > 0.5 if x.dtype == torch.bool else y.to(x.dtype))
    return res


_KEY_HALF = float(1 << 24)  # clip keys are < 2**48 (training.audio_key): two float32-exact 24-bit halves


def _split_key(keys: torch.Tensor) -> torch.Tensor:
    """float64 keys [B] -> [B, 2] (high, low 24 bits), each exact in float32."""
    hi = torch.floor(keys / _KEY_HALF)
    return torch.stack([hi, keys - hi * _KEY_HALF], dim=1)


def _join_key(halves: torch.Tensor) -> torch.Tensor:
    h = halves.to(torch.float64)
    return h[:, 0] * _KEY_HALF + h[:, 1]


def _gather_text(t: TextEmbeddings, pair_weight: torch.Tensor, keys: torch.Tensor, gather: Gather
                 ) -> tuple[TextEmbeddings, torch.Tensor, torch.Tensor]:
    """Every worker's texts (embeddings, masks, pair weights, clip keys) in rank order: one collective."""
    *fields, weight, halves = _gather_packed(gather, [t.sentence, t.phrases, t.phrase_mask.to(torch.bool), t.words,
                                                      t.word_mask.to(torch.bool), pair_weight, _split_key(keys)])
    return TextEmbeddings(*fields), weight, _join_key(halves)
