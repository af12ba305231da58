"""Serve an index through Ray Serve: ``retrieval-prune serve INDEX --ray [--replicas N]``.

The HTTP API is the one :mod:`retrieval_prune.retrieve.server` documents -- same endpoints,
JSON bodies, status codes, bearer token for adds and deletes, ``Host`` allow-list (421) and
scrubbed error messages -- because every replica serves the very FastAPI app that
:func:`~retrieval_prune.retrieve.server.create_app` builds; nothing here defines an endpoint.

How a replica hosts the app: the deployment is ``serve.ingress(builder)`` where
``builder`` is a plain function (a closure over the index folder and the server options)
that Ray Serve calls once in each replica, after the replica process starts. It opens the
index with :meth:`Retriever.from_index` -- a *sharded* index (``build --shards N``) with
``address="auto"``, so each replica searches through one Ray actor per shard on the same
cluster (:mod:`retrieval_prune.retrieve.ray_shards`), a single index in the replica's own
process -- and returns ``create_app(retriever, ...)``. Ray Serve's HTTP proxy listens on
``host:port`` (``serve.start(http_options=...)``, default 127.0.0.1:8000 like the uvicorn
server) and hands each request, headers included, to a replica's app at route ``/``.

Replicas: one by default. With several, each opens the index itself (and, for a sharded
index, starts its own shard actors); adds and deletes are saved as a new generation
before they are answered, and every replica adopts the newest generation before it
answers a read (:meth:`Retriever.refresh`), as separate uvicorn processes on one folder
do. ``persist=False`` (``--no-persist``) would keep an add in one replica's memory only,
so it is refused with more than one replica.

Differences from the uvicorn server: Ray Serve's proxy itself answers ``/-/healthz`` and
``/-/routes`` (no token, no Host check; they name no document), and it reads a request's
body before a replica's guard sees its ``Content-Length``. The bearer token travels to the
replicas inside the deployment definition, which the Serve controller keeps in the
cluster's own store: anyone who can run code on the cluster can read it.

The index folder must be reachable at the same absolute path from every node that runs a
replica (and, for a sharded index, the shard actors). Ray and FastAPI are imported only
when a deployment is built.

Examples
--------
>>> from retrieval_prune.retrieve import ray_serve                       # doctest: +SKIP
>>> ray_serve.run("indexes/scifact-4", port=8000, token="...")           # doctest: +SKIP
>>> # ... curl -s localhost:8000/search -d '{"queries": ["heart"], "k": 5}'
>>> ray_serve.stop()                                                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from retrieval_prune.pipeline.executors import RAY_EXTRA
from retrieval_prune.retrieve.retriever import Retriever

__all__ = ["APP_NAME", "connect", "deployment", "open_retriever", "require_serve", "run", "stop"]

#: the Serve application's name (``serve.delete(APP_NAME)`` removes it)
APP_NAME = "retrieval-prune"
DEPLOYMENT_NAME = "RetrievalPruneServer"
#: requests one replica works on at once (searches run on FastAPI's thread pool)
MAX_ONGOING_REQUESTS = 32


def require_serve() -> tuple[Any, Any]:
    """``(ray, ray.serve)``, or an ImportError naming the extra to install."""
    try:
        import fastapi  # noqa: F401  (Ray Serve's ingress and create_app need it)
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError(
            f"serving on Ray needs Ray Serve ({exc.name or 'ray'} is missing): {RAY_EXTRA}"
        ) from None
    return ray, serve


def open_retriever(index: str, checkpoint: str | None = None) -> Retriever:
    """The retriever a replica serves: a sharded index searched through shard actors on
    the replica's own cluster, any other index in the replica's process."""
    from retrieval_prune.index.sharded import is_sharded

    address = "auto" if is_sharded(index) else None
    return Retriever.from_index(index, checkpoint=checkpoint, address=address)


def _app_builder(index: str, checkpoint: str | None, app_options: dict[str, Any]) -> Callable[[], Any]:
    """The function Ray Serve calls in each replica to build its ASGI app."""

    def build_retrieval_prune_app() -> Any:
        from retrieval_prune.retrieve.server import create_app

        return create_app(open_retriever(index, checkpoint), **app_options)

    return build_retrieval_prune_app


def _check_options(app_options: dict[str, Any], replicas: int) -> None:
    """Refuse here, before any replica starts, what ``create_app`` would refuse there."""
    from retrieval_prune.retrieve.server import _allowed_set, check_token

    for name in ("max_batch", "max_documents", "max_k", "max_text_chars"):
        v = app_options.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}={v!r} must be an int >= 1")
    if app_options.get("token") is not None:
        check_token(app_options["token"])
    _allowed_set(app_options.get("allowed_hosts"))
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas={replicas!r} must be an int >= 1")
    if replicas > 1 and app_options.get("persist") is False:
        raise ValueError(
            "persist=False (--no-persist) keeps an add or delete in the memory of the one "
            f"replica that answered it; with {replicas} replicas the others would not see it "
            "(use one replica, or let changes be saved)"
        )


def deployment(
    index: str | Path,
    *,
    checkpoint: str | Path | None = None,
    token: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
    persist: bool | None = None,
    replicas: int = 1,
    num_cpus: float = 1.0,
    max_ongoing_requests: int = MAX_ONGOING_REQUESTS,
    **limits: int,
) -> Any:
    """A bound Ray Serve application serving ``index`` (``serve.run`` it).

    ``token``, ``allowed_hosts``, ``persist`` and ``limits`` (``max_batch``,
    ``max_documents``, ``max_k``, ``max_text_chars``) are :func:`create_app`'s. ``replicas``
    replicas, each reserving ``num_cpus`` CPUs and working on at most
    ``max_ongoing_requests`` requests at once. Paths are made absolute here, since a
    replica's working folder is not the caller's.
    """
    _, serve = require_serve()
    unknown = set(limits) - {"max_batch", "max_documents", "max_k", "max_text_chars"}
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}")
    app_options: dict[str, Any] = dict(limits)
    app_options.update(
        token=token,
        allowed_hosts=None if allowed_hosts is None else list(allowed_hosts),
        persist=persist,
    )
    _check_options(app_options, replicas)
    folder = str(Path(index).resolve())
    ckpt = None if checkpoint is None else str(Path(checkpoint).resolve())
    ingress = serve.ingress(_app_builder(folder, ckpt, app_options))()
    dep = serve.deployment(
        ingress,
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=max_ongoing_requests,
    )
    return dep.bind()


def connect(address: str | None = None) -> bool:
    """Connect to Ray unless this process already did: ``address`` None or ``"local"``
    starts a local cluster, ``"auto"`` joins the running one. Whether it connected now."""
    ray, _ = require_serve()
    if ray.is_initialized():
        return False
    ray.init(address="local" if address is None else address, include_dashboard=False,
             configure_logging=False)
    return True


def _serving_address() -> tuple[str, int] | None:
    """``(host, port)`` Serve's proxies listen on, when this Ray version tells (else None)."""
    try:
        from ray.serve.context import _get_global_client

        cfg = _get_global_client().http_config
        return str(cfg.host), int(cfg.port)
    except Exception:  # noqa: BLE001 - a private API; the check is only a courtesy
        return None


