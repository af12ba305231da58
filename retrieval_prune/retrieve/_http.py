"""The FastAPI application behind :func:`retrieval_prune.retrieve.server.create_app`.

Imported only when a server is built (it imports FastAPI at module level). Endpoints are
plain ``def`` functions: FastAPI runs them on its thread pool, so searches run in
parallel and the :class:`Retriever`'s readers-writer lock orders them with mutations.
"""

# no ``from __future__ import annotations``: FastAPI reads the annotations at runtime

import json
import logging
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval_prune import __version__
from retrieval_prune.retrieve.retriever import DuplicateIdError, Retriever, UnknownIdError

log = logging.getLogger("retrieval_prune.server")

#: requests whose declared body is larger than this are refused before they are read
MAX_BODY_BYTES = 64 << 20


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

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


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
    if any(
        e.get("type") == "model_attributes_type" and tuple(e.get("loc", ())) == ("body",)
        for e in errors
    ):
        return 400, "request body must be a JSON object"
    parts = [f"{_loc(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors[:5]]
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid request: " + "; ".join(parts) + more


def build_app(
    retriever: Retriever,
    *,
    max_batch: int,
    max_documents: int,
    max_k: int,
    max_text_chars: int,
    persist: bool,
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

    def snapshot() -> dict[str, int]:
        with counters_lock:
            return dict(counters)

    def bump(key: str, n: int = 1) -> None:
        with counters_lock:
            counters[key] += n

    started = time.time()

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        bump("errors")
        status, msg = _validation_message(exc)
        return _error(status, msg)

    @app.exception_handler(ApiError)
    async def _on_api(request: Request, exc: ApiError) -> JSONResponse:
        bump("errors")
        return _error(exc.status, exc.message)

    @app.exception_handler(DuplicateIdError)
    async def _on_dup(request: Request, exc: DuplicateIdError) -> JSONResponse:
        bump("errors")
        return _error(409, str(exc))

    @app.exception_handler(UnknownIdError)
    async def _on_unknown(request: Request, exc: UnknownIdError) -> JSONResponse:
        bump("errors")
        return _error(404, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        bump("errors")
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = f"no endpoint {request.method} {request.url.path}; see /docs"
        return JSONResponse(
            status_code=exc.status_code,
            content={"error": msg},
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _on_other(request: Request, exc: Exception) -> JSONResponse:
        bump("errors")
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def _body_limit(request: Request, call_next: Any) -> Any:
        size = request.headers.get("content-length")
        if size is not None:
            try:
                too_big = int(size) > MAX_BODY_BYTES
            except ValueError:
                return _error(400, f"bad Content-Length header {size!r}")
            if too_big:
                bump("errors")
                return _error(413, f"request body of {size} bytes is over {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    # -- helpers --------------------------------------------------------------------------
    def check_text(text: str, where: str, allow_empty: bool) -> None:
        if not allow_empty and not text.strip():
            raise ApiError(422, f"{where} is empty; give some text")
        if len(text) > max_text_chars:
            raise ApiError(413, f"{where} has {len(text)} characters; at most {max_text_chars}")

    def persist_now(what: str) -> str | None:
        if not persist:
            return None
        try:
            return retriever.save().name
        except Exception as exc:  # the change is live in memory but not on disk
            log.exception("saving after %s failed", what)
            raise ApiError(
                500,
                f"{what} applied in memory but saving the index failed: "
                f"{type(exc).__name__}: {exc}",
            ) from exc

    # -- endpoints ------------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness: ``{"status": "ok", "docs": n}``."""
        return {"status": "ok", "docs": len(retriever)}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        """Documents, vectors, bytes, pipeline spec, encoder settings, limits, counters."""
        return {
            **retriever.stats(),
            "limits": limits,
            "persist": persist,
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
        for i, q in enumerate(req.queries):
            check_text(q, f"queries[{i}]", allow_empty=False)
        hits = retriever.retrieve_batch(req.queries, k=req.k)
        bump("searches")
        bump("queries", len(req.queries))
        return {"results": [[h.to_dict(with_text=req.with_text) for h in row] for row in hits]}

    @app.post("/documents", status_code=201)
    def add_documents(req: DocumentsRequest) -> dict[str, Any]:
        """Add documents; a new index generation is saved before the answer (persist)."""
        docs = req.documents
        if not docs:
            raise ApiError(422, "documents is empty; send at least one document")
        if len(docs) > max_documents:
            raise ApiError(
                413,
                f"{len(docs)} documents in one request; at most {max_documents} (split the batch)",
            )
        for i, d in enumerate(docs):
            if not d.id.strip():
                raise ApiError(422, f"documents[{i}].id is empty; give every document an id")
            check_text(d.text, f"documents[{i}].text", allow_empty=True)
            try:
                json.dumps(d.metadata, allow_nan=False)
            except ValueError as exc:
                raise ApiError(422, f"documents[{i}].metadata is not plain JSON ({exc})") from None
        retriever.add([d.id for d in docs], [d.text for d in docs], [d.metadata for d in docs])
        bump("added", len(docs))
        gen = persist_now("the add")
        return {"added": len(docs), "ids": [d.id for d in docs], "generation": gen}

    @app.get("/documents/{doc_id:path}")
    def get_document(doc_id: str) -> dict[str, Any]:
        """A stored document's text and metadata."""
        hit = retriever.get(doc_id)
        return {"id": hit.id, "text": hit.text, "metadata": hit.metadata}

    @app.delete("/documents/{doc_id:path}")
    def delete_document(doc_id: str) -> dict[str, Any]:
        """Delete one document; a new index generation is saved before the answer."""
        if not doc_id.strip():
            raise ApiError(422, "document id is empty")
        retriever.delete([doc_id])
        bump("deleted")
        gen = persist_now("the delete")
        return {"deleted": doc_id, "generation": gen}

    return app
