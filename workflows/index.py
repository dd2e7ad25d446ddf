"""``hci-atr index``: embed an audio collection with a trained model through Ray Data and write a search index.

items (driver: a dataset via read_dataset, or every audio file of a folder; generated captions joined by audio_id)
  -> cut into chunks of ``pipeline.batch_size`` items -> ray.data.from_items (one item per chunk)
  -> map_batches(IndexEmbedder, **workflows.runner.actor_pool_options): the pipelines' one actor pool
  -> driver: chunks back in item order (a small reorder buffer), streamed chunk by chunk into
     hci_atr.search.index.IndexWriter (a new version of the index folder, switched to atomically at the end)

``--out`` is checked first: a non-empty folder that is not an index is refused before anything runs, and a folder
another run is writing is refused too. Each actor loads the model once (``HciAtrModel.from_pretrained``) and returns,
per clip, its AudioEmbeddings as one ``.npz`` payload (field -> array; variable shapes travel as bytes). A clip that
cannot be decoded becomes an error row; more failures than ``pipeline.max_failure_rate`` stop the run
(``workflows.runner.check_failure_rate``); the failures are listed in the index manifest (``errors``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from hci_atr.data.shards import read_captions
from hci_atr.errors import DataError, HciAtrError, one_line
from hci_atr.search.embed import audio_arrays, clip_mel, embed_audio_batch, stack_padded
from hci_atr.search.index import IndexWriter, check_index_out
from hci_atr.search.items import IndexItem, items_from_audio_dir, items_from_records
from workflows.runner import returns_failures
from workflows.settings import Settings

# what an actor returns: one row per clip of its chunk ("" error = embedded; payload = npz of its fields)
RESULT_SCHEMA = pa.schema([("chunk", pa.int64()), ("row", pa.int64()), ("error", pa.string()),
                           ("payload", pa.binary())])


@dataclass(frozen=True)
class IndexSummary:
    """What ``build_index`` did: clips indexed, clips that failed, the index folder, its new version, seconds."""

    clips: int
    failed: int
    out: str
    version: str
    seconds: float


class IndexEmbedder:
    """Ray Data actor: ``__call__(batch {chunk, rows (JSON list of {row, audio_path, generated})})`` ->
    :data:`RESULT_SCHEMA` rows, one per clip."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch

        from hci_atr.models.model import HciAtrModel

        torch.set_num_threads(1)  # one actor per core; intra-op threads would fight over the same cores
        self.model = HciAtrModel.from_pretrained(model_dir).to(device).eval()
        self.device = device
        self.cfg = self.model.cfg

    @returns_failures
    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for chunk, rows in zip(batch["chunk"].to_pylist(), batch["rows"].to_pylist()):
            out.extend(self.embed_chunk(int(chunk), json.loads(rows)))
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)

    def embed_chunk(self, chunk: int, rows: list[dict]) -> list[dict]:
        ok, mels, masks, gens, out = [], [], [], [], []
        for r in rows:
            try:
                m, k = clip_mel(str(r["audio_path"]), self.cfg.audio)
            except HciAtrError as e:
                out.append({"chunk": chunk, "row": int(r["row"]), "error": str(e), "payload": b""})
                continue
            except Exception as e:  # noqa: BLE001 - one bad clip is that clip's failure, not the run's
                out.append({"chunk": chunk, "row": int(r["row"]), "error": one_line(e), "payload": b""})
                continue
            ok.append(int(r["row"])), mels.append(m), masks.append(k), gens.append(r["generated"] or None)
        if ok:
            arrays = audio_arrays(embed_audio_batch(self.model, np.stack(mels), np.stack(masks), gens, self.device))
            for i, row in enumerate(ok):
                buf = io.BytesIO()
                np.savez(buf, **{k: v[i] for k, v in arrays.items()})
                out.append({"chunk": chunk, "row": row, "error": "", "payload": buf.getvalue()})
        return out


def collect_items(data: str | os.PathLike | None = None, audio_dir: str | os.PathLike | None = None,
                  captions: str | os.PathLike | None = None, fmt: str = "auto",
                  splits: Iterable[str] | None = None, min_confidence: float | None = None) -> list[IndexItem]:
    """The clips to index: a dataset (any reader) or a folder of audio files, with generated captions joined (those
    the model trusts: ``min_confidence``, its ``model.ac_min_confidence``)."""
    if (data is None) == (audio_dir is None):
        raise DataError("index: pass exactly one of --data (a dataset) or --audio-dir (a folder of audio files)")
    generated = read_captions(captions, min_confidence)
    if data is not None:
        from hci_atr.data.formats import read_dataset

        items = items_from_records(read_dataset(data, format=fmt, splits=splits), generated)
    else:
        items = items_from_audio_dir(audio_dir, generated)
    seen = set()
    for it in items:
        if it.audio_id in seen:
            raise DataError(f"index: audio id {it.audio_id!r} appears twice; ids must be unique in an index")
        seen.add(it.audio_id)
    return items


