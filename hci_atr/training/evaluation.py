"""Embeddings of a split and its retrieval metrics (eval mode, start crops, every caption of every clip).

Memory: the audio goes through the encoder in batches of at most :data:`EVAL_AUDIO_SECONDS` seconds of audio (fewer
clips per forward for long clips; an eval forward's activations grow with clips x seconds), texts in batches of
``batch_size``; embeddings do not depend on either batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hci_atr.config import Config
from hci_atr.errors import DataError
from hci_atr.metrics import retrieval_metrics
from hci_atr.models.model import AudioEmbeddings, HciAtrModel, TextEmbeddings
from hci_atr.training.batches import eval_audio, generated_caption

EVAL_AUDIO_SECONDS = 160.0  # seconds of audio per encoder forward in evaluation (e.g. 32 clips of 5 s, 5 of 30 s)


@dataclass
class EmbeddedSplit:
    """Embeddings of a split: audio [n_audio], text [n_text] (all captions), text_to_audio [n_text]."""

    audio: AudioEmbeddings
    text: TextEmbeddings
    text_to_audio: torch.Tensor
    audio_ids: list[str]
    captions: list[str]


def _cat(parts: list, cls):
    vals = [p._values() for p in parts]
    return cls(*(None if col[0] is None else torch.cat(col) for col in zip(*vals)))


def audio_batch_size(cfg: Config, batch_size: int | None = None, audio_seconds: float = EVAL_AUDIO_SECONDS) -> int:
    """Clips per evaluation forward: ``batch_size`` (default ``train.batch_size``), capped so that a forward holds at
    most ``audio_seconds`` of audio (clips of ``cfg.audio.duration``), and at least one clip."""
    bs = batch_size or cfg.train.batch_size
    fit = math.floor(audio_seconds / cfg.audio.duration + 1e-9)  # 1e-9: 160 s / 5 s is 32, not 31.999...
    return max(1, min(bs, fit))


@torch.no_grad()
def embed_split(model, rows: list[dict], cfg: Config, batch_size: int | None = None,
                audio_seconds: float = EVAL_AUDIO_SECONDS) -> EmbeddedSplit:
    """Embed every clip (start crop of ``cfg.audio.duration``) and every caption of ``rows``, in eval mode.
    Captions go in batches of ``batch_size`` (default ``train.batch_size``), clips in batches of
    :func:`audio_batch_size` (at most ``audio_seconds`` of audio per forward)."""
    core: HciAtrModel = getattr(model, "module", model)
    was = core.training
    core.eval()
    bs = batch_size or cfg.train.batch_size
    audio_bs = audio_batch_size(cfg, bs, audio_seconds)
    try:
        audio_parts, text_parts, caps, t2a = [], [], [], []
        for i in range(0, len(rows), audio_bs):
            chunk = rows[i:i + audio_bs]
            mel, mask = eval_audio(chunk, cfg, core)
            aux = aux_mask = None
            if core.uses_aux:
                gens = [generated_caption(r) for r in chunk]
                aux = core.tokenize(gens, pad_words_to=cfg.model.max_words)
                aux_mask = torch.tensor([bool(g) for g in gens], device=core.device)
            audio_parts.append(core.encode_audio(mel, mask, aux, aux_mask))
            for j, r in enumerate(chunk):
                for c in r.get("captions") or []:
                    if isinstance(c, str) and c.strip():
                        caps.append(c)
                        t2a.append(i + j)
        for i in range(0, len(caps), bs):
            text_parts.append(core.encode_text(core.tokenize(caps[i:i + bs], pad_words_to=cfg.model.max_words)))
    finally:
        core.train(was)
    if not audio_parts or not text_parts:
        raise DataError("embed_split: the split has no clips or no captions")
    return EmbeddedSplit(_cat(audio_parts, AudioEmbeddings), _cat(text_parts, TextEmbeddings),
                         torch.tensor(t2a, dtype=torch.long), [str(r["audio_id"]) for r in rows], caps)


@torch.no_grad()
def evaluate(model, rows: list[dict], cfg: Config, batch_size: int | None = None) -> dict[str, float]:
    """Retrieval metrics of the fused score over a split, plus ``<level>_rsum`` for each scored level."""
    core: HciAtrModel = getattr(model, "module", model)
    emb = embed_split(model, rows, cfg, batch_size)
    scores = core.score(emb.audio, emb.text)
    out = retrieval_metrics(scores.fused, emb.text_to_audio)
    for name, s in scores.levels.items():
        out[f"{name}_rsum"] = retrieval_metrics(s, emb.text_to_audio)["rsum"]
    out["n_audio"] = float(len(emb.audio_ids))
    out["n_text"] = float(len(emb.captions))
    return out
