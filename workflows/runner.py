"""The one Ray Data actor-pool runner of the pipelines (extract-features, caption-all, the nearest bank, index).

The driver hands one work item per pending shard to ``map_batches`` over an actor pool
(:func:`actor_pool_options`); each actor (:class:`ShardWorker`) runs a backend on the shard's rows, writes the shard
file itself (:func:`workflows.output.write_shard_temp`) and returns a small summary; :func:`drain` commits the
summaries into the :class:`workflows.output.ShardedOutput`.

Failures: an actor's call never raises. It returns its exception as data (:func:`returns_failures`, one
:data:`FAILURE_COLUMN` row), and the driver, reading through :func:`pipeline_results`, closes the pipeline and raises
it as the project error it was, in one line. (When a map call raised, Ray Data 2.60 ended the pipeline without
killing its pool: an actor stayed alive holding its CPU, and a later job waited for that CPU.) A constructor that
raises kills its actor; :func:`project_errors` turns Ray's wrapper of that back into the project error's one line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from hci_atr.errors import DataError, HciAtrError
from workflows.output import ERROR_COLUMN, SHARED_OUT_HINT, Shard, ShardedOutput, write_shard_temp

# shards queued at each pipeline actor at once (one runs, the rest wait there, so the actor never waits for the driver)
TASKS_IN_FLIGHT = 4
# what an actor returns per finished shard: the temp file it wrote (a name in the output directory) and its failures
SUMMARY_SCHEMA = pa.schema([("shard", pa.int64()), ("temp", pa.string()), ("rows", pa.int64()),
                            ("error_ids", pa.list_(pa.string())), ("error_reasons", pa.list_(pa.string()))])
# the one column of what an actor returns instead of raising: "<error class>: <one line>"
FAILURE_COLUMN = "actor_failure"


def check_failure_rate(stage: str, failed: dict[str, str], total: int, max_failure_rate: float, *, see: str = "",
                       then: str = "fix the inputs and run again") -> None:
    """Raise :class:`DataError` once more than ``max_failure_rate`` of a stage's ``total`` rows have failed
    (``failed``: audio_id -> reason; the message names the count, the limit and the first failure by id). ``see``:
    where the failures are listed (e.g. the errors table), ``then``: what the user should do next."""
    if not total or len(failed) <= max_failure_rate * total:
        return
    first_id, first_reason = sorted(failed.items())[0]
    where = f". See {see}" if see else ""
    raise DataError(f"{stage}: {len(failed)} of {total} rows failed ({100 * len(failed) / total:.1f}%), more than "
                    f"pipeline.max_failure_rate={max_failure_rate:g}; stopped{where} (first: {first_id}: "
                    f"{first_reason}); {then}")


def project_error_in(exc: BaseException) -> HciAtrError | None:
    """The project error hidden inside a Ray error, or None.

    A bad model path or backend parameter makes an actor's constructor raise (say) ``CaptionerError``; Ray Data
    surfaces it on the driver as ``ActorDiedError`` wrapping a ``RayTaskError`` whose ``cause`` is the original. The
    user should see that one-line message, not Ray's traceback. Walks ``cause``, ``args`` and the ``__cause__`` /
    ``__context__`` chain.
    """
    from ray.exceptions import RayTaskError

    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        # Ray's RayTaskError(CaptionerError) is an instance of both, but its message is Ray's traceback: look inside
        if isinstance(e, HciAtrError) and not isinstance(e, RayTaskError):
            lines = str(e).splitlines()
            if e is not exc and len(lines) > 1 and type(e).__init__ is HciAtrError.__init__:
                return type(e)(lines[0])  # raised in an actor: Ray Data appended its retry note
            return e
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__,
                     *(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))])
    return None


@contextlib.contextmanager
def project_errors():
    """Inside: an exception that hides a project error (an actor's ``CaptionerError`` wrapped by Ray) is raised as
    that error alone, so the user reads its one line rather than Ray's traceback; anything else passes unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it hides a project error
        user = project_error_in(e)
        if user is None or user is e:
            raise
        raise user from None


def returns_failures(call: Callable) -> Callable:
    """Decorator of a pipeline actor's ``__call__``: an exception becomes a one-row :data:`FAILURE_COLUMN` table
    (the error's class name and its one line) instead of propagating through Ray; see the module docstring."""
    from hci_atr.errors import one_line

    @functools.wraps(call)
    def wrapper(self, batch):
        try:
            return call(self, batch)
        except Exception as e:  # noqa: BLE001 - reported as data, raised again on the driver
            text = f"{type(e).__name__}: {one_line(e)}" if isinstance(e, HciAtrError) else one_line(e)
            return pa.table({FAILURE_COLUMN: [text]})

    return wrapper


def failure_error(text: str) -> Exception:
    """The driver's exception for an actor's :data:`FAILURE_COLUMN` text: the project error of that class with the
    actor's line, or a RuntimeError naming the foreign class (a bug, not a user's input)."""
    from hci_atr import errors

    name, _, message = text.partition(": ")
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, HciAtrError):
        return cls(message)
    return RuntimeError(f"a pipeline actor failed: {text}")


