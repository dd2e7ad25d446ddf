"""extract-features: Ray Data pipeline from dataset records to log-mel feature shards.

records (driver) -> one item per pending shard -> ray.data.from_items
  -> map_batches(ShardWorker(FeatureExtractor), ActorPoolStrategy(size=num_workers), one shard per call):
     the actor decodes the shard's clips ``batch_size`` at a time and writes the shard's parquet file itself
     (temp name in the output directory)
  -> small summaries back to the driver -> :func:`workflows.runner.drain`: check, errors.parquet, rename to
     part-*.parquet, _SUCCESS last

Each output row (schema in docs/architecture.md): audio_id, split, audio_path, captions, duration (seconds of real
audio, <= audio.duration), n_frames, n_mels, mel (row-major ``[n_frames, n_mels]`` flattened to ``list<float32>``).
The pipeline streams: each actor holds only the shard it is computing, and the mel arrays never travel to the
driver (see :mod:`workflows.runner`), so ``--out`` must be reachable from every actor.
"""

from __future__ import annotations

import os
import time
from typing import Iterable

import numpy as np
import pyarrow as pa

from hci_atr.config import AudioConfig
from workflows.settings import Settings
from hci_atr.data.shards import FEATURE_SCHEMA, audio_config_dict
from hci_atr.errors import HciAtrError, one_line
from workflows.output import ERROR_COLUMN, ShardedOutput, plan_shards
from workflows.runner import map_pending

STAGE = "features"

_RESULT_SCHEMA = FEATURE_SCHEMA.append(pa.field(ERROR_COLUMN, pa.string()))


class FeatureExtractor:
    """Per-actor backend (run by :class:`workflows.runner.ShardWorker`): decode + log-mel for a batch of records.
    A bad clip becomes an error row, not an exception.

    ``__call__(batch: pa.Table[audio_id, audio_path, split, captions, ...]) -> pa.Table`` with
    :data:`FEATURE_SCHEMA` columns plus ``error`` ("" when the row is fine).
    """

    def __init__(self, audio: AudioConfig, device: str = "cpu"):
        self.audio_cfg = audio
        self.device = device  # "cuda" when the pipeline gives each actor a GPU: the mel runs there

    def __call__(self, batch: pa.Table) -> pa.Table:
        from hci_atr.data.audio import clip_features_and_duration

        cols = {name: [] for name in _RESULT_SCHEMA.names}
        for row in batch.select(["audio_id", "audio_path", "split", "captions"]).to_pylist():
            try:
                mel, seconds = clip_features_and_duration(row["audio_path"], self.audio_cfg, self.device)  # [T, n_mels]
                err = ""
            except HciAtrError as e:
                mel, seconds, err = np.zeros((0, self.audio_cfg.n_mels), np.float32), 0.0, str(e)
            except Exception as e:  # anything else about one clip is that clip's failure, not the run's
                mel, seconds, err = np.zeros((0, self.audio_cfg.n_mels), np.float32), 0.0, one_line(e)
            cols["audio_id"].append(row["audio_id"])
            cols["split"].append(row["split"])
            cols["audio_path"].append(row["audio_path"])
            cols["captions"].append(row["captions"])
            cols["duration"].append(seconds)
            cols["n_frames"].append(mel.shape[0])
            cols["n_mels"].append(mel.shape[1])
            cols["mel"].append(np.ascontiguousarray(mel, dtype=np.float32).reshape(-1))
            cols[ERROR_COLUMN].append(err)
        return pa.Table.from_pydict(cols, schema=_RESULT_SCHEMA)


def records_digest(records) -> str:
    """A digest of what a feature row copies from its record (id, split, audio path, captions): the same ids with
    other splits or captions are another dataset, not a resume."""
    import hashlib
    import json

    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.audio_id):
        h.update(json.dumps([r.audio_id, r.split, r.audio_path, list(r.captions)]).encode())
    return h.hexdigest()[:16]


def extract_features(data: str | os.PathLike, out: str | os.PathLike, *, cfg: Settings | None = None,
                     fmt: str = "auto", splits: Iterable[str] | None = None, seed: int = 0,
                     progress: bool = True) -> dict:
    """Write feature shards for every record of ``data`` into ``out``; resumes a previous run. Returns the manifest.

    Uses ``cfg.pipeline`` (num_workers, batch_size, gpus_per_worker, rows_per_shard, max_failure_rate) and
    ``cfg.audio``. Raises :class:`hci_atr.errors.DataError` when too many clips fail.
    """
    from hci_atr.data.formats import read_dataset

    cfg = cfg or Settings()
    p = cfg.pipeline
    records = read_dataset(data, format=fmt, splits=splits)
    shards = plan_shards([r.audio_id for r in records], p.rows_per_shard)
    audio = audio_config_dict(cfg.audio)
    extra = {"data": os.path.abspath(os.fspath(data)), "splits": sorted(set(r.split for r in records)),
             "audio": audio, "seed": seed}
    t0 = time.perf_counter()
    with ShardedOutput(out, FEATURE_SCHEMA, STAGE, shards, p.max_failure_rate, extra,
                       identity={"stage": STAGE, "audio": audio, "records": records_digest(records)}) as output:
        if output.pending:
            map_pending(records, output, FeatureExtractor, {"audio": cfg.audio,
                                                          "device": "cuda" if p.gpus_per_worker > 0 else "cpu"}, p,
                        batch_format="pyarrow", progress=progress)
        manifest = output.finish()
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    manifest["computed_shards"] = len(output.pending)
    return manifest
