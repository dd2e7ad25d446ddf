"""Ray Serve app: text -> audio and audio -> audio/text search over an index, a JSON API and a small web page.

Run from the repository root (defaults work after ``hci-atr demo``)::

    serve run serve.app:deployment                                   # HCI_ATR_MODEL / HCI_ATR_INDEX or defaults
    serve run serve.app:build model=path/to/model index=path/to/index [config=serve.yaml]

Nothing touches the disk at import time: the model and index load in the replica's ``__init__``.

Text search runs in a ``@serve.batch`` (``serve.batch_max_size``, ``serve.batch_wait_timeout_s``): with
``serve.batch_search`` (default) the concurrent queries share one encoder pass and one stage-1 scan
(``Retriever.search_text_batch``), else only the encoder pass is shared. ``serve.scan`` picks the stage-1 scan (exact
numpy / FAISS, or the opt-in ``faiss-fp16`` and APPROXIMATE ``ivf``), ``serve.threads`` the intra-op threads of the
replica (1 by default: on a small machine more threads contend), ``serve.retrieve_k`` how many candidates are
reranked. BENCHMARKS.md ("Serving") has what each costs at 100k clips.

Endpoints (FastAPI; OpenAPI schema at /openapi.json, docs at /docs):
``POST /search/text`` {query, top_k, rerank} -> ranked clips + stage timings; ``POST /search/audio`` (multipart
``file`` [+ top_k, target=clips|captions]) -> ranked clips or captions; ``POST /embed/text`` {texts}; ``POST
/embed/audio`` (multipart ``file``); ``GET /healthz``; ``GET /clips/{id}/audio`` (the indexed file of that id);
``GET /`` the web page. Every user error is a 4xx JSON ``{"error": message}``. When ``HCI_ATR_API_TOKEN`` is set (or
``api_token`` is passed) the API needs ``Authorization: Bearer <token>`` (the clip audio route also accepts
``?token=`` because an <audio> element cannot send headers); the page, its assets and /healthz stay open.
"""

# no `from __future__ import annotations`: FastAPI must see real (not string) types through Serve's ingress wrapper

import hmac
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from workflows.settings import Settings, ServeSettings, load_settings
from hci_atr.errors import AudioError, ConfigError, HciAtrError, RequestError

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # the only files the page route serves
AUDIO_MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg",
                     ".opus": "audio/ogg", ".m4a": "audio/mp4"}
_DEFAULTS = ServeSettings()

# ---------------------------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------------------------


class TextSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(description="What the sound is like, in words.", examples=["a dog barks"])
    top_k: int = Field(10, description="Number of results (1..max_top_k).")
    rerank: bool = Field(True, description="Rerank the clip-level candidates with the full HCI(+AC) score.")


class HitOut(BaseModel):
    rank: int
    id: str
    score: float
    clip_score: float
    kind: str
    text: str | None = None
    source: str | None = None
    captions: list[str] = []
    generated_caption: str | None = None
    duration: float | None = None
    levels: dict[str, float] = {}
    audio_url: str | None = None


class SearchResponse(BaseModel):
    hits: list[HitOut]
    reranked: bool
    timings: dict[str, float] = Field(description="encode_ms, retrieve_ms (stage-1 scan), rerank_ms, hits_ms "
                                                  "(result metadata), total_ms (in the replica), batch_size (text "
                                                  "queries served together; encode and scan are shared)")


class EmbedTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, max_length=64)


class EmbedResponse(BaseModel):
    dim: int
    embeddings: list[list[float]]


class ErrorOut(BaseModel):
    error: str


_ERR = {400: {"model": ErrorOut}, 401: {"model": ErrorOut}, 413: {"model": ErrorOut}, 415: {"model": ErrorOut},
        422: {"model": ErrorOut}}

# ---------------------------------------------------------------------------------------------------------------
# app: error mapping and request limits (pure ASGI, so limits apply before any body is parsed)
# ---------------------------------------------------------------------------------------------------------------

app = FastAPI(title="hci-atr search", version="0.1.0",
              description="Audio-text retrieval with hierarchical cross-modal interaction and auxiliary captions.")
