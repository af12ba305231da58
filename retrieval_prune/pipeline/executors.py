"""Where the map steps of a build run: ``local`` (this process) now.

A build is a sequence of maps over shards of the corpus -- encode a block of texts, run a
block through the token steps, code a block with the fitted codebook -- with a reduce in
between (the codec fit, the commit). An executor runs one map: :meth:`Executor.map` takes a
function and an iterable of work items and yields results *in order*, so a distributed
backend (Ray) only adds an executor, not another build path.

Examples
--------
>>> list(get_executor("local").map(lambda x: x * x, range(4)))
[0, 1, 4, 9]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["Executor", "LocalExecutor", "get_executor", "EXECUTORS"]


class Executor:
    """Runs ``fn`` over work items; results come back in input order."""

    name = ""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        raise NotImplementedError


class LocalExecutor(Executor):
    """In this process, one item at a time (memory: one item's result at a time, since
    results are yielded lazily)."""

    name = "local"

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            yield fn(item)


#: executor name -> class
EXECUTORS: dict[str, type[Executor]] = {"local": LocalExecutor}


def get_executor(executor: str | Executor | None = None) -> Executor:
    """An executor by name (default ``local``) or the instance given."""
    if executor is None:
        return LocalExecutor()
    if isinstance(executor, Executor):
        return executor
    try:
        return EXECUTORS[executor]()
    except KeyError:
        raise ValueError(f"unknown executor {executor!r}; available: {sorted(EXECUTORS)}") from None
