"""Contrastive loss: hand-computed value, multi-positive handling, pair weights, temperatures; hard-negative
captions (order swapped, attribute flipped) and the hard-negative term, alone and in the model."""

import math

import pytest
import torch

from hci_atr.data.negatives import attribute_flipped, hard_negative_texts, hard_negatives, order_swapped
from hci_atr.losses import (MAX_TAU, MIN_TAU, LevelTemperatures, group_hard_negatives, hard_negative_loss,
                            hard_negative_nce, hierarchical_loss, info_nce, positives_mask)
from hci_atr.models.model import HciAtrModel
from model_helpers import tiny_cfg


def test_info_nce_matches_hand_computed_two_by_two():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.eye(2, dtype=torch.bool)
    # each direction: -log(e^1 / (e^1 + e^0))
    expected = -math.log(math.e / (math.e + 1))
    assert info_nce(s, pos, 1.0).item() == pytest.approx(expected)


def test_other_captions_of_the_same_clip_are_not_negatives():
    keys = torch.tensor([1.0, 2.0])
    text_keys = torch.tensor([1.0, 1.0, 2.0])  # two captions of clip 1
    pos = positives_mask(keys, text_keys)
    assert pos.tolist() == [[True, True, False], [False, False, True]]
    s = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    loss = info_nce(s, pos, 1.0)
    # each positive competes only with true negatives. Pairs (clip1, text0/1): one negative each way -> l1;
    # pair (clip2, text2): one negative audio (l1) and two negative texts (l2)
    l1 = -math.log(math.exp(2) / (math.exp(2) + 1))
    l2 = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert loss.item() == pytest.approx((2 * l1 + 0.5 * (l1 + l2)) / 3)


def test_pair_weights_scale_and_zero_weight_removes_a_text():
    s = torch.tensor([[1.0, 0.2, 0.9], [0.1, 1.0, 0.3]])
    keys = torch.tensor([1.0, 2.0])
    base = info_nce(s[:, :2], positives_mask(keys, keys), 0.5)
    # third text (a placeholder) with weight 0 disappears entirely, even as a negative
    with_placeholder = info_nce(s, positives_mask(keys, torch.tensor([1.0, 2.0, 2.0])), 0.5,
                                torch.tensor([1.0, 1.0, 0.0]))
    assert with_placeholder.item() == pytest.approx(base.item())
    # a weighted extra positive changes the loss
    weighted = info_nce(s, positives_mask(keys, torch.tensor([1.0, 2.0, 2.0])), 0.5, torch.tensor([1.0, 1.0, 0.5]))
    assert weighted.item() != pytest.approx(base.item())


def test_temperatures_are_clamped_and_loss_sums_levels():
    temps = LevelTemperatures(("clip", "frame"), init=0.07)
    assert temps.tau("clip").item() == pytest.approx(0.07)
    with torch.no_grad():
        temps.log_tau[0] = -20.0
        temps.log_tau[1] = 5.0
    assert temps.tau("clip").item() == pytest.approx(MIN_TAU) and temps.tau("frame").item() == pytest.approx(MAX_TAU)
    s = torch.randn(4, 4)
    pos = torch.eye(4, dtype=torch.bool)
    out = hierarchical_loss({"clip": s, "frame": s * 2}, pos, temps, {"clip": 1.0, "frame": 3.0})
    expected = 0.25 * info_nce(s, pos, MIN_TAU) + 0.75 * info_nce(s * 2, pos, MAX_TAU)
    assert out["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out) == {"clip", "frame", "total"}


def test_level_temperature_override():
    temps = LevelTemperatures(("clip", "fused"), init=0.07)
    s = torch.randn(3, 3)
    pos = torch.eye(3, dtype=torch.bool)
    out = hierarchical_loss({"clip": s, "fused": s}, pos, temps, {"clip": 1.0, "fused": 1.0}, taus={"fused": 1.0})
    assert out["fused"].item() == pytest.approx(info_nce(s, pos, 1.0).item())
    assert out["clip"].item() == pytest.approx(info_nce(s, pos, 0.07).item())


# -- hard-negative captions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caption,swapped", [
    ("A dog barks, then a car passes.", "a car passes then a dog barks"),
    ("a dog barks and then a car passes", "a car passes and then a dog barks"),
    ("A beep followed by a knock", "a knock followed by a beep"),
    ("a dog barks after a car passes", "a car passes after a dog barks"),
    ("After a car passes, a dog barks", "a car passes after a dog barks"),
    ("A short beep is heard before a loud knock", "a loud knock before a short beep is heard"),
    ("First a beep, then a knock, and finally a bell", "first a bell then a knock and finally a beep"),
    ("A beep, followed by a knock and then a bell", "a bell followed by a knock and then a beep"),
    ("A beep, then a knock while a hum continues in the background",
     "a knock then a beep while a hum continues in the background"),
    ("Over a hum, a beep, then a knock", "over a hum a knock then a beep"),
    ("A high-pitched beep, then two knocks", "two knocks then a high pitched beep"),
])
def test_order_swapped_reverses_the_events(caption, swapped):
    assert order_swapped(caption) == swapped
    assert order_swapped(caption) == order_swapped(caption)  # deterministic


