"""The serving app.

In process, without Ray (fast): the FastAPI app of :func:`serve.app.create_app` over a :class:`SearchService` with a
stub retriever, driven through httpx's ASGI transport: work off the event loop, auth before the body, body caps,
cheap and quiet health, generic 5xx, security headers, the page script under node, no import-time side effects.

End to end on 127.0.0.1 (marked ``ray``): index built with the Ray Data workflow, the real app deployed with
serve.run, every endpoint over HTTP, every documented 4xx, auth on/off, and the web page in headless Chromium."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np
import pytest

from tests.test_retriever import build_trained_model, shared_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session, demo_root, tiny_text_dir, tmp_path_factory):
    import httpx
    from ray import serve

    from workflows.settings import Settings
    from serve.app import build
    from workflows.index import build_index

    model_dir, records, generated = build_trained_model(demo_root, tiny_text_dir, shared_model_dir(tmp_path_factory))
    root = tmp_path_factory.mktemp("serve")
    caps = root / "captions"
    caps.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"audio_id": list(generated), "generated_caption": list(generated.values())}),
                   caps / "part-00000.parquet")
    summary = build_index(model_dir, root / "index", data=demo_root, captions=caps, cfg=Settings(), num_workers=1,
                          batch_size=8)
    assert summary.clips == len(records) and summary.failed == 0
    port = _free_port()
    from serve.app import http_options
    from workflows.settings import ServeSettings

    serve.shutdown()  # Serve keeps the HTTP options it first started with
    serve.start(http_options=http_options(ServeSettings(), port=port))
    args = {"model": str(model_dir), "index": str(root / "index")}
    serve.run(build(args), name="hci-atr", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    yield {"client": client, "records": records, "generated": generated, "port": port, "args": args,
           "model_dir": model_dir, "index": root / "index"}
    client.close()
    serve.delete("hci-atr")


@pytest.mark.ray
def test_healthz_and_openapi(served):
    c = served["client"]
    r = c.get("/healthz")
    h = r.json()
    assert h["status"] == "ok" and h["n_clips"] == len(served["records"]) and h["auth"] is False
    assert set(h) == {"status", "n_clips", "auth", "max_top_k"}  # no server paths
    assert r.headers["x-content-type-options"] == "nosniff"
    spec = c.get("/openapi.json").json()
    assert {"/search/text", "/search/audio", "/embed/text", "/embed/audio", "/healthz"} <= set(spec["paths"])


@pytest.mark.ray
def test_text_search_beats_chance_and_reranks_by_full_score(served):
    import torch

    from hci_atr.models.model import HciAtrModel
    from hci_atr.search.retriever import Retriever

    c, records = served["client"], served["records"]
    n = len(records)
    test = [r for r in records if r.split == "test"]
    ranks_rerank, ranks_clip = [], []
    for rec in test:
        for cap in rec.captions[:4]:  # the 5th is this clip's (oracle) generated caption
            for rerank, sink in ((True, ranks_rerank), (False, ranks_clip)):
                resp = c.post("/search/text", json={"query": cap, "top_k": 10, "rerank": rerank})
                assert resp.status_code == 200, resp.text
                body = resp.json()
                assert len(body["hits"]) == 10 and body["reranked"] is rerank
                assert {"encode_ms", "retrieve_ms", "rerank_ms", "total_ms"} <= set(body["timings"])
                ids = [h["id"] for h in body["hits"]]
                sink.append(ids.index(rec.audio_id) + 1 if rec.audio_id in ids else None)
    chance = 10 / n
    hit_rerank = float(np.mean([r is not None for r in ranks_rerank]))
    hit_clip = float(np.mean([r is not None for r in ranks_clip]))
    print(f"R@10 over {len(ranks_clip)} test captions, {n} clips: rerank {hit_rerank:.2f}, clip {hit_clip:.2f}, "
          f"chance {chance:.2f}")
    assert hit_rerank > chance + 0.2 and hit_clip > chance + 0.2

    # reranked order is sorted by the model's full score on the stored embeddings, and that score is the one the
    # model computes directly from the clip files (up to the index's float16 storage of segments and frames)
    query = test[0].captions[0]
    body = c.post("/search/text", json={"query": query, "top_k": 8, "rerank": True}).json()
    model = HciAtrModel.from_pretrained(served["model_dir"])
    r = Retriever(model, __import__("hci_atr.search.index", fromlist=["Index"]).Index.load(served["index"]))
    by_id = {x.audio_id: x for x in records}
    with torch.no_grad():
        t = model.encode_text(model.tokenize([query]))
        stored = [float(model.score(r.index.audio_embeddings([r.index.row_of[h["id"]]]), t).fused[0, 0])
                  for h in body["hits"]]
        direct = [float(model.score(r.encode_audio(by_id[h["id"]].audio_path, served["generated"][h["id"]]), t)
                        .fused[0, 0]) for h in body["hits"]]
    np.testing.assert_allclose([h["score"] for h in body["hits"]], stored, atol=1e-5)
    assert stored == sorted(stored, reverse=True)
    np.testing.assert_allclose(stored, direct, atol=2e-3)


@pytest.mark.ray
def test_audio_search_embed_and_clip_audio(served):
    from hci_atr.models.model import HciAtrModel
    from hci_atr.search.index import Index
    from hci_atr.search.retriever import Retriever

    c, records = served["client"], served["records"]
    rec = records[2]
    raw = open(rec.audio_path, "rb").read()
    resp = c.post("/search/audio", files={"file": ("q.wav", raw, "audio/wav")}, data={"top_k": "3"})
    assert resp.status_code == 200, resp.text
    hits = resp.json()["hits"]
    # the clip-level cosine ranking of the upload against the index, as the library computes it from the file (the
    # indexed vectors carry each clip's generated caption (AC), the upload has none: the clip itself need not be first)
    idx = Index.load(served["index"])
    r = Retriever(HciAtrModel.from_pretrained(served["model_dir"]), idx)
    q = r.encode_audio(rec.audio_path).clip.float().numpy()[0]
    cos = idx.clip @ (q / np.linalg.norm(q))
    want = np.argsort(-cos, kind="stable")[:3]
    assert [h["id"] for h in hits] == [idx.ids[int(j)] for j in want]
    np.testing.assert_allclose([h["score"] for h in hits], cos[want], atol=1e-4)
    # what the index holds for this clip is exactly the library's embedding of the file with its generated caption
    own = r.encode_audio(rec.audio_path, served["generated"].get(rec.audio_id)).clip.float().numpy()[0]
    stored = idx.clip[idx.row_of[rec.audio_id]]
    assert float(stored @ (own / np.linalg.norm(own))) > 0.999
    assert hits[0]["audio_url"] == f"/clips/{quote(hits[0]['id'])}/audio"
    resp = c.post("/search/audio", files={"file": ("q.wav", raw, "audio/wav")},
                  data={"top_k": "4", "target": "captions"})
    caps = resp.json()["hits"]
    assert len(caps) == 4 and all(h["kind"] == "caption" for h in caps)
    e = c.post("/embed/text", json={"texts": ["a beep", "a siren"]}).json()
    assert e["dim"] == 32 and np.allclose(np.linalg.norm(np.array(e["embeddings"]), axis=1), 1, atol=1e-5)
    ea = c.post("/embed/audio", files={"file": ("q.wav", raw, "audio/wav")}).json()
    assert ea["dim"] == 32 and len(ea["embeddings"]) == 1
    got = c.get(hits[0]["audio_url"])
    first = next(x for x in records if x.audio_id == hits[0]["id"])
    assert got.status_code == 200 and got.content == open(first.audio_path, "rb").read()
    assert got.headers["content-type"].startswith("audio/")


@pytest.mark.ray
def test_index_workflow_streams_in_item_order(served):
    from hci_atr.search.index import Index

    idx = Index.load(served["index"])
    assert idx.ids == [r.audio_id for r in served["records"]]  # item order kept through the reorder buffer
    assert idx.manifest["version"] == 2 and idx.manifest["unit_dtype"] == "float16"
    assert idx.audio["frames"].dtype == np.float16 and idx.manifest["errors"] == []
    assert [p.name for p in served["index"].parent.iterdir() if p.name.startswith(".")] == []


def _search(port: int, query: str, k: int = 5) -> dict:
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        r = c.post("/search/text", json={"query": query, "top_k": k})
        assert r.status_code == 200, r.text
        return r.json()


@pytest.mark.ray
def test_concurrent_text_searches_share_a_batch_and_equal_one_by_one(served):
    """serve.batch_search (default): concurrent queries are answered by one Retriever.search_text_batch call, and
    each gets what it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    port = served["port"]
    queries = [cap for r in served["records"][:8] for cap in r.captions[:2]]
    alone = [_search(port, q) for q in queries]
    assert all(a["timings"]["batch_size"] == 1 for a in alone)
    with ThreadPoolExecutor(len(queries)) as ex:
        together = list(ex.map(lambda q: _search(port, q), queries))
    for a, b in zip(alone, together):
        assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]]
        np.testing.assert_allclose([h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-5)
    assert max(b["timings"]["batch_size"] for b in together) >= 2


@pytest.mark.ray
def test_serve_scan_options_give_the_same_hits(served, tmp_path):
    """The unbatched path with the numpy scan, one thread and a 5 ms batch wait answers like the defaults."""
    from ray import serve

    from serve.app import build

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("serve:\n  scan: numpy\n  batch_search: false\n  threads: 1\n  batch_wait_timeout_s: 0.005\n")
    queries = [r.captions[0] for r in served["records"][:6]]
    before = [_search(served["port"], q) for q in queries]
    serve.run(build({**served["args"], "config": str(cfg)}), name="hci-atr", route_prefix="/")
    try:
        after = [_search(served["port"], q) for q in queries]
    finally:
        serve.run(build(served["args"]), name="hci-atr", route_prefix="/")
    for a, b in zip(before, after):
        assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]]
        np.testing.assert_allclose([h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-5)
        assert "batch_size" in b["timings"]


def _wav_bytes(seconds: float, sr: int = 16000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * sr), np.float32), sr, format="WAV")
    return buf.getvalue()


