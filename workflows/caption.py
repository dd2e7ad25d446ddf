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
A re-run on the same ``--out`` resumes it; one with another captioner, model or row-changing parameter is refused
(the shard plan records the backend's ``identity``), so one folder never mixes captions of two settings.
The nearest backend's caption bank is embedded first by its own Ray Data stage (:func:`nearest_bank`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from hci_atr.data.shards import CAPTION_SCHEMA
from workflows.settings import Settings
from workflows.output import ShardedOutput, plan_shards
from workflows.runner import map_pending, returns_failures

STAGE = "caption"


class BankEmbedder:
    """Ray Data callable class for the nearest caption bank: a batch of feature-shard file paths (column ``path``) ->
    the :class:`~hci_atr.captioners.nearest.NearestBank` part of their ``split`` rows, as a table
    (:func:`hci_atr.captioners.nearest.embed_bank_rows`). The actor reads the files itself, so the mels never cross
    the object store. Rows without a caption are dropped; an unreadable file or a malformed mel raises
    CaptionerError."""

    def __init__(self, model: str, device: str = "cpu", split: str = "train", embed_batch_size: int = 32):
        from hci_atr.captioners.nearest import load_hci_model

        self.model = load_hci_model(model, device)
        self.split = str(split)
        self.batch_size = int(embed_batch_size)

    @returns_failures
    def __call__(self, batch):
        import pyarrow.parquet as pq

        from hci_atr.captioners.nearest import embed_bank_rows
        from hci_atr.data.shards import BANK_COLUMNS
        from hci_atr.errors import CaptionerError, one_line

        parts = []
        for path in batch["path"].to_pylist():
            try:
                rows = pq.read_table(path, columns=BANK_COLUMNS)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
                raise CaptionerError(f"captioner 'nearest': cannot read feature shard {path} ({one_line(e)})") \
                    from None
            parts.append(embed_bank_rows(self.model, rows, self.split, self.batch_size, source=path))
        return pa.concat_tables(parts)


def nearest_bank(model: str, params: dict[str, Any], pipeline, progress: bool = True):
    """Embed the ``nearest`` backend's caption bank once, as a Ray Data pipeline, and put it in the object store.

    one item per training feature shard file (``params["features"]``)
      -> ``map_batches(BankEmbedder, ActorPoolStrategy(size=num_workers), num_gpus=gpus_per_worker)``: each actor
         loads the model, reads its files' ``split`` rows and embeds their mels (clip level) and captions (sentence
         level)
      -> the driver joins the parts (:meth:`NearestBank.from_tables`) -> ``ray.put``.

    Returns the ``ObjectRef`` of the :class:`~hci_atr.captioners.nearest.NearestBank`; the caption actors fetch it
    when they start (:func:`workflows.runner._resolve_refs`), so the bank costs one pass over the training clips, not
    one per actor. The bank lives in the object store: ``N x D`` + ``C x D`` float32 (N clips, C captions; about
    100 MB for AudioCaps' 50k training clips at D = 256 with 5 captions each).
    """
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from hci_atr.captioners.nearest import NearestBank
    from hci_atr.data.shards import features_audio_config
    from hci_atr.errors import CaptionerError
    from workflows.runner import actor_pool_options, pipeline_results, ray_data

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
        with pipeline_results(ds) as parts:  # an actor's failure (bad model / mel) raises here, in one line
            for t in parts:
                tables.append(t)
                bar.update(t.num_rows)
    finally:
        bar.close()
    return ray.put(NearestBank.from_tables(tables, mel_config=features_audio_config(features)))


def quality_of(out: Path, records) -> dict[str, dict]:
    """Caption quality of a finished output against the records' own captions, per split
    (:func:`hci_atr.metrics.caption_quality`: word F1, and per confidence quartile where the backend gives one)."""
    import pyarrow.parquet as pq

    from hci_atr.metrics import caption_quality

    refs = {r.audio_id: (r.split, r.captions) for r in records}
    rows = []
    for f in sorted(Path(out).glob("part-*.parquet")):
        has_conf = "confidence" in pq.read_schema(f).names  # shards written before the column: unknown
        t = pq.read_table(f, columns=["audio_id", "generated_caption"] + ["confidence"] * has_conf).to_pydict()
        confs = t["confidence"] if has_conf else [None] * len(t["audio_id"])
        for aid, gen, conf in zip(t["audio_id"], t["generated_caption"], confs):
            if aid in refs:
                rows.append((refs[aid][0], gen, refs[aid][1], conf))
    return caption_quality(rows)


def format_quality(quality: dict[str, dict]) -> str:
    """One line: word F1 per split, and the test (else last) split's F1 per confidence quartile when known."""
    if not quality:
        return "caption quality: no captioned clip with reference captions"
    line = "caption quality (word F1 vs the clip's own captions): " + ", ".join(
        f"{s} {q['word_f1']:.3f} (n={q['n']})" for s, q in quality.items())
    split = "test" if "test" in quality else list(quality)[-1]
    quart = quality[split].get("by_confidence")
    if quart:
        line += (f"; {split} by confidence quartile (low -> high): "
                 + " / ".join(f"{b['word_f1']:.3f}" for b in quart)
                 + f" (confidence {quart[0]['min']:.2f}-{quart[-1]['max']:.2f})")
    return line


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
    # the backend's cheap setup checks on the driver, so a bad path or parameter fails in one line before any actor
    # starts (not as a retried actor-creation failure with Ray's worker traceback in the log)
    cls.check_setup(model, params)
    records = read_dataset(data, format=fmt, splits=splits)
    shards = plan_shards([r.audio_id for r in records], p.rows_per_shard)
    device = "cuda" if p.gpus_per_worker > 0 else "cpu"
    extra = {"data": os.path.abspath(os.fspath(data)), "captioner": captioner, "model": model or "",
             "params": params, "seed": seed}
    t0 = time.perf_counter()
    extra_seconds: dict[str, float] = {}  # nearest: time spent embedding the caption bank (part of "seconds")
    # what changes a row: a resume with another backend, model or params is refused, not mixed into these shards
    identity = {"stage": STAGE, **cls.identity(model, params)}
    with ShardedOutput(out, CAPTION_SCHEMA, STAGE, shards, p.max_failure_rate, extra, identity=identity) as output:
        if output.pending:
            ctor = {"model": model, "device": device, **params}  # model None: the backend's default (blip) or error
            if captioner == "nearest":  # embed the caption bank once, spread over the workers; every actor gets it
                t_bank = time.perf_counter()
                ctor["bank"] = nearest_bank(model, params, p, progress=progress)
                extra_seconds["bank_seconds"] = round(time.perf_counter() - t_bank, 3)
            map_pending(records, output, cls, ctor, p, batch_format="numpy", progress=progress)
        manifest = output.finish({"quality": quality_of(output.dir, records)})
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    manifest.update(extra_seconds)
    manifest["computed_shards"] = len(output.pending)
    return manifest
