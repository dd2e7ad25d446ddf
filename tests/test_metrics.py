"""Retrieval metrics: hand-computed small cases (ties, one caption, five captions) and a brute-force reference;
hard-negative pair accuracy (brute force, order-sensitive vs order-blind scores, ties) and the pair file reader."""

import numpy as np
import pytest

from hci_atr.data.pairs import Pair, read_pairs, write_pairs
from hci_atr.errors import DataError
from hci_atr.metrics import pair_accuracy, retrieval_metrics


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


# ---------------------------------------------------------------------------------------------------------------
# hard-negative pair accuracy and the pair file
# ---------------------------------------------------------------------------------------------------------------


def brute_force_pairs(sim, t2a, pairs):
    """Loop reference: every caption of i (or the listed ones) against j, and of j against i; ties 0.5."""
    groups = {}
    for p in pairs:
        i, j, kind = p[:3]
        attribute = p[3] if len(p) > 3 else None
        trials = []
        for owner, other, chosen in ((i, j, p[4] if len(p) > 4 else None), (j, i, p[5] if len(p) > 5 else None)):
            own = [c for c in range(len(t2a)) if t2a[c] == owner]
            for pos, c in enumerate(own):
                if chosen is None or pos in chosen:
                    trials.append(1.0 if sim[owner, c] > sim[other, c] else 0.5 if sim[owner, c] == sim[other, c]
                                  else 0.0)
        for name in ["pairs", f"pairs_{kind}"] + ([f"pairs_{kind}_{attribute}"] if attribute else []):
            g = groups.setdefault(name, [0, []])
            g[0] += 1
            g[1].extend(trials)
    out = {}
    for name, (n, trials) in groups.items():
        out[f"{name}_n"] = n
        if trials:
            out[f"{name}_acc"] = sum(trials) / len(trials)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_accuracy_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_a, n_t = 12, 50
    t2a = np.concatenate([np.arange(n_a), rng.integers(0, n_a, n_t - n_a)])
    sim = np.round(rng.standard_normal((n_a, n_t)), 1)  # rounding makes ties
    kinds = [("order", None), ("attribute", "loudness"), ("attribute", "pitch"), ("count", None), ("background", None)]
    pairs = []
    for _ in range(30):
        i, j = (int(x) for x in rng.choice(n_a, 2, replace=False))
        kind, attribute = kinds[int(rng.integers(0, len(kinds)))]
        if rng.random() < 0.4:  # only some captions tell the two clips apart
            ci = tuple(int(c) for c in np.flatnonzero(rng.random((t2a == i).sum()) < 0.6)) or (0,)
            cj = None if rng.random() < 0.5 else (0,)
            pairs.append(Pair(i, j, kind, attribute, ci, cj))
        else:
            pairs.append((i, j, kind) if attribute is None and rng.random() < 0.5 else (i, j, kind, attribute))
    got = pair_accuracy(sim, t2a, pairs)
    ref = brute_force_pairs(sim, t2a, pairs)
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k
    assert "pairs_attribute_loudness_acc" in got and got["pairs_n"] == 30


def _scene_sims(order_sensitive: bool):
    """Four scenes and their reversals (order pairs) plus four scenes with one event made loud (attribute pairs).

    A caption describes its clip's events in order. The bag-of-events score counts shared (event, attribute) items,
    so a reversed scene scores exactly as high as the original; the order-sensitive score adds 1 when the caption's
    sequence is the clip's own."""
    base = [["beep", "knock", "hiss"], ["siren", "bell"], ["chirp", "tick", "hum"], ["bell", "beep"]]
    clips, pairs = [], []
    for s in base:
        pairs.append((len(clips), len(clips) + 1, "order"))
        clips += [[(e, "quiet") for e in s], [(e, "quiet") for e in s[::-1]]]
    for s in base:
        pairs.append((len(clips), len(clips) + 1, "attribute", "loudness"))
        clips += [[(e, "quiet") for e in s], [(s[0], "loud")] + [(e, "quiet") for e in s[1:]]]
    captions = [c for c in clips for _ in range(3)]  # three captions per clip
    t2a = np.repeat(np.arange(len(clips)), 3)
    sim = np.zeros((len(clips), len(captions)))
    for a, clip in enumerate(clips):
        for t, cap in enumerate(captions):
            sim[a, t] = sum(min(clip.count(x), cap.count(x)) for x in set(cap))
            if order_sensitive and clip == cap:
                sim[a, t] += 1
    return sim, t2a, pairs


