"""Contrastive loss: hand-computed value, multi-positive handling, pair weights, temperatures."""

import math

import pytest
import torch

from hci_atr.losses import MAX_TAU, MIN_TAU, LevelTemperatures, hierarchical_loss, info_nce, positives_mask


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
