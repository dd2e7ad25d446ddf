"""Ray Train workflow: 2 CPU workers learn, all-gathered negatives span workers, a killed worker is survived, a re-run
resumes in the same MLflow run with the same numbers (both data modes: materialized and streamed), every epoch
reshuffles the whole training set into equal worker shares, the registry alias loads, evaluate prints the table.
The pure functions of the data path (shares, stream plan, shuffle buffer, mode choice) are tested without Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.mark.ray

EPOCHS = 4
BATCH = 4  # per worker; 2 workers -> global batch 8
KILL = {"epoch": 2, "batch": 1, "rank": 1}  # SIGKILL worker rank 1 in epoch 2, after its first batch


@pytest.fixture(scope="module")
def feats(ray_session, tmp_path_factory):
    """A 48-clip demo set (34 train / 7 val / 7 test) as 3 feature shards, made by the real extract-features."""
    from workflows.settings import Settings
    from hci_atr.data.demo import make_demo
    from workflows.features import extract_features

    root = tmp_path_factory.mktemp("train_demo")
    make_demo(root / "data", seed=0, size=48, duration=2.0, sample_rate=16000, progress=False)
    cfg = Settings().override({"audio.sample_rate": 16000, "audio.duration": 2.0, "audio.n_mels": 32,
                             "pipeline.rows_per_shard": 16})
    extract_features(root / "data", root / "feats", cfg=cfg, progress=False)
    return root / "feats"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train_runs")


def _cfg(text_dir, work, run_name, epochs=EPOCHS, **over):
    from workflows.settings import Settings

    base = {"audio.sample_rate": 16000, "audio.duration": 1.0, "audio.n_mels": 32,
            "model.text_encoder": str(text_dir), "model.freeze_text": False, "model.audio_width": 8,
            "model.embed_dim": 32, "model.max_words": 16,
            "train.epochs": epochs, "train.batch_size": BATCH, "run.num_workers": 2, "train.lr": 2e-3,
            "train.seed": 0, "run.storage_path": str(work / "ray_results"), "run.run_name": run_name,
            "run.registered_model": "tiny-hci"}
    base.update(over)
    return Settings().override(base)


def _uri(work):
    return f"sqlite:///{work / 'mlflow.db'}"


@pytest.fixture(scope="module")
def main_run(feats, work, tiny_text_dir):
    """One 2-worker run of EPOCHS epochs in which worker rank 1 is SIGKILLed once, mid-epoch (data mode auto:
    materialized for this small set; whole-set shuffle); every worker's share of every epoch traced."""
    from workflows.train import train

    fault = {**KILL, "marker": str(work / "killed.marker")}
    return train(_cfg(tiny_text_dir, work, "main"), feats, tracking_uri=_uri(work), fault=fault,
                 trace=work / "trace-main")


@pytest.fixture(scope="module")
def stream_run(feats, work, tiny_text_dir):
    """The main run again with the training rows streamed from the shards (run.data_mode=stream), killed the same
    way; not registered (the registry test expects the main run's version 1)."""
    from workflows.train import train

    fault = {**KILL, "marker": str(work / "killed-stream.marker")}
    return train(_cfg(tiny_text_dir, work, "stream", **{"run.data_mode": "stream"}), feats, tracking_uri=_uri(work),
                 fault=fault, trace=work / "trace-stream", register=False)


RUNS = {"materialize": ("main_run", "main", "killed.marker"), "stream": ("stream_run", "stream", "killed-stream.marker")}
MODES = pytest.mark.parametrize("mode", list(RUNS))


def _run(request, mode):
    return request.getfixturevalue(RUNS[mode][0])


# -- all-gather ------------------------------------------------------------------------------------------------------


