"""Search a sharded index on Ray: one actor per shard, the exact merge in the caller.

:class:`RayShards` is a runner for :class:`~retrieval_prune.index.sharded.ShardedIndex`
(the in-process one is :class:`~retrieval_prune.index.sharded.LocalShards`). Each shard
actor opens its shard memory-mapped at the generation the top-level manifest pins and
answers the two exchanges of the staged search (:meth:`StagedIndex.shard_phase1` /
``shard_phase2``); the caller encodes a query once, sends its vectors to every actor and
merges exactly, so the answer equals the in-process one bit for bit.

Failures: an actor that dies is restarted by Ray (``max_restarts``), reopening its shard;
the search that saw the failure raises :class:`ShardUnavailableError` naming the shard and
:meth:`ShardedIndex.search` retries it. A shard that stays down makes the search fail with
that error -- never a silently partial answer -- unless the index's ``allow_partial`` is set,
in which case the other shards answer and ``missing_shards`` names the absent ones.

Examples
--------
>>> from retrieval_prune.retrieve import Retriever                      # doctest: +SKIP
>>> r = Retriever.from_index("indexes/scifact-4", address="local")       # doctest: +SKIP
>>> r.retrieve("what lowers blood pressure?", k=10)                      # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune.index.sharded import ShardedIndex, ShardUnavailableError, shard_name
from retrieval_prune.pipeline.executors import _limit_threads, require_ray
from retrieval_prune.types import MultiVectors

__all__ = ["RayShards", "attach_ray", "ShardActor"]

#: requests whose first-exchange state an actor keeps (older ones are dropped)
_MAX_STATES = 256


class ShardActor:
    """A group of shards (one or more), memory-mapped in one process, answering the
    exchanges of the sharded search. Shards in one actor share each query's score table
    (they share the codebook), so grouping the shards of a node into one actor computes it
    once per node instead of once per shard."""

    def __init__(self, folders: Sequence[str], pointers: Sequence[Sequence[str]], threads: int = 1) -> None:
        from retrieval_prune.index.base import load_index
        from retrieval_prune.index.sharded import LocalShards

        _limit_threads(threads)
        self.shards = LocalShards([load_index(f, pointer=(p[0], p[1])) for f, p in zip(folders, pointers, strict=True)])
        self.states: dict[str, Any] = {}

    def phase1(self, rid: str, emb: np.ndarray, off: np.ndarray, k: int) -> list[list[tuple]]:
        state, answers = self.shards.phase1(MultiVectors(emb, off), k)
        self.states[rid] = state
        while len(self.states) > _MAX_STATES:
            self.states.pop(next(iter(self.states)))
        return answers

    def phase2(self, rid: str, orders: list, n_final: int) -> list:
        state = self.states.pop(rid, None)
        if state is None:  # this actor restarted between the exchanges
            raise LookupError(f"request {rid} is unknown to this shard group (restarted); retry the search")
        return self.shards.phase2(state, orders, n_final)

    def topk(self, emb: np.ndarray, off: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.shards.topk(MultiVectors(emb, off), k)

    def info(self) -> dict[str, Any]:
        """PID and peak resident memory (VmHWM, bytes) of this actor's process."""
        peak = 0
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
        except OSError:
            pass
        return {"pid": os.getpid(), "peak_rss": peak, "docs": sum(len(x) for x in self.shards.shards),
                "shards": len(self.shards.shards)}


