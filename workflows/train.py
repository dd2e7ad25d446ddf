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

Data modes (``run.data_mode``; ``auto`` streams when the split's estimated in-memory size exceeds
``run.object_store_share`` of the object store, :func:`choose_data_mode`):

- **materialize**: the split lives in the object store once. With ``run.shuffle = "global"`` (the default) every
  worker reads the whole dataset (zero-copy on its node, :func:`whole_data_config`) and trains on this epoch's share
  of it: a seeded permutation of all rows from (seed, epoch) cut into N equal shares (:func:`epoch_shares`), so the
  rows a clip meets change every epoch. ``"split"``: each worker keeps one fixed split (:func:`split_data_config`).
- **stream**: nothing goes to the object store; each worker reads only its share of the parquet shards every epoch
  (:func:`stream_plan`: the feature files in a seeded per-epoch order, their split rows cut into N equal contiguous
  shares), one row group at a time, and draws its batches at random from a buffer of ``run.shuffle_buffer_rows``
  rows (:func:`shuffle_buffer`): memory per worker is the buffer's, whatever the data size.

In every mode all workers get exactly as many rows (the remainder, ``n % N`` rows, sits out the epoch; a different
one every epoch when shuffled), so they run the same number of steps and the collectives line up.

Run directory ``<storage_path>/<run_name>/`` (``run_dir``):
  config.yaml            the resolved config of the run
  hci_atr_run.json       {"mlflow_run_id", "tracking_uri", "data_fingerprint"}: what a re-run resumes
  checkpoint_*/          Ray Train checkpoints (best ``num_to_keep`` by val_rsum + the latest), each holding
                           model/ (HciAtrModel.save_pretrained), train_state.pt (FitState: epoch, history, best and
                           early-stopping state; optimizer state; loads with ``torch.load(weights_only=True)``),
                           meta.json (epoch, val_rsum, mlflow_run_id, sha256 of every other file; written last)
                         copied in under a temporary name, fsync'd and renamed (a crash leaves whole ones only)
  best_model/            the best checkpoint's model/ directory, exported after fit (load with from_pretrained)

Resume: running the same command again (same storage path and run name) makes Ray Train V2 restore its checkpoint
manager from the run directory; the loop starts after the checkpoint's epoch and the driver keeps logging into the
MLflow run named in ``hci_atr_run.json``. A worker that dies mid-epoch is restarted (``FailureConfig.max_failures``)
from the latest checkpoint the same way. A checkpoint that does not check out (checksum, truncated or foreign
train_state.pt) is passed over for the newest older one that does, with one line saying so.

Determinism: the fit loop's rules (hci_atr/training/loop.py: initial weights from ``seed`` on every rank, each epoch
re-seeded from (seed, epoch, rank)); each epoch's shares are a function of (seed, epoch, N) alone (never of task
timing), taken in audio_id order (materialize) or in the epoch's file order (stream), and batched with the epoch's
generator: the same seed and worker count give the same CPU numbers, also across a resume. With one worker the
materialized share is every row in audio_id order, batched by the same function as ``hci-atr ablate``'s
in-process loop, so both give the same numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from hci_atr.data.shards import (FEATURE_COLUMNS, check_features_match, feature_files, read_captions, read_split_rows,
                                 split_counts)
from hci_atr.errors import ConfigError, DataError, HciAtrError, ModelLoadError, one_line
from hci_atr.files import atomic_write_bytes, atomic_write_text, copy_dir_atomic, fsync_tree
from hci_atr.training import FitHooks, epoch_seed, evaluate, fit, iter_batches, make_batch, seeded_model
from hci_atr.training.distributed import GatherWithGrad, broadcast_value, mean_over_workers
from workflows.settings import Settings

RUN_FILE = "hci_atr_run.json"
BEST_MODEL = "best_model"
CHECKPOINT_MODEL = "model"
CHECKPOINT_STATE = "train_state.pt"
CHECKPOINT_META = "meta.json"
# Settings keys a resumed run may change (they do not change what is learnt from the data, or only extend it).
RESUMABLE_KEYS = {"train.epochs", "run.max_failures", "run.num_workers", "run.use_gpu", "run.tracking_uri",
                  "run.storage_path", "train.early_stopping_patience", "run.features_dir", "run.data_mode",
                  "run.object_store_share", "run.shuffle", "run.shuffle_buffer_rows"}