@pytest.mark.ray
def test_bad_requests_are_4xx_json(served):
    c = served["client"]
    cases = [
        (c.post("/search/text", json={"query": "a beep", "top_k": 0}), 422, "top_k"),
        (c.post("/search/text", json={"query": "a beep", "top_k": 101}), 422, "top_k"),
        (c.post("/search/text", json={"query": "   "}), 422, "empty"),
        (c.post("/search/text", json={"query": "x" * 1001}), 422, "longer than"),
        (c.post("/search/text", json={"top_k": 3}), 422, "query"),
        (c.post("/search/text", json={"query": "a", "bogus": 1}), 422, "bogus"),
        (c.post("/search/text", content=b"{not json", headers={"content-type": "application/json"}), 400, "malformed"),
        (c.post("/search/text", content=b"query=a", headers={"content-type": "text/plain"}), 415, "application/json"),
        (c.post("/search/audio", json={"query": "a"}), 415, "multipart"),
        (c.post("/search/audio", files={"file": ("a.txt", b"hello", "text/plain")}), 415, "not audio"),
        (c.post("/search/audio", files={"file": ("a.wav", b"RIFFjunk", "audio/wav")}), 400, "decode"),
        (c.post("/search/audio", files={"file": ("a.wav", _wav_bytes(61), "audio/wav")}), 413, "limit"),
        (c.post("/search/audio", files={"file": ("a.wav", b"\0" * (10 * 1024 * 1024 + 70 * 1024), "audio/wav")}),
         413, "exceeds"),
        (c.post("/search/audio", files={"file": ("a.wav", _wav_bytes(1), "audio/wav")}, data={"target": "x"}),
         422, "target"),
        (c.get("/clips/no-such-id/audio"), 404, "not in the index"),
        (c.get("/clips/..%2F..%2Fetc%2Fpasswd/audio"), 404, "not in the index"),
        (c.get("/clips/../../etc/passwd/audio"), 404, None),
        (c.get("/static/..%2Fapp.py"), 404, None),
        (c.get("/nope"), 404, None),
    ]
    for i, (resp, status, words) in enumerate(cases):
        assert resp.status_code == status, (i, resp.status_code, resp.text)
        body = resp.json()
        assert set(body) == {"error"}, (i, body)
        assert "Traceback" not in body["error"]
        if words:
            assert words in body["error"], (i, body)