@contextlib.contextmanager
def pipeline_results(ds) -> Iterator[Iterator[pa.Table]]:
    """``with pipeline_results(ds) as batches:`` iterate a pipeline's output blocks (pyarrow). An actor's reported
    failure raises as its project error; whatever ends the iteration (the end, a failure, the driver's own error),
    the pipeline is closed on the way out, which stops its executor and kills its actors."""
    it = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))

    def batches():
        for t in it:
            if FAILURE_COLUMN in t.schema.names:
                raise failure_error(str(t[FAILURE_COLUMN][0].as_py()))
            yield t

    try:
        with project_errors():  # a constructor's project error (bad model dir): its one line, not Ray's trace
            yield batches()
    finally:
        try:
            it.close()
        except Exception:  # noqa: BLE001 - already ending; never hide the error that ended the run
            pass


def record_row(rec) -> dict:
    """A :class:`hci_atr.data.formats.Record` as a plain (JSON-safe) row: what a backend's batch holds."""
    return {"audio_id": rec.audio_id, "audio_path": rec.audio_path, "split": rec.split,
            "captions": list(rec.captions), "video_path": rec.video_path or "",
            "start_time": float(rec.start_time) if rec.start_time is not None else float("nan")}


def shard_items(records, shards: Sequence[Shard]) -> list[dict]:
    """One work item per shard for ``ray.data.from_items``: ``{"shard": index, "rows": JSON list of record_row}``
    (rows in shard order)."""
    by_id = {r.audio_id: r for r in records}
    return [{"shard": s.index, "rows": json.dumps([record_row(by_id[a]) for a in s.audio_ids])} for s in shards]


def _numpy_batch(rows: list[dict]) -> dict:
    """Rows as Ray Data's ``numpy`` batch format: one array per column (object arrays for strings and lists)."""
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = np.asarray(vals, dtype=np.float64 if any(isinstance(v, float) for v in vals) else np.int64)
        else:
            col = np.empty(len(vals), dtype=object)
            for i, v in enumerate(vals):
                col[i] = v
            out[k] = col
    return out


def _result_table(result, schema: pa.Schema) -> pa.Table:
    """A backend's result (pyarrow table or dict of arrays) as a table with ``schema`` (output columns + error)."""
    if not isinstance(result, pa.Table):
        result = pa.table({k: pa.array(v if isinstance(v, np.ndarray) else list(v)) for k, v in result.items()})
    return result.select(schema.names).cast(schema)


def _resolve_refs(kwargs: dict) -> dict:
    """``kwargs`` with each Ray ``ObjectRef`` value replaced by its object: what the driver computed once and put in
    the object store for every actor (the nearest backend's embedded caption bank)."""
    import ray

    refs = {k: v for k, v in kwargs.items() if isinstance(v, ray.ObjectRef)}
    if not refs:
        return kwargs

    return {**kwargs, **dict(zip(refs, ray.get(list(refs.values()))))}


class ShardWorker:
    """Ray Data actor: computes whole shards with ``fn_cls`` and writes each to its temp file in ``out_dir``.

    ``fn_cls(**fn_kwargs)`` is built once per actor and called on ``batch_size`` rows at a time (``batch_format``
    "pyarrow" or "numpy"); it returns the output columns plus :data:`ERROR_COLUMN`. ``__call__`` takes a batch of
    :func:`shard_items` and returns one :data:`SUMMARY_SCHEMA` row per shard: the bulk data stays in the file.
    """

    def __init__(self, fn_cls, fn_kwargs: dict, out_dir: str, schema: pa.Schema, batch_size: int,
                 batch_format: str):
        self.dir = Path(out_dir)
        if not self.dir.is_dir():
            raise DataError(f"output directory {out_dir} does not exist on Ray node {socket.gethostname()}; "
                            f"{SHARED_OUT_HINT}")
        self.schema = schema
        self.result_schema = schema.append(pa.field(ERROR_COLUMN, pa.string()))
        self.batch_size = max(1, int(batch_size))
        self.batch_format = batch_format
        self.fn = fn_cls(**_resolve_refs(fn_kwargs))

    @returns_failures
    def __call__(self, batch: pa.Table) -> pa.Table:
        out = [self.run_shard(int(k), json.loads(rows))
               for k, rows in zip(batch["shard"].to_pylist(), batch["rows"].to_pylist())]
        return pa.Table.from_pylist(out, schema=SUMMARY_SCHEMA)

    def run_shard(self, index: int, rows: list[dict]) -> dict:
        shard = Shard(index, tuple(r["audio_id"] for r in rows))
        parts = []
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            batch = pa.Table.from_pylist(chunk) if self.batch_format == "pyarrow" else _numpy_batch(chunk)
            parts.append(_result_table(self.fn(batch), self.result_schema))
        table = pa.concat_tables(parts)
        ids = table["audio_id"].to_pylist()
        reasons = table[ERROR_COLUMN].to_pylist()
        good = [i for i, r in enumerate(reasons) if not r]
        errors = {ids[i]: str(r) for i, r in enumerate(reasons) if r}
        try:
            rows = table if len(good) == table.num_rows else table.take(pa.array(good, type=pa.int64()))
            temp = write_shard_temp(self.dir, shard, rows, self.schema)
        except OSError as e:
            raise DataError(f"cannot write shard {shard.file_name} into {self.dir} on Ray node "
                            f"{socket.gethostname()} ({e}); {SHARED_OUT_HINT}") from None
        return {"shard": index, "temp": temp, "rows": len(good), "error_ids": list(errors),
                "error_reasons": list(errors.values())}


