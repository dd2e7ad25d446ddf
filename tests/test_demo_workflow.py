"""`hci-atr demo` end to end at the smallest size: every stage runs for real (Ray Data, Ray Train, MLflow), the table
has the three variants with sane numbers, and a re-run resumes by skipping every finished stage."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_runs_end_to_end_and_resumes(ray_session, tmp_path):
    from workflows.demo import DEMO_VARIANTS, DemoSettings, run_demo

    s = DemoSettings(str(tmp_path / "runs"), seed=1, size=24, quick=True,
                     overrides=(("train.epochs", 1), ("train.batch_size", 6)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list[str] = []
    out = run_demo(s, tracking_uri=uri, echo=lines.append, progress=False)

    # every stage announced, in order
    assert [ln.split("]")[0] for ln in lines if ln.startswith("[")] == [f"[{i}/7" for i in range(1, 8)]
    # three variants, every metric a percentage
    assert set(out["results"]) == set(DEMO_VARIANTS)
    for metrics in out["results"].values():
        for k in ("t2a_R1", "t2a_R5", "t2a_R10", "t2a_mAP10", "a2t_R1", "a2t_R10"):
            assert 0.0 <= metrics[k] <= 100.0 and not math.isnan(metrics[k])
        assert metrics["t2a_R1"] <= metrics["t2a_R5"] <= metrics["t2a_R10"]
    # each variant was scored on the demo's own hard-negative pairs that lie in the test split
    pairs = json.loads((tmp_path / "runs" / "demo_data" / "demo_pairs.json").read_text())
    n_test = sum(p["split"] == "test" for p in pairs)
    for metrics in out["results"].values():
        assert metrics["pairs_n"] == n_test
        assert ("pairs_acc" in metrics) == (n_test > 0)
    rows = [ln for ln in out["table"].splitlines() if ln.startswith("| ") and "model" not in ln]
    assert len(rows) == 3 and rows[0].startswith("| clip only")
    work = tmp_path / "runs"
    for name in ("clip", "hci", "hci_ac"):
        assert (work / "models" / name / "config.yaml").is_file()
    assert (work / "demo_results.csv").read_text().count("\n") == 4
    assert any((work / "index").iterdir())
    # the AC model really was trained with AC on, the baseline with only the clip level
    import yaml

    ac = yaml.safe_load((work / "models" / "hci_ac" / "config.yaml").read_text())["model"]
    base = yaml.safe_load((work / "models" / "clip" / "config.yaml").read_text())["model"]
    assert ac["ac_fusion"] and ac["ac_branch"] and ac["ac_augment"]
    assert base["use_clip"] and not base["use_segment"] and not base["use_frame"]
    # test metrics were logged into each variant's MLflow run
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    for name, run_id in out["runs"].items():
        assert "test_t2a_R1" in client.get_run(run_id).data.metrics

    # re-run: every stage is skipped, the same numbers come back
    again: list[str] = []
    out2 = run_demo(s, tracking_uri=uri, echo=again.append, progress=False)
    assert out2["results"] == out["results"]
    assert not any("MLflow run" in ln for ln in again)  # no training happened
    marker = json.loads((work / "stages" / "train_hci.json").read_text())
    assert marker["result"]["run_id"] == out["runs"]["hci"]
