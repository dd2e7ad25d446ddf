"""Order-aware HCI: temporal context, the order-aware segment-phrase score, concurrency tags, unit weights and
calibrated fusion. Each switch: shapes, padding invariance, gradients, and off == the model without it."""

import math

import pytest
import torch
import torch.nn.functional as F

from hci_atr.config import Config
from hci_atr.errors import ConfigError
from hci_atr.models.hci import set_similarity
from hci_atr.models.model import HciAtrModel
from hci_atr.data.negatives import event_places
from hci_atr.models.order import (SegmentOrder, concurrent_phrases, relative_places, unit_set_similarity)
from hci_atr.models.temporal import MAX_POSITIONS, TemporalContext, sinusoidal_positions
from hci_atr.models.weighting import UnitWeights, calibrated_fuse, masked_softmax
from model_helpers import tiny_cfg, tiny_mel, tiny_model

CAPS = ["a dog barks while a car passes by", "rain", "people talk, then a door slams shut"]
ORDER_SWITCHES = {"model.temporal_context": "gru", "model.segment_order": "position_bias",
                  "model.unit_weights": True}


_model, _mel = tiny_model, tiny_mel


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# -- config ---------------------------------------------------------------------------------------------------------


def test_new_switches_default_off_and_bad_values_are_refused():
    m = Config().model
    assert (m.temporal_context, m.segment_order, m.fusion, m.unit_weights, m.hard_negatives,
            m.hard_negative_weight) == ("none", "none", "sum", False, "none", 0.0)
    for key, bad in (("model.temporal_context", "lstm"), ("model.segment_order", "dtw"), ("model.fusion", "max"),
                     ("model.temporal_positions", "rope"), ("model.hard_negatives", "all")):
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            Config().override({key: bad})
    with pytest.raises(ConfigError, match="hard_negative_weight"):
        Config().override({"model.hard_negatives": "order"})
    assert Config().override({"model.hard_negatives": "order", "model.hard_negative_weight": 0.5})


# -- temporal context -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,positions", [("gru", "sinusoidal"), ("gru", "none"), ("transformer", "sinusoidal"),
                                            ("transformer", "learned")])
def test_temporal_context_shapes_padding_invariance_and_gradients(kind, positions):
    torch.manual_seed(0)
    ctx = TemporalContext(8, kind, positions, layers=2).eval()
    x = torch.randn(3, 10, 8)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, :] = False  # a clip with no valid frame
    with torch.no_grad():
        y = ctx(x, mask)
        # extra padded frames (with junk in them) change no valid output
        xp = torch.cat([x, torch.randn(3, 7, 8) * 9], 1)
        mp = torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], 1)
        yp = ctx(xp, mp)
    assert y.shape == (3, 10, 8) and torch.isfinite(y).all()
    assert torch.all(y[~mask] == 0) and torch.all(yp[:, 10:] == 0)
    torch.testing.assert_close(yp[:, :10], y, atol=1e-5, rtol=1e-5)
    # order matters: reversing the valid frames changes the output beyond reversing it
    with torch.no_grad():
        yr = ctx(x[:1].flip(1), mask[:1])
    assert not torch.allclose(yr.flip(1), y[:1], atol=1e-4)
    ctx.train()
    ctx(x, mask).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ctx.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for n, p in ctx.named_parameters() if n.startswith("seq."))


def test_temporal_positions():
    pe = sinusoidal_positions(5, 6)
    assert pe.shape == (5, 6)
    torch.testing.assert_close(pe[3, 0], torch.tensor(math.sin(3.0)))
    torch.testing.assert_close(pe[3, 1], torch.tensor(math.cos(3.0)))
    ctx = TemporalContext(4, "transformer", "learned")
    codes = ctx.position_codes(MAX_POSITIONS + 3, "cpu")
    assert torch.equal(codes[-1], codes[MAX_POSITIONS - 1])  # later frames share the last learned entry