@pytest.mark.ray
def test_web_page_and_assets(served):
    c = served["client"]
    page = c.get("/")
    assert page.status_code == 200 and 'id="results"' in page.text and "http" not in page.text.split("<body>")[1]
    js = c.get("/static/app.js")
    assert js.status_code == 200 and "/search/text" in js.text and "/search/audio" in js.text


@pytest.mark.ray
@pytest.mark.browser
def test_web_page_in_headless_chromium(served, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); the browser test needs it")
    rec = [r for r in served["records"] if r.split == "test"][0]
    url = f"http://127.0.0.1:{served['port']}/?q={quote(rec.captions[0])}&k=5"
    out = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert 'data-state="done"' in dom, (out.stderr[-2000:], dom[-2000:])
    # the page shows the same top-5 as the API, in order, each with an <audio> pointing at the indexed clip
    api = served["client"].post("/search/text", json={"query": rec.captions[0], "top_k": 5}).json()["hits"]
    import re

    ids = re.findall(r'<li class="hit" data-id="([^"]+)"', dom)
    assert ids == [h["id"] for h in api]
    assert dom.count("<audio") == 5 and f'src="/clips/{quote(api[0]["id"])}/audio"' in dom


@pytest.mark.ray
def test_requests_beyond_the_queue_bound_get_503_at_once(served, tmp_path):
    """Overload: with one replica admitting 2 requests and each caller queueing 1 more, a burst of 16 concurrent
    uploads gets some HTTP 503s from Serve (back-pressure) instead of all queueing; the rest are answered normally,
    and the app serves again once the burst is over."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from ray import serve

    from serve.app import build

    cfg = tmp_path / "tight.yaml"
    cfg.write_text("serve:\n  batch_max_size: 2\n  target_ongoing_requests: 1\n  max_queued_requests: 1\n")
    rec = served["records"][0]
    raw = open(rec.audio_path, "rb").read()  # one 5 s clip: tens of ms to decode and embed
    serve.run(build({**served["args"], "config": str(cfg), "replicas": "1"}), name="hci-atr", route_prefix="/")
    try:
        url = f"http://127.0.0.1:{served['port']}/search/audio"

        def post(_):
            with httpx.Client(timeout=120) as c:
                return c.post(url, files={"file": ("q.wav", raw, "audio/wav")}, data={"top_k": "2"}).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(post, range(16)))
        assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 2, codes
        assert post(0) == 200
    finally:
        serve.run(build(served["args"]), name="hci-atr", route_prefix="/")


def test_deployment_options_follow_the_serve_config():
    # GPU replicas reserve a GPU; every replica admits a full query batch (no Ray needed to check the options)
    from workflows.settings import ServeSettings
    from serve.app import _deployment_options

    cpu = _deployment_options(ServeSettings())
    assert "num_gpus" not in cpu["ray_actor_options"]
    assert cpu["max_ongoing_requests"] >= ServeSettings().batch_max_size
    assert cpu["max_queued_requests"] == ServeSettings().max_queued_requests == 64
    assert _deployment_options(ServeSettings(max_queued_requests=-1))["max_queued_requests"] == -1
    from hci_atr.errors import ConfigError

    with pytest.raises(ConfigError, match="serve.max_queued_requests must be -1 .* got 0"):
        _deployment_options(ServeSettings(max_queued_requests=0))
    gpu = _deployment_options(ServeSettings(replica_gpus=1.0, min_replicas=2, max_replicas=4))
    assert gpu["ray_actor_options"]["num_gpus"] == 1.0
    assert gpu["autoscaling_config"]["min_replicas"] == 2 and gpu["autoscaling_config"]["max_replicas"] == 4


def test_evaluate_use_gpu_without_cuda_is_a_one_line_error(tmp_path, capsys):
    import torch

    from workflows.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the flag is valid here")
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model", str(tmp_path), "--features", str(tmp_path), "--use-gpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --use-gpu: no CUDA device")


# ---------------------------------------------------------------------------------------------------------------
# in process, no Ray: the app over a SearchService with a stub retriever
# ---------------------------------------------------------------------------------------------------------------


class _Hit:
    def __init__(self, rank, id_):
        self.rank, self.id = rank, id_

    def to_dict(self):
        return {"rank": self.rank, "id": self.id, "score": 0.5, "clip_score": 0.5, "kind": "clip"}


class _Result(list):
    def __init__(self, hits):
        super().__init__(hits)
        self.timings, self.reranked = {"total_ms": 1.0}, True


class _StubIndex:
    def __init__(self, root):
        self.root = self.path = root
        self.row_of = {"c1": 0}

    def __len__(self):
        return 1


class StubRetriever:
    """What SearchService calls on a Retriever, with counters; ``fail`` makes searches raise that exception."""

    cfg = SimpleNamespace(audio=SimpleNamespace(sample_rate=16000))

    def __init__(self, index_root):
        self.index = _StubIndex(index_root)
        self.self_checks = 0
        self.fail = None

    def self_check(self):
        self.self_checks += 1

    def search_text_batch(self, queries, top_k, rerank):
        if self.fail is not None:
            raise self.fail
        return [_Result([_Hit(1, "c1")]) for _ in queries]

    def search_audio(self, wave, top_k, target="clips", rerank=True):
        return _Result([_Hit(1, "c1")])

    def embed_audio(self, wave):
        return np.ones(4, np.float32) / 2


@pytest.fixture
def stub_app(tmp_path, monkeypatch):
    """make(**serve_settings, token=None) -> (app, service, stub); @serve.batch works outside a replica."""
    from ray import serve

    from serve.app import SearchService, create_app
    from workflows.settings import ServeSettings

    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(
        _deployment_config=SimpleNamespace(max_ongoing_requests=64)))
    index = tmp_path / "index"
    index.mkdir()
    (index / "manifest.json").write_text("{}")

    def make(token=None, **over):
        stub = StubRetriever(index)
        service = SearchService(stub, ServeSettings(**over), api_token=token)
        return create_app(service), service, stub

    return make


def _client(app):
    import httpx

    # the app re-raises an unexpected error after its 500 reply (for the server log): not the client's business
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test")


def _wav(seconds=0.5):
    return _wav_bytes(seconds)


def test_slow_upload_decode_does_not_stall_the_replica(stub_app, monkeypatch):
    """While one upload's decode is blocked (on a compute thread), /healthz and /search/text on the same replica are
    answered; the upload then completes. (Decoding on the event loop, as before, answered nothing meanwhile.)"""
    import serve.app as app_mod

    entered, release = threading.Event(), threading.Event()
    real = app_mod._decode

    def slow_decode(data, sr, **kw):
        entered.set()
        release.wait(30)  # only the failing (blocking) case ever waits this out
        return real(data, sr, **kw)

    monkeypatch.setattr(app_mod, "_decode", slow_decode)
    app, _, _ = stub_app()

    async def scenario():
        async with _client(app) as c:
            upload = asyncio.create_task(c.post("/search/audio", files={"file": ("a.wav", _wav(), "audio/wav")}))
            assert await asyncio.to_thread(entered.wait, 30)
            health = await c.get("/healthz")
            text = await c.post("/search/text", json={"query": "a dog barks", "top_k": 1})
            still_decoding = not upload.done()
            release.set()
            return health, text, still_decoding, await upload

    health, text, still_decoding, upload = asyncio.run(scenario())
    assert health.status_code == 200 and text.status_code == 200
    assert still_decoding  # both were answered while the decode was blocked
    assert upload.status_code == 200 and upload.json()["hits"][0]["id"] == "c1"


def _counting_body(chunks: int, size: int, seen: list):
    async def gen():
        for _ in range(chunks):
            seen.append(size)
            yield b" " * size
    return gen()


def test_token_is_checked_before_any_body_byte_is_read(stub_app):
    app, _, _ = stub_app(token="s3cret")

    async def scenario():
        seen: list = []
        async with _client(app) as c:
            r = await c.post("/search/text", content=_counting_body(16, 4096, seen),
                             headers={"content-type": "application/json"})
            ok = await c.post("/search/text", json={"query": "a dog"}, headers={"Authorization": "Bearer s3cret"})
            clip = await c.get("/clips/c1/audio?token=wrong")
            return r, seen, ok, clip

    r, seen, ok, clip = asyncio.run(scenario())
    assert r.status_code == 401 and "bearer" in r.json()["error"] and seen == []
    assert ok.status_code == 200 and clip.status_code == 401


def test_json_bodies_are_capped_far_below_the_upload_limit(stub_app):
    """serve.max_json_bytes: 413 for a declared length over it at once, and for a chunked body (no length) as soon
    as the bytes streamed in pass it; uploads keep their own (larger) limit."""
    app, _, _ = stub_app(max_json_bytes=8192)

    async def scenario():
        seen: list = []
        async with _client(app) as c:
            declared = await c.post("/search/text", content=b" " * 20000, headers={"content-type": "application/json"})
            chunked = await c.post("/search/text", content=_counting_body(100, 1024, seen),
                                   headers={"content-type": "application/json"})
            upload = await c.post("/embed/audio", files={"file": ("a.wav", _wav(1.0), "audio/wav")})
            return declared, chunked, seen, upload

    declared, chunked, seen, upload = asyncio.run(scenario())
    assert declared.status_code == 413 and "20000 bytes exceeds the limit of 8192" in declared.json()["error"]
    assert chunked.status_code == 413 and "exceeds the limit of 8192" in chunked.json()["error"]
    assert sum(seen) <= 8192 + 1024  # stopped reading right after the cap
    assert upload.status_code == 200  # 32 KB: over the JSON cap, within the upload limit


def test_query_without_words_is_a_422_and_non_latin_queries_search(stub_app):
    app, _, _ = stub_app()

    async def scenario():
        async with _client(app) as c:
            return [await c.post("/search/text", json={"query": q}) for q in
                    ("\u200b\u200b", "\x00\x01", "собака лает", "犬が吠える", "café")]

    zw, ctrl, *ok = asyncio.run(scenario())
    assert zw.status_code == 422 and "no words" in zw.json()["error"]
    assert ctrl.status_code == 422 and "no words" in ctrl.json()["error"]
    assert all(r.status_code == 200 for r in ok)


def test_healthz_is_cheap_and_reveals_nothing(stub_app, caplog):
    """No forward pass per call (the warm-up ran once at start), no paths in the body; with the index gone a bare
    503 whose reason is in the server log only."""
    app, service, stub = stub_app(token="t")

    async def get():
        async with _client(app) as c:
            return [await c.get("/healthz") for _ in range(3)]

    assert stub.self_checks == 1 and service.ready
    oks = asyncio.run(get())
    assert stub.self_checks == 1
    assert all(r.status_code == 200 for r in oks)
    assert oks[0].json() == {"status": "ok", "n_clips": 1, "auth": True, "max_top_k": 100}
    (service.index_root / "manifest.json").rename(service.index_root / "gone.json")
    with caplog.at_level("WARNING", logger="hci_atr.serve"):
        sick = asyncio.run(get())[0]
    assert sick.status_code == 503 and sick.json() == {"error": "unhealthy"}
    assert "no longer readable" in caplog.text and str(service.index_root) in caplog.text


def test_server_errors_have_generic_bodies(stub_app, caplog):
    from hci_atr.errors import ModelLoadError

    app, _, stub = stub_app()
    cases = [(RuntimeError("/srv/secret/model.bin: boom"), 500), (ModelLoadError("/srv/secret/index: broken"), 503)]

    async def scenario():  # one event loop: the service's batch queue lives on the first loop that used it
        out = []
        async with _client(app) as c:
            for exc, _ in cases:
                stub.fail = exc
                out.append(await c.post("/search/text", json={"query": "a dog"}))
        return out

    with caplog.at_level("ERROR", logger="hci_atr.serve"):
        got = asyncio.run(scenario())
    for r, (_, status) in zip(got, cases):
        assert r.status_code == status and set(r.json()) == {"error"}, r.text
        assert "secret" not in r.text and "boom" not in r.text and "Error" not in r.text
    assert "/srv/secret/model.bin: boom" in caplog.text and "/srv/secret/index: broken" in caplog.text


def test_security_headers_on_every_response_and_csp_on_the_page(stub_app):
    app, _, _ = stub_app()

    async def scenario():
        async with _client(app) as c:
            return {p: await c.get(p) for p in ("/", "/static/app.js", "/healthz", "/nope")}

    got = asyncio.run(scenario())
    assert all(r.headers["x-content-type-options"] == "nosniff" for r in got.values())
    for page in ("/", "/static/app.js"):
        csp = got[page].headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'self'" in csp and "unsafe-inline" not in csp
    assert "content-security-policy" not in got["/healthz"].headers  # /docs keeps working: CSP only on the page
    html = got["/"].text
    import re

    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []  # no inline script under script-src 'self'
    assert not re.search(r"\son[a-z]+=", html) and "style=" not in html


_PAGE_HARNESS = r"""
const fs = require("fs");
const elements = {};
function el(id) {
  if (!elements[id]) elements[id] = { id, value: "", textContent: "", className: "", checked: true, dataset: {},
    files: [], listeners: {}, addEventListener(t, f) { this.listeners[t] = f; }, append() {} };
  return elements[id];
}
const body = { dataset: {} };
global.document = { getElementById: el, body, createElement: () => el("x" + Math.random()) };
global.sessionStorage = { getItem: () => "", setItem() {} };
global.window = { location: { search: "?q=a%20dog" } };
const reply = JSON.parse(process.argv[3]);
global.fetch = async () => ({ ok: reply.status < 400, status: reply.status,
  headers: { get: (k) => k.toLowerCase() === "content-type" ? reply.type : null },
  text: async () => reply.body, json: async () => JSON.parse(reply.body) });
