"""Mined batches: an epoch order that puts each clip next to a clip whose captions read almost the same.

Random batches almost never hold a clip and its order-swapped or attribute-flipped twin, so the contrastive loss never
has to tell them apart. With ``train.batch_mining: text`` an epoch's order is built from groups of
``train.batch_mining_group`` clips instead of single clips (:func:`mined_order`): clips are visited in a seeded
random order; an unassigned clip starts a group and takes its nearest unassigned neighbours by caption text; the
groups are then shuffled and laid end to end, so consecutive rows (one batch) hold near neighbours. Nearness is the
cosine of the clips' bag-of-words vectors (:func:`caption_vectors`: every caption of a clip, words hashed into
``dim`` buckets, tf-idf weighted so words every caption shares count little), so "a beep, then a knock" and "a knock,
then a beep" are near. The neighbours are found in blocks (:func:`nearest_candidates`), memory ``block x n``; the
work is ``n^2 * dim`` per epoch over the ``n`` rows given (fast for thousands of clips; for a split of tens of
thousands it is minutes an epoch on a CPU, and the neighbours are not cached across epochs).

Everything is deterministic: the hashing is a fixed hash (not Python's salted one), ties go to the lower index, and
all randomness is drawn from the generator passed in, as :func:`hci_atr.training.iter_batches` does for its shuffle.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch

from hci_atr.data.text import split_words

def caption_vectors(captions: Sequence[Sequence[str]], dim: int = 1024) -> np.ndarray:
    """Each clip's captions -> [N, dim] float32, L2-normalised (zero for a clip without words): lower-cased words
    hashed (crc32) into ``dim`` buckets, counts over all the clip's captions, times idf ``log((1 + N) / (1 + df)) + 1``
    of each bucket's document frequency over the clips."""
    n = len(captions)
    counts = np.zeros((n, dim), dtype=np.float32)
    for i, caps in enumerate(captions):
        for cap in caps:
            for w in split_words(str(cap))[0]:
                counts[i, zlib.crc32(w.lower().encode()) % dim] += 1.0
    df = (counts > 0).sum(0)
    x = counts * (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)[None]
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def nearest_candidates(vectors: np.ndarray, k: int = 8, block: int = 512) -> np.ndarray:
    """[N, D] L2-normalised -> [N, min(k, N - 1)] indices of each row's most similar other rows, most similar
    first (ties: lower index first). Computed ``block`` rows at a time."""
    n = vectors.shape[0]
    k = max(0, min(k, n - 1))
    out = np.zeros((n, k), dtype=np.int64)
    if k == 0:
        return out
    for s in range(0, n, block):
        sims = vectors[s:s + block] @ vectors.T  # [b, N]
        rows = np.arange(s, min(n, s + block))
        sims[rows - s, rows] = -np.inf  # never oneself
        # a stable sort of -sims: the most similar first, ties in index order
        out[s:s + block] = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return out


def mined_order(candidates: np.ndarray, group: int, generator: torch.Generator | None) -> list[int]:
    """An epoch's order of ``len(candidates)`` rows: groups of up to ``group`` rows (a start row, visited in
    ``randperm`` order, and its first unassigned candidates), the groups in ``randperm`` order. Every row appears
    exactly once."""
    n = candidates.shape[0]
    visit = torch.randperm(n, generator=generator).tolist()
    taken = np.zeros(n, dtype=bool)
    groups: list[list[int]] = []
    for i in visit:
        if taken[i]:
            continue
        g = [i]
        taken[i] = True
        for j in candidates[i]:
            if len(g) >= group:
                break
            if not taken[j]:
                g.append(int(j))
                taken[j] = True
        groups.append(g)
    return [i for gi in torch.randperm(len(groups), generator=generator).tolist() for i in groups[gi]]