def test_temporal_context_in_the_model_is_padding_invariant(tiny_text_dir):
    for kind in ("gru", "transformer"):
        m = _model(tiny_text_dir, **{"model.temporal_context": kind})
        mel = _mel()
        with torch.no_grad():
            ref = m.encode_audio(mel)
            pmel = torch.cat([mel, torch.randn(3, 27, 16) * 5], 1)
            got = m.encode_audio(pmel, torch.cat([torch.ones(3, 61), torch.zeros(3, 27)], 1).bool())
        for f in ("clip", "segments", "frames"):
            r, g = getattr(ref, f), getattr(got, f)
            g = g if f == "clip" else g[:, :r.shape[1]]
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


# -- switches off == the model without them ---------------------------------------------------------------------------


def test_order_modules_exist_only_when_on_and_leave_every_other_weight_and_the_rng_alone(tiny_text_dir):
    torch.manual_seed(0)
    off = HciAtrModel(tiny_cfg(tiny_text_dir))
    after_off = torch.rand(4)
    torch.manual_seed(0)
    on = HciAtrModel(tiny_cfg(tiny_text_dir, **{**ORDER_SWITCHES, "model.segment_order": "soft_dtw"}))
    after_on = torch.rand(4)
    assert off.temporal is None and off.segment_order is None and off.unit_weight_heads is None
    so, sn = off.state_dict(), on.state_dict()
    extra = set(sn) - set(so)
    assert set(so) <= set(sn) and extra and all(k.split(".")[0] in ("temporal", "segment_order", "unit_weight_heads")
                                               for k in extra)
    assert all(torch.equal(so[k], sn[k]) for k in so)  # same weights everywhere else
    assert torch.equal(after_off, after_on)  # and the same random numbers drawn after construction


def test_switches_on_save_and_load_to_identical_scores(tiny_text_dir, tmp_path):
    m = _model(tiny_text_dir, **ORDER_SWITCHES, **{"model.fusion": "calibrated"})
    with torch.no_grad():
        for p in m.unit_weight_heads.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        mel, tb = _mel(), m.tokenize(CAPS)
        ref = m.score(m.encode_audio(mel), m.encode_text(tb))
        back = HciAtrModel.from_pretrained(m.save_pretrained(tmp_path / "m"))
        got = back.score(back.encode_audio(mel), back.encode_text(back.tokenize(CAPS)))
    torch.testing.assert_close(got.fused, ref.fused)


# -- concurrency tags --------------------------------------------------------------------------------------------------


def test_concurrent_phrases_from_the_token_ids(tiny_text_dir):
    m = _model(tiny_text_dir, **{"model.segment_order": "position_bias", "model.max_words": 16})
    caps = ["a dog barks while a car passes by, then a door slams", "a beep, then a knock",
            "over a hum, a beep then a knock", "rain falls throughout", "music with people talking"]
    t = m.encode_text(m.tokenize(caps))
    flags = [t.phrase_concurrent[i][t.phrase_mask[i]].tolist() for i in range(len(caps))]
    # "a dog barks | while a car | passes | by | then a door | slams"
    assert flags[0] == [False, True, True, True, False, False]
    assert flags[1] == [False, False]
    assert flags[2] == [True, False, False]  # the comma ends the concurrent clause
    assert flags[3] == [True]
    assert flags[4] == [False, True]
    # off: no tags are computed
    assert _model(tiny_text_dir).encode_text(m.tokenize(caps)).phrase_concurrent is None


def test_concurrent_phrases_propagate_until_a_sequence_word():
    # 4 phrases of one word each: [x, while, y, then]
    pm = torch.eye(4)[None]
    mask = torch.ones(1, 4, dtype=torch.bool)
    conc = torch.tensor([[False, True, False, False]])
    seq = torch.tensor([[False, False, False, True]])
    assert concurrent_phrases(pm, mask, conc, seq).tolist() == [[False, True, True, False]]


# -- the order-aware segment <-> phrase score --------------------------------------------------------------------------


