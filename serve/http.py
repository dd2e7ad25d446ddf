"""HTTP plumbing of the search app: the request guard (auth, content types, body limits, security headers), which
status each project error maps to, and the JSON error bodies.

:class:`Guard` is pure ASGI around the whole FastAPI app (outside its middleware), so it runs before anything reads
a body: the bearer token (``HCI_ATR_API_TOKEN``, compared
with ``hmac.compare_digest``) is checked first, then the content type, then a declared ``Content-Length`` against the
route's limit (``serve.max_json_bytes`` for JSON, ``serve.max_upload_bytes`` plus multipart framing for uploads).
Bytes that arrive without a length (chunked) are counted by FastAPI's own ``max_body_size`` as they stream in: 413 as
soon as the count passes the limit, so memory stays bounded.

Every error body is ``{"error": message}``. 4xx messages say what to fix; 5xx bodies are generic (no exception text,
no paths): the details go to the server log.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hci_atr.errors import AudioError, HciAtrError, NotFoundError, QueryError, one_line

log = logging.getLogger("hci_atr.serve")

MULTIPART_OVERHEAD = 64 * 1024  # framing and the small form fields beside the file
# the page and its assets may not load anything from elsewhere nor run inline script
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
BUSY = "service unavailable; try again later"
INTERNAL = "internal error; try again later"


class RequestError(HciAtrError):
    """A request the app refuses, with its HTTP status (the library's errors carry none)."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = status_code


def status_of(exc: HciAtrError) -> int:
    """HTTP status of a project error: what the client sent (4xx) or the server's state (503)."""
    if isinstance(getattr(exc, "status_code", None), int):  # RequestError (and the library's, while it has one)
        return exc.status_code
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, QueryError):
        return 422  # like the schema's own validation errors
    if isinstance(exc, AudioError):
        return 400  # an upload that does not decode
    return 503  # model, index or config trouble on the server


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map validation errors, HTTP exceptions and project errors to ``{"error": ...}`` bodies."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error(400, "malformed JSON body; send a JSON object such as {\"query\": \"a dog barks\"}")
        parts = []
        for e in errs[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return error(422, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 413:  # FastAPI's max_body_size counted a streamed body past the route's limit
            limit = request.scope.get("starlette.max_body_size")
            return error(413, f"request body exceeds the limit of {limit} bytes" if limit is not None
                         else "request body too large", headers)
        if exc.status_code >= 500:
            log.error("HTTP %s: %s", exc.status_code, exc.detail)
            return error(exc.status_code, INTERNAL, headers)
        return error(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(HciAtrError)
    async def _on_project_error(request: Request, exc: HciAtrError) -> JSONResponse:
        status = status_of(exc)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, one_line(exc))
            return error(status, BUSY)
        return error(status, str(exc))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error(500, INTERNAL)


@dataclass(frozen=True)
class Policy:
    """What :class:`Guard` enforces.

    ``api_token``: None leaves the API open. ``open_paths`` / ``open_prefixes`` never need the token (the page, its
    assets, health, the API docs); ``query_token_prefixes`` also accept ``?token=`` (an ``<audio>`` element cannot
    send headers). ``json_routes`` / ``upload_routes`` take only that content type and at most that many bytes.
    """

    api_token: str | None
    max_json_bytes: int
    max_upload_bytes: int
    json_routes: frozenset[str]
    upload_routes: frozenset[str]
    open_paths: frozenset[str] = frozenset({"/", "/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                                            "/redoc"})
    open_prefixes: tuple[str, ...] = ("/static/",)
    query_token_prefixes: tuple[str, ...] = ("/clips/",)
    page_prefixes: tuple[str, ...] = ("/static/",)

    def body_limit(self, path: str) -> int:
        return self.max_upload_bytes + MULTIPART_OVERHEAD if path in self.upload_routes else self.max_json_bytes

    def needs_token(self, path: str) -> bool:
        return bool(self.api_token) and path not in self.open_paths and not path.startswith(self.open_prefixes)

    def is_page(self, path: str) -> bool:
        return path == "/" or path.startswith(self.page_prefixes)


def bearer_ok(given: str, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


class Guard:
    """Pure ASGI middleware: token, content type and declared length before any body is read; security headers
    (``nosniff`` on every response, a self-only Content-Security-Policy on the page) on the way out."""

    def __init__(self, app, policy: Policy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        extra = [(b"x-content-type-options", b"nosniff")]
        if self.policy.is_page(path):
            extra += [(b"content-security-policy", PAGE_CSP.encode()), (b"referrer-policy", b"no-referrer"),
                      (b"x-frame-options", b"DENY")]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        refusal = self._refusal(scope, path)
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        return await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope, path: str) -> JSONResponse | None:
        p = self.policy
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if p.needs_token(path) and scope.get("method") != "OPTIONS":
            given = ""
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            elif path.startswith(p.query_token_prefixes):
                given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
            if not bearer_ok(given, p.api_token or ""):
                return error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                             {"WWW-Authenticate": "Bearer"})
        if scope.get("method") != "POST":
            return None
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if path in p.json_routes and ctype != "application/json":
            return error(415, f"{path} expects Content-Type application/json, got {ctype or 'none'}")
        if path in p.upload_routes and ctype != "multipart/form-data":
            return error(415, f"{path} expects a multipart/form-data upload with a 'file' field, got "
                              f"{ctype or 'none'}")
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return error(400, "invalid Content-Length header")
        limit = p.body_limit(path)
        if declared > limit:
            return error(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        return None
