"""Embedding a collection for the index with a trained model, and the stored form of its audio embeddings.

The index stores the model's :class:`~hci_atr.models.model.AudioEmbeddings` field by field (:data:`AUDIO_FIELDS`,
one array per field, clips on axis 0): :func:`audio_arrays` turns a model output into those arrays and
:func:`audio_embeddings` turns (row-selected) arrays back into the dataclass the model's ``score`` takes. Plain
PyTorch; the Ray workflow (``hci-atr index``) calls the same functions from its actors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from hci_atr.errors import DataError, HciAtrError
from hci_atr.search.items import IndexItem

# AudioEmbeddings' fields, in order; the first five are always present, the aux pair only when AC is on
AUDIO_FIELDS = ("clip", "segments", "segment_mask", "frames", "frame_mask", "aux_sentence", "aux_mask")
REQUIRED_FIELDS = AUDIO_FIELDS[:5]


def model_config(model: Any):
    """The hci_atr Config a model carries (``model.cfg``)."""
    for name in ("cfg", "config"):
        cfg = getattr(model, name, None)
        if cfg is not None and hasattr(cfg, "audio"):
            return cfg
    raise DataError("model carries no hci_atr Config (expected attribute 'cfg'); load it with "
                    "HciAtrModel.from_pretrained")


def uses_aux(cfg) -> bool:
    """Whether the model consumes generated captions at encode time (AC fusion or AC branch)."""
    return bool(getattr(cfg.model, "ac_fusion", False) or getattr(cfg.model, "ac_branch", False))


def to_device(obj: Any, device: str) -> Any:
    """A model input/output (tensor, TextBatch, dataclass of tensors) on ``device``."""
    if device == "cpu":
        return obj
    if hasattr(obj, "to"):
        return obj.to(device)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def stack_padded(chunks: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate [b_i, ...] chunks on axis 0, zero-padding the other axes to the largest size (zeros are also
    'masked out' for boolean masks, so a padded frame never counts)."""
    if len({c.shape[1:] for c in chunks}) == 1:
        return np.concatenate(chunks, axis=0)
    target = [max(c.shape[d] for c in chunks) for d in range(1, chunks[0].ndim)]
    return np.concatenate([np.pad(c, [(0, 0)] + [(0, t - s) for t, s in zip(target, c.shape[1:])]) for c in chunks],
                          axis=0)


# ---------------------------------------------------------------------------------------------------------------
# AudioEmbeddings <-> arrays
# ---------------------------------------------------------------------------------------------------------------


def audio_arrays(emb: Any) -> dict[str, np.ndarray]:
    """AudioEmbeddings -> ``{field: array [B, ...]}`` for every field that is set (float tensors as float32)."""
    out = {}
    for name in AUDIO_FIELDS:
        t = getattr(emb, name, None)
        if t is None:
            continue
        t = t.detach().cpu()
        out[name] = (t.float() if t.is_floating_point() else t).numpy()
    return out


def audio_embeddings(arrays: Mapping[str, np.ndarray], device: str = "cpu") -> Any:
    """``{field: array [B, ...]}`` (row-selected) -> the model's AudioEmbeddings on ``device`` (absent fields None)."""
    import torch

    from hci_atr.models.model import AudioEmbeddings

    return AudioEmbeddings(**{k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()})


# ---------------------------------------------------------------------------------------------------------------
# embedding clips and texts
# ---------------------------------------------------------------------------------------------------------------


def clip_mel(path: str, audio_cfg) -> tuple[np.ndarray, np.ndarray]:
    """An audio file -> (mel [T, M] float32, mask [T] bool), as feature extraction computes it; raises AudioError."""
    from hci_atr.data.audio import load_audio, wave_features

    return wave_features(load_audio(path, audio_cfg.sample_rate, max_seconds=audio_cfg.duration), audio_cfg)


def embed_audio_batch(model: Any, mels: np.ndarray, masks: np.ndarray, generated: Sequence[str | None],
                      device: str = "cpu") -> Any:
    """mels [B, T, M], masks [B, T], generated captions (None = none) -> the model's AudioEmbeddings."""
    import torch

    cfg = model_config(model)
    aux = aux_mask = None
    if uses_aux(cfg):
        aux = to_device(model.tokenize([g or "" for g in generated]), device)
        aux_mask = torch.tensor([bool(g) for g in generated], device=device)
    with torch.no_grad():
        return model.encode_audio(torch.from_numpy(mels).to(device), torch.from_numpy(masks).to(device),
                                  aux=aux, aux_mask=aux_mask)


def embed_texts(model: Any, texts: Sequence[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """texts -> L2-normalised sentence embeddings, float32 [len(texts), D]."""
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        batch = to_device(model.tokenize(list(texts[i:i + batch_size])), device)
        with torch.no_grad():
            out.append(model.encode_text(batch).sentence.float().cpu().numpy())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return l2_normalize(np.concatenate(out, axis=0))


@dataclass
class EmbeddedItems:
    """What :func:`embed_items` returns: ``arrays`` (:func:`audio_arrays` of all kept clips, [N, ...] each),
    ``items`` (the N kept clips, same order) and ``errors`` (audio_id -> reason, for clips that failed)."""

    arrays: dict[str, np.ndarray]
    items: list[IndexItem]
    errors: dict[str, str] = field(default_factory=dict)


def embed_items(model: Any, items: Sequence[IndexItem], batch_size: int = 16, device: str = "cpu",
                on_error: str = "raise") -> EmbeddedItems:
    """Embed clips without Ray (tests, small collections; the Ray workflow does the same per actor).
    ``on_error="raise"``: the first unreadable clip raises; otherwise it is recorded in ``errors`` and skipped."""
    cfg = model_config(model)
    chunks: dict[str, list[np.ndarray]] = {}
    kept: list[IndexItem] = []
    errors: dict[str, str] = {}
    for i in range(0, len(items), batch_size):
        mels, masks, ok = [], [], []
        for it in items[i:i + batch_size]:
            try:
                m, k = clip_mel(it.audio_path, cfg.audio)
            except HciAtrError as e:
                if on_error == "raise":
                    raise
                errors[it.audio_id] = str(e)
                continue
            mels.append(m), masks.append(k), ok.append(it)
        if not ok:
            continue
        emb = embed_audio_batch(model, np.stack(mels), np.stack(masks), [it.generated_caption for it in ok], device)
        for k, v in audio_arrays(emb).items():
            chunks.setdefault(k, []).append(v)
        kept.extend(ok)
    if not kept:
        raise DataError("index: no clip could be embedded; check the audio files")
    return EmbeddedItems({k: stack_padded(v) for k, v in chunks.items()}, kept, errors)
