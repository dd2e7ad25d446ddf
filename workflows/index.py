"""``hci-atr index``: embed an audio collection with a trained model through Ray Data and write a search index.

items (driver: a dataset via read_dataset, or every audio file of a folder; generated captions joined by audio_id)
  -> ray.data.from_items -> map_batches(IndexEmbedder actors, ActorPoolStrategy(size=num_workers))
  -> driver: rows back in item order (a small reorder buffer), streamed batch by batch into
     hci_atr.index.IndexWriter (chunk files, joined and renamed into place atomically at the end)

Each actor loads the model once (``HciAtrModel.from_pretrained``) and returns, per clip, the stored AudioEmbeddings
as one ``.npz`` payload (variable shapes travel as bytes, so no column schema has to know the model's fields). A clip
that cannot be decoded becomes an error row; more failures than ``pipeline.max_failure_rate`` stop the run.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from workflows.settings import Settings
from hci_atr.data.shards import read_captions
from hci_atr.errors import DataError, HciAtrError
from hci_atr.index import (IndexItem, IndexWriter, _stack_padded, embed_audio_batch, flatten_outputs,
                           items_from_audio_dir, items_from_records, mel_from_wave)


class IndexEmbedder:
    """Ray Data actor: ``__call__(batch {row, audio_path, generated}) -> {row, error, spec, payload}``."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch

        from hci_atr.models.model import HciAtrModel

        torch.set_num_threads(1)  # one actor per core; intra-op threads would fight over the same cores
        self.model = HciAtrModel.from_pretrained(model_dir).to(device).eval()
        self.device = device
        self.cfg = self.model.cfg

    def __call__(self, batch: dict) -> dict:
        from hci_atr.data.audio import load_audio

        rows, mels, masks, gens, errors = [], [], [], [], {}
        for row, path, gen in zip(batch["row"], batch["audio_path"], batch["generated"]):
            try:
                m, k = mel_from_wave(load_audio(str(path), self.cfg.audio.sample_rate), self.cfg.audio)
            except HciAtrError as e:
                errors[int(row)] = str(e)
                continue
            except Exception as e:  # one bad clip is that clip's failure, not the run's
                errors[int(row)] = f"{type(e).__name__}: {e}"
                continue
            rows.append(int(row)), mels.append(m), masks.append(k), gens.append(str(gen) or None)
        out = {"row": [], "error": [], "spec": [], "payload": []}
        if rows:
            emb = embed_audio_batch(self.model, np.stack(mels), np.stack(masks), gens, self.device)
            spec, arrays = flatten_outputs(emb, len(rows))
            spec_json = json.dumps(spec)
            for i, r in enumerate(rows):
                buf = io.BytesIO()
                np.savez(buf, **{k: v[i] for k, v in arrays.items()})
                out["row"].append(r), out["error"].append(""), out["spec"].append(spec_json)
                out["payload"].append(buf.getvalue())
        for r, err in errors.items():
            out["row"].append(r), out["error"].append(err), out["spec"].append(""), out["payload"].append(b"")
        return {"row": np.asarray(out["row"], dtype=np.int64), "error": np.asarray(out["error"], dtype=object),
                "spec": np.asarray(out["spec"], dtype=object), "payload": np.asarray(out["payload"], dtype=object)}


def collect_items(data: str | os.PathLike | None = None, audio_dir: str | os.PathLike | None = None,
                  captions: str | os.PathLike | None = None, fmt: str = "auto",
                  splits: Iterable[str] | None = None) -> list[IndexItem]:
    """The clips to index: a dataset (any reader) or a folder of audio files, with generated captions joined."""
    if (data is None) == (audio_dir is None):
        raise DataError("index: pass exactly one of --data (a dataset) or --audio-dir (a folder of audio files)")
    generated = read_captions(captions)
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


