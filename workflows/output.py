"""Resumable, atomic sharded output of the pipelines (extract-features, caption-all): planning, committing, manifest.

A pipeline's input records are split into deterministic shards: audio ids sorted, then cut into runs of
``pipeline.rows_per_shard``. Shard ``k`` is written as ``part-{k:05d}.parquet`` through a temporary name and a rename,
so a reader (or a re-run) only ever sees whole shards. A re-run recomputes only the shards whose file is missing or
that hold failed rows (their inputs may have been fixed), which gives exactly one row per successful clip: no
duplicates, no gaps.

Layout of an output directory::

    _plan.json          fingerprint of the shard plan (sorted ids + rows_per_shard) and the run's identity
                        (everything that changes a row: audio config, backend, model, params); a re-run must match
    part-00000.parquet  one file per finished shard (successful rows only)
    errors.parquet      audio_id, stage, reason: rows that failed (merged atomically, before the shard's part file)
    _SUCCESS            JSON manifest, written last; its presence means the directory is complete
    .lock               advisory lock, so two runs never write the same directory

Why errors are merged before the part file is renamed: if the run is killed in between, the shard is recomputed on
the next run and its error rows are replaced (not duplicated), so the errors table never misses a failure.

Who writes what: the unit of work handed to a pipeline actor is one pending shard. The actor (:class:`ShardWorker`)
computes the shard's rows and writes them itself, sorted by ``audio_id``, to a temporary name in the output directory
(``.part-00003.parquet.tmp-<pid>-<random>``), and returns only a small summary (shard, temp name, rows, error rows).
The driver (:func:`drain`) checks the file's schema and ``audio_id`` column against the shard, merges the error rows,
renames the file to ``part-00003.parquet`` and writes ``_SUCCESS`` last, so the bulk data (mel arrays) never crosses
the object store to the driver. The output directory must therefore be reachable from every actor: a local disk on
one machine, shared storage on a cluster. A killed run's temp files are removed by the next
:meth:`ShardedOutput.open`.

Plain Python + pyarrow: :mod:`workflows.runner` runs the actors that fill such a directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from hci_atr.errors import DataError
from hci_atr.files import atomic_write_text, fsync_path

PART_TEMPLATE = "part-{:05d}.parquet"
ERRORS_FILE = "errors.parquet"
SUCCESS_FILE = "_SUCCESS"
PLAN_FILE = "_plan.json"
LOCK_FILE = ".lock"
TMP_MARK = ".tmp-"  # every temporary file in an output directory starts with "." and contains this
ERROR_COLUMN = "error"  # result batches carry it: "" = row ok, else the reason the row failed
# the fix for every "an actor and the driver do not see the same --out" error
SHARED_OUT_HINT = "--out must be a directory every Ray node reads and writes (shared storage on a cluster)"
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


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth parquet dictionary encoding: all but floating-point ones. A mel's values almost never repeat, so
    the writer would build a dictionary, find it too large and fall back: time and file size for nothing
    (BENCHMARKS.md, "extract-features")."""
    def floating(t: pa.DataType) -> bool:
        while pa.types.is_list(t) or pa.types.is_large_list(t):
            t = t.value_type
        return pa.types.is_floating(t)

    return [f.name for f in schema if not floating(f.type)]


def write_shard_temp(out_dir: str | os.PathLike, shard: Shard, rows: pa.Table, schema: pa.Schema) -> str:
    """Write ``rows`` (the successful rows of ``shard``, any order) as ``schema``, sorted in shard order (by
    ``audio_id``), to a temporary name in ``out_dir``; return that name (``.part-00003.parquet.tmp-<pid>-<random>``).

    Readers never see it: :meth:`ShardedOutput.commit_file` checks it and renames it to the part file. The random tail
    keeps two writers of the same shard apart (a task retried on another node while a lost one still runs).
    """
    rows = rows.select(schema.names).cast(schema)
    order = {a: i for i, a in enumerate(shard.audio_ids)}
    ids = rows["audio_id"].to_pylist()
    stray = [a for a in ids if a not in order]
    if stray:
        raise RuntimeError(f"shard {shard.index}: result row '{stray[0]}' is not one of its audio ids")
    perm = sorted(range(len(ids)), key=lambda i: order[ids[i]])
    if perm != list(range(len(ids))):  # a take copies every column (the mel lists too): only when out of order
        rows = rows.take(pa.array(perm, type=pa.int64()))
    name = f".{shard.file_name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp = Path(out_dir) / name
    try:
        pq.write_table(rows, tmp, use_dictionary=_dictionary_columns(schema))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return name


