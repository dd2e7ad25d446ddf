"""HciAtrModel: audio and text encoders, the three HCI levels and the AC uses behind an open_clip-like API.

```
model = HciAtrModel(cfg)
text = model.tokenize(["a dog barks"])                 # TextBatch
t = model.encode_text(text)                            # TextEmbeddings
a = model.encode_audio(mel, mel_mask, aux, aux_mask)   # AudioEmbeddings
s = model.score(a, t)                                  # Scores: levels dict + fused, each [B_a, B_t]
model.save_pretrained(d); HciAtrModel.from_pretrained(d)
```

Every module of the paper's method exists whatever the switches say (so a checkpoint's keys do not depend on the
ablation and the same seed gives the same weights); switches only decide what is computed. Parameters of switched-off
parts are frozen (``requires_grad=False``) so DistributedDataParallel sees no unused trainable parameter.

The order-aware parts (``model.temporal_context``, ``segment_order``, ``unit_weights``: :mod:`hci_atr.models.temporal`,
:mod:`hci_atr.models.order`, :mod:`hci_atr.models.weighting`) exist only when switched on, and are initialised from a
forked random stream: a model with them off is exactly the model before they existed (same weights for the same seed,
same random numbers drawn afterwards, same checkpoint keys, so older checkpoints load), and one with them on has the
same weights everywhere else. ``model.fusion = "calibrated"`` divides each level by its learnt temperature before the
weighted sum; ``model.hard_negatives`` adds a hard-negative term to the loss (:meth:`HciAtrModel.forward`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hci_atr.config import Config, read_yaml
from hci_atr.files import atomic_write_bytes
from hci_atr.errors import ModelLoadError
from hci_atr.losses import (LevelTemperatures, group_hard_negatives, hard_negative_loss, hierarchical_loss,
                            positives_mask)
from hci_atr.models.ac import CaptionFusion, branch_similarity
from hci_atr.models.audio_encoder import AudioEncoder, load_panns_checkpoint
from hci_atr.models.hci import LEVELS, clip_similarity, fuse, masked_mean, segment_pool, set_similarity
from hci_atr.models.order import ConcurrencyTagger, SegmentOrder, phrase_places, unit_set_similarity
from hci_atr.models.temporal import TemporalContext
from hci_atr.models.text_encoder import TextBatch, TextEncoder
from hci_atr.models.weighting import UnitWeights, calibrated_fuse

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
TEXT_DIR = "text_encoder"
LOSS_LEVELS = ("clip", "segment", "frame", "ac_branch", "fused")

Gather = Callable[[torch.Tensor], torch.Tensor]


class _Batched:
    """Embeddings of a batch: every field a tensor whose first dimension is the batch (or None)."""

    def __len__(self) -> int:
        return getattr(self, fields(self)[0].name).shape[0]

    def select(self, idx):
        """The rows ``idx`` of every field (an index, slice or index tensor), as the same kind of embeddings."""
        return type(self)(*(None if v is None else v[idx] for v in self._values()))

    def _values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass
class AudioEmbeddings(_Batched):
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


@dataclass
class TextEmbeddings(_Batched):
    """L2-normalised text embeddings: sentence [B, D]; phrases [B, P, D] + phrase_mask [B, P];
    words [B, L, D] + word_mask [B, L]; phrase_concurrent [B, P] (phrases whose events are concurrent, so their
    place in the caption is no order: set when ``model.segment_order`` is on) or None; phrase_place [B, P] (the
    place in time of each phrase's event, -1 none: set when ``model.segment_order`` is event_bias) or None."""

    sentence: torch.Tensor
    phrases: torch.Tensor
    phrase_mask: torch.Tensor
    words: torch.Tensor
    word_mask: torch.Tensor
    phrase_concurrent: torch.Tensor | None = None
    phrase_place: torch.Tensor | None = None



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
        self.audio = AudioEncoder(m.audio_encoder, cfg.audio.n_mels, m.audio_width, spec_augment=m.audio_spec_augment,
                                  time_masks=m.audio_time_masks, time_mask_width=m.audio_time_mask_width,
                                  freq_masks=m.audio_freq_masks, freq_mask_width=m.audio_freq_mask_width,
                                  dropout=m.audio_dropout, fc_dropout=m.audio_fc_dropout)
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
        # order-aware parts: only when switched on, each from its own forked random stream (see the module docstring)
        self.temporal = self.segment_order = self.unit_weight_heads = None
        self._tagger = None
        if m.temporal_context != "none":
            self.temporal = _isolated(1, lambda: TemporalContext(d, m.temporal_context, m.temporal_positions,
                                                                 m.temporal_layers))
        if m.segment_order != "none" and m.use_segment:
            self.segment_order = _isolated(2, lambda: SegmentOrder(m.segment_order))
            self._tagger = ConcurrencyTagger(self.text.tokenizer)
        if m.unit_weights and (m.use_segment or m.use_frame):
            names = (("segment", "phrase") if m.use_segment else ()) + (("frame", "word") if m.use_frame else ())
            self.unit_weight_heads = _isolated(3, lambda: nn.ModuleDict({n: UnitWeights(d) for n in names}))

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
    def hard_negatives_on(self) -> bool:
        """Whether :meth:`forward` adds the hard-negative term (``model.hard_negatives`` set, weight > 0)."""
        m = self.cfg.model
        return m.hard_negatives != "none" and m.hard_negative_weight > 0

    def fused_taus(self) -> dict[str, torch.Tensor | float] | None:
        """Temperatures the losses use instead of the learnt ones: a calibrated fused score takes 1."""
        return {"fused": 1.0} if self.cfg.model.fusion == "calibrated" else None

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
            phrase_concurrent=None if self._tagger is None else self._tagger(batch),
            phrase_place=phrase_places(batch.texts, batch.phrase_matrix, batch.phrase_mask)
            if self.segment_order is not None and self.segment_order.mode == "event_bias" else None,
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
        return self._encode_audio(mel, mel_mask, aux, aux_mask)[0]

    def _encode_audio(self, mel: torch.Tensor, mel_mask: torch.Tensor | None, aux: TextBatch | None,
                      aux_mask: torch.Tensor | None, unfused: bool = False
                      ) -> tuple[AudioEmbeddings, AudioEmbeddings | None]:
        """:meth:`encode_audio`, and with ``unfused`` (and ``model.ac_fusion`` on) also the same clips encoded
        without their generated captions fused in (sharing the convolution; no aux sentence), else None."""
        conv, fmask = self.audio.conv_frames(mel, mel_mask)  # [B, T', C_conv], [B, T']
        feats = self.audio.frame_embedding(conv, fmask)  # [B, T', C]
        h = self.audio_proj(feats) * fmask[..., None].to(feats.dtype)
        if self.temporal is not None:  # frames see the clip around them, in order, before any pooling
            h = self.temporal(h, fmask)
        plain_h = None
        aux_sentence = has_aux = None
        if self.uses_aux and aux is not None:
            has_aux = (torch.ones(len(aux), dtype=torch.bool, device=h.device) if aux_mask is None
                       else aux_mask.to(torch.bool).to(h.device)) & aux.word_mask.any(1)
            aux_words, aux_sent = self._text_units(aux)
            if self.cfg.model.ac_fusion:
                plain_h = h if unfused else None
                h = self.fusion(h, aux_words, aux.word_mask, has_aux) * fmask[..., None].to(h.dtype)
            if self.cfg.model.ac_branch:
                aux_sentence = _norm(self.sentence_head(aux_sent)) * has_aux[:, None].to(h.dtype)
        fused = self._pool_audio(conv, h, fmask, aux_sentence, has_aux)
        return fused, None if plain_h is None else self._pool_audio(conv, plain_h, fmask, None, None)

    def _pool_audio(self, conv: torch.Tensor, h: torch.Tensor, fmask: torch.Tensor, aux_sentence: torch.Tensor | None,
                    has_aux: torch.Tensor | None) -> AudioEmbeddings:
        """The clip, segment and frame embeddings of projected frames ``h`` [B, T', C] (conv: the encoder's
        features, for PANNs' clip path)."""
        if self.cfg.model.audio_clip_pooling == "panns":
            # PANNs' clip path: pool the conv features over time first, then fc1 (what a CNN14 checkpoint expects)
            clip = self.audio_proj(self.audio.clip_embedding(conv, fmask))
        else:
            # mean + max over the valid projected frames (they carry temporal context and AC fusion when on)
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
        uw = self.unit_weight_heads
        if self.cfg.model.use_clip:
            levels["clip"] = clip_similarity(a.clip, t.sentence)
        if self.cfg.model.use_segment:
            if self.segment_order is None and uw is None:
                levels["segment"] = set_similarity(a.segments, a.segment_mask, t.phrases, t.phrase_mask, max_elems)
            else:
                levels["segment"] = unit_set_similarity(
                    a.segments, a.segment_mask, t.phrases, t.phrase_mask,
                    a_weight=None if uw is None else uw["segment"](a.segments, a.segment_mask),
                    t_weight=None if uw is None else uw["phrase"](t.phrases, t.phrase_mask),
                    concurrent=t.phrase_concurrent, places=t.phrase_place,
                    order=None if self.segment_order is None else self.segment_order.terms(), max_elems=max_elems)
        if self.cfg.model.use_frame:
            if uw is None:
                levels["frame"] = set_similarity(a.frames, a.frame_mask, t.words, t.word_mask, max_elems)
            else:
                levels["frame"] = unit_set_similarity(
                    a.frames, a.frame_mask, t.words, t.word_mask, a_weight=uw["frame"](a.frames, a.frame_mask),
                    t_weight=uw["word"](t.words, t.word_mask), max_elems=max_elems)
        if self.cfg.model.ac_branch:
            if a.aux_sentence is None:
                cap = torch.zeros_like(a.clip)
                has = torch.zeros(len(a), dtype=torch.bool, device=a.clip.device)
            else:
                cap, has = a.aux_sentence, a.aux_mask
            levels["ac_branch"] = branch_similarity(t.sentence, cap, has)
        return Scores(levels, self.fuse_levels(levels))

    def fuse_levels(self, levels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fused score of level score matrices (``model.fusion``: weighted sum, or calibrated by the levels'
        temperatures)."""
        if self.cfg.model.fusion == "calibrated":
            return calibrated_fuse(levels, self.level_weights(), {n: self.temps.tau(n) for n in levels})
        return fuse(levels, self.level_weights())

    # -- training forward -----------------------------------------------------------------------------------------
    def forward(self, mel: torch.Tensor, mel_mask: torch.Tensor, text: TextBatch, audio_keys: torch.Tensor,
                text_keys: torch.Tensor, pair_weight: torch.Tensor | None = None, aux: TextBatch | None = None,
                aux_mask: torch.Tensor | None = None, gather: Gather | None = None, hard_text: TextBatch | None = None,
                hard_source: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                audio_text_ids: torch.Tensor | None = None, text_generated: torch.Tensor | None = None
                ) -> LossOutput:
        """Contrastive losses of a batch (a DDP-wrapped model calls this through ``__call__``).

        mel [B_a, T, M], mel_mask [B_a, T]; text: B_t captions; audio_keys [B_a], text_keys [B_t] (float64 clip
        identities: equal keys are positives); pair_weight [B_t]. ``gather`` all-gathers a tensor across workers
        with gradient: the texts of every worker are gathered, this worker's audio is scored against all of them,
        and the losses are this worker's share of the global-batch loss times the number of workers (their mean
        over workers is the global loss; see :func:`hci_atr.losses.sharded_info_nce`). ``scores`` are then
        ``[B_a local, B_t global]``.

        Hard negatives (used when ``model.hard_negatives`` is set; ignored otherwise): ``hard_text`` holds K captions
        (:func:`hci_atr.data.negatives.hard_negative_texts`) and ``hard_source`` [K] (long) the index in ``text`` of
        the caption each was built from. Each is a negative of that caption's clip only, against that caption
        (:func:`hci_atr.losses.hard_negative_loss`); they never enter the contrastive loss, are never gathered
        and are nobody's positive. ``losses["hard"]`` is the term (0 for a batch without any), and ``total`` gains
        ``model.hard_negative_weight * hard``.

        Identical texts (:func:`hci_atr.losses.positives_mask`): ``text_ids`` [B_t] (float64 identity of each text's
        normalised words) and ``audio_text_ids`` [B_a, K] (those of the texts each clip owns, NaN padding): a text is
        a positive of every clip that owns the same text, never a negative of it. ``text_generated`` [B_t] bool
        marks the generated captions that ``ac_augment`` adds: the AC branch compares a query with the clip's
        generated caption, so for those texts it would compare the caption with itself (cosine 1): their branch
        score is 0 and the branch level's loss leaves them out. With ``model.ac_fusion`` too, the audio those texts
        are scored against would hold the very caption fused in (a pair won by copying it through the fusion), so
        with ``model.ac_augment_audio="unfused"`` (the default) their columns are scored against the clips encoded
        without their captions.
        """
        m = self.cfg.model
        a, a_plain = self._encode_audio(mel, mel_mask, aux, aux_mask,
                                        unfused=m.ac_augment and m.ac_augment_audio == "unfused")
        t = self.encode_text(text)
        if pair_weight is None:
            pair_weight = torch.ones(len(t), device=t.sentence.device)
        t_local, weight_local, keys_local = t, pair_weight, text_keys
        if gather is not None:
            t, pair_weight, text_keys, text_ids, text_generated = _gather_text(t, pair_weight, text_keys, gather,
                                                                              text_ids, text_generated)
        scores = self.score(a, t)
        pos = positives_mask(audio_keys, text_keys, audio_text_ids, text_ids)
        level_weight: torch.Tensor | dict[str, torch.Tensor] = pair_weight
        rescored = a_plain is not None or "ac_branch" in scores.levels  # what the generated captions change
        if rescored and text_generated is not None and bool(text_generated.any()):
            gen = text_generated.to(device=pair_weight.device, dtype=torch.bool)
            fixed = dict(scores.levels)
            if a_plain is not None:  # a generated caption is scored against its clip's audio without it fused in
                idx = gen.nonzero()[:, 0]
                plain = self.score(a_plain, t.select(idx)).levels
                fixed = {n: s if n == "ac_branch" else s.index_copy(1, idx, plain[n]) for n, s in fixed.items()}
            if "ac_branch" in fixed:
                fixed["ac_branch"] = fixed["ac_branch"].masked_fill(gen[None, :], 0.0)
                level_weight = {"*": pair_weight, "ac_branch": pair_weight * (~gen).to(pair_weight.dtype)}
            scores = Scores(fixed, self.fuse_levels(fixed))
        levels = dict(scores.levels)
        weights: dict[str, float | torch.Tensor] = {
            n: float(self.cfg.model.level_weights[LEVELS.index(n)]) for n in self.enabled_levels}
        if self.cfg.model.ac_branch:
            weights["ac_branch"] = float(self.cfg.model.ac_branch_weight)
        if self.cfg.model.learn_level_weights:  # the learnt mixture is trained through the fused score
            levels["fused"] = scores.fused
            weights["fused"] = 1.0
        losses = hierarchical_loss(levels, pos, self.temps, weights, level_weight, gather, taus=self.fused_taus())
        if self.hard_negatives_on:
            local = scores if gather is None else self.score(a, t_local)
            hard = self._hard_loss(a, local, audio_keys, keys_local, weight_local, hard_text, hard_source, weights)
            losses["hard"] = hard
            losses["total"] = losses["total"] + self.cfg.model.hard_negative_weight * hard
        return LossOutput(losses, scores)

    def _hard_loss(self, a: AudioEmbeddings, local: Scores, audio_keys: torch.Tensor, text_keys: torch.Tensor,
                   pair_weight: torch.Tensor, hard_text: TextBatch | None, hard_source: torch.Tensor | None,
                   weights: dict[str, float | torch.Tensor]) -> torch.Tensor:
        """The hard-negative term of :meth:`forward`; ``local``: this worker's audio x its own texts."""
        zero = torch.zeros((), device=a.clip.device)
        if hard_text is None or hard_source is None or len(hard_text) == 0:
            return zero
        src = hard_source.to(device=a.clip.device, dtype=torch.long).reshape(-1)
        if src.numel() != len(hard_text):
            raise ValueError(f"hard_source has {src.numel()} entries for {len(hard_text)} hard-negative texts")
        n_text = len(text_keys)
        if bool(((src < 0) | (src >= n_text)).any()):
            raise ValueError(f"hard_source: indices must point into the batch's {n_text} texts")
        pos = positives_mask(audio_keys, text_keys)  # [B_a, B_t] local
        usable = pos[:, src].any(0) & (pair_weight[src] > 0)  # its caption's clip is here and the caption is real
        if not bool(usable.any()):
            return zero
        keep = usable.nonzero().squeeze(1)
        sources, index, mask = group_hard_negatives(src[keep])  # [G], [G, M] into keep, [G, M]
        owner = pos[:, sources].to(torch.float32).argmax(0)  # [G] the clip of each source caption
        negs = self.score(a, self.encode_text(hard_text).select(keep))  # [B_a, K']
        pos_levels, neg_levels = {}, {}
        for name in weights:
            p = local.fused if name == "fused" else local.levels[name]
            n = negs.fused if name == "fused" else negs.levels[name]
            pos_levels[name] = p[owner, sources]
            neg_levels[name] = n[owner[:, None], index]
        return hard_negative_loss(pos_levels, neg_levels, mask, self.temps, weights, self.fused_taus())["total"]

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


def _isolated(k: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build an optional module from a forked random stream seeded from the current seed and ``k``: the global
    stream continues as if nothing was built (the other weights and everything drawn later stay the same)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((torch.initial_seed() + 7919 * k) % (2**63 - 1))
        return make()


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


def _gather_text(t: TextEmbeddings, pair_weight: torch.Tensor, keys: torch.Tensor, gather: Gather,
                 text_ids: torch.Tensor | None = None, generated: torch.Tensor | None = None
                 ) -> tuple[TextEmbeddings, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Every worker's texts (embeddings, masks, concurrent phrases, pair weights, clip keys, and when given the
    texts' identities and generated flags) in rank order: one collective."""
    parts = [t.sentence, t.phrases, t.phrase_mask.to(torch.bool), t.words, t.word_mask.to(torch.bool)]
    optional = {f: v for f in ("phrase_concurrent", "phrase_place") if (v := getattr(t, f)) is not None}
    parts += [v.to(torch.bool) if f == "phrase_concurrent" else v for f, v in optional.items()]
    extra = ([_split_key(text_ids)] if text_ids is not None else []) + \
        ([generated.to(torch.bool)] if generated is not None else [])
    out = _gather_packed(gather, parts + [pair_weight, _split_key(keys)] + extra)
    fields, (weight, halves), rest = out[:len(parts)], out[len(parts):len(parts) + 2], out[len(parts) + 2:]
    ids = _join_key(rest.pop(0)) if text_ids is not None else None
    gen = rest.pop(0) if generated is not None else None
    base = ("sentence", "phrases", "phrase_mask", "words", "word_mask", *optional)
    return TextEmbeddings(**dict(zip(base, fields))), weight, _join_key(halves), ids, gen