def test_pair_accuracy_order_sensitive_vs_order_blind():
    sim, t2a, pairs = _scene_sims(order_sensitive=True)
    m = pair_accuracy(sim, t2a, pairs)
    assert m["pairs_order_acc"] == 1.0 and m["pairs_order_n"] == 4
    assert m["pairs_attribute_acc"] == 1.0 and m["pairs_attribute_loudness_acc"] == 1.0
    sim, t2a, pairs = _scene_sims(order_sensitive=False)
    m = pair_accuracy(sim, t2a, pairs)
    assert m["pairs_order_acc"] == 0.5  # a bag of events cannot tell a scene from its reversal: chance
    assert m["pairs_attribute_acc"] == 1.0  # but it does see the changed attribute
    assert m["pairs_acc"] == pytest.approx(0.75)


def test_pair_accuracy_ties_and_edge_cases():
    t2a = np.array([0, 0, 1, 1, 2])
    m = pair_accuracy(np.full((3, 5), 0.3), t2a, [(0, 1, "count"), (1, 2, "background")])
    assert m == {"pairs_acc": 0.5, "pairs_n": 2.0, "pairs_background_acc": 0.5, "pairs_background_n": 1.0,
                 "pairs_count_acc": 0.5, "pairs_count_n": 1.0}
    # a clip without captions gives no trials from its side
    sim = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    m = pair_accuracy(sim, np.array([0, 0, 1]), [(0, 2, "order"), (1, 0, "order")])
    assert m["pairs_order_acc"] == 1.0 and m["pairs_order_n"] == 2
    assert pair_accuracy(sim, np.array([0, 0, 1]), []) == {"pairs_n": 0.0}
    assert pair_accuracy(sim, np.array([0, 0, 1]), [(2, 1, "count")])["pairs_count_acc"] == 1.0  # j's side only
    # a group without trials (neither clip has a caption) has a count but no accuracy
    sim4 = np.vstack([sim, sim[2:]])
    assert pair_accuracy(sim4, np.array([0, 0, 1]), [(2, 3, "count")]) == {"pairs_n": 1.0, "pairs_count_n": 1.0}
    with pytest.raises(ValueError):
        pair_accuracy(sim, np.array([0, 0, 1]), [(0, 3, "order")])
    with pytest.raises(ValueError):
        pair_accuracy(sim, np.array([0, 0, 1]), [(1, 1, "order")])
    with pytest.raises(DataError, match="does not fit"):  # caption position 2 of a clip with two captions
        pair_accuracy(sim, np.array([0, 0, 1]), [Pair(0, 1, "order", None, (2,), None)])


def test_read_pairs_maps_ids_to_rows_and_drops_other_splits(tmp_path):
    path = tmp_path / "pairs.json"
    write_pairs(path, [
        {"a": "x.wav", "b": "y.wav", "type": "order", "attribute": None, "split": "test"},
        {"a": "y.wav", "b": "z.wav", "type": "attribute", "attribute": "pitch", "split": "test",
         "a_captions": [3, 0], "b_captions": [1]},
        {"a": "x.wav", "b": "other.wav", "type": "count", "attribute": None, "split": "train"},
    ])
    got = read_pairs(path, ["z.wav", "x.wav", "y.wav"])
    assert got == [Pair(1, 2, "order"), Pair(2, 0, "attribute", "pitch", (0, 3), (1,))]
    assert read_pairs(path, ["x.wav"]) == []


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON pair file"),
    ('{"a": "x"}', "expected a JSON list"),
    ('[{"a": "x", "type": "order"}]', "pair 0: field 'b'"),
    ('[{"a": "x", "b": "x", "type": "order"}]', "same clip"),
    ('[{"a": "x", "b": "y", "type": "colour"}]', "'colour' is not one of order, attribute, count, background"),
    ('[{"a": "x", "b": "y", "type": "order"}, 3]', "pair 1: expected an object"),
    ('[{"a": "x", "b": "y", "type": "order", "a_captions": [-1]}]', "field 'a_captions'"),
    ('[{"a": "x", "b": "y", "type": "order", "attribute": 5}]', "field 'attribute'"),
])
def test_read_pairs_malformed_file_is_one_line_data_error(tmp_path, content, message):
    path = tmp_path / "pairs.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_pairs(path, ["x", "y"])
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(DataError, match="not found"):
        read_pairs(tmp_path / "missing.json", ["x"])