def ray_data():
    """The ``ray`` module with Ray started (or joined) for a pipeline, and Ray Data set to raise a backend's own
    exception from a map call (so :func:`project_errors` finds a project error there, not a wrapper)."""
    import ray

    from workflows.cluster import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().raise_original_map_exception = True
    return ray


def actor_pool_options(ray, pipeline, n_items: int) -> dict:
    """``map_batches`` options of a pipeline's actor pool over ``n_items`` work items (one per call):
    ``pipeline.num_workers`` actors but no more than items (each actor pays its start-up: imports, model load,
    before its first item), 1 CPU and ``pipeline.gpus_per_worker`` GPUs each (0: CPU only), and up to
    :data:`TASKS_IN_FLIGHT` items queued per actor: with Ray Data's default (2) an actor often finished an item with
    nothing queued and idled until the executor's next 0.1 s poll (BENCHMARKS.md)."""
    return {"compute": ray.data.ActorPoolStrategy(size=max(1, min(pipeline.num_workers, n_items)),
                                                  max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT),
            "batch_size": 1, "batch_format": "pyarrow", "num_cpus": 1,
            **({"num_gpus": pipeline.gpus_per_worker} if pipeline.gpus_per_worker else {})}


def map_pending(records, output: ShardedOutput, fn_cls, fn_kwargs: dict, pipeline, batch_format: str,
                progress: bool = True) -> None:
    """Compute and write the pending shards of ``output`` with Ray Data: one item per shard, handed to one of
    ``pipeline.num_workers`` :class:`ShardWorker` actors (``ActorPoolStrategy``), each running ``fn_cls`` (one
    instance per actor) on ``pipeline.batch_size`` rows at a time with ``pipeline.gpus_per_worker`` GPUs (0: CPU
    only) and writing the shard's temp file; the driver commits each shard as its summary comes back.
    """
    ray = ray_data()
    items = shard_items(records, output.pending)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(  # one shard per call
        ShardWorker,
        fn_constructor_kwargs={"fn_cls": fn_cls, "fn_kwargs": fn_kwargs, "out_dir": str(output.dir.resolve()),
                               "schema": output.schema, "batch_size": pipeline.batch_size,
                               "batch_format": batch_format},
        **actor_pool_options(ray, pipeline, len(items)),
    )
    try:
        with pipeline_results(ds) as summaries:
            drain(summaries, output, progress=progress)
    finally:
        # temp files no summary claimed (a retried task's, or a stopped run's); the next open() catches stragglers
        output.remove_temp_files()


def drain(summaries: Iterable[pa.Table], output: ShardedOutput, progress: bool = True) -> None:
    """Consume shard summaries (:data:`SUMMARY_SCHEMA` tables, any order) and commit each shard as it arrives."""
    from tqdm import tqdm

    want = {s.index: s for s in output.pending}
    bar = tqdm(total=len(want), desc=f"{output.stage} shards", unit="shard", disable=not progress)
    try:
        for batch in summaries:
            for row in batch.to_pylist():
                k = int(row["shard"])
                if k not in want:
                    raise RuntimeError(f"result for shard {k}, which is not pending")
                errors = dict(zip(row["error_ids"], row["error_reasons"]))
                if len(errors) + int(row["rows"]) != len(want[k].audio_ids):
                    raise RuntimeError(f"shard {k}: {row['rows']} rows + {len(errors)} errors != "
                                       f"{len(want[k].audio_ids)} audio ids")
                output.commit_file(want.pop(k), row["temp"], errors)
                bar.update(1)
        if want:
            raise RuntimeError(f"pipeline ended with {len(want)} shards incomplete (first: {min(want)})")
    finally:
        bar.close()