app.state.limits = {"max_body": _DEFAULTS.max_upload_bytes + 64 * 1024}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@app.exception_handler(RequestValidationError)
async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return _error(400, "malformed JSON body; send a JSON object such as {\"query\": \"a dog barks\"}")
    parts = []
    for e in errs[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return _error(422, "; ".join(parts))


@app.exception_handler(StarletteHTTPException)
async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


@app.exception_handler(HciAtrError)
async def _on_project_error(request: Request, exc: HciAtrError) -> JSONResponse:
    if isinstance(exc, RequestError):
        return _error(exc.status_code, str(exc))
    if isinstance(exc, AudioError):
        return _error(400, str(exc))
    return _error(503, f"service not ready: {exc}")


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # no traceback to the client; the replica log has it
    return _error(500, f"internal error ({type(exc).__name__}); see the server log")


JSON_ROUTES = {"/search/text", "/embed/text"}
UPLOAD_ROUTES = {"/search/audio", "/embed/audio"}


class LimitsMiddleware:
    """Request body size limit (Content-Length and streamed bytes) and content types, before FastAPI parses."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.inner(scope, receive, send)
        limit = app.state.limits["max_body"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if path in JSON_ROUTES and ctype != "application/json":
            return await _error(415, f"{path} expects Content-Type application/json, got {ctype or 'none'}")(
                scope, receive, send)
        if path in UPLOAD_ROUTES and ctype != "multipart/form-data":
            return await _error(415, f"{path} expects a multipart/form-data upload with a 'file' field, got "
                                     f"{ctype or 'none'}")(scope, receive, send)
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await _error(400, "invalid Content-Length header")(scope, receive, send)
        if declared > limit:
            return await _error(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")(
                scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise RequestError(f"request body exceeds the limit of {limit} bytes", status_code=413)
            return msg

        try:
            return await self.inner(scope, limited_receive, send)
        except RequestError as e:  # a chunked body that grew past the limit
            return await _error(e.status_code, str(e))(scope, receive, send)


app.add_middleware(LimitsMiddleware)

# ---------------------------------------------------------------------------------------------------------------
# the deployment
# ---------------------------------------------------------------------------------------------------------------


def _form_int(form, name: str, default: int) -> int:
    value = form.get(name)
    if value is None or value == "":
        return default
    try:
        return int(str(value))
    except ValueError:
        raise RequestError(f"{name}: expected an integer, got {str(value)[:40]!r}", 422) from None


def _multipart_schema(fields: dict) -> dict:
    """OpenAPI request body of an upload route (parsed by hand: FastAPI's File/Form models do not survive
    Serve's ingress wrapping of a class)."""
    props = {"file": {"type": "string", "format": "binary", "description": "WAV, FLAC or OGG audio"}, **fields}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"], "properties": props}}}}}


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


@serve.deployment(**_deployment_options(_DEFAULTS), health_check_period_s=10.0)
@serve.ingress(app)
class SearchDeployment:
    """One replica: a Retriever (model + memory-mapped index) behind the FastAPI routes."""

    def __init__(self, model_dir: str | None = None, index_dir: str | None = None, config_path: str | None = None,
                 api_token: str | None = None, device: str | None = None):
        from hci_atr.retriever import Retriever, set_threads

        cfg = _resolve_config(config_path)
        self.serve_cfg: ServeSettings = cfg.serve
        self.model_dir = model_dir or os.environ.get("HCI_ATR_MODEL") or self.serve_cfg.model_dir
        self.index_dir = index_dir or os.environ.get("HCI_ATR_INDEX") or self.serve_cfg.index_dir
        token = api_token if api_token is not None else os.environ.get("HCI_ATR_API_TOKEN", "")
        self.api_token = token or None
        device = device or ("cuda" if self.serve_cfg.replica_gpus > 0 else "cpu")
        set_threads(self.serve_cfg.threads)  # before the model and FAISS start their thread pools
        sc = self.serve_cfg
        self.retriever = Retriever.from_pretrained(self.model_dir, self.index_dir, device=device,
                                                   retrieve_k=sc.retrieve_k, scan_backend=sc.scan,
                                                   ivf_nlist=sc.ivf_nlist, ivf_nprobe=sc.ivf_nprobe)
        if sc.warm_index:
            self.retriever.index.warm()
        app.state.limits["max_body"] = self.serve_cfg.max_upload_bytes + 64 * 1024  # multipart framing headroom
        for batched in (self._encode_batch, self._search_batch):
            batched.set_max_batch_size(self.serve_cfg.batch_max_size)
            batched.set_batch_wait_timeout_s(self.serve_cfg.batch_wait_timeout_s)
        if self.serve_cfg.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            app.add_middleware(CORSMiddleware, allow_origins=list(self.serve_cfg.cors_origins),
                               allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
        self.retriever.self_check()

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _auth(self, request: Request, allow_query: bool = False) -> None:
        if not self.api_token:
            return
        given = ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        elif allow_query:
            given = request.query_params.get("token", "")
        if not given or not hmac.compare_digest(given.encode(), self.api_token.encode()):
            raise RequestError("missing or wrong bearer token (send 'Authorization: Bearer <token>')", 401)

    def _check_top_k(self, top_k: int) -> int:
        mx = self.serve_cfg.max_top_k
        if top_k < 1 or top_k > mx:
            raise RequestError(f"top_k: must be between 1 and {mx}, got {top_k}", 422)
        return top_k

    def _check_query(self, q: str) -> str:
        q = q.strip()
        if not q:
            raise RequestError("query: empty; type some words describing the sound", 422)
        if len(q) > self.serve_cfg.max_query_chars:
            raise RequestError(f"query: {len(q)} characters is longer than the limit of "
                               f"{self.serve_cfg.max_query_chars}", 422)
        return q

    async def _form(self, request: Request):
        try:
            return await request.form(max_files=1, max_fields=10)
        except HciAtrError:
            raise
        except Exception as e:  # malformed multipart framing
            raise RequestError(f"malformed multipart body ({type(e).__name__}); send a form with a 'file' field",
                               400) from None

    async def _read_upload(self, form) -> Any:
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise RequestError("file: missing; send the audio as a multipart form field named 'file'", 422)
        ctype = (file.content_type or "").split(";")[0].strip().lower()
        if ctype and not (ctype.startswith("audio/") or ctype in ("application/octet-stream", "video/ogg")):
            raise RequestError(f"file: content type {ctype} is not audio; upload a WAV, FLAC or OGG file", 415)
        data = await file.read(self.serve_cfg.max_upload_bytes + 1)
        if len(data) > self.serve_cfg.max_upload_bytes:
            raise RequestError(f"file: larger than the limit of {self.serve_cfg.max_upload_bytes} bytes", 413)
        if not data:
            raise RequestError("file: empty upload", 400)
        from hci_atr.index import decode_audio_bytes

        sr = self.retriever.cfg.audio.sample_rate
        wave = decode_audio_bytes(data, sr, where=f"file {file.filename or ''}".strip(),
                                  max_seconds=self.serve_cfg.max_audio_seconds)
        seconds = len(wave) / sr
        if seconds > self.serve_cfg.max_audio_seconds:  # decoding stopped just past the limit: the length is unknown
            raise RequestError(f"file: audio is longer than the limit of {self.serve_cfg.max_audio_seconds:g} s; "
                               f"send a shorter clip", 413)
        return wave

    def _hits(self, result, request: Request) -> dict:
        hits = []
        for h in result:
            d = h.to_dict()
            d["audio_url"] = f"/clips/{quote(h.id, safe='')}/audio"
            hits.append(d)
        return {"hits": hits, "reranked": bool(result.reranked), "timings": result.timings}

    @serve.batch(max_batch_size=_DEFAULTS.batch_max_size, batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s)
    async def _encode_batch(self, queries: list[str]) -> list[Any]:
        """Query text encoding batched across concurrent requests: [B] strings -> B TextEmbeddings of batch 1."""
        from hci_atr.retriever import _slice

        t0 = time.perf_counter()
        text = self.retriever.encode_queries(queries)
        ms = (time.perf_counter() - t0) * 1e3
        return [(_slice(text, slice(i, i + 1)), ms, len(queries)) for i in range(len(queries))]

    @serve.batch(max_batch_size=_DEFAULTS.batch_max_size, batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s)
    async def _search_batch(self, reqs: list[tuple[str, int, bool]]) -> list[Any]:
        """Whole text searches batched across concurrent requests (``serve.batch_search``): one encoder pass and
        one stage-1 scan for the batch (``Retriever.search_text_batch``), then each query's own rerank."""
        results = self.retriever.search_text_batch([q for q, _, _ in reqs], top_k=[k for _, k, _ in reqs],
                                                   rerank=[r for _, _, r in reqs])
        for res in results:
            res.timings["batch_size"] = float(len(reqs))
        return results

    # -- routes ------------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> FileResponse:
        if name not in STATIC_FILES:  # a fixed list: no path from the client reaches the file system
            raise RequestError(f"static file {name!r} not found", 404)
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    @app.get("/healthz", responses={503: {"model": ErrorOut}})
    async def healthz(self) -> Any:
        try:  # the same check Serve runs on the replica: a 200 here means this replica can answer queries now
            self.check_health()
        except Exception as e:
            return _error(503, f"unhealthy: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return {"status": "ok", "n_clips": len(self.retriever.index), "model_dir": str(self.model_dir),
                "index_dir": str(self.index_dir), "auth": bool(self.api_token),
                "max_top_k": self.serve_cfg.max_top_k}

    @app.post("/search/text", response_model=SearchResponse, responses=_ERR)
    async def search_text(self, req: TextSearchRequest, request: Request) -> dict:
        self._auth(request)
        q = self._check_query(req.query)
        k = self._check_top_k(req.top_k)
        if self.serve_cfg.batch_search:
            result = await self._search_batch((q, k, req.rerank))
        else:
            text, enc_ms, batch = await self._encode_batch(q)
            result = self.retriever.search_text_embedded(text, k, req.rerank, encode_ms=enc_ms)
            result.timings["batch_size"] = float(batch)
        return self._hits(result, request)

    @app.post("/search/audio", response_model=SearchResponse, responses=_ERR,
              openapi_extra=_multipart_schema({"top_k": {"type": "integer", "default": 10},
                                               "target": {"type": "string", "enum": ["clips", "captions"],
                                                          "default": "clips"},
                                               "rerank": {"type": "boolean", "default": True}}))
    async def search_audio(self, request: Request) -> dict:
        self._auth(request)
        form = await self._form(request)
        k = self._check_top_k(_form_int(form, "top_k", 10))
        target = str(form.get("target") or "clips")
        if target not in ("clips", "captions"):
            raise RequestError(f"target: expected 'clips' or 'captions', got {target!r}", 422)
        rerank = str(form.get("rerank", "true")).lower() not in ("false", "0", "no", "off")
        wave = await self._read_upload(form)
        result = self.retriever.search_audio(wave, k, target=target, rerank=rerank)
        return self._hits(result, request)

    @app.post("/embed/text", response_model=EmbedResponse, responses=_ERR)
    async def embed_text(self, req: EmbedTextRequest, request: Request) -> dict:
        self._auth(request)
        texts = [self._check_query(t) for t in req.texts]
        emb = self.retriever.embed_text(texts)
        return {"dim": int(emb.shape[1]), "embeddings": emb.tolist()}

    @app.post("/embed/audio", response_model=EmbedResponse, responses=_ERR, openapi_extra=_multipart_schema({}))
    async def embed_audio(self, request: Request) -> dict:
        self._auth(request)
        wave = await self._read_upload(await self._form(request))
        emb = self.retriever.embed_audio(wave)
        return {"dim": int(emb.shape[0]), "embeddings": [emb.tolist()]}

    @app.get("/clips/{clip_id:path}/audio", responses={404: {"model": ErrorOut}, 401: {"model": ErrorOut}})
    async def clip_audio(self, clip_id: str, request: Request) -> FileResponse:
        self._auth(request, allow_query=True)
        path = self.retriever.clip_path(clip_id)  # looked up in the index metadata, 404 when unknown
        if not path.is_file():
            raise RequestError(f"clip {clip_id!r}: its indexed file is missing on the server", 404)
        return FileResponse(path, media_type=AUDIO_MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    def check_health(self) -> None:
        """Serve calls this periodically: model loaded, index readable, a tiny forward pass works."""
        if not (Path(self.index_dir) / "manifest.json").is_file():
            raise RuntimeError(f"index {self.index_dir} is no longer readable")
        self.retriever.self_check()


def build(args: dict[str, str]):
    """Application builder: ``serve run serve.app:build model=DIR index=DIR [config=YAML] [replicas=N]``.

    Reads only the (small) YAML config here, for the autoscaling options; the model and index load in the replicas.
    """
    args = dict(args or {})
    known = {"model", "index", "config", "replicas", "token"}
    unknown = set(args) - known
    if unknown:
        raise HciAtrError(f"serve.app:build: unknown argument(s) {sorted(unknown)}; known: {sorted(known)}")
    cfg = _resolve_config(args.get("config")).serve
    opts = _deployment_options(cfg)
    if args.get("replicas"):
        n = int(args["replicas"])
        opts = {**opts, "num_replicas": n, "autoscaling_config": None}
    return SearchDeployment.options(**opts).bind(model_dir=args.get("model"), index_dir=args.get("index"),
                                                 config_path=args.get("config"), api_token=args.get("token"))


app_builder = build
deployment = SearchDeployment.bind()
