"""Hierarchical cross-modal interaction (HCI): similarity at three levels.

- clip <-> sentence: cosine of the pooled vectors, [B_a, D] x [B_t, D] -> [B_a, B_t].
- segment <-> phrase and frame <-> word: a set-to-set similarity. For every (audio, text) pair we form the cosine
  matrix between the audio's units (segments or frames) and the text's units (phrases or words); each text unit takes
  its best audio unit and each audio unit its best text unit (max over the valid ones); the masked means of the two are
  averaged. Padded units never enter a max or a mean, so extra padding changes nothing.

All functions expect L2-normalised embeddings and are vectorised with einsum; :func:`set_similarity` walks over blocks
of audio and text so memory stays bounded (``max_elems`` cosine entries per block) for big evaluation matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = ("clip", "segment", "frame")

_NEG = -1e4  # below any cosine; used where a max must ignore padded units


def segment_pool(frames: torch.Tensor, mask: torch.Tensor, size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool windows of frames into segments.

    frames [B, T, D], mask [B, T] -> segments [B, S, D] (masked mean of each window), mask [B, S].
    Windows start every ``stride`` frames; enough windows are made to cover T (the last may be partial). A window is
    valid when it starts inside the clip's valid frames and the previous window did not already reach the clip's
    end, so the valid segments of a clip do not depend on how much padding follows it.
    """
    b, t, d = frames.shape
    size = max(1, min(size, t))
    stride = max(1, stride)
    n_seg = -(-max(t - size, 0) // stride) + 1
    total = (n_seg - 1) * stride + size
    m = mask.to(frames.dtype)
    x = F.pad(frames * m[..., None], (0, 0, 0, total - t))
    m = F.pad(m, (0, total - t))
    xw = x.unfold(1, size, stride)  # [B, S, D, size]
    mw = m.unfold(1, size, stride)  # [B, S, size]
    seg = xw.sum(-1) / mw.sum(-1, keepdim=True).clamp(min=1.0)
    n_valid = mask.sum(1, keepdim=True)  # [B, 1]
    starts = torch.arange(n_seg, device=frames.device)[None] * stride
    prev_end = starts - stride + size
    valid = (starts < n_valid) & ((starts == 0) | (prev_end < n_valid))
    return seg * valid[..., None].to(seg.dtype), valid


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def _set_sim_block(a: torch.Tensor, am: torch.Tensor, t: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
    """a [A, S, D], am [A, S], t [T, P, D], tm [T, P] -> [A, T]."""
    sim = torch.einsum("asd,tpd->atsp", a, t)  # [A, T, S, P]
    pair = am[:, None, :, None] & tm[None, :, None, :]
    sim = sim.masked_fill(~pair, _NEG)
    text_best = sim.amax(dim=2)  # [A, T, P]: each text unit's best audio unit
    audio_best = sim.amax(dim=3)  # [A, T, S]: each audio unit's best text unit
    t2a = masked_mean(text_best, tm[None].expand_as(text_best), dim=2)
    a2t = masked_mean(audio_best, am[:, None].expand_as(audio_best), dim=2)
    # a side with no valid unit leaves only the sentinel in the other side's maxima: such a pair scores exactly 0
    both = am.any(1)[:, None] & tm.any(1)[None, :]  # [A, T]
    return torch.where(both, 0.5 * (t2a + a2t), torch.zeros_like(t2a))


def set_similarity(a: torch.Tensor, a_mask: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor,
                   max_elems: int = 1 << 24) -> torch.Tensor:
    """Set-to-set similarity for every audio/text pair.

    a [B_a, S, D] with a_mask [B_a, S]; t [B_t, P, D] with t_mask [B_t, P] -> [B_a, B_t].
    A pair where either side has no valid unit scores exactly 0 (the level then adds nothing to the fused score).
    """
    a_mask = a_mask.to(torch.bool)
    t_mask = t_mask.to(torch.bool)
    # drop unit slots that are padding in every row (fixed-width padding, e.g. 32 word slots): they cannot matter
    s_used = int(a_mask.any(0).nonzero().max()) + 1 if a_mask.any() else 1
    p_used = int(t_mask.any(0).nonzero().max()) + 1 if t_mask.any() else 1
    a, a_mask, t, t_mask = a[:, :s_used], a_mask[:, :s_used], t[:, :p_used], t_mask[:, :p_used]
    ba, s, _ = a.shape
    bt, p, _ = t.shape
    per_pair = max(1, s * p)
    if ba * bt * per_pair <= max_elems:
        return _set_sim_block(a, a_mask, t, t_mask)
    bt_blk = max(1, min(bt, max_elems // per_pair))
    ba_blk = max(1, max_elems // (per_pair * bt_blk))
    out = a.new_empty(ba, bt)
    for i in range(0, ba, ba_blk):
        for j in range(0, bt, bt_blk):
            out[i:i + ba_blk, j:j + bt_blk] = _set_sim_block(a[i:i + ba_blk], a_mask[i:i + ba_blk],
                                                             t[j:j + bt_blk], t_mask[j:j + bt_blk])
    return out


def clip_similarity(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """a [B_a, D], t [B_t, D] (normalised) -> cosine [B_a, B_t]."""
    return a @ t.T


def fuse(levels: dict[str, torch.Tensor], weights: dict[str, torch.Tensor | float]) -> torch.Tensor:
    """Weighted sum of the level scores present in ``levels`` ([B_a, B_t] each)."""
    out = None
    for name, s in levels.items():
        term = weights[name] * s
        out = term if out is None else out + term
    if out is None:
        raise ValueError("no level enabled: set at least one of model.use_clip/use_segment/use_frame")
    return out