DATA_MODES = ("auto", "materialize", "stream")
SHUFFLES = ("global", "split")
# object-store bytes per parquet byte of a materialized feature split, what `auto` multiplies the split's on-disk
# bytes by: float32 mel barely compresses, so Arrow in memory is about the file size; the rest is margin
STORE_EXPANSION = 1.25


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
# the worker's split, per epoch
# ---------------------------------------------------------------------------------------------------------------


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


def shard_rows(shard):
    """A worker's split of the training rows for one epoch, as :class:`hci_atr.training.ArrowRows` in audio_id order.

    The split's blocks are read whole (zero-copy Arrow) and cut into batches by :func:`hci_atr.training.iter_batches`
    over this order, the function ``hci-atr ablate`` uses over ``read_split_rows`` (also audio_id order): with one
    worker both see the same rows in the same order, so the same seed gives the same batches.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from hci_atr.training import ArrowRows

    tables = [t for t in shard.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    if not tables:
        raise DataError("this training worker's split of the feature rows is empty; lower run.num_workers")
    table = pa.concat_tables(tables, promote_options="default")
    ids = table.column("audio_id")
    order = pc.sort_indices(ids)
    if order.to_pylist() != list(range(table.num_rows)):  # the feature shards are in audio_id order already
        table = table.take(order)
    return ArrowRows(table)


def whole_data_config():
    """A Ray Train ``DataConfig`` that hands every worker the whole materialized dataset (no split): each worker
    takes its share of every epoch itself (:func:`epoch_shares`). On one node the blocks are read zero-copy from the
    shared object store, so N workers hold one copy between them."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    # its own stream per use (stream), apart from the torch generators the fit loop seeds from epoch_seed
    return np.random.default_rng([epoch_seed(seed, epoch), stream])


