"""HTTP server: ``retrieval-prune serve INDEX [--host 127.0.0.1] [--port 8000]``.

Endpoints (JSON; see :func:`create_app`)::

    POST   /search            {"queries": ["..."], "k": 10, "with_text": false}
                              -> {"results": [[{"id": ..., "score": ...}, ...], ...]}
    POST   /documents         {"documents": [{"id": "...", "text": "...", "metadata": {}}]}
                              -> 201 {"added": n, "ids": [...], "generation": "gen-..."}
    GET    /documents/{id}    -> {"id", "text", "metadata"}
    DELETE /documents/{id}    -> {"deleted": id, "generation": "gen-..."}
    GET    /health            -> {"status": "ok", "docs": n}
    GET    /stats             -> docs, vectors, bytes, pipeline spec, encoder, limits

Errors are ``{"error": "<message>"}`` with 400 (body is not JSON), 404 (unknown id or
path), 409 (id already present), 413 (batch over the limit), 422 (invalid field).
The server has no authentication: it listens on loopback unless told otherwise.

FastAPI and uvicorn are imported only when the server is built, so this module (and the
CLI, which imports it) loads without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrieval_prune.retrieve.retriever import Retriever

__all__ = ["add_serve_parser", "create_app", "cmd_serve", "SERVE_INSTALL_HINT"]

SERVE_INSTALL_HINT = "pip install 'retrieval-prune[serve]'"

#: default request limits (per request)
DEFAULT_LIMITS = {"max_batch": 256, "max_documents": 1000, "max_k": 1000, "max_text_chars": 100_000}


def create_app(
    retriever: Retriever,
    *,
    max_batch: int = DEFAULT_LIMITS["max_batch"],
    max_documents: int = DEFAULT_LIMITS["max_documents"],
    max_k: int = DEFAULT_LIMITS["max_k"],
    max_text_chars: int = DEFAULT_LIMITS["max_text_chars"],
    persist: bool | None = None,
) -> Any:
    """A FastAPI app serving ``retriever``.

    Parameters
    ----------
    retriever : Retriever
    max_batch : int
        Most queries per ``POST /search``.
    max_documents : int
        Most documents per ``POST /documents``.
    max_k : int
        Largest ``k``.
    max_text_chars : int
        Longest query or document text, in characters.
    persist : bool, optional
        Save a new index generation after every add / delete before answering. Default:
        True when the retriever has an index folder.
    """
    try:
        from retrieval_prune.retrieve import _http
    except ImportError as exc:
        raise ImportError(
            f"the HTTP server needs fastapi and uvicorn; {SERVE_INSTALL_HINT}"
        ) from exc
    for name, v in (
        ("max_batch", max_batch),
        ("max_documents", max_documents),
        ("max_k", max_k),
        ("max_text_chars", max_text_chars),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an int >= 1")
    if persist is None:
        persist = retriever.path is not None
    if persist and retriever.path is None:
        raise ValueError(
            "persist=True needs a retriever with an index folder (Retriever.from_index)"
        )
    return _http.build_app(
        retriever,
        max_batch=max_batch,
        max_documents=max_documents,
        max_k=max_k,
        max_text_chars=max_text_chars,
        persist=persist,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print(
            f"retrieval-prune serve: error: the server needs fastapi and uvicorn; "
            f"{SERVE_INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    from retrieval_prune.retrieve.retriever import Retriever

    if not _is_loopback(args.host):
        print(
            f"retrieval-prune serve: warning: listening on {args.host}, not loopback; the API "
            "has no authentication and lets any client add and delete documents",
            file=sys.stderr,
        )
    retriever = Retriever.from_index(args.index, checkpoint=args.checkpoint)
    app = create_app(
        retriever,
        max_batch=args.max_batch,
        max_documents=args.max_documents,
        max_k=args.max_k,
        persist=not args.no_persist,
    )
    print(
        f"serving {args.index}: {len(retriever)} documents, pipeline "
        f"{retriever.index.pipeline_spec!r} on http://{args.host}:{args.port}",
        file=sys.stderr,
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    return 0


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``sub`` (an argparse subparsers object)."""
    sp = sub.add_parser(
        "serve",
        help="serve an index over HTTP (search, add, delete)",
        description="Serve an index over HTTP: POST /search, POST /documents, "
        "DELETE /documents/{id}, GET /health, GET /stats. "
        f"Needs {SERVE_INSTALL_HINT}.",
    )
    sp.add_argument("index", metavar="INDEX", help="index folder (written by `build`)")
    sp.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1: this machine only)",
    )
    sp.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    sp.add_argument(
        "--checkpoint",
        default=None,
        metavar="CKPT",
        help="checkpoint folder, when the index was built with a trained checkpoint",
    )
    sp.add_argument(
        "--max-batch",
        type=_positive,
        default=DEFAULT_LIMITS["max_batch"],
        help="most queries per search request (default %(default)s)",
    )
    sp.add_argument(
        "--max-documents",
        type=_positive,
        default=DEFAULT_LIMITS["max_documents"],
        help="most documents per add request (default %(default)s)",
    )
    sp.add_argument(
        "--max-k",
        type=_positive,
        default=DEFAULT_LIMITS["max_k"],
        help="largest k (default %(default)s)",
    )
    sp.add_argument(
        "--no-persist",
        action="store_true",
        help="keep adds/deletes in memory only (default: each one writes a new "
        "index generation before it is answered)",
    )
    sp.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    sp.set_defaults(func=cmd_serve)
    return sp
