"""Feature rows -> training / evaluation batches.

Rows are dicts with the feature-shard columns (``audio_id, captions, mel, n_frames, n_mels`` ...) and optionally
``generated_caption`` (str or None); :class:`ArrowRows` gives a pyarrow table of them the same face without decoding
every row up front. All randomness goes through the ``generator`` passed in, so a seed fixes every shuffle, crop and
caption choice: an epoch's batches are ``randperm(len(rows), generator)`` cut into ``batch_size`` chunks of the rows
in the order given, each chunk made into a :class:`Batch` with the same generator (:func:`iter_batches`). With the
model's hard negatives on, a training batch also carries the hard-negative captions of its real captions
(:func:`hci_atr.data.negatives.hard_negative_texts`; deterministic, so they draw nothing from the generator).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch

from hci_atr.config import Config
from hci_atr.data.audio import crop_frames, n_frames
from hci_atr.data.negatives import hard_negative_texts
from hci_atr.data.text import normalize_caption
from hci_atr.data.shards import row_mel, table_to_rows
from hci_atr.errors import DataError
from hci_atr.training.mining import caption_vectors, mined_order, nearest_candidates
from hci_atr.models.model import HciAtrModel
from hci_atr.models.text_encoder import TextBatch


def audio_key(audio_id: str) -> float:
    """A float64-exact (48-bit) identity for a clip, so positives can be matched after an all-gather."""
    return float(int.from_bytes(hashlib.blake2b(str(audio_id).encode(), digest_size=6).digest(), "big"))


def text_key(text: str) -> float:
    """A float64-exact (48-bit) identity for a caption's text (:func:`hci_atr.data.text.normalize_caption`): two
    captions with the same key are the same text."""
    return audio_key("text:" + normalize_caption(text))


@dataclass
class Batch:
    """One training/eval batch.

    mel [B_a, T, M], mel_mask [B_a, T]; text: B_t captions; audio_keys [B_a], text_keys [B_t] float64 identities;
    pair_weight [B_t] (1 real caption, ac_augment_weight generated caption, 0 placeholder); aux: generated captions
    (one per clip) + aux_mask [B_a], or None; audio_ids [B_a]; text_to_audio [B_t] (row index of each text);
    hard_text: K hard-negative captions and hard_source [K] (long: the index in ``text`` of the real caption each
    was built from), or None (evaluation, hard negatives off, or none in this batch). Training batches also carry
    text_ids [B_t] (:func:`text_key` of each text), audio_text_ids [B_a, K] (those of every text a clip owns: its
    captions and, with ``ac_augment``, its generated one; NaN padding) and text_generated [B_t] (the generated
    captions ``ac_augment`` added), see :meth:`hci_atr.models.model.HciAtrModel.forward`.
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
    hard_text: TextBatch | None = None
    hard_source: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    audio_text_ids: torch.Tensor | None = None
    text_generated: torch.Tensor | None = None

    def forward_kwargs(self) -> dict:
        return dict(mel=self.mel, mel_mask=self.mel_mask, text=self.text, audio_keys=self.audio_keys,
                    text_keys=self.text_keys, pair_weight=self.pair_weight, aux=self.aux, aux_mask=self.aux_mask,
                    hard_text=self.hard_text, hard_source=self.hard_source, text_ids=self.text_ids,
                    audio_text_ids=self.audio_text_ids, text_generated=self.text_generated)


class Rows(Protocol):
    """What :func:`iter_batches` reads: a length and the rows at some positions (a list of dicts, or ArrowRows)."""

    def __len__(self) -> int: ...

    def take(self, positions: list[int]) -> list[dict]: ...


class ArrowRows:
    """A pyarrow table of feature rows as :class:`Rows` (optionally only the rows at ``positions``, e.g. one
    worker's share of an epoch): a batch's rows are decoded (:func:`table_to_rows`) when taken, so an epoch holds
    Arrow columns, not one Python dict per clip.

    A batch is gathered as one-row slices of the table's record batches (zero-copy) rather than ``Table.take``,
    which concatenates a column's chunks first: a copy of the whole mel column per batch for a table made of many
    blocks."""

    def __init__(self, table, positions=None):
        import pyarrow as pa

        self.table = table
        self.positions = np.arange(table.num_rows) if positions is None else np.asarray(positions, dtype=np.int64)
        self._batches = table.to_batches()
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])[:-1]
        self._pa = pa

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, positions: list[int]) -> list[dict]:
        rows = self.positions[np.asarray(positions, dtype=np.int64)]
        which = np.searchsorted(self._starts, rows, side="right") - 1
        parts = [self._batches[b].slice(int(r - self._starts[b]), 1) for r, b in zip(rows, which)]
        return table_to_rows(self._pa.Table.from_batches(parts, schema=self.table.schema))

    def audio_ids(self) -> list[str]:
        return [str(a) for a in self.table.column("audio_id").take(self.positions).to_pylist()]


def _captions(rows: Sequence[dict] | Rows) -> list[list[str]]:
    """Every row's own captions (for :mod:`hci_atr.training.mining`), without decoding the mels."""
    if isinstance(rows, ArrowRows):
        return [list(c or []) for c in rows.table.column("captions").take(rows.positions).to_pylist()]
    return [list(r["captions"]) for r in rows]


def _take(rows: Sequence[dict] | Rows, positions: list[int]) -> list[dict]:
    return rows.take(positions) if hasattr(rows, "take") else [rows[i] for i in positions]


def generated_caption(row: dict) -> str:
    """The row's generated (auxiliary) caption, stripped; "" when it has none."""
    g = row.get("generated_caption")
    return g.strip() if isinstance(g, str) else ""


