"""Audio front-end throughput: decode, decode + resample, and decode + resample + log-mel (clips/s, one process).

    python bench/frontend.py [--clips 48] [--duration 5] [--repeats 3]

Demo clips are written to a temporary folder at three source sample rates: 32 kHz (no resampling needed for the
default 32 kHz front end), 16 kHz and 44.1 kHz. Each stage is timed over all clips, best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

from hci_atr.config import AudioConfig
from hci_atr.data.audio import clip_features, load_audio
from hci_atr.data.demo import make_demo
from hci_atr.data.formats import read_dataset


def _best(fn, paths, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, time.perf_counter() - t0)
    return len(paths) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = one core per worker)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = AudioConfig(duration=args.duration)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sr in (32000, 16000, 44100):
            root = Path(tmp) / f"demo_{sr}"
            make_demo(root, seed=0, size=args.clips, duration=args.duration, sample_rate=sr, progress=False)
            paths = [r.audio_path for r in read_dataset(root)]
            decode = _best(lambda p: sf.read(p, dtype="float32"), paths, args.repeats)
            resample = _best(lambda p: load_audio(p, cfg.sample_rate), paths, args.repeats)
            full = _best(lambda p: clip_features(p, cfg), paths, args.repeats)
            rows.append((sr, decode, resample, full, full * args.duration))
    print(f"{args.clips} clips x {args.duration:g} s, front end {cfg.sample_rate} Hz / n_fft {cfg.n_fft} / "
          f"hop {cfg.hop_length} / {cfg.n_mels} mels, torch threads {args.threads}, best of {args.repeats}")
    print("| source rate | decode (clips/s) | + mono/resample (clips/s) | + log-mel (clips/s) | audio s per s |")
    print("|---|---|---|---|---|")
    for sr, d, r, f, x in rows:
        print(f"| {sr} Hz | {d:.0f} | {r:.0f} | {f:.0f} | {x:.0f} |")


if __name__ == "__main__":
    main()
