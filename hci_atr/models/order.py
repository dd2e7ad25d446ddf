"""Order-aware (and unit-weighted) set similarity for the segment <-> phrase level.

:func:`hci_atr.models.hci.set_similarity` is order-blind: every phrase takes its best segment wherever it is, so
"a beep, then a knock" and "a knock, then a beep" score the same. :func:`unit_set_similarity` is the same score with
two additions, each optional:

- **order** (:class:`SegmentOrder`, ``model.segment_order``):
  - ``position_bias``: before the maxima, ``sim[s, p] -= strength * |r_s - r_p|``, where ``r_s = (s + 1/2) / S_valid``
    is a segment's place in the clip and ``r_p = (p + 1/2) / P_valid`` a phrase's place in the caption;
  - ``event_bias``: the same bias, with ``r_p`` the place *in time* of the event the phrase describes, as the
    caption's sequence markers order them (:func:`hci_atr.data.negatives.event_places`: "a knock after a beep" puts
    the beep first), and no bias at all on a phrase whose caption states no order (one event, or markers that
    disagree) or that frames the sequence ("over a hum,"). ``position_bias`` biases a one-event caption's phrases
    toward their places in the caption, wherever the event is, and reads "X after Y" backwards; this does neither;
  - ``soft_dtw``: the text -> audio half becomes a monotonic soft alignment: phrases in caption order take segments
    in clip order, ``D[p, s] = w_p sim[s, p] + g_p * logcumsumexp_s(D[p-1] / g_p)``, ``g_p = gamma * w_p``, scored at
    the last phrase's best segment (a soft-DTW over paths that may skip segments; gamma learnt);
  - the way out for concurrency: a *concurrent* phrase (:func:`concurrent_phrases`: it holds "while", "over",
    "throughout", "during", "as", "with", ... or follows such a phrase before the next sequence word) has no order
    term (no bias; in soft_dtw it takes its best segment without moving the alignment), and for a caption with any
    concurrent phrase the order term of the other phrases is scaled by ``1 - sigmoid(way_out)`` (learnt);
- **unit weights** (``model.unit_weights``): each side's maxima are averaged with per-unit weights
  (:class:`hci_atr.models.weighting.UnitWeights`, summing to 1 over valid units) instead of a plain masked mean.

Padded units never enter a maximum, a mean or an alignment, so extra padding changes nothing; a pair where either side
has no valid unit scores 0. Blocks of at most ``max_elems`` unit pairs keep memory bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hci_atr.data.negatives import CONCURRENCY_WORDS, SEQUENCE_WORDS, clause_breaks, event_places

ORDER_MODES = ("none", "position_bias", "event_bias", "soft_dtw")
_NEG = -1e4  # below any score; where a maximum must ignore padded units


# ---------------------------------------------------------------------------------------------------------------
# concurrency of phrases, from the token ids
# ---------------------------------------------------------------------------------------------------------------


def word_piece_sequences(tokenizer, words) -> list[tuple[int, ...]]:
    """The piece ids each of ``words`` becomes inside a caption (first word and later word: BPE tokenizers differ)."""
    seqs: set[tuple[int, ...]] = set()
    for w in sorted(words):
        for ctx in ([w], ["a", w]):
            enc = tokenizer([ctx], is_split_into_words=True, add_special_tokens=False)
            ids, wid = enc["input_ids"][0], enc.word_ids(0)
            piece = tuple(i for i, k in zip(ids, wid) if k == len(ctx) - 1)
            if piece:
                seqs.add(piece)
    return sorted(seqs)


def words_matching(input_ids: torch.Tensor, word_ids: torch.Tensor, n_words: int,
                   seqs: list[tuple[int, ...]]) -> torch.Tensor:
    """input_ids, word_ids [B, N] (word index of each piece, -1 none) -> [B, L]: word l is exactly one of ``seqs``."""
    b, n = input_ids.shape
    onehot = word_ids[..., None] == torch.arange(n_words, device=word_ids.device)  # [B, N, L]
    count = onehot.sum(1)  # [B, L] pieces per word
    first = onehot.to(torch.float32).argmax(1)  # [B, L] position of each word's first piece
    out = torch.zeros(b, n_words, dtype=torch.bool, device=input_ids.device)
    for seq in seqs:
        ok = count == len(seq)
        for j, tok in enumerate(seq):
            ok = ok & (input_ids.gather(1, (first + j).clamp(max=n - 1)) == tok)
        out |= ok
    return out


def concurrent_phrases(phrase_matrix: torch.Tensor, phrase_mask: torch.Tensor, concurrency_word: torch.Tensor,
                       sequence_word: torch.Tensor, clause_start: torch.Tensor | None = None) -> torch.Tensor:
    """phrase_matrix [B, P, L], phrase_mask [B, P], concurrency_word / sequence_word / clause_start [B, L] (word
    follows clause punctuation) -> concurrent [B, P].

    A phrase is concurrent when one of its words is a concurrency word, or when it follows a concurrent phrase
    and no phrase starting with a sequence word or a new clause came in between ("while a car | passes | by": all
    three; "over a hum, | a beep | then a knock": the first only).
    """
    member = phrase_matrix > 0  # [B, P, L]
    has_conc = (member & concurrency_word[:, None, :]).any(-1)
    first = member.to(torch.float32).argmax(-1)  # [B, P] first word of each phrase
    stop = sequence_word if clause_start is None else sequence_word | clause_start
    starts_seq = stop.gather(1, first)
    out = torch.zeros_like(phrase_mask, dtype=torch.bool)
    run = torch.zeros(phrase_mask.shape[0], dtype=torch.bool, device=phrase_mask.device)
    for p in range(phrase_mask.shape[1]):
        run = (run & ~starts_seq[:, p]) | has_conc[:, p]
        out[:, p] = run & phrase_mask[:, p].to(torch.bool)
    return out


class ConcurrencyTagger:
    """Token ids -> concurrent phrases (:func:`concurrent_phrases`), with the word piece ids of one tokenizer."""

    def __init__(self, tokenizer):
        self.concurrency = word_piece_sequences(tokenizer, CONCURRENCY_WORDS)
        self.sequence = word_piece_sequences(tokenizer, SEQUENCE_WORDS)

    def __call__(self, batch) -> torch.Tensor:
        """TextBatch -> concurrent [B, P] bool."""
        n_words = batch.word_mask.shape[1]
        conc = words_matching(batch.input_ids, batch.word_ids, n_words, self.concurrency) & batch.word_mask.bool()
        seq = words_matching(batch.input_ids, batch.word_ids, n_words, self.sequence) & batch.word_mask.bool()
        return concurrent_phrases(batch.phrase_matrix, batch.phrase_mask, conc, seq,
                                  clause_starts(getattr(batch, "texts", None), batch.word_mask))


def phrase_places(texts: list[str], phrase_matrix: torch.Tensor, phrase_mask: torch.Tensor) -> torch.Tensor:
    """[B, P]: the place in time (in (0, 1)) of the event each phrase describes
    (:func:`hci_atr.data.negatives.event_places` of its words; a phrase takes the place of its placed words, which
    all lie in one event since a sequence marker starts a phrase), -1 where it has none. As in
    :func:`clause_starts`, word indices are the tokenizer's only for plain-ASCII captions: others get -1 throughout."""
    b, _, n_words = phrase_matrix.shape
    word = torch.full((b, n_words), -1.0)
    for i, text in enumerate(texts):
        if text.isascii():
            places = event_places(text)[:n_words]
            word[i, :len(places)] = torch.tensor([-1.0 if x is None else x for x in places])
    member = (phrase_matrix > 0).cpu()
    out = torch.where(member, word[:, None, :], torch.full_like(member, -1.0, dtype=torch.float32)).amax(-1)
    return torch.where(phrase_mask.bool().cpu(), out, torch.full_like(out, -1.0)).to(phrase_matrix.device)