def build_index(model_dir: str | os.PathLike, out: str | os.PathLike, *, data: str | os.PathLike | None = None,
                audio_dir: str | os.PathLike | None = None, captions: str | os.PathLike | None = None,
                fmt: str = "auto", splits: Iterable[str] | None = None, cfg: Settings | None = None,
                num_workers: int | None = None, batch_size: int | None = None) -> dict:
    """Embed the collection with Ray Data actors and write the index at ``out``. Returns a summary dict."""
    from hci_atr.models.model import HciAtrModel
    from workflows.runner import project_errors, ray_data

    cfg = cfg or Settings()
    p = cfg.pipeline
    workers = int(num_workers or p.num_workers)
    bs = int(batch_size or p.batch_size)
    items = collect_items(data, audio_dir, captions, fmt, splits)
    # driver copy (caption embeddings + config), loaded first: a bad model dir fails here in one line, before
    # any actor tries (and retries) to load it
    model = HciAtrModel.from_pretrained(str(model_dir)).eval()
    t0 = time.perf_counter()
    ray = ray_data()
    rows = [{"row": i, "audio_path": it.audio_path, "generated": it.generated_caption or ""}
            for i, it in enumerate(items)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // bs)))
    ds = ds.map_batches(
        IndexEmbedder,
        fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()),
                               "device": "cuda" if p.gpus_per_worker else "cpu"},
        compute=ray.data.ActorPoolStrategy(size=workers),
        batch_size=bs,
        batch_format="numpy",
        num_cpus=1,
        **({"num_gpus": p.gpus_per_worker} if p.gpus_per_worker else {}),
    )
    errors: dict[int, str] = {}
    pending: dict[int, bytes | None] = {}  # rows that arrived before an earlier row (blocks can finish out of order)
    spec = None
    next_row, kept_rows = 0, []
    batch_rows: list[int] = []
    batch_payloads: list[bytes] = []
    writer = IndexWriter(out, model, model_dir=str(Path(model_dir).resolve()), unit_dtype=cfg.serve.index_unit_dtype)

    def add_batch() -> None:
        per_field: dict[str, list[np.ndarray]] = {}
        for pl in batch_payloads:
            with np.load(io.BytesIO(pl)) as z:
                for k in z.files:
                    per_field.setdefault(k, []).append(z[k][None])
        writer.add(spec, {k: _stack_padded(v) for k, v in per_field.items()}, [items[r] for r in batch_rows])
        kept_rows.extend(batch_rows)
        batch_rows.clear(), batch_payloads.clear()

    try:
        with project_errors():  # a project error from an actor (bad model dir): its message, no trace
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                for r, err, sp, pl in zip(batch["row"], batch["error"], batch["spec"], batch["payload"]):
                    if err:
                        errors[int(r)] = str(err)
                        pending[int(r)] = None
                    else:
                        pending[int(r)] = bytes(pl)
                        spec = spec or json.loads(sp)
                # stream rows to the writer in item order, so the driver holds one batch, not the collection
                while next_row in pending:
                    pl = pending.pop(next_row)
                    if pl is not None:
                        batch_rows.append(next_row), batch_payloads.append(pl)
                    next_row += 1
                    if len(batch_rows) >= bs:
                        add_batch()
        if pending or next_row != len(items):
            raise DataError(f"index: {len(items) - next_row} of {len(items)} clips came back from no actor; run again")
        if errors and len(errors) > p.max_failure_rate * len(items):
            first = sorted(errors.items())[:3]
            raise DataError(f"index: {len(errors)} of {len(items)} clips failed (limit {p.max_failure_rate:.0%}); "
                            "first: " + "; ".join(f"{items[r].audio_id}: {e}" for r, e in first))
        if spec is None:
            raise DataError("index: no clip could be embedded; check the audio files")
        if batch_rows:
            add_batch()
        writer.extra.update({"errors": [{"audio_id": items[r].audio_id, "reason": e}
                                        for r, e in sorted(errors.items())], "source": str(data or audio_dir)})
        writer.close()
    except BaseException:
        writer.abort()
        raise
    kept = [items[r] for r in kept_rows]
    return {"clips": len(kept), "failed": len(errors), "out": str(out),
            "seconds": round(time.perf_counter() - t0, 3)}
