"""`hci-atr evaluate` at Clotho evaluation size: time and peak memory of the full fused HCI score on CPU.

Builds a synthetic feature directory (random log-mels in the extract-features schema: ``--clips`` clips of ``--seconds``
s at 32 kHz, 5 captions each) and an untrained model of the default architecture (``--audio-width``), then runs the
real CLI (`hci-atr evaluate --json`) in a child process and reads its peak RSS from the kernel
(``RUSAGE_CHILDREN.ru_maxrss``). Also times one block of the frame-word set similarity at the evaluation shapes, the
per-block rate a GPU run can be estimated from.

    python bench/eval_scale.py                        # 1045 clips x 5225 captions, 30 s (Clotho evaluation)
    python bench/eval_scale.py --clips 200 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from hci_atr.config import Config
from hci_atr.data.audio import n_frames
from hci_atr.data.shards import FEATURE_SCHEMA
from hci_atr.models.hci import set_similarity
from hci_atr.models.model import HciAtrModel

WORDS = ("a dog barks then a car passes by while rain falls on the roof and people talk quietly in the distance "
         "birds sing loud high beeps knock twice slowly a siren wails").split()


def write_features(out: Path, clips: int, seconds: float, cfg: Config, rows_per_file: int = 64) -> None:
    rng = np.random.default_rng(0)
    t, m = n_frames(cfg.audio), cfg.audio.n_mels
    out.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, clips, rows_per_file)):
        ids = [f"clip{i:05d}" for i in range(start, min(clips, start + rows_per_file))]
        mel = [(rng.standard_normal(t * m, dtype=np.float32) * 2 - 8) for _ in ids]
        caps = [[" ".join(rng.choice(WORDS, size=int(rng.integers(8, 20)))) for _ in range(5)] for _ in ids]
        table = pa.table({"audio_id": ids, "split": ["test"] * len(ids), "audio_path": [""] * len(ids),
                          "captions": caps, "duration": [float(seconds)] * len(ids), "n_frames": [t] * len(ids),
                          "n_mels": [m] * len(ids), "mel": mel}, schema=FEATURE_SCHEMA)
        pq.write_table(table, out / f"part-{k:05d}.parquet")


def block_rate(cfg: Config, clips: int, captions: int) -> dict:
    """Seconds for one max_elems block of the frame-word similarity at evaluation shapes, and the implied total."""
    model = HciAtrModel(cfg).eval()
    t_frames = n_frames(cfg.audio) // model.audio.time_reduction
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(64, t_frames, cfg.model.embed_dim, generator=g), dim=-1)
    am = torch.ones(64, t_frames, dtype=torch.bool)
    w = F.normalize(torch.randn(64, cfg.model.max_words, cfg.model.embed_dim, generator=g), dim=-1)
    wm = torch.arange(cfg.model.max_words)[None] < 14
    wm = wm.expand(64, -1)
    set_similarity(a[:4], am[:4], w[:4], wm[:4])
    t0 = time.perf_counter()
    set_similarity(a, am, w, wm)
    sec = time.perf_counter() - t0
    pairs = 64 * 64
    return {"frames_per_clip": t_frames, "pair_seconds": sec / pairs,
            "frame_level_estimate_s": sec / pairs * clips * captions}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=1045)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--audio-width", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    cfg = Config().override({"audio.duration": args.seconds, "model.audio_width": args.audio_width})
    work = Path(args.workdir or tempfile.mkdtemp(prefix="eval_scale_"))
    feats, model_dir = work / "features", work / "model"
    if not feats.exists():
        t0 = time.perf_counter()
        write_features(feats, args.clips, args.seconds, cfg)
        print(f"features: {args.clips} clips of {args.seconds:g} s written in {time.perf_counter() - t0:.0f} s",
              flush=True)
    if not model_dir.exists():
        torch.manual_seed(0)
        HciAtrModel(cfg).save_pretrained(model_dir)
    rate = block_rate(cfg, args.clips, args.clips * 5)
    cmd = [sys.executable, "-m", "workflows.cli", "evaluate", "--model", str(model_dir), "--features", str(feats),
           "--split", "test", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])
    feature_mb = sum(p.stat().st_size for p in feats.glob("part-*.parquet")) / 2 ** 20
    print(json.dumps({
        "clips": args.clips, "captions": int(metrics["n_text"]), "seconds_per_clip": args.seconds,
        "audio_width": args.audio_width, "evaluate_wall_s": round(wall, 1), "evaluate_peak_rss_mb": round(rss_mb),
        "feature_files_mb": round(feature_mb), **{k: (round(v, 9) if isinstance(v, float) else v)
                                                  for k, v in rate.items()},
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }, indent=1))


if __name__ == "__main__":
    main()
