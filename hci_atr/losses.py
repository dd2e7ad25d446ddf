"""Contrastive loss for every HCI level: symmetric InfoNCE with a learnable temperature per level.

For a score matrix ``s [B_a, B_t]`` and a positives mask ``pos [B_a, B_t]`` (audio i and text j describe the same
clip), every positive pair (i, j) contributes

    t2a: -log( exp(s_ij/tau) / (exp(s_ij/tau) + sum_{i': not pos[i', j]} exp(s_i'j/tau)) )
    a2t: -log( exp(s_ij/tau) / (exp(s_ij/tau) + sum_{j': not pos[i, j']} exp(s_ij'/tau)) )

so other positives (several captions of one clip, or a real and a generated caption of one clip) are never negatives.
The loss is the pair-weighted mean over positive pairs of the mean of the two directions; weights let the AC
augmentation pairs count less (``model.ac_augment_weight``). A text with weight 0 is ignored entirely (neither a
positive nor a negative): batches use such placeholder texts to keep shapes equal across workers.

Across workers (``gather`` given, see :func:`hierarchical_loss`) each worker scores only its OWN audio rows against
the texts of the whole global batch ``[b, B_t]``: the a2t side of a local row is complete, and the t2a side needs
each text's negatives over every worker's audio, i.e. a log-sum-exp over columns, which is the log-sum-exp of the
workers' partial column log-sum-exps (one small all-gather). The workers' row losses add up to the global loss;
nobody computes the global ``B_a x B_t`` matrix, so the scoring work is split, not repeated.

Hard negatives (:func:`hard_negative_loss`): captions built from a clip's own caption with the order of its events
swapped or an attribute flipped (:mod:`hci_atr.data.negatives`). Each clip's positive competes only with its own
caption's hard negatives; they are never positives and never negatives of another clip (another clip may be exactly
what the swapped caption says). Training adds ``w * L_hard`` to the contrastive loss (T-CLAP style).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

MIN_TAU, MAX_TAU = 0.01, 1.0


def positives_mask(audio_keys: torch.Tensor, text_keys: torch.Tensor, audio_text_ids: torch.Tensor | None = None,
                   text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """audio_keys [B_a], text_keys [B_t] (clip identity per row) -> bool [B_a, B_t].

    With ``audio_text_ids`` [B_a, K] (identities of the texts each clip owns, NaN padding) and ``text_ids`` [B_t]
    (each text's identity), a text is also a positive of every clip that owns an identical text: a caption that two
    clips share (or a generated caption that is another clip's real one) is never a negative of either."""
    pos = audio_keys[:, None] == text_keys[None, :]
    if audio_text_ids is not None and text_ids is not None and audio_text_ids.numel():
        pos = pos | (audio_text_ids[:, :, None] == text_ids[None, None, :]).any(dim=1)
    return pos


def _negatives(scores: torch.Tensor, pos: torch.Tensor, tau: torch.Tensor | float,
               pair_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> logits [B_a, B_t], negatives-only logits (positives and weight-0 texts at -max), pair weights [B_a, B_t]."""
    logits = scores / tau
    col_ok = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device) if pair_weight is None \
        else pair_weight > 0
    neg_only = logits.masked_fill(pos | ~col_ok[None, :], torch.finfo(logits.dtype).min)
    w = pos.to(logits.dtype)
    if pair_weight is not None:
        w = w * pair_weight[None, :].to(logits.dtype)
    return logits, neg_only, w


def _pair_terms(logits: torch.Tensor, neg_only: torch.Tensor, lse_col: torch.Tensor) -> torch.Tensor:
    """Per-pair loss [B_a, B_t] = mean of t2a (negatives over audio: ``lse_col`` [1, B_t]) and a2t (over text)."""
    lse_row = torch.logsumexp(neg_only, dim=1, keepdim=True)  # [B_a, 1]: negatives of each audio (over text)
    t2a = torch.logaddexp(logits, lse_col) - logits
    a2t = torch.logaddexp(logits, lse_row) - logits
    return 0.5 * (t2a + a2t)


def info_nce(scores: torch.Tensor, pos: torch.Tensor, tau: torch.Tensor | float,
             pair_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE. scores/pos [B_a, B_t]; pair_weight [B_t] (per text) or None -> scalar."""
    logits, neg_only, w = _negatives(scores, pos, tau, pair_weight)
    lse_col = torch.logsumexp(neg_only, dim=0, keepdim=True)  # [1, B_t]: negatives of each text (over audio)
    return (_pair_terms(logits, neg_only, lse_col) * w).sum() / w.sum().clamp(min=1e-8)


class LevelTemperatures(nn.Module):
    """One learnable temperature per level, stored as log(tau) and clamped to [MIN_TAU, MAX_TAU] when read."""

    def __init__(self, levels: tuple[str, ...], init: float = 0.07):
        super().__init__()
        self.levels = tuple(levels)
        self.log_tau = nn.Parameter(torch.full((len(levels),), math.log(init)))

    def tau(self, level: str) -> torch.Tensor:
        return self.log_tau[self.levels.index(level)].exp().clamp(MIN_TAU, MAX_TAU)

    def as_dict(self) -> dict[str, float]:
        return {lv: float(self.tau(lv).detach()) for lv in self.levels}


def sharded_info_nce(levels: dict[str, torch.Tensor], pos: torch.Tensor, taus: dict[str, torch.Tensor | float],
                     pair_weight: torch.Tensor | dict[str, torch.Tensor],
                     gather: Callable[[torch.Tensor], torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """This worker's share of the global InfoNCE of every level, scaled by the number of workers ``N``.

    levels[name] / pos: ``[b, B_t]`` = this worker's ``b`` audio rows x the ``B_t`` texts of the global batch;
    pair_weight ``[B_t]`` (global; or per level, see :func:`hierarchical_loss`); ``gather(x [1, k]) -> [N, k]``:
    every worker's ``x`` in rank order, with gradient
    (``torch.distributed.nn.functional.all_gather``). One gather carries the partial column log-sum-exps of all
    levels and the worker's positive-pair weight per level.

    Returns ``N * L_r`` per level, where the workers' ``L_r`` sum to the global loss: the mean over workers of the
    returned values IS the global loss, and backpropagating it on every worker under DDP's gradient averaging gives
    the gradient of the global loss (all_gather's backward sums each worker's slice over all workers).
    """
    names = list(levels)
    parts = {n: _negatives(levels[n], pos, taus[n], _level_weight(pair_weight, n)) for n in names}
    local = torch.cat([torch.logsumexp(parts[n][1], dim=0) for n in names]
                      + [torch.stack([parts[n][2].sum() for n in names])])
    every = gather(local[None, :])  # [N, len(names) * (B_t + 1)]
    n_workers, b_t, k_levels = every.shape[0], pos.shape[1], len(names)
    col = torch.logsumexp(every[:, :-k_levels], dim=0).reshape(k_levels, 1, b_t)  # negatives of each text, all audio
    wsum = every[:, -k_levels:].sum(dim=0).clamp(min=1e-8)  # [levels]: positive-pair weight, all workers
    return {n: n_workers * (_pair_terms(parts[n][0], parts[n][1], col[k]) * parts[n][2]).sum() / wsum[k]
            for k, n in enumerate(names)}


def _level_weight(pair_weight: torch.Tensor | dict[str, torch.Tensor] | None, level: str) -> torch.Tensor | None:
    """The per-text pair weights of ``level``: one tensor for every level, or a dict with ``"*"`` (the default)
    and per-level overrides."""
    if isinstance(pair_weight, dict):
        return pair_weight.get(level, pair_weight.get("*"))
    return pair_weight


def _level_taus(names, temps: LevelTemperatures, taus: dict[str, torch.Tensor | float] | None
                ) -> dict[str, torch.Tensor | float]:
    return {n: taus[n] if taus is not None and n in taus else temps.tau(n) for n in names}


def hierarchical_loss(levels: dict[str, torch.Tensor], pos: torch.Tensor, temps: LevelTemperatures,
                      weights: dict[str, float | torch.Tensor],
                      pair_weight: torch.Tensor | dict[str, torch.Tensor] | None = None,
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      taus: dict[str, torch.Tensor | float] | None = None) -> dict[str, torch.Tensor]:
    """InfoNCE per level score matrix; ``total`` = weighted sum (weights normalised to sum 1 over present levels).

    With ``gather`` the score matrices are this worker's rows against the global texts and each value is the
    worker's share of the global loss scaled by the number of workers (:func:`sharded_info_nce`). ``taus``
    replaces the learnt temperature of the levels it names (a calibrated fused score is already divided by the
    levels' temperatures: it takes 1). ``pair_weight``: [B_t] for every level, or ``{"*": [B_t], level: [B_t]}``
    where a level weighs its texts otherwise (the AC branch gives generated captions weight 0: compared with the
    clip's own generated caption they would be a trivial cosine-1 match).
    """
    out: dict[str, torch.Tensor] = {}
    total = None
    wsum = sum(float(weights[k]) for k in levels)
    level_tau = _level_taus(levels, temps, taus)
    if gather is not None:
        if pair_weight is None:
            pair_weight = torch.ones(pos.shape[1], device=pos.device)
        per_level = sharded_info_nce(levels, pos, level_tau, pair_weight, gather)
    for name, s in levels.items():
        loss = per_level[name] if gather is not None else \
            info_nce(s, pos, level_tau[name], _level_weight(pair_weight, name))
        out[name] = loss
        term = weights[name] * loss / max(wsum, 1e-8)
        total = term if total is None else total + term
    out["total"] = total
    return out


# ---------------------------------------------------------------------------------------------------------------
# hard negatives
# ---------------------------------------------------------------------------------------------------------------


def group_hard_negatives(source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """source [K] (the text each hard negative was built from) -> (texts [G] with at least one, index [G, M] of
    their negatives into the K, mask [G, M]); groups in order of first appearance, negatives in given order."""
    src = source.tolist()
    groups: dict[int, list[int]] = {}
    for k, j in enumerate(src):
        groups.setdefault(int(j), []).append(k)
    m = max((len(v) for v in groups.values()), default=0)
    index = torch.zeros(len(groups), max(m, 1), dtype=torch.long)
    mask = torch.zeros(len(groups), max(m, 1), dtype=torch.bool)
    for g, ks in enumerate(groups.values()):
        index[g, :len(ks)] = torch.tensor(ks)
        mask[g, :len(ks)] = True
    dev = source.device
    return torch.tensor(list(groups), dtype=torch.long, device=dev), index.to(dev), mask.to(dev)


def hard_negative_nce(pos: torch.Tensor, neg: torch.Tensor, neg_mask: torch.Tensor,
                      tau: torch.Tensor | float) -> torch.Tensor:
    """InfoNCE of each positive pair against its own hard negatives only.

    pos [G]: score of (clip, its caption); neg [G, M]: scores of (the same clip, hard negatives of that caption),
    neg_mask [G, M] -> mean over groups with a negative of ``-log(e^(pos/tau) / (e^(pos/tau) + sum e^(neg/tau)))``.
    The negatives only ever appear in the denominator: they are never anybody's positive. 0 when there is none.
    """
    lp = pos / tau
    ln = (neg / tau).masked_fill(~neg_mask, torch.finfo(lp.dtype).min)
    per = torch.logaddexp(lp, torch.logsumexp(ln, dim=1)) - lp  # [G]
    valid = neg_mask.any(1).to(per.dtype)
    return (per * valid).sum() / valid.sum().clamp(min=1.0)


def hard_negative_loss(pos: dict[str, torch.Tensor], neg: dict[str, torch.Tensor], neg_mask: torch.Tensor,
                       temps: LevelTemperatures, weights: dict[str, float | torch.Tensor],
                       taus: dict[str, torch.Tensor | float] | None = None) -> dict[str, torch.Tensor]:
    """:func:`hard_negative_nce` per level (pos[level] [G], neg[level] [G, M], each at the level's temperature or
    ``taus``); ``total`` = weighted sum, weights normalised over the levels present as in :func:`hierarchical_loss`.

    In training the term is added to the contrastive loss as ``L = L_contrastive + w * total`` (T-CLAP style). It is
    a mean over this worker's hard-negative groups (no collective): across workers the mean of the workers' values
    is the global mean when every worker holds as many groups.
    """
    level_tau = _level_taus(pos, temps, taus)
    wsum = sum(float(weights[k]) for k in pos)
    out: dict[str, torch.Tensor] = {}
    total = None
    for name in pos:
        loss = hard_negative_nce(pos[name], neg[name], neg_mask, level_tau[name])
        out[name] = loss
        term = weights[name] * loss / max(wsum, 1e-8)
        total = term if total is None else total + term
    out["total"] = total
    return out
