"""Fault injection: processes killed at random points must leave a state that a re-run finishes exactly.

- training driver: ``hci-atr train`` as a subprocess, SIGKILLed (with its local Ray) once the first checkpoint is on
  disk; the same command again resumes in the same MLflow run and continues the epochs. (A Ray Train *worker* killed
  mid-epoch is covered by tests/test_train.py::test_killed_worker_is_survived.)
- pipelines: ``hci-atr extract-features`` and ``hci-atr caption-all`` as subprocesses, SIGKILLed when k shards exist
  (k drawn from a seeded RNG, several interruptions in a row); a re-run gives exactly one row per clip, no temp files.
- multi-node: a head and a second node (``ray.cluster_utils.Cluster`` on 127.0.0.1, in its own subprocess so it does
  not meet the session's Ray); the second node is removed during extract-features; the job completes, one row per clip.
- serving: a Serve replica is killed under load; requests after recovery succeed and the status says so.

Waiting is done by polling the file system / Serve status with a deadline, never by fixed sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest

from tests.reliability_helpers import free_port, start_serve, temp_files, tiny_model_and_index

pytestmark = [pytest.mark.faults, pytest.mark.ray]

HCI = str(Path(sys.executable).with_name("hci-atr"))
ROOT = Path(__file__).resolve().parents[1]


def wait_until(cond: Callable[[], object], timeout: float, what: str, poll: float = 0.02, proc=None):
    """Poll ``cond`` until it is truthy (returns its value); fail after ``timeout`` s or if ``proc`` exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before: {what}\n{out[-3000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (from /proc), e.g. the local Ray a killed driver started."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (its local Ray: GCS, raylet, workers), all at once, as a
    crashed machine or an OOM kill would."""
    pids = [proc.pid, *_descendants(proc.pid)]
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    for p in pids:  # reap-free check: wait until the kernel has removed them (zombies of init count as gone)
        wait_until(lambda p=p: not Path(f"/proc/{p}").exists() or "Z" in _state(p), 30, f"pid {p} gone")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def spawn(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([HCI, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


# ---------------------------------------------------------------------------------------------------------------
# shared data: a 36-clip demo set at 16 kHz / 2 s
# ---------------------------------------------------------------------------------------------------------------

N_CLIPS = 36


@pytest.fixture(scope="module")
def fdata(tmp_path_factory):
    from hci_atr.data.demo import make_demo

    root = tmp_path_factory.mktemp("faults")
    make_demo(root / "data", seed=1, size=N_CLIPS, duration=2.0, sample_rate=16000, progress=False)
    # one row per shard and per batch: results stream back row by row, so a kill lands between shards
    (root / "pipe.yaml").write_text("audio:\n  sample_rate: 16000\n  duration: 2.0\n"
                                    "pipeline:\n  rows_per_shard: 1\n  batch_size: 1\n  num_workers: 1\n")
    return root


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def _interrupt_chain(argv: list[str], out: Path, cwd: Path, seed: int, kills: int, n_shards: int) -> list[int]:
    """Run ``argv`` ``kills`` times, each SIGKILLed when its k-th new shard appears (k random, seeded); returns the
    shard counts seen at each kill."""
    rng = random.Random(seed)
    seen = []
    for _ in range(kills):
        have = len(_parts(out))
        k = have + rng.randint(1, max(1, (n_shards - have) // 3))
        proc = spawn(argv, cwd)
        try:
            wait_until(lambda: len(_parts(out)) >= k, 240, f"{k} shards in {out}", proc=proc)
        finally:
            kill_tree(proc)
        seen.append(len(_parts(out)))
        assert not (out / "_SUCCESS").exists(), "the run finished before it was killed; the test proves nothing"
    return seen


def _one_row_per_clip(out: Path, ids: list[str]) -> None:
    t = pq.read_table(_parts(out))
    got = t.column("audio_id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    assert (out / "_SUCCESS").is_file() and not temp_files(out)


@pytest.fixture(scope="module")
def interrupted_features(ray_session, fdata):
    """extract-features killed 3 times at random shard counts, then re-run (in-process, the same command)."""
    from workflows.cli import main
    from hci_atr.data.formats import read_dataset

    out = fdata / "feats"
    argv = ["extract-features", "--data", str(fdata / "data"), "--out", str(out), "--config",
            str(fdata / "pipe.yaml")]
    seen = _interrupt_chain(argv, out, fdata, seed=0, kills=3, n_shards=N_CLIPS)
    # bytes and inode of every finished shard: "kept" means the same file, not only the same time stamp
    before = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino) for p in _parts(out)}
    try:
        main(argv)
    except SystemExit as e:
        assert not e.code
    ids = [r.audio_id for r in read_dataset(fdata / "data")]
    return {"out": out, "seen": seen, "before": before, "ids": ids}


def test_extract_features_survives_random_kills(interrupted_features):
    f = interrupted_features
    assert f["seen"] == sorted(f["seen"]) and f["seen"][-1] < N_CLIPS
    _one_row_per_clip(f["out"], f["ids"])
    manifest = json.loads((f["out"] / "_SUCCESS").read_text())
    assert manifest["rows"] == N_CLIPS and manifest["failed"] == 0
    # shards finished before the last kill were kept as they were, not recomputed
    after = {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino) for p in _parts(f["out"])}
    assert f["before"] and all(after[n] == kept for n, kept in f["before"].items())
    print(f"\nextract-features: killed at {f['seen']} of {N_CLIPS} shards; re-run computed "
          f"{N_CLIPS - len(f['before'])}; {manifest['rows']} rows, one per clip")


def test_caption_all_survives_random_kills(interrupted_features, fdata, demo_root, tiny_text_dir):
    """caption-all (nearest backend, an untrained tiny model over the features above), killed twice, re-run."""
    from workflows.cli import main

    model_dir, _, _ = tiny_model_and_index(demo_root, tiny_text_dir, fdata / "model_for_captions")
    out = fdata / "caps"
    argv = ["caption-all", "--data", str(fdata / "data"), "--out", str(out), "--config", str(fdata / "pipe.yaml"),
            "--captioner", "nearest", "--model", str(model_dir), "--features", str(interrupted_features["out"])]
    seen = _interrupt_chain(argv, out, fdata, seed=1, kills=2, n_shards=N_CLIPS)
    try:
        main(argv)
    except SystemExit as e:
        assert not e.code
    _one_row_per_clip(out, interrupted_features["ids"])
    caps = pq.read_table(_parts(out)).column("generated_caption").to_pylist()
    assert all(isinstance(c, str) and c for c in caps)
    print(f"\ncaption-all: killed at {seen} of {N_CLIPS} shards; re-run gave one caption per clip")


# ---------------------------------------------------------------------------------------------------------------
# training driver killed after the first checkpoint
# ---------------------------------------------------------------------------------------------------------------


def test_killed_training_driver_resumes_in_the_same_mlflow_run(interrupted_features, fdata, tiny_text_dir):
    from mlflow import MlflowClient

    epochs = 3
    work = fdata / "train"
    work.mkdir()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    argv = ["train", "--features", str(interrupted_features["out"]), "--epochs", str(epochs), "--batch-size", "4",
            "--num-workers", "1", "--storage-path", str(work / "runs"), "--run-name", "crash", "--tracking-uri", uri,
            "--text-encoder", str(tiny_text_dir), "--audio-width", "8", "--embed-dim", "32", "--seed", "0",
            "--registered-model", "faults-tiny", "--config", str(fdata / "pipe.yaml")]
    run_dir = work / "runs" / "crash"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"

    def first_checkpoint_recorded():
        # Ray Train records a checkpoint in this snapshot after the checkpoint directory is complete
        if not snapshot.is_file():
            return False
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
        except (json.JSONDecodeError, OSError):  # being rewritten
            return False

    proc = spawn(argv, work)
    try:
        wait_until(first_checkpoint_recorded, 420, "the first checkpoint", poll=0.05, proc=proc)
    finally:
        kill_tree(proc)
    first_id = json.loads((run_dir / "hci_atr_run.json").read_text())["mlflow_run_id"]
    c = MlflowClient(uri)
    assert c.get_run(first_id).info.status == "RUNNING"  # the killed driver never ended it
    done_before = sorted({m.step for m in c.get_metric_history(first_id, "val_rsum")})
    assert done_before and done_before[0] == 0 and len(done_before) < epochs

    proc = spawn(argv, work)
    out, _ = proc.communicate(timeout=540)
    assert proc.returncode == 0, out[-3000:]
    assert f"MLflow run {first_id} (resumed)" in out and f"MLflow run: {first_id}" in out
    run = c.get_run(first_id)
    assert run.info.status == "FINISHED"
    logged = c.get_metric_history(first_id, "loss_total")
    steps = [m.step for m in logged]
    # every epoch logged once in the one run: an epoch that was logged but not yet checkpointed when the driver died
    # is trained again after the resume, but not logged again
    assert sorted(steps) == list(range(epochs)), steps
    import torch

    meta = {p.parent: json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/meta.json")}
    latest = max(meta, key=lambda d: meta[d]["epoch"])
    assert meta[latest]["epoch"] == epochs - 1 and all(m["mlflow_run_id"] == first_id for m in meta.values())
    history = torch.load(latest / "train_state.pt", map_location="cpu", weights_only=False)["history"]
    assert [int(h["epoch"]) for h in history] == list(range(epochs))
    starts = [int(h["start_epoch"]) for h in history]
    assert starts[0] == 0 and starts[-1] >= 1  # the last epochs ran in the resumed driver, from a checkpoint
    assert len(c.search_runs([run.info.experiment_id])) == 1  # no second run was opened
    print(f"\ntrain: driver killed after epoch(s) {done_before} were logged; re-run resumed run {first_id} and "
          f"finished epochs {sorted(set(steps))} (start_epoch per epoch {starts}; trained twice, logged once: "
          f"{[e for e in done_before if e >= starts[-1]]})")


# ---------------------------------------------------------------------------------------------------------------
# multi-node: remove the second node during extract-features
# ---------------------------------------------------------------------------------------------------------------

MULTINODE_SCRIPT = textwrap.dedent('''
    import json, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster

    data, out, cfg_path, k = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    # A connecting driver rewrites a loopback bootstrap address to the machine's interface address, where this
    # loopback-only cluster does not listen; keep the address as given.
    import ray._private.services as services
    services.resolve_ip_for_localhost = lambda host: host
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster.wait_for_nodes()
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    removed = {}

    def remove_when_k_shards():
        end = time.monotonic() + 300
        while time.monotonic() < end and len(list(out.glob("part-*.parquet"))) < k:
            time.sleep(0.02)
        removed["at_shards"] = len(list(out.glob("part-*.parquet")))
        cluster.remove_node(worker, allow_graceful=False)  # SIGKILLs the node's raylet and its workers
        end = time.monotonic() + 120  # the GCS marks it dead after missed heartbeats
        while time.monotonic() < end and len([n for n in ray.nodes() if n["Alive"]]) > 1:
            time.sleep(0.2)
        removed["alive_after"] = len([n for n in ray.nodes() if n["Alive"]])

    t = threading.Thread(target=remove_when_k_shards, daemon=True)
    t.start()
    from workflows.settings import load_settings
    from workflows.features import extract_features
    m = extract_features(data, out, cfg=load_settings(cfg_path), progress=False)
    t.join(timeout=150)
    print("RESULT " + json.dumps({"manifest": {k: m[k] for k in ("rows", "failed", "shards")}, **removed}))
    ray.shutdown()
    cluster.shutdown()
''')


def test_node_removed_during_extract_features(fdata, interrupted_features, tmp_path):
    """Two 1-CPU nodes, one feature actor on each; the non-head node is killed after a few shards. Ray Data restarts
    the lost actor's work on the surviving node; the output has exactly one row per clip."""
    script = tmp_path / "multinode.py"
    script.write_text(MULTINODE_SCRIPT)
    cfg = tmp_path / "mn.yaml"
    cfg.write_text("audio:\n  sample_rate: 16000\n  duration: 2.0\npipeline:\n  rows_per_shard: 1\n"
                   "  batch_size: 1\n  num_workers: 2\n")
    out = tmp_path / "feats"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, str(script), str(fdata / "data"), str(out), str(cfg), "6"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 0, text[-4000:]
    res = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
    assert res["alive_after"] == 1 and res["at_shards"] < N_CLIPS
    assert res["manifest"] == {"rows": N_CLIPS, "failed": 0, "shards": N_CLIPS}
    _one_row_per_clip(out, interrupted_features["ids"])
    print(f"\nmulti-node: worker node removed at {res['at_shards']} of {N_CLIPS} shards; {res['manifest']}")


# ---------------------------------------------------------------------------------------------------------------
# serving: kill a replica under load
# ---------------------------------------------------------------------------------------------------------------


def _replicas() -> list[tuple[str, str]]:
    """(namespace, name) of the live Serve replica actors of the app (GCS named-actor table; no dashboard needed)."""
    import ray

    return sorted((a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)
                  if "SearchDeployment" in a["name"] and "REPLICA" in a["name"].upper())


def _running_replicas() -> int:
    from ray import serve

    st = serve.status().applications.get("hci-atr")
    if st is None or st.status != "RUNNING":
        return 0
    dep = st.deployments["SearchDeployment"]
    return int(dep.replica_states.get("RUNNING", 0)) if dep.status == "HEALTHY" else 0


def test_killed_replica_under_load(ray_session, demo_root, tiny_text_dir, tmp_path):
    import httpx
    import ray
    from ray import serve

    from serve.app import build

    model_dir, index_dir, records = tiny_model_and_index(demo_root, tiny_text_dir, tmp_path)
    port = free_port()
    start_serve(port)
    serve.run(build({"model": str(model_dir), "index": str(index_dir), "replicas": "2"}), name="hci-atr",
              route_prefix="/")
    try:
        wait_until(lambda: _running_replicas() == 2, 120, "2 running replicas", poll=0.2)
        victim = _replicas()[0]
        stop = threading.Event()
        codes: list[int] = []

        def load():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                i = 0
                while not stop.is_set():
                    try:
                        r = c.post("/search/text", json={"query": records[i % len(records)].captions[0],
                                                         "top_k": 5})
                        codes.append(r.status_code)
                    except httpx.HTTPError:
                        codes.append(-1)
                    i += 1

        threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(codes) >= 20, 120, "20 requests before the kill", poll=0.05)
        n_before = len(codes)
        ray.kill(ray.get_actor(victim[1], namespace=victim[0]), no_restart=True)
        wait_until(lambda: victim not in _replicas(), 60, "the replica is dead", poll=0.1)
        # the controller notices and starts a replacement; status says 2 running only once it is up
        saw_degraded = []  # what serve.status() said while the replica was being replaced

        def recovered():
            n = _running_replicas()
            saw_degraded.append(n < 2)
            return n == 2 and len(_replicas()) == 2 and victim not in _replicas()

        wait_until(recovered, 180, "a replacement replica", poll=0.2)
        n_recovered = len(codes)
        wait_until(lambda: len(codes) >= n_recovered + 40, 180, "40 requests after recovery", poll=0.05)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        during = codes[n_before:n_recovered]
        after = codes[n_recovered:]
        assert all(c == 200 for c in codes[:n_before])
        assert after and all(c == 200 for c in after), after
        h = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["n_clips"] == len(records)
        # health tells the truth: with the index gone from under the replicas /healthz says 503 (not a stale "ok"),
        # a bare {"error": "unhealthy"} (the reason goes to the replica log, not the body), and 200 again once it is
        # back
        manifest = index_dir / "CURRENT"  # the pointer to the index version in use
        manifest.rename(index_dir / "CURRENT.away")
        try:
            sick = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        finally:
            (index_dir / "CURRENT.away").rename(manifest)
        assert sick.status_code == 503 and sick.json() == {"error": "unhealthy"}, sick.text
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200, 120,
                   "/healthz 200 again", poll=0.2)
        failed_during = sum(c != 200 for c in during)
        # RELIABILITY.md: only the requests in flight on the killed replica fail, as HTTP 500 from Serve's proxy (no
        # dropped connection, no 503: 4 clients are far from the queue bound), so at most one per client
        assert set(during) <= {200, 500}, sorted(Counter(during).items())
        assert failed_during <= len(threads), sorted(Counter(during).items())
        print(f"\nserve: replica killed under load (4 clients); {len(during)} requests while it was replaced, "
              f"{failed_during} failed (status {sorted(Counter(during).items())}); {len(after)} after recovery, all 200; status showed fewer than 2 running replicas "
              f"while replacing: {any(saw_degraded)}")
    finally:
        serve.shutdown()
