"""The ablation workflow: aggregation maths, and a tiny end-to-end run (2 variants x 1 seed, Ray tasks, captions by
the same-seed clip-only model, MLflow parent/child runs, resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from workflows.settings import Settings
from hci_atr.errors import ConfigError
from workflows.ablation import (METRICS, VARIANTS, aggregate, format_csv, format_markdown, parse_variants,
                                variant_config)


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
    table = (out / "table.md").read_text()
    assert table.count("\n") == 4 and "| clip only |" in table and "| clip + AC (fusion, branch, augment) |" in table
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

    # resume: same settings -> nothing retrained, same numbers; another epoch count -> retrained
    again = run_ablation(out, cfg=cfg, demo_size=24, variants="clip,clip_ac", seeds=[0], log_mlflow=False)
    assert again.computed == 0
    assert np.allclose([r["t2a_R1_mean"] for r in again.rows], [r["t2a_R1_mean"] for r in res.rows])
    changed = run_ablation(out, cfg=cfg.override({"train.batch_size": 4}), demo_size=24, variants="clip",
                           seeds=[0], log_mlflow=False)
    assert changed.computed == 1
