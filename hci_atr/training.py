"""Training core: batches, one epoch, embeddings of a split, evaluation. Plain PyTorch (Ray Train calls these).

Rows are dicts with the feature-shard columns (``audio_id, captions, mel, n_frames, n_mels`` ...) and optionally
``generated_caption`` (str or None). All randomness goes through the ``generator`` passed in, so a seed fixes every
crop and caption choice.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from hci_atr.config import Config
from hci_atr.errors import DataError
from hci_atr.metrics import retrieval_metrics
from hci_atr.models.model import AudioEmbeddings, HciAtrModel, TextEmbeddings
from hci_atr.models.text_encoder import TextBatch


def audio_key(audio_id: str) -> float:
    """A float64-exact (48-bit) identity for a clip, so positives can be matched after an all-gather."""
    return float(int.from_bytes(hashlib.blake2b(str(audio_id).encode(), digest_size=6).digest(), "big"))


def n_target_frames(cfg: Config) -> int:
    """Frames of a clip cropped/padded to ``cfg.audio.duration`` (``T = N // hop + 1``, as the front end makes)."""
    return int(round(cfg.audio.duration * cfg.audio.sample_rate)) // cfg.audio.hop_length + 1


def row_mel(row: dict) -> np.ndarray:
    """The row's log-mel as [n_frames, n_mels] float32; a malformed row raises DataError naming the clip."""
    try:
        n, m = int(row["n_frames"]), int(row["n_mels"])
        mel = np.asarray(row["mel"], dtype=np.float32)
        return mel.reshape(n, m)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"feature row {row.get('audio_id', '?')!r}: bad mel/n_frames/n_mels ({e}); "
                        "re-run hci-atr extract-features") from None


@dataclass
class Batch:
    """One training/eval batch.

    mel [B_a, T, M], mel_mask [B_a, T]; text: B_t captions; audio_keys [B_a], text_keys [B_t] float64 identities;
    pair_weight [B_t] (1 real caption, ac_augment_weight generated caption, 0 placeholder); aux: generated captions
    (one per clip) + aux_mask [B_a], or None; audio_ids [B_a]; text_to_audio [B_t] (row index of each text).
    """

    mel: torch.Tensor
    mel_mask: torch.Tensor
    text: TextBatch
    audio_keys: torch.Tensor
    text_keys: torch.Tensor
    pair_weight: torch.Tensor
    aux: TextBatch | None
    aux_mask: torch.Tensor | None
    audio_ids: list[str]
    text_to_audio: torch.Tensor

    def forward_kwargs(self) -> dict:
        return dict(mel=self.mel, mel_mask=self.mel_mask, text=self.text, audio_keys=self.audio_keys,
                    text_keys=self.text_keys, pair_weight=self.pair_weight, aux=self.aux, aux_mask=self.aux_mask)


