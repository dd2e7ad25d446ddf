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

Pair accuracy (:func:`pair_accuracy`, the compositional benchmark of :mod:`hci_atr.data.pairs`): for a hard-negative
pair of clips (i, j), each caption c of i is a trial, correct when ``sim[i, c] > sim[j, c]``, and each caption of j
likewise with i and j swapped; a tie counts 0.5. Accuracy pools the trials (a fraction; chance is 0.5).

Caption quality (:func:`caption_word_f1`, :func:`caption_quality`): how well a generated caption names what the
clip's own captions say, as the unigram F1 of its words against each reference (multisets, lower-cased), best
reference taken; reported per split and, where the captioner gives a confidence, per confidence quartile (so a user
can see whether ``model.ac_min_confidence`` would drop the poor ones).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from hci_atr.errors import DataError


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _checked(sim, text_to_audio) -> tuple[np.ndarray, np.ndarray]:
    """(sim float64 [n_audio, n_text], text_to_audio int64 [n_text]), checked for shape, range and NaN."""
    sim = _as_np(sim).astype(np.float64)
    t2a = _as_np(text_to_audio).astype(np.int64)
    n_audio, n_text = sim.shape
    if t2a.shape != (n_text,):
        raise ValueError(f"text_to_audio has shape {t2a.shape}, expected ({n_text},)")
    if n_text and (t2a.min() < 0 or t2a.max() >= n_audio):
        raise ValueError("text_to_audio holds an index outside the audio set")
    if np.isnan(sim).any():
        raise ValueError("similarity matrix contains NaN")
    return sim, t2a


def t2a_ranks(sim: np.ndarray, text_to_audio: np.ndarray) -> np.ndarray:
    """[n_text] 1-based rank of each caption's clip (pessimistic ties)."""
    n_text = sim.shape[1]
    gt = sim[text_to_audio, np.arange(n_text)]  # [n_text]
    return (sim >= gt[None, :]).sum(axis=0)  # counts the relevant clip itself -> 1-based


def caption_table(text_to_audio: np.ndarray, n_audio: int) -> np.ndarray:
    """[n_audio, max captions per clip] each clip's caption (text) indices in ascending order, padded with -1."""
    n_text = len(text_to_audio)
    order = np.argsort(text_to_audio, kind="stable")
    counts = np.bincount(text_to_audio, minlength=n_audio)
    max_rel = int(counts.max()) if n_text else 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(n_text) - np.repeat(starts, counts)  # position of each sorted text inside its group
    table = np.full((n_audio, max_rel), -1, dtype=np.int64)
    table[text_to_audio[order], slot] = order
    return table


def a2t_positions(sim: np.ndarray, text_to_audio: np.ndarray) -> np.ndarray:
    """[n_text] 1-based position of caption j in its own clip's ranking of all captions (see module docstring)."""
    n_audio, n_text = sim.shape
    table = caption_table(text_to_audio, n_audio)  # [n_audio, max_rel]
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
    sim, t2a = _checked(sim, text_to_audio)
    n_audio, n_text = sim.shape
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


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def pair_accuracy(sim, text_to_audio, pairs: Sequence[Sequence]) -> dict[str, float]:
    """Hard-negative pair accuracy (module docstring) per pair type, as fractions in [0, 1].

    ``sim [n_audio, n_text]``, ``text_to_audio [n_text]``; ``pairs``: tuples ``(i, j, type[, attribute[,
    captions_i, captions_j]])`` of audio row indices (:class:`hci_atr.data.pairs.Pair`). ``captions_i`` (positions
    among row i's captions, in text order) limits i's trials to those captions; None means all of them.

    Returns ``pairs_acc`` / ``pairs_n`` over all pairs, ``pairs_<type>_acc`` / ``pairs_<type>_n`` per type and
    ``pairs_<type>_<attribute>_acc`` / ``_n`` where the attribute is known (e.g. ``pairs_attribute_loudness_acc``).
    ``_n`` counts pairs; a group without trials has no ``_acc`` key.
    """
    sim, t2a = _checked(sim, text_to_audio)
    n_audio, n_text = sim.shape
    n_pairs = len(pairs)
    if not n_pairs:
        return {"pairs_n": 0.0}
    first = np.array([int(p[0]) for p in pairs], dtype=np.int64)
    second = np.array([int(p[1]) for p in pairs], dtype=np.int64)
    if first.min() < 0 or second.min() < 0 or max(first.max(), second.max()) >= n_audio:
        raise ValueError("a pair holds an audio index outside the audio set")
    if (first == second).any():
        raise ValueError("a pair names the same audio row twice")
    table = caption_table(t2a, n_audio)  # [n_audio, R]
    width = table.shape[1]
    # 2P trial rows: side 0 = captions of i against j, side 1 = captions of j against i
    owner, other = np.concatenate([first, second]), np.concatenate([second, first])
    caps = table[owner]  # [2P, R]
    use = caps >= 0
    n_caps = use.sum(axis=1)
    for side in (0, 1):
        for k, p in enumerate(pairs):
            chosen = p[4 + side] if len(p) > 4 + side else None
            if chosen is None:
                continue
            r = side * n_pairs + k
            pos = np.asarray(list(chosen), dtype=np.int64)
            if pos.size and (pos.min() < 0 or pos.max() >= n_caps[r]):
                raise DataError(f"pair {k}: caption position {int(pos.max())} of audio row {int(owner[r])}, which "
                                f"has {int(n_caps[r])} captions: the pair file does not fit this dataset")
            keep = np.zeros(width, dtype=bool)
            keep[pos] = True
            use[r] &= keep
    c = np.where(use, caps, 0)
    diff = sim[owner[:, None], c] - sim[other[:, None], c]  # [2P, R]
    score = np.where(use, (diff > 0) + 0.5 * (diff == 0), 0.0)
    correct = score.sum(axis=1).reshape(2, n_pairs).sum(axis=0)  # [P]
    trials = use.sum(axis=1).reshape(2, n_pairs).sum(axis=0)  # [P]
    groups: dict[str, list[int]] = {"pairs": list(range(n_pairs))}
    for k, p in enumerate(pairs):
        name = f"pairs_{_metric_name(str(p[2]))}"
        groups.setdefault(name, []).append(k)
        attribute = p[3] if len(p) > 3 else None
        if attribute:
            groups.setdefault(f"{name}_{_metric_name(str(attribute))}", []).append(k)
    out: dict[str, float] = {}
    for name in sorted(groups):
        idx = np.asarray(groups[name])
        n = trials[idx].sum()
        if n:
            out[f"{name}_acc"] = float(correct[idx].sum() / n)
        out[f"{name}_n"] = float(len(idx))
    return out


