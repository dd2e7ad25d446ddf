"""hci-atr train: Ray Train (V2) hooks around the library's fit loop (:func:`hci_atr.training.fit`): how the
training rows reach the workers, DDP, checkpoints and their resume, MLflow on rank 0.

Driver                                                     Workers (N, one TorchTrainer worker group)
-------------------------------------------------------    ---------------------------------------------------------
choose the data mode (run.data_mode; auto: by size)        hci_atr.training.fit(model, cfg, RayTrainHooks):
 materialize: read the train split through Ray Data (+       batches: this epoch's share of the rows -> batches
 captions joined by audio_id) into the object store          loss: all-gathered texts (GatherWithGrad); DDP
 stream: count the split's rows per feature file             rank 0: validation, MLflow epoch metrics, checkpoint
create / resume the MLflow run, log config + fingerprint     all ranks: ray.train.report(...) every epoch
check the checkpoints a resume would use
TorchTrainer.fit()  --------------------------------->
best checkpoint -> <run_dir>/best_model (atomic)
curve plot, examples, model artifacts, registry alias

Data modes: :mod:`workflows.train_data` (materialize or stream, whole-set shuffle, equal shares).

Run directory, checkpoints and resume: :mod:`workflows.checkpoints`.

Determinism: the fit loop's rules (hci_atr/training/loop.py: initial weights from ``seed`` on every rank, each epoch
re-seeded from (seed, epoch, rank)); each epoch's shares are a function of (seed, epoch, N) alone (never of task
timing), taken in audio_id order (materialize) or in the epoch's file order (stream), and batched with the epoch's
generator: the same seed and worker count give the same CPU numbers, also across a resume. With one worker the
materialized share is every row in audio_id order, batched by the same function as ``hci-atr ablate``'s
in-process loop, so both give the same numbers.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hci_atr.data.shards import check_features_match, feature_files, read_captions, read_split_rows, split_counts
from hci_atr.errors import ConfigError, DataError, HciAtrError, one_line
from hci_atr.files import atomic_write_text
from hci_atr.training import FitHooks, evaluate, fit, iter_batches, make_batch, seeded_model
from hci_atr.training.distributed import GatherWithGrad, broadcast_value, mean_over_workers
from workflows.checkpoints import (BEST_MODEL, CHECKPOINT_MODEL, RESUMABLE_KEYS, RUN_FILE, best_checkpoint,
                                   check_resume_config, checkpoint_epoch, export_model_dir, no_checkpoint_loads,
                                   precheck_resume, read_checkpoint, read_run_file, resume_checkpoint, resume_note,
                                   run_dir_for, upload_fsynced, write_checkpoint)
from workflows.evaluate import retrieval_examples
from workflows.train_data import (SHUFFLES, choose_data_mode, chunked, epoch_shares, shard_rows, shuffle_buffer,
                                  split_data_config, split_disk_bytes, split_file_counts, stream_plan, stream_rows,
                                  train_dataset, whole_data_config)
from workflows.settings import Settings



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


def _write_trace(trace_dir: str, epoch: int, rank: int, ids: list[str]) -> None:
    """Tests and benchmarks: the audio ids of this worker's share of the epoch and its peak memory so far
    (``/proc/self/status``: VmHWM, RssAnon, RssShmem in KiB), as ``<trace_dir>/share-e<epoch>-r<rank>.json``."""
    mem: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                mem[key] = int(value.split()[0])
    except OSError:  # not Linux
        pass
    atomic_write_text(Path(trace_dir) / f"share-e{epoch:03d}-r{rank}.json",
                      json.dumps({"epoch": epoch, "rank": rank, "pid": os.getpid(), "ids": ids, "memory_kib": mem}))


# ---------------------------------------------------------------------------------------------------------------
# the per-worker loop: hci_atr.training.fit with Ray Train hooks
# ---------------------------------------------------------------------------------------------------------------


class RayTrainHooks(FitHooks):
    """The fit loop's hooks in a Ray Train worker: batches from this worker's share of the epoch (materialized:
    :func:`epoch_shares` of the whole dataset or the fixed split, :func:`shard_rows`; streamed:
    :func:`stream_plan`), fault injection, metrics averaged over workers, rank 0 validates, logs to MLflow and writes
    the checkpoint, every rank reports each epoch (Ray Train's barrier)."""

    def __init__(self, cfg: Settings, config: dict[str, Any], rank: int, world: int, gather=None,
                 resumed: bool = False):
        import ray.train

        from workflows import tracking

        self.cfg, self.config = cfg, config
        self.rank, self.world, self.gather = rank, world, gather
        self.stream = config.get("stream")  # {"files", "counts"} in stream mode, else None
        self.shard = None if self.stream else ray.train.get_dataset_shard("train")
        self.whole = None  # global shuffle, materialized: the whole split (pyarrow), read on the first epoch
        self.run_dir = Path(config["run_dir"])
        self.val_rows = read_split_rows(config["features_dir"], cfg.run.val_split,
                                        config.get("captions") or {}) if rank == 0 else []
        # a resumed run may re-train an epoch whose metrics reached MLflow before its checkpoint was registered (the
        # driver died in between): same seed, same numbers, so the first record stands and the step is not logged
        self.logged = tracking.logged_steps(config["tracking_uri"], config["run_id"], "val_rsum") \
            if rank == 0 and resumed else set()

    def _shuffled(self, epoch: int) -> int:
        """The epoch the shares are drawn for: ``epoch``, or 0 for every epoch with ``run.shuffle = "split"``."""
        return epoch if self.cfg.run.shuffle == "global" else 0

    def _materialized_rows(self, epoch: int):
        if self.cfg.run.shuffle != "global":
            rows = shard_rows(self.shard)
            return rows
        if self.whole is None:
            self.whole = shard_rows(self.shard).table  # every worker was handed the whole dataset
        share = epoch_shares(self.whole.num_rows, self.world, self.cfg.train.seed, epoch)[self.rank]
        from hci_atr.training import ArrowRows

        return ArrowRows(self.whole, share)

    def _batches(self, model, epoch, generator):
        """(batches, audio ids of the share: a list, or filled while the batches are drawn)."""
        bs = self.cfg.train.batch_size
        if self.stream is None:
            rows = self._materialized_rows(epoch)
            ids = rows.audio_ids() if self.config.get("trace") else []
            return iter_batches(rows, self.cfg, model, True, generator, batch_size=bs, drop_last=True), ids
        files, counts = self.stream["files"], self.stream["counts"]
        ranges = stream_plan(counts, self.world, self.cfg.train.seed, self._shuffled(epoch))[self.rank]
        ids: list[str] = []

        def rows():
            for row in shuffle_buffer(stream_rows(files, ranges, self.cfg.run.train_split,
                                                  self.config.get("captions") or {}),
                                      self.cfg.run.shuffle_buffer_rows, generator):
                ids.append(row["audio_id"])
                yield row

        return (make_batch(chunk, self.cfg, model, True, generator) for chunk in chunked(rows(), bs)), ids

    def batches(self, model, epoch, generator):
        batches, ids = self._batches(model, epoch, generator)
        for i, batch in enumerate(batches):
            _fault_point(self.config.get("fault"), epoch, self.rank, i)
            yield batch
        if self.config.get("trace"):
            _write_trace(self.config["trace"], epoch, self.rank, ids)

    def reduce(self, metrics):
        out = mean_over_workers(metrics)  # identical on every rank
        out.update(world_size=float(self.world),
                   gathered_rows=float(self.gather.rows_seen if self.gather is not None else 0))
        return out

    def validate(self, model):
        return evaluate(model, self.val_rows, self.cfg) if self.rank == 0 else {}

    def share(self, value):
        return broadcast_value(value)  # every rank takes the same best / early-stopping decision

    def on_epoch_end(self, end):
        import ray.train

        from workflows import tracking

        if self.rank != 0:
            ray.train.report(end.metrics, checkpoint=None)
            return
        if end.epoch not in self.logged:
            log = {k: v for k, v in end.metrics.items() if k not in ("epoch", "world_size", "start_epoch")}
            tracking.log_metrics(self.config["tracking_uri"], self.config["run_id"], log, step=end.epoch)
        with tempfile.TemporaryDirectory(prefix="hci_atr_ckpt_") as tmp:
            write_checkpoint(tmp, end.model, end.optimizer, end.state,
                             {"epoch": end.epoch, "val_rsum": end.metrics["val_rsum"],
                              "mlflow_run_id": self.config["run_id"]})
            ray.train.report(end.metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_upload_fn=upload_fsynced(self.run_dir))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``config``: cfg (dict), features_dir, captions (dict), tracking_uri, run_id,
    run_dir, torch_threads, fault (dict | None), announced (checkpoint names the driver already reported as
    unreadable)."""
    import torch
    import ray.train
    import ray.train.torch

    cfg = Settings.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("torch_threads") or 1))

    model = seeded_model(cfg)
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        chosen, skipped = resume_checkpoint(ckpt.path, config["run_dir"])
        if chosen is None:
            raise no_checkpoint_loads(Path(config["run_dir"]), skipped)
        if skipped and rank == 0 and any(p.name not in (config.get("announced") or []) for p, _ in skipped):
            print(resume_note(chosen, skipped), flush=True)
        weights, resume = read_checkpoint(chosen)
        model.load_state_dict(weights)
    # DDP (world > 1): gradients averaged over workers during backward; the model calls forward() through it.
    # No find_unused_parameters search: every parameter a config leaves trainable gets a gradient each step (the
    # model freezes switched-off parts and the text pooler; tests/test_training.py checks every switch).
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    gather = GatherWithGrad() if (world > 1 and cfg.train.all_gather) else None
    hooks = RayTrainHooks(cfg, config, rank, world, gather, resumed=ckpt is not None)
    fit(model, cfg, hooks, resume=resume, gather=gather)


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------


def default_torch_threads(num_workers: int, cpus: int | None = None) -> int:
    """CPU threads per worker: the machine's cores split between the workers (at least 1), so N workers do not
    oversubscribe the cores with N x all-core intra-op pools."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, num_workers))


def _refuse_mining_when_streaming(cfg: Settings, why: str) -> None:
    if cfg.train.batch_mining != "none":
        raise ConfigError(f"train.batch_mining={cfg.train.batch_mining} groups clips across a worker's whole share, "
                          f"which streaming ({why}) never holds at once: use --data-mode materialize, or "
                          f"train.batch_mining none")


def train(cfg: Settings, features_dir: str | os.PathLike, captions_dir: str | os.PathLike | None = None, *,
          tracking_uri: str | None = None, ray_address: str | None = None, fault: dict | None = None,
          torch_threads: int | None = None, log_examples: bool = True, register: bool = True,
          echo: Callable[[str], None] | None = None, trace: str | os.PathLike | None = None) -> TrainResult:
    """Train ``HciAtrModel(cfg)`` on the ``cfg.run.train_split`` rows of ``features_dir`` with Ray Train.

    Re-running with the same ``cfg.run.storage_path`` / ``run_name`` resumes. ``fault`` (tests, drills): kill one
    worker once, see :func:`_fault_point`; also read from ``$HCI_ATR_FAULT`` as ``epoch:batch:rank:marker``.
    ``trace`` (tests, benchmarks): a folder where every worker writes the audio ids of its share of each epoch and
    its peak memory (:func:`_write_trace`). Returns a :class:`TrainResult`; the best model is in
    ``result.model_dir``.
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
    check_features_match(features_dir, cfg.audio, who="this run's audio settings")
    counts = split_counts(features_dir)
    for split in (cfg.run.train_split, cfg.run.val_split):
        if counts.get(split, 0) == 0:
            raise DataError(f"{features_dir}: no rows with split '{split}' (found: "
                            f"{', '.join(f'{k}={v}' for k, v in sorted(counts.items())) or 'none'})")
    if counts[cfg.run.train_split] < tc.batch_size * cfg.run.num_workers:
        raise ConfigError(f"{features_dir}: {counts[cfg.run.train_split]} training rows cannot fill one batch of "
                          f"{tc.batch_size} on each of {cfg.run.num_workers} workers; lower --batch-size")
    captions = read_captions(captions_dir, cfg.model.ac_min_confidence)
    uses_ac = cfg.model.ac_fusion or cfg.model.ac_branch or cfg.model.ac_augment
    if uses_ac and captions_dir and not captions and read_captions(captions_dir):
        raise ConfigError(f"{captions_dir}: every generated caption is below model.ac_min_confidence="
                          f"{cfg.model.ac_min_confidence:g}; lower it (caption-all prints caption quality per "
                          f"confidence quartile) or leave it unset")
    if uses_ac and not captions:
        raise ConfigError("auxiliary captions are switched on (--ac / --ac-fusion / --ac-branch / --ac-augment) but "
                          "no --captions directory was given; run `hci-atr caption-all` and pass --captions DIR")
    if cfg.run.shuffle not in SHUFFLES:
        raise ConfigError(f"run.shuffle: expected one of {', '.join(SHUFFLES)}, got {cfg.run.shuffle!r}")
    choose_data_mode(cfg.run.data_mode, 0, 0, cfg.run.object_store_share)  # refuse a bad mode before any work
    if cfg.run.data_mode == "stream":
        _refuse_mining_when_streaming(cfg, "run.data_mode=stream")
    if fault is None and os.environ.get("HCI_ATR_FAULT"):
        e, b, r, m = os.environ["HCI_ATR_FAULT"].split(":", 3)
        fault = {"epoch": int(e), "batch": int(b), "rank": int(r), "marker": m}

    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.run.tracking_uri)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resume_config(run_dir, cfg)
    fingerprint = tracking.data_fingerprint(features_dir)
    prev = read_run_file(run_dir)
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

    announced = precheck_resume(run_dir, say)
    ensure_ray(ray_address)
    files = feature_files(features_dir)
    file_counts = split_file_counts(files, cfg.run.train_split)
    mode, why = choose_data_mode(cfg.run.data_mode, split_disk_bytes(files, file_counts),
                                 float(ray.cluster_resources().get("object_store_memory", 0)),
                                 cfg.run.object_store_share)
    if mode == "stream":
        _refuse_mining_when_streaming(cfg, why)
    say(f"training data: {mode} ({why}); shuffle {cfg.run.shuffle}")
    tracking.set_tags(uri, run_id, {"data.mode": mode})
    loop_config = {"cfg": cfg.to_dict(), "features_dir": str(features_dir), "captions": captions,
                   "tracking_uri": uri, "run_id": run_id, "fault": fault, "run_dir": str(run_dir),
                   "announced": announced, "trace": str(trace) if trace else None,
                   "stream": {"files": files, "counts": file_counts} if mode == "stream" else None,
                   "torch_threads": torch_threads or default_torch_threads(cfg.run.num_workers)}
    if mode == "stream":
        datasets, data_config = {}, None
    else:
        ds = train_dataset(features_dir, cfg.run.train_split, captions)
        datasets = {"train": ds}
        data_config = whole_data_config() if cfg.run.shuffle == "global" \
            else split_data_config(ds, cfg.run.num_workers)
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
        datasets=datasets,
        dataset_config=data_config,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        tracking.end_run(uri, run_id, "FAILED")
        raise HciAtrError(f"training failed after {cfg.run.max_failures} restarts ({one_line(e)}); "
                          f"fix the cause and re-run the same command to resume from {run_dir}") from e
    best_dir, best_metrics = best_checkpoint(result)
    if best_dir is None:
        raise HciAtrError(f"{run_dir}: training produced no checkpoint (epochs={tc.epochs}); raise --epochs")
    model_dir = export_model_dir(best_dir / CHECKPOINT_MODEL, run_dir / BEST_MODEL)
    latest, skipped = resume_checkpoint(result.checkpoint.path if result.checkpoint else best_dir, run_dir)
    if latest is None:
        raise no_checkpoint_loads(run_dir, skipped)
    history = read_checkpoint(latest)[1].state.history
    if not best_metrics:
        best_epoch = checkpoint_epoch(best_dir)
        best_metrics = next((h for h in history if int(h["epoch"]) == best_epoch), {})

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