class RayShards:
    """Runner: Ray actors over the shards of ``index`` (a loaded :class:`ShardedIndex`), one
    per shard by default, or ``shards_per_actor`` consecutive shards per actor (the shards
    of one node in one process: one score table per query per actor)."""

    def __init__(self, index: ShardedIndex, root: str | Path, *, address: str | None = "local",
                 threads_per_shard: int = 1, shards_per_actor: int = 1, timeout: float = 60.0,
                 max_restarts: int = 4, num_cpus: int | None = None) -> None:
        ray = require_ray()
        if shards_per_actor < 1:
            raise ValueError(f"shards_per_actor={shards_per_actor!r} must be >= 1")
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
            if address in (None, "local"):
                if num_cpus is not None:
                    kw["num_cpus"] = num_cpus
            else:
                kw["address"] = address
            ray.init(**kw)
        self.ray = ray
        self.root = Path(root).resolve()
        self.timeout = float(timeout)
        self.threads = threads_per_shard
        self.max_restarts = max_restarts
        self._ids = itertools.count()
        n = len(index.refs)
        #: shard numbers of each actor, in shard order
        self.groups = [list(range(a, min(a + shards_per_actor, n))) for a in range(0, n, shards_per_actor)]
        self._refs = list(index.refs)
        self.actors = [self._start(g) for g in self.groups]

    def _start(self, group: list[int]):
        for j in group:
            if self._refs[j] is None:
                raise ValueError(f"{shard_name(j)} has no committed generation; save the index first")
        cls = self.ray.remote(num_cpus=0)(ShardActor).options(
            max_restarts=self.max_restarts, max_task_retries=0, name=None
        )
        return cls.remote([str(self.root / shard_name(j)) for j in group],
                          [list(self._refs[j]) for j in group], self.threads)  # type: ignore[arg-type]

    # -- the runner protocol ---------------------------------------------------------------
    def _gather(self, refs: list) -> list:
        """Results of one call per actor, flattened to one per shard; shards of failed
        actors raise ShardUnavailableError."""
        ray = self.ray
        errors = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                  ray.exceptions.RayTaskError, ray.exceptions.ObjectLostError)
        try:
            per_actor = ray.get(refs, timeout=self.timeout)  # one wait for every actor
        except errors:
            per_actor, failed = [], []
            for g, r in zip(self.groups, refs, strict=True):
                try:
                    per_actor.append(ray.get(r, timeout=self.timeout))
                except errors as exc:
                    failed.append((g, exc))
            if failed:
                bad = [j for g, _ in failed for j in g]
                raise ShardUnavailableError(
                    f"shard(s) {', '.join(shard_name(j) for j in bad)} failed: {type(failed[0][1]).__name__}", bad
                ) from None
        return [x for part in per_actor for x in part]

    def _per_actor(self, per_shard: list) -> list[list]:
        """Split a per-shard list into the actors' groups."""
        at = {j: i for i, j in enumerate(j for g in self.groups for j in g)}
        return [[per_shard[at[j]] for j in g] for g in self.groups]

    def phase1(self, queries: MultiVectors, k: int) -> tuple[str, list[list[tuple]]]:
        rid = f"{os.getpid()}-{threading.get_ident()}-{next(self._ids)}"  # this search's token
        emb = np.ascontiguousarray(queries.embeddings)  # small: sent inline with the calls
        off = np.asarray(queries.offsets, np.int64)
        return rid, self._gather([a.phase1.remote(rid, emb, off, k) for a in self.actors])

    def phase2(self, rid: str, orders: list[list[tuple | None]], n_final: int) -> list[list[tuple | None]]:
        return self._gather([a.phase2.remote(rid, o, n_final)
                             for a, o in zip(self.actors, self._per_actor(orders), strict=True)])

    def topk(self, queries: MultiVectors, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        emb = np.ascontiguousarray(queries.embeddings)
        off = np.asarray(queries.offsets, np.int64)
        return self._gather([a.topk.remote(emb, off, k) for a in self.actors])

    def subset(self, live: Sequence[int]) -> RayShards:
        """A runner over the actors all of whose shards are in ``live`` (for an
        ``allow_partial`` answer; a group answers for all its shards or none)."""
        keep = [i for i, g in enumerate(self.groups) if set(g) <= set(live)]
        sub = object.__new__(RayShards)
        sub.__dict__.update(self.__dict__)
        sub.actors = [self.actors[i] for i in keep]
        sub.groups = [self.groups[i] for i in keep]
        return sub

    def update(self, index: ShardedIndex) -> None:
        """Reopen the groups whose shards' pinned generations changed (after ``index.save``)."""
        old, self._refs = self._refs, list(index.refs)
        for i, g in enumerate(self.groups):
            if any(j >= len(old) or old[j] != self._refs[j] for j in g):
                self.ray.kill(self.actors[i], no_restart=True)
                self.actors[i] = self._start(g)

    def info(self) -> list[dict[str, Any]]:
        """One entry per actor: pid, peak RSS, documents, shards."""
        return self.ray.get([a.info.remote() for a in self.actors], timeout=self.timeout)

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []


def attach_ray(index: ShardedIndex, root: str | Path, **kwargs: Any) -> RayShards:
    """Search ``index`` (opened from ``root``) through Ray shard actors from now on."""
    if not isinstance(index, ShardedIndex):
        raise TypeError(f"{root} is not a sharded index; Ray search needs one (build --shards N)")
    runner = RayShards(index, root, **kwargs)
    index.runner = runner
    return runner
