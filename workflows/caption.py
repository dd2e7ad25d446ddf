"""caption-all: Ray Data pipeline that writes one auxiliary caption per clip with a captioner backend.

records (driver) -> one item per pending shard -> ray.data.from_items
  -> map_batches(ShardWorker(<Captioner class>(model, device, params)), compute=ActorPoolStrategy(size=num_workers),
                 num_gpus=gpus_per_worker, one shard per call): the actor captions the shard ``batch_size`` rows at
     a time (numpy batches) and writes the shard's parquet file itself (temp name in the output directory)
  -> small summaries back to the driver -> :func:`workflows.runner.drain`: check, errors.parquet, rename to
     part-*.parquet, _SUCCESS last

Each actor loads its model once. A clip the backend cannot caption comes back with a non-empty ``error`` and lands in
``errors.parquet`` (stage ``caption``); the run stops once failures exceed ``pipeline.max_failure_rate``.
Output columns (docs/architecture.md): audio_id, generated_caption, captioner, model, params (JSON), seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from hci_atr.data.shards import CAPTION_SCHEMA
from workflows.settings import Settings
from workflows.runner import ShardedOutput, map_pending, plan_shards

STAGE = "caption"




def check_setup(captioner: str, model: str | None, params: dict[str, Any]) -> None:
    """Driver-side, cheap: the setup checks every actor's constructor makes (parameter names, model reference, the
    nearest backend's model directory and features), so a bad path fails in one line before any actor starts, rather
    than as a retried actor-creation failure with Ray's worker traceback in the log. Raises CaptionerError."""
    from hci_atr.captioners import _check_model_ref, captioner_class
    from hci_atr.errors import CaptionerError

    cls = captioner_class(captioner)
    unknown = sorted(set(params) - set(cls.defaults))
    if unknown:
        raise CaptionerError(f"captioner '{captioner}': unknown parameter(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(cls.defaults))})")
    if captioner == "nearest":
        if not model or not os.path.isdir(model):
            raise CaptionerError(f"captioner 'nearest' needs --model: the directory of a trained hci-atr model "
                                 f"(model.safetensors + config.yaml){'' if not model else f'; {model} not found'}")
        if not params.get("features") or not os.path.isdir(str(params["features"])):
            raise CaptionerError("captioner 'nearest' needs --features DIR: the training feature shards written by "
                                 "`hci-atr extract-features`" + (f"; {params['features']} not found"
                                                                  if params.get("features") else ""))
    elif model is not None:
        _check_model_ref(model, captioner)