def per_query_hits(sim, text_to_audio, k: int = 1) -> dict[str, np.ndarray]:
    """Per-query outcomes behind R@k: ``t2a`` [n_text] (1 when a caption's clip ranks within k) and ``a2t``
    [n_audio with captions] (1 when a clip's best caption ranks within k), float64 0/1. What a paired comparison of
    two models on the same queries resamples."""
    sim, t2a = _checked(sim, text_to_audio)
    n_audio = sim.shape[0]
    r = t2a_ranks(sim, t2a)
    pos = a2t_positions(sim, t2a)
    best = np.full(n_audio, np.iinfo(np.int64).max)
    np.minimum.at(best, t2a, pos)
    has = np.bincount(t2a, minlength=n_audio) > 0
    return {"t2a": (r <= k).astype(np.float64), "a2t": (best[has] <= k).astype(np.float64)}


def paired_bootstrap(a, b, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean difference ``mean(b - a)`` of paired per-query outcomes (two models on the same queries) and its
    percentile bootstrap interval: ``{"diff", "lo", "hi", "n"}``, in the units of the inputs (x100 for percent)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap: expected two equal 1-d arrays, got {a.shape} and {b.shape}")
    d = b - a
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_resamples, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": float(len(d))}


def caption_word_f1(generated: str, references: Sequence[str]) -> float:
    """Best unigram F1 of ``generated`` against any of ``references`` (words lower-cased, counted as multisets);
    0 for an empty caption or no reference."""
    from collections import Counter

    from hci_atr.data.text import words_of

    gen = Counter(w.lower() for w in words_of(generated or ""))
    best = 0.0
    for ref in references:
        r = Counter(w.lower() for w in words_of(ref or ""))
        common = sum((gen & r).values())
        if common:
            p, q = common / sum(gen.values()), common / sum(r.values())
            best = max(best, 2 * p * q / (p + q))
    return best


def caption_quality(rows: Sequence[tuple[str, str, Sequence[str], float | None]]) -> dict[str, dict]:
    """``rows``: (split, generated caption, the clip's own captions, captioner confidence or None/NaN) -> per split
    ``{"n", "word_f1"}`` (mean of :func:`caption_word_f1`) and, when every caption there has a confidence,
    ``"by_confidence"``: the split's captions cut into quartiles of confidence, each ``{"min", "max", "n",
    "word_f1"}`` (lowest quartile first)."""
    by_split: dict[str, list[tuple[float, float | None]]] = {}
    for split, gen, refs, conf in rows:
        if gen and refs:
            by_split.setdefault(str(split), []).append((caption_word_f1(gen, refs), conf))
    out: dict[str, dict] = {}
    for split, vals in sorted(by_split.items()):
        f1 = np.array([v[0] for v in vals], dtype=np.float64)
        entry: dict = {"n": len(vals), "word_f1": round(float(f1.mean()), 4)}
        conf = np.array([np.nan if v[1] is None else v[1] for v in vals], dtype=np.float64)
        if len(vals) >= 4 and np.isfinite(conf).all():
            order = np.argsort(conf, kind="stable")
            entry["by_confidence"] = [
                {"min": round(float(conf[q].min()), 4), "max": round(float(conf[q].max()), 4), "n": len(q),
                 "word_f1": round(float(f1[q].mean()), 4)} for q in np.array_split(order, 4)]
        out[split] = entry
    return out
