"""``--cluster``: cluster.yaml is a valid launcher config, and a command really runs as a Ray job on a head.

The head is a separate Ray started here with ``ray start --head --block`` on 127.0.0.1 (own temp dir, so other Ray
users on this machine never attach to it) and stopped by killing only its own process group. Ray 2.59+ turns on
token auth for such a head; the submission must carry the token from ~/.ray/auth_token.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from workflows.cluster import ClusterError, job_env_vars
from tiny_models import write_tone
from workflows.cluster import dashboard_address, strip_cluster_args

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_yaml_is_a_valid_launcher_config():
    import jsonschema
    import ray.autoscaler

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the schema `ray up` checks: unknown keys or wrong types fail here
    with pytest.raises(jsonschema.ValidationError):  # the check is real: a stray top-level key is refused
        jsonschema.validate({**cfg, "hci_atr": {}}, schema)
    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert any("pip install" in c and "hci-atr" in c for c in cfg["setup_commands"])
    assert "dashboard_address" in cfg["metadata"]["hci_atr"]


def test_head_address_from_yaml(tmp_path):
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump({"cluster_name": "t", "provider": {"type": "local", "head_ip": "10.1.2.3",
                                                                        "worker_ips": []}}))
    assert dashboard_address(local) == "http://10.1.2.3:8265"
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(yaml.safe_dump({"provider": {"type": "aws"},
                                        "metadata": {"hci_atr": {"dashboard_address": "127.0.0.1:9999"}}}))
    assert dashboard_address(explicit) == "http://127.0.0.1:9999"
    with pytest.raises(ClusterError, match="no 'provider' section"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("cluster_name: x\n")
        dashboard_address(bad)
    assert strip_cluster_args(["-v", "train", "--cluster", "c.yaml", "--seed", "1", "--cluster=d.yaml"]) == [
        "-v", "train", "--seed", "1"]


def test_job_env_carries_tracking_uri_and_offline_switches():
    from workflows.cluster import job_env_vars

    env = job_env_vars({"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HF_HUB_OFFLINE": "1", "HOME": "/root",
                        "MLFLOW_REGISTRY_URI": ""}, token_mode=True)
    assert env == {"PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "HF_HUB_OFFLINE": "1",
                   "RAY_AUTH_MODE": "token"}
    assert job_env_vars({}) == {"PYTHONUNBUFFERED": "1"}


def test_unreachable_head_is_a_one_line_cluster_error(tmp_path, capsys):
    from workflows.cli import main

    port = _free_port()  # nothing listens there
    cluster = tmp_path / "c.yaml"
    cluster.write_text(yaml.safe_dump({"provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
                                       "metadata": {"hci_atr": {"dashboard_address": f"127.0.0.1:{port}"}}}))
    with pytest.raises(SystemExit) as exc:
        main(["extract-features", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--cluster", str(cluster)])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"cannot reach the Ray head at http://127.0.0.1:{port}" in err[0]


def _unreachable_cluster(tmp_path) -> Path:
    cluster = tmp_path / "c.yaml"
    cluster.write_text(yaml.safe_dump({"provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
                                       "metadata": {"hci_atr": {"dashboard_address": f"127.0.0.1:{_free_port()}"}}}))
    return cluster


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv, expect", [
    (["extract-features", "--data", "/abs/data", "--out", "features"], "--out features: a relative path"),
    (["train", "--features", "feats"], "--features feats: a relative path"),
    # the demo default storage path is relative: checkpoints would vanish with the job's folder
    (["train", "--features", "/mnt/shared/f"], "run.storage_path hci_atr_runs/ray_results: relative"),
    # default tracking store: sqlite:///mlflow.db in the job's temporary folder on the head
    (["train", "--features", "/mnt/shared/f", "--storage-path", "/mnt/shared/runs"], "set MLFLOW_TRACKING_URI"),
])
def test_cluster_refuses_paths_that_would_vanish_before_submitting(tmp_path, capsys, monkeypatch, argv, expect):
    from workflows.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as exc:  # refused here: the (unreachable) head is never contacted
        main([*argv, "--cluster", str(_unreachable_cluster(tmp_path))])
    assert exc.value.code == 2
    line = _one_error(capsys)
    assert expect in line and "cannot reach" not in line


def test_cluster_accepts_absolute_storage_and_a_tracking_server(tmp_path, capsys, monkeypatch):
    from workflows.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@mlflow.internal:5000")
    with pytest.raises(SystemExit):
        main(["train", "--features", "/mnt/shared/f", "--storage-path", "/mnt/shared/runs",
              "--cluster", str(_unreachable_cluster(tmp_path))])
    line = _one_error(capsys)
    assert "cannot reach the Ray head" in line  # got past the checks; no credentials anywhere in the output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///relative.db")
    with pytest.raises(SystemExit):
        main(["train", "--features", "/mnt/shared/f", "--storage-path", "/mnt/shared/runs", "--tracking-uri",
              "https://bob:hunter2@mlflow.internal", "--cluster", str(_unreachable_cluster(tmp_path))])
    out = capsys.readouterr()
    assert "hunter2" not in out.err + out.out


def test_redact_uri_hides_credentials():
    from workflows.cluster import redact_uri

    assert redact_uri("--tracking-uri https://bob:hunter2@host:5000/x") == "--tracking-uri https://***@host:5000/x"
    assert redact_uri("sqlite:////mnt/shared/mlflow.db") == "sqlite:////mnt/shared/mlflow.db"


def test_job_env_forwards_mlflow_auth_variables():
    env = job_env_vars({"MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_TRACKING_USERNAME": "u",
                        "MLFLOW_TRACKING_PASSWORD": "p", "AWS_SECRET_ACCESS_KEY": "never"})
    assert env["MLFLOW_TRACKING_TOKEN"] == "t" and env["MLFLOW_TRACKING_USERNAME"] == "u"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "p" and "AWS_SECRET_ACCESS_KEY" not in env


def test_job_source_ships_a_checkout_or_the_packages_never_the_current_folder(tmp_path, monkeypatch):
    from workflows.cluster import PACKAGES, job_source, project_root

    root = project_root()
    assert root is not None and (root / "pyproject.toml").is_file()  # the tests run from a checkout
    src = job_source()
    assert src["working_dir"] == str(root)
    for secret in (".env", "*.pem", "id_rsa*", ".ssh", ".aws", ".ray", ".netrc"):
        assert secret in src["excludes"]
    # an installed (non-editable) package: no checkout; run from a home folder holding keys
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE")
    monkeypatch.chdir(home)
    import workflows.cluster as cl

    monkeypatch.setattr(cl, "project_root", lambda: None)
    src = cl.job_source()
    assert "working_dir" not in src
    assert sorted(Path(m).name for m in src["py_modules"]) == sorted(PACKAGES)
    assert all(not str(m).startswith(str(home)) for m in src["py_modules"])


@pytest.fixture()
def ray_head():
    """A Ray head on 127.0.0.1 with 1 CPU; yields the dashboard address; killed (own process group) at the end."""
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="hcr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=1", "--num-gpus=0",
         # every other port free too: another Ray on this machine may hold the defaults (e.g. the agent's 52365)
         *[f"--{flag}={_free_port()}" for flag in (
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")],
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    log = []
    try:
        for line in proc.stdout:  # `ray start` prints this once the head (GCS, raylet, dashboard) is up
            log.append(line)
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail("ray start --head failed:\n" + "".join(log[-30:]))
        yield f"127.0.0.1:{dash}"
    finally:
        try:  # a throwaway head: a few seconds to stop, then killed (waiting longer only delays the suite)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
def test_extract_features_runs_as_a_job_on_the_cluster(ray_head, tmp_path, capsys, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    from workflows.cli import main

    uri = f"sqlite:///{tmp_path / 'shared-mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the job must track where the submitting shell tracks

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        write_tone(data / f"t{i}.wav", freq=300.0 + 100 * i, seconds=0.5, sample_rate=16000)
        rows.append({"id": f"t{i}", "audio": f"t{i}.wav", "caption": f"tone {i}"})
    (data / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("audio: {sample_rate: 16000, duration: 0.5, n_mels: 16}\npipeline: {rows_per_shard: 2}\n")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({
        "cluster_name": "test", "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "metadata": {"hci_atr": {"dashboard_address": ray_head}}}))
    out = tmp_path / "features"
    with pytest.raises(SystemExit) as exc:
        main(["extract-features", "--data", str(data / "manifest.jsonl"), "--out", str(out), "--config", str(cfg),
              "--num-workers", "1", "--batch-size", "2", "--cluster", str(cluster)])
    captured = capsys.readouterr()
    printed = captured.out
    assert exc.value.code == 0, printed[-3000:] + captured.err[-2000:]
    assert "submitted job" in printed and "SUCCEEDED" in printed
    assert "features: 4 rows, 0 failed, 2 shards (2 computed)" in printed  # the job's own output, streamed back
    t = pq.read_table(out, schema=None, ignore_prefixes=[".", "_", "errors"])
    assert sorted(t["audio_id"].to_pylist()) == ["t0", "t1", "t2", "t3"]
    assert set(t["n_mels"].to_pylist()) == {16}
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == 4
    from workflows.cluster import _read_token

    token = _read_token()  # the head started above uses token auth when a token exists (as the CLI handles)
    jobs = JobSubmissionClient(f"http://{ray_head}",
                               headers={"Authorization": f"Bearer {token}"} if token else None).list_jobs()
    env = [j.runtime_env.get("env_vars", {}) for j in jobs if (j.metadata or {}).get("hci_atr") == "extract-features"]
    assert env and env[-1]["MLFLOW_TRACKING_URI"] == uri
