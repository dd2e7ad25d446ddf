"""Bounded loopback load on the Serve app: mixed text and audio queries, N concurrent clients, stops by itself.

Deploys ``serve.app:build`` on 127.0.0.1 (a fresh local Ray), then ``--concurrency`` closed-loop clients send
``--requests`` requests in all (or stop at ``--seconds``, whichever first). The mix, by request number: 70 %
``POST /search/text`` (a caption of an indexed clip), 20 % ``POST /search/audio`` (an indexed clip's own file as the
upload), 10 % ``POST /embed/text``. Reports per kind and overall: requests, errors by status, p50/p95/p99/max latency,
throughput; the top-1 hit rate of audio queries (a clip uploaded should find itself) as a sanity check that the
answers are right, not only fast.

Index: ``--workdir X`` uses what ``hci-atr demo --workdir X`` made (X/models/hci_ac, X/index); ``--model/--index``
name them directly; with neither, a tiny random-weight model and a 48-clip demo index are built first (no downloads).

    python bench/load.py --requests 1000 --concurrency 8 --seconds 300
    python bench/load.py --workdir hci_atr_runs --requests 2000 --concurrency 16 --replicas 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs), q)), 1) if xs else float("nan")


def _summary(lat: list[float], codes: Counter, wall: float) -> dict:
    ok = codes.get(200, 0)
    return {"requests": sum(codes.values()), "ok": ok, "errors": sum(codes.values()) - ok,
            "status": {str(k): v for k, v in sorted(codes.items(), key=lambda kv: str(kv[0]))},
            "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99),
            "max_ms": round(max(lat), 1) if lat else float("nan"), "rps": round(ok / wall, 2) if wall else 0.0}


def run_load(base_url: str, captions: list[str], clips: list[tuple[str, bytes]], requests: int, seconds: float,
             concurrency: int, token: str | None = None) -> dict:
    """Closed loop: each client takes the next request number until ``requests`` are sent or ``seconds`` pass."""
    import httpx

    lock = threading.Lock()
    state = {"next": 0}
    lat: dict[str, list[float]] = {"text": [], "audio": [], "embed": []}
    codes: dict[str, Counter] = {k: Counter() for k in lat}
    self_hits = [0, 0]  # audio queries whose top hit is the uploaded clip, audio queries answered
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=60, headers=headers) as c:
            while True:
                with lock:
                    n = state["next"]
                    if n >= requests or time.perf_counter() > deadline:
                        return
                    state["next"] = n + 1
                kind = "audio" if n % 10 in (3, 7) else "embed" if n % 10 == 5 else "text"
                t0 = time.perf_counter()
                try:
                    if kind == "text":
                        r = c.post("/search/text", json={"query": captions[n % len(captions)], "top_k": 10})
                    elif kind == "embed":
                        r = c.post("/embed/text", json={"texts": [captions[n % len(captions)]]})
                    else:
                        cid, data = clips[n % len(clips)]
                        r = c.post("/search/audio", files={"file": (f"{n}.wav", data, "audio/wav")},
                                   data={"top_k": "5"})
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1  # connection error / timeout
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    codes[kind][code] += 1
                    if code == 200:
                        lat[kind].append(dt)
                        if kind == "audio":
                            self_hits[1] += 1
                            self_hits[0] += int(r.json()["hits"][0]["id"] == cid)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    per_kind = {k: _summary(lat[k], codes[k], wall) for k in lat}
    total = _summary([x for v in lat.values() for x in v], sum(codes.values(), Counter()), wall)
    return {"concurrency": concurrency, "wall_s": round(wall, 2), "total": total, "per_kind": per_kind,
            "audio_self_top1": round(self_hits[0] / self_hits[1], 3) if self_hits[1] else None,
            "stopped_by": "requests" if state["next"] >= requests else "time limit"}


def _resolve(args, tmp: Path) -> tuple[Path, Path]:
    if args.workdir:
        w = Path(args.workdir)
        return w / "models" / "hci_ac", w / "index"
    if args.model and args.index:
        return Path(args.model), Path(args.index)
    from serve_load import _tiny_model_and_index  # bench/serve_load.py: random-weight tiny model + demo index

    return _tiny_model_and_index(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="An `hci-atr demo --workdir` folder (models/hci_ac + index).")
    ap.add_argument("--model")
    ap.add_argument("--index")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=300.0, help="Stop after this long even if requests remain.")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--token", default=None, help="Deploy with this API token and send it (auth on the hot path).")
    ap.add_argument("--out", default=None, help="Also write the result JSON here.")
    a = ap.parse_args()

    import ray
    from ray import serve

    from hci_atr.search.index import Index
    from serve.app import build
    from serve_load import _free_port

    tmp = tempfile.TemporaryDirectory(prefix="hci_atr_load_")
    model, index = _resolve(a, Path(tmp.name))
    idx = Index.load(index)
    captions = [c for c in idx.captions["text"].tolist() if c]
    meta = idx.metadata
    clips = [(str(i), Path(p).read_bytes()) for i, p in zip(meta["id"], meta["path"])][:32]
    ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = {"model": str(model), "index": str(index), "replicas": str(a.replicas)}
        if a.token:
            args["token"] = a.token
        serve.run(build(args), name="hci-atr-load", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        run_load(base, captions, clips, 16, 60, 2, a.token)  # warm-up, not reported
        res = run_load(base, captions, clips, a.requests, a.seconds, a.concurrency, a.token)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
           "replicas": a.replicas, "clips": len(meta), "auth": bool(a.token), **res}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    t = res["total"]
    print(f"\n{t['requests']} requests ({res['stopped_by']}), concurrency {a.concurrency}, {a.replicas} replica(s): "
          f"{t['errors']} errors; p50 {t['p50_ms']} ms, p95 {t['p95_ms']} ms, p99 {t['p99_ms']} ms; {t['rps']} req/s")


if __name__ == "__main__":
    main()
