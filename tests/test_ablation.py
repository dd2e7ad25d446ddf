"""The ablation workflow: aggregation maths, and a tiny end-to-end run (2 variants x 1 seed, Ray tasks, captions by
the same-seed clip-only model, MLflow parent/child runs, resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from workflows.settings import Settings
from hci_atr.errors import ConfigError
from workflows.report import METRICS, aggregate, format_csv, format_markdown
from workflows.variants import VARIANTS, parse_variants, variant_config


def _fake(t2a_r1: float) -> dict:
    return {"test": {m: (t2a_r1 if m == "t2a_R1" else 50.0) for m in METRICS}}


def test_aggregate_mean_sample_std_and_paired_delta():
    variants = parse_variants("clip,hci")
    results = {("clip", 0): _fake(10.0), ("clip", 1): _fake(20.0), ("clip", 2): _fake(30.0),
               ("hci", 0): _fake(16.0), ("hci", 1): _fake(22.0), ("hci", 2): _fake(40.0)}
    rows = aggregate(results, variants)
    assert [r["variant"] for r in rows] == ["clip", "hci"]
    assert rows[0]["t2a_R1_mean"] == pytest.approx(20.0)
    assert rows[0]["t2a_R1_std"] == pytest.approx(10.0)  # sample std (ddof=1) of 10, 20, 30
    assert rows[1]["t2a_R1_mean"] == pytest.approx(26.0)
    # paired deltas 6, 2, 10 -> mean 6, sample std 4
    assert rows[1]["d_t2a_R1_mean"] == pytest.approx(6.0)
    assert rows[1]["d_t2a_R1_std"] == pytest.approx(4.0)
    md = format_markdown(rows, "clip only")
    assert "| clip only | 20.00 ± 10.00 |" in md and "+6.00 ± 4.00" in md
    csv_lines = format_csv(rows).splitlines()
    assert csv_lines[0].startswith("variant,label,n_seeds,t2a_R1_mean,t2a_R1_std")
    assert csv_lines[2].startswith("hci,HCI (clip + segment + frame),3,26.0000,")


def test_variants_differ_only_in_their_switches():
    base = Settings().override({"train.epochs": 3, "model.audio_width": 8})
    a, b = variant_config(base, VARIANTS["clip"], 1), variant_config(base, VARIANTS["hci_ac"], 1)
    fa, fb = a.flat(), b.flat()
    differ = {k for k in fa if fa[k] != fb[k]}
    assert differ == {"model.use_segment", "model.use_frame", "model.ac_fusion", "model.ac_branch",
                      "model.ac_augment"}
    assert a.train.seed == 1 and a.train.epochs == 3 and b.model.audio_width == 8
    assert VARIANTS["clip_ac"].uses_captions and not VARIANTS["hci"].uses_captions
    with pytest.raises(ConfigError, match="unknown ablation variant"):
        parse_variants("clip,nope")


def _with_outcomes(t2a_r1: float, t2a: np.ndarray, a2t: np.ndarray, queries: str = "q") -> dict:
    return {"test": {m: (t2a_r1 if m == "t2a_R1" else 50.0) for m in METRICS},
            "per_query": {"t2a_R1": t2a.astype(int).tolist(), "a2t_R1": a2t.astype(int).tolist(), "queries": queries},
            "best_epoch": 3, "epochs_run": 8}


def test_paired_intervals_are_the_bootstrap_of_the_concatenated_per_query_outcomes():
    from hci_atr.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    out = {(v, s): (rng.random(40) < p, rng.random(8) < p)
           for v, p in (("clip", 0.3), ("hci", 0.6)) for s in (0, 1)}
    out[("clip", 2)] = (rng.random(40) < 0.3, rng.random(8) < 0.3)  # a seed only the baseline has: not paired
    results = {k: _with_outcomes(float(t.mean() * 100), t, a) for k, (t, a) in out.items()}
    rows = aggregate(results, parse_variants("clip,hci"))
    base, hci = rows
    assert base["baseline"] and "d_t2a_R1_lo" not in base
    for m, i in (("t2a_R1", 0), ("a2t_R1", 1)):
        a = np.concatenate([out[("clip", 0)][i], out[("clip", 1)][i]]).astype(float) * 100
        b = np.concatenate([out[("hci", 0)][i], out[("hci", 1)][i]]).astype(float) * 100
        want = paired_bootstrap(a, b)
        assert hci[f"d_{m}_diff"] == pytest.approx(want["diff"]) == pytest.approx((b - a).mean())
        assert (hci[f"d_{m}_lo"], hci[f"d_{m}_hi"], hci[f"d_{m}_n"]) == \
            pytest.approx((want["lo"], want["hi"], len(a)))
        assert hci[f"d_{m}_lo"] < hci[f"d_{m}_diff"] < hci[f"d_{m}_hi"]
    md = format_markdown(rows, "clip only")
    head = md.splitlines()[0]
    assert "Δ T2A R@1 vs clip only, 95 % CI (seed × query)" in head and "Δ A2T R@1 vs clip only, 95 % CI" in head
    cell = f"{hci['d_t2a_R1_diff']:+.2f} [{hci['d_t2a_R1_lo']:+.2f}, {hci['d_t2a_R1_hi']:+.2f}]"
    assert cell in md.splitlines()[3] and "| baseline |" in md.splitlines()[2]
    assert "| 3/8, 3/8, 3/8 |" in md  # best / last epoch per seed
    header = format_csv(rows).splitlines()[0].split(",")
    assert {"d_t2a_R1_diff", "d_t2a_R1_lo", "d_t2a_R1_hi", "d_a2t_R1_lo", "d_a2t_R1_hi"} <= set(header)
    # outcomes of different test queries never pair up
    results[("hci", 1)]["per_query"]["queries"] = "other"
    with pytest.raises(ConfigError, match="different test queries"):
        aggregate(results, parse_variants("clip,hci"))


def test_pair_accuracy_columns_appear_when_pairs_exist():
    variants = parse_variants("clip,hci")

    def doc(acc_order, acc_attr):
        d = _fake(10.0)
        d["test"].update({"pairs_acc": (acc_order + acc_attr) / 2, "pairs_n": 5.0, "pairs_order_acc": acc_order,
                          "pairs_order_n": 3.0, "pairs_attribute_acc": acc_attr, "pairs_attribute_n": 2.0})
        return d

    results = {("clip", 0): doc(0.5, 0.6), ("clip", 1): doc(0.7, 0.6), ("hci", 0): doc(0.9, 0.5),
               ("hci", 1): doc(0.8, 0.7)}
    rows = aggregate(results, variants)
    assert rows[0]["pairs_order_acc_mean"] == pytest.approx(0.6)
    assert rows[0]["pairs_order_acc_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    md = format_markdown(rows, "clip only")
    head = md.splitlines()[0]
    assert "| all pairs (n=5) |" in head and "| order pairs (n=3) |" in head and "attribute pairs (n=2)" in head
    assert "| 0.600 ± 0.141 |" in md.splitlines()[2]
    header = format_csv(rows).splitlines()[0].split(",")
    assert {"pairs_order_acc_mean", "pairs_order_acc_std", "pairs_order_n"} <= set(header)
    # no pairs, no pair columns
    plain = format_markdown(aggregate({("clip", 0): _fake(1.0)}, variants[:1]))
    assert "pairs" not in plain


def test_compositional_preset_resolves_to_its_settings(tmp_path, monkeypatch):
    """`hci-atr ablate --preset compositional`: the run it asks for (run_ablation stubbed; nothing trains)."""
    import click

    from hci_atr.data.demo import _split_sizes
    from workflows import ablation
    from workflows.cli import ablate_cmd, main

    calls = []

    def fake_run(out_dir, **kw):
        calls.append({"out_dir": out_dir, **kw})
        return ablation.AblationResult(str(out_dir), [], {}, "table")

    monkeypatch.setattr(ablation, "run_ablation", fake_run)
    main(["ablate", "--preset", "compositional", "--no-mlflow"])
    kw = calls[-1]
    cfg = kw["cfg"]
    assert kw["demo_size"] == 2000 and _split_sizes(2000)["test"] >= 300
    assert kw["demo_pairs_in_split"] is True
    assert cfg.audio.duration == 5.0 and cfg.model.audio_width == 8
    assert cfg.train.epochs == 40 and cfg.train.early_stopping_patience == 4
    assert list(kw["variants"]) == ["clip", "hci", "hci_order", "hci_event", "hci_order_hard", "hci_order_text2"]
    assert kw["out_dir"] == "hci_atr_runs/ablation-compositional"
    order = variant_config(cfg, VARIANTS["hci_order"], 0).model
    assert (order.use_segment, order.use_frame, order.temporal_context, order.segment_order, order.fusion) == \
        (True, True, "gru", "position_bias", "calibrated") and order.hard_negatives == "none"
    event = variant_config(cfg, VARIANTS["hci_event"], 0).model
    assert (event.temporal_context, event.segment_order, event.fusion, event.hard_negatives) == \
        ("gru", "event_bias", "calibrated", "none")
    hard = variant_config(cfg, VARIANTS["hci_order_hard"], 0).model
    assert (hard.temporal_context, hard.hard_negatives, hard.hard_negative_weight) == ("gru", "both", 0.5)
    clip = variant_config(cfg, VARIANTS["clip"], 0).model
    assert not clip.use_segment and clip.temporal_context == "none" and clip.hard_negatives == "none"
    # the AC uses one at a time, and the old scoring of the extra pairs, each its own row
    ac = {n: variant_config(cfg, VARIANTS[n], 0).model for n in
          ("hci_acfusion", "hci_acbranch", "hci_acaugment", "hci_acfusionbranch", "hci_ac", "hci_ac_fusedpairs")}
    assert {n: (m.ac_fusion, m.ac_branch, m.ac_augment, m.ac_augment_audio) for n, m in ac.items()} == {
        "hci_acfusion": (True, False, False, "unfused"), "hci_acbranch": (False, True, False, "unfused"),
        "hci_acaugment": (False, False, True, "unfused"), "hci_acfusionbranch": (True, True, False, "unfused"),
        "hci_ac": (True, True, True, "unfused"),
        "hci_ac_fusedpairs": (True, True, True, "fused")}
    assert all(m.use_segment and m.use_frame and m.freeze_text for m in ac.values())
    # the text tower: frozen in every row but the two that train it (its top 2 layers, or all)
    for name, layers in (("hci_order_text2", 2), ("hci_order_textall", -1), ("hci_order_hard_text2", 2)):
        tv = variant_config(cfg, VARIANTS[name], 0)
        assert not tv.model.freeze_text and tv.train.text_train_layers == layers and tv.model.segment_order == \
            "position_bias"
    # ... and on plain HCI (no order switches): what a default with the text tower's top 2 layers would train
    tv = variant_config(cfg, VARIANTS["hci_text2"], 0)
    assert (not tv.model.freeze_text, tv.train.text_train_layers, tv.model.segment_order, tv.model.temporal_context,
            tv.model.use_segment, tv.model.use_frame) == (True, 2, "none", "none", True, True)
    assert all(variant_config(cfg, v, 0).model.freeze_text for n, v in VARIANTS.items() if "_text" not in n)
    # flags win over the preset; without a preset nothing of it applies
    main(["ablate", "--preset", "compositional", "--epochs", "10", "--size", "400", "--variants", "clip,hci",
          "--out", str(tmp_path / "o"), "--no-mlflow"])
    kw = calls[-1]
    assert kw["cfg"].train.epochs == 10 and kw["cfg"].train.early_stopping_patience == 4
    assert kw["demo_size"] == 400 and kw["variants"] == "clip,hci" and kw["out_dir"] == str(tmp_path / "o")
    main(["ablate", "--no-mlflow"])
    kw = calls[-1]
    assert kw["demo_size"] == 240 and kw["demo_pairs_in_split"] is False and kw["variants"] is None
    assert kw["cfg"].train.early_stopping_patience == 0 and kw["out_dir"] == "hci_atr_runs/ablation"
    from workflows import variants as defs

    assert [v.name for v in parse_variants(None)] == list(defs.DEFAULT_VARIANTS)  # the order variants are opt-in
    choice = next(o for o in ablate_cmd.params if o.name == "preset").type
    assert isinstance(choice, click.Choice) and list(choice.choices) == list(defs.PRESETS)


def test_demo_table_has_pair_accuracy_columns():
    from workflows.demo import format_table

    m = {**_fake(10.0)["test"], "pairs_acc": 0.6, "pairs_n": 5.0, "pairs_order_acc": 0.5, "pairs_order_n": 1.0}
    md, csv_text = format_table({"clip": m, "hci": m})
    assert "order pairs" in md.splitlines()[0] and "pairs_order_acc" in csv_text.splitlines()[0]


@pytest.mark.ray
def test_tiny_ablation_end_to_end(ray_session, tmp_path, tiny_text_dir):
    import mlflow

    from workflows.ablation import run_ablation

    cfg = Settings().override({"model.text_encoder": str(tiny_text_dir), "model.audio_width": 4, "model.embed_dim": 32,
                             "model.max_words": 16, "train.epochs": 1, "train.batch_size": 8,
                             "audio.duration": 2.0, "pipeline.num_workers": 1})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "abl"
    res = run_ablation(out, cfg=cfg, demo_size=24, variants="clip,clip_ac", seeds=[0], tracking_uri=uri,
                       experiment="abl-test")
    assert [r["variant"] for r in res.rows] == ["clip", "clip_ac"]
    assert res.computed == 2
    for r in res.rows:
        assert r["seeds"] == [0]
        for m in METRICS:
            v = r[f"{m}_mean"]
            assert math.isfinite(v) and 0.0 <= v <= 100.0, (r["variant"], m, v)
            assert r[f"{m}_std"] == 0.0  # one seed
    # R@1 <= R@5 <= R@10; with 4 test clips every text finds its clip within the top 10 (T2A R@10 = 100 %)
    for (name, seed), doc in res.results.items():
        t = doc["test"]
        assert t["t2a_R1"] <= t["t2a_R5"] <= t["t2a_R10"]
        assert t["n_audio"] == 4.0 and t["n_text"] == 20.0 and t["t2a_R10"] == 100.0
    # each run kept its per-query R@1 outcomes (what the intervals resample) and scored the demo's test pairs
    pairs = json.loads((out / "demo_24x2s_32000hz_seed0" / "demo_pairs.json").read_text())
    for (name, seed), doc in res.results.items():
        pq = doc["per_query"]
        assert len(pq["t2a_R1"]) == 20 and len(pq["a2t_R1"]) == 4
        assert np.mean(pq["t2a_R1"]) * 100 == pytest.approx(doc["test"]["t2a_R1"])
        assert np.mean(pq["a2t_R1"]) * 100 == pytest.approx(doc["test"]["a2t_R1"])
        assert doc["test"]["pairs_n"] == sum(p["split"] == "test" for p in pairs)
        assert doc["epochs_run"] == 1 and doc["best_epoch"] == 0 and not doc["stopped_early"]
    assert res.rows[1]["d_t2a_R1_n"] == 20 and res.rows[1]["d_a2t_R1_n"] == 4
    table = (out / "table.md").read_text()
    assert table.count("\n") == 4 and "| clip only |" in table and "| clip + AC (fusion, branch, augment) |" in table
    assert "95 % CI (seed × query)" in table.splitlines()[0]
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # captions: written by the seed-0 clip-only model, never a clip's own reference caption
    caps = json.loads((out / "captions" / "seed0.json").read_text())
    assert caps["model_variant"] == "clip" and caps["seed"] == 0 and caps["bank_split"] == "train"
    from hci_atr.data.shards import read_split_rows

    rows = {r["audio_id"]: r for s in ("train", "val", "test") for r in read_split_rows(out / "features", s)}
    train_caps = {c for r in rows.values() if r["split"] == "train" for c in r["captions"]}
    assert len(caps["captions"]) == 24
    for aid, c in caps["captions"].items():
        assert c not in rows[aid]["captions"]  # leave-one-out
        assert c in train_caps  # only the training split's captions are in the bank
    assert res.results[("clip_ac", 0)]["caption_source"]["model_variant"] == "clip"

    # MLflow: one parent, one child per variant x seed, child metrics equal the JSON results
    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name("abl-test")
    runs = c.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == res.parent_run_id][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert sorted(r.info.run_name for r in children) == ["clip-seed0", "clip_ac-seed0"]
    for ch in children:
        v = ch.data.tags["ablation.variant"]
        assert ch.data.metrics["test_t2a_R1"] == pytest.approx(res.results[(v, 0)]["test"]["t2a_R1"])
    assert parent.data.metrics["clip.t2a_R1_mean"] == pytest.approx(res.rows[0]["t2a_R1_mean"])
    for k in ("d_t2a_R1_diff", "d_t2a_R1_lo", "d_t2a_R1_hi", "d_a2t_R1_lo", "d_a2t_R1_hi"):
        assert parent.data.metrics[f"clip_ac.{k}"] == pytest.approx(res.rows[1][k])

    # resume: same settings -> nothing retrained, same numbers; another epoch count -> retrained
    again = run_ablation(out, cfg=cfg, demo_size=24, variants="clip,clip_ac", seeds=[0], log_mlflow=False)
    assert again.computed == 0
    assert np.allclose([r["t2a_R1_mean"] for r in again.rows], [r["t2a_R1_mean"] for r in res.rows])
    changed = run_ablation(out, cfg=cfg.override({"train.batch_size": 4}), demo_size=24, variants="clip",
                           seeds=[0], log_mlflow=False)
    assert changed.computed == 1


def test_caption_folds_are_seeded_equal_and_cover_every_clip():
    from workflows.ablation_tasks import caption_folds

    ids = [f"c{i:02d}" for i in range(11)]
    f = caption_folds(ids, 3, seed=0)
    assert set(f) == set(ids) and sorted(np.bincount(list(f.values()))) == [3, 4, 4]
    assert caption_folds(list(reversed(ids)), 3, seed=0) == f  # input order does not matter
    assert caption_folds(ids, 3, seed=1) != f


@pytest.mark.ray
def test_cross_fitted_captions_come_from_models_that_never_saw_the_clip(ray_session, tmp_path, tiny_text_dir):
    """--ac-folds 2: two more caption models per seed, each trained on the other fold's training clips; every clip
    is captioned (training clips by their fold's model from the other fold's bank, the rest by the full model)."""
    from hci_atr.data.shards import read_split_rows
    from workflows.ablation import run_ablation
    from workflows.ablation_tasks import caption_folds

    cfg = Settings().override({"model.text_encoder": str(tiny_text_dir), "model.audio_width": 4, "model.embed_dim": 32,
                               "model.max_words": 16, "train.epochs": 1, "train.batch_size": 4,
                               "audio.duration": 2.0, "pipeline.num_workers": 1})
    out = tmp_path / "abl"
    with pytest.raises(ConfigError, match="ac-folds"):
        run_ablation(out, cfg=cfg, demo_size=24, variants="clip_ac", seeds=[0], log_mlflow=False, ac_folds=0)
    res = run_ablation(out, cfg=cfg, demo_size=24, variants="clip_ac", seeds=[0], log_mlflow=False, ac_folds=2)
    caps = json.loads((out / "captions" / "seed0.json").read_text())
    assert caps["folds"] == 2 and len(caps["captions"]) == 24 and not caps["errors"]
    assert res.results[("clip_ac", 0)]["caption_source"]["folds"] == 2
    for f in range(2):
        assert (out / "caption_models" / f"clip_seed0_fold{f}of2" / "config.yaml").is_file()
    train = read_split_rows(out / "features", "train")
    fold = caption_folds([r["audio_id"] for r in train], 2, 0)
    by_fold = [{c for r in train if fold[r["audio_id"]] == f for c in r["captions"]} for f in range(2)]
    for r in train:  # a training clip's caption is one of the other fold's captions
        assert caps["captions"][r["audio_id"]] in by_fold[1 - fold[r["audio_id"]]]


def test_epoch_line_says_the_best_epoch_and_how_close_early_stopping_is():
    from types import SimpleNamespace as NS

    from workflows.ablation_tasks import epoch_line

    end = NS(epoch=5, stop=False, metrics={"loss_total": 2.1234, "val_rsum": 250.12, "epoch_seconds": 61.2},
             state=NS(best_rsum=251.0, best_epoch=3, bad_epochs=2))
    assert epoch_line("hci seed 0", end, 40, 4) == \
        "hci seed 0: epoch 6/40 loss 2.123, val R-sum 250.1 (best 251.0 at epoch 4, 2/4 without a better one), 61 s"
    end.stop, end.state.bad_epochs = True, 4
    assert epoch_line("hci seed 0", end, 40, 4).endswith("4/4 without a better one), 61 s - stopping early")
    end.state.bad_epochs = 0
    assert "without" not in epoch_line("clip seed 1", end, 40, 0)


def test_switches_added_later_leave_the_key_of_a_run_without_them_unchanged():
    """A run's key is the hash of its config as it was before the neutral switches existed (so published results
    still resume); the same switch on enters the key."""
    import hashlib
    import json

    from workflows.ablation import KEY_NEUTRAL, LOOP_RULES, config_key
    from workflows.settings import Settings

    cfg = variant_config(Settings(), VARIANTS["hci"], 0)
    before = cfg.to_dict()
    for section, fields in KEY_NEUTRAL.items():
        for name in fields:
            del before[section][name]
    blob = json.dumps({"config": before, "loop": LOOP_RULES, "data": "x"}, sort_keys=True, default=str)
    assert config_key(cfg, {"data": "x"}) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    mined = variant_config(Settings(), VARIANTS["hci_mined"], 0)
    assert mined.train.batch_mining == "text" and config_key(mined) != config_key(cfg)
    assert config_key(mined.override({"train.batch_mining_group": 3})) != config_key(mined)
    assert variant_config(Settings(), VARIANTS["hci_event_mined"], 0).model.segment_order == "event_bias"
