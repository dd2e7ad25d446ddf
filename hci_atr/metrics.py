"""Retrieval metrics for audio-text retrieval (DCASE task 6B conventions), vectorised.

Input: ``sim [n_audio, n_text]`` and ``text_to_audio [n_text]`` (the clip each caption describes).

- Text-to-audio (T2A): every caption queries the audio set; it has exactly one relevant clip.
  rank = 1 + number of *other* clips scoring >= the relevant clip (ties count against the query: pessimistic).
  AP@10 = 1/rank if rank <= 10 else 0 (one relevant item).
- Audio-to-text (A2T): every clip queries the caption set; its captions are relevant.
  Each relevant caption j gets a position: 1 + #captions scoring higher + #irrelevant captions scoring equal
  (pessimistic) + #relevant captions scoring equal with a smaller index (stable among relevant ones).
  rank = the best position of the clip's captions (used for R@k, median and mean rank).
  AP@10 = (sum over relevant captions with position p_k <= 10, sorted, of k / p_k) / number of relevant captions,
  as in the DCASE 2022 task 6B baseline (normalised by *all* relevant captions, not only those retrieved).

R@k and mAP@10 are percentages; ``rsum = t2a_R1 + t2a_R5 + t2a_R10`` (the contract's model-selection number) and
``rsum_all`` adds the A2T recalls.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def t2a_ranks(sim: np.ndarray, text_to_audio: np.ndarray) -> np.ndarray:
    """[n_text] 1-based rank of each caption's clip (pessimistic ties)."""
    n_text = sim.shape[1]
    gt = sim[text_to_audio, np.arange(n_text)]  # [n_text]
    return (sim >= gt[None, :]).sum(axis=0)  # counts the relevant clip itself -> 1-based


def a2t_positions(sim: np.ndarray, text_to_audio: np.ndarray) -> np.ndarray:
    """[n_text] 1-based position of caption j in its own clip's ranking of all captions (see module docstring)."""
    n_audio, n_text = sim.shape
    order = np.argsort(text_to_audio, kind="stable")
    counts = np.bincount(text_to_audio, minlength=n_audio)
    max_rel = int(counts.max()) if n_text else 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(n_text) - np.repeat(starts, counts)  # position of each sorted text inside its group
    # [n_audio, max_rel] padded table of each clip's caption indices (-1 = none)
    table = np.full((n_audio, max_rel), -1, dtype=np.int64)
    table[text_to_audio[order], slot] = order
    valid = table >= 0
    vals = np.where(valid, np.take_along_axis(sim, np.where(valid, table, 0), axis=1), np.nan)  # [n_audio, max_rel]
    # counts of all captions strictly above / equal, per clip row: batched binary search on the sorted rows
    srt = torch.from_numpy(np.sort(sim, axis=1))  # [n_audio, n_text]
    q = torch.from_numpy(np.where(valid, vals, 0.0))  # [n_audio, max_rel]
    left = torch.searchsorted(srt, q, side="left").numpy()
    right = torch.searchsorted(srt, q, side="right").numpy()
    greater = n_text - right
    equal_all = right - left
    # ties among the clip's own captions
    v1, v2 = vals[:, :, None], vals[:, None, :]
    eq_rel = (v1 == v2) & valid[:, :, None] & valid[:, None, :]
    tbl_i, tbl_j = table[:, :, None], table[:, None, :]
    equal_rel = eq_rel.sum(axis=2)  # includes itself
    earlier_rel = (eq_rel & (tbl_j < tbl_i)).sum(axis=2)
    pos = 1 + greater + (equal_all - equal_rel) + earlier_rel
    out = np.empty(n_text, dtype=np.int64)
    out[table[valid]] = pos[valid]
    return out


def retrieval_metrics(sim, text_to_audio) -> dict[str, float]:
    """sim [n_audio, n_text], text_to_audio [n_text] -> T2A/A2T R@1/5/10, mAP@10, median/mean rank, rsum."""
    sim = _as_np(sim).astype(np.float64)
    t2a = _as_np(text_to_audio).astype(np.int64)
    n_audio, n_text = sim.shape
    if t2a.shape != (n_text,):
        raise ValueError(f"text_to_audio has shape {t2a.shape}, expected ({n_text},)")
    if n_text and (t2a.min() < 0 or t2a.max() >= n_audio):
        raise ValueError("text_to_audio holds an index outside the audio set")
    if np.isnan(sim).any():
        raise ValueError("similarity matrix contains NaN")
    out: dict[str, float] = {}
    r = t2a_ranks(sim, t2a)
    for k in (1, 5, 10):
        out[f"t2a_R{k}"] = float((r <= k).mean() * 100)
    out["t2a_mAP10"] = float(np.where(r <= 10, 1.0 / r, 0.0).mean() * 100)
    out["t2a_medr"] = float(np.median(r))
    out["t2a_meanr"] = float(r.mean())

    pos = a2t_positions(sim, t2a)
    counts = np.bincount(t2a, minlength=n_audio)
    has = counts > 0
    best = np.full(n_audio, np.iinfo(np.int64).max)
    np.minimum.at(best, t2a, pos)
    best = best[has]
    # k = rank of each relevant caption among its clip's captions by position (positions are distinct in a clip)
    order = np.lexsort((pos, t2a))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    k = np.empty(n_text, dtype=np.int64)
    k[order] = np.arange(n_text) - np.repeat(starts, counts) + 1
    contrib = np.where(pos <= 10, k / pos, 0.0)
    ap = np.bincount(t2a, weights=contrib, minlength=n_audio)[has] / counts[has]
    for kk in (1, 5, 10):
        out[f"a2t_R{kk}"] = float((best <= kk).mean() * 100)
    out["a2t_mAP10"] = float(ap.mean() * 100)
    out["a2t_medr"] = float(np.median(best))
    out["a2t_meanr"] = float(best.mean())
    out["rsum"] = out["t2a_R1"] + out["t2a_R5"] + out["t2a_R10"]
    out["rsum_all"] = out["rsum"] + out["a2t_R1"] + out["a2t_R5"] + out["a2t_R10"]
    return out