def run(
    index: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = APP_NAME,
    address: str | None = None,
    log_level: str = "warning",
    replace: bool = False,
    **options: Any,
) -> Any:
    """Start Serve's HTTP proxy on ``host:port`` and deploy :func:`deployment`
    (``options``) as application ``name`` at route ``/``; returns (a deployment handle)
    once every replica has opened the index.

    Unless ``ray.init`` ran already, this connects to Ray: ``address`` None or ``"local"``
    starts a local cluster, ``"auto"`` joins the running one. Serve's HTTP options are
    fixed when Serve first starts on a cluster: when it already listens there on another
    host or port, this raises ValueError instead of serving elsewhere; so it does when an
    application ``name`` already runs there, unless ``replace``.
    """
    ray, serve = require_serve()
    app = deployment(index, **options)  # options checked before Ray starts
    connect(address)
    logging_config = {
        "log_level": log_level.upper(),
        "enable_access_log": log_level.lower() in ("info", "debug"),
    }
    serve.start(http_options={"host": host, "port": int(port)}, logging_config=logging_config)
    actual = _serving_address()
    if actual is not None and actual != (host, int(port)):
        raise ValueError(
            f"Ray Serve already runs on this cluster, listening on {actual[0]}:{actual[1]} (its "
            f"HTTP options are fixed when it starts); serve on that host and port, or shut "
            f"that Serve down first (serve shutdown)"
        )
    if not replace and name in serve.status().applications:
        raise ValueError(
            f"a Ray Serve application named {name!r} already runs on this cluster; stop it "
            "first (serve.delete) or serve under another name"
        )
    return serve.run(app, name=name, route_prefix="/", logging_config=logging_config)


def stop(name: str = APP_NAME) -> None:
    """Delete the Serve application ``name`` (its replicas and their shard actors)."""
    _, serve = require_serve()
    serve.delete(name)
