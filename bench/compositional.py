"""Cost of one epoch of the compositional ablation preset (`hci-atr ablate --preset compositional`), per variant.

Runs the ablation's fit loop for one epoch, the way one of its Ray tasks does (one torch thread), on the preset's
split sizes: the demo's captions and splits (`make-demo --size 2000 --pairs-in-split`, rendered at 8 kHz only to
write it fast) with random log-mels of the preset's clip length (training cost does not depend on what the mels
hold). Prints the seconds of the training pass and of the validation that follows it; a whole run is about
(epochs until early stopping) x their sum, and the ablation runs two such tasks at a time on 2 cores.

    python bench/compositional.py                          # hci_order_hard, the most expensive variant
    python bench/compositional.py --variant clip --variant hci
    python bench/compositional.py --variant hci_order_text2 --epochs 3 --set train.text_cache_mb=0
    # the demo's size and width (240 clips: 168 train; cnn-small width 32, 24 clips a batch): frozen vs top-2 tower
    python bench/compositional.py --size 240 --set model.audio_width=32 --set train.batch_size=24 \
        --variant hci --variant hci_text2 --epochs 3

With ``--epochs N`` each epoch's seconds are printed (the text cache fills during the first epochs: a clip's
caption is drawn from its five each epoch, the validation captions are all held after the first validation).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402


def rows_of(data: Path, cfg) -> dict[str, list[dict]]:
    from hci_atr.data.audio import n_frames
    from hci_atr.data.formats import read_dataset

    rng = np.random.default_rng(0)
    t, m = n_frames(cfg.audio), cfg.audio.n_mels
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for r in read_dataset(data):
        mel = (rng.standard_normal(t * m, dtype=np.float32) * 2 - 8)
        out[r.split].append({"audio_id": r.audio_id, "split": r.split, "audio_path": r.audio_path,
                             "captions": list(r.captions), "duration": cfg.audio.duration, "n_frames": t,
                             "n_mels": m, "mel": mel, "generated_caption": None})
    for rows in out.values():
        rows.sort(key=lambda r: r["audio_id"])
    return out


def main() -> None:
    from hci_atr.data.demo import make_demo
    from hci_atr.training import InProcess, fit, seeded_model
    from workflows.variants import VARIANTS, get_preset, variant_config
    from workflows.settings import Settings

    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", default=None, help="[hci_order_hard]; repeatable")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (an ablation task uses 1)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--size", type=int, default=None, help="demo clips [the preset's 2000]")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every variant (YAML value), repeatable")
    args = ap.parse_args()
    from hci_atr.config import NULL
    from workflows.cli import parse_key_values

    extra = {k: NULL if v is None else v for k, v in parse_key_values(args.set, "--set").items()}  # as ablate --set
    preset = get_preset("compositional")
    base = Settings().override(preset.overrides, "preset")
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="compositional_"))
    size = args.size or preset.demo_size
    data = work / f"demo{size}"
    if not (data / "demo_metadata.json").is_file():
        make_demo(data, seed=0, size=size, duration=base.audio.duration, sample_rate=8000,
                  progress=False, pairs_in_split=True)
    splits = rows_of(data, base)
    width = extra.get("model.audio_width", base.model.audio_width)
    batch = extra.get("train.batch_size", base.train.batch_size)
    print(f"rows: train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])}; "
          f"{base.audio.duration:g} s clips, width {width}, batch {batch}, "
          f"{args.threads} thread(s)")
    for name in args.variant or ["hci_order_hard"]:
        cfg = variant_config(base, VARIANTS[name], 0).override(
            {"train.epochs": args.epochs, "train.early_stopping_patience": 0, **extra}, "bench")
        model = seeded_model(cfg)
        hooks = InProcess(cfg, splits["train"], splits["val"])
        ends = [time.perf_counter()]
        keep = hooks.on_epoch_end
        hooks.on_epoch_end = lambda end: (keep(end), ends.append(time.perf_counter()))
        history = fit(model, cfg, hooks).state.history
        for h, t0, t1 in zip(history, ends, ends[1:]):
            print(f"{name} epoch {h['epoch']}: train {h['epoch_seconds']:.1f} s, validation "
                  f"{t1 - t0 - h['epoch_seconds']:.1f} s (val R-sum {h['val_rsum']:.1f})", flush=True)


if __name__ == "__main__":
    main()
