"""hci-atr train: Ray Train (V2) TorchTrainer over the feature shards, MLflow tracking, checkpoints, resume.

Driver                                                     Workers (N, one TorchTrainer worker group)
-------------------------------------------------------    ---------------------------------------------------------
read train split through Ray Data (+ captions joined by    get_dataset_shard("train").iter_batches() -> its own split
audio_id), materialize, split equally (split_data_config)  make_batch -> train_epoch(gather=all_gather with grads)
create / resume the MLflow run, log config + fingerprint   DDP (prepare_model) averages the gradients
TorchTrainer.fit()  --------------------------------->     rank 0: validation, MLflow epoch metrics, checkpoint
best checkpoint -> <run_dir>/best_model (atomic)           all ranks: ray.train.report(...) every epoch
curve plot, examples, model artifacts, registry alias

Run directory ``<storage_path>/<run_name>/`` (``run_dir``):
  config.yaml            the resolved config of the run
  hci_atr_run.json       {"mlflow_run_id", "tracking_uri", "data_fingerprint"}: what a re-run resumes
  checkpoint_*/          Ray Train checkpoints (best ``num_to_keep`` by val_rsum + the latest), each holding
                           model/ (HciAtrModel.save_pretrained), train_state.pt (optimizer, epoch, history,
                           early-stopping state), meta.json (epoch, val_rsum, mlflow_run_id)
  best_model/            the best checkpoint's model/ directory, exported after fit (load with from_pretrained)

Resume: running the same command again (same storage path and run name) makes Ray Train V2 restore its checkpoint
manager from the run directory; the loop starts after the checkpoint's epoch and the driver keeps logging into the
MLflow run named in ``hci_atr_run.json``. A worker that dies mid-epoch is restarted (``FailureConfig.max_failures``)
from the latest checkpoint the same way.

Determinism: the model is initialised from ``seed`` on every rank (identical replicas), and each epoch re-seeds torch
and the crop generator from (seed, epoch, rank); the shard split keeps block order (``preserve_order``), so the same
seed and worker count give the same CPU numbers, also across a resume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from hci_atr.files import atomic_write_text, replace_dir
from workflows.settings import Settings
from hci_atr.data.shards import feature_files, read_captions, read_split_rows, split_counts, table_to_rows
from hci_atr.errors import ConfigError, DataError, HciAtrError

RUN_FILE = "hci_atr_run.json"
# columns training reads from a feature shard (the extract-features schema, docs/architecture.md)
BEST_MODEL = "best_model"
CHECKPOINT_MODEL = "model"
CHECKPOINT_STATE = "train_state.pt"
CHECKPOINT_META = "meta.json"
# Settings keys a resumed run may change (they do not change what is learnt from the data, or only extend it).
RESUMABLE_KEYS = {"train.epochs", "run.max_failures", "run.num_workers", "run.use_gpu", "run.tracking_uri",
                  "run.storage_path", "train.early_stopping_patience", "run.features_dir"}


@dataclass
class TrainResult:
    """What :func:`train` returns (and what ``hci-atr demo`` chains on)."""

    best_checkpoint_dir: str  # Ray Train checkpoint directory with the best val_rsum
    model_dir: str  # <run_dir>/best_model: HciAtrModel.save_pretrained layout
    mlflow_run_id: str
    metrics: dict[str, float]  # the best checkpoint's reported metrics (epoch, losses, val_*)
    run_dir: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per finished epoch
    model_version: str | None = None  # registry version created for this run
    champion: bool = False  # whether the registry alias moved to this run's model


# ---------------------------------------------------------------------------------------------------------------
# feature shards -> rows
# ---------------------------------------------------------------------------------------------------------------


def _add_captions(batch, captions: dict[str, str]):
    """Ray Data map_batches: the join of generated captions on audio_id (missing -> null -> no AC for the clip)."""
    import pyarrow as pa

    ids = batch.column("audio_id").to_pylist()
    gen = pa.array([captions.get(a) for a in ids], pa.string())
    if "generated_caption" in batch.column_names:
        batch = batch.drop(["generated_caption"])
    return batch.append_column("generated_caption", gen)


def train_dataset(features_dir: str | os.PathLike, split: str, captions: dict[str, str]):
    """Ray Data dataset of the ``split`` rows (pyarrow blocks) with a ``generated_caption`` column, materialized.

    Materialized on the driver because the training workers hold all CPUs of a small machine: a lazy read would
    need CPUs for its read tasks while the workers wait for data.
    """
    import ray
    import ray.data

    from ray.data.expressions import col

    ctx = ray.data.DataContext.get_current()
    keep = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # block order = file order, whatever task finishes first
    try:
        ds = ray.data.read_parquet(feature_files(features_dir)).filter(expr=col("split") == split)
        ds = ds.map_batches(_add_captions, fn_kwargs={"captions": captions}, batch_format="pyarrow", batch_size=None)
        return ds.materialize()
    finally:
        ctx.execution_options.preserve_order = keep


# ---------------------------------------------------------------------------------------------------------------
# distributed pieces used inside the per-worker loop
# ---------------------------------------------------------------------------------------------------------------


class GatherWithGrad:
    """``gather(x [B, ...]) -> [world * B, ...]``: every worker's rows, in rank order, gradients kept.

    Built on ``torch.distributed.nn.functional.all_gather``, whose backward sends each worker the gradient of its own
    rows from every worker's loss, so contrastive losses see the negatives of the global batch. ``rows_seen`` records
    the largest gathered batch (what a worker reports as its number of contrastive candidates).
    """

    def __init__(self):
        import torch.distributed as dist

        self.world = dist.get_world_size()
        self.rows_seen = 0

    def __call__(self, x):
        import torch
        from torch.distributed.nn.functional import all_gather

        if not torch.is_floating_point(x):  # ids / keys: no gradient, plain collective
            import torch.distributed as dist

            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x.contiguous())
        else:
            parts = all_gather(x.contiguous())
        out = torch.cat(list(parts), dim=0)
        self.rows_seen = max(self.rows_seen, int(out.shape[0]))
        return out


def split_data_config(ds, world_size: int):
    """A Ray Train ``DataConfig`` that hands each worker a fixed, equal split of the materialized dataset ``ds``.

    The default (``streaming_split``) runs a coordinator actor that re-executes the dataset and deals blocks out to
    the workers every epoch; for a dataset already materialized in the object store (``train_dataset`` does that)
    this is overhead: measured as up to 45 % of a 2-worker epoch on the demo data (bench/train_throughput.py,
    ``ray_data_wait_share``). ``ds.split(world_size, equal=True)`` cuts the blocks once, here on the driver while
    CPUs are free (the slicing tasks would wait forever once the workers hold every CPU), in order: the same rows
    per worker, so every worker runs the same number of steps and the collectives line up (remainder rows are
    dropped, as ``streaming_split(equal=True)`` does). Each worker then iterates its own split every epoch. A
    restarted worker group of the same size gets the same splits; another size falls back to the streaming split.
    """
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    parts = ds.split(world_size, equal=True) if world_size > 1 else [ds]

    class SplitMaterialized(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if world_size != len(parts) or list(datasets) != ["train"]:
                return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
            return [{"train": part.iterator()} for part in parts]

    # preserve_order: blocks go to workers in a fixed order -> same seed, same numbers (streaming fallback too)
    return SplitMaterialized(datasets_to_split="all", execution_options=ExecutionOptions(preserve_order=True))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Per (seed, epoch, rank) seed: resuming at epoch e replays exactly what an uninterrupted run did at e."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**31 - 1)


def _fault_point(fault: dict | None, epoch: int, rank: int, batch_index: int) -> None:
    """Fault injection for tests and drills: kill this worker process (SIGKILL) once, at (epoch, batch, rank).

    ``fault = {"epoch": e, "batch": b, "rank": r, "marker": path}``; the marker file makes it happen on the first
    attempt only, so the restarted worker group runs through.
    """
    if not fault:
        return
    if (epoch, batch_index, rank) != (int(fault["epoch"]), int(fault.get("batch", 0)), int(fault.get("rank", 0))):
        return
    marker = Path(fault["marker"])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"killed pid {os.getpid()} at epoch {epoch} batch {batch_index} rank {rank}\n".encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _batch_rows(shard_iter) -> Iterator[list[dict[str, Any]]]:
    for table in shard_iter:
        yield table_to_rows(table)


# ---------------------------------------------------------------------------------------------------------------
# the per-worker loop
# ---------------------------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``config``: cfg (dict), features_dir, captions (dict), tracking_uri, run_id,
    torch_threads, fault (dict | None)."""
    import torch
    import ray.train
    import ray.train.torch

    from hci_atr import training
    from hci_atr.models.model import HciAtrModel
    from workflows import tracking

    cfg = Settings.from_dict(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("torch_threads") or 1))

    torch.manual_seed(tc.seed)  # identical initial replicas on every rank
    model = HciAtrModel(cfg)
    start_epoch, history, best_rsum, bad_epochs = 0, [], float("-inf"), 0
    opt_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            loaded = HciAtrModel.from_pretrained(os.path.join(d, CHECKPOINT_MODEL))
            model.load_state_dict(loaded.state_dict())
            state = torch.load(os.path.join(d, CHECKPOINT_STATE), map_location="cpu", weights_only=False)
        start_epoch = int(state["epoch"]) + 1
        history, best_rsum, bad_epochs = state["history"], float(state["best_rsum"]), int(state["bad_epochs"])
        opt_state = state["optimizer"]
    core = model
    # DDP (world > 1): gradients averaged over workers during backward; the model calls forward() through it.
    # No find_unused_parameters search: every parameter a config leaves trainable gets a gradient each step (the
    # model freezes switched-off parts and the text pooler; tests/test_training.py checks every switch).
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    if opt_state is not None:
        why = training.restore_optimizer(optimizer, opt_state)
        if why and rank == 0:
            print(f"resume from epoch {start_epoch}: {why}; the weights resume, AdamW restarts its moments",
                  flush=True)
    gather = GatherWithGrad() if (world > 1 and tc.all_gather) else None

    captions = config.get("captions") or {}
    val_rows = read_split_rows(config["features_dir"], cfg.run.val_split, captions) if rank == 0 else []
    # a resumed run may re-train an epoch whose metrics reached MLflow before its checkpoint was registered (the
    # driver died in between): same seed, same numbers, so the first record stands and the step is not logged again
    logged = tracking.logged_steps(config["tracking_uri"], config["run_id"], "val_rsum") \
        if rank == 0 and ckpt is not None else set()
    shard = ray.train.get_dataset_shard("train")
    stop = False

    for epoch in range(start_epoch, tc.epochs):
        s = epoch_seed(tc.seed, epoch, rank)
        torch.manual_seed(s)
        gen = torch.Generator().manual_seed(s)
        model.train()

        def batches(epoch=epoch, gen=gen):
            it = shard.iter_batches(batch_size=tc.batch_size, batch_format="pyarrow", drop_last=True,
                                    local_shuffle_buffer_size=max(2 * tc.batch_size, 64),
                                    local_shuffle_seed=s)
            for i, rows in enumerate(_batch_rows(it)):
                _fault_point(config.get("fault"), epoch, rank, i)
                yield training.make_batch(rows, cfg, model, True, gen)

        for group in optimizer.param_groups:  # a function of the epoch alone, so a resumed run gets the same lr
            group["lr"] = tc.lr * training.warmup_factor(epoch, tc.warmup_epochs)
        t0 = time.perf_counter()
        losses = training.train_epoch(model, optimizer, batches(), cfg, gather=gather)
        seconds = time.perf_counter() - t0
        metrics = {k: float(v) for k, v in losses.items() if isinstance(v, (int, float))}
        if world > 1:  # report the mean over workers, identical on every rank
            keys = sorted(metrics)
            t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            metrics = {k: float(v) / world for k, v in zip(keys, t.tolist())}
        metrics.update(epoch=epoch, epoch_seconds=seconds, world_size=world, start_epoch=start_epoch,
                       gathered_rows=float(gather.rows_seen if gather is not None else 0))

        val = {}
        if rank == 0:
            with torch.no_grad():
                val = training.evaluate(core, val_rows, cfg)
        rsum = torch.tensor([float(val.get("rsum", 0.0))], dtype=torch.float64)
        if world > 1:  # every rank takes the same early-stopping decision
            torch.distributed.broadcast(rsum, src=0)
        rsum_v = float(rsum.item())
        metrics.update({f"val_{k}": float(v) for k, v in val.items()})
        metrics["val_rsum"] = rsum_v
        if rsum_v > best_rsum:
            best_rsum, bad_epochs = rsum_v, 0
        else:
            bad_epochs += 1
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        stop = tc.early_stopping_patience > 0 and bad_epochs >= tc.early_stopping_patience
        metrics["early_stopped"] = float(stop)

        if rank == 0:
            log = {k: v for k, v in metrics.items() if k not in ("epoch", "world_size", "start_epoch")}
            if epoch not in logged:
                tracking.log_metrics(config["tracking_uri"], config["run_id"], log, step=epoch)
            with tempfile.TemporaryDirectory(prefix="hci_atr_ckpt_") as tmp:
                core.save_pretrained(os.path.join(tmp, CHECKPOINT_MODEL))
                torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                            "best_rsum": best_rsum, "bad_epochs": bad_epochs}, os.path.join(tmp, CHECKPOINT_STATE))
                Path(tmp, CHECKPOINT_META).write_text(json.dumps(
                    {"epoch": epoch, "val_rsum": rsum_v, "mlflow_run_id": config["run_id"]}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        if stop:
            break


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------


def run_dir_for(cfg: Settings) -> Path:
    return Path(cfg.run.storage_path).resolve() / cfg.run.run_name


def _read_run_file(run_dir: Path) -> dict:
    p = run_dir / RUN_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({e}); delete it to start the run's MLflow tracking afresh") from None


def _check_resume_config(run_dir: Path, cfg: Settings) -> None:
    """A re-run with the same name must train the same thing: only RESUMABLE_KEYS may differ from config.yaml."""
    p = run_dir / "config.yaml"
    if not p.is_file():
        return
    from workflows.settings import load_settings

    old = load_settings(p).flat()
    new = cfg.flat()
    changed = [k for k in new if k not in RESUMABLE_KEYS and old.get(k) != new[k]]
    if changed:
        raise ConfigError(
            f"{run_dir}: a run named '{cfg.run.run_name}' exists with other settings for "
            f"{', '.join(changed[:6])}; re-run with the same settings to resume, or pass a new --run-name"
        )


def export_model_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a model directory to ``dst`` atomically: copy to a temp sibling, then swap it into place."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    return replace_dir(tmp, dst)


def default_torch_threads(num_workers: int, cpus: int | None = None) -> int:
    """CPU threads per worker: the machine's cores split between the workers (at least 1), so N workers do not
    oversubscribe the cores with N x all-core intra-op pools."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, num_workers))


def train(cfg: Settings, features_dir: str | os.PathLike, captions_dir: str | os.PathLike | None = None, *,
          tracking_uri: str | None = None, ray_address: str | None = None, fault: dict | None = None,
          torch_threads: int | None = None, log_examples: bool = True, register: bool = True,
          echo: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``HciAtrModel(cfg)`` on the ``cfg.run.train_split`` rows of ``features_dir`` with Ray Train.

    Re-running with the same ``cfg.run.storage_path`` / ``run_name`` resumes. ``fault`` (tests, drills): kill one
    worker once, see :func:`_fault_point`; also read from ``$HCI_ATR_FAULT`` as ``epoch:batch:rank:marker``.
    Returns a :class:`TrainResult`; the best model is in ``result.model_dir``.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workflows import tracking
    from workflows.cluster import ensure_ray

    say = echo or (lambda _m: None)
    tc = cfg.train
    if cfg.model.audio_checkpoint and not Path(cfg.model.audio_checkpoint).is_file():
        raise ConfigError(f"model.audio_checkpoint: {cfg.model.audio_checkpoint} is not a file; point it at a PANNs "
                          "Cnn14 .pth checkpoint (or leave it empty to train the audio encoder from scratch)")
    features_dir = Path(features_dir).resolve()
    counts = split_counts(features_dir)
    for split in (cfg.run.train_split, cfg.run.val_split):
        if counts.get(split, 0) == 0:
            raise DataError(f"{features_dir}: no rows with split '{split}' (found: "
                            f"{', '.join(f'{k}={v}' for k, v in sorted(counts.items())) or 'none'})")
    if counts[cfg.run.train_split] < tc.batch_size * cfg.run.num_workers:
        raise ConfigError(f"{features_dir}: {counts[cfg.run.train_split]} training rows cannot fill one batch of "
                          f"{tc.batch_size} on each of {cfg.run.num_workers} workers; lower --batch-size")
    captions = read_captions(captions_dir)
    if (cfg.model.ac_fusion or cfg.model.ac_branch or cfg.model.ac_augment) and not captions:
        raise ConfigError("auxiliary captions are switched on (--ac / --ac-fusion / --ac-branch / --ac-augment) but "
                          "no --captions directory was given; run `hci-atr caption-all` and pass --captions DIR")
    if fault is None and os.environ.get("HCI_ATR_FAULT"):
        e, b, r, m = os.environ["HCI_ATR_FAULT"].split(":", 3)
        fault = {"epoch": int(e), "batch": int(b), "rank": int(r), "marker": m}

    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.run.tracking_uri)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resume_config(run_dir, cfg)
    fingerprint = tracking.data_fingerprint(features_dir)
    prev = _read_run_file(run_dir)
    if prev.get("data_fingerprint") and prev["data_fingerprint"] != fingerprint:
        raise ConfigError(f"{run_dir}: this run was trained on other feature shards (fingerprint "
                          f"{prev['data_fingerprint']} != {fingerprint}); pass a new --run-name")
    run_id = tracking.start_or_resume_run(uri, cfg.run.experiment, cfg.run.run_name, prev.get("mlflow_run_id"))
    resumed = run_id == prev.get("mlflow_run_id")
    cfg.save(run_dir / "config.yaml")
    atomic_write_text(run_dir / RUN_FILE, json.dumps(
        {"mlflow_run_id": run_id, "tracking_uri": uri, "data_fingerprint": fingerprint}, indent=1))
    params = {k: v for k, v in cfg.flat().items() if k not in RESUMABLE_KEYS or not resumed}
    params.update({"data.fingerprint": fingerprint, "data.features_dir": str(features_dir),
                   "data.captions_dir": str(Path(captions_dir).resolve()) if captions_dir else "",
                   "data.n_train": counts[cfg.run.train_split], "data.n_val": counts[cfg.run.val_split],
                   "data.n_generated_captions": len(captions)})
    try:
        tracking.log_params(uri, run_id, params)
    except ConfigError:
        raise
    commit = tracking.git_commit()
    tracking.set_tags(uri, run_id, {"git.commit": commit or "none", "ray_train.run_dir": str(run_dir)})
    tracking.log_artifact(uri, run_id, run_dir / "config.yaml")
    say(f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {uri}; run dir {run_dir}")

    ensure_ray(ray_address)
    ds = train_dataset(features_dir, cfg.run.train_split, captions)

    loop_config = {"cfg": cfg.to_dict(), "features_dir": str(features_dir), "captions": captions,
                   "tracking_uri": uri, "run_id": run_id, "fault": fault,
                   "torch_threads": torch_threads or default_torch_threads(cfg.run.num_workers)}
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg.run.use_gpu else {})}),
        run_config=RunConfig(
            name=cfg.run.run_name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_rsum",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        ),
        datasets={"train": ds},
        dataset_config=split_data_config(ds, cfg.run.num_workers),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        tracking.end_run(uri, run_id, "FAILED")
        raise HciAtrError(f"training failed after {cfg.run.max_failures} restarts ({str(e).strip().splitlines()[0]}); "
                          f"fix the cause and re-run the same command to resume from {run_dir}") from e
    best = result.get_best_checkpoint(metric="val_rsum", mode="max") or result.checkpoint
    if best is None:
        raise HciAtrError(f"{run_dir}: training produced no checkpoint (epochs={tc.epochs}); raise --epochs")
    best_dir = Path(best.path)
    model_dir = export_model_dir(best_dir / CHECKPOINT_MODEL, run_dir / BEST_MODEL)
    best_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path), None) or {}
    latest = result.checkpoint or best
    import torch

    state = torch.load(Path(latest.path) / CHECKPOINT_STATE, map_location="cpu", weights_only=False)
    history = state["history"]
    if not best_metrics:
        meta = json.loads((best_dir / CHECKPOINT_META).read_text())
        best_metrics = next((h for h in history if int(h["epoch"]) == int(meta["epoch"])), {})

    with tempfile.TemporaryDirectory(prefix="hci_atr_artifacts_") as tmp:
        tracking.plot_training_curve(history, Path(tmp) / "training_curve.png")
        tracking.log_artifact(uri, run_id, Path(tmp) / "training_curve.png")
        if log_examples:
            text = retrieval_examples(model_dir, features_dir, cfg.run.val_split, captions)
            atomic_write_text(Path(tmp) / "retrieval_examples.txt", text)
            tracking.log_artifact(uri, run_id, Path(tmp) / "retrieval_examples.txt")
    tracking.log_artifact(uri, run_id, model_dir, "model")
    best_rsum = float(best_metrics.get("val_rsum", float("nan")))
    tracking.log_metrics(uri, run_id, {"best_val_rsum": best_rsum, "best_epoch": float(best_metrics.get("epoch", -1))},
                         step=int(history[-1]["epoch"]) if history else 0)
    version, champion = (None, False)
    if register:
        version, champion = tracking.register_model(uri, run_id, cfg.run.registered_model, best_rsum)
        say(f"registered {cfg.run.registered_model} version {version}"
            + (f" (alias {tracking.CHAMPION_ALIAS})" if champion else ""))
    tracking.end_run(uri, run_id, "FINISHED")
    return TrainResult(best_checkpoint_dir=str(best_dir), model_dir=str(model_dir), mlflow_run_id=run_id,
                       metrics={k: float(v) for k, v in best_metrics.items() if isinstance(v, (int, float))},
                       run_dir=str(run_dir), history=history, model_version=version, champion=champion)


def retrieval_examples(model_dir: str | os.PathLike, features_dir: str | os.PathLike, split: str,
                       captions: dict[str, str] | None = None, n_queries: int = 5, top_k: int = 5,
                       rows: list[dict] | None = None) -> str:
    """Text query -> top clips for the first ``n_queries`` clips' first captions (fused HCI score)."""
    import torch

    from hci_atr import training
    from hci_atr.models.model import HciAtrModel
    from workflows import tracking

    model = HciAtrModel.from_pretrained(model_dir).eval()
    rows = rows if rows is not None else read_split_rows(features_dir, split, captions)
    with torch.no_grad():
        emb = training.embed_split(model, rows, model.cfg)
        sim = model.score(emb.audio, emb.text).fused.float()  # [n_audio, n_text]
    text_to_audio, texts, ids = emb.text_to_audio, emb.captions, emb.audio_ids
    # one query per clip (its first caption), the first n_queries clips
    firsts: dict[int, int] = {}
    for j, a in enumerate(text_to_audio.tolist()):
        firsts.setdefault(int(a), j)
    out = []
    for a, j in list(sorted(firsts.items()))[:n_queries]:
        col = sim[:, j]
        top = torch.topk(col, k=min(top_k, col.numel()))
        out.append((texts[j], ids[a], [(ids[int(i)], float(v)) for v, i in zip(top.values, top.indices)]))
    return tracking.format_retrieval_examples(out)