def _crop_mode(cfg: Config, train: bool) -> str:
    return "random" if train and cfg.train.random_crop else "start"


def make_batch(rows: list[dict], cfg: Config, model: HciAtrModel, train: bool,
               generator: torch.Generator | None = None) -> Batch:
    """Rows -> Batch. Training: a random caption per clip and a random crop of ``cfg.audio.duration`` (the start when
    ``train.random_crop`` is off); eval: the first caption and the start. With ``model.ac_augment`` in training,
    every clip adds its generated caption as an extra text (weight ``ac_augment_weight``; weight 0 placeholder when
    it has none, so shapes stay equal across workers). With the model's hard negatives on (``model.hard_negatives``,
    weight > 0) in training, ``hard_text`` / ``hard_source`` hold the hard negatives of the picked real captions
    (never of generated ones), none of which reads as another caption of the same clip.
    """
    if not rows:
        raise DataError("make_batch: no rows")
    core: HciAtrModel = getattr(model, "module", model)
    n = n_frames(cfg.audio)
    mode = _crop_mode(cfg, train)
    mels, masks, texts, ids, owns = [], [], [], [], []
    for row in rows:
        mel, mask = crop_frames(row_mel(row), n, mode, generator)
        mels.append(mel)
        masks.append(mask)
        caps = [c for c in (row.get("captions") or []) if isinstance(c, str) and c.strip()]
        if not caps:
            raise DataError(f"feature row {row.get('audio_id', '?')!r}: no caption")
        k = int(torch.randint(0, len(caps), (1,), generator=generator)) if train and len(caps) > 1 else 0
        texts.append(caps[k])
        owns.append(caps)
        ids.append(str(row["audio_id"]))
    keys = torch.tensor([audio_key(i) for i in ids], dtype=torch.float64)
    text_keys, weights, t2a = keys.clone(), torch.ones(len(rows)), torch.arange(len(rows))
    gens = [generated_caption(r) for r in rows]
    generated = torch.zeros(len(rows), dtype=torch.bool)
    augment = train and cfg.model.ac_augment
    if augment:
        has = torch.tensor([bool(g) for g in gens])
        texts = texts + gens
        text_keys = torch.cat([keys, keys])
        weights = torch.cat([weights, has.float() * cfg.model.ac_augment_weight])
        t2a = torch.cat([t2a, t2a])
        generated = torch.cat([generated, has])
    pad = cfg.model.max_words if train else None
    text = core.tokenize(texts, pad_words_to=pad)
    aux = aux_mask = None
    if core.uses_aux:
        aux = core.tokenize(gens, pad_words_to=pad)
        aux_mask = torch.tensor([bool(g) for g in gens], device=core.device)
    dev = core.device
    hard_text = hard_source = None
    if train and core.hard_negatives_on:
        # texts[:len(rows)] are the real captions, in row order: a source index into them is one into ``text``
        negs, source = hard_negative_texts(texts[:len(rows)], cfg.model.hard_negatives, owns)
        if negs:  # never gathered: no fixed width needed
            hard_text = core.tokenize(negs)
            hard_source = torch.tensor(source, dtype=torch.long, device=dev)
    text_ids = audio_text_ids = text_generated = None
    if train:
        text_ids = torch.tensor([text_key(x) if x else math.nan for x in texts], dtype=torch.float64, device=dev)
        owned = [[text_key(c) for c in caps] + ([text_key(g)] if augment and g else []) for caps, g in zip(owns, gens)]
        width = max(len(o) for o in owned)
        audio_text_ids = torch.tensor([o + [math.nan] * (width - len(o)) for o in owned], dtype=torch.float64,
                                      device=dev)
        text_generated = generated.to(dev)
    return Batch(torch.from_numpy(np.stack(mels)).to(dev), torch.from_numpy(np.stack(masks)).to(dev), text,
                 keys.to(dev), text_keys.to(dev), weights.to(dev), aux, aux_mask, ids, t2a, hard_text, hard_source,
                 text_ids, audio_text_ids, text_generated)


def eval_audio(rows: list[dict], cfg: Config, model: HciAtrModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation audio input of ``rows``: start crops of ``cfg.audio.duration``, ``(mel [B, T, M],
    mel_mask [B, T])`` on the model's device."""
    core: HciAtrModel = getattr(model, "module", model)
    crops = [crop_frames(row_mel(r), n_frames(cfg.audio), "start") for r in rows]
    return (torch.from_numpy(np.stack([c[0] for c in crops])).to(core.device),
            torch.from_numpy(np.stack([c[1] for c in crops])).to(core.device))


def iter_batches(rows: Sequence[dict] | Rows, cfg: Config, model: HciAtrModel, train: bool,
                 generator: torch.Generator | None, batch_size: int | None = None,
                 drop_last: bool = False) -> Iterable[Batch]:
    """Shuffle (training: ``randperm(len(rows), generator)``, or with ``train.batch_mining: text`` the mined order of
    :mod:`hci_atr.training.mining`, near neighbours among ``rows`` side by side) and cut ``rows`` into Batches, in the
    order given otherwise. The same rows in the same order and the same generator state give the same batches,
    whoever calls."""
    bs = batch_size or cfg.train.batch_size
    n = len(rows)
    if train and cfg.train.batch_mining == "text":
        order = mined_order(nearest_candidates(caption_vectors(_captions(rows))), cfg.train.batch_mining_group,
                            generator)
    else:
        order = torch.randperm(n, generator=generator).tolist() if train else list(range(n))
    stop = n - (n % bs if drop_last else 0)
    for i in range(0, stop, bs):
        chunk = order[i:i + bs]
        if chunk:
            yield make_batch(_take(rows, chunk), cfg, model, train, generator)
