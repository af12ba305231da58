"""The FastAPI application behind :func:`retrieval_prune.retrieve.server.create_app`.

Imported only when a server is built (it imports FastAPI at module level). Endpoints are
plain ``def`` functions: FastAPI runs them on its thread pool, so searches run in
parallel and the :class:`Retriever`'s readers-writer lock orders them with mutations.

One middleware guards every request before a body is read: the ``Host`` allow-list
(421), the declared body size (413) and, for ``POST /documents`` and ``DELETE
/documents/{id}``, the bearer token (401/403). Every error message passes through
:class:`_Scrubber` (no absolute paths); unexpected exceptions answer only their type name.
"""

# no ``from __future__ import annotations``: FastAPI reads the annotations at runtime

import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval_prune import __version__
from retrieval_prune.index import storage
from retrieval_prune.retrieve.retriever import DuplicateIdError, Retriever, UnknownIdError
from retrieval_prune.retrieve.server import LOOPBACK_HOSTS, TOKEN_ENV, normalize_host
from retrieval_prune.safejson import value_depth

log = logging.getLogger("retrieval_prune.server")

#: requests whose declared body is larger than this are refused before they are read
MAX_BODY_BYTES = 64 << 20
#: deepest metadata nesting a document may carry (``{}`` is 1)
MAX_METADATA_DEPTH = 32

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# only for the OpenAPI page (the "Authorize" button): the middleware does the checking
_bearer_doc = HTTPBearer(auto_error=False, description="the server's token (--token-file)")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[StrictStr] = Field(description="query texts")
    k: StrictInt = Field(default=10, description="results per query")
    with_text: StrictBool = Field(default=False, description="add text and metadata to hits")


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr
    text: StrictStr
    metadata: dict[str, Any] = Field(default_factory=dict)


class DocumentsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn]


