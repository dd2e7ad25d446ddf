"""Resumable, atomic sharded output shared by the Ray Data pipelines (extract-features, caption-all).

A pipeline's input records are split into deterministic shards: audio ids sorted, then cut into runs of
``pipeline.rows_per_shard``. Shard ``k`` is written as ``part-{k:05d}.parquet`` through a temporary name and a rename,
so a reader (or a re-run) only ever sees whole shards. A re-run recomputes only the shards whose file is missing or
that hold failed rows (their inputs may have been fixed), which gives exactly one row per successful clip: no
duplicates, no gaps.

Layout of an output directory::

    _plan.json          fingerprint of the shard plan (sorted ids + rows_per_shard); a re-run must match it
    part-00000.parquet  one file per finished shard (successful rows only)
    errors.parquet      audio_id, stage, reason: rows that failed (merged atomically, before the shard's part file)
    _SUCCESS            JSON manifest, written last; its presence means the directory is complete
    .lock               advisory lock, so two runs never write the same directory

Why errors are merged before the part file is renamed: if the run is killed in between, the shard is recomputed on
the next run and its error rows are replaced (not duplicated), so the errors table never misses a failure.

No Ray here: the pipelines feed result batches (pyarrow tables with an ``error`` column) into :func:`drain`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from hci_atr.config import atomic_write_text
from hci_atr.errors import DataError, HciAtrError

PART_TEMPLATE = "part-{:05d}.parquet"
ERRORS_FILE = "errors.parquet"
SUCCESS_FILE = "_SUCCESS"
PLAN_FILE = "_plan.json"
LOCK_FILE = ".lock"
TMP_MARK = ".tmp-"  # every temporary file in an output directory starts with "." and contains this
ERROR_COLUMN = "error"  # result batches carry it: "" = row ok, else the reason the row failed

ERROR_SCHEMA = pa.schema([("audio_id", pa.string()), ("stage", pa.string()), ("reason", pa.string())])


@dataclass(frozen=True)
class Shard:
    """One unit of resumable work: ``audio_ids`` (sorted) written together as ``part-{index:05d}.parquet``."""

    index: int
    audio_ids: tuple[str, ...]

    @property
    def file_name(self) -> str:
        return PART_TEMPLATE.format(self.index)


def plan_shards(audio_ids: Sequence[str], rows_per_shard: int) -> list[Shard]:
    """Sort ``audio_ids`` and cut them into shards of ``rows_per_shard`` (the last one may be shorter).

    The plan depends only on the set of ids and the shard size, so every re-run over the same data makes the same
    shards regardless of the order the dataset lists its rows in.
    """
    if rows_per_shard < 1:
        raise DataError(f"pipeline.rows_per_shard must be >= 1, got {rows_per_shard}")
    ids = sorted(audio_ids)
    seen = set()
    for a in ids:
        if a in seen:
            raise DataError(f"audio_id '{a}' appears more than once in the dataset; audio ids must be unique")
        seen.add(a)
    return [Shard(k, tuple(ids[s:s + rows_per_shard])) for k, s in enumerate(range(0, len(ids), rows_per_shard))]


def plan_fingerprint(shards: Sequence[Shard]) -> str:
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.index}:".encode())
        h.update("\x1f".join(s.audio_ids).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


class ShardedOutput:
    """The output directory of one pipeline stage: which shards are done, committing shards and errors, manifest.

    Use as a context manager (takes the directory lock)::

        with ShardedOutput(out, schema, "features", shards, max_failure_rate=0.1) as output:
            for shard in output.pending: ...
            output.commit(shard, table, errors)
            manifest = output.finish()
    """

    def __init__(self, out_dir: str | os.PathLike, schema: pa.Schema, stage: str, shards: Sequence[Shard],
                 max_failure_rate: float, extra_manifest: dict | None = None):
        self.dir = Path(out_dir)
        self.schema = schema
        self.stage = stage
        self.shards = list(shards)
        self.max_failure_rate = float(max_failure_rate)
        self.extra_manifest = dict(extra_manifest or {})
        self.total = sum(len(s.audio_ids) for s in self.shards)
        self.shard_of = {a: s.index for s in self.shards for a in s.audio_ids}
        self._lock_fh = None
        self._failed: dict[str, str] = {}  # audio_id -> reason, for this stage, over all runs
        self.pending: list[Shard] = []
        self.stale_removed = 0

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def __enter__(self) -> "ShardedOutput":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> list[Shard]:
        """Lock the directory, remove a killed run's temp files, check the plan, and list the shards still to do."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.dir / LOCK_FILE, "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            self._lock_fh = None
            raise DataError(f"{self.dir}: another run is writing this directory; wait for it or use another --out")
        for p in self.dir.iterdir():
            # ours (".part-00003.parquet.tmp-<pid>") and atomic_write_text's (".{name}.<random>.tmp", _plan/_SUCCESS)
            if p.name.startswith(".") and (TMP_MARK in p.name or p.name.endswith(".tmp")) and p.is_file():
                p.unlink()
                self.stale_removed += 1
        self._check_plan()
        (self.dir / SUCCESS_FILE).unlink(missing_ok=True)  # not complete until this run says so
        self._failed = {a: r for a, r in self._read_errors() if a in self.shard_of}
        # to do: shards never written, and shards with failed rows (the user may have fixed those inputs since)
        self.pending = [s for s in self.shards
                        if not (self.dir / s.file_name).exists() or any(a in self._failed for a in s.audio_ids)]
        # failures recorded for shards that will be recomputed no longer count: they get a fresh try
        retry = {a for s in self.pending for a in s.audio_ids}
        self._failed = {a: r for a, r in self._failed.items() if a not in retry}
        return self.pending

    def close(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _check_plan(self) -> None:
        plan = {"stage": self.stage, "fingerprint": plan_fingerprint(self.shards), "shards": len(self.shards),
                "rows": self.total}
        path = self.dir / PLAN_FILE
        parts = sorted(self.dir.glob("part-*.parquet"))
        if path.exists() and parts:
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("fingerprint") != plan["fingerprint"] or old.get("stage") != self.stage:
                raise DataError(
                    f"{self.dir}: holds {old.get('stage')} shards of a different dataset, split selection or "
                    f"pipeline.rows_per_shard ({old.get('rows')} rows in {old.get('shards')} shards; this run has "
                    f"{self.total} rows in {len(self.shards)} shards); use another --out or delete the directory")
        elif parts:
            raise DataError(f"{self.dir}: has part files but no {PLAN_FILE}; it was not written by this pipeline. "
                            "Use another --out or delete the directory")
        atomic_write_text(path, json.dumps(plan, indent=1))

    # -- errors table --------------------------------------------------------------------------------------------
    def _read_errors(self) -> list[tuple[str, str]]:
        path = self.dir / ERRORS_FILE
        if not path.exists():
            return []
        t = pq.read_table(path)
        return [(a, r) for a, s, r in zip(t["audio_id"].to_pylist(), t["stage"].to_pylist(),
                                            t["reason"].to_pylist()) if s == self.stage]

    def _merge_errors(self, shard: Shard, errors: dict[str, str]) -> None:
        """Replace this stage's error rows for ``shard`` by ``errors`` (rows of other shards/stages are kept)."""
        path = self.dir / ERRORS_FILE
        mine = set(shard.audio_ids)
        old = pq.read_table(path).to_pylist() if path.exists() else []
        if not errors and not any(r["audio_id"] in mine and r["stage"] == self.stage for r in old):
            return  # nothing to add, nothing stale: skip the rewrite
        kept = [r for r in old if not (r["stage"] == self.stage and r["audio_id"] in mine)]
        new = kept + [{"audio_id": a, "stage": self.stage, "reason": r} for a, r in sorted(errors.items())]
        _write_parquet_atomic(pa.Table.from_pylist(new, schema=ERROR_SCHEMA), path)

    # -- shards --------------------------------------------------------------------------------------------------
    @property
    def failed(self) -> int:
        return len(self._failed)

    def commit(self, shard: Shard, rows: pa.Table, errors: dict[str, str]) -> None:
        """Write one finished shard: ``rows`` (successful rows, any order) and ``errors`` (audio_id -> reason).

        Raises :class:`DataError` once the failures can no longer stay within ``max_failure_rate`` of all rows.
        """
        got = set(rows["audio_id"].to_pylist()) if rows.num_rows else set()
        expected = set(shard.audio_ids)
        if rows.num_rows != len(got) or got | set(errors) != expected or got & set(errors):
            raise RuntimeError(f"shard {shard.index}: result rows do not match its {len(expected)} audio ids")
        rows = rows.select(self.schema.names).cast(self.schema)
        order = {a: i for i, a in enumerate(shard.audio_ids)}
        ids = rows["audio_id"].to_pylist()
        rows = rows.take(pa.array(sorted(range(len(ids)), key=lambda i: order[ids[i]]), type=pa.int64()))
        self._merge_errors(shard, errors)
        _write_parquet_atomic(rows, self.dir / shard.file_name)
        self._failed.update(errors)
        self.check_failure_rate()

    def check_failure_rate(self) -> None:
        if self.total and self.failed > self.max_failure_rate * self.total:
            first_id, first_reason = sorted(self._failed.items())[0]
            raise DataError(
                f"{self.stage}: {self.failed} of {self.total} rows failed ({100 * self.failed / self.total:.1f}%), "
                f"more than pipeline.max_failure_rate={self.max_failure_rate:g}; stopped. See "
                f"{self.dir / ERRORS_FILE} (first: {first_id}: {first_reason}); fix the inputs and re-run to resume")

    def finish(self) -> dict:
        """Check every shard is on disk, then write the ``_SUCCESS`` manifest (last) and return it."""
        missing = [s.file_name for s in self.shards if not (self.dir / s.file_name).exists()]
        if missing:
            raise RuntimeError(f"{self.dir}: {len(missing)} shards missing after the run (first: {missing[0]})")
        rows = sum(pq.ParquetFile(self.dir / s.file_name).metadata.num_rows for s in self.shards)
        manifest = {"stage": self.stage, "rows": rows, "failed": self.failed, "total": self.total,
                    "shards": len(self.shards), "fingerprint": plan_fingerprint(self.shards),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.extra_manifest}
        if rows + self.failed != self.total:
            raise RuntimeError(f"{self.dir}: {rows} rows + {self.failed} failures != {self.total} inputs")
        atomic_write_text(self.dir / SUCCESS_FILE, json.dumps(manifest, indent=1))
        return manifest


def project_error_in(exc: BaseException) -> HciAtrError | None:
    """The project error hidden inside a Ray error, or None.

    A bad model path or backend parameter makes an actor's constructor raise (say) ``CaptionerError``; Ray Data
    surfaces it on the driver as ``ActorDiedError`` wrapping a ``RayTaskError`` whose ``cause`` is the original. The
    user should see that one-line message, not Ray's traceback. Walks ``cause``, ``args`` and the ``__cause__`` /
    ``__context__`` chain (no Ray import: attribute access only).
    """
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        if isinstance(e, HciAtrError):
            return e
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__,
                     *(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))])
    return None


