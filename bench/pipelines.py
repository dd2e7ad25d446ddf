"""Throughput of the Ray Data pipelines: rows/s of extract-features and caption-all (nearest), 1 vs 2 workers.

    python bench/pipelines.py --clips 96 --seconds 5

Writes ``--clips`` procedural tone clips (32 kHz, default audio config), then for each worker count runs the
pipeline into a fresh directory and reports rows/s over the pipeline's wall time (actor start-up included, which is
what a user waits for) and the 1 -> 2 worker ratio. The nearest captioner uses an untrained hci-atr model with the
default (packaged MiniLM) text encoder and the features of the first run as its caption bank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()

    import ray
    import torch

    from hci_atr.config import Config
    from hci_atr.models.model import HciAtrModel
    from workflows.caption import caption_all
    from workflows.features import extract_features

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipelines_"))
    data = write_clips(tmp, args.clips, args.seconds)
    workers = [int(w) for w in args.workers.split(",")]
    results: dict[str, dict[int, float]] = {"extract-features": {}, "caption-all nearest": {}}
    feats0 = None
    for w in workers:
        cfg = Config().override({"pipeline.num_workers": w, "pipeline.batch_size": args.batch_size,
                                 "pipeline.rows_per_shard": 32, "audio.duration": args.seconds})
        out = tmp / f"features_w{w}"
        t0 = time.perf_counter()
        m = extract_features(data, out, cfg=cfg, progress=False)
        results["extract-features"][w] = m["rows"] / (time.perf_counter() - t0)
        feats0 = feats0 or out
    torch.manual_seed(0)
    model_dir = tmp / "model"
    HciAtrModel(Config().override({"audio.duration": args.seconds})).save_pretrained(model_dir)
    for w in workers:
        cfg = Config().override({"pipeline.num_workers": w, "pipeline.batch_size": args.batch_size,
                                 "pipeline.rows_per_shard": 32})
        t0 = time.perf_counter()
        m = caption_all(data, tmp / f"captions_w{w}", captioner="nearest", model=str(model_dir),
                        params={"features": str(feats0)}, cfg=cfg, progress=False)
        results["caption-all nearest"][w] = m["rows"] / (time.perf_counter() - t0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average before/after: {os.getloadavg()[0]:.1f}")
    print(f"{args.clips} clips x {args.seconds:g} s, batch {args.batch_size}")
    for name, by_w in results.items():
        line = ", ".join(f"{w} worker(s): {r:.2f} rows/s" for w, r in by_w.items())
        ratio = f"; {workers[0]}->{workers[-1]}: {by_w[workers[-1]] / by_w[workers[0]]:.2f}x" if len(by_w) > 1 else ""
        print(f"{name}: {line}{ratio}")
    ray.shutdown()


if __name__ == "__main__":
    main()
