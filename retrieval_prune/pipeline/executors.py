"""Where the map steps of a build run: ``local`` (this process) or ``ray`` (a Ray cluster).

A build is a sequence of maps over shards of the corpus -- encode a block of texts, run a
block through the token steps, code a shard with the fitted codebook -- with a reduce in
between (the codec fit, the commit). An executor runs one map: :meth:`Executor.map` takes a
function and an iterable of work items and yields results *in input order*, so a distributed
backend only adds an executor, not another build path. With ``init`` (a zero-argument
callable, e.g. one that loads the encoder) each worker makes its state once and the function
is called as ``fn(state, item)``.

Examples
--------
>>> list(get_executor("local").map(lambda x: x * x, range(4)))
[0, 1, 4, 9]
>>> list(get_executor("local").map(lambda st, x: st + x, range(3), init=lambda: 10))
[10, 11, 12]
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "get_executor", "EXECUTORS", "require_ray", "RAY_EXTRA"]

#: how to install Ray for this package
RAY_EXTRA = "pip install -e '.[ray]'  (or: pip install 'retrieval-prune[ray]')"


def require_ray():
    """The ``ray`` module, or an ImportError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"the Ray executor needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


class Executor:
    """Runs ``fn`` over work items; results come back in input order."""

    name = ""

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, init: Callable[[], Any] | None = None) -> Iterator[Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (a no-op where there are none)."""


class LocalExecutor(Executor):
    """In this process, one item at a time (memory: one item's result at a time, since
    results are yielded lazily)."""

    name = "local"

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, init: Callable[[], Any] | None = None) -> Iterator[Any]:
        if init is None:
            for item in items:
                yield fn(item)
            return
        state = init()
        for item in items:
            yield fn(state, item)


class _Worker:
    """A Ray actor body: makes its state once, then applies functions to items."""

    def __init__(self, init: Callable[[], Any] | None, threads: int) -> None:
        _limit_threads(threads)
        self.state = init() if init is not None else None

    def run(self, fn: Callable[..., Any], item: Any) -> Any:
        return fn(item) if self.state is None else fn(self.state, item)

    def pid(self) -> int:
        return os.getpid()


def _limit_threads(threads: int) -> None:
    """One worker, ``threads`` cores: torch and numba's thread pools sized to match."""
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


class RayExecutor(Executor):
    """Maps on a Ray cluster: a pool of ``workers`` actors (each holds its ``init`` state,
    e.g. an encoder loaded once), at most two items in flight per actor, results in order.

    ``address``: a running cluster (``ray start --head`` prints it; ``"auto"`` finds the local
    one); None starts a local cluster in this process with ``num_cpus`` CPUs (all by
    default). ``workers`` defaults to the cluster's CPUs; each worker uses
    ``threads_per_worker`` threads."""

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None,
                 threads_per_worker: int = 1, num_cpus: int | None = None) -> None:
        ray = require_ray()
        if workers is not None and workers < 1:
            raise ValueError(f"workers={workers!r} must be >= 1")
        if threads_per_worker < 1:
            raise ValueError(f"threads_per_worker={threads_per_worker!r} must be >= 1")
        self.started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": address, "include_dashboard": False,
                                  "log_to_driver": False, "configure_logging": False}
            if address is None and num_cpus is not None:
                kw["num_cpus"] = num_cpus
            ray.init(**kw)
            self.started = True
        self.ray = ray
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus // threads_per_worker)
        self.threads = threads_per_worker

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, init: Callable[[], Any] | None = None) -> Iterator[Any]:
        ray = self.ray
        actor_cls = ray.remote(num_cpus=self.threads)(_Worker)
        actors = [actor_cls.remote(init, self.threads) for _ in range(self.workers)]
        fn_ref = ray.put(fn)
        try:
            pending: deque = deque()
            it = iter(items)
            depth = 2 * len(actors)
            n = 0
            for item in it:
                pending.append(actors[n % len(actors)].run.remote(fn_ref, item))
                n += 1
                if len(pending) >= depth:
                    yield ray.get(pending.popleft())
            while pending:
                yield ray.get(pending.popleft())
        finally:
            for a in actors:
                ray.kill(a)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


#: executor name -> class
EXECUTORS: dict[str, type[Executor]] = {"local": LocalExecutor, "ray": RayExecutor}


def get_executor(executor: str | Executor | None = None, **kwargs: Any) -> Executor:
    """An executor by name (default ``local``; ``ray`` takes ``address=``, ``workers=``) or
    the instance given."""
    if executor is None:
        return LocalExecutor()
    if isinstance(executor, Executor):
        return executor
    try:
        cls = EXECUTORS[executor]
    except KeyError:
        raise ValueError(f"unknown executor {executor!r}; available: {sorted(EXECUTORS)}") from None
    return cls(**kwargs) if cls is RayExecutor else cls()
