"""How the training split reaches the Ray Train workers of ``hci-atr train``: the data modes, each epoch's shares
and the feature-shard readers behind them.

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
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

from hci_atr.data.shards import FEATURE_COLUMNS, feature_files
from hci_atr.errors import ConfigError, DataError
from hci_atr.training import epoch_seed

DATA_MODES = ("auto", "materialize", "stream")
SHUFFLES = ("global", "split")
# object-store bytes per parquet byte of a materialized feature split, what `auto` multiplies the split's on-disk
# bytes by: float32 mel barely compresses, so Arrow in memory is about the file size; the rest is margin
STORE_EXPANSION = 1.25


# feature shards -> rows


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


# the worker's split, per epoch


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
