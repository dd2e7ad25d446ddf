"""Ray Serve app: text -> audio and audio -> audio/text search over an index, a JSON API and a small web page.

Run from the repository root (defaults work after ``hci-atr demo``)::

    serve run serve.app:deployment                                   # HCI_ATR_MODEL / HCI_ATR_INDEX or defaults
    serve run serve.app:build model=path/to/model index=path/to/index [config=serve.yaml]
    python -m serve.app model=DIR index=DIR [config=YAML] [host=127.0.0.1] [port=8000]   # + serve.request_timeout_s

Nothing is loaded at import time: the model and index load in the replica's ``__init__``, which also runs one
warm-up forward pass; ``/healthz`` and Serve's health check then only read a flag and stat the index.

Pieces: :class:`SearchService` (one replica's retriever and limits; plain asyncio, usable without Ray: decoding and
model calls run on ``serve.compute_threads`` worker threads, never on the event loop, so a slow upload does not stall
the replica's other requests), :func:`create_app` (the FastAPI routes over a service; request guard and error
mapping from :mod:`serve.http`, bodies from :mod:`serve.schemas`), :class:`SearchDeployment` (the Serve deployment:
builds the service, then its app, in the replica).

Text search runs in a ``@serve.batch`` (``serve.batch_max_size``, ``serve.batch_wait_timeout_s``): with
``serve.batch_search`` (default) the concurrent queries share one encoder pass and one stage-1 scan
(``Retriever.search_text_batch``), else only the encoder pass is shared. ``serve.scan`` picks the stage-1 scan,
``serve.threads`` the intra-op threads of the replica, ``serve.retrieve_k`` how many candidates are reranked.
BENCHMARKS.md ("Serving") has what each costs at 100k clips.

Endpoints (OpenAPI schema at /openapi.json, docs at /docs):
``POST /search/text`` {query, top_k, rerank} -> ranked clips + stage timings; ``POST /search/audio`` (multipart
``file`` [+ top_k, target=clips|captions, rerank]) -> ranked clips or captions; ``POST /embed/text`` {texts};
``POST /embed/audio`` (multipart ``file``); ``GET /healthz``; ``GET /clips/{id}/audio`` (the indexed file of that
id); ``GET /`` the web page. Every user error is a 4xx JSON ``{"error": message}``. When ``HCI_ATR_API_TOKEN`` is set
(or ``token`` is passed to ``build``) the API needs ``Authorization: Bearer <token>`` (the clip audio route also
accepts ``?token=`` because an <audio> element cannot send headers); the page, its assets and /healthz stay open.
"""

# no `from __future__ import annotations`: FastAPI must see real (not string) types in the route signatures

import asyncio
import functools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import FileResponse
from ray import serve

from hci_atr.data.text import check_query
from hci_atr.errors import ConfigError, HciAtrError, QueryError, one_line
from serve.http import Guard, Policy, RequestError, error, install_error_handlers, log
from serve.schemas import (ERROR_RESPONSES, EmbedResponse, EmbedTextRequest, ErrorOut, HealthOut, SearchResponse,
                           TextSearchRequest)
from workflows.settings import ServeSettings, Settings, load_settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # the only files the page route serves
AUDIO_MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg",
                     ".opus": "audio/ogg", ".m4a": "audio/mp4"}
JSON_ROUTES = frozenset({"/search/text", "/embed/text"})
UPLOAD_ROUTES = frozenset({"/search/audio", "/embed/audio"})
_DEFAULTS = ServeSettings()


def _index_readable(root: Path) -> bool:
    from hci_atr.search.index import is_index

    return is_index(root)


def _init_compute_thread(threads: int) -> None:
    from hci_atr.search.scan import set_threads

    set_threads(threads)  # OpenMP thread counts are per calling thread (FAISS)


def _decode(data: bytes, sample_rate: int, *, max_seconds: float, where: str):
    """An upload's bytes -> mono wave at ``sample_rate`` (runs on a compute thread)."""
    from hci_atr.data.audio import decode_audio

    return decode_audio(data, sample_rate, max_seconds=max_seconds, where=where)