def _crop(mel: np.ndarray, n: int, train: bool, generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    t = mel.shape[0]
    mask = np.zeros(n, dtype=bool)
    if t >= n:
        start = int(torch.randint(0, t - n + 1, (1,), generator=generator)) if train and t > n else 0
        mask[:] = True
        return mel[start:start + n], mask
    out = np.zeros((n, mel.shape[1]), dtype=np.float32)
    out[:t] = mel
    mask[:t] = True
    return out, mask


def _generated(row: dict) -> str:
    g = row.get("generated_caption")
    return g.strip() if isinstance(g, str) else ""


def warmup_factor(epochs_done: float, warmup_epochs: int) -> float:
    """Learning-rate multiplier of the linear warm-up: ``(epochs_done + 1) / warmup_epochs`` capped at 1, then
    constant (``warmup_epochs = 0``: 1 from the start). ``epochs_done`` may be fractional (per-step schedules)."""
    return min(1.0, (epochs_done + 1.0) / warmup_epochs) if warmup_epochs > 0 else 1.0


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> str | None:
    """Load a checkpoint's optimizer ``state``; None when it fits, else why not (one line), the optimizer left fresh.

    It does not fit when the checkpoint was written while another set of parameters was trainable (an older version,
    or a run whose switches changed): the model weights still resume, and AdamW restarts its moment estimates.
    """
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"the checkpoint's optimizer state does not fit this model's trainable parameters ({first})"
    return None


def make_batch(rows: list[dict], cfg: Config, model: HciAtrModel, train: bool,
               generator: torch.Generator | None = None) -> Batch:
    """Rows -> Batch. Training: a random caption per clip and a random crop of ``cfg.audio.duration``; eval: the first
    caption and the start. With ``model.ac_augment`` in training, every clip adds its generated caption as an extra
    text (weight ``ac_augment_weight``; weight 0 placeholder when it has none, so shapes stay equal across workers).
    """
    if not rows:
        raise DataError("make_batch: no rows")
    core: HciAtrModel = getattr(model, "module", model)
    n = n_target_frames(cfg)
    mels, masks, texts, ids = [], [], [], []
    for row in rows:
        mel, mask = _crop(row_mel(row), n, train, generator)
        mels.append(mel)
        masks.append(mask)
        caps = [c for c in (row.get("captions") or []) if isinstance(c, str) and c.strip()]
        if not caps:
            raise DataError(f"feature row {row.get('audio_id', '?')!r}: no caption")
        k = int(torch.randint(0, len(caps), (1,), generator=generator)) if train and len(caps) > 1 else 0
        texts.append(caps[k])
        ids.append(str(row["audio_id"]))
    keys = torch.tensor([audio_key(i) for i in ids], dtype=torch.float64)
    text_keys, weights, t2a = keys.clone(), torch.ones(len(rows)), torch.arange(len(rows))
    gens = [_generated(r) for r in rows]
    if train and cfg.model.ac_augment:
        has = torch.tensor([bool(g) for g in gens])
        texts = texts + gens
        text_keys = torch.cat([keys, keys])
        weights = torch.cat([weights, has.float() * cfg.model.ac_augment_weight])
        t2a = torch.cat([t2a, t2a])
    pad = cfg.model.max_words if train else None
    text = core.tokenize(texts, pad_words_to=pad)
    aux = aux_mask = None
    if core.uses_aux:
        aux = core.tokenize(gens, pad_words_to=pad)
        aux_mask = torch.tensor([bool(g) for g in gens], device=core.device)
    dev = core.device
    return Batch(torch.from_numpy(np.stack(mels)).to(dev), torch.from_numpy(np.stack(masks)).to(dev), text,
                 keys.to(dev), text_keys.to(dev), weights.to(dev), aux, aux_mask, ids, t2a)


def iter_batches(rows: list[dict], cfg: Config, model: HciAtrModel, train: bool, generator: torch.Generator,
                 batch_size: int | None = None, drop_last: bool = False) -> Iterable[Batch]:
    """Shuffle (training) and cut rows into Batches."""
    bs = batch_size or cfg.train.batch_size
    order = torch.randperm(len(rows), generator=generator).tolist() if train else list(range(len(rows)))
    stop = len(order) - (len(order) % bs if drop_last else 0)
    for i in range(0, stop, bs):
        chunk = [rows[j] for j in order[i:i + bs]]
        if chunk:
            yield make_batch(chunk, cfg, model, train, generator)


def train_epoch(model, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], cfg: Config,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """One pass over ``batches``; returns the mean loss per level, ``total``, ``batches`` and ``data_seconds`` (time
    spent waiting for the next batch, included in the epoch time: the input-bound share).

    ``model`` may be DDP-wrapped (called through ``__call__``). With ``gather`` (all-gather with gradient) the texts of
    the global batch are the candidates and each worker's loss is its share of the global loss times the number of
    workers; all_gather's backward sums over workers and DDP averages, so the parameter gradients are those of the
    global loss (``hci_atr.losses.sharded_info_nce``).
    """
    core: HciAtrModel = getattr(model, "module", model)
    model.train()
    sums: dict[str, float] = {}
    n = 0
    params = [p for p in model.parameters() if p.requires_grad]
    wait = 0.0  # seconds spent waiting for the next batch (reading + make_batch): input-bound when a large share
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t0
        if batch is None:
            break
        out = model(**batch.forward_kwargs(), gather=gather)
        loss = out.losses["total"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at batch {n} (lower train.lr?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip and cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        for k, v in out.losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        n += 1
    res = {f"loss_{k}": v / max(n, 1) for k, v in sums.items()}
    res["batches"] = float(n)
    res["data_seconds"] = wait
    for lv, tau in core.temps.as_dict().items():
        res[f"tau_{lv}"] = tau
    return res


@dataclass
class EmbeddedSplit:
    """Embeddings of a split: audio [n_audio], text [n_text] (all captions), text_to_audio [n_text]."""

    audio: AudioEmbeddings
    text: TextEmbeddings
    text_to_audio: torch.Tensor
    audio_ids: list[str]
    captions: list[str]


def _cat(parts: list, cls):
    vals = [p._values() if hasattr(p, "_values") else (p.sentence, p.phrases, p.phrase_mask, p.words, p.word_mask)
            for p in parts]
    return cls(*(None if col[0] is None else torch.cat(col) for col in zip(*vals)))


@torch.no_grad()
def embed_split(model, rows: list[dict], cfg: Config, batch_size: int | None = None) -> EmbeddedSplit:
    """Embed every clip (start crop of ``cfg.audio.duration``) and every caption of ``rows``, in eval mode."""
    core: HciAtrModel = getattr(model, "module", model)
    was = core.training
    core.eval()
    bs = batch_size or cfg.train.batch_size
    try:
        n = n_target_frames(cfg)
        audio_parts, text_parts, caps, t2a = [], [], [], []
        for i in range(0, len(rows), bs):
            chunk = rows[i:i + bs]
            crops = [_crop(row_mel(r), n, False, None) for r in chunk]
            mel = torch.from_numpy(np.stack([c[0] for c in crops])).to(core.device)
            mask = torch.from_numpy(np.stack([c[1] for c in crops])).to(core.device)
            aux = aux_mask = None
            if core.uses_aux:
                gens = [_generated(r) for r in chunk]
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


