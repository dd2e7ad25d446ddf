"""Throughput of the Ray Data pipelines: rows/s of extract-features and caption-all (nearest), 1 vs 2 workers.

    python bench/pipelines.py --clips 480 --seconds 5

Writes ``--clips`` procedural tone clips (32 kHz, default audio config), then for each worker count runs the
pipeline into a fresh directory and reports rows/s over the pipeline's wall time (actor start-up included, which is
what a user waits for) and the 1 -> 2 worker ratio. A second figure leaves the start-up out: rows/s from the moment
every worker has finished its first shard to the last shard (times from the part files' modification times, which
the actors set when they write them; rows of the first ``workers`` shards not counted), the rate the pool sustains
once its actors are up. For caption-all nearest the work is mostly in the stage that embeds the caption bank before
any shard is written (training clips then reuse their bank embedding), so its after-start-up figure says little; the
seconds of that stage are printed per run. The nearest captioner uses an untrained hci-atr model with the default
(packaged MiniLM) text encoder and the features of the first run as its caption bank. Ray workers run at nice 15, so
on a machine where other jobs are busy the actors get only the CPU those leave: note the load average printed with
the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_clips(root: Path, n: int, seconds: float, sr: int = 32000) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        t = np.arange(int(seconds * sr)) / sr
        wave = 0.2 * np.sin(2 * np.pi * (200 + 10 * i) * t) + 0.02 * rng.standard_normal(t.shape)
        sf.write(root / f"c{i:04d}.wav", wave.astype(np.float32), sr)
        rows.append({"id": f"c{i:04d}", "audio": f"c{i:04d}.wav", "caption": f"a tone at {200 + 10 * i} hertz",
                     "split": "train"})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root / "manifest.jsonl"


def after_start_up(out: Path, workers: int) -> float:
    """Rows/s from the ``workers``-th finished shard to the last one (part files' modification times): the rate once
    every actor has delivered its first shard, start-up left out. NaN when there are too few shards."""
    import pyarrow.parquet as pq

    parts = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in out.glob("part-*.parquet"))
    if len(parts) <= workers or parts[-1][0] <= parts[workers - 1][0]:
        return float("nan")
    return sum(n for _, n in parts[workers:]) / (parts[-1][0] - parts[workers - 1][0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows-per-shard", type=int, default=32)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per worker count, interleaved (1, 2, 1, 2, ...); the best run of each is reported")
    ap.add_argument("--pipelines", default="features,caption", help="which to time: features, caption or both")
    args = ap.parse_args()

    import ray
    import torch

    from workflows.settings import Settings
    from hci_atr.models.model import HciAtrModel
    from workflows.caption import caption_all
    from workflows.features import extract_features

    load_before = os.getloadavg()[0]
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipelines_"))
    data = write_clips(tmp, args.clips, args.seconds)
    workers = [int(w) for w in args.workers.split(",")]
    todo = set(args.pipelines.split(","))
    runs: dict[str, dict[int, list[tuple[float, float]]]] = {}  # pipeline -> workers -> [(rows/s, after start-up)]

    def timed(name: str, w: int, out: Path, call) -> None:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        m = call(out)
        runs.setdefault(name, {}).setdefault(w, []).append((m["rows"] / (time.perf_counter() - t0),
                                                            after_start_up(out, w), m.get("bank_seconds")))

    def features_cfg(w: int):
        return Settings().override({"pipeline.num_workers": w, "pipeline.batch_size": args.batch_size,
                                  "pipeline.rows_per_shard": args.rows_per_shard, "audio.duration": args.seconds})

    if "caption" in todo or "features" in todo:  # the nearest captioner's bank: the first features run
        bank = tmp / "features_bank"
        timed("extract-features", workers[0], bank,
              lambda out: extract_features(data, out, cfg=features_cfg(workers[0]), progress=False))
        if "features" not in todo:
            runs.pop("extract-features")
    for r in range(args.repeats):
        for w in workers:
            if "features" in todo and not (r == 0 and w == workers[0]):
                timed("extract-features", w, tmp / "features",
                      lambda out: extract_features(data, out, cfg=features_cfg(w), progress=False))
    if "caption" in todo:
        torch.manual_seed(0)
        model_dir = tmp / "model"
        HciAtrModel(Settings().override({"audio.duration": args.seconds})).save_pretrained(model_dir)
        for r in range(args.repeats):
            for w in workers:
                cfg = Settings().override({"pipeline.num_workers": w, "pipeline.batch_size": args.batch_size,
                                         "pipeline.rows_per_shard": args.rows_per_shard})
                timed("caption-all nearest", w, tmp / "captions",
                      lambda out: caption_all(data, out, captioner="nearest", model=str(model_dir),
                                              params={"features": str(bank)}, cfg=cfg, progress=False))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average (1 min) before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"{args.clips} clips x {args.seconds:g} s, batch {args.batch_size}, {args.rows_per_shard} rows per shard"
          + (f", best of {args.repeats} interleaved runs" if args.repeats > 1 else ""))
    for k, label in ((0, ""), (1, " after start-up")):
        for name, by_w in runs.items():
            best = {w: max((x[k] for x in xs if x[k] == x[k]), default=float("nan")) for w, xs in by_w.items()}
            line = ", ".join(f"{w} worker(s): {best[w]:.2f} rows/s" + (
                f" (runs: {' '.join(f'{x[k]:.1f}' for x in by_w[w])})" if len(by_w[w]) > 1 else "") for w in by_w)
            ratio = (f"; {workers[0]}->{workers[-1]}: {best[workers[-1]] / best[workers[0]]:.2f}x"
                     if len(best) > 1 else "")
            print(f"{name}{label}: {line}{ratio}")
    for name, by_w in runs.items():
        if any(x[2] is not None for xs in by_w.values() for x in xs):  # nearest: its caption-bank stage, per run
            print(f"{name}, seconds in the caption-bank stage: " + ", ".join(
                f"{w} worker(s): {' '.join(f'{x[2]:.1f}' for x in xs)}" for w, xs in by_w.items()))
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