# ---------------------------------------------------------------------------------------------------------------
# one replica's search service (no Ray needed to run it)
# ---------------------------------------------------------------------------------------------------------------


class SearchService:
    """A retriever behind the serve limits. Async methods for the routes; blocking work (decode, tokenize, encode,
    scan, rerank) runs on a pool of ``cfg.compute_threads`` threads, so at most that many run at once and the event
    loop stays free for other requests. Constructing one runs the warm-up forward pass and marks it ready."""

    def __init__(self, retriever: Any, cfg: ServeSettings, api_token: str | None = None):
        if cfg.compute_threads < 1:
            raise ConfigError(f"serve.compute_threads must be >= 1, got {cfg.compute_threads}")
        self.retriever = retriever
        self.cfg = cfg
        self.api_token = api_token or None
        index = retriever.index
        self.index_root = Path(getattr(index, "root", None) or index.path)
        self._pool = ThreadPoolExecutor(max_workers=cfg.compute_threads, thread_name_prefix="hci-atr-compute",
                                        initializer=_init_compute_thread, initargs=(cfg.threads,))
        # per instance: a @serve.batch on the class keeps one queue (and event loop) for every instance
        batch = serve.batch(max_batch_size=cfg.batch_max_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s)
        self._encode_batch = batch(self._encode_queries)
        self._search_batch = batch(self._search_queries)
        self.ready = False
        retriever.self_check()  # the warm-up: model, index and scan answer once before the replica takes requests
        self.ready = True

    @classmethod
    def load(cls, model_dir: str, index_dir: str, cfg: ServeSettings, api_token: str | None = None,
             device: str = "cpu") -> "SearchService":
        from hci_atr.search.retriever import Retriever
        from hci_atr.search.scan import set_threads

        set_threads(cfg.threads)  # before the model and FAISS start their thread pools
        retriever = Retriever.from_pretrained(model_dir, index_dir, device=device, retrieve_k=cfg.retrieve_k,
                                              scan_backend=cfg.scan, ivf_nlist=cfg.ivf_nlist,
                                              ivf_nprobe=cfg.ivf_nprobe)
        if cfg.warm_index:
            retriever.index.warm()
        return cls(retriever, cfg, api_token)

    async def compute(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on a compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # -- health --------------------------------------------------------------------------------------------------
    def unhealthy(self) -> str | None:
        """Why this replica cannot answer now (for the server log), or None. Reads a flag and stats the index, and
        switches to a newer index version when one was written since (Serve calls this every few seconds)."""
        if not self.ready:
            return "warming up"
        self.refresh_index()
        if not _index_readable(self.index_root):
            return f"index {self.index_root} is no longer readable"
        return None

    def refresh_index(self) -> bool:
        """Serve the index folder's current version (`hci-atr index --out` on the same folder writes a new one and
        moves its pointer); a new version that cannot be used is logged and the one in use kept. Returns whether it
        switched."""
        reload = getattr(self.retriever, "reload_if_changed", None)
        if reload is None:
            return False
        try:
            switched = bool(reload())
        except HciAtrError as e:
            log.warning("index %s: a new version is not usable (%s); still serving the one loaded",
                        self.index_root, one_line(e))
            return False
        if switched:
            log.info("index %s: now serving version %s", self.index_root, getattr(self.retriever.index, "version", "?"))
        return switched

    def health(self) -> dict:
        return {"status": "ok", "n_clips": len(self.retriever.index), "auth": bool(self.api_token),
                "max_top_k": self.cfg.max_top_k}

    # -- checks (before batching: one bad request must not fail the batch it would share) ---------------------------
    def check_top_k(self, top_k: int) -> int:
        mx = self.cfg.max_top_k
        if top_k < 1 or top_k > mx:
            raise QueryError(f"top_k: must be between 1 and {mx}, got {top_k}")
        return top_k

    def check_query(self, query: str) -> str:
        return check_query(query, self.cfg.max_query_chars)

    # -- text ------------------------------------------------------------------------------------------------------
    async def _encode_queries(self, queries: list[str]) -> list[Any]:
        """``_encode_batch``: query text encoding batched across concurrent requests: [B] strings -> B
        TextEmbeddings of batch 1."""
        t0 = time.perf_counter()
        text = await self.compute(self.retriever.encode_queries, queries)
        ms = (time.perf_counter() - t0) * 1e3
        return [(text.select(slice(i, i + 1)), ms, len(queries)) for i in range(len(queries))]

    async def _search_queries(self, reqs: list[tuple[str, int, bool]]) -> list[Any]:
        """``_search_batch``: whole text searches batched across concurrent requests (``serve.batch_search``): one
        encoder pass and one stage-1 scan for the batch (``Retriever.search_text_batch``), then each query's own
        rerank."""
        results = await self.compute(self.retriever.search_text_batch, [q for q, _, _ in reqs],
                                     top_k=[k for _, k, _ in reqs], rerank=[r for _, _, r in reqs])
        for res in results:
            res.timings["batch_size"] = float(len(reqs))
        return results

    async def search_text(self, query: str, top_k: int, rerank: bool) -> Any:
        q = self.check_query(query)
        k = self.check_top_k(top_k)
        if self.cfg.batch_search:
            return await self._search_batch((q, k, rerank))
        text, enc_ms, batch = await self._encode_batch(q)
        result = await self.compute(self.retriever.search_text_embedded, text, k, rerank, encode_ms=enc_ms)
        result.timings["batch_size"] = float(batch)
        return result

    async def embed_text(self, texts: list[str]) -> Any:
        texts = [self.check_query(t) for t in texts]
        return await self.compute(self.retriever.embed_text, texts)

    # -- audio -----------------------------------------------------------------------------------------------------
    async def read_upload(self, file: UploadFile) -> Any:
        """The uploaded file -> mono wave at the model's rate (checked, size- and length-limited)."""
        ctype = (file.content_type or "").split(";")[0].strip().lower()
        if ctype and not (ctype.startswith("audio/") or ctype in ("application/octet-stream", "video/ogg")):
            raise RequestError(f"file: content type {ctype} is not audio; upload a WAV, FLAC or OGG file", 415)
        limit = self.cfg.max_upload_bytes
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise RequestError(f"file: larger than the limit of {limit} bytes", 413)
        if not data:
            raise RequestError("file: empty upload", 400)
        sr = self.retriever.cfg.audio.sample_rate
        max_s = self.cfg.max_audio_seconds
        wave = await self.compute(_decode, data, sr, max_seconds=max_s,
                                  where=f"file {file.filename or ''}".strip())
        if len(wave) / sr > max_s:  # decoding stopped just past the limit: the real length is unknown
            raise RequestError(f"file: audio is longer than the limit of {max_s:g} s; send a shorter clip", 413)
        return wave

    async def search_audio(self, wave: Any, top_k: int, target: str, rerank: bool) -> Any:
        return await self.compute(self.retriever.search_audio, wave, self.check_top_k(top_k), target=target,
                                  rerank=rerank)

    async def embed_audio(self, wave: Any) -> Any:
        return await self.compute(self.retriever.embed_audio, wave)

    def clip_path(self, clip_id: str) -> Path:
        if clip_id not in self.retriever.index.row_of:
            raise RequestError(f"clip id {clip_id!r} is not in the index", 404)
        path = self.retriever.clip_path(clip_id)
        if not path.is_file():
            raise RequestError(f"clip {clip_id!r}: its indexed file is missing on the server", 404)
        return path


# ---------------------------------------------------------------------------------------------------------------
# the FastAPI app over a service
# ---------------------------------------------------------------------------------------------------------------


def _hits(result: Any) -> dict:
    hits = []
    for h in result:
        d = h.to_dict()
        d["audio_url"] = f"/clips/{quote(h.id, safe='')}/audio"
        hits.append(d)
    return {"hits": hits, "reranked": bool(result.reranked), "timings": result.timings}


def create_app(service: SearchService) -> Guard:
    """The ASGI app of one replica over ``service``: :class:`~serve.http.Guard` (token, content type, declared
    length, security headers) outermost, so nothing reads a body before it, then the FastAPI routes (FastAPI's
    ``max_body_size`` counts streamed bytes against the same limits)."""
    cfg = service.cfg
    policy = Policy(api_token=service.api_token, max_json_bytes=cfg.max_json_bytes,
                    max_upload_bytes=cfg.max_upload_bytes, json_routes=JSON_ROUTES, upload_routes=UPLOAD_ROUTES)
    return Guard(create_api(service, policy), policy)


def create_api(service: SearchService, policy: Policy) -> FastAPI:
    """The FastAPI routes over ``service`` with the error bodies of :mod:`serve.http`."""
    cfg = service.cfg
    upload = {"max_body_size": policy.body_limit(next(iter(UPLOAD_ROUTES))),
              "form_limits": {"max_files": 1, "max_fields": 10}}
    app = FastAPI(title="hci-atr search", version="0.1.0", max_body_size=cfg.max_json_bytes,
                  description="Audio-text retrieval with hierarchical cross-modal interaction and auxiliary captions.")
    install_error_handlers(app)
    if cfg.cors_origins:  # preflights carry no token: the guard lets OPTIONS through
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        if name not in STATIC_FILES:  # a fixed list: no path from the client reaches the file system
            raise RequestError(f"static file {name!r} not found", 404)
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    @app.get("/healthz", response_model=HealthOut, responses={503: {"model": ErrorOut}})
    async def healthz() -> Any:
        reason = service.unhealthy()
        if reason is not None:
            log.warning("healthz: unhealthy: %s", reason)
            return error(503, "unhealthy")
        return service.health()

    @app.post("/search/text", response_model=SearchResponse, responses=ERROR_RESPONSES)
    async def search_text(req: TextSearchRequest) -> dict:
        return _hits(await service.search_text(req.query, req.top_k, req.rerank))

    @app.post("/search/audio", response_model=SearchResponse, responses=ERROR_RESPONSES, **upload)
    async def search_audio(file: UploadFile = File(description="WAV, FLAC or OGG audio"), top_k: int = Form(10),
                           target: Literal["clips", "captions"] = Form("clips"), rerank: bool = Form(True)) -> dict:
        service.check_top_k(top_k)  # before the upload is decoded
        wave = await service.read_upload(file)
        return _hits(await service.search_audio(wave, top_k, target, rerank))

    @app.post("/embed/text", response_model=EmbedResponse, responses=ERROR_RESPONSES)
    async def embed_text(req: EmbedTextRequest) -> dict:
        emb = await service.embed_text(req.texts)
        return {"dim": int(emb.shape[1]), "embeddings": emb.tolist()}

    @app.post("/embed/audio", response_model=EmbedResponse, responses=ERROR_RESPONSES, **upload)
    async def embed_audio(file: UploadFile = File(description="WAV, FLAC or OGG audio")) -> dict:
        emb = await service.embed_audio(await service.read_upload(file))
        return {"dim": int(emb.shape[0]), "embeddings": [emb.tolist()]}

    @app.get("/clips/{clip_id:path}/audio", responses={404: {"model": ErrorOut}, 401: {"model": ErrorOut}})
    async def clip_audio(clip_id: str) -> FileResponse:
        path = service.clip_path(clip_id)  # looked up in the index metadata, 404 when unknown
        return FileResponse(path, media_type=AUDIO_MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    return app


# ---------------------------------------------------------------------------------------------------------------
# the deployment
# ---------------------------------------------------------------------------------------------------------------


def _resolve_config(config_path: str | None) -> Settings:
    path = config_path or os.environ.get("HCI_ATR_CONFIG")
    return load_settings(path) if path else Settings()


def _deployment_options(cfg: ServeSettings) -> dict:
    if cfg.max_queued_requests != -1 and cfg.max_queued_requests < 1:
        raise ConfigError(f"serve.max_queued_requests must be -1 (no limit) or >= 1, got {cfg.max_queued_requests}")
    # max_ongoing_requests must admit a full @serve.batch, or batching never fills (and Serve warns about it)
    return {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                   "target_ongoing_requests": cfg.target_ongoing_requests},
            "max_ongoing_requests": max(cfg.batch_max_size, int(2 * cfg.target_ongoing_requests)),
            # overload: a bounded queue per caller, then 503 from Serve's proxy (back-pressure, not a slow pile-up)
            "max_queued_requests": cfg.max_queued_requests,
            "ray_actor_options": {"num_cpus": cfg.replica_cpus,
                                  **({"num_gpus": cfg.replica_gpus} if cfg.replica_gpus > 0 else {})}}


def http_options(cfg: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> dict:
    """``serve.start(http_options=...)`` for this app: where the proxy listens and ``serve.request_timeout_s``
    (Serve's proxy answers HTTP 408 past it)."""
    if not cfg.request_timeout_s > 0:
        raise ConfigError(f"serve.request_timeout_s must be > 0 seconds, got {cfg.request_timeout_s}")
    return {"host": host, "port": int(port), "request_timeout_s": float(cfg.request_timeout_s)}


@serve.deployment(**_deployment_options(_DEFAULTS), health_check_period_s=10.0)
@serve.ingress()  # the app is built in the replica (__serve_build_asgi_app__), over that replica's service
class SearchDeployment:
    """One replica: a :class:`SearchService` (model + memory-mapped index) and the FastAPI app over it."""

    def __init__(self, model_dir: str | None = None, index_dir: str | None = None, config_path: str | None = None,
                 api_token: str | None = None, device: str | None = None):
        sc = _resolve_config(config_path).serve
        model_dir = model_dir or os.environ.get("HCI_ATR_MODEL") or sc.model_dir
        index_dir = index_dir or os.environ.get("HCI_ATR_INDEX") or sc.index_dir
        token = api_token if api_token is not None else os.environ.get("HCI_ATR_API_TOKEN", "")
        device = device or ("cuda" if sc.replica_gpus > 0 else "cpu")
        self.service = SearchService.load(model_dir, index_dir, sc, api_token=token or None, device=device)

    def __serve_build_asgi_app__(self) -> Guard:
        return create_app(self.service)

    def check_health(self) -> None:
        """Serve calls this periodically: warmed up and the index still on disk (no forward pass)."""
        reason = self.service.unhealthy()
        if reason is not None:
            raise RuntimeError(reason)


BUILD_ARGS = {"model", "index", "config", "replicas", "token"}


def build(args: dict[str, str]):
    """Application builder: ``serve run serve.app:build model=DIR index=DIR [config=YAML] [replicas=N] [token=T]``.

    Reads only the (small) YAML config here, for the autoscaling options; the model and index load in the replicas.
    """
    args = dict(args or {})
    unknown = set(args) - BUILD_ARGS
    if unknown:
        raise HciAtrError(f"serve.app:build: unknown argument(s) {sorted(unknown)}; known: {sorted(BUILD_ARGS)}")
    cfg = _resolve_config(args.get("config")).serve
    opts = _deployment_options(cfg)
    if args.get("replicas"):
        opts = {**opts, "num_replicas": int(args["replicas"]), "autoscaling_config": None}
    return SearchDeployment.options(**opts).bind(model_dir=args.get("model"), index_dir=args.get("index"),
                                                 config_path=args.get("config"), api_token=args.get("token"))


app_builder = build
deployment = SearchDeployment.bind()


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.app [model=DIR] [index=DIR] [config=YAML] [replicas=N] [token=T] [host=H] [port=P]``:
    starts Serve with :func:`http_options` (so ``serve.request_timeout_s`` applies) and runs the app until
    interrupted."""
    import serve.app as this  # the importable module's deployment, not a copy defined in __main__

    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    host, port = args.pop("host", "127.0.0.1"), int(args.pop("port", "8000"))
    cfg = this._resolve_config(args.get("config")).serve
    try:
        serve.start(http_options=this.http_options(cfg, host, port))
        serve.run(this.build(args), name="hci-atr", route_prefix="/", blocking=True)
    except HciAtrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