def _chunk_items(items: list[IndexItem], batch_size: int) -> list[dict]:
    """One Ray Data work item per ``batch_size`` items: ``{"chunk": k, "rows": JSON list}``."""
    return [{"chunk": k, "rows": json.dumps([{"row": i, "audio_path": items[i].audio_path,
                                               "generated": items[i].generated_caption or ""}
                                              for i in range(s, min(s + batch_size, len(items)))])}
            for k, s in enumerate(range(0, len(items), batch_size))]


def _add_chunk(writer: IndexWriter, items: list[IndexItem], rows: list[dict]) -> int:
    """Add a chunk's embedded clips (``rows`` sorted by row, failures already dropped) to the writer."""
    per_field: dict[str, list[np.ndarray]] = {}
    for r in rows:
        with np.load(io.BytesIO(r["payload"])) as z:
            for k in z.files:
                per_field.setdefault(k, []).append(z[k][None])
    if rows:
        writer.add({k: stack_padded(v) for k, v in per_field.items()}, [items[r["row"]] for r in rows])
    return len(rows)


def build_index(model_dir: str | os.PathLike, out: str | os.PathLike, *, data: str | os.PathLike | None = None,
                audio_dir: str | os.PathLike | None = None, captions: str | os.PathLike | None = None,
                fmt: str = "auto", splits: Iterable[str] | None = None, cfg: Settings | None = None,
                num_workers: int | None = None, batch_size: int | None = None) -> IndexSummary:
    """Embed the collection with Ray Data actors and write a new version of the index at ``out``."""
    from hci_atr.models.model import HciAtrModel
    from workflows.runner import actor_pool_options, check_failure_rate, pipeline_results, ray_data

    check_index_out(out)  # before any work: a wrong --out costs nothing and deletes nothing
    cfg = cfg or Settings()
    p = dataclasses.replace(cfg.pipeline, num_workers=int(num_workers or cfg.pipeline.num_workers),
                            batch_size=int(batch_size or cfg.pipeline.batch_size))
    # driver copy (caption embeddings, config, weights hash), loaded first: a bad model dir fails here in one line,
    # before any actor tries (and retries) to load it
    model_path = str(Path(model_dir).resolve())
    model = HciAtrModel.from_pretrained(model_path).eval()
    items = collect_items(data, audio_dir, captions, fmt, splits, model.cfg.model.ac_min_confidence)
    t0 = time.perf_counter()
    writer = IndexWriter(out, model, model_dir=model_path, unit_dtype=cfg.serve.index_unit_dtype)
    try:
        ray = ray_data()
        work = _chunk_items(items, p.batch_size)
        sizes = [min(p.batch_size, len(items) - k * p.batch_size) for k in range(len(work))]
        ds = ray.data.from_items(work, override_num_blocks=len(work)).map_batches(
            IndexEmbedder, fn_constructor_kwargs={"model_dir": model_path,
                                                  "device": "cuda" if p.gpus_per_worker else "cpu"},
            **actor_pool_options(ray, p, len(work)))
        errors: dict[str, str] = {}
        pending: dict[int, list[dict]] = {}  # chunks that arrived before an earlier one (actors finish out of order)
        next_chunk, kept = 0, 0
        with pipeline_results(ds) as results:  # an actor's failure (bad model dir) raises here, in one line
            for batch in results:
                for r in batch.to_pylist():
                    pending.setdefault(int(r["chunk"]), []).append(r)
                # stream chunks to the writer in item order, so the driver holds a few chunks, not the collection
                while next_chunk < len(work) and len(pending.get(next_chunk, ())) == sizes[next_chunk]:
                    rows = sorted(pending.pop(next_chunk), key=lambda r: r["row"])
                    errors.update({items[r["row"]].audio_id: r["error"] for r in rows if r["error"]})
                    check_failure_rate("index", errors, len(items), p.max_failure_rate,
                                       then="fix or remove those files and run again")
                    kept += _add_chunk(writer, items, [r for r in rows if not r["error"]])
                    next_chunk += 1
        if next_chunk != len(work):
            missing = sum(sizes[next_chunk:])
            raise DataError(f"index: {missing} of {len(items)} clips came back from no actor; run again")
        if not kept:
            raise DataError("index: no clip could be embedded; check the audio files")
        writer.extra.update({"errors": [{"audio_id": a, "reason": e} for a, e in errors.items()],  # item order
                             "source": str(data or audio_dir)})
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return IndexSummary(clips=kept, failed=len(errors), out=str(out), version=writer.version,
                        seconds=round(time.perf_counter() - t0, 3))
