"""Training memory: materialized vs streamed training rows as the training set grows (1x -> 4x -> 16x).

    python bench/train_memory.py [--base-rows 300] [--scales 1,4,16] [--stored-seconds 8] [--epochs 2]

Writes synthetic feature shards straight to parquet (the extract-features schema; random log-mels of
``--stored-seconds`` at 16 kHz / hop 320 / 32 mels, one short caption each, 64 rows per file, 32 validation rows),
then trains the same tiny model (cnn-small width 8, 2-layer BERT-32, embed 32, batch 16 per worker) with
``hci-atr train``'s Ray Train path on 2 workers (1 torch thread each), once per data mode. Training crops 1 s of
every clip (``audio.duration``), so the stored length sets the data size without changing the compute per sample.

Per run: peak RSS of each worker (``VmHWM`` from ``/proc/self/status``, read inside the worker at the end of the
last epoch's training pass: the trace files of ``workflows.train.train(trace=...)``; it counts the object-store pages
a worker maps as well, split out as ``RssShmem`` at that moment), the object store's peak bytes in use over the whole
call (the raylet's store stats, polled every 0.1 s from the driver), and samples/s of the training epochs
(``epoch_seconds``: training pass only; the first epoch reported apart as it includes the first read).
Prints one JSON line per run and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import threading
import time
from pathlib import Path

WORDS = ("dog barks loudly water flows birds sing car passes engine idles rain falls wind blows door slams "
         "people talk music plays bell rings footsteps on gravel crowd cheers").split()


def write_features(out: Path, n_train: int, n_val: int, stored_frames: int, n_mels: int, seed: int = 0) -> None:
    """``n_train + n_val`` synthetic rows as extract-features shards (64 rows per part file, audio_id order)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hci_atr.data.shards import FEATURE_SCHEMA

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    n = n_train + n_val
    val = set(rng.choice(n, n_val, replace=False).tolist())
    per_file = 64
    for k, start in enumerate(range(0, n, per_file)):
        ids = list(range(start, min(n, start + per_file)))
        mel = pa.array([rng.standard_normal(stored_frames * n_mels, dtype=np.float32) for _ in ids],
                       pa.list_(pa.float32()))
        caps = [[" ".join(rng.choice(WORDS, 5))] for _ in ids]
        cols = {"audio_id": [f"clip-{i:07d}" for i in ids], "split": ["val" if i in val else "train" for i in ids],
                "audio_path": [f"/synthetic/clip-{i:07d}.wav" for i in ids], "captions": caps,
                "duration": [stored_frames / 50.0] * len(ids), "n_frames": [stored_frames] * len(ids),
                "n_mels": [n_mels] * len(ids), "mel": mel}
        pq.write_table(pa.table(cols, schema=FEATURE_SCHEMA), out / f"part-{k:05d}.parquet")


class StorePeak:
    """Polls the object store's bytes in use from a thread: ``base`` when entered, ``peak`` over the block."""

    def __init__(self, every: float = 0.1):
        self.every, self.base, self.peak, self._stop = every, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)  # this Ray, not another on the host
        return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.used())
            except Exception:  # noqa: BLE001 - the raylet busy for a moment: the next poll counts
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        self.base = self.peak = self.used()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-rows", type=int, default=300, help="training rows at scale 1")
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--stored-seconds", type=float, default=8.0, help="mel length stored per clip")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--modes", default="materialize,stream")
    args = ap.parse_args()

    import ray
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hci_atr.models.text_encoder import packaged_minilm_path
    from workflows.cluster import ensure_ray
    from workflows.settings import Settings
    from workflows.train import train

    work = Path(tempfile.mkdtemp(prefix="bench_train_memory_"))
    tok = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(work / "text")
    tok.save_pretrained(work / "text")
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    stored_frames = int(args.stored_seconds * 50) + 1  # 16 kHz, hop 320: 50 frames a second (+1, as the STFT)
    results = []
    for scale in [int(x) for x in args.scales.split(",")]:
        feats = work / f"feats-{scale}x"
        n_train = args.base_rows * scale
        write_features(feats, n_train, 32, stored_frames, 32)
        disk = sum(p.stat().st_size for p in feats.glob("part-*.parquet"))
        for mode in args.modes.split(","):
            name = f"{mode}-{scale}x"
            cfg = Settings().override({
                "audio.sample_rate": 16000, "audio.duration": 1.0, "audio.n_mels": 32,
                "model.text_encoder": str(work / "text"), "model.audio_width": 8, "model.embed_dim": 32,
                "model.max_words": 16, "train.epochs": args.epochs, "train.batch_size": 16, "train.seed": 0,
                "run.num_workers": 2, "run.data_mode": mode, "run.storage_path": str(work / "runs"),
                "run.run_name": name, "run.registered_model": "bench"})
            trace = work / f"trace-{name}"
            t0 = time.perf_counter()
            gc.collect()  # the previous run's dataset references
            with StorePeak() as store:
                res = train(cfg, feats, tracking_uri=f"sqlite:///{work / 'mlflow.db'}", torch_threads=1,
                            log_examples=False, register=False, trace=trace)
            wall = time.perf_counter() - t0
            last = args.epochs - 1
            mem = [json.loads((trace / f"share-e{last:03d}-r{r}.json").read_text())["memory_kib"] for r in (0, 1)]
            h = res.history
            sps = [x["batches"] * 16 * 2 / x["epoch_seconds"] for x in h]
            row = {"mode": mode, "scale": scale, "train_rows": n_train, "disk_mib": disk / 2**20,
                   "worker_peak_rss_mib": max(m.get("VmHWM", 0) for m in mem) / 1024,
                   "worker_rss_shmem_mib": max(m.get("RssShmem", 0) for m in mem) / 1024,
                   "worker_rss_anon_mib": max(m.get("RssAnon", 0) for m in mem) / 1024,
                   "store_peak_mib": (store.peak - store.base) / 2**20, "samples_per_s_first": sps[0],
                   "samples_per_s_rest": (sum(sps[1:]) / len(sps[1:])) if len(sps) > 1 else float("nan"),
                   "wall_s": wall}
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| mode | scale | train rows | parquet MiB | worker peak RSS MiB (VmHWM) | of it shared (RssShmem) | "
          "worker RssAnon MiB | object store peak MiB | samples/s epoch 1 | samples/s later |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['scale']}x | {r['train_rows']} | {r['disk_mib']:.1f} | {r['worker_peak_rss_mib']:.0f} | "
              f"{r['worker_rss_shmem_mib']:.0f} | {r['worker_rss_anon_mib']:.0f} | {r['store_peak_mib']:.1f} | "
              f"{r['samples_per_s_first']:.0f} | {r['samples_per_s_rest']:.0f} |")


if __name__ == "__main__":
    main()
