"""How scores are weighed: learnt weights of the units inside a level, temperature-calibrated weights across levels.

- :class:`UnitWeights` (``model.unit_weights``): a linear head on each unit embedding (word, phrase, frame, segment)
  gives a logit; a softmax over the row's valid units gives weights that replace the plain masked mean of the set
  similarity (:func:`hci_atr.models.order.unit_set_similarity`), so stop words and silent frames can count less.
  The head starts at zero: uniform weights, i.e. exactly the plain mean, until training moves it.
- :func:`calibrated_fuse` (``model.fusion = "calibrated"``): ``fused = sum_l w_l * s_l / tau_l`` with the
  temperatures ``tau_l`` each level's loss learnt (:class:`hci_atr.losses.LevelTemperatures`). The levels' cosines
  have different spreads; their losses compare ``s_l / tau_l``, so that is the scale on which they are comparable.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits, mask [B, N] -> weights [B, N]: softmax over the valid entries, 0 elsewhere (all 0 for an empty row)."""
    mask = mask.to(torch.bool)
    w = torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1)
    return w * mask.to(w.dtype)


class UnitWeights(nn.Module):
    """units [B, N, D], mask [B, N] -> weights [B, N], summing to 1 over each row's valid units."""

    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, units: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_softmax(self.head(units).squeeze(-1), mask)


def calibrated_fuse(levels: dict[str, torch.Tensor], weights: dict[str, torch.Tensor | float],
                    taus: dict[str, torch.Tensor | float]) -> torch.Tensor:
    """``sum_l weights[l] * levels[l] / taus[l]`` over the levels present ([B_a, B_t] each)."""
    out = None
    for name, s in levels.items():
        term = weights[name] * s / taus[name]
        out = term if out is None else out + term
    if out is None:
        raise ValueError("no level enabled: set at least one of model.use_clip/use_segment/use_frame")
    return out