def epoch_shares(n: int, world: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The whole-set shuffle of epoch ``epoch``: a permutation of ``n`` rows seeded from (seed, epoch), cut into
    ``world`` equal contiguous shares of ``n // world`` rows, each returned sorted (row positions in audio_id order;
    the worker's batches then shuffle within it). The last ``n % world`` rows of the permutation sit out the epoch
    (different ones every epoch). With ``world = 1`` the share is every row in order."""
    k = n // world
    if world == 1:
        return [np.arange(n, dtype=np.int64)]
    perm = _rng(seed, epoch, 0x5A4E).permutation(n)
    return [np.sort(perm[r * k:(r + 1) * k]) for r in range(world)]


# -- streaming ------------------------------------------------------------------------------------------------------


def split_file_counts(files: Sequence[str], split: str) -> list[int]:
    """Rows of ``split`` in each feature file (reads the split column only)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return [int(pc.sum(pc.equal(pq.read_table(f, columns=["split"]).column("split"), split)).as_py() or 0)
            for f in files]


def stream_plan(counts: Sequence[int], world: int, seed: int, epoch: int) -> list[list[tuple[int, int, int]]]:
    """What each worker streams in epoch ``epoch``: the feature files in an order seeded from (seed, epoch), their
    split rows (``counts[f]`` in file ``f``) one stream, cut into ``world`` equal contiguous shares of
    ``sum(counts) // world`` rows (the last ``sum % world`` sit out). Returns per rank its ``(file, start, stop)``
    ranges, positions among the file's split rows, in reading order."""
    n = int(sum(counts))
    k = n // world
    plan: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
    pos = 0  # where file f starts in the epoch's stream
    for f in _rng(seed, epoch, 0xF11E).permutation(len(counts)).tolist():
        c = int(counts[f])
        for r in range(world):
            a, b = max(pos, r * k), min(pos + c, (r + 1) * k)
            if a < b:
                plan[r].append((f, a - pos, b - pos))
        pos += c
    return plan


def stream_rows(files: Sequence[str], ranges: Iterable[tuple[int, int, int]], split: str,
                captions: dict[str, str], batch_rows: int = 256) -> Iterator[dict]:
    """The ``split`` rows of ``ranges`` (:func:`stream_plan`) read file by file, ``batch_rows`` rows at a time
    (pyarrow), as rows for ``make_batch`` with ``generated_caption`` joined from ``captions``. Each row owns its
    mel (a copy), so a row waiting in a shuffle buffer holds no read batch in memory."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from hci_atr.data.shards import table_to_rows

    for f, start, stop in ranges:
        seen = 0  # split rows of file f before this batch
        with pq.ParquetFile(files[f]) as pf:
            for rb in pf.iter_batches(batch_size=batch_rows, columns=list(FEATURE_COLUMNS)):
                t = pa.Table.from_batches([rb])
                t = t.filter(pc.equal(t.column("split"), split))
                a, b = max(start - seen, 0), min(stop - seen, t.num_rows)
                seen += t.num_rows
                if a < b:
                    for row in table_to_rows(t.slice(a, b - a)):
                        row["mel"] = row["mel"].copy()
                        row["generated_caption"] = captions.get(row["audio_id"])
                        yield row
                if seen >= stop:
                    break


T = TypeVar("T")


def shuffle_buffer(items: Iterable[T], size: int, generator) -> Iterator[T]:
    """Items in a random order drawn with ``generator`` (torch) from a buffer of ``size``: once it is full, each
    new item sends out a random one of the buffer; at the end the rest leave in a random permutation (a buffer as
    large as the input is a full shuffle)."""
    import torch

    buf: list[T] = []
    for item in items:
        buf.append(item)
        if len(buf) >= max(1, size):
            j = int(torch.randint(len(buf), (1,), generator=generator))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    for j in torch.randperm(len(buf), generator=generator).tolist():
        yield buf[j]


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items; an incomplete last one is dropped (equal steps on every worker)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []


# -- which mode -----------------------------------------------------------------------------------------------------


def split_disk_bytes(files: Sequence[str], counts: Sequence[int]) -> int:
    """On-disk bytes of a split: each feature file's size times the share of its rows that are in the split."""
    import pyarrow.parquet as pq

    total = 0
    for f, c in zip(files, counts):
        rows = pq.ParquetFile(f).metadata.num_rows
        if rows:
            total += int(os.path.getsize(f) * c / rows)
    return total


def choose_data_mode(mode: str, split_bytes: int, store_bytes: float, share: float) -> tuple[str, str]:
    """(``"materialize"`` | ``"stream"``, why) for ``run.data_mode = mode``: ``auto`` streams when the split's
    on-disk bytes x :data:`STORE_EXPANSION` exceed ``share`` of the object store's capacity ``store_bytes``."""
    if mode not in DATA_MODES:
        raise ConfigError(f"run.data_mode: expected one of {', '.join(DATA_MODES)}, got {mode!r}")
    if not 0 < share <= 1:
        raise ConfigError(f"run.object_store_share: expected a fraction in (0, 1], got {share!r}")
    need, room = split_bytes * STORE_EXPANSION, store_bytes * share
    size = f"{need / 2**20:.0f} MiB in the object store vs {room / 2**20:.0f} MiB ({share:.0%} of it)"
    if mode != "auto":
        return mode, f"run.data_mode={mode} ({size})"
    return ("stream" if need > room else "materialize"), f"auto: {size}"


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
# checkpoints: write (checksummed, fsync'd), check, pick the one to resume from
# ---------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint(d: str | os.PathLike, model, optimizer, state, meta: dict) -> Path:
    """Fill the folder ``d``: model/ (save_pretrained), train_state.pt (:class:`hci_atr.training.FitState` +
    optimizer state: tensors, numbers, lists and dicts only, so it loads with ``weights_only=True``), and last
    meta.json (``meta`` + the sha256 of every other file); everything fsync'd."""
    import torch

    d = Path(d)
    model.save_pretrained(d / CHECKPOINT_MODEL)
    buf = io.BytesIO()
    torch.save({**state.to_dict(), "optimizer": optimizer.state_dict()}, buf)
    atomic_write_bytes(d / CHECKPOINT_STATE, buf.getvalue())
    files = {p.relative_to(d).as_posix(): _sha256(p) for p in sorted(d.rglob("*"))
             if p.is_file() and p.name != CHECKPOINT_META}
    atomic_write_text(d / CHECKPOINT_META, json.dumps({**meta, "files": files}, indent=1))
    fsync_tree(d)
    return d


def _read_meta(d: Path) -> dict:
    doc = json.loads((d / CHECKPOINT_META).read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{CHECKPOINT_META} is not a JSON object")
    return doc


def _load_state(d: Path) -> dict:
    import torch

    # weights_only: a checkpoint is data; unpickling arbitrary objects from it would run their code
    state = torch.load(d / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{CHECKPOINT_STATE} holds a {type(state).__name__}, not a dict")
    return state


def checkpoint_problem(d: str | os.PathLike) -> str | None:
    """Why the checkpoint folder ``d`` cannot be resumed from (one line), or None when it can.

    Checked against the checksums in its meta.json; a checkpoint written before they were recorded must at least
    have a train_state.pt that loads."""
    d = Path(d)
    try:
        meta = _read_meta(d)
    except (OSError, ValueError) as e:
        return f"{CHECKPOINT_META}: {one_line(e)}"
    files = meta.get("files")
    if isinstance(files, dict) and files:
        for rel, digest in sorted(files.items()):
            p = d / rel
            if not p.is_file():
                return f"{rel} is missing"
            if _sha256(p) != digest:
                return f"{rel} does not match its checksum"
        return None
    try:
        _load_state(d)
    except Exception as e:  # noqa: BLE001 - truncated file, foreign pickle, ...
        return f"{CHECKPOINT_STATE}: {one_line(e)}"
    return None


def checkpoint_epoch(d: str | os.PathLike) -> int | None:
    try:
        return int(_read_meta(Path(d))["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_checkpoint(d: str | os.PathLike):
    """``(model state_dict, hci_atr.training.Resume)`` of a checkpoint folder; a ModelLoadError when it does not
    load (checksum, truncated file, a pickle that is not plain data)."""
    from hci_atr.models.model import HciAtrModel
    from hci_atr.training import FitState, Resume

    d = Path(d)
    why = checkpoint_problem(d)
    if why is None:
        try:
            state = _load_state(d)
            weights = HciAtrModel.from_pretrained(d / CHECKPOINT_MODEL).state_dict()
            fit_state = FitState.from_dict(state)
        except Exception as e:  # noqa: BLE001
            why = one_line(e)
    if why is not None:
        raise ModelLoadError(f"{d}: {why}")
    return weights, Resume(fit_state, state.get("optimizer"))


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The run's Ray Train checkpoint folders, oldest first (Ray names them by time)."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())


def resume_checkpoint(latest: str | os.PathLike | None,
                      run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from: ``latest`` (what Ray Train hands the workers) when it checks out, else the
    newest older one of the run that does (Ray keeps ``num_to_keep`` of them). Returns it (None: none checks out)
    and the (folder, why) of each newer one passed over."""
    if latest is None:
        return None, []
    latest = Path(latest)
    candidates = [latest] + [p for p in reversed(checkpoint_dirs(run_dir)) if p.name < latest.name]
    skipped: list[tuple[Path, str]] = []
    for p in candidates:
        why = checkpoint_problem(p)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


def resume_note(chosen: Path, skipped: list[tuple[Path, str]]) -> str:
    """The one line that says a resume passes over unreadable checkpoints."""
    bad = ", ".join(p.name for p, _ in skipped)
    e = checkpoint_epoch(chosen)
    return (f"resume: checkpoint {bad} is unreadable ({skipped[0][1]}); resuming from the previous one, "
            f"{chosen.name} (epoch {e}); the epochs after it are trained again")


def _no_checkpoint_loads(run_dir: Path, skipped: list[tuple[Path, str]]) -> ModelLoadError:
    return ModelLoadError(f"{run_dir}: no checkpoint of this run loads ({skipped[0][0].name}: {skipped[0][1]}); "
                           f"pass a new --run-name to train afresh")


def _upload_fsynced(run_dir: Path):
    """A ``ray.train.report`` upload: the checkpoint folder is copied into the run directory under a temporary name,
    fsync'd and renamed into place, so a crash leaves a whole checkpoint or none."""
    def upload(checkpoint, dir_name: str):
        import ray.train

        return ray.train.Checkpoint.from_directory(str(copy_dir_atomic(checkpoint.path, run_dir / dir_name)))
    return upload


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
                             checkpoint_upload_fn=_upload_fsynced(self.run_dir))


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
            raise _no_checkpoint_loads(Path(config["run_dir"]), skipped)
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
    return copy_dir_atomic(src, dst)


def _precheck_resume(run_dir: Path, say: Callable[[str], None]) -> list[str]:
    """Before the workers start: when the run's newest checkpoint does not check out, say (one line) which older one
    the resume falls back to, and refuse when none does. Returns the names passed over (the workers do not repeat
    the line)."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        return []
    chosen, skipped = resume_checkpoint(dirs[-1], run_dir)
    if chosen is None:
        raise _no_checkpoint_loads(run_dir, skipped)
    if skipped:
        say(resume_note(chosen, skipped))
    return [p.name for p, _ in skipped]


def _best_checkpoint(result) -> tuple[Path | None, dict]:
    """The reported checkpoint with the best val_rsum that checks out, and its metrics."""
    ranked = sorted(result.best_checkpoints or [], key=lambda cm: float(cm[1].get("val_rsum", float("-inf"))),
                    reverse=True)
    for c, m in ranked:
        if checkpoint_problem(c.path) is None:
            return Path(c.path), dict(m)
    if result.checkpoint is not None and checkpoint_problem(result.checkpoint.path) is None:
        return Path(result.checkpoint.path), {}
    return None, {}


def default_torch_threads(num_workers: int, cpus: int | None = None) -> int:
    """CPU threads per worker: the machine's cores split between the workers (at least 1), so N workers do not
    oversubscribe the cores with N x all-core intra-op pools."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, num_workers))


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
    captions = read_captions(captions_dir)
    if (cfg.model.ac_fusion or cfg.model.ac_branch or cfg.model.ac_augment) and not captions:
        raise ConfigError("auxiliary captions are switched on (--ac / --ac-fusion / --ac-branch / --ac-augment) but "
                          "no --captions directory was given; run `hci-atr caption-all` and pass --captions DIR")
    if cfg.run.shuffle not in SHUFFLES:
        raise ConfigError(f"run.shuffle: expected one of {', '.join(SHUFFLES)}, got {cfg.run.shuffle!r}")
    choose_data_mode(cfg.run.data_mode, 0, 0, cfg.run.object_store_share)  # refuse a bad mode before any work
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

    announced = _precheck_resume(run_dir, say)
    ensure_ray(ray_address)
    files = feature_files(features_dir)
    file_counts = split_file_counts(files, cfg.run.train_split)
    mode, why = choose_data_mode(cfg.run.data_mode, split_disk_bytes(files, file_counts),
                                 float(ray.cluster_resources().get("object_store_memory", 0)),
                                 cfg.run.object_store_share)
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
    best_dir, best_metrics = _best_checkpoint(result)
    if best_dir is None:
        raise HciAtrError(f"{run_dir}: training produced no checkpoint (epochs={tc.epochs}); raise --epochs")
    model_dir = export_model_dir(best_dir / CHECKPOINT_MODEL, run_dir / BEST_MODEL)
    latest, skipped = resume_checkpoint(result.checkpoint.path if result.checkpoint else best_dir, run_dir)
    if latest is None:
        raise _no_checkpoint_loads(run_dir, skipped)
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


def retrieval_examples(model_dir: str | os.PathLike, features_dir: str | os.PathLike, split: str,
                       captions: dict[str, str] | None = None, n_queries: int = 5, top_k: int = 5,
                       rows: list[dict] | None = None) -> str:
    """Text query -> top clips for the first ``n_queries`` clips' first captions (fused HCI score)."""
    import torch

    from hci_atr.models.model import HciAtrModel
    from hci_atr.training import embed_split
    from workflows import tracking

    model = HciAtrModel.from_pretrained(model_dir).eval()
    rows = rows if rows is not None else read_split_rows(features_dir, split, captions)
    with torch.no_grad():
        emb = embed_split(model, rows, model.cfg)
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