def _ab_case():
    e_a, e_b = _unit([1.0, 0.0, 0.0]), _unit([0.0, 1.0, 0.0])
    segs = torch.cat([e_a, e_b])[None]  # one clip: A then B
    smask = torch.ones(1, 2, dtype=torch.bool)
    texts = torch.stack([torch.cat([e_a, e_b]), torch.cat([e_b, e_a])])  # "A then B", "B then A"
    tmask = torch.ones(2, 2, dtype=torch.bool)
    return segs, smask, texts, tmask


@pytest.mark.parametrize("mode", ["position_bias", "soft_dtw"])
def test_in_order_caption_scores_higher_only_with_the_order_term(mode):
    segs, smask, texts, tmask = _ab_case()
    off = unit_set_similarity(segs, smask, texts, tmask)
    assert off[0, 0] == off[0, 1]  # order-blind
    torch.testing.assert_close(off, set_similarity(segs, smask, texts, tmask))
    order = SegmentOrder(mode)
    on = unit_set_similarity(segs, smask, texts, tmask, order=order.terms())
    assert on[0, 0] > on[0, 1] + 0.01
    on[0, 1].backward()  # the out-of-order caption is what the order term acts on
    p = order.raw_strength if mode == "position_bias" else order.log_gamma
    assert p.grad is not None and p.grad != 0


def test_position_bias_hand_computed_and_concurrent_phrase_not_penalised():
    segs, smask, texts, tmask = _ab_case()
    order = SegmentOrder("position_bias", init_strength=0.2)
    terms = order.terms()
    k = float(terms.strength.detach())
    # "B then A": phrase B (place 1/4) best at segment B (place 3/4) -> 1 - k/2; same for A; audio side alike
    got = unit_set_similarity(segs, smask, texts[1:], tmask[1:], order=terms)
    torch.testing.assert_close(got, torch.tensor([[1 - k / 2]]))
    # "B while A": the concurrent phrase (A) takes no bias; the caption has a concurrent phrase, so the other
    # phrase's bias is scaled by 1 - sigmoid(way_out) = 1/2
    conc = torch.tensor([[False, True]])
    got = unit_set_similarity(segs, smask, texts[1:], tmask[1:], concurrent=conc, order=terms)
    # phrase B -> segment B: 1 - k/4; phrase A -> segment A: 1 (no bias); the audio side is the same pairs
    torch.testing.assert_close(got, torch.tensor([[0.5 * ((1 - k / 4) + 1.0)]]))
    # a fully concurrent caption scores exactly as the order-blind score
    allc = torch.ones(1, 2, dtype=torch.bool)
    torch.testing.assert_close(unit_set_similarity(segs, smask, texts[1:], tmask[1:], concurrent=allc, order=terms),
                               set_similarity(segs, smask, texts[1:], tmask[1:]))
    got.sum().backward()
    assert order.way_out_logit.grad is not None and order.way_out_logit.grad != 0


def test_soft_dtw_concurrent_phrase_leaves_the_alignment():
    segs, smask, texts, tmask = _ab_case()
    terms = SegmentOrder("soft_dtw").terms()
    allc = torch.ones(2, 2, dtype=torch.bool)
    # every phrase concurrent: the order-blind score, whatever the order
    torch.testing.assert_close(unit_set_similarity(segs, smask, texts, tmask, concurrent=allc, order=terms),
                               set_similarity(segs, smask, texts, tmask))
    # "B while A" scores above "B then A"
    conc = torch.tensor([[False, True]])
    plain = unit_set_similarity(segs, smask, texts[1:], tmask[1:], order=terms)
    relaxed = unit_set_similarity(segs, smask, texts[1:], tmask[1:], concurrent=conc, order=terms)
    assert relaxed > plain


