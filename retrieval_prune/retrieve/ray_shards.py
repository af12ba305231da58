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
    """One shard, memory-mapped, answering the exchanges of the sharded search."""

    def __init__(self, folder: str, pointer: Sequence[str], threads: int = 1) -> None:
        from retrieval_prune.index.base import load_index

        _limit_threads(threads)
        self.index = load_index(folder, pointer=(pointer[0], pointer[1]))
        self.states: dict[str, Any] = {}

    def phase1(self, rid: str, emb: np.ndarray, off: np.ndarray, k: int) -> list[tuple]:
        state, answers = self.index.shard_phase1(MultiVectors(emb, off), k)
        self.states[rid] = state
        while len(self.states) > _MAX_STATES:
            self.states.pop(next(iter(self.states)))
        return answers

    def phase2(self, rid: str, orders: list, n_final: int) -> list:
        state = self.states.pop(rid, None)
        if state is None:  # this actor restarted between the exchanges
            raise LookupError(f"request {rid} is unknown to this shard (restarted); retry the search")
        return self.index.shard_phase2(state, orders, n_final)

    def topk(self, emb: np.ndarray, off: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.index
        n_q = off.shape[0] - 1
        if idx.n_positions == 0 or not int(np.count_nonzero(idx.alive)):
            return np.zeros((n_q, 0), np.float32), np.zeros((n_q, 0), np.int64)
        return idx._search(MultiVectors(emb, off), k)

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
        return {"pid": os.getpid(), "peak_rss": peak, "docs": len(self.index)}


class RayShards:
    """Runner: a Ray actor per shard of ``index`` (a loaded :class:`ShardedIndex`)."""

    def __init__(self, index: ShardedIndex, root: str | Path, *, address: str | None = "local",
                 threads_per_shard: int = 1, timeout: float = 60.0, max_restarts: int = 4,
                 num_cpus: int | None = None) -> None:
        ray = require_ray()
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
        self.actors = [self._start(j, ref) for j, ref in enumerate(index.refs)]
        self.shard_ids = list(range(len(self.actors)))

    def _start(self, j: int, ref: tuple[str, str] | None):
        if ref is None:
            raise ValueError(f"{shard_name(j)} has no committed generation; save the index first")
        cls = self.ray.remote(num_cpus=0)(ShardActor).options(
            max_restarts=self.max_restarts, max_task_retries=0, name=None
        )
        return cls.remote(str(self.root / shard_name(j)), list(ref), self.threads)

    # -- the runner protocol ---------------------------------------------------------------
    def _gather(self, refs: list) -> list:
        """Results of one call per actor; failed shards raise ShardUnavailableError."""
        ray = self.ray
        errors = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                  ray.exceptions.RayTaskError, ray.exceptions.ObjectLostError)
        try:
            return ray.get(refs, timeout=self.timeout)  # one wait for every shard
        except errors:
            pass
        out, failed = [], []
        for j, r in zip(self.shard_ids, refs, strict=True):
            try:
                out.append(ray.get(r, timeout=self.timeout))
            except errors as exc:
                failed.append((j, exc))
        names = ", ".join(shard_name(j) for j, _ in failed)
        raise ShardUnavailableError(f"shard(s) {names} failed: {type(failed[0][1]).__name__}",
                                    [j for j, _ in failed])

    def phase1(self, queries: MultiVectors, k: int) -> tuple[str, list[list[tuple]]]:
        rid = f"{os.getpid()}-{threading.get_ident()}-{next(self._ids)}"  # this search's token
        emb = np.ascontiguousarray(queries.embeddings)  # small: sent inline with the calls
        off = np.asarray(queries.offsets, np.int64)
        return rid, self._gather([a.phase1.remote(rid, emb, off, k) for a in self.actors])

    def phase2(self, rid: str, orders: list[list[tuple | None]], n_final: int) -> list[list[tuple | None]]:
        return self._gather([a.phase2.remote(rid, o, n_final) for a, o in zip(self.actors, orders, strict=True)])

    def topk(self, queries: MultiVectors, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        emb = np.ascontiguousarray(queries.embeddings)  # small: sent inline with the calls
        off = np.asarray(queries.offsets, np.int64)
        return self._gather([a.topk.remote(emb, off, k) for a in self.actors])

    def subset(self, live: Sequence[int]) -> RayShards:
        """A runner over the shards ``live`` only (for an ``allow_partial`` answer)."""
        sub = object.__new__(RayShards)
        sub.__dict__.update(self.__dict__)
        sub.actors = [self.actors[self.shard_ids.index(j)] for j in live]
        sub.shard_ids = list(live)
        return sub

    def update(self, index: ShardedIndex) -> None:
        """Reopen shards whose pinned generation changed (after ``index.save``)."""
        for j, ref in enumerate(index.refs):
            if j >= len(self.actors):
                self.actors.append(self._start(j, ref))
                self.shard_ids.append(j)
            elif ref != getattr(self, "_refs", {}).get(j):
                self.ray.kill(self.actors[j], no_restart=True)
                self.actors[j] = self._start(j, ref)
        self._refs = dict(enumerate(index.refs))

    def info(self) -> list[dict[str, Any]]:
        return self._gather([a.info.remote() for a in self.actors])

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
    runner._refs = dict(enumerate(index.refs))
    index.runner = runner
    return runner