def nearest_bank(model: str, params: dict[str, Any], pipeline, progress: bool = True):
    """Embed the ``nearest`` backend's caption bank once, as a Ray Data pipeline, and put it in the object store.

    one item per training feature shard file (``params["features"]``)
      -> ``map_batches(BankEmbedder, ActorPoolStrategy(size=num_workers), num_gpus=gpus_per_worker)``: each actor
         loads the model, reads its files' ``split`` rows and embeds their mels (clip level) and captions (sentence
         level)
      -> the driver joins the parts (:meth:`NearestBank.from_tables`) -> ``ray.put``.

    Returns the ``ObjectRef`` of the :class:`~hci_atr.captioners.NearestBank`; the caption actors fetch it when they
    start (:func:`workflows.runner._resolve_refs`), so the bank costs one pass over the training clips, not one per
    actor. The bank lives in the object store: ``N x D`` + ``C x D`` float32 (N clips, C captions; about 100 MB for
    AudioCaps' 50k training clips at D = 256 with 5 captions each).
    """
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from hci_atr.captioners import BankEmbedder, NearestBank
    from hci_atr.data.shards import features_audio_config
    from hci_atr.errors import CaptionerError
    from workflows.runner import actor_pool_options, project_errors, ray_data

    features = Path(str(params["features"])).resolve()
    parts = sorted(str(f) for f in features.glob("part-*.parquet"))
    if not parts:
        raise CaptionerError(f"captioner 'nearest': no feature shards (part-*.parquet) in {features}; run "
                             f"`hci-atr extract-features` first")
    split = str(params.get("split", "train"))
    batch = max(1, int(params.get("embed_batch_size", 32)))
    try:
        rows = sum(pq.read_table(f, columns=["split"])["split"].to_pylist().count(split) for f in parts)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise CaptionerError(f"captioner 'nearest': cannot read features in {features} ({e})") from None
    if rows == 0:
        raise CaptionerError(f"captioner 'nearest': features in {features} have no rows with split '{split}'; "
                             f"extract features for the training split or set split=<name>")
    ray = ray_data()
    # one item per shard file; the actor reads it (no read tasks: they would wait for CPUs the actors hold)
    ds = ray.data.from_items([{"path": f} for f in parts], override_num_blocks=len(parts))
    ds = ds.map_batches(
        BankEmbedder,
        fn_constructor_kwargs={"model": model, "device": "cuda" if pipeline.gpus_per_worker > 0 else "cpu",
                               "split": split, "embed_batch_size": batch},
        **actor_pool_options(ray, pipeline, len(parts)),
    )
    tables = []
    bar = tqdm(total=rows, desc="nearest: caption bank", unit="clip", disable=not progress)
    try:
        with project_errors():  # an actor raised a project error (bad model / mel): say that, not Ray's trace
            for t in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                tables.append(t)
                bar.update(t.num_rows)
    finally:
        bar.close()
    return ray.put(NearestBank.from_tables(tables, mel_config=features_audio_config(features)))


def caption_all(data: str | os.PathLike, out: str | os.PathLike, *, captioner: str, model: str | None = None,
                params: dict[str, Any] | None = None, cfg: Settings | None = None, fmt: str = "auto",
                splits: Iterable[str] | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Caption every record of ``data`` with backend ``captioner`` into ``out``; resumes a previous run.

    ``params`` go to the backend (e.g. ``{"features": dir}`` for nearest). Uses ``cfg.pipeline`` for workers, batch
    size, GPUs per worker, shard size and the failure threshold. Returns the manifest written to ``_SUCCESS``.
    """
    from hci_atr.captioners import captioner_class
    from hci_atr.data.formats import read_dataset

    cfg = cfg or Settings()
    p = cfg.pipeline
    params = {k: v for k, v in (params or {}).items() if v is not None}
    cls = captioner_class(captioner)  # unknown name -> CaptionerError before any Ray work
    check_setup(captioner, model, params)
    records = read_dataset(data, format=fmt, splits=splits)
    shards = plan_shards([r.audio_id for r in records], p.rows_per_shard)
    device = "cuda" if p.gpus_per_worker > 0 else "cpu"
    extra = {"data": os.path.abspath(os.fspath(data)), "captioner": captioner, "model": model or "",
             "params": params, "seed": seed}
    t0 = time.perf_counter()
    extra_seconds: dict[str, float] = {}  # nearest: time spent embedding the caption bank (part of "seconds")
    with ShardedOutput(out, CAPTION_SCHEMA, STAGE, shards, p.max_failure_rate, extra) as output:
        if output.pending:
            ctor = {"device": device, **params}
            if model is not None or captioner != "blip":  # blip has a default model id; the others need one
                ctor["model"] = model
            if captioner == "nearest":  # embed the caption bank once, spread over the workers; every actor gets it
                t_bank = time.perf_counter()
                ctor["bank"] = nearest_bank(model, params, p, progress=progress)
                extra_seconds["bank_seconds"] = round(time.perf_counter() - t_bank, 3)
            map_pending(records, output, cls, ctor, p, batch_format="numpy", progress=progress)
        manifest = output.finish()
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    manifest.update(extra_seconds)
    manifest["computed_shards"] = len(output.pending)
    return manifest
