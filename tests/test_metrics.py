"""Retrieval metrics: hand-computed small cases (ties, one caption, five captions) and a brute-force reference."""

import numpy as np
import pytest

from hci_atr.metrics import retrieval_metrics


def brute_force(sim, t2a):
    """Loop-based reference of the documented definitions."""
    n_a, n_t = sim.shape
    t_ranks = []
    for j in range(n_t):
        g = t2a[j]
        t_ranks.append(1 + sum(1 for i in range(n_a) if i != g and sim[i, j] >= sim[g, j]))
    t_ranks = np.array(t_ranks)
    best, aps = [], []
    for a in range(n_a):
        rel = [j for j in range(n_t) if t2a[j] == a]
        if not rel:
            continue
        # ordering: higher score first; on ties irrelevant before relevant, then by index
        order = sorted(range(n_t), key=lambda j: (-sim[a, j], 1 if t2a[j] == a else 0, j))
        pos = sorted(order.index(j) + 1 for j in rel)
        best.append(pos[0])
        aps.append(sum((k + 1) / p for k, p in enumerate(pos) if p <= 10) / len(rel))
    best = np.array(best)
    out = {f"t2a_R{k}": 100 * np.mean(t_ranks <= k) for k in (1, 5, 10)}
    out["t2a_mAP10"] = 100 * np.mean([1 / r if r <= 10 else 0 for r in t_ranks])
    out["t2a_medr"] = np.median(t_ranks)
    out["t2a_meanr"] = t_ranks.mean()
    out.update({f"a2t_R{k}": 100 * np.mean(best <= k) for k in (1, 5, 10)})
    out["a2t_mAP10"] = 100 * np.mean(aps)
    out["a2t_medr"] = np.median(best)
    out["a2t_meanr"] = best.mean()
    return out


def test_one_caption_per_clip_hand_computed():
    sim = np.array([[0.9, 0.1, 0.3],
                    [0.2, 0.8, 0.7],
                    [0.1, 0.95, 0.5]])
    t2a = np.array([0, 1, 2])
    m = retrieval_metrics(sim, t2a)
    # T2A: text0 -> clip0 best (rank 1); text1 -> clip1 0.8 < clip2 0.95 (rank 2); text2 -> clip2 0.5 < 0.7 (rank 2)
    assert m["t2a_R1"] == pytest.approx(100 / 3)
    assert m["t2a_R5"] == 100.0
    assert m["t2a_mAP10"] == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)
    assert m["t2a_medr"] == 2.0 and m["t2a_meanr"] == pytest.approx(5 / 3)
    # A2T: clip0 row [0.9,0.1,0.3] -> text0 rank1; clip1 [0.2,0.8,0.7] -> text1 rank1; clip2 [0.1,0.95,0.5] -> rank 2
    assert m["a2t_R1"] == pytest.approx(200 / 3)
    assert m["a2t_mAP10"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    assert m["rsum"] == pytest.approx(m["t2a_R1"] + m["t2a_R5"] + m["t2a_R10"])


def test_ties_count_against_the_query():
    sim = np.array([[0.5, 0.5],
                    [0.5, 0.5]])
    m = retrieval_metrics(sim, np.array([0, 1]))
    # every tie is pessimistic: each relevant item is ranked after the equal irrelevant one
    assert m["t2a_R1"] == 0.0 and m["t2a_medr"] == 2.0
    assert m["a2t_R1"] == 0.0 and m["a2t_mAP10"] == 50.0


def test_five_captions_a2t_map_hand_computed():
    # one clip of interest with 5 captions among 12 texts; clip 1 owns the rest
    t2a = np.array([0] * 5 + [1] * 7)
    sim = np.zeros((2, 12))
    # clip 0 ranks texts: rel, irr, rel, irr, irr, rel, then the rest; two relevant captions fall below position 10
    row = {0: 12, 5: 11, 1: 10, 6: 9, 7: 8, 2: 7, 8: 6, 9: 5, 10: 4, 11: 3, 3: 2, 4: 1}
    for j, v in row.items():
        sim[0, j] = v
    sim[1] = np.arange(12)  # texts of clip 1 (indices 5..11) on top for clip 1
    m = retrieval_metrics(sim, t2a)
    # clip 0 relevant positions: 1, 3, 6, 11, 12 -> AP@10 = (1/1 + 2/3 + 3/6) / 5
    ap0 = (1 + 2 / 3 + 3 / 6) / 5
    ap1 = 1.0  # clip 1's 7 captions take positions 1..7
    assert m["a2t_mAP10"] == pytest.approx(100 * (ap0 + ap1) / 2)
    assert m["a2t_R1"] == 100.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_matrices(seed):
    rng = np.random.default_rng(seed)
    n_a, n_t = 9, 31
    t2a = np.concatenate([np.arange(n_a), rng.integers(0, n_a, n_t - n_a)])
    sim = np.round(rng.standard_normal((n_a, n_t)), 1)  # rounding makes many ties
    got = retrieval_metrics(sim, t2a)
    ref = brute_force(sim, t2a)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k


def test_clip_without_captions_is_ignored_in_a2t_and_errors():
    sim = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    m = retrieval_metrics(sim, np.array([0, 1]))
    assert m["a2t_R1"] == 100.0  # clip 2 has no caption: not a query
    assert m["t2a_R1"] == 100.0
    with pytest.raises(ValueError):
        retrieval_metrics(sim, np.array([0, 3]))
    with pytest.raises(ValueError):
        retrieval_metrics(np.full((2, 2), np.nan), np.array([0, 1]))