def _whole_part(path: Path) -> bool:
    """A committed part file that counts as done: present and with a readable parquet footer (a 0-byte or truncated
    file, e.g. from a crash before the data reached the disk, is recomputed)."""
    try:
        if path.stat().st_size == 0:
            return False
        pq.read_metadata(path)
        return True
    except (OSError, pa.ArrowInvalid):
        return False


def _changed_keys(old: dict | None, new: dict) -> list[str]:
    """Dotted keys whose values differ between two identities (None or {} = an output written before identities were
    recorded: accepted as it is)."""
    if not old:
        return []

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


class ShardedOutput:
    """The output directory of one pipeline stage: which shards are done, committing shards and errors, manifest.

    Use as a context manager (takes the directory lock)::

        with ShardedOutput(out, schema, "features", shards, max_failure_rate=0.1) as output:
            for shard in output.pending:
                temp = write_shard_temp(output.dir, shard, rows, schema)   # (normally on a pipeline actor)
                output.commit_file(shard, temp, errors)
            manifest = output.finish()
    """

    def __init__(self, out_dir: str | os.PathLike, schema: pa.Schema, stage: str, shards: Sequence[Shard],
                 max_failure_rate: float, extra_manifest: dict | None = None, identity: dict | None = None):
        """``identity``: JSON-able description of everything that changes a row (audio front end, captioner, model,
        params). A re-run whose identity differs from the one the finished shards were written with is refused."""
        self.dir = Path(out_dir)
        self.identity = json.loads(json.dumps(identity or {}, sort_keys=True, default=str))
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
        try:
            self.open()
        except BaseException:
            self.close()  # a refused open must not keep the directory locked
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> list[Shard]:
        """Lock the directory, remove a killed run's temp files, check the plan, and list the shards still to do."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_own()  # before the lock file: nothing is written into a folder that is not ours
        self._lock_fh = open(self.dir / LOCK_FILE, "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            self._lock_fh = None
            raise DataError(f"{self.dir}: another run is writing this directory; wait for it or use another --out")
        self.stale_removed = self.remove_temp_files()
        self._check_plan()
        (self.dir / SUCCESS_FILE).unlink(missing_ok=True)  # not complete until this run says so
        self._failed = {a: r for a, r in self._read_errors() if a in self.shard_of}
        # to do: shards never written, and shards with failed rows (the user may have fixed those inputs since)
        self.pending = [s for s in self.shards
                        if not _whole_part(self.dir / s.file_name) or any(a in self._failed for a in s.audio_ids)]
        # failures recorded for shards that will be recomputed no longer count: they get a fresh try
        retry = {a for s in self.pending for a in s.audio_ids}
        self._failed = {a: r for a, r in self._failed.items() if a not in retry}
        return self.pending

    def remove_temp_files(self) -> int:
        """Delete temporary files left in the directory (a killed run's, or a retried actor's); returns how many.
        Only safe while this run holds the lock and no actor of it is still writing."""
        n = 0
        for p in self.dir.iterdir():
            # ours (".part-00003.parquet.tmp-<pid>-<random>", ".errors.parquet.tmp-<pid>") and atomic_write_text's
            # (".{name}.<random>.tmp", _plan/_SUCCESS)
            if p.name.startswith(".") and (TMP_MARK in p.name or p.name.endswith(".tmp")) and p.is_file():
                p.unlink(missing_ok=True)
                n += 1
        return n

    def close(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _check_own(self) -> None:
        """Refuse a non-empty directory that is not this pipeline's output: nothing here may touch what it did not
        write (temp-file clean-up included)."""
        if (self.dir / PLAN_FILE).exists():
            return
        foreign = [p.name for p in self.dir.iterdir() if p.name != LOCK_FILE]
        if foreign:
            raise DataError(f"{self.dir}: is not empty and is not an output of this pipeline (no {PLAN_FILE}; holds "
                            f"e.g. {sorted(foreign)[0]!r}); choose an empty or new --out (nothing was changed)")

    def _check_plan(self) -> None:
        plan = {"stage": self.stage, "fingerprint": plan_fingerprint(self.shards), "shards": len(self.shards),
                "rows": self.total, "identity": self.identity}
        path = self.dir / PLAN_FILE
        parts = sorted(self.dir.glob("part-*.parquet"))
        if path.exists() and parts:
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("fingerprint") != plan["fingerprint"] or old.get("stage") != self.stage:
                raise DataError(
                    f"{self.dir}: holds {old.get('stage')} shards of a different dataset, split selection or "
                    f"pipeline.rows_per_shard ({old.get('rows')} rows in {old.get('shards')} shards; this run has "
                    f"{self.total} rows in {len(self.shards)} shards); use another --out or delete the directory")
            changed = _changed_keys(old.get("identity"), self.identity)
            if changed:
                raise DataError(
                    f"{self.dir}: its {self.stage} shards were written with other settings ({', '.join(changed[:6])}); "
                    f"re-run with the same settings to resume, or use a new --out (or delete {self.dir}) to start "
                    f"afresh")
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

    def commit_file(self, shard: Shard, temp_name: str, errors: dict[str, str]) -> None:
        """Publish one finished shard: ``temp_name`` (written by :func:`write_shard_temp` into this directory, its
        successful rows) and ``errors`` (audio_id -> reason, its failed rows).

        Checks the file against the shard (schema; ``audio_id`` column == the shard's ids minus the failed ones, in
        order: no duplicates, no gaps), merges the errors, then renames the file to ``part-XXXXX.parquet``.
        Raises :class:`DataError` once the failures can no longer stay within ``max_failure_rate`` of all rows.
        """
        if Path(temp_name).name != temp_name or not temp_name.startswith(f".{shard.file_name}{TMP_MARK}"):
            raise RuntimeError(f"shard {shard.index}: unexpected temp file name {temp_name!r}")
        tmp = self.dir / temp_name
        try:
            schema = pq.read_schema(tmp)
            ids = pq.read_table(tmp, columns=["audio_id"])["audio_id"].to_pylist()
        except FileNotFoundError:
            raise DataError(f"{tmp}: a pipeline actor wrote this shard but it is not visible to the driver; "
                            f"{SHARED_OUT_HINT}") from None
        if not schema.equals(self.schema):
            raise RuntimeError(f"shard {shard.index}: {tmp} has schema {schema}, expected {self.schema}")
        expected = [a for a in shard.audio_ids if a not in errors]
        if ids != expected or not set(errors) <= set(shard.audio_ids):
            raise RuntimeError(f"shard {shard.index}: result rows do not match its {len(shard.audio_ids)} audio ids")
        self._merge_errors(shard, errors)
        fsync_path(tmp)
        os.replace(tmp, self.dir / shard.file_name)
        fsync_path(self.dir)
        self._failed.update(errors)
        self.check_failure_rate()

    def check_failure_rate(self) -> None:
        if self.total and self.failed > self.max_failure_rate * self.total:
            first_id, first_reason = sorted(self._failed.items())[0]
            raise DataError(
                f"{self.stage}: {self.failed} of {self.total} rows failed ({100 * self.failed / self.total:.1f}%), "
                f"more than pipeline.max_failure_rate={self.max_failure_rate:g}; stopped. See "
                f"{self.dir / ERRORS_FILE} (first: {first_id}: {first_reason}); fix the inputs and re-run to resume")

    def finish(self, report: dict | None = None) -> dict:
        """Check every shard is on disk, then write the ``_SUCCESS`` manifest (last; ``report``: what the stage
        measured of its own output, e.g. caption quality) and return it."""
        missing = [s.file_name for s in self.shards if not (self.dir / s.file_name).exists()]
        if missing:
            raise RuntimeError(f"{self.dir}: {len(missing)} shards missing after the run (first: {missing[0]})")
        rows = sum(pq.ParquetFile(self.dir / s.file_name).metadata.num_rows for s in self.shards)
        manifest = {"stage": self.stage, "rows": rows, "failed": self.failed, "total": self.total,
                    "shards": len(self.shards), "fingerprint": plan_fingerprint(self.shards),
                    "identity": self.identity, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    **self.extra_manifest, **(report or {})}
        if rows + self.failed != self.total:
            raise RuntimeError(f"{self.dir}: {rows} rows + {self.failed} failures != {self.total} inputs")
        atomic_write_text(self.dir / SUCCESS_FILE, json.dumps(manifest, indent=1))
        return manifest
