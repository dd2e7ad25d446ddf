"""Serving benchmarks (bounded: every loop stops by itself after a request count or a time limit, whichever first).

1. ``scan``: stage-1 index scan of the Retriever (``hci_atr.search.scan.Scanner``, each backend: numpy, FAISS exact,
   FAISS fp16) against a plain numpy ``M @ q`` + ``argpartition`` over the same synthetic L2-normalised float32
   embeddings (10k and 100k clips), ``--threads`` intra-op threads (1, as a Serve replica runs).
2. ``load``: ``POST /search/text`` on a Serve app bound to 127.0.0.1 with 1 and 2 replicas; closed-loop clients
   (``--concurrency``) send up to ``--requests`` queries or stop after ``--seconds``; reports p50/p95/p99 latency and QPS.
   Without ``--model/--index`` it builds a tiny random-weight model and a demo index first (no downloads).
3. ``large``: the serving target at scale. Writes an untrained model of the DEFAULT architecture with the HCI+AC
   switches the demo serves (cnn-small width 32, packaged MiniLM text encoder, embed_dim 256, AC fusion + branch) with
   ``save_pretrained``, then a synthetic ``--clips``-clip index through the project's own
   ``hci_atr.search.index.IndexWriter``
   (the real format: clip matrix, segment/frame/generated-caption tensors with the structure the model's
   ``encode_audio`` returns, metadata, reference + generated captions and their embeddings; only the audio embedding
   VALUES are random unit vectors, since embedding 100k real clips would take hours here). Then, per serving
   variant (``--variants``; each one a ``serve:`` YAML the real app reads), it serves the index with the real app
   (``serve.run`` on 127.0.0.1, 1 replica) and runs the closed-loop load at each ``--concurrency``, reporting the
   client p50/p95/p99/QPS and the medians of the stage timings the response carries (encode, stage-1 scan, rerank,
   hit metadata, in-replica total) and of the HTTP/Serve overhead (client latency minus the in-replica total).
   Before serving, it times ``Retriever.search_text`` in-process per scan backend and measures the recall of the
   approximate scans against the exact one. The index is kept under ``--work`` and reused when it matches.

    python bench/serve_load.py scan
    python bench/serve_load.py load --requests 300 --seconds 60 --concurrency 8
    python bench/serve_load.py large --clips 100000 --requests 300 --seconds 30 --concurrency 1,8
"""

from __future__ import annotations

import argparse
import gc
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