@pytest.mark.parametrize("caption", ["a dog barks", "a dog barks while a car passes by", "a beep then a beep",
                                     "then a knock", "A dog barks, a car passes", "", "rain with thunder"])
def test_order_swapped_is_none_without_an_order(caption):
    assert order_swapped(caption) is None


def test_attribute_flipped():
    assert attribute_flipped("A LOUD beep and a quiet knock.") == "A QUIET beep and a loud knock."
    assert attribute_flipped("High-pitched beeps, two times") == "Low-pitched beeps, three times"
    assert attribute_flipped("a fast ticking, slowly fading") == "a slow ticking, quickly fading"
    assert attribute_flipped("a short beep then a long tone") == "a long beep then a short tone"
    assert attribute_flipped("Faint rain") == "Loud rain"
    assert attribute_flipped("a dog barks along the fence") is None  # "long" inside a word is no attribute
    assert attribute_flipped("a dog barks") is None


def test_hard_negative_texts_point_to_their_caption_and_never_repeat_a_positive():
    caps = ["a loud beep then a knock", "rain", "a knock then a beep"]
    texts, source = hard_negative_texts(caps, "both")
    assert texts == ["a knock then a loud beep", "a quiet beep then a knock", "a beep then a knock"]
    assert source == [0, 0, 2]
    assert hard_negative_texts(caps, "order") == (["a knock then a loud beep", "a beep then a knock"], [0, 2])
    assert hard_negative_texts(caps, "attribute") == (["a quiet beep then a knock"], [0])
    assert hard_negative_texts(caps, "none") == ([], [])
    # a negative that reads as one of the clip's own captions is dropped
    assert hard_negatives("a beep then a knock", "order", exclude=["A knock, then a beep."]) == []
    with pytest.raises(ValueError, match="unknown kind"):
        hard_negatives("a beep", "orders")


# -- the hard-negative term -------------------------------------------------------------------------------------------


def test_group_hard_negatives():
    sources, index, mask = group_hard_negatives(torch.tensor([2, 0, 2, 2]))
    assert sources.tolist() == [2, 0]
    assert index[mask].tolist() == [0, 2, 3, 1] and mask.sum(1).tolist() == [3, 1]
    s, i, m = group_hard_negatives(torch.zeros(0, dtype=torch.long))
    assert s.numel() == 0 and not m.any()