def test_event_places_read_the_time_order_from_the_markers():
    q, h = 0.25, 0.75
    cases = {
        "A loud beep, then a knock": [q, q, q, None, h, h],
        "a knock after a beep": [h, h, None, q, q],  # "after" puts the later-mentioned event first
        "After a beep, a knock": [None, q, q, h, h],
        "A beep is heard before a knock": [q, q, q, q, None, h, h],
        "first a beep, then a knock, and finally a bell": [None, 1 / 6, 1 / 6, None, 0.5, 0.5, None, None, 5 / 6,
                                                           5 / 6],
        # what frames the sequence has no place; the sequence keeps its own
        "Over a hum, a beep and then a knock": [None, None, None, q, q, None, None, h, h],
        "A beep followed by a knock while a hum continues": [q, q, None, None, h, h, None, None, None, None],
        # no order stated: one event, only commas, or markers that disagree in direction
        "A loud beep over a hum": [None] * 6,
        "a dog barks": [None] * 3,
        "rain, wind": [None] * 2,
        "a beep then a knock after a bell": [None] * 8,
    }
    for caption, want in cases.items():
        got = event_places(caption)
        assert [g is None for g in got] == [w is None for w in want], caption
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None]), caption


def test_event_bias_hand_computed_after_read_forwards_and_no_order_no_bias():
    segs, smask, texts, tmask = _ab_case()  # one clip: A then B; texts[1] mentions B first
    terms = SegmentOrder("event_bias", init_strength=0.2).terms()
    k = float(terms.strength.detach())
    blind = set_similarity(segs, smask, texts[1:], tmask[1:])
    # "B after A": B is the later event (place 3/4), A the earlier (1/4): each phrase's best segment is its own, at
    # distance 0, so the caption scores as in order (1.0); position_bias reads it as "B then A" (1 - k/2)
    after = torch.tensor([[0.75, 0.25]])
    got = unit_set_similarity(segs, smask, texts[1:], tmask[1:], order=terms, places=after)
    torch.testing.assert_close(got, torch.tensor([[1.0]]))
    pos = SegmentOrder("position_bias", init_strength=0.2).terms()
    torch.testing.assert_close(unit_set_similarity(segs, smask, texts[1:], tmask[1:], order=pos),
                               torch.tensor([[1 - k / 2]]))
    # "B then A" (B placed first) against the A-then-B clip: 1 - k/2, as position_bias
    before = torch.tensor([[0.25, 0.75]])
    torch.testing.assert_close(unit_set_similarity(segs, smask, texts[1:], tmask[1:], order=terms, places=before),
                               torch.tensor([[1 - k / 2]]))
    # a caption that states no order (no places) scores exactly as the order-blind score; one placed phrase alone
    # is biased only on its own
    none = torch.full((1, 2), -1.0)
    torch.testing.assert_close(unit_set_similarity(segs, smask, texts[1:], tmask[1:], order=terms, places=none),
                               blind)
    one = torch.tensor([[0.25, -1.0]])  # phrase B placed first: its best segment B is at 3/4 -> 1 - k/2 on B only
    torch.testing.assert_close(unit_set_similarity(segs, smask, texts[1:], tmask[1:], order=terms, places=one),
                               torch.tensor([[(2 - k / 2) / 2]]))
    with pytest.raises(ValueError, match="places"):
        unit_set_similarity(segs, smask, texts, tmask, order=terms)


def test_phrase_places_in_the_model_follow_the_events(tiny_text_dir):
    m = _model(tiny_text_dir, **{"model.segment_order": "event_bias", "model.max_words": 16})
    caps = ["a knock after a beep", "a beep, then a knock", "a loud beep over a hum", "rain", "caf\u00e9 then a beep"]
    t = m.encode_text(m.tokenize(caps))
    places = [t.phrase_place[i][t.phrase_mask[i]].tolist() for i in range(len(caps))]
    assert places[0] == [0.75, 0.25]  # "a knock | after a beep"
    assert places[1] == [0.25, 0.75]
    assert places[2] == [-1.0, -1.0]  # one event: no order
    assert places[3] == [-1.0]
    assert set(places[4]) == {-1.0}  # not plain ASCII: the word indices may not be the tokenizer's, so none
    # padded phrases have no place either; position_bias computes none
    assert (t.phrase_place[~t.phrase_mask] == -1).all()
    assert _model(tiny_text_dir, **{"model.segment_order": "position_bias"}).encode_text(
        m.tokenize(caps)).phrase_place is None
    # the one-event captions' segment scores are the order-blind ones (no bias), the ordered captions' are not
    with torch.no_grad():
        a = m.encode_audio(_mel(1))
        s = m.score(a, t).levels["segment"]
        ref = set_similarity(a.segments, a.segment_mask, t.phrases, t.phrase_mask)
    torch.testing.assert_close(s[:, 2:4], ref[:, 2:4])
    assert not torch.allclose(s[:, :2], ref[:, :2])