class ApiError(Exception):
    """An error answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# -- error text ----------------------------------------------------------------------------
_PATH_CHARS = r"[^\s/'\"`:;,()\[\]{}<>|=]"
#: an absolute POSIX path (or a file: URL), not inside a URL or a longer word
_ABS_PATH = re.compile(rf"(?:\bfile://|(?<![\w.~/<>-]))/(?:{_PATH_CHARS}+/)*{_PATH_CHARS}+/?")


class _Scrubber:
    """Rewrite a message so it names no absolute path: the index folder (as given,
    absolute or resolved) becomes ``<index>``, any other absolute path its last component."""

    def __init__(self, index_path: Path | None) -> None:
        forms: set[str] = set()
        if index_path is not None:
            for form in (
                str(index_path),
                os.path.abspath(index_path),
                os.path.realpath(index_path),
            ):
                form = form.rstrip("/")
                if form and form != ".":
                    forms.add(form)
        self._index = (
            re.compile(
                r"(?<![\w.~/-])(?:"
                + "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
                + r")(?![\w.~-])"
            )
            if forms
            else None
        )

    def __call__(self, message: str) -> str:
        if self._index is not None:
            message = self._index.sub("<index>", message)
        return _ABS_PATH.sub(_last_component, message)


def _last_component(m: "re.Match[str]") -> str:
    return m.group().rstrip("/").rsplit("/", 1)[-1]


def _printable(message: str) -> str:
    """``message`` with lone surrogates escaped, so it can be sent as UTF-8."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def _brief(exc: BaseException, scrub: Callable[[str], str]) -> str:
    """``Type: first line of the message`` (scrubbed, at most 200 characters)."""
    first = (str(exc).splitlines() or [""])[0]
    text = scrub(first)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _surrogate_in(text: str) -> str | None:
    """A description of the first lone surrogate in ``text``, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x} at character {exc.start}"
    return None


def _find_surrogate(value: Any, where: str) -> str | None:
    """``"<field> holds a lone surrogate ..."`` for the first string (key or value) in the
    parsed JSON ``value`` that cannot be encoded as UTF-8, else None. Iterative."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        x, loc = stack.pop()
        if isinstance(x, str):
            bad = _surrogate_in(x)
            if bad:
                return f"{loc} holds a lone surrogate ({bad}); send valid Unicode (UTF-8) text"
        elif isinstance(x, dict):
            items = list(x.items())
            for key, _ in items:
                bad = _surrogate_in(key) if isinstance(key, str) else None
                if bad:
                    return (
                        f"{loc} has a key holding a lone surrogate ({bad}); send valid "
                        "Unicode (UTF-8) text"
                    )
            for key, v in reversed(items):
                stack.append((v, f"{loc}.{key}" if loc else str(key)))
        elif isinstance(x, list):
            for i in range(len(x) - 1, -1, -1):
                stack.append((x[i], f"{loc}[{i}]"))
    return None


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return 400, f"request body is not valid JSON ({ctx.get('error', e.get('msg'))})"
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
        return 400, "request body is missing; send a JSON object (Content-Type: application/json)"
    body = getattr(exc, "body", None)
    if isinstance(body, (dict, list, str)):
        bad = _find_surrogate(body, "")
        if bad:
            return 400, bad if not bad.startswith(" ") else "request body" + bad
    if any(
        e.get("type") == "model_attributes_type" and tuple(e.get("loc", ())) == ("body",)
        for e in errors
    ):
        return 400, "request body must be a JSON object"
    parts = [f"{_loc(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors[:5]]
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid request: " + "; ".join(parts) + more


def _parse_failure(cause: BaseException | None) -> str:
    """Message for FastAPI's "There was an error parsing the body" (400), by its cause."""
    if isinstance(cause, RecursionError):
        return "request body is nested too deeply to parse; send flatter JSON"
    if isinstance(cause, UnicodeDecodeError):
        return f"request body is not UTF-8 (byte {cause.start}); send JSON as UTF-8"
    if cause is not None:
        return f"request body could not be parsed as JSON ({type(cause).__name__})"
    return "request body could not be parsed as JSON"


def _is_mutation(method: str, path: str) -> bool:
    return method not in _SAFE_METHODS and (path == "/documents" or path.startswith("/documents/"))


def build_app(
    retriever: Retriever,
    *,
    max_batch: int,
    max_documents: int,
    max_k: int,
    max_text_chars: int,
    persist: bool,
    token: str | None = None,
    allowed_hosts: frozenset | None = frozenset(LOOPBACK_HOSTS),
) -> FastAPI:
    app = FastAPI(
        title="retrieval-prune",
        version=__version__,
        summary="Multi-vector retrieval over a compressed index",
    )
    app.state.retriever = retriever
    limits = {
        "max_batch": max_batch,
        "max_documents": max_documents,
        "max_k": max_k,
        "max_text_chars": max_text_chars,
    }
    counters = {"searches": 0, "queries": 0, "added": 0, "deleted": 0, "errors": 0}
    counters_lock = threading.Lock()
    scrub = _Scrubber(retriever.path)
    token_bytes = token.encode("ascii") if token is not None else None

    def snapshot() -> dict[str, int]:
        with counters_lock:
            return dict(counters)

    def bump(key: str, n: int = 1) -> None:
        with counters_lock:
            counters[key] += n

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        bump("errors")
        return JSONResponse(
            status_code=status, content={"error": _printable(scrub(message))}, headers=headers
        )

    started = time.time()

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, msg = _validation_message(exc)
        return error(status, msg)

    @app.exception_handler(ApiError)
    async def _on_api(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(DuplicateIdError)
    async def _on_dup(request: Request, exc: DuplicateIdError) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(UnknownIdError)
    async def _on_unknown(request: Request, exc: UnknownIdError) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404:
            # the client's own path, not scrubbed (a URL path is not a file path)
            bump("errors")
            return JSONResponse(
                status_code=404,
                content={
                    "error": _printable(
                        f"no endpoint {request.method} {request.url.path}; see /docs"
                    )
                },
                headers=headers,
            )
        if exc.status_code == 400 and msg == "There was an error parsing the body":
            msg = _parse_failure(exc.__cause__)
        return error(exc.status_code, msg, headers)

    @app.exception_handler(Exception)
    async def _on_other(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        # 1. Host allow-list (DNS rebinding): before anything else
        if allowed_hosts is not None:
            raw_host = request.headers.get("host")
            if raw_host is None:
                return error(400, "request has no Host header")
            name = normalize_host(raw_host)
            if name is None or name not in allowed_hosts:
                shown = raw_host if len(raw_host) <= 100 else raw_host[:100] + "..."
                return error(
                    421,
                    f"Host {normalize_host(shown) or shown!r} is not served here; use a host "
                    f"name this server allows ({', '.join(LOOPBACK_HOSTS)}, or one it was "
                    "started with: --allowed-host NAME)",
                )
        # 2. bearer token for adds and deletes, before the body is read or validated
        if _is_mutation(request.method, request.url.path):
            if token_bytes is None:
                return error(
                    403,
                    "this server is read-only: mutation is disabled: start the server with "
                    f"--token-file or {TOKEN_ENV}",
                )
            auth = request.headers.get("authorization")
            challenge = {"WWW-Authenticate": 'Bearer realm="retrieval-prune"'}
            if auth is None:
                return error(
                    401,
                    "adding and deleting documents needs a bearer token: send "
                    "'Authorization: Bearer <token>'",
                    challenge,
                )
            scheme, _, credentials = auth.strip().partition(" ")
            credentials = credentials.strip()
            if (
                scheme.lower() != "bearer"
                or not credentials
                or any(c.isspace() for c in credentials)
            ):
                return error(
                    401,
                    "malformed Authorization header; expected 'Authorization: Bearer <token>'",
                    challenge,
                )
            given = credentials.encode("latin-1", "replace")  # Starlette decodes headers as latin-1
            if not hmac.compare_digest(given, token_bytes):
                return error(403, "wrong bearer token")
        # 3. declared body size
        size = request.headers.get("content-length")
        if size is not None:
            try:
                too_big = int(size) > MAX_BODY_BYTES
            except ValueError:
                return error(400, f"bad Content-Length header {size[:40]!r}")
            if too_big:
                return error(413, f"request body of {size} bytes is over {MAX_BODY_BYTES} bytes")
        try:
            return await call_next(request)
        except Exception as exc:  # noqa: BLE001 - answered here: Starlette >= 1 re-raises
            # from its outermost handler after a 500, and the server then drops the connection
            return await _on_other(request, exc)

    # -- helpers --------------------------------------------------------------------------
    def check_text(text: str, where: str, allow_empty: bool) -> None:
        if not allow_empty and not text.strip():
            raise ApiError(422, f"{where} is empty; give some text")
        if len(text) > max_text_chars:
            raise ApiError(413, f"{where} has {len(text)} characters; at most {max_text_chars}")

    def check_unicode(value: Any, where: str) -> None:
        bad = _find_surrogate(value, where)
        if bad:
            raise ApiError(400, bad)

    def commit(what: str, apply: Callable[[], None]) -> str | None:
        """Run ``apply`` (an add or delete) and, with persist, save a new generation in a
        transaction; the generation's name. A failure leaves memory equal to disk."""
        if not persist:
            apply()
            return None
        stage = "lock"
        try:
            with retriever.transaction() as tx:
                stage = "apply"
                apply()
                stage = "save"
        except (DuplicateIdError, UnknownIdError, ApiError):
            raise  # nothing changed; the transaction put nothing back
        except storage.IndexLockedError as exc:
            log.warning("%s refused: %s", what, exc)
            raise ApiError(
                503,
                f"another writer holds the index folder's write lock ({_brief(exc, scrub)}); "
                f"the {what} was NOT applied; retry later",
                {"Retry-After": "5"},
            ) from None
        except Exception as exc:
            if stage == "apply":
                raise  # a fault in the add/delete itself: the catch-all answers 500
            log.exception("%s failed (%s)", what, stage)
            doing = (
                "taking the index folder's write lock or reading its latest generation"
                if stage == "lock"
                else "saving the new index generation"
            )
            if stage == "save" and not retriever.stats().get("saved", True):
                raise ApiError(
                    500,
                    f"{doing} failed ({_brief(exc, scrub)}) and memory could not be put back: "
                    f"the {what} is served but NOT saved; restart the server; see the server log",
                ) from None
            raise ApiError(
                500,
                f"{doing} failed ({_brief(exc, scrub)}); the {what} was NOT applied and the "
                "index is unchanged; see the server log",
            ) from None
        return tx.generation.name if tx.generation is not None else None

    # -- endpoints ------------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness: ``{"status": "ok", "docs": n}``."""
        return {"status": "ok", "docs": len(retriever)}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        """Documents, vectors, bytes, pipeline spec, encoder settings, limits, counters."""
        out = retriever.stats()
        if out.get("path") is not None:
            out["path"] = Path(out["path"]).name  # the folder's name, not where it lives
        return {
            **out,
            "limits": limits,
            "persist": persist,
            "mutation": "bearer token" if token_bytes is not None else "disabled",
            "allowed_hosts": None if allowed_hosts is None else sorted(allowed_hosts),
            "requests": snapshot(),
            "uptime_s": round(time.time() - started, 3),
            "version": __version__,
        }

    @app.post("/search")
    def search(req: SearchRequest) -> dict[str, Any]:
        """Top-``k`` documents per query: ``{"results": [[{"id", "score"}, ...], ...]}``."""
        if not req.queries:
            raise ApiError(422, "queries is empty; send at least one query text")
        if len(req.queries) > max_batch:
            raise ApiError(
                413,
                f"{len(req.queries)} queries in one request; at most {max_batch} (split the batch)",
            )
        if req.k < 1:
            raise ApiError(422, f"k={req.k} must be >= 1")
        if req.k > max_k:
            raise ApiError(422, f"k={req.k} is over this server's limit of {max_k}")
        check_unicode(req.queries, "queries")
        for i, q in enumerate(req.queries):
            check_text(q, f"queries[{i}]", allow_empty=False)
        if persist:
            retriever.refresh()  # another process may have committed to the folder
        hits = retriever.retrieve_batch(req.queries, k=req.k)
        bump("searches")
        bump("queries", len(req.queries))
        return {"results": [[h.to_dict(with_text=req.with_text) for h in row] for row in hits]}

    @app.post("/documents", status_code=201, dependencies=[Depends(_bearer_doc)])
    def add_documents(req: DocumentsRequest) -> dict[str, Any]:
        """Add documents (needs the bearer token); with persist, a new index generation is
        saved before the answer, and a failed save leaves the index unchanged."""
        docs = req.documents
        if not docs:
            raise ApiError(422, "documents is empty; send at least one document")
        if len(docs) > max_documents:
            raise ApiError(
                413,
                f"{len(docs)} documents in one request; at most {max_documents} (split the batch)",
            )
        for i, d in enumerate(docs):
            check_unicode(d.id, f"documents[{i}].id")
            check_unicode(d.text, f"documents[{i}].text")
            check_unicode(d.metadata, f"documents[{i}].metadata")
            if not d.id.strip():
                raise ApiError(422, f"documents[{i}].id is empty; give every document an id")
            check_text(d.text, f"documents[{i}].text", allow_empty=True)
            depth = value_depth(d.metadata)
            if depth > MAX_METADATA_DEPTH:
                raise ApiError(
                    422,
                    f"documents[{i}].metadata is nested {depth} levels deep; at most "
                    f"{MAX_METADATA_DEPTH}",
                )
            try:
                json.dumps(d.metadata, allow_nan=False)
            except ValueError as exc:
                raise ApiError(422, f"documents[{i}].metadata is not plain JSON ({exc})") from None

        def apply() -> None:
            retriever.add([d.id for d in docs], [d.text for d in docs], [d.metadata for d in docs])

        gen = commit("add", apply)
        bump("added", len(docs))
        return {"added": len(docs), "ids": [d.id for d in docs], "generation": gen}

    @app.get("/documents/{doc_id:path}")
    def get_document(doc_id: str) -> dict[str, Any]:
        """A stored document's text and metadata."""
        check_unicode(doc_id, "the document id in the path")
        if persist:
            retriever.refresh()
        hit = retriever.get(doc_id)
        return {"id": hit.id, "text": hit.text, "metadata": hit.metadata}

    @app.delete("/documents/{doc_id:path}", dependencies=[Depends(_bearer_doc)])
    def delete_document(doc_id: str) -> dict[str, Any]:
        """Delete one document (needs the bearer token); saved like an add."""
        check_unicode(doc_id, "the document id in the path")
        if not doc_id.strip():
            raise ApiError(422, "document id is empty")
        gen = commit("delete", lambda: retriever.delete([doc_id]))
        bump("deleted")
        return {"deleted": doc_id, "generation": gen}

    return app
