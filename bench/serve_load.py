"""Serving benchmarks (bounded: every loop stops by itself after a request count or a time limit, whichever first).

1. ``scan``: stage-1 index scan of the Retriever (``hci_atr.retriever._Scanner``) against a plain numpy
   ``q @ M.T`` + ``argpartition`` over the same synthetic L2-normalised float32 embeddings (10k and 100k clips).
2. ``load``: ``POST /search/text`` on a Serve app bound to 127.0.0.1 with 1 and 2 replicas; closed-loop clients
   (``--concurrency``) send up to ``--requests`` queries or stop after ``--seconds``; reports p50/p95/p99 latency and QPS.
   Without ``--model/--index`` it builds a tiny random-weight model and a demo index first (no downloads).

    python bench/serve_load.py scan
    python bench/serve_load.py load --requests 300 --seconds 60 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def bench_scan(sizes=(10_000, 100_000), dim: int = 256, k: int = 50, repeats: int = 30, seed: int = 0) -> list[dict]:
    from hci_atr.retriever import _Scanner

    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        m = rng.standard_normal((n, dim)).astype(np.float32)
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        qs = rng.standard_normal((repeats, dim)).astype(np.float32)
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
        scanner = _Scanner(m)
        t_lib, t_np = [], []
        for q in qs:
            t0 = time.perf_counter()
            r1, _ = scanner.search(q, k)
            t1 = time.perf_counter()
            sims = m @ q
            r2 = np.argpartition(-sims, k - 1)[:k]
            r2 = r2[np.argsort(-sims[r2])]
            t2 = time.perf_counter()
            assert np.array_equal(r1[0], r2), "scanner and numpy disagree"
            t_lib.append((t1 - t0) * 1e3), t_np.append((t2 - t1) * 1e3)
        rows.append({"clips": n, "dim": dim, "k": k, "backend": scanner.backend,
                     "retriever_scan_ms_p50": round(statistics.median(t_lib), 3),
                     "numpy_ms_p50": round(statistics.median(t_np), 3)})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model_and_index(work: Path) -> tuple[Path, Path]:
    """A random-weight tiny model (packaged MiniLM tokenizer, small BERT) and an index of a 48-clip demo set."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hci_atr.config import Config
    from hci_atr.data.demo import make_demo
    from hci_atr.data.formats import read_dataset
    from hci_atr.index import embed_items, items_from_records, write_index
    from hci_atr.models.model import HciAtrModel
    from hci_atr.models.text_encoder import packaged_minilm_path

    torch.manual_seed(0)
    make_demo(work / "demo", seed=0, size=48, duration=2.0, sample_rate=16000, progress=False)
    tok = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(work / "text")
    tok.save_pretrained(work / "text")
    cfg = Config().override({"audio.sample_rate": 16000, "audio.duration": 2.0, "model.audio_width": 8,
                             "model.embed_dim": 32, "model.text_encoder": str(work / "text")})
    HciAtrModel(cfg).save_pretrained(work / "model")
    model = HciAtrModel.from_pretrained(work / "model")
    items = items_from_records(read_dataset(work / "demo"))
    spec, arrays, kept, _ = embed_items(model, items)
    write_index(work / "index", model, spec, arrays, kept)
    return work / "model", work / "index"


def _load_loop(url: str, queries: list[str], requests: int, seconds: float, concurrency: int) -> dict:
    import httpx

    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = [0]
    deadline = time.perf_counter() + seconds

    def worker(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            while True:
                with lock:
                    if counter[0] >= requests or time.perf_counter() > deadline:
                        return
                    n = counter[0]
                    counter[0] += 1
                t0 = time.perf_counter()
                try:
                    r = c.post(url, json={"query": queries[n % len(queries)], "top_k": 10, "rerank": True})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    (lat.append(dt) if ok else None)
                    errors[0] += 0 if ok else 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests_ok": len(lat), "errors": errors[0], "wall_s": round(wall, 2),
            "qps": round(len(lat) / wall, 2), "p50_ms": round(_pct(lat, 50), 1), "p95_ms": round(_pct(lat, 95), 1),
            "p99_ms": round(_pct(lat, 99), 1)}


def bench_load(model: str | None, index: str | None, requests: int, seconds: float, concurrency: int,
               replicas=(1, 2)) -> list[dict]:
    import ray
    from ray import serve

    from serve.app import build

    tmp = tempfile.TemporaryDirectory(prefix="hci_atr_bench_")
    if not (model and index):
        model, index = _tiny_model_and_index(Path(tmp.name))
    from hci_atr.index import Index

    caps = Index.load(index).captions["text"].tolist()
    ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    out = []
    try:
        for n in replicas:
            serve.run(build({"model": str(model), "index": str(index), "replicas": str(n)}), name="bench",
                      route_prefix="/")
            url = f"http://127.0.0.1:{port}/search/text"
            _load_loop(url, caps, min(20, requests), seconds, 2)  # warm-up (not reported)
            res = _load_loop(url, caps, requests, seconds, concurrency)
            out.append({"replicas": n, "concurrency": concurrency, **res})
            print(json.dumps(out[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["scan", "load", "all"])
    ap.add_argument("--model")
    ap.add_argument("--index")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                      "processor": platform.processor() or "unknown"}))
    if a.what in ("scan", "all"):
        for row in bench_scan():
            print(json.dumps(row), flush=True)
    if a.what in ("load", "all"):
        bench_load(a.model, a.index, a.requests, a.seconds, a.concurrency)


if __name__ == "__main__":
    main()