def test_relative_places():
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    torch.testing.assert_close(relative_places(mask), torch.tensor([[0.25, 0.75, 0, 0], [0.125, 0.375, 0.625, 0.875]]))


def _rand_units(b, n, d, gen, lengths):
    x = F.normalize(torch.randn(b, n, d, generator=gen), dim=-1)
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    return x * mask[..., None], mask


@pytest.mark.parametrize("mode", [None, "position_bias", "event_bias", "soft_dtw"])
def test_order_score_padding_invariant_blocked_equals_full_and_empty_sides_score_zero(mode):
    g = torch.Generator().manual_seed(0)
    a, am = _rand_units(4, 5, 8, g, [5, 3, 1, 0])
    t, tm = _rand_units(3, 4, 8, g, [4, 2, 0])
    conc = torch.tensor([[False, True, True, False], [False, False, False, False], [False] * 4])
    aw = masked_softmax(torch.randn(4, 5, generator=g), am)
    tw = masked_softmax(torch.randn(3, 4, generator=g), tm)
    order = None if mode is None else SegmentOrder(mode).terms()
    places = torch.tensor([[0.75, -1.0, -1.0, 0.25], [0.25, 0.75, -1, -1], [-1.0] * 4])
    kw = dict(a_weight=aw, t_weight=tw, concurrent=conc, order=order, places=places)
    ref = unit_set_similarity(a, am, t, tm, **kw)
    assert ref.shape == (4, 3) and torch.isfinite(ref).all()
    assert torch.all(ref[3] == 0) and torch.all(ref[:, 2] == 0)
    pad = lambda x, n: F.pad(x, (0, 0, 0, n)) if x.dim() == 3 else F.pad(x, (0, n))
    got = unit_set_similarity(pad(a, 3), pad(am, 3), pad(t, 2), pad(tm, 2), a_weight=pad(aw, 3),
                              t_weight=pad(tw, 2), concurrent=pad(conc, 2), order=order,
                              places=F.pad(places, (0, 2), value=-1.0))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(unit_set_similarity(a, am, t, tm, **kw, max_elems=25), ref)


@pytest.mark.parametrize("mode", ["position_bias", "event_bias"])
def test_order_score_in_the_model_padding_invariant_and_switch_changes_only_the_segment_level(tiny_text_dir, mode):
    base = _model(tiny_text_dir)
    m = _model(tiny_text_dir, **{"model.segment_order": mode})
    mel, tb = _mel(), base.tokenize(CAPS)
    with torch.no_grad():
        ref = base.score(base.encode_audio(mel), base.encode_text(tb))
        s = m.score(m.encode_audio(mel), m.encode_text(tb))
        padded = m.score(m.encode_audio(torch.cat([mel, torch.randn(3, 27, 16)], 1),
                                        torch.cat([torch.ones(3, 61), torch.zeros(3, 27)], 1).bool()),
                         m.encode_text(m.tokenize(CAPS, pad_words_to=12)))
    for k in ("clip", "frame"):
        assert torch.equal(s.levels[k], ref.levels[k])
    assert not torch.allclose(s.levels["segment"], ref.levels["segment"])
    torch.testing.assert_close(padded.levels["segment"], s.levels["segment"], atol=1e-5, rtol=1e-5)


# -- unit weights ----------------------------------------------------------------------------------------------------