eval(fs.readFileSync(process.argv[2], "utf8"));
setTimeout(() => console.log(JSON.stringify({ status: el("status").textContent, state: body.dataset.state })), 50);
"""


@pytest.mark.parametrize("status,ctype,body,want", [
    (503, "text/plain; charset=utf-8", "Request dropped due to backpressure (num_queued_requests=1)", "busy, try again"),
    (408, "text/plain; charset=utf-8", "Request 1234 timed out after 30.0s.", "timed out, try again"),
    (500, "text/plain", "Internal Server Error", "error: HTTP 500"),
    (422, "application/json", '{"error": "query: no words"}', "error: query: no words"),
])
def test_page_script_handles_plain_text_errors(tmp_path, status, ctype, body, want):
    """serve/static/app.js run under node with a minimal DOM: Serve's plain-text 503/408 (not JSON) show a short
    message instead of a JSON parse error; the app's own JSON errors show their text."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed (apt-get install -y nodejs): runs the page script without a browser")
    harness = tmp_path / "harness.js"
    harness.write_text(_PAGE_HARNESS)
    out = subprocess.run([node, str(harness), str(ROOT / "serve" / "static" / "app.js"),
                          json.dumps({"status": status, "type": ctype, "body": body})],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"status": want, "state": "error"}, got


