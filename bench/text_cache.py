"""The text side of one training step with the packaged MiniLM's top k layers training, with and without the
partial text cache (the frozen layers below the top k kept per caption; ``train.text_cache_mb``).

    python bench/text_cache.py [--layers 2] [--batch 64] [--steps 5]

64 captions of 14 words (the preset's batch), forward + backward of the text tower; the cache is filled by one step
first, then both ways are timed over the same steps (the cache also runs a one-time check on its first batch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402


def main() -> None:
    from hci_atr.config import Config
    from hci_atr.models.model import HciAtrModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (an ablation task uses 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config().override({"model.freeze_text": False, "train.text_train_layers": args.layers})
    torch.manual_seed(0)
    model = HciAtrModel(cfg)
    model.text.train_top_layers(args.layers)
    model.train()
    texts = [f"a dog barks {i} times then a loud bell rings while rain falls" for i in range(args.batch)]
    batch = model.tokenize(texts, pad_words_to=cfg.model.max_words)

    def steps() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            model.encode_text(batch).sentence.sum().backward()
        return (time.perf_counter() - t0) / args.steps

    assert model.text.enable_cache(1024)
    model.encode_text(batch).sentence.sum().backward()  # fill the cache (and its one-time check)
    assert model.text.cache is not None, "the cache turned itself off"
    cached = steps()
    model.text.disable_cache()
    plain = steps()
    print(f"top {args.layers} of {len(model.text._layers())} layers training, {args.batch} captions, "
          f"{args.threads} thread(s): {cached:.3f} s per step with the cache, {plain:.3f} s without "
          f"({cached / plain:.2f}x)")


if __name__ == "__main__":
    main()