def test_unit_weights_start_as_the_plain_mean_then_learn(tiny_text_dir):
    base = _model(tiny_text_dir)
    m = _model(tiny_text_dir, **{"model.unit_weights": True})
    assert set(m.unit_weight_heads) == {"segment", "phrase", "frame", "word"}
    mel, tb = _mel(), base.tokenize(CAPS)
    with torch.no_grad():
        ref = base.score(base.encode_audio(mel), base.encode_text(tb))
        s = m.score(m.encode_audio(mel), m.encode_text(tb))
    for k in ref.levels:
        torch.testing.assert_close(s.levels[k], ref.levels[k], atol=1e-6, rtol=1e-6)
    m.train()
    keys = torch.arange(3, dtype=torch.float64)
    m(mel, torch.ones(3, 61, dtype=torch.bool), tb, keys, keys).losses["total"].backward()
    for name, head in m.unit_weight_heads.items():
        assert head.head.weight.grad is not None and head.head.weight.grad.abs().sum() > 0, name


def test_unit_weights_are_a_softmax_over_valid_units():
    uw = UnitWeights(4)
    with torch.no_grad():
        uw.head.weight.normal_()
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    w = uw(x, mask)
    torch.testing.assert_close(w[0, :3], torch.softmax(uw.head(x[0, :3]).squeeze(-1), 0))
    assert torch.all(w[0, 3:] == 0) and torch.all(w[1] == 0)
    # weighted set similarity with weights that are a plain mean equals hci's
    g = torch.Generator().manual_seed(1)
    a, am = _rand_units(3, 4, 8, g, [4, 2, 1])
    t, tm = _rand_units(2, 3, 8, g, [3, 1])
    mean_a, mean_t = am / am.sum(1, keepdim=True), tm / tm.sum(1, keepdim=True)
    torch.testing.assert_close(unit_set_similarity(a, am, t, tm, a_weight=mean_a.float(), t_weight=mean_t.float()),
                               set_similarity(a, am, t, tm))


# -- calibrated fusion -----------------------------------------------------------------------------------------------


def test_calibrated_fusion_equals_the_hand_computation(tiny_text_dir):
    m = _model(tiny_text_dir, **{"model.fusion": "calibrated", "model.level_weights": [1.0, 0.5, 2.0],
                                 "model.ac_branch": True})
    with torch.no_grad():
        m.temps.log_tau.copy_(torch.log(torch.tensor([0.05, 0.1, 0.2, 0.5, 0.07])))
        s = m.score(m.encode_audio(_mel()), m.encode_text(m.tokenize(CAPS)))
    lv = s.levels
    expected = (1.0 * lv["clip"] / 0.05 + 0.5 * lv["segment"] / 0.1 + 2.0 * lv["frame"] / 0.2
                + m.cfg.model.ac_branch_weight * lv["ac_branch"] / 0.5)
    torch.testing.assert_close(s.fused, expected)
    torch.testing.assert_close(calibrated_fuse({"a": torch.ones(1, 1)}, {"a": 2.0}, {"a": 0.5}), torch.tensor([[4.0]]))
    # the default sum: raw cosines
    base = _model(tiny_text_dir, **{"model.level_weights": [1.0, 0.5, 2.0]})
    with torch.no_grad():
        b = base.score(base.encode_audio(_mel()), base.encode_text(base.tokenize(CAPS)))
    torch.testing.assert_close(b.fused, b.levels["clip"] + 0.5 * b.levels["segment"] + 2.0 * b.levels["frame"])


def test_calibrated_fused_loss_uses_temperature_one(tiny_text_dir):
    from hci_atr.losses import info_nce, positives_mask

    m = _model(tiny_text_dir, **{"model.fusion": "calibrated", "model.learn_level_weights": True})
    keys = torch.arange(3, dtype=torch.float64)
    out = m(_mel(), torch.ones(3, 61, dtype=torch.bool), m.tokenize(CAPS), keys, keys)
    expected = info_nce(out.scores.fused, positives_mask(keys, keys), 1.0)
    torch.testing.assert_close(out.losses["fused"], expected)