def record_row(rec) -> dict:
    """A :class:`hci_atr.data.formats.Record` as a plain row for ``ray.data.from_items``."""
    return {"audio_id": rec.audio_id, "audio_path": rec.audio_path, "split": rec.split,
            "captions": list(rec.captions), "video_path": rec.video_path or "",
            "start_time": float(rec.start_time) if rec.start_time is not None else float("nan")}


def map_pending(records, output: ShardedOutput, fn_cls, fn_kwargs: dict, pipeline, batch_format: str,
                progress: bool = True) -> None:
    """Run ``fn_cls`` (a callable class, one instance per actor) over the records of the pending shards with Ray
    Data, committing each shard as soon as all its rows are back.

    ``pipeline`` is ``cfg.pipeline``: ``num_workers`` actors (``ActorPoolStrategy``), ``batch_size`` rows per call,
    ``gpus_per_worker`` GPUs per actor (0: CPU only).
    """
    import ray

    from workflows.cluster import ensure_ray

    ensure_ray()
    todo = {a for s in output.pending for a in s.audio_ids}
    items = [record_row(r) for r in sorted(records, key=lambda r: r.audio_id) if r.audio_id in todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // pipeline.batch_size)))
    ds = ds.map_batches(
        fn_cls,
        fn_constructor_kwargs=fn_kwargs,
        compute=ray.data.ActorPoolStrategy(size=pipeline.num_workers),
        batch_size=pipeline.batch_size,
        batch_format=batch_format,
        num_cpus=1,
        **({"num_gpus": pipeline.gpus_per_worker} if pipeline.gpus_per_worker else {}),
    )
    drain(ds.iter_batches(batch_format="pyarrow", batch_size=None), output, progress=progress)


def drain(batches: Iterable[pa.Table], output: ShardedOutput, progress: bool = True) -> None:
    """Consume result batches (any order, any size) and commit each shard as soon as all its rows have arrived.

    Each batch is a pyarrow table with ``audio_id``, the output columns and :data:`ERROR_COLUMN`. Memory is bounded
    by the shards in flight, not by the dataset.
    """
    from tqdm import tqdm

    want = {s.index: s for s in output.pending}
    ok: dict[int, list[pa.Table]] = {}
    errs: dict[int, dict[str, str]] = {}
    seen: dict[int, int] = {}
    bar = tqdm(total=len(want), desc=f"{output.stage} shards", unit="shard", disable=not progress)
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            ids = batch["audio_id"].to_pylist()
            reasons = batch[ERROR_COLUMN].to_pylist()
            shard_idx = [output.shard_of[a] for a in ids]
            for k in sorted(set(shard_idx)):
                if k not in want:
                    raise RuntimeError(f"result for shard {k}, which is not pending")
                take = [i for i, s in enumerate(shard_idx) if s == k]
                good = [i for i in take if not reasons[i]]
                for i in take:
                    if reasons[i]:
                        errs.setdefault(k, {})[ids[i]] = str(reasons[i])
                if good:
                    ok.setdefault(k, []).append(batch.take(good))
                seen[k] = seen.get(k, 0) + len(take)
                if seen[k] == len(want[k].audio_ids):
                    tables = ok.pop(k, [])
                    rows = pa.concat_tables(tables) if tables else output.schema.empty_table()
                    output.commit(want.pop(k), rows, errs.pop(k, {}))
                    bar.update(1)
        if want:
            raise RuntimeError(f"pipeline ended with {len(want)} shards incomplete (first: {min(want)})")
    except HciAtrError:
        raise
    except Exception as e:  # an actor raised a project error (bad model / parameter): say that, not Ray's trace
        user = project_error_in(e)
        if user is None:
            raise
        raise user from None
    finally:
        bar.close()