def test_importing_the_serve_module_loads_no_model_and_queries_no_tracking():
    """`serve run serve.app:...` imports the module on the driver and in every replica: nothing heavy may happen
    there (the model, the index and MLflow belong to the replica's __init__, or to nobody)."""
    code = ("import sys, serve.app; "
            "print(sorted(m for m in ('torch', 'transformers', 'mlflow', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_http_options_carry_the_request_timeout():
    from hci_atr.errors import ConfigError
    from serve.app import http_options
    from workflows.settings import ServeSettings

    assert http_options(ServeSettings(), port=8123) == {"host": "127.0.0.1", "port": 8123, "request_timeout_s": 30.0}
    assert http_options(ServeSettings(request_timeout_s=5))["request_timeout_s"] == 5.0
    with pytest.raises(ConfigError, match="request_timeout_s"):
        http_options(ServeSettings(request_timeout_s=0))


def test_project_errors_map_to_statuses():
    from hci_atr.errors import AudioError, ConfigError, ModelLoadError, NotFoundError, QueryError
    from serve.http import RequestError, status_of

    assert [status_of(e) for e in (QueryError("q"), NotFoundError("n"), AudioError("a"), RequestError("r", 415),
                                   ModelLoadError("m"), ConfigError("c"))] == [422, 404, 400, 415, 503, 503]


def test_health_check_switches_to_a_new_index_version_and_keeps_a_bad_one_out(stub_app):
    """A replica sees that its index changed (Serve's periodic health check), and a new version that cannot be used
    is logged while the loaded one keeps serving."""
    from hci_atr.errors import DataError

    _app, service, stub = stub_app()
    calls = []

    def reload_ok():
        calls.append("ok")
        return len(calls) == 1  # the first check finds a new version, the next ones nothing new

    stub.reload_if_changed = reload_ok
    assert service.unhealthy() is None and service.unhealthy() is None
    assert calls == ["ok", "ok"]

    def reload_bad():
        raise DataError("index v-2: caption_emb.npy has 3 rows, captions.parquet 4")

    stub.reload_if_changed = reload_bad
    assert service.unhealthy() is None  # still healthy: the version in use is fine
    assert service.refresh_index() is False