def test_per_query_hits_average_to_recall_at_k():
    rng = np.random.default_rng(4)
    sim = rng.standard_normal((30, 150))
    t2a = np.repeat(np.arange(30), 5)
    from hci_atr.metrics import per_query_hits

    m = retrieval_metrics(sim, t2a)
    for k in (1, 5):
        h = per_query_hits(sim, t2a, k)
        assert h["t2a"].mean() * 100 == pytest.approx(m[f"t2a_R{k}"])
        assert h["a2t"].mean() * 100 == pytest.approx(m[f"a2t_R{k}"])


def test_paired_bootstrap_interval_covers_the_difference_and_resolves_a_real_gap():
    from hci_atr.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    a = (rng.random(1500) < 0.40).astype(float)
    b = np.where(rng.random(1500) < 0.15, 1.0, a)  # b = a plus extra hits on ~15% of the queries
    r = paired_bootstrap(a, b, seed=1)
    assert r["lo"] < r["diff"] < r["hi"] and r["lo"] > 0 and r["n"] == 1500
    assert r["diff"] == pytest.approx((b - a).mean())
    same = paired_bootstrap(a, a.copy())
    assert same["diff"] == same["lo"] == same["hi"] == 0.0
    noise = paired_bootstrap(a, rng.permutation(a), seed=2)  # same rate, unpaired noise: the interval spans 0
    assert noise["lo"] < 0 < noise["hi"]
    assert paired_bootstrap(a, b, seed=1) == r  # seeded
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:10])


def test_caption_word_f1_hand_computed():
    from hci_atr.metrics import caption_word_f1

    # "a dog barks loudly" vs "a dog barks": 3 common of 4 / 3 words -> P 3/4, R 1 -> F1 6/7
    assert caption_word_f1("A dog barks loudly", ["a dog barks"]) == pytest.approx(6 / 7)
    # the best reference counts; words are a multiset ("a a" matches one "a" of the reference only)
    assert caption_word_f1("a a bell", ["a bell rings", "birds sing"]) == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert caption_word_f1("", ["a bell"]) == 0.0 and caption_word_f1("a bell", []) == 0.0
    assert caption_word_f1("rain falls.", ["Rain, falls"]) == 1.0  # case and punctuation do not count


def test_caption_quality_per_split_and_confidence_quartile():
    from hci_atr.metrics import caption_quality, caption_word_f1

    refs = ["a dog barks", "a car passes"]
    # 8 test captions: the confident half right, the rest wrong, so the quartiles' F1 rises with confidence
    rows = [("test", "a dog barks" if c >= 0.5 else "birds sing", refs, c)
            for c in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)]
    rows += [("train", "a car passes", refs, None), ("train", "", refs, None), ("val", "x", [], 0.3)]
    q = caption_quality(rows)
    assert set(q) == {"test", "train"}  # val: no reference; the empty caption is not counted
    assert q["train"] == {"n": 1, "word_f1": 1.0}  # no confidence: no quartiles
    assert q["test"]["n"] == 8 and q["test"]["word_f1"] == pytest.approx(0.5)
    assert [b["word_f1"] for b in q["test"]["by_confidence"]] == [0.0, 0.0, 1.0, 1.0]
    assert [(b["min"], b["max"], b["n"]) for b in q["test"]["by_confidence"]] == \
        [(0.1, 0.2, 2), (0.3, 0.4, 2), (0.5, 0.6, 2), (0.7, 0.8, 2)]
    assert caption_word_f1("birds sing", refs) == 0.0