def bench_scan(sizes=(10_000, 100_000), dim: int = 256, k: int = 50, repeats: int = 30, seed: int = 0,
               threads: int = 1) -> list[dict]:
    """Stage-1 scan per backend (one query at a time, ``threads`` intra-op threads as a Serve replica sets them)
    against plain numpy ``M @ q`` + ``argpartition``; exact backends must return the same rows."""
    from hci_atr.search.scan import Scanner, set_threads

    set_threads(threads)
    import importlib.util

    backends = ["numpy", "faiss", "faiss-fp16"] if importlib.util.find_spec("faiss") else ["numpy"]
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        m = rng.standard_normal((n, dim)).astype(np.float32)
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        qs = rng.standard_normal((repeats, dim)).astype(np.float32)
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
        for backend in backends:
            scanner = Scanner(m, backend)
            t_lib, t_np = [], []
            for q in qs:
                t0 = time.perf_counter()
                r1, _ = scanner.search(q, k)
                t1 = time.perf_counter()
                sims = m @ q
                r2 = np.argpartition(-sims, k - 1)[:k]
                r2 = r2[np.argsort(-sims[r2])]
                t2 = time.perf_counter()
                if scanner.exact:
                    assert np.array_equal(r1[0], r2), "scanner and numpy disagree"
                t_lib.append((t1 - t0) * 1e3), t_np.append((t2 - t1) * 1e3)
            rows.append({"clips": n, "dim": dim, "k": k, "backend": scanner.backend, "threads": threads,
                         "retriever_scan_ms_p50": round(statistics.median(t_lib), 3),
                         "numpy_ms_p50": round(statistics.median(t_np), 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model_and_index(work: Path) -> tuple[Path, Path]:
    """A random-weight tiny model (packaged MiniLM tokenizer, small BERT) and an index of a 48-clip demo set."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from workflows.settings import Settings
    from hci_atr.data.demo import make_demo
    from hci_atr.data.formats import read_dataset
    from hci_atr.search.embed import embed_items
    from hci_atr.search.index import write_index
    from hci_atr.search.items import items_from_records
    from hci_atr.models.model import HciAtrModel
    from hci_atr.models.text_encoder import packaged_minilm_path

    torch.manual_seed(0)
    make_demo(work / "demo", seed=0, size=48, duration=2.0, sample_rate=16000, progress=False)
    tok = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(work / "text")
    tok.save_pretrained(work / "text")
    cfg = Settings().override({"audio.sample_rate": 16000, "audio.duration": 2.0, "model.audio_width": 8,
                             "model.embed_dim": 32, "model.text_encoder": str(work / "text")})
    HciAtrModel(cfg).save_pretrained(work / "model")
    model = HciAtrModel.from_pretrained(work / "model")
    items = items_from_records(read_dataset(work / "demo"))
    emb = embed_items(model, items)
    write_index(work / "index", model, emb.arrays, emb.items)
    return work / "model", work / "index"


def _load_loop(url: str, queries: list[str], requests: int, seconds: float, concurrency: int,
               timings: list[dict] | None = None) -> dict:
    """Closed loop: ``concurrency`` clients, each sends its next query when the last one answered. ``timings``
    (optional) collects each 200 response's stage timings plus the client-side ``client_ms``."""
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
                    if ok and timings is not None:
                        timings.append({**r.json()["timings"], "client_ms": dt})

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
    from hci_atr.search.index import Index

    caps = Index.load(index).captions["text"].tolist()
    ray.init(address="local", num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, configure_logging=False)
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


# ---------------------------------------------------------------------------------------------------------------
# large: a synthetic index of --clips clips in the real format, served by the real app
# ---------------------------------------------------------------------------------------------------------------

_SOUNDS = ["a dog", "a small dog", "birds", "a crow", "a baby", "a man", "a woman", "children", "a crowd", "rain",
           "wind", "thunder", "a car", "a truck", "a train", "a motorcycle", "an airplane", "a helicopter", "a bell",
           "a siren", "an alarm", "water", "a stream", "waves", "a door", "footsteps", "a clock", "a phone",
           "a guitar", "a piano", "a drum", "an engine", "a fan", "a horse", "a cat", "frogs", "insects", "a chainsaw",
           "a hammer", "a vacuum cleaner"]
_ACTIONS = ["barks", "sings", "chirps", "cries", "speaks", "laughs", "falls", "blows", "rumbles", "passes by",
            "idles", "rings", "beeps", "flows", "splashes", "creaks", "ticks", "plays", "hums", "knocks"]
_PLACES = ["in the distance", "nearby", "outside", "in a room", "on a street", "in a forest", "near a river",
           "in a city", "at night", "in the rain", "over and over", "while people talk", "with an echo", "loudly",
           "softly"]


def _caption(rng: np.random.Generator) -> str:
    return f"{_SOUNDS[rng.integers(len(_SOUNDS))]} {_ACTIONS[rng.integers(len(_ACTIONS))]} " \
           f"{_PLACES[rng.integers(len(_PLACES))]}"


def large_model(work: Path, arch: str) -> Path:
    """``default``: the default architecture with the demo's HCI+AC switches, untrained heads and audio encoder,
    the packaged (pretrained) MiniLM text encoder; ``tiny``: the random-weight tiny model of the ``load`` mode."""
    import torch

    from workflows.settings import Settings
    from hci_atr.models.model import HciAtrModel

    out = work / f"model_{arch}"
    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(0)
    ac = {"model.ac_fusion": True, "model.ac_branch": True, "model.ac_augment": True}
    if arch == "tiny":  # its text encoder folder stays under work/tiny
        cfg = HciAtrModel.from_pretrained(_tiny_model_and_index(work / "tiny")[0]).cfg.override(ac)
    else:
        cfg = Settings().override(ac)
    HciAtrModel(cfg).eval().save_pretrained(out)
    return out


def _unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def large_index(work: Path, model_dir: Path, clips: int, unit_dtype: str, batch: int = 4096, seed: int = 0) -> Path:
    """A ``clips``-clip index written by ``IndexWriter`` with the structure the model's ``encode_audio`` returns.

    Per clip: a random unit clip vector; frames/segments: random unit vectors on a random number of valid leading
    units (50-100 %), zeros + mask False after (the model's padding convention); a generated-caption embedding and
    mask (AC branch); one reference and one generated caption drawn from a small grammar (a few thousand distinct
    texts, each embedded once by the writer). Every row points at one real WAV file (so /clips/{id}/audio works).
    """
    import soundfile as sf
    import torch

    from hci_atr.data.audio import n_frames
    from hci_atr.search.embed import audio_arrays, embed_audio_batch
    from hci_atr.search.index import IndexWriter, is_index
    from hci_atr.search.items import IndexItem
    from hci_atr.models.model import HciAtrModel

    out = work / f"index_{model_dir.name}_{clips}_{unit_dtype}"
    if is_index(out):
        return out
    model = HciAtrModel.from_pretrained(model_dir)
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    wav = work / "clip.wav"
    sf.write(wav, (0.1 * rng.standard_normal(int(cfg.audio.sample_rate * cfg.audio.duration))).astype(np.float32),
             cfg.audio.sample_rate)
    t = n_frames(cfg.audio)
    with torch.no_grad():  # the real structure and per-row shapes, from the model itself
        probe = embed_audio_batch(model, rng.standard_normal((2, t, cfg.audio.n_mels), dtype=np.float32),
                                  np.ones((2, t), bool), ["a dog barks", None])
    probe_arrays = audio_arrays(probe)
    shapes = {k: v.shape[1:] for k, v in probe_arrays.items()}
    t0 = time.perf_counter()
    with IndexWriter(out, model, model_dir=str(model_dir), unit_dtype=unit_dtype,
                     extra={"source": f"synthetic ({clips} clips, bench/serve_load.py large, seed {seed})"}) as w:
        for lo in range(0, clips, batch):
            b = min(batch, clips - lo)
            arrays = {}
            for name, shape in shapes.items():
                if name.endswith("_mask"):
                    continue
                if len(shape) == 2:  # units [b, U, D] with a mask [b, U]
                    units = shape[0]
                    valid = rng.integers(units // 2, units + 1, size=b)
                    mask = np.arange(units)[None, :] < valid[:, None]
                    arrays[name] = _unit_rows(rng, (b, *shape)) * mask[..., None]
                    arrays[_mask_of(name, shapes)] = mask
                else:  # per-clip vectors [b, D]
                    arrays[name] = _unit_rows(rng, (b, *shape))
            for name in shapes:  # per-clip masks (generated caption present)
                if name not in arrays:
                    arrays[name] = np.ones((b, *shapes[name]), bool)
            items = [IndexItem(f"synth-{i:07d}", str(wav), "", (_caption(rng),), _caption(rng))
                     for i in range(lo, lo + b)]
            w.add(arrays, items)
    print(json.dumps({"built_index": str(out), "clips": clips, "seconds": round(time.perf_counter() - t0, 1)}),
          flush=True)
    return out


def _mask_of(name: str, shapes: dict) -> str:
    cands = {"segments": "segment_mask", "frames": "frame_mask"}
    m = cands.get(name, f"{name}_mask")
    if m not in shapes:
        raise SystemExit(f"bench: no mask field for {name} in {sorted(shapes)}")
    return m


def _index_sizes(index: Path) -> dict:
    from hci_atr.search.index import Index

    index = Index.load(index).path  # the current version's files
    manifest = json.loads((index / "manifest.json").read_text())
    audio = {k: (index / f).stat().st_size for k, f in manifest["files"].items()}
    mb = 1024 * 1024
    return {"clips": manifest["n_clips"], "unit_dtype": manifest.get("unit_dtype", "float32"),
            "clip_npy_mb": round((index / "clip.npy").stat().st_size / mb, 1),
            "rerank_tensors_mb": round(sum(audio.values()) / mb, 1),
            "rerank_tensors_float32_mb": round(sum(v * (2 if np.load(index / manifest["files"][k], mmap_mode="r")
                                                        .dtype == np.float16 else 1) for k, v in audio.items()) / mb, 1),
            "caption_emb_mb": round((index / "caption_emb.npy").stat().st_size / mb, 1),
            "n_captions": manifest["n_captions"], "shapes": {k: list(np.load(index / f, mmap_mode="r").shape[1:])
                                                             for k, f in manifest["files"].items()}}


def _queries(n: int = 64, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return [_caption(rng) for _ in range(n)]


def bench_inprocess(model_dir: Path, index: Path, scans: list[str], threads: int, retrieve_k: int,
                    repeats: int = 40) -> list[dict]:
    """``Retriever.search_text`` in this process (no HTTP): stage medians per scan backend, and the recall@K of the
    approximate scans against the exact one on the same queries."""
    from hci_atr.search.retriever import Retriever
    from hci_atr.search.scan import set_threads

    set_threads(threads)
    qs = _queries(repeats)
    rows, exact_top = [], None
    for scan in scans:
        t0 = time.perf_counter()
        r = Retriever.from_pretrained(model_dir, index, retrieve_k=retrieve_k, scan_backend=scan)
        load_s = time.perf_counter() - t0
        for q in qs[:5]:
            r.search_text(q)
        per = [r.search_text(q, top_k=10) for q in qs]
        med = {k: round(statistics.median(p.timings[k] for p in per), 2)
               for k in ("encode_ms", "retrieve_ms", "rerank_ms", "hits_ms", "total_ms")}
        qv = r.embed_text(qs)
        top = [set(x.tolist()) for x in r.clip_scanner.search(qv, retrieve_k)[0]]
        if scan in ("numpy", "faiss") and exact_top is None:
            exact_top = top
        recall = (round(float(np.mean([len(a & b) / retrieve_k for a, b in zip(top, exact_top)])), 4)
                  if exact_top is not None else None)
        rows.append({"inprocess": True, "scan": r.clip_scanner.backend, "threads": threads, "retrieve_k": retrieve_k,
                     "queries": len(qs), "start_s": round(load_s, 1), **med,
                     f"recall@{retrieve_k}_vs_exact": recall, "loadavg_1m_after": round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), flush=True)
        if scan == "ivf" and exact_top is not None:  # the approximate scan's trade: lists visited vs recall
            for nprobe in (8, 32, 128, 512):
                r.clip_scanner.faiss_index.nprobe = min(nprobe, r.clip_scanner.nlist)
                t_scan = []
                for v in qv:
                    t0 = time.perf_counter()
                    r.clip_scanner.search(v, retrieve_k)
                    t_scan.append((time.perf_counter() - t0) * 1e3)
                top = [set(x.tolist()) for x in r.clip_scanner.search(qv, retrieve_k)[0]]
                rows.append({"inprocess": True, "scan": "ivf", "ivf_nlist": r.clip_scanner.nlist, "ivf_nprobe": nprobe,
                             "scan_ms_p50": round(statistics.median(t_scan), 2),
                             f"recall@{retrieve_k}_vs_exact": round(float(np.mean(
                                 [len(a & b) / retrieve_k for a, b in zip(top, exact_top)])), 4)})
                print(json.dumps(rows[-1]), flush=True)
        del r
        gc.collect()
    return rows


# serving variants: name -> serve section overrides on top of the defaults (ServeSettings); each is measured in turn
VARIANTS = {
    "before": {"scan": "numpy", "threads": 0, "batch_search": False, "batch_wait_timeout_s": 0.005},  # old defaults
    "threads1": {"scan": "numpy", "batch_search": False, "batch_wait_timeout_s": 0.005},
    "faiss_unbatched_wait5ms": {"scan": "faiss", "batch_search": False, "batch_wait_timeout_s": 0.005},
    "faiss_unbatched": {"scan": "faiss", "batch_search": False},
    "defaults": {},  # scan auto (= faiss when installed), threads 1, batch_search, batch wait 0, retrieve_k 50
    "wait0": {"batch_wait_timeout_s": 0.0},
    "fp16_wait0": {"scan": "faiss-fp16", "batch_wait_timeout_s": 0.0},
    "ivf_wait0": {"scan": "ivf", "batch_wait_timeout_s": 0.0},
    "k20_wait0": {"retrieve_k": 20, "batch_wait_timeout_s": 0.0},
    "k100_wait0": {"retrieve_k": 100, "batch_wait_timeout_s": 0.0},
    "fp16_k20_wait0": {"scan": "faiss-fp16", "retrieve_k": 20, "batch_wait_timeout_s": 0.0},
}


def _replica_memory() -> dict:
    """Resident memory of the Serve replica process(es) on this machine, from /proc: anonymous (the process's own
    heap: model, clip matrix, FAISS copy, metadata) and file-backed (memory-mapped index pages it touched)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "SearchDeployment" not in cmd or "ServeReplica" not in cmd:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        vals = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
                if line.startswith(("RssAnon", "RssFile", "VmRSS"))}
        out = {"replica_rss_mb": round(vals.get("VmRSS", 0) / 1024), "replica_anon_mb": round(vals.get("RssAnon", 0)
               / 1024), "replica_file_mb": round(vals.get("RssFile", 0) / 1024)}
    return out


def _stage_medians(timings: list[dict]) -> dict:
    keys = ("encode_ms", "retrieve_ms", "rerank_ms", "hits_ms", "total_ms", "batch_size")
    med = {f"{k}_p50": round(statistics.median(t.get(k, 0.0) for t in timings), 2) for k in keys if timings}
    if timings:
        med["http_serve_overhead_ms_p50"] = round(statistics.median(t["client_ms"] - t["total_ms"] for t in timings), 2)
        med["batch_size_max"] = max(t.get("batch_size", 1.0) for t in timings)
    return med


def bench_large(work: Path, clips: int, arch: str, unit_dtype: str, variants: list[str], concurrencies: list[int],
                requests: int, seconds: float, inprocess: bool) -> list[dict]:
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    model_dir = large_model(work, arch)
    index = large_index(work, model_dir, clips, unit_dtype)
    print(json.dumps({"index": _index_sizes(index)}), flush=True)
    rows: list[dict] = []
    if inprocess:
        rows += bench_inprocess(model_dir, index, ["numpy", "faiss", "faiss-fp16", "ivf"], threads=1, retrieve_k=50)
    import ray
    from ray import serve

    from workflows.settings import Settings
    from serve.app import build

    queries = _queries(256)
    ray.init(address="local", num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/search/text"
    try:
        for name in variants:
            overrides = VARIANTS[name]
            cfg = Settings().override({f"serve.{k}": v for k, v in overrides.items()})
            cfg_path = work / f"serve_{name}.yaml"
            cfg_path.write_text(yaml.safe_dump({"serve": cfg.to_dict()["serve"]}), encoding="utf-8")
            t0 = time.perf_counter()
            serve.run(build({"model": str(model_dir), "index": str(index), "config": str(cfg_path), "replicas": "1"}),
                      name="bench", route_prefix="/")
            start_s = time.perf_counter() - t0
            _load_loop(url, queries, min(30, requests), seconds, 2)  # warm-up (not reported)
            s = cfg.serve
            for conc in concurrencies:
                timings: list[dict] = []
                res = _load_loop(url, queries, requests, seconds, conc, timings)
                rows.append({"variant": name, "clips": clips, "model": arch, "unit_dtype": unit_dtype,
                             "scan": s.scan, "threads": s.threads, "batch_search": s.batch_search,
                             "batch_wait_timeout_s": s.batch_wait_timeout_s, "batch_max_size": s.batch_max_size,
                             "retrieve_k": s.retrieve_k, "replicas": 1, "replica_cpus": s.replica_cpus,
                             "start_s": round(start_s, 1), "concurrency": conc, **res, **_stage_medians(timings),
                             **_replica_memory(), "loadavg_1m_after": round(os.getloadavg()[0], 2)})
                print(json.dumps(rows[-1]), flush=True)
            serve.delete("bench")
            gc.collect()
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["scan", "load", "large", "all"])
    ap.add_argument("--model")
    ap.add_argument("--index")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=1, help="scan: intra-op threads (0: the libraries' defaults)")
    ap.add_argument("--concurrency", default="8", help="clients (load); comma list (large: one run each)")
    ap.add_argument("--clips", type=int, default=100_000, help="large: clips in the synthetic index")
    ap.add_argument("--arch", choices=["default", "tiny"], default="default", help="large: model architecture")
    ap.add_argument("--unit-dtype", choices=["float16", "float32"], default="float16",
                    help="large: how the index stores segment/frame tensors")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"large: comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hci_atr_bench_large"),
                    help="large: folder for the model and index (reused when they exist)")
    ap.add_argument("--no-inprocess", action="store_true", help="large: skip the in-process Retriever timings")
    ap.add_argument("--out", help="large: also write the result rows to this JSON file")
    ap.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                    help="large: environment variable for the local Ray/Serve processes (e.g. Ray Serve settings)")
    a = ap.parse_args()
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                      "processor": platform.processor() or "unknown"}))
    if a.what in ("scan", "all"):
        bench_scan(threads=a.threads)
    if a.what in ("load", "all"):
        bench_load(a.model, a.index, a.requests, a.seconds, int(a.concurrency.split(",")[0]))
    if a.what == "large":
        for kv in a.serve_env:  # set before ray.init: the raylet and every worker it starts inherit them
            key, _, value = kv.partition("=")
            os.environ[key] = value
        unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"bench: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        print(json.dumps({"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "loadavg": os.getloadavg(), "serve_env": a.serve_env}), flush=True)
        rows = bench_large(Path(a.work), a.clips, a.arch, a.unit_dtype, a.variants.split(","),
                           [int(c) for c in a.concurrency.split(",")], a.requests, a.seconds, not a.no_inprocess)
        if a.out:
            from hci_atr.files import atomic_write_text

            atomic_write_text(a.out, json.dumps({"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                 "loadavg_end": os.getloadavg(), "serve_env": a.serve_env,
                                                 "command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
