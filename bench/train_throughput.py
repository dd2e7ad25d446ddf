"""Training throughput: Ray Train with 1 and 2 workers vs a plain single-process PyTorch loop, same data and model.

    python bench/train_throughput.py [--size 120] [--epochs 3] [--batch-size 8]

Makes a demo set, extracts features (Ray Data), then measures samples/s of the training epochs only (start-up,
checkpoint upload and validation excluded: ``epoch_seconds`` covers ``train_epoch`` over the shard, and the plain
loop is timed the same way), first epoch dropped as warm-up. Torch intra-op threads: the plain loop and the 1-worker
run use all cores; with N workers each gets cores // N threads (what ``hci-atr train`` does), so 2 workers on 2 cores
cannot beat 1 worker that already uses both cores unless the per-batch work does not scale with threads. A third Ray
run pins 1 worker to 1 thread (one CPU per worker, Ray's resource model): 2 workers vs that is the like-for-like
scaling step, which is what adding machines or GPUs gives.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-all-gather", action="store_true", help="local negatives only (to see what the gather costs)")
    ap.add_argument("--freeze-text", action="store_true",
                    help="keep the text transformer fixed (the default config's model.freeze_text); without it the "
                         "2-layer BERT trains, and its 2M-parameter word-embedding table dominates the gradient "
                         "all-reduce and the optimizer step")
    args = ap.parse_args()

    import ray
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hci_atr import training
    from workflows.settings import Settings
    from hci_atr.data.demo import make_demo
    from hci_atr.models.model import HciAtrModel
    from hci_atr.models.text_encoder import packaged_minilm_path
    from workflows.cluster import ensure_ray
    from workflows.features import extract_features
    from hci_atr.data.shards import read_split_rows
    from workflows.train import train

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    make_demo(work / "data", seed=0, size=args.size, duration=2.0, sample_rate=16000, progress=False)
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    fcfg = Settings().override({"audio.sample_rate": 16000, "audio.duration": 2.0, "audio.n_mels": 32,
                              "pipeline.rows_per_shard": 16})
    extract_features(work / "data", work / "feats", cfg=fcfg, progress=False)
    tok = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=128)).save_pretrained(work / "text")
    tok.save_pretrained(work / "text")

    def cfg(workers: int) -> Settings:
        return Settings().override({
            "audio.sample_rate": 16000, "audio.duration": 2.0, "audio.n_mels": 32,
            "model.text_encoder": str(work / "text"), "model.freeze_text": args.freeze_text, "model.audio_width": 16,
            "model.embed_dim": 64, "train.epochs": args.epochs, "train.batch_size": args.batch_size // workers,
            "run.num_workers": workers, "run.storage_path": str(work / "runs"),
            "run.run_name": f"w{workers}", "run.registered_model": "bench",
            "train.all_gather": not args.no_all_gather})

    results, data_share = {}, {}
    # plain loop: same rows, same global batch; with all cores, and with one thread (what each of 2 workers gets)
    c = cfg(1)
    rows = read_split_rows(work / "feats", "train")
    for name, threads in (("plain", cores), ("plain_1thread", 1)):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = HciAtrModel(c)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c.train.lr)
        g = torch.Generator().manual_seed(0)
        times = []
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            h = training.train_epoch(model, opt, training.iter_batches(rows, c, model, True, g, drop_last=True), c)
            times.append((time.perf_counter() - t0, h["batches"] * args.batch_size))
        steady = times[1:] or times
        results[name] = sum(n for _, n in steady) / sum(t for t, _ in steady)
    torch.set_num_threads(cores)

    # hci-atr train's default threads (cores // workers), and 1 worker pinned to 1 thread: Ray's own resource model
    # (one CPU per worker), the base against which adding a second 1-CPU worker is a like-for-like scaling step
    for name, workers, threads in (("ray_1w", 1, None), ("ray_1w_1thread", 1, 1), ("ray_2w", 2, None)):
        c = cfg(workers).override({"run.run_name": name})
        res = train(c, work / "feats", tracking_uri=f"sqlite:///{work / 'mlflow.db'}", register=False,
                    log_examples=False, torch_threads=threads)
        hist = res.history[1:] or res.history
        samples = sum(h["batches"] * args.batch_size for h in hist)  # batches per worker x global batch
        results[name] = samples / sum(h["epoch_seconds"] for h in hist)
        data_share[name] = sum(h["data_seconds"] for h in hist) / sum(h["epoch_seconds"] for h in hist)

    out = {"samples_per_s": {k: round(v, 2) for k, v in results.items()},
           "ray_1w_over_plain": round(results["ray_1w"] / results["plain"], 3),
           "ray_2w_over_1w": round(results["ray_2w"] / results["ray_1w"], 3),
           "ray_2w_over_1w_1thread": round(results["ray_2w"] / results["ray_1w_1thread"], 3),
           "ray_1w_1thread_over_plain_1thread": round(results["ray_1w_1thread"] / results["plain_1thread"], 3),
           "plain_over_plain_1thread": round(results["plain"] / results["plain_1thread"], 3),
           "ray_data_wait_share": {k: round(v, 3) for k, v in data_share.items()},
           "train_rows": len(rows), "global_batch": args.batch_size, "cores": cores,
           "trainable_params": sum(p.numel() for p in HciAtrModel(cfg(1)).parameters() if p.requires_grad)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
