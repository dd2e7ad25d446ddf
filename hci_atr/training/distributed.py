"""The data-parallel pieces of the fit loop, on plain ``torch.distributed`` (whoever started the process group):
the all-gather behind the global-batch contrastive loss, and the reductions that give every rank the same metrics
and the same best-epoch / early-stopping decision.

The sharded loss itself is ``hci_atr.losses.sharded_info_nce``: with ``gather = GatherWithGrad()`` each worker scores
its own clips against the texts of the global batch; its loss is its share of the global loss times the number of
workers, all_gather's backward sums the gradients over workers and DDP averages them, so the parameters get the
gradient of the global-batch loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class GatherWithGrad:
    """``gather(x [B, ...]) -> [world * B, ...]``: every worker's rows, in rank order, gradients kept.

    Built on ``torch.distributed.nn.functional.all_gather``, whose backward sends each worker the gradient of its own
    rows from every worker's loss, so contrastive losses see the negatives of the global batch. ``rows_seen`` records
    the largest gathered batch (what a worker reports as its number of contrastive candidates).
    """

    def __init__(self):
        self.world = dist.get_world_size()
        self.rows_seen = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_gather

        if not torch.is_floating_point(x):  # ids / keys: no gradient, plain collective
            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x.contiguous())
        else:
            parts = all_gather(x.contiguous())
        out = torch.cat(list(parts), dim=0)
        self.rows_seen = max(self.rows_seen, int(out.shape[0]))
        return out


def world_size() -> int:
    """Ranks in the process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_workers(metrics: dict[str, float]) -> dict[str, float]:
    """The mean of each metric over all ranks, identical on every rank (every rank must pass the same keys)."""
    world = world_size()
    if world == 1:
        return dict(metrics)
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def broadcast_value(value: float, src: int = 0) -> float:
    """Rank ``src``'s ``value`` on every rank (e.g. the validation R-sum only rank 0 computes)."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.broadcast(t, src=src)
    return float(t.item())