# -- across workers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["position_bias", "event_bias"])
def test_sharded_loss_with_every_switch_is_the_global_batch_loss(tiny_text_dir, mode):
    """Two simulated workers gathering each other's texts (concurrency tags and phrase places travel with them): the
    mean of their losses is the whole batch's at every level; the hard term (local) too when the workers hold as
    many groups."""
    from hci_atr.data.negatives import hard_negative_texts
    from model_helpers import ThreadGather

    m = _model(tiny_text_dir, **{**ORDER_SWITCHES, "model.segment_order": mode, "model.fusion": "calibrated",
                                 "model.learn_level_weights": True,
                                 "model.hard_negatives": "both", "model.hard_negative_weight": 0.5})
    caps = ["a loud beep, then a knock", "rain while a dog barks", "a dog barks after a car passes",
            "a bell rings before a man speaks", "a hum with birds over it", "a fast ticking then a slow drip"]
    mel = _mel(6)
    keys = torch.arange(6, dtype=torch.float64) + 100

    def batch(sl):
        cs = caps[sl]
        texts, source = hard_negative_texts(cs, "both")
        return dict(mel=mel[sl], mel_mask=torch.ones(len(cs), 61, dtype=torch.bool),
                    text=m.tokenize(cs, pad_words_to=12), audio_keys=keys[sl], text_keys=keys[sl],
                    hard_text=m.tokenize(texts, pad_words_to=12), hard_source=torch.tensor(source))

    whole = batch(slice(0, 6))
    halves = [batch(slice(0, 3)), batch(slice(3, 6))]
    assert len(halves[0]["hard_source"]) == len(halves[1]["hard_source"])
    assert len(set(halves[0]["hard_source"].tolist())) == len(set(halves[1]["hard_source"].tolist()))
    assert m.encode_text(whole["text"]).phrase_concurrent.any()
    assert (m.encode_text(whole["text"]).phrase_place is not None) == (mode == "event_bias")
    ref = m(**whole).losses
    outs = ThreadGather(2).run(lambda r, g: m(**halves[r], gather=g))
    assert set(outs[0].losses) == set(ref) and "hard" in ref
    for name, value in ref.items():
        torch.testing.assert_close((outs[0].losses[name] + outs[1].losses[name]) / 2, value, atol=1e-5, rtol=1e-5)


def test_audio_encoder_switches_reach_the_model(tiny_text_dir):
    """The PANNs clip path, SpecAugment and dropout are ModelConfig switches; off, the clip is today's mean + max."""
    import torch

    from hci_atr.config import Config
    from hci_atr.models.model import HciAtrModel

    def model(**m):
        torch.manual_seed(0)
        cfg = Config().override({"model.text_encoder": str(tiny_text_dir), "model.audio_width": 4,
                                 **{f"model.{k}": v for k, v in m.items()}})
        return HciAtrModel(cfg).eval()

    mel = torch.randn(2, 101, 64)
    mask = torch.ones(2, 101, dtype=torch.bool)
    base, panns = model(), model(audio_clip_pooling="panns")
    panns.load_state_dict(base.state_dict())  # the same weights: only the pooling path differs
    a, b = base.encode_audio(mel, mask), panns.encode_audio(mel, mask)
    assert torch.equal(a.frames, b.frames) and not torch.allclose(a.clip, b.clip)
    conv, fmask = panns.audio.conv_frames(mel, mask)
    want = torch.nn.functional.normalize(panns.clip_head(panns.audio_proj(panns.audio.clip_embedding(conv, fmask))),
                                         dim=-1)
    torch.testing.assert_close(b.clip, want)
    aug = model(audio_spec_augment=True, audio_dropout=0.2)
    aug.load_state_dict(base.state_dict())
    torch.testing.assert_close(aug.encode_audio(mel, mask).clip, a.clip)  # eval mode: no masking, no dropout
    aug.train()
    assert not torch.allclose(aug.encode_audio(mel, mask).clip, a.clip)