def test_hard_negative_nce_hand_computed_and_negatives_are_never_positives():
    pos = torch.tensor([1.0, 0.5])
    neg = torch.tensor([[0.0, 0.2], [0.5, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    got = hard_negative_nce(pos, neg, mask, 0.5)
    l0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(0.4)))
    l1 = -math.log(math.exp(1) / (math.exp(1) + math.exp(1)))  # a negative as good as the positive: log 2
    assert got.item() == pytest.approx((l0 + l1) / 2)
    # a group with no negative adds nothing; no negative at all gives 0
    assert hard_negative_nce(pos, neg, torch.tensor([[True, True], [False, False]]), 0.5).item() == \
        pytest.approx(l0)
    assert hard_negative_nce(pos, neg, torch.zeros(2, 2, dtype=torch.bool), 0.5).item() == 0.0


def test_scoring_the_true_caption_above_its_swap_lowers_the_hard_loss():
    mask = torch.ones(1, 1, dtype=torch.bool)
    losses = [hard_negative_nce(torch.tensor([p]), torch.tensor([[0.5]]), mask, 0.1).item() for p in (0.3, 0.5, 0.7)]
    assert losses[0] > losses[1] > losses[2]
    temps = LevelTemperatures(("clip", "frame"), init=0.1)
    out = hard_negative_loss({"clip": torch.tensor([0.7]), "frame": torch.tensor([0.3])},
                             {"clip": torch.tensor([[0.5]]), "frame": torch.tensor([[0.5]])}, mask, temps,
                             {"clip": 1.0, "frame": 3.0})
    assert out["total"].item() == pytest.approx(0.25 * losses[2] + 0.75 * losses[0], rel=1e-5)


# -- the hard-negative term in the model -------------------------------------------------------------------------------


HN_CAPS = ["a loud beep, then a knock", "rain falls", "a dog barks after a car passes"]


def _hn_batch(m):
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(3, 61, 16, generator=g)
    keys = torch.tensor([11.0, 12.0, 13.0], dtype=torch.float64)
    texts, source = hard_negative_texts(HN_CAPS, m.cfg.model.hard_negatives
                                        if m.cfg.model.hard_negatives != "none" else "both")
    return dict(mel=mel, mel_mask=torch.ones(3, 61, dtype=torch.bool), text=m.tokenize(HN_CAPS, pad_words_to=12),
                audio_keys=keys, text_keys=keys), m.tokenize(texts, pad_words_to=12), torch.tensor(source)


def _tiny_model(text_dir, **over):
    torch.manual_seed(0)
    return HciAtrModel(tiny_cfg(text_dir, **over)).eval()


def test_hard_term_off_is_absent_and_changes_nothing(tiny_text_dir):
    m = _tiny_model(tiny_text_dir)
    kw, ht, hs = _hn_batch(m)
    plain = m(**kw)
    with_hard = m(**kw, hard_text=ht, hard_source=hs)
    assert "hard" not in with_hard.losses and set(with_hard.losses) == set(plain.losses)
    assert all(torch.equal(with_hard.losses[k], plain.losses[k]) for k in plain.losses)


def test_hard_term_equals_hand_computation_and_never_touches_the_contrastive_loss(tiny_text_dir):
    on = _tiny_model(tiny_text_dir, **{"model.hard_negatives": "both", "model.hard_negative_weight": 0.5})
    off = _tiny_model(tiny_text_dir)
    kw, ht, hs = _hn_batch(on)
    assert hs.tolist() == [0, 0, 2]  # clip 0: order + attribute, clip 1: none, clip 2: order
    out = on(**kw, hard_text=ht, hard_source=hs)
    base = off(**kw)
    for k in base.losses:  # the hard texts are in no contrastive matrix: every level's loss is unchanged
        if k != "total":
            assert torch.equal(out.losses[k], base.losses[k])
    assert out.losses["total"].item() == pytest.approx(base.losses["total"].item() + 0.5 * out.losses["hard"].item(),
                                                       rel=1e-6)
    # by hand: each clip against its own caption and that caption's negatives only, per level, weights normalised
    with torch.no_grad():
        a = on.encode_audio(kw["mel"], kw["mel_mask"])
        s_pos = on.score(a, on.encode_text(kw["text"]))
        s_neg = on.score(a, on.encode_text(ht))
    expected = 0.0
    for level in ("clip", "segment", "frame"):
        tau = on.temps.tau(level).item()
        g0 = -s_pos.levels[level][0, 0] / tau + torch.logsumexp(
            torch.stack([s_pos.levels[level][0, 0], s_neg.levels[level][0, 0], s_neg.levels[level][0, 1]]) / tau, 0)
        g2 = -s_pos.levels[level][2, 2] / tau + torch.logsumexp(
            torch.stack([s_pos.levels[level][2, 2], s_neg.levels[level][2, 2]]) / tau, 0)
        expected += (g0 + g2).item() / 2 / 3
    assert out.losses["hard"].item() == pytest.approx(expected, rel=1e-5)
    # gradients flow from the hard term alone
    on.zero_grad()
    out.losses["hard"].backward()
    assert on.clip_head.weight.grad is not None and on.clip_head.weight.grad.abs().sum() > 0


def test_hard_term_without_negatives_is_zero_and_bad_sources_are_refused(tiny_text_dir):
    on = _tiny_model(tiny_text_dir, **{"model.hard_negatives": "order", "model.hard_negative_weight": 0.5})
    kw, ht, hs = _hn_batch(on)
    out = on(**kw)  # e.g. evaluation batches: no hard texts
    assert out.losses["hard"].item() == 0.0 and not out.losses["hard"].requires_grad
    torch.testing.assert_close(out.losses["total"], on(**kw).losses["total"])
    # a negative whose caption is a weight-0 placeholder counts for nothing
    w = torch.tensor([1.0, 1.0, 0.0])
    only2 = on(**kw, pair_weight=w, hard_text=on.tokenize(["a car passes after a dog barks"]),
               hard_source=torch.tensor([2]))
    assert only2.losses["hard"].item() == 0.0
    with pytest.raises(ValueError, match="hard_source"):
        on(**kw, hard_text=ht, hard_source=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="point into"):
        on(**kw, hard_text=on.tokenize(["a car passes after a dog barks"]), hard_source=torch.tensor([7]))
