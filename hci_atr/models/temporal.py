"""Temporal context: frame positions and a small sequence model over the audio frames, before any pooling.

Every pooling after the audio encoder ignores order (clip mean + max, segment window means, the max-based set
similarities) and cnn-small hears about 0.4 s around a frame, so without this no level can tell "a beep, then a knock"
from "a knock, then a beep". :class:`TemporalContext` lets every frame see the clip around it, in order:

    frames [B, T, D], mask [B, T]  ->  frames + W(seq(LayerNorm(frames) + positions))   (padded frames stay 0)

- ``gru``: a bidirectional GRU (D/2 per direction) over the valid frames only (packed by length);
- ``transformer``: ``layers`` pre-norm transformer encoder layers, padded frames masked out as keys.

Positions are the frame's index in the clip: ``sinusoidal`` (fixed), ``learned`` (a table of :data:`MAX_POSITIONS`;
later frames share the last entry) or ``none``. Valid outputs depend on valid frames only, so appending padded frames
changes nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

KINDS = ("none", "gru", "transformer")
MAX_POSITIONS = 1024  # learned position table size (frames after the encoder: 80 ms each for cnn-small)


def sinusoidal_positions(n: int, dim: int, device=None) -> torch.Tensor:
    """[n, dim] sine/cosine position codes (Vaswani et al.): even channels sin, odd channels cos."""
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    out = torch.zeros(n, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return out


def _heads(dim: int) -> int:
    return next(h for h in (4, 2, 1) if dim % h == 0)


class TemporalContext(nn.Module):
    """Residual sequence model over frames. ``kind``: "gru" | "transformer"; ``positions``: "sinusoidal" |
    "learned" | "none"; ``layers``: GRU / transformer layers."""

    def __init__(self, dim: int, kind: str = "gru", positions: str = "sinusoidal", layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        if kind not in ("gru", "transformer"):
            raise ValueError(f"temporal context: unknown kind {kind!r} (use gru or transformer)")
        if positions not in ("sinusoidal", "learned", "none"):
            raise ValueError(f"temporal context: unknown positions {positions!r} (use sinusoidal, learned or none)")
        self.kind, self.positions, self.dim = kind, positions, dim
        self.norm = nn.LayerNorm(dim)
        self.pos_table = nn.Embedding(MAX_POSITIONS, dim) if positions == "learned" else None
        if self.pos_table is not None:
            nn.init.normal_(self.pos_table.weight, std=0.02)
        if kind == "gru":
            hidden = max(1, dim // 2)
            self.seq = nn.GRU(dim, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                              dropout=dropout if layers > 1 else 0.0)
            self.out = nn.Linear(2 * hidden, dim)
        else:
            layer = nn.TransformerEncoderLayer(dim, _heads(dim), 2 * dim, dropout=dropout, batch_first=True,
                                               norm_first=True)
            self.seq = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.out = nn.Linear(dim, dim)

    def position_codes(self, n: int, device) -> torch.Tensor | None:
        """[n, D] codes for frame indices 0..n-1, or None without positions."""
        if self.positions == "sinusoidal":
            return sinusoidal_positions(n, self.dim, device)
        if self.positions == "learned":
            idx = torch.arange(n, device=device).clamp(max=MAX_POSITIONS - 1)
            return self.pos_table(idx)
        return None

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """frames [B, T, D], mask [B, T] (True = valid) -> [B, T, D], padded frames 0."""
        mask = mask.to(torch.bool)
        b, t, _ = frames.shape
        x = self.norm(frames)
        pos = self.position_codes(t, frames.device)
        if pos is not None:
            x = x + pos[None].to(x.dtype)
        x = x * mask[..., None].to(x.dtype)
        y = self._gru(x, mask) if self.kind == "gru" else self._transformer(x, mask)
        return (frames + self.out(y)) * mask[..., None].to(frames.dtype)

    def _gru(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # valid frames moved to the front (stable: their order is kept), run packed, moved back
        order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)  # [B, T]
        idx = order[..., None].expand_as(x)
        packed_in = x.gather(1, idx)
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(packed_in, lengths, batch_first=True, enforce_sorted=False)
        y, _ = self.seq(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        out = torch.zeros_like(y)
        return out.scatter(1, order[..., None].expand_as(y), y)

    def _transformer(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # a clip with no valid frame would leave its attention rows without any key: let it see everything (its
        # outputs are zeroed anyway)
        pad = ~mask & mask.any(1, keepdim=True)
        return self.seq(x, src_key_padding_mask=pad)
