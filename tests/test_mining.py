"""Mined batches (train.batch_mining): caption-text neighbours, the grouped epoch order, and iter_batches with it."""

import numpy as np
import pytest
import torch

from hci_atr.config import Config
from hci_atr.errors import ConfigError
from hci_atr.models.model import HciAtrModel
from hci_atr.training import ArrowRows, iter_batches
from hci_atr.training.mining import caption_vectors, mined_order, nearest_candidates
from model_helpers import tiny_cfg, tiny_rows

EVENTS = ["a beep", "a knock", "a bell", "a hiss", "a hum", "a drip", "a tick", "a buzz"]


def _twins(n_pairs: int) -> list[list[str]]:
    """Clip 2k: "X, then Y" (and a second wording); clip 2k+1: the same events in the other order."""
    caps = []
    for k in range(n_pairs):
        x, y = EVENTS[k % len(EVENTS)], EVENTS[(3 * k + 1) % len(EVENTS)]
        if x == y:
            y = EVENTS[(k + 2) % len(EVENTS)]
        tag = f"number{k}"  # a word only this pair shares, so each clip's twin is its one nearest neighbour
        caps.append([f"{x} {tag}, then {y}", f"first {x} {tag} and then {y}"])
        caps.append([f"{y} {tag}, then {x}", f"first {y} {tag} and then {x}"])
    return caps


def test_order_swapped_twins_are_each_others_nearest_and_vectors_are_deterministic():
    caps = _twins(6)
    v = caption_vectors(caps)
    assert v.shape == (12, 1024) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(v, caption_vectors(caps))  # a fixed hash, not Python's salted one
    cand = nearest_candidates(v, k=3)
    assert cand[:, 0].tolist() == [i ^ 1 for i in range(12)]
    # a clip without words is a zero vector (no neighbour prefers it)
    assert not caption_vectors([["..."], ["a beep"]])[0].any()


@pytest.mark.parametrize("block", [1, 5, 512])
def test_nearest_candidates_equal_the_brute_force_ranking(block):
    g = np.random.default_rng(0)
    x = g.standard_normal((23, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = nearest_candidates(x, k=5, block=block)
    sims = x @ x.T
    for i in range(23):
        ref = [j for j in sorted(range(23), key=lambda j: (-sims[i, j], j)) if j != i][:5]
        assert got[i].tolist() == ref
    assert nearest_candidates(x[:1], k=5).shape == (1, 0)  # a single row has no neighbour


def test_mined_order_is_a_seeded_permutation_of_neighbour_groups():
    cand = nearest_candidates(caption_vectors(_twins(8)), k=4)
    orders = [mined_order(cand, 2, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert orders[0] == orders[1] and orders[0] != orders[2]
    for order in orders:
        assert sorted(order) == list(range(16))
        # every twin pair sits side by side at an even position (all groups are pairs here)
        assert all(order[i] ^ 1 == order[i + 1] for i in range(0, 16, 2))
    # groups of 3 take the first two unassigned candidates of their start row; every row appears once
    order3 = mined_order(cand, 3, torch.Generator().manual_seed(0))
    assert sorted(order3) == list(range(16))


def _twin_rows(n_pairs: int) -> list[dict]:
    rows = tiny_rows(2 * n_pairs)
    for r, caps in zip(rows, _twins(n_pairs)):
        r["captions"] = caps
    return rows


def test_iter_batches_with_text_mining_keeps_twins_in_one_batch(tiny_text_dir):
    import pyarrow as pa

    cfg = tiny_cfg(tiny_text_dir, **{"train.batch_mining": "text"})
    model = HciAtrModel(cfg)
    rows = _twin_rows(8)
    index = {r["audio_id"]: i for i, r in enumerate(rows)}

    def batches(rs, c):
        return [[index[a] for a in b.audio_ids]
                for b in iter_batches(rs, c, model, True, torch.Generator().manual_seed(0), batch_size=4)]

    seen = batches(rows, cfg)
    assert len(seen) == 4 and sorted(i for b in seen for i in b) == list(range(16))
    assert all(i ^ 1 in b for b in seen for i in b)
    # the same from Arrow rows (captions read from the table's column, mels not decoded for it)
    assert batches(ArrowRows(pa.Table.from_pylist(rows)), cfg) == seen
    # without mining the epoch is the plain shuffle: most twins land in different batches
    assert sum(i ^ 1 in b for b in batches(rows, tiny_cfg(tiny_text_dir)) for i in b) < 16


def test_batch_mining_settings_are_checked():
    assert (Config().train.batch_mining, Config().train.batch_mining_group) == ("none", 2)
    with pytest.raises(ConfigError, match="batch_mining"):
        Config().override({"train.batch_mining": "embeddings"})
    with pytest.raises(ConfigError, match="batch_mining_group"):
        Config().override({"train.batch_mining_group": 1})