def _gather_loop(config):
    """Each worker holds its half of a global batch: it gathers every worker's texts (GatherWithGrad) and scores its
    own audio rows against them; the column side of the loss is completed by the second (log-sum-exp) gather."""
    import ray.train

    from hci_atr.losses import sharded_info_nce
    from hci_atr.training.distributed import GatherWithGrad

    rank = ray.train.get_context().get_world_rank()
    a_all, t_all = torch.tensor(config["a"]), torch.tensor(config["t"])
    b = a_all.shape[0] // 2
    a = a_all[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    t = t_all[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    keys = torch.arange(rank * b, (rank + 1) * b, dtype=torch.float64)
    gather = GatherWithGrad()
    gt, gk = gather(t), gather(keys)
    logits = a @ gt.T
    loss = sharded_info_nce({"clip": logits}, keys[:, None] == gk[None, :], {"clip": 0.1}, torch.ones(len(gk)),
                            gather)["clip"]
    loss.backward()
    with open(f"{config['out']}/rank{rank}.json", "w") as fh:
        json.dump({"loss": float(loss), "grad_a": a.grad.tolist(), "grad_t": t.grad.tolist(),
                   "rows": gather.rows_seen, "logits": list(logits.shape)}, fh)
    ray.train.report({"loss": float(loss)})


@ray
def test_all_gather_spans_workers(ray_session, tmp_path):
    """Each worker scores its own 4 audio rows against all 8 texts; the mean of the workers' losses equals the
    single-process loss of the concatenated batch (local negatives would not), and the gradient of a worker's own
    rows is world_size x the global gradient (all_gather's backward sums over workers; DDP's averaging then
    restores the global gradient)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hci_atr.losses import info_nce

    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test module by name
    g = torch.Generator().manual_seed(0)
    a_all = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1)
    t_all = torch.nn.functional.normalize(a_all + 0.5 * torch.randn(8, 6, generator=g), dim=-1)
    TorchTrainer(_gather_loop, train_loop_config={"a": a_all.tolist(), "t": t_all.tolist(), "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name="gather", storage_path=str(tmp_path / "rr"))).fit()
    a_ref = a_all.clone().requires_grad_(True)
    t_ref = t_all.clone().requires_grad_(True)
    ref = info_nce(a_ref @ t_ref.T, torch.eye(8, dtype=torch.bool), 0.1)
    ref.backward()
    local_only = 0.5 * sum(float(info_nce(a_all[s] @ t_all[s].T, torch.eye(4, dtype=torch.bool), 0.1))
                           for s in (slice(0, 4), slice(4, 8)))
    assert abs(ref.item() - local_only) > 0.05  # the test can tell global from local negatives
    got = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert 0.5 * (got[0]["loss"] + got[1]["loss"]) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert abs(got[0]["loss"] - got[1]["loss"]) > 1e-3  # each worker computed its own share, not the whole
    for rank in (0, 1):
        assert got[rank]["rows"] == 8 and got[rank]["logits"] == [4, 8]
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(torch.tensor(got[rank]["grad_a"]), 2 * a_ref.grad[rows])
        torch.testing.assert_close(torch.tensor(got[rank]["grad_t"]), 2 * t_ref.grad[rows])


@ray
def test_workers_get_fixed_equal_disjoint_splits(feats):
    """Each worker iterates its own split of the materialized train set: equal sizes (same number of steps, so the
    collectives line up), disjoint, in block order, the same splits again for a restarted worker group."""
    from workflows.train_data import split_data_config, train_dataset

    ds = train_dataset(feats, "train", {})
    conf = split_data_config(ds, 2)

    def ids(it):
        return [a for b in it.iter_batches(batch_format="pyarrow") for a in b.column("audio_id").to_pylist()]

    first = [ids(r["train"]) for r in conf.configure({"train": ds}, 2, None, None)]
    again = [ids(r["train"]) for r in conf.configure({"train": ds}, 2, None, None)]
    assert len(first[0]) == len(first[1]) == 17 and not set(first[0]) & set(first[1])  # 34 train rows
    assert first == again and ids(ds.iterator()) == first[0] + first[1]


# -- the main run ----------------------------------------------------------------------------------------------------


@ray
@MODES
def test_two_workers_learn_and_beat_chance(request, mode, feats, work):
    from mlflow import MlflowClient

    run = _run(request, mode)
    h = run.history
    assert [int(x["epoch"]) for x in h] == list(range(EPOCHS))
    assert all(x["world_size"] == 2 and x["gathered_rows"] == 2 * BATCH for x in h)  # global negatives
    # 34 train rows -> 17 per worker -> 4 batches of 4 per worker per epoch
    assert all(x["batches"] == 4 for x in h)
    assert h[-1]["loss_total"] < h[0]["loss_total"]
    n_val = h[0]["val_n_audio"]
    assert n_val == 7 and h[0]["val_n_text"] == 35
    chance_rsum = 100 * (1 + 5 + min(10, n_val)) / n_val  # t2a R@1+R@5+R@10 of a random ranking
    assert run.metrics["val_rsum"] > chance_rsum
    assert run.metrics["val_rsum"] == max(x["val_rsum"] for x in h)  # best checkpoint = best val R-sum
    assert MlflowClient(_uri(work)).get_run(run.mlflow_run_id).data.tags["data.mode"] == mode  # auto: materialize


@ray
@MODES
def test_killed_worker_is_survived(request, mode, work):
    from mlflow import MlflowClient

    run = _run(request, mode)
    marker = work / RUNS[mode][2]
    assert marker.is_file() and "epoch 2 batch 1 rank 1" in marker.read_text()
    h = run.history
    # the first worker group started at epoch 0; the restarted group resumed from the latest checkpoint the
    # controller had registered when the worker died: epoch 1's (start 2), or epoch 0's when the kill raced the
    # registration of epoch 1's report (start 1). Never from scratch, and the run still ends after EPOCHS epochs.
    starts = [int(x["start_epoch"]) for x in h]
    assert starts[0] == 0 and starts[-1] in (1, 2) and starts == sorted(starts)
    assert starts.count(starts[-1]) == EPOCHS - starts[-1]
    c = MlflowClient(_uri(work))
    steps = [m.step for m in c.get_metric_history(run.mlflow_run_id, "val_rsum")]
    assert sorted(set(steps)) == list(range(EPOCHS))  # every epoch logged, all in the one MLflow run
    r = c.get_run(run.mlflow_run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["model.embed_dim"] == "32" and len(r.data.params["data.fingerprint"]) == 16
    arts = {a.path for a in c.list_artifacts(run.mlflow_run_id)}
    assert {"config.yaml", "training_curve.png", "retrieval_examples.txt", "model"} <= arts


def _traced_shares(trace_dir: Path) -> dict[int, list[list[str]]]:
    """epoch -> [rank 0's share, rank 1's share] (audio ids) from a run's trace files."""
    out: dict[int, list[list[str]]] = {}
    for e in range(EPOCHS):
        out[e] = [json.loads((trace_dir / f"share-e{e:03d}-r{r}.json").read_text())["ids"] for r in (0, 1)]
    return out


@ray
@MODES
def test_every_epoch_reshuffles_the_whole_set_into_equal_shares(request, mode, feats, work):
    """What each of the 2 workers trained on, per epoch: 17 rows each (34 / 2), disjoint, together the whole
    training split; another pair of shares every epoch (a clip meets other rows); materialized, exactly the shares
    epoch_shares(seed, epoch) names (in audio_id order), the same again in the epochs the restarted group re-ran."""
    from hci_atr.data.shards import read_split_rows
    from workflows.train_data import epoch_shares

    _run(request, mode)
    ids = sorted(r["audio_id"] for r in read_split_rows(feats, "train"))
    shares = _traced_shares(work / f"trace-{RUNS[mode][1]}")
    for e, (a, b) in shares.items():
        assert len(a) == len(b) == 17 and not set(a) & set(b) and sorted(a + b) == ids, e
        if mode == "materialize":
            assert [a, b] == [[ids[i] for i in share] for share in epoch_shares(34, 2, 0, e)], e
    firsts = [frozenset(shares[e][0]) for e in range(EPOCHS)]
    # materialized: another share every epoch; streamed, the 3 feature files in a new order allow 6 shares at most
    assert len(set(firsts)) == (EPOCHS if mode == "materialize" else len(set(firsts))) > 1


@ray
def test_registry_alias_resolves_to_the_best_model(main_run, work):
    from hci_atr.models.model import HciAtrModel
    from workflows.tracking import resolve_model_ref

    assert main_run.champion and main_run.model_version == "1"
    d = resolve_model_ref("models:/tiny-hci@champion", _uri(work), dst_dir=work / "dl")
    loaded = HciAtrModel.from_pretrained(d)
    best = HciAtrModel.from_pretrained(main_run.model_dir)
    for (k, v), (k2, v2) in zip(loaded.state_dict().items(), best.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert loaded.cfg.model.embed_dim == 32


@ray
def test_evaluate_prints_table_and_rerank_all_equals_full(main_run, feats, work, capsys):
    from workflows.cli import main
    from workflows.evaluate import evaluate

    full = evaluate(main_run.model_dir, feats, "test").metrics
    assert full["n_audio"] == 7 and full["n_text"] == 35
    assert full["rsum"] == pytest.approx(full["t2a_R1"] + full["t2a_R5"] + full["t2a_R10"])
    # reranking every candidate (all 7 clips per caption, all 35 captions per clip) is exactly full scoring
    rr = evaluate(main_run.model_dir, feats, "test", rerank_k=35).metrics
    for k in ("t2a_R1", "t2a_R5", "t2a_mAP10", "a2t_R1", "a2t_mAP10", "t2a_medr", "a2t_meanr"):
        assert rr[k] == pytest.approx(full[k]), k
    main(["evaluate", "--model", "models:/tiny-hci@champion", "--features", str(feats), "--split", "test",
          "--tracking-uri", _uri(work)])
    out = capsys.readouterr().out
    assert "text->audio" in out and "audio->text" in out
    r1 = next(line for line in out.splitlines() if line.startswith("R@1 "))
    assert r1.split()[1:] == [f"{full['t2a_R1']:.2f}", f"{full['a2t_R1']:.2f}"]


# -- resume ----------------------------------------------------------------------------------------------------------


@ray
@MODES
def test_rerun_resumes_in_the_same_mlflow_run_with_the_same_numbers(request, mode, feats, work, tiny_text_dir):
    """1 epoch, then the same command with --epochs 2: epoch 1 starts from the checkpoint, logs into the same MLflow
    run, and (same seed, same worker count) reproduces the uninterrupted main run's numbers."""
    from mlflow import MlflowClient

    from workflows.train import train

    run = _run(request, mode)
    name, over = f"resume-{mode}", {"run.data_mode": mode}
    first = train(_cfg(tiny_text_dir, work, name, epochs=1, **over), feats, tracking_uri=_uri(work),
                  register=False, log_examples=False)
    second = train(_cfg(tiny_text_dir, work, name, epochs=2, **over), feats, tracking_uri=_uri(work),
                   register=False, log_examples=False)
    assert second.mlflow_run_id == first.mlflow_run_id
    assert [int(x["start_epoch"]) for x in second.history] == [0, 1]
    steps = [m.step for m in MlflowClient(_uri(work)).get_metric_history(second.mlflow_run_id, "loss_total")]
    assert sorted(steps) == [0, 1]
    for e in (0, 1):
        assert second.history[e]["loss_total"] == pytest.approx(run.history[e]["loss_total"], rel=1e-5)
        assert second.history[e]["val_rsum"] == pytest.approx(run.history[e]["val_rsum"])
    assert math.isfinite(second.metrics["val_rsum"])


@ray
def test_rerun_with_other_settings_is_refused(main_run, feats, work, tiny_text_dir):
    from hci_atr.errors import ConfigError
    from workflows.train import train

    with pytest.raises(ConfigError, match="model.embed_dim"):
        train(_cfg(tiny_text_dir, work, "main", **{"model.embed_dim": 16}), feats, tracking_uri=_uri(work))


def test_features_of_another_front_end_are_refused_before_training(feats, work, tiny_text_dir):
    """A cnn14 recipe (PANNs front end) pointed at HTK features: refused before any worker starts."""
    from hci_atr.errors import ConfigError
    from workflows.train import train

    with pytest.raises(ConfigError, match="frontend 'htk' vs 'panns'"):
        train(_cfg(tiny_text_dir, work, "panns", **{"audio.frontend": "panns"}), feats, tracking_uri=_uri(work))
    assert not (work / "ray_results" / "panns").exists()


def test_mined_batches_with_streamed_rows_are_refused_before_training(feats, work, tiny_text_dir):
    """Mined batches need a worker's whole share at once; streaming never holds it: one line, no run folder."""
    from hci_atr.errors import ConfigError
    from workflows.train import train

    over = {"train.batch_mining": "text", "run.data_mode": "stream"}
    with pytest.raises(ConfigError, match=r"train.batch_mining=text .* use --data-mode materialize"):
        train(_cfg(tiny_text_dir, work, "mined", **over), feats, tracking_uri=_uri(work))
    assert not (work / "ray_results" / "mined").exists()


def test_captions_all_below_the_confidence_threshold_are_refused_before_training(feats, work, tiny_text_dir,
                                                                                 tmp_path):
    """AC on, and every generated caption below model.ac_min_confidence: one line naming the threshold and what to
    do, before any run folder or worker exists (a folder of only untrusted captions is not "no --captions")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hci_atr.data.shards import CAPTION_SCHEMA
    from hci_atr.errors import ConfigError
    from workflows.train import train

    caps = tmp_path / "caps"
    caps.mkdir()
    n = 3
    pq.write_table(pa.table({"audio_id": ["a", "b", "c"], "generated_caption": ["ca", "cb", "cc"],
                             "captioner": ["nearest"] * n, "model": ["m"] * n, "params": ["{}"] * n,
                             "seconds": [0.0] * n, "confidence": [0.4, 0.6, 0.7]},
                            schema=CAPTION_SCHEMA), caps / "part-00000.parquet")
    over = {"model.ac_fusion": True, "model.ac_min_confidence": 0.8}
    with pytest.raises(ConfigError, match=r"every generated caption is below model.ac_min_confidence=0.8; lower it"):
        train(_cfg(tiny_text_dir, work, "untrusted", **over), feats, captions_dir=caps, tracking_uri=_uri(work))
    assert not (work / "ray_results" / "untrusted").exists()
    with pytest.raises(ConfigError, match="no --captions directory"):  # no folder at all is the other message
        train(_cfg(tiny_text_dir, work, "untrusted", **over), feats, tracking_uri=_uri(work))


# -- one worker: the in-process loop's numbers; a broken latest checkpoint --------------------------------------------


@pytest.fixture(scope="module")
def solo_run(feats, work, tiny_text_dir):
    """2 epochs on ONE worker (1 torch thread, as the ablation's tasks run)."""
    from workflows.train import train

    lines: list[str] = []
    res = train(_cfg(tiny_text_dir, work, "solo", epochs=2, **{"run.num_workers": 1}), feats,
                tracking_uri=_uri(work), register=False, log_examples=False, torch_threads=1, echo=lines.append)
    return res, lines


@ray
def test_one_worker_matches_the_in_process_loop(solo_run, feats, work, tiny_text_dir, capsys):
    """The ablation path (in-process fit loop over read_split_rows) and `hci-atr train`'s worker path (the same loop
    over its Ray Data split) give the same first epoch for the same seed: the same rows in the same order, batches,
    crops, losses and validation. The ablation path prints one progress line per epoch."""
    from hci_atr.data.shards import read_split_rows
    from workflows.ablation_tasks import train_and_evaluate

    res, _ = solo_run
    rows = {s: read_split_rows(feats, s) for s in ("train", "val", "test")}
    capsys.readouterr()
    abl = train_and_evaluate(_cfg(tiny_text_dir, work, "solo", epochs=1, **{"run.num_workers": 1}), rows["train"],
                             rows["val"], rows["test"], threads=1, label="hci seed 0")
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hci seed 0: epoch")]
    h = abl["history"][0]
    assert out == [f"hci seed 0: epoch 1/1 loss {h['loss_total']:.3f}, val R-sum {h['val_rsum']:.1f} (best "
                   f"{h['val_rsum']:.1f} at epoch 1), {h['epoch_seconds']:.0f} s"]
    a, t = abl["history"][0], res.history[0]
    assert t["batches"] == a["batches"] == 34 // BATCH
    for k in ("loss_total", "loss_clip", "loss_segment", "loss_frame"):
        assert t[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), k
    assert t["val_rsum"] == pytest.approx(a["val_rsum"], abs=1e-6)


@ray
def test_broken_latest_checkpoint_resumes_from_the_previous_one(solo_run, feats, work, tiny_text_dir):
    """The latest checkpoint's train_state.pt truncated: a re-run with more epochs says so in one line, resumes from
    the previous checkpoint (epoch 0), trains epochs 1-2 again and finishes with the same numbers."""
    from workflows.checkpoints import checkpoint_dirs, checkpoint_epoch
    from workflows.train import train

    first, lines = solo_run
    assert not any("unreadable" in line for line in lines)
    run_dir = work / "ray_results" / "solo"
    dirs = checkpoint_dirs(run_dir)
    assert [checkpoint_epoch(d) for d in dirs] == [0, 1]
    state = dirs[-1] / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    lines = []
    second = train(_cfg(tiny_text_dir, work, "solo", epochs=3, **{"run.num_workers": 1}), feats,
                   tracking_uri=_uri(work), register=False, log_examples=False, torch_threads=1, echo=lines.append)
    notes = [line for line in lines if "unreadable" in line]
    assert len(notes) == 1 and dirs[-1].name in notes[0] and f"{dirs[0].name} (epoch 0)" in notes[0]
    assert "train_state.pt does not match its checksum" in notes[0]
    assert [int(h["epoch"]) for h in second.history] == [0, 1, 2]
    assert [int(h["start_epoch"]) for h in second.history] == [0, 1, 1]
    assert second.history[1]["loss_total"] == pytest.approx(first.history[1]["loss_total"], rel=1e-6)
    assert second.mlflow_run_id == first.mlflow_run_id and math.isfinite(second.metrics["val_rsum"])
    assert (Path(second.best_checkpoint_dir) / "train_state.pt").stat().st_size > 100  # never the broken one


# -- the data path without Ray: shares, stream plan, shuffle buffer, streamed rows, mode choice --------------------


def test_epoch_shares_are_seeded_equal_disjoint_and_change_every_epoch():
    from workflows.train_data import epoch_shares

    n, world = 103, 4
    for e in range(3):
        shares = epoch_shares(n, world, 7, e)
        again = epoch_shares(n, world, 7, e)
        assert all(np.array_equal(a, b) for a, b in zip(shares, again))  # same seed, same shares
        assert [len(x) for x in shares] == [n // world] * world  # equal
        flat = np.concatenate(shares)
        assert len(set(flat.tolist())) == len(flat) == n - n % world  # disjoint; the remainder (3) sits out
        assert all(np.array_equal(x, np.sort(x)) for x in shares)  # each in row (audio_id) order
    e0, e1 = epoch_shares(n, world, 7, 0), epoch_shares(n, world, 7, 1)
    assert all(not np.array_equal(a, b) for a, b in zip(e0, e1))  # every worker's share changes between epochs
    assert not np.array_equal(np.concatenate(e0), np.concatenate(epoch_shares(n, world, 8, 0)))  # seed matters
    left_out = [set(range(n)) - set(np.concatenate(epoch_shares(n, world, 7, e)).tolist()) for e in range(5)]
    assert len({frozenset(x) for x in left_out}) > 1  # not always the same rows left out
    # one worker: every row, in order (what the in-process loop batches)
    assert np.array_equal(epoch_shares(n, 1, 7, 3)[0], np.arange(n))


def test_share_rows_take_the_rows_table_take_would(tmp_path):
    """ArrowRows with positions, over a table of many blocks, gives the rows Table.take gives, in the order asked."""
    import pyarrow as pa

    from hci_atr.data.shards import table_to_rows
    from hci_atr.training import ArrowRows

    blocks = [pa.table({"audio_id": [f"c{b}{i}" for i in range(3)], "n_frames": [1] * 3, "n_mels": [2] * 3,
                        "mel": pa.array([[float(b), float(i)] for i in range(3)], pa.list_(pa.float32()))})
              for b in range(4)]
    table = pa.concat_tables(blocks)
    share = ArrowRows(table, np.array([1, 4, 7, 10, 11]))
    got, want = share.take([3, 0, 4]), table_to_rows(table.take([10, 1, 11]))
    assert [r["audio_id"] for r in got] == [r["audio_id"] for r in want] == ["c31", "c01", "c32"]
    assert all(np.array_equal(a["mel"], b["mel"]) for a, b in zip(got, want))
    assert len(share) == 5 and share.audio_ids() == ["c01", "c11", "c21", "c31", "c32"]


def test_stream_plan_cuts_the_epochs_file_order_into_equal_contiguous_shares():
    from workflows.train_data import stream_plan

    counts = [5, 0, 9, 3, 8, 1]  # split rows per feature file (a file may hold none)
    n, world = sum(counts), 3
    for e in range(4):
        plan = stream_plan(counts, world, 0, e)
        assert plan == stream_plan(counts, world, 0, e)
        assert [sum(b - a for _, a, b in ranges) for ranges in plan] == [n // world] * world
        stream = [(f, i) for ranges in plan for f, a, b in ranges for i in range(a, b)]
        assert len(set(stream)) == len(stream) == n - n % world  # disjoint, the whole stream but the remainder
        assert all(0 <= a < b <= counts[f] for ranges in plan for f, a, b in ranges)
    orders = {tuple(f for ranges in stream_plan(counts, world, 0, e) for f, _, _ in ranges) for e in range(6)}
    assert len(orders) > 1  # the file order changes with the epoch


def test_shuffle_buffer_is_a_seeded_permutation():
    from workflows.train_data import chunked, shuffle_buffer

    def run(size, seed):
        return list(shuffle_buffer(range(50), size, torch.Generator().manual_seed(seed)))

    assert sorted(run(8, 0)) == list(range(50)) and run(8, 0) == run(8, 0) and run(8, 0) != run(8, 1)
    assert run(1, 0) == list(range(50))  # a buffer of one row keeps the order
    assert run(8, 0) != list(range(50))
    # a full buffer is one randperm of the whole input
    assert run(100, 3) == torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5]]  # incomplete last batch dropped


def test_stream_rows_reads_the_planned_split_rows_with_captions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hci_atr.data.shards import FEATURE_SCHEMA
    from workflows.train_data import split_file_counts, stream_rows

    files = []
    for k, splits in enumerate([["train", "val", "train", "train"], ["test", "train", "train"]]):
        ids = [f"f{k}-{i}" for i in range(len(splits))]
        cols = {"audio_id": ids, "split": splits, "audio_path": ids, "captions": [[f"a {i}"] for i in ids],
                "duration": [1.0] * len(ids), "n_frames": [2] * len(ids), "n_mels": [3] * len(ids),
                "mel": [[float(i)] * 6 for i in range(len(ids))]}
        files.append(str(tmp_path / f"part-{k:05d}.parquet"))
        pq.write_table(pa.table(cols, schema=FEATURE_SCHEMA), files[-1], row_group_size=2)
    assert split_file_counts(files, "train") == [3, 2]
    rows = list(stream_rows(files, [(1, 1, 2), (0, 1, 3)], "train", {"f0-2": "gen"}, batch_rows=1))
    assert [r["audio_id"] for r in rows] == ["f1-2", "f0-2", "f0-3"]
    assert [r["generated_caption"] for r in rows] == [None, "gen", None]
    assert rows[1]["mel"].tolist() == [2.0] * 6 and rows[1]["mel"].flags.owndata


def test_data_mode_auto_streams_only_what_does_not_fit(capsys):
    from hci_atr.errors import ConfigError
    from workflows.cli import main, train_overrides
    from workflows.train_data import STORE_EXPANSION, choose_data_mode

    gib = 2**30
    assert choose_data_mode("auto", int(0.29 * gib / STORE_EXPANSION), gib, 0.3)[0] == "materialize"
    assert choose_data_mode("auto", int(0.31 * gib / STORE_EXPANSION), gib, 0.3)[0] == "stream"
    assert choose_data_mode("materialize", 100 * gib, gib, 0.3)[0] == "materialize"  # a forced mode is kept
    assert choose_data_mode("stream", 1, gib, 0.3)[0] == "stream"
    with pytest.raises(ConfigError, match="run.data_mode"):
        choose_data_mode("lazy", 1, gib, 0.3)
    with pytest.raises(ConfigError, match="object_store_share"):
        choose_data_mode("auto", 1, gib, 0)
    assert train_overrides(data_mode="stream") == {"run.data_mode": "stream"}
    main(["train", "--help"])
    assert "--data-mode [auto|materialize|stream]" in capsys.readouterr().out
