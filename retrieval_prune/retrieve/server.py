"""HTTP server: ``retrieval-prune serve INDEX [--host 127.0.0.1] [--port 8000]``.

Endpoints (JSON; see :func:`create_app`)::

    POST   /search            {"queries": ["..."], "k": 10, "with_text": false}
                              -> {"results": [[{"id": ..., "score": ...}, ...], ...]}
    POST   /documents         {"documents": [{"id": "...", "text": "...", "metadata": {}}]}
                              -> 201 {"added": n, "ids": [...], "generation": "gen-..."}
                              (needs the bearer token)
    GET    /documents/{id}    -> {"id", "text", "metadata"}
    DELETE /documents/{id}    -> {"deleted": id, "generation": "gen-..."}  (needs the token)
    GET    /health            -> {"status": "ok", "docs": n}
    GET    /stats             -> docs, vectors, bytes, pipeline spec, encoder, limits

Access model:

- **Mutation needs a bearer token.** ``POST /documents`` and ``DELETE /documents/{id}``
  need ``Authorization: Bearer <token>``; the token comes from ``--token-file PATH`` or
  the ``RETRIEVAL_PRUNE_TOKEN`` environment variable (``create_app(token=...)``). Without
  a configured token the server is read-only: those endpoints answer 403. Searches, reads,
  ``/health`` and ``/stats`` need no token. The token is checked (in constant time)
  before the request body is read.
- **Loopback and a Host allow-list.** The server listens on 127.0.0.1 unless told
  otherwise, and answers only requests whose ``Host`` header names an allowed host
  (``localhost``, ``127.0.0.1``, ``::1``, the ``--host`` it binds when that is a specific
  address, and every ``--allowed-host``; ``*`` allows any), so a web page cannot reach it
  through DNS rebinding. The token travels in clear text: put a TLS proxy in front of a
  server that listens beyond this machine.

Errors are ``{"error": "<message>"}``: 400 (body is not JSON, not UTF-8, nested too
deeply, or a string holds a lone surrogate), 401 (no or malformed bearer token), 403
(wrong token, or mutation disabled), 404 (unknown id or path), 409 (id already present),
413 (batch over the limit), 421 (Host not allowed), 422 (invalid field), 500 (internal
error, or a failed save: the change was NOT applied), 503 (another writer holds the
index folder's write lock). Messages never hold a traceback or an absolute path: the
index folder is written ``<index>`` and other absolute paths by their last component;
the full error goes to the server log.

Adds and deletes run inside :meth:`Retriever.transaction`: a new index generation is
saved before the answer, another process's commits are merged first, and a failed save
leaves memory equal to the generation on disk.

``serve INDEX --ray [--replicas N] [--address ADDR]`` serves the same app through Ray Serve
instead of uvicorn (:mod:`retrieval_prune.retrieve.ray_serve`): each replica opens the index
(a sharded one searched through one Ray actor per shard) and serves :func:`create_app`'s app.

FastAPI, uvicorn and Ray are imported only when the server is built, so this module (and
the CLI, which imports it) loads without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrieval_prune.retrieve.retriever import Retriever

__all__ = [
    "add_serve_parser",
    "create_app",
    "cmd_serve",
    "SERVE_INSTALL_HINT",
    "TOKEN_ENV",
    "LOOPBACK_HOSTS",
]

SERVE_INSTALL_HINT = "pip install 'retrieval-prune[serve]'"

#: environment variable holding the bearer token for adds and deletes
TOKEN_ENV = "RETRIEVAL_PRUNE_TOKEN"

#: Host names always served (any port)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

#: default request limits (per request)
DEFAULT_LIMITS = {"max_batch": 256, "max_documents": 1000, "max_k": 1000, "max_text_chars": 100_000}

_TOKEN_FILE_MAX_BYTES = 4096
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def check_token(token: Any, source: str = "token") -> str:
    """``token`` if it is a usable bearer token (visible ASCII, no spaces), else ValueError."""
    if not isinstance(token, str):
        raise TypeError(f"{source} must be a str, got {type(token).__name__}")
    if not token:
        raise ValueError(f"{source} is empty; give a secret of visible ASCII characters")
    bad = [c for c in token if not 0x21 <= ord(c) <= 0x7E]
    if bad:
        raise ValueError(
            f"{source} holds {len(bad)} character(s) that are not visible ASCII (space, "
            "control or non-ASCII); a bearer token must be visible ASCII without spaces"
        )
    return token


def normalize_host(value: str) -> str | None:
    """Host name of a ``Host`` header or an allow-list entry: port and IPv6 brackets
    stripped, lower case, one trailing dot dropped, IP addresses in canonical form.
    None when ``value`` is not a host name."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            return None
        name, rest = v[1:end], v[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
    elif v.count(":") == 1:
        name, port = v.split(":")
        if not port.isdigit():
            return None
    else:  # a plain name, or a bare IPv6 address (allow-list entries)
        name = v
    if name.endswith("."):
        name = name[:-1]
    if not name or any(c in name for c in " \t\r\n/\\@?#[]") or ".." in name:
        return None
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        return None if ":" in name else name


def default_allowed_hosts(bind_host: str | None = None) -> list[str]:
    """The loopback names, plus ``bind_host`` when it is a specific (non-wildcard) host."""
    out = list(LOOPBACK_HOSTS)
    if bind_host is not None and bind_host.strip() not in _WILDCARD_HOSTS:
        name = normalize_host(bind_host)
        if name is not None and name not in out:
            out.append(name)
    return out


def _allowed_set(allowed_hosts: Iterable[str] | None) -> frozenset[str] | None:
    """Normalised allow-list (always with the loopback names); None means any host."""
    names = set(LOOPBACK_HOSTS)
    if allowed_hosts is None:
        return frozenset(names)
    if isinstance(allowed_hosts, str):
        raise TypeError("allowed_hosts must be a list of host names, not a str")
    for h in allowed_hosts:
        if not isinstance(h, str):
            raise TypeError(f"allowed host {h!r} is a {type(h).__name__}, expected str")
        if h.strip() == "*":
            return None
        name = normalize_host(h)
        if name is None:
            raise ValueError(
                f"allowed host {h!r} is not a host name or IP address (e.g. search.internal, "
                "10.0.0.5, [fd00::1]; '*' allows any)"
            )
        names.add(name)
    return frozenset(names)


def create_app(
    retriever: Retriever,
    *,
    max_batch: int = DEFAULT_LIMITS["max_batch"],
    max_documents: int = DEFAULT_LIMITS["max_documents"],
    max_k: int = DEFAULT_LIMITS["max_k"],
    max_text_chars: int = DEFAULT_LIMITS["max_text_chars"],
    persist: bool | None = None,
    token: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
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
        Save a new index generation after every add / delete before answering (inside
        :meth:`Retriever.transaction`). Default: True when the retriever has an index folder.
    token : str, optional
        Bearer token that ``POST /documents`` and ``DELETE /documents/{id}`` need. None:
        the server is read-only (those endpoints answer 403).
    allowed_hosts : list of str, optional
        Host names (``Host`` header, port ignored) served besides the loopback names
        ``localhost``, ``127.0.0.1`` and ``::1``; ``"*"`` serves any. Others get 421.
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
    if token is not None:
        check_token(token)
    hosts = _allowed_set(allowed_hosts)
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
        token=token,
        allowed_hosts=hosts,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ServeError(Exception):
    """A configuration problem reported as ``retrieval-prune serve: error: ...`` (exit 2)."""


def read_token(token_file: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token from ``token_file`` (trailing newlines stripped), else from
    ``$RETRIEVAL_PRUNE_TOKEN``, else None; raises :class:`_ServeError` when it is unusable."""
    env = os.environ if environ is None else environ
    if token_file is not None:
        path = Path(token_file)
        try:
            if not path.is_file():
                raise _ServeError(f"--token-file {token_file}: not a readable file")
            if path.stat().st_size > _TOKEN_FILE_MAX_BYTES:
                raise _ServeError(
                    f"--token-file {token_file}: over {_TOKEN_FILE_MAX_BYTES} bytes; "
                    "it should hold the token alone"
                )
            raw = path.read_bytes()
        except OSError as exc:
            raise _ServeError(
                f"--token-file {token_file}: cannot read it ({exc.strerror or exc})"
            ) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _ServeError(f"--token-file {token_file}: not UTF-8 text") from None
        source = f"--token-file {token_file}"
    elif TOKEN_ENV in env:
        text, source = env[TOKEN_ENV], TOKEN_ENV
    else:
        return None
    text = text.rstrip("\r\n")
    try:
        return check_token(text, source)
    except ValueError as exc:
        raise _ServeError(str(exc)) from None


def startup_warnings(
    host: str, token: str | None, allowed_hosts: Iterable[str] | None, token_file: str | None
) -> list[str]:
    """Warnings ``serve`` prints before it starts (exposure, token, Host allow-list)."""
    out = []
    if not _is_loopback(host):
        if token is None:
            out.append(
                f"listening on {host}, not loopback: any machine that can reach it can search "
                f"the index (read-only: no token is set, so adds and deletes are refused)"
            )
        else:
            out.append(
                f"listening on {host}, not loopback: any machine that can reach it can search "
                "the index, and whoever holds the bearer token can add and delete documents; "
                "the token travels in clear text over HTTP (put a TLS proxy in front)"
            )
        hosts = list(allowed_hosts or [])
        if host.strip() in _WILDCARD_HOSTS and not hosts:
            out.append(
                f"{host} is a wildcard address: only requests naming {', '.join(LOOPBACK_HOSTS)} "
                "in their Host header are served (others get 421); add the names clients use "
                "with --allowed-host NAME"
            )
    if any(h.strip() == "*" for h in allowed_hosts or []):
        out.append(
            "--allowed-host '*' serves any Host header: a web page can then reach this "
            "server through DNS rebinding"
        )
    if token_file is not None:
        try:
            if Path(token_file).stat().st_mode & 0o077:
                out.append(f"--token-file {token_file} is readable by other users (chmod 600 it)")
        except OSError:
            pass
    if token is not None and len(token) < 16:
        out.append(f"the bearer token has only {len(token)} characters; use a long random one")
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    on_ray = bool(getattr(args, "ray", False))
    if not on_ray and (
        getattr(args, "address", None) is not None or getattr(args, "replicas", None) is not None
    ):
        print("retrieval-prune serve: error: --address and --replicas are for --ray", file=sys.stderr)
        return 2
    try:
        if on_ray:
            from retrieval_prune.retrieve.ray_serve import require_serve

            require_serve()
        else:
            import uvicorn
    except ImportError as exc:
        why = str(exc) if on_ray else f"the server needs fastapi and uvicorn; {SERVE_INSTALL_HINT}"
        print(f"retrieval-prune serve: error: {why}", file=sys.stderr)
        return 2
    from retrieval_prune.retrieve.retriever import Retriever

    token_file = getattr(args, "token_file", None)
    extra_hosts = list(getattr(args, "allowed_host", None) or [])
    try:
        token = read_token(token_file)
        allowed = default_allowed_hosts(args.host) + extra_hosts
        _allowed_set(allowed)  # refuse a bad --allowed-host before loading the index
    except (_ServeError, ValueError) as exc:
        print(f"retrieval-prune serve: error: {exc}", file=sys.stderr)
        return 2
    for line in startup_warnings(args.host, token, extra_hosts, token_file):
        print(f"retrieval-prune serve: warning: {line}", file=sys.stderr)
    if on_ray:
        return _serve_on_ray(args, token, allowed)
    retriever = Retriever.from_index(args.index, checkpoint=args.checkpoint)
    app = create_app(
        retriever,
        max_batch=args.max_batch,
        max_documents=args.max_documents,
        max_k=args.max_k,
        persist=not args.no_persist,
        token=token,
        allowed_hosts=allowed,
    )
    mode = (
        "adds/deletes need the bearer token"
        if token
        else (f"read-only (no --token-file or {TOKEN_ENV})")
    )
    print(
        f"serving {args.index}: {len(retriever)} documents, pipeline "
        f"{retriever.index.pipeline_spec!r} on http://{args.host}:{args.port}; {mode}",
        file=sys.stderr,
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    return 0


def _serve_on_ray(args: argparse.Namespace, token: str | None, allowed: list[str]) -> int:
    """``serve --ray``: deploy the app on Ray Serve, wait for Ctrl-C or SIGTERM, then delete
    the application (and shut down the cluster when this process started it)."""
    import signal
    import threading

    from retrieval_prune.index import storage
    from retrieval_prune.index.sharded import is_sharded
    from retrieval_prune.retrieve import ray_serve

    ray, serve = ray_serve.require_serve()
    storage.live_pointer(args.index)  # no index there: one line and exit 2, before Ray starts
    replicas = args.replicas or 1
    options = {
        "checkpoint": args.checkpoint,
        "token": token,
        "allowed_hosts": allowed,
        "persist": not args.no_persist,
        "replicas": replicas,
        "max_batch": args.max_batch,
        "max_documents": args.max_documents,
        "max_k": args.max_k,
    }
    ray_serve.deployment(args.index, **options)  # bad options: one line, before Ray starts
    # shut the cluster down at the end only when this process started it
    owns_cluster = ray_serve.connect(args.address) and args.address in (None, "local")
    stop = threading.Event()
    try:  # after ray.init, which installs its own SIGTERM handler (an abort)
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    except ValueError:  # not the main thread: Ctrl-C only
        previous = None
    deployed = False
    try:
        try:
            ray_serve.run(args.index, host=args.host, port=args.port,
                          log_level=args.log_level, **options)
            deployed = True
        except (ValueError, ImportError):
            raise  # bad options, or Serve already bound elsewhere: one line, exit 2
        except KeyboardInterrupt:
            return 130
        except Exception as exc:  # noqa: BLE001 - e.g. a replica that failed to open the index
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            print(f"retrieval-prune serve: error: Ray Serve could not start the application "
                  f"({type(exc).__name__}: {first}); the replica logs are in the Ray session's "
                  "logs/serve folder", file=sys.stderr)
            return 1
        mode = (
            "adds/deletes need the bearer token"
            if token
            else (f"read-only (no --token-file or {TOKEN_ENV})")
        )
        where = ("one Ray actor per shard" if is_sharded(args.index)
                 else "the index in each replica")
        print(
            f"serving {args.index} through Ray Serve ({replicas} replica(s), {where}) on "
            f"http://{args.host}:{args.port}; {mode}; Ctrl-C stops it",
            file=sys.stderr,
        )
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if ray.is_initialized():
            try:
                if deployed:
                    ray_serve.stop()
                if owns_cluster:
                    serve.shutdown()
            finally:
                if owns_cluster:
                    ray.shutdown()


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
        "DELETE /documents/{id}, GET /documents/{id}, GET /health, GET /stats. Adds and "
        f"deletes need a bearer token (--token-file or ${TOKEN_ENV}); without one the "
        f"server is read-only. Needs {SERVE_INSTALL_HINT}.",
    )
    sp.add_argument("index", metavar="INDEX", help="index folder (written by `build`)")
    sp.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1: this machine only)",
    )
    sp.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help=f"file holding the bearer token that adds and deletes need (default: "
        f"${TOKEN_ENV}; with neither, the server is read-only)",
    )
    sp.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name to serve besides localhost, 127.0.0.1, ::1 and the --host "
        "address (repeatable; '*' serves any, giving up the DNS-rebinding guard)",
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
    sp.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve (same API): each replica opens the index, a sharded "
        "one searched through one Ray actor per shard; stops (deleting the application) on "
        "Ctrl-C; needs pip install -e '.[ray]'",
    )
    sp.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="with --ray: the Ray cluster (default: start a local one; 'auto': the running one)",
    )
    sp.add_argument(
        "--replicas",
        type=_positive,
        default=None,
        metavar="N",
        help="with --ray: Ray Serve replicas, each opening the index (default 1)",
    )
    sp.set_defaults(func=cmd_serve)
    return sp
