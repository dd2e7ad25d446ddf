"""Scoring throughput: clip level vs full HCI vs HCI + AC branch, and metric time on a 1000 x 5000 matrix.

Embeddings are random unit vectors with the shapes the default config produces for 5 s clips (cnn-small: 62 frames,
15 segments of 8 frames stride 4; captions padded to 32 words, 32 phrase slots, ~12 / ~5 of them valid), so only the
scoring code is timed (encoders are not). Run:  python bench/scoring.py [--audio 200 --text 1000]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from hci_atr.config import Config
from hci_atr.metrics import retrieval_metrics
from hci_atr.models.model import AudioEmbeddings, HciAtrModel, TextEmbeddings


def units(b, n, valid, d, g):
    x = F.normalize(torch.randn(b, n, d, generator=g), dim=-1)
    mask = torch.arange(n)[None] < torch.full((b, 1), valid)
    return x * mask[..., None], mask


def timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--audio", type=int, default=200)
    ap.add_argument("--text", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    d = 256
    seg, sm = units(args.audio, 15, 15, d, g)
    fr, fm = units(args.audio, 62, 62, d, g)
    aux = F.normalize(torch.randn(args.audio, d, generator=g), dim=-1)
    a = AudioEmbeddings(F.normalize(torch.randn(args.audio, d, generator=g), dim=-1), seg, sm, fr, fm, aux,
                        torch.ones(args.audio, dtype=torch.bool))
    ph, pm = units(args.text, 32, 5, d, g)
    wd, wm = units(args.text, 32, 12, d, g)
    t = TextEmbeddings(F.normalize(torch.randn(args.text, d, generator=g), dim=-1), ph, pm, wd, wm)
    pairs = args.audio * args.text
    rows = []
    for name, over in (("clip level", {"model.use_segment": False, "model.use_frame": False}),
                       ("full HCI", {}),
                       ("HCI + AC branch", {"model.ac_branch": True})):
        model = HciAtrModel(Config().override(over)).eval()
        with torch.no_grad():
            sec = timed(lambda: model.score(a, t))
        rows.append((name, sec, pairs / sec))
    # clip level on the big matrix too
    big_a, big_t = torch.randn(1000, d), torch.randn(5000, d)
    sec_big = timed(lambda: big_a @ big_t.T)
    sim = np.random.default_rng(0).standard_normal((1000, 5000)).astype(np.float32)
    t2a = np.repeat(np.arange(1000), 5)
    sec_metrics = timed(lambda: retrieval_metrics(sim, t2a))
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.audio} audio x {args.text} texts = {pairs} pairs")
    print("| scoring | seconds | pairs/s |\n|---|---|---|")
    for name, sec, pps in rows:
        print(f"| {name} | {sec:.3f} | {pps:,.0f} |")
    print(f"| clip level, 1000 x 5000 matmul | {sec_big:.4f} | {5_000_000 / sec_big:,.0f} |")
    print(f"metrics on 1000 audio x 5000 texts: {sec_metrics:.3f} s")


if __name__ == "__main__":
    main()
