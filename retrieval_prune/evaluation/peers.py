"""The Rust peers (fast-plaid, xtr-warp-rs) as benchmark engines, each behind a worker process.

fast-plaid 1.7.0.2110 (LightOn's Rust PLAID) and xtr-warp-rs 2.1.0.2110 (the WARP engine)
pin torch 2.11, which cannot share our environment (torch 2.13), so they live in their own
(``make peers`` makes ``.venv-peers``) and each engine here drives one worker
(:mod:`retrieval_prune.evaluation.peer_worker`, run by that environment's python) over a
pipe: length-prefixed JSON headers and raw ``.npy`` array bytes, never pickle.

A :class:`PeerEngine` has the interface of ``bench_plaid``'s ``OurEngine`` and
``PlaidEngine`` (``open()``, ``search(qi, k)``, ``search_encoded(mv, k)``, ``close()`` and a
``row`` dict), so ``measure_latency`` interleaves it query by query with ours:

- build: one worker with every CPU (as our build and PLAID's run unrestricted), fed the
  same cached document vectors, its index in ``scratch/peers/<label>``; then it quits;
- search: a fresh worker limited to one thread (OpenMP, MKL, OpenBLAS, Rayon, torch) opens
  that index; every query's vectors are sent as they are;
- latency is the client's wall time of the whole round trip (``p50_ms_k10``, ...); the
  worker's own clock around the engine's search call is reported beside it
  (``worker_p50_ms_k10``, ...), and the pipe's cost is measured with no-op requests
  (``pipe_ping_ms_p50``) and per query (``pipe_overhead_ms_p50``: round trip minus
  worker search);
- anything that goes wrong (the environment missing, an import error, a crash, a failed
  request) becomes the row's ``error``; the other engines run on.

Settings: each peer runs once with its documented defaults (both build with ``nbits=4``
and choose search parameters themselves) and once per ``nbits`` matched to ours (2, and 4
which equals the defaults, so that row says so instead of being built twice).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune.evaluation.peer_worker import THREAD_VARS, read_frame, write_frame

__all__ = [
    "DEFAULT_PEERS",
    "DEFAULT_PEERS_PYTHON",
    "PEER_DEFAULTS",
    "PeerEngine",
    "PeerError",
    "PeerProcess",
    "peer_configs",
]

DEFAULT_PEERS: tuple[str, ...] = ("fast-plaid", "xtr-warp-rs")
DEFAULT_PEERS_PYTHON = ".venv-peers/bin/python"
WORKER = Path(__file__).with_name("peer_worker.py")
INSTALL_HINT = "make peers (creates .venv-peers with fast-plaid and xtr-warp-rs)"
#: each peer's documented defaults (the keyword defaults of its create/search calls)
PEER_DEFAULTS: dict[str, dict[str, Any]] = {
    # FastPlaid.create(nbits=4, kmeans_niters=4, max_points_per_centroid=256, seed=42);
    # FastPlaid.search(n_ivf_probe=8, n_full_scores=4096). Matched rows also match the
    # search budget: documents fully scored = colbert-ai's ndocs by k, which our staged
    # search takes as its n_candidates (256 at k <= 10, 1024 at k <= 100)
    "fast-plaid": {"nbits": 4, "create": {}, "search": {},
                   "matched_search": {"by_k": {"10": {"n_full_scores": 256},
                                               "100": {"n_full_scores": 1024}}}},
    # XTRWarp.create(nbits=4, kmeans_niters=4, max_points_per_centroid=256, seed=42);
    # XTRWarp.search: bound/nprobe/t_prime/max_candidates/threshold from the index density
    "xtr-warp-rs": {"nbits": 4, "create": {}, "search": {}},
    "exact": {"nbits": None, "create": {}, "search": {}},
}


class PeerError(RuntimeError):
    """A peer worker failed: its error message, or how it died (exit code, stderr tail)."""


class PeerProcess:
    """One worker process and its pipe. ``request`` sends a frame and returns the reply's
    ``(header, arrays)``; a reply with ``ok: false`` or a dead worker raises PeerError."""

    def __init__(self, python: str | os.PathLike, *, threads: int = 1,
                 log: str | os.PathLike | None = None):
        self.python, self.threads = str(python), int(threads)
        self.log = Path(log) if log is not None else None
        env = dict(os.environ)
        for var in THREAD_VARS:
            env[var] = str(self.threads)
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CUDA build of torch 2.11: keep it on the CPU
        env.pop("PYTHONPATH", None)
        if not Path(self.python).exists():
            raise PeerError(f"peers python {self.python} does not exist; run {INSTALL_HINT}")
        err: Any = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            err = open(self.log, "ab")  # noqa: SIM115 - closed in close()
        self._err = err
        try:
            # -I: isolated (no user site, PYTHON* variables, or the script's folder on sys.path)
            self.proc = subprocess.Popen(
                [self.python, "-I", str(WORKER), "--threads", str(self.threads)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
        except OSError as exc:
            self._close_log()
            raise PeerError(f"could not start {self.python}: {exc}") from exc

    def request(self, op: str, arrays: dict[str, np.ndarray] | None = None, **fields: Any
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.proc.poll() is not None:
            raise PeerError(self._death(op))
        try:
            write_frame(self.proc.stdin, {"op": op, **fields}, arrays)
            header, out = read_frame(self.proc.stdout)
        except (BrokenPipeError, EOFError, OSError) as exc:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            raise PeerError(self._death(op, exc)) from exc
        if not header.get("ok"):
            msg = str(header.get("error", "unknown error"))
            if "ModuleNotFoundError" in msg:
                msg += f" (install the peers: {INSTALL_HINT})"
            raise PeerError(msg)
        return header, out

    def _death(self, op: str, exc: Exception | None = None) -> str:
        rc = self.proc.poll()
        tail = ""
        if self.log is not None and self.log.is_file():
            lines = self.log.read_text(errors="replace").strip().splitlines()[-5:]
            tail = " | ".join(lines)
        how = f"exited with code {rc}" if rc is not None else f"stopped answering ({exc})"
        return (f"peer worker {how} during {op!r}"
                + (f"; stderr tail: {tail}" if tail else "")
                + (f" (log: {self.log})" if self.log is not None else ""))

    def ping_ms(self, n: int = 200) -> list[float]:
        """Round-trip milliseconds of ``n`` no-op requests."""
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.request("ping")
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def close(self) -> None:
        if getattr(self, "proc", None) is None:
            return
        if self.proc.poll() is None:
            try:
                write_frame(self.proc.stdin, {"op": "quit"})
                read_frame(self.proc.stdout)
            except (OSError, EOFError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for s in (self.proc.stdin, self.proc.stdout):
            try:
                s.close()
            except OSError:
                pass
        self.proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._err not in (None, subprocess.DEVNULL):
            self._err.close()
        self._err = None

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def peer_configs(peers: Sequence[str], nbits: Sequence[int] = (2, 4)
                 ) -> list[dict[str, Any]]:
    """One config per row: each peer's defaults, then each ``nbits`` that differs from
    them (a matched ``nbits`` equal to the default's is that same row, marked so). A peer
    with a search budget to match (``matched_search``: fast-plaid's ``n_full_scores``) gets
    a matched row for every ``nbits``, its defaults row then being a row of its own; its
    ``search`` settings hold ``by_k``: keyword arguments per search depth."""
    out = []
    for peer in peers:
        if peer not in PEER_DEFAULTS:
            raise ValueError(f"peer {peer!r} is not one of {list(PEER_DEFAULTS)}")
        d = PEER_DEFAULTS[peer]
        budget = d.get("matched_search")
        same = [b for b in nbits if b == d["nbits"] and not budget]
        out.append({"peer": peer, "settings": {"create": dict(d["create"]),
                                               "search": dict(d["search"])},
                    "kind": "defaults" + (f" (= matched nbits={same[0]})" if same else ""),
                    "nbits": d["nbits"]})
        for b in nbits:
            if (b != d["nbits"] or budget) and d["nbits"] is not None:
                search = json.loads(json.dumps(budget)) if budget else {}
                out.append({"peer": peer, "settings": {"create": {"nbits": int(b)},
                                                       "search": search},
                            "kind": f"matched nbits={b}" + (", budget" if budget else ""),
                            "nbits": int(b)})
    return out


class PeerEngine:
    """A peer's index over ``ctx``'s document vectors, searched through a worker.

    Parameters
    ----------
    ctx : DatasetContext
        Document and query vectors, qrels and the exact reference run.
    peer : ``"fast-plaid"``, ``"xtr-warp-rs"`` or ``"exact"`` (numpy MaxSim, no peer needed)
    settings : dict
        ``{"create": {...}, "search": {...}}``: the peer's own keyword arguments.
    scratch : folder; the index goes to ``scratch/peers/<label>``, the worker's stderr to
        ``scratch/peers/<label>.log``.
    python : the interpreter of the peers' environment (default ``.venv-peers/bin/python``).
    build_threads : threads of the building worker (default: every CPU); searches run in a
        one-thread worker.
    """

    def __init__(self, ctx: Any, peer: str, settings: dict[str, Any] | None, scratch: Path, *,
                 python: str | os.PathLike = DEFAULT_PEERS_PYTHON, checkpoint: str | None = None,
                 label: str | None = None, kind: str = "defaults", nbits: int | None = None,
                 build_threads: int | None = None, doc_dtype: str = "float32"):
        from retrieval_prune.evaluation.runner import run_quality

        self.engine = peer
        self.ctx = ctx
        self.settings = settings or {"create": {}, "search": {}}
        self.python = str(python)
        matched = "by_k" in self.settings.get("search", {})  # a matched search budget
        self.label = label or ((f"{peer}-nbits{nbits}" if nbits else peer)
                               + ("-budget" if matched else ""))
        root = Path(scratch).resolve() / "peers"
        self.folder = root / self.label
        self.log = root / f"{self.label}.log"
        if self.log.exists():
            self.log.unlink()
        self.build_threads = build_threads or os.cpu_count() or 1
        self.proc: PeerProcess | None = None
        self.failed: str | None = None
        self.worker_ms: dict[int, dict[int, float]] = {}
        self.round_ms: dict[int, dict[int, float]] = {}
        q = ctx.queries
        off = np.asarray(q.offsets, np.int64)
        self.Q = [np.ascontiguousarray(q.embeddings[off[i] : off[i + 1]], dtype=np.float32)
                  for i in range(len(q))]
        self._doc_ids = ctx.doc_ids
        n_docs = len(ctx.doc_ids)
        self.row: dict[str, Any] = {
            "dataset": ctx.name,
            "split": ctx.split,
            "pipeline": (f"{peer}:nbits={nbits}" if nbits else peer)
                        + (",budget=matched" if matched else ""),
            "pipeline_canonical": None,
            "peer_settings": self.settings,
            "peer_settings_kind": kind,
            "checkpoint": checkpoint or "zero-shot",
            "encoder": ctx.encoder_name,
            "encoder_precision": "float32",
            "n_docs": n_docs,
            "n_queries": len(ctx.qids),
            "engine": peer,
            "nbits": nbits,
        }
        try:
            self._build(doc_dtype)
            self.open()
            self.search(0, 100)  # warm-up
            run = {}
            for qi, qid in enumerate(ctx.qids):
                run[qid] = dict(self.search(qi, 100))
                if self.failed:
                    raise PeerError(self.failed)
            self.row.update(run_quality(ctx, run))
            self.run100 = run
        except PeerError as exc:
            self._fail(str(exc))
        finally:
            self.close()

    # -- building and opening -------------------------------------------------------------
    def _build(self, doc_dtype: str) -> None:
        docs = self.ctx.docs
        emb = np.asarray(docs.embeddings)
        if emb.dtype != np.dtype(doc_dtype):
            emb = emb.astype(doc_dtype)
        with PeerProcess(self.python, threads=self.build_threads, log=self.log) as p:
            info = p.request("info")[0]
            t0 = time.perf_counter()
            rep, _ = p.request("build", {"embeddings": emb,
                                         "offsets": np.asarray(docs.offsets, np.int64)},
                               engine=self.engine, settings=self.settings,
                               index=str(self.folder))
            wall = time.perf_counter() - t0
        meta = rep.get("meta") or {}
        n_docs = len(self.ctx.doc_ids)
        fp32 = docs.n_tokens * docs.dim * 4
        nbytes = _index_bytes(self.folder)
        v = info["versions"]
        self.row.update({
            "peer_version": v.get(self.engine) if self.engine != "exact" else None,
            "peer_torch": v.get("torch"),
            "bytes_per_doc": nbytes / n_docs,
            "vectors_per_doc": meta.get("num_embeddings", docs.n_tokens) / n_docs,
            "compression_ratio": fp32 / max(nbytes, 1),
            "build_s": rep["build_s"],
            "build_s_wall": wall,  # with the transfer of the vectors to the worker
            "build_threads": self.build_threads,
            "num_partitions": meta.get("num_partitions"),
            "index_files": index_files(self.folder),
            "peer_meta": {k: meta[k] for k in ("num_partitions", "num_embeddings", "avg_doclen",
                                               "nbits", "num_chunks") if k in meta},
        })
        self.row["pipeline_canonical"] = (
            f"{self.engine} {self.row['peer_version'] or ''} nbits={meta.get('nbits')}, "
            f"num_partitions={meta.get('num_partitions')}, settings={self.settings}")

    def open(self) -> None:
        if self.failed:
            return
        try:
            self.proc = PeerProcess(self.python, threads=1, log=self.log)
            self.proc.request("open", engine=self.engine, settings=self.settings,
                              index=str(self.folder))
        except PeerError as exc:
            self._fail(str(exc))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.close()
            self.proc = None

    def _fail(self, msg: str) -> None:
        if not self.failed:
            self.failed = msg
            self.row["error"] = msg
        self.close()

    # -- searching ------------------------------------------------------------------------
    def search(self, qi: int, k: int) -> list[tuple[str, float]]:
        hits = self.search_vectors(self.Q[qi], k, qi=qi)
        return hits

    def search_encoded(self, mv: Any, k: int) -> list[tuple[str, float]]:
        """One query's vectors straight from an encoder (``MultiVectors`` of one query)."""
        return self.search_vectors(np.asarray(mv.embeddings, np.float32), k)

    def search_vectors(self, q: np.ndarray, k: int, *, qi: int | None = None
                       ) -> list[tuple[str, float]]:
        if self.failed or self.proc is None:
            return []
        t0 = time.perf_counter()
        try:
            rep, arr = self.proc.request("search", {"queries": q}, k=int(k))
        except PeerError as exc:
            self._fail(str(exc))
            return []
        rt = (time.perf_counter() - t0) * 1e3
        if qi is not None:
            self.worker_ms.setdefault(k, {})[qi] = rep["search_s"] * 1e3
            self.round_ms.setdefault(k, {})[qi] = rt
        if rep.get("search_settings"):
            self.row.setdefault("peer_search_settings", {})[str(k)] = rep["search_settings"]
        ids = self._doc_ids
        return [(ids[int(p)], float(s)) for p, s in zip(arr["ids"], arr["scores"], strict=True)]

    def ping_ms(self, n: int = 200) -> list[float]:
        """Round trips of no-op requests (the pipe's own cost), once the engine is open."""
        if self.failed or self.proc is None:
            return []
        try:
            return self.proc.ping_ms(n)
        except PeerError as exc:
            self._fail(str(exc))
            return []

    def worker_stats(self, n_queries: int) -> dict[str, float]:
        """p50/p95 of the worker's own search time and of the pipe's share of each round
        trip, per k, over the queries of the last latency pass."""
        out: dict[str, float] = {}
        for k, by_q in self.worker_ms.items():
            w = [by_q[qi] for qi in range(n_queries) if qi in by_q]
            r = [self.round_ms[k][qi] for qi in range(n_queries) if qi in by_q]
            if not w:
                continue
            out[f"worker_p50_ms_k{k}"] = float(np.percentile(w, 50))
            out[f"worker_p95_ms_k{k}"] = float(np.percentile(w, 95))
            out[f"pipe_overhead_ms_p50_k{k}"] = float(np.percentile(np.subtract(r, w), 50))
        return out


def _index_bytes(folder: Path) -> int:
    """Bytes of every file of a peer's index folder (its lock file is empty)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def index_files(folder: Path) -> dict[str, int]:
    """Bytes of a peer's index folder by kind of file, chunk numbers folded
    (``3.codes.npy`` -> ``N.codes.npy``): shows, e.g., that xtr-warp-rs keeps its per-chunk
    codes and residuals beside the compacted copies it searches."""
    import re

    out: dict[str, int] = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            key = re.sub(r"^\d+\.", "N.", p.name)
            out[key] = out.get(key, 0) + p.stat().st_size
    return out