def clause_starts(texts: list[str] | None, word_mask: torch.Tensor) -> torch.Tensor | None:
    """[B, L]: word l of caption b follows clause punctuation (``, ; : . ! ?``), from the caption strings. Word
    indices are the tokenizer's only for plain-ASCII captions (a non-ASCII word may be split further), so other
    captions get none; None without the strings."""
    if texts is None or len(texts) != word_mask.shape[0]:
        return None
    out = torch.zeros(word_mask.shape, dtype=torch.bool)
    for i, text in enumerate(texts):
        if text.isascii():
            for j in clause_breaks(text):
                if j < out.shape[1]:
                    out[i, j] = True
    return out.to(word_mask.device) & word_mask.bool()


# ---------------------------------------------------------------------------------------------------------------
# the order term
# ---------------------------------------------------------------------------------------------------------------


def relative_places(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, N] -> [B, N] place of each valid unit among the valid ones, (index + 1/2) / n_valid (0 if padded)."""
    m = mask.to(torch.float32)
    idx = m.cumsum(1) - 1.0
    return torch.where(mask.bool(), (idx + 0.5) / m.sum(1, keepdim=True).clamp(min=1.0), torch.zeros_like(m))


@dataclass
class OrderTerms:
    """What one scoring call needs of :class:`SegmentOrder` (its parameters read once)."""

    mode: str
    strength: torch.Tensor  # position_bias / event_bias: bias per unit of relative distance (>= 0)
    gamma: torch.Tensor  # soft_dtw: smoothing (> 0)
    way_out: torch.Tensor  # in [0, 1]: how much a caption with concurrent phrases drops the order term


class SegmentOrder(nn.Module):
    """The learnt parameters of the order term: strength (position_bias, event_bias), gamma (soft_dtw), the way
    out."""

    def __init__(self, mode: str, init_strength: float = 0.1, init_gamma: float = 0.05):
        super().__init__()
        if mode not in ORDER_MODES[1:]:
            raise ValueError(f"segment order: unknown mode {mode!r} (use one of {', '.join(ORDER_MODES[1:])})")
        self.mode = mode
        biased = mode in ("position_bias", "event_bias")
        # strength = softplus(raw) >= 0; gamma = exp(log_gamma); way_out = sigmoid(logit), 0.5 at the start
        raw = init_strength if biased else 1.0
        self.raw_strength = nn.Parameter(torch.tensor(math.log(math.expm1(raw))), requires_grad=biased)
        self.log_gamma = nn.Parameter(torch.tensor(math.log(init_gamma)), requires_grad=mode == "soft_dtw")
        self.way_out_logit = nn.Parameter(torch.tensor(0.0))

    def terms(self) -> OrderTerms:
        return OrderTerms(self.mode, F.softplus(self.raw_strength), self.log_gamma.exp().clamp(1e-3, 1.0),
                          torch.sigmoid(self.way_out_logit))


def _weights_or_mean(w: torch.Tensor | None, mask: torch.Tensor, dtype) -> torch.Tensor:
    """Per-unit weights [B, N] summing to 1 over valid units: ``w`` or the plain masked mean."""
    if w is not None:
        return w.to(dtype)
    m = mask.to(dtype)
    return m / m.sum(1, keepdim=True).clamp(min=1.0)


def _soft_alignment(sim: torch.Tensor, am: torch.Tensor, tm: torch.Tensor, tw: torch.Tensor, conc: torch.Tensor,
                    gamma: torch.Tensor) -> torch.Tensor:
    """Monotonic soft alignment score [A, T] of sim [A, T, S, P] (padded entries at _NEG), phrase weights tw [T, P]
    (0 on padded phrases), concurrent [T, P]. Concurrent phrases add their best segment and leave the alignment."""
    a_n, t_n, s_n, p_n = sim.shape
    seg_ok = am[:, None, :]  # [A, 1, S]
    last = (tm.sum(1) - 1).clamp(min=0)  # [T] index of each text's last valid phrase
    d = None
    final = sim.new_full((a_n, t_n, s_n), _NEG)
    for p in range(p_n):
        w = tw[:, p][None, :, None]  # [1, T, 1]
        c = sim[..., p]  # [A, T, S]
        best = c.amax(-1, keepdim=True)  # a concurrent phrase's score, wherever its segment is
        g = (gamma * w).clamp(min=1e-4)
        if d is None:
            step = w * c
            free = torch.where(seg_ok, w * best, torch.full_like(c, _NEG))
        else:
            step = w * c + g * torch.logcumsumexp(d / g, dim=-1)
            free = d + w * best
        cp = conc[:, p][None, :, None]
        d = torch.where(cp, free, step)
        d = torch.where(seg_ok, d, torch.full_like(d, _NEG))
        final = torch.where((last == p)[None, :, None], d, final)
    return final.amax(-1)  # [A, T]: the best end segment (a soft maximum would add gamma * log(S) to every score)


def _block(a: torch.Tensor, am: torch.Tensor, t: torch.Tensor, tm: torch.Tensor, aw: torch.Tensor | None,
           tw: torch.Tensor | None, conc: torch.Tensor | None, order: OrderTerms | None,
           places: torch.Tensor | None = None) -> torch.Tensor:
    """a [A, S, D], am [A, S]; t [T, P, D], tm [T, P]; aw [A, S] / tw [T, P] unit weights or None; conc [T, P];
    places [T, P] (event_bias: each phrase's place in time, -1 none)."""
    sim = torch.einsum("asd,tpd->atsp", a, t)  # [A, T, S, P]
    pair = am[:, None, :, None] & tm[None, :, None, :]
    if conc is None:
        conc = torch.zeros_like(tm)
    has_conc = conc.any(1).to(sim.dtype)  # [T]
    relax = None
    if order is not None:
        relax = 1.0 - order.way_out * has_conc  # [T]: the way out for captions with concurrent phrases
    raw = sim
    if order is not None and order.mode in ("position_bias", "event_bias"):
        if order.mode == "event_bias":
            if places is None:
                raise ValueError("segment order event_bias needs the phrases' places in time (phrase_places)")
            text_place, placed = places.clamp(min=0.0), (places >= 0) & tm
        else:
            text_place, placed = relative_places(tm), tm
        dist = (relative_places(am)[:, None, :, None] - text_place[None, :, None, :]).abs()
        scale = order.strength * (~conc & placed).to(sim.dtype) * relax[:, None]  # [T, P]
        sim = sim - scale[None, :, None, :] * dist.to(sim.dtype)
    sim = sim.masked_fill(~pair, _NEG)
    text_best = sim.amax(dim=2)  # [A, T, P]
    audio_best = sim.amax(dim=3)  # [A, T, S]
    tw_ = _weights_or_mean(tw, tm, sim.dtype)  # [T, P]
    aw_ = _weights_or_mean(aw, am, sim.dtype)  # [A, S]
    t2a = (text_best * tw_[None]).sum(-1)
    a2t = (audio_best * aw_[:, None]).sum(-1)
    if order is not None and order.mode == "soft_dtw":
        aligned = _soft_alignment(raw.masked_fill(~pair, _NEG), am, tm, tw_, conc, order.gamma)
        t2a = relax[None, :] * aligned + (1.0 - relax[None, :]) * t2a
    both = am.any(1)[:, None] & tm.any(1)[None, :]
    return torch.where(both, 0.5 * (t2a + a2t), torch.zeros_like(t2a))


def unit_set_similarity(a: torch.Tensor, a_mask: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor, *,
                        a_weight: torch.Tensor | None = None, t_weight: torch.Tensor | None = None,
                        concurrent: torch.Tensor | None = None, order: OrderTerms | None = None,
                        places: torch.Tensor | None = None, max_elems: int = 1 << 24) -> torch.Tensor:
    """Set similarity of every audio with every text, with optional unit weights and order term.

    a [B_a, S, D], a_mask [B_a, S]; t [B_t, P, D], t_mask [B_t, P]; a_weight [B_a, S] / t_weight [B_t, P] (sum 1
    over valid units) or None (plain means); concurrent [B_t, P] or None (no concurrent phrase); order: the terms
    of a :class:`SegmentOrder` or None (order-blind); places [B_t, P] (what ``event_bias`` needs: each phrase's
    place in time, -1 none; :func:`phrase_places`) -> [B_a, B_t]. With neither weights nor order it equals
    :func:`hci_atr.models.hci.set_similarity`.
    """
    a_mask = a_mask.to(torch.bool)
    t_mask = t_mask.to(torch.bool)
    s_used = int(a_mask.any(0).nonzero().max()) + 1 if a_mask.any() else 1
    p_used = int(t_mask.any(0).nonzero().max()) + 1 if t_mask.any() else 1

    def cut(x, n):
        return None if x is None else x[:, :n]

    a, a_mask, a_weight = a[:, :s_used], a_mask[:, :s_used], cut(a_weight, s_used)
    t, t_mask, t_weight = t[:, :p_used], t_mask[:, :p_used], cut(t_weight, p_used)
    concurrent = None if concurrent is None else concurrent[:, :p_used].to(torch.bool) & t_mask
    places = None if places is None else places[:, :p_used]
    ba, s, _ = a.shape
    bt, p, _ = t.shape
    per_pair = max(1, s * p)
    if ba * bt * per_pair <= max_elems:
        return _block(a, a_mask, t, t_mask, a_weight, t_weight, concurrent, order, places)
    bt_blk = max(1, min(bt, max_elems // per_pair))
    ba_blk = max(1, max_elems // (per_pair * bt_blk))
    rows = []
    for i in range(0, ba, ba_blk):
        cols = []
        for j in range(0, bt, bt_blk):
            ai, tj = slice(i, i + ba_blk), slice(j, j + bt_blk)
            cols.append(_block(a[ai], a_mask[ai], t[tj], t_mask[tj], None if a_weight is None else a_weight[ai],
                               None if t_weight is None else t_weight[tj],
                               None if concurrent is None else concurrent[tj], order,
                               None if places is None else places[tj]))
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)
