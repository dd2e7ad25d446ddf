"""Contrastive loss for every HCI level: symmetric InfoNCE with a learnable temperature per level.

For a score matrix ``s [B_a, B_t]`` and a positives mask ``pos [B_a, B_t]`` (audio i and text j describe the same
clip), every positive pair (i, j) contributes

    t2a: -log( exp(s_ij/tau) / (exp(s_ij/tau) + sum_{i': not pos[i', j]} exp(s_i'j/tau)) )
    a2t: -log( exp(s_ij/tau) / (exp(s_ij/tau) + sum_{j': not pos[i, j']} exp(s_ij'/tau)) )

so other positives (several captions of one clip, or a real and a generated caption of one clip) are never negatives.
The loss is the pair-weighted mean over positive pairs of the mean of the two directions; weights let the AC
augmentation pairs count less (``model.ac_augment_weight``). A text with weight 0 is ignored entirely (neither a
positive nor a negative): batches use such placeholder texts to keep shapes equal across workers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MIN_TAU, MAX_TAU = 0.01, 1.0


def positives_mask(audio_keys: torch.Tensor, text_keys: torch.Tensor) -> torch.Tensor:
    """audio_keys [B_a], text_keys [B_t] (clip identity per row) -> bool [B_a, B_t]."""
    return audio_keys[:, None] == text_keys[None, :]


def info_nce(scores: torch.Tensor, pos: torch.Tensor, tau: torch.Tensor | float,
             pair_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE. scores/pos [B_a, B_t]; pair_weight [B_t] (per text) or None -> scalar."""
    logits = scores / tau
    neg_inf = torch.finfo(logits.dtype).min
    col_ok = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device) if pair_weight is None \
        else pair_weight > 0
    neg_only = logits.masked_fill(pos | ~col_ok[None, :], neg_inf)
    lse_col = torch.logsumexp(neg_only, dim=0, keepdim=True)  # [1, B_t]: negatives of each text (over audio)
    lse_row = torch.logsumexp(neg_only, dim=1, keepdim=True)  # [B_a, 1]: negatives of each audio (over text)
    t2a = torch.logaddexp(logits, lse_col) - logits
    a2t = torch.logaddexp(logits, lse_row) - logits
    per_pair = 0.5 * (t2a + a2t)
    w = pos.to(logits.dtype)
    if pair_weight is not None:
        w = w * pair_weight[None, :].to(logits.dtype)
    return (per_pair * w).sum() / w.sum().clamp(min=1e-8)


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


def hierarchical_loss(levels: dict[str, torch.Tensor], pos: torch.Tensor, temps: LevelTemperatures,
                      weights: dict[str, float | torch.Tensor], pair_weight: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
    """InfoNCE per level score matrix; ``total`` = weighted sum (weights normalised to sum 1 over present levels)."""
    out: dict[str, torch.Tensor] = {}
    total = None
    wsum = sum(float(weights[k]) for k in levels)
    for name, s in levels.items():
        loss = info_nce(s, pos, temps.tau(name), pair_weight)
        out[name] = loss
        term = weights[name] * loss / max(wsum, 1e-8)
        total = term if total is None else total + term
    out["total"] = total
    return out
