"""Auxiliary captions (AC): the generated caption of a clip, used two ways inside the model.

1. Fusion (:class:`CaptionFusion`): audio frames attend to the generated caption's word embeddings
   (``nn.MultiheadAttention``); the result is added back through a learnable gate that starts at 0, so a new model
   behaves exactly like one without fusion. Clips without a generated caption pass through unchanged.
2. Complementary branch (:func:`branch_similarity`): the query sentence is compared with the generated caption's
   sentence embedding; clips without a caption contribute 0.

The third use (extra (audio, generated caption) training pairs) is a training-time matter: see
``hci_atr.training.make_batch`` and the pair weights in ``hci_atr.losses``.
"""

from __future__ import annotations

import torch
from torch import nn


class CaptionFusion(nn.Module):
    """frames [B, T, D] + caption words [B, L, D] -> enhanced frames [B, T, D].

    out = frames + gate * has_caption * LayerNorm-free cross-attention(frames -> caption words).
    """

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(()))  # 0 -> identity at initialisation

    def forward(self, frames: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                has_caption: torch.Tensor) -> torch.Tensor:
        """frames [B, T, D]; words [B, L, D]; word_mask [B, L]; has_caption [B] bool -> [B, T, D]."""
        has = has_caption.to(torch.bool) & word_mask.any(dim=1)
        # rows without caption words would make every key padded (NaN softmax): give them one dummy key, then
        # discard their output through ``has``
        key_pad = ~word_mask.to(torch.bool)
        key_pad[~has] = False
        attended, _ = self.attn(frames, words, words, key_padding_mask=key_pad, need_weights=False)
        return frames + self.gate * has[:, None, None].to(frames.dtype) * attended


def branch_similarity(query_sentence: torch.Tensor, caption_sentence: torch.Tensor,
                      has_caption: torch.Tensor) -> torch.Tensor:
    """query [B_t, D], generated caption [B_a, D] (normalised), has_caption [B_a] -> cosine [B_a, B_t], 0 if missing."""
    return (caption_sentence @ query_sentence.T) * has_caption.to(caption_sentence.dtype)[:, None]
