#!/usr/bin/env python
"""A peer engine behind a pipe: builds an index from document vectors and answers searches.

Runs as a plain script under another interpreter (the peers' own environment, e.g.
``.venv-peers/bin/python``, whose torch 2.11 cannot live beside ours), so it imports
nothing of ``retrieval_prune``: the standard library, numpy and, when asked for, the
peer itself. The client side is :mod:`retrieval_prune.evaluation.peers`, which imports
the framing helpers below from this file (one implementation of the protocol).

Engines:

- ``exact``: brute-force MaxSim in numpy over float32 vectors (no peer needed; used by the
  tests to check the protocol against a reference, and a sanity row);
- ``fast-plaid``: LightOn's Rust PLAID (``fast_plaid.search.FastPlaid``);
- ``xtr-warp-rs``: the Rust WARP engine (``xtr_warp.XTRWarp``).

Protocol (no pickle anywhere): every message, either way, is one frame::

    b"RPW1" | uint64 little-endian header length | UTF-8 JSON header | array bytes...

The header's ``"arrays"`` lists ``[name, nbytes]`` pairs; the bytes that follow are
those arrays, in order, each a complete ``.npy`` file (``np.save``), read back with
``np.load(..., allow_pickle=False)`` (object arrays are refused on both sides).

Requests (``op``) and replies (``ok: true`` plus the fields named):

- ``ping``: nothing; a no-op that measures the pipe's round trip. Reply: ``pid``.
- ``info``: reply ``versions`` (python, numpy, torch, the peer) and ``threads``.
- ``build``: ``engine``, ``settings`` (``{"create": {...}, "search": {...}}``, the peer's
  own keyword arguments), ``index`` (folder, replaced), arrays ``embeddings``
  (float16/float32, ``[n_tokens, dim]``) and ``offsets`` (int64, ``[n_docs + 1]``).
  Reply: ``build_s``, ``index_bytes``, ``meta`` (what the peer chose: partitions, ...).
  The engine stays open for searching.
- ``open``: ``engine``, ``settings``, ``index``: load a built index. Reply: ``open_s``,
  ``index_bytes``, ``meta``.
- ``search``: ``k``, array ``queries`` (float32 ``[n_query_tokens, dim]``, one query).
  Reply: ``search_s`` (the worker's own clock around the engine's search call only),
  ``search_settings`` (what the engine searched with) and arrays ``ids`` (int64 document
  positions, best first) and ``scores`` (float32).
- ``quit``: reply, then exit 0.

A failed request is answered ``{"ok": false, "error": "Type: message", "traceback":
...}`` and the worker goes on serving; only a broken pipe or ``quit`` ends it. The
worker's own stdout is moved to stderr at start, so a library that prints cannot corrupt
the protocol stream.

Threads: ``--threads N`` (default 1) caps OpenMP, MKL, OpenBLAS, Rayon (the Rust peers'
pool) and torch (intra- and inter-op) in this process; set the variables in the
environment before starting it as well, since numpy reads some of them at import.

Run (normally started by the client)::

    .venv-peers/bin/python retrieval_prune/evaluation/peer_worker.py --threads 1
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAGIC = b"RPW1"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "RAYON_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
ENGINES = ("exact", "fast-plaid", "xtr-warp-rs")
#: largest header accepted (a header carries settings and metadata, never vectors)
MAX_HEADER = 16 << 20


class ProtocolError(RuntimeError):
    """A frame that does not follow the protocol (bad magic, truncated): the stream is out of
    step and nothing after it can be read."""


class BadArray(ValueError):
    """A frame whose array could not be read (an object array, which would need pickle, or
    a malformed one); the frame was read to its end, so the stream is still in step."""


# -- framing (shared with the client) ---------------------------------------------------
def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = stream.read(n - got)
        if not b:
            raise EOFError(f"stream closed after {got} of {n} bytes")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _npy_header(arr: np.ndarray) -> bytes:
    """The ``.npy`` header ``np.save`` writes before ``arr``'s bytes (format 1.0)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as a complete ``.npy`` file (what ``np.save(..., allow_pickle=False)``
    writes); object arrays are refused."""
    arr = _plain(arr)
    return _npy_header(arr) + arr.tobytes()


def _plain(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.hasobject:
        raise TypeError(f"arrays of dtype {arr.dtype} would need pickle; send numbers only")
    return arr


class _Bounded:
    """A read-only view of the next ``n`` bytes of a stream (numpy reads an array from it
    in 256 KiB pieces, so a large array is never held twice)."""

    def __init__(self, stream: BinaryIO, n: int):
        self.stream, self.left = stream, n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        b = _read_exact(self.stream, size) if size else b""
        self.left -= len(b)
        return b


def write_frame(stream: BinaryIO, header: dict[str, Any],
                arrays: dict[str, np.ndarray] | None = None) -> None:
    """Write one frame: header (JSON) then each array as ``.npy`` bytes (streamed from the
    array's memory, no copy of a contiguous array); flush."""
    parts = []
    for name, a in (arrays or {}).items():
        a = _plain(a)
        parts.append((name, _npy_header(a), a))
    head = dict(header)
    head["arrays"] = [[name, len(h) + a.nbytes] for name, h, a in parts]
    hb = json.dumps(head).encode("utf-8")
    stream.write(MAGIC + struct.pack("<Q", len(hb)) + hb)
    for _, h, a in parts:
        stream.write(h)
        if a.nbytes:
            stream.write(memoryview(a.reshape(-1)).cast("B"))
    stream.flush()


def read_frame(stream: BinaryIO) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one frame; returns ``(header, arrays)``. EOFError at a clean end of stream.

    Each array is read with numpy's own ``.npy`` reader (``np.lib.format.read_array``,
    what ``np.load`` calls) with ``allow_pickle=False``: an object array is refused."""
    pre = stream.read(len(MAGIC))
    if not pre:
        raise EOFError("stream closed")
    if len(pre) < len(MAGIC):
        pre += _read_exact(stream, len(MAGIC) - len(pre))
    if pre != MAGIC:
        raise ProtocolError(f"bad frame magic {pre!r} (expected {MAGIC!r})")
    (n,) = struct.unpack("<Q", _read_exact(stream, 8))
    if n > MAX_HEADER:
        raise ProtocolError(f"header of {n} bytes is over the {MAX_HEADER} limit")
    header = json.loads(_read_exact(stream, n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ProtocolError(f"header is a {type(header).__name__}, not a JSON object")
    arrays, bad = {}, None
    for name, nbytes in header.pop("arrays", []):
        part = _Bounded(stream, int(nbytes))
        if bad is None:
            try:
                arrays[str(name)] = np.lib.format.read_array(part, allow_pickle=False)
                if part.left:
                    bad = f"array {name!r}: {part.left} bytes left after the array"
            except ValueError as exc:  # "Object arrays cannot be loaded when allow_pickle=False"
                bad = f"array {name!r}: {exc}"
        part.read()  # the rest of this array (after an error: all of it), to stay in step
    if bad is not None:
        raise BadArray(bad)
    return header, arrays


# -- engines ----------------------------------------------------------------------------
def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _split_docs(embeddings: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [embeddings[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _check_docs(embeddings: np.ndarray, offsets: np.ndarray) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [n_tokens, dim], got shape {embeddings.shape}")
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 \
            or offsets[-1] != len(embeddings) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must be int64 [n_docs + 1], 0 .. {len(embeddings)}, "
                         f"non-decreasing; got shape {offsets.shape}")


class ExactEngine:
    """Brute-force MaxSim in numpy: score(q, d) = sum_i max_j <q_i, d_j>; empty documents
    never match. The index folder holds the float32 vectors as ``.npy``."""

    name = "exact"

    def __init__(self, settings: dict[str, Any], folder: Path):
        self.folder = folder

    def build(self, embeddings: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
        _check_docs(embeddings, offsets)
        np.save(self.folder / "embeddings.npy", embeddings.astype(np.float32), allow_pickle=False)
        np.save(self.folder / "offsets.npy", offsets.astype(np.int64), allow_pickle=False)
        return self.open()

    def open(self) -> dict[str, Any]:
        self.emb = np.load(self.folder / "embeddings.npy", allow_pickle=False)
        self.off = np.load(self.folder / "offsets.npy", allow_pickle=False)
        lens = np.diff(self.off)
        self.nonempty = np.flatnonzero(lens > 0)
        return {"num_embeddings": int(len(self.emb)), "num_documents": int(len(lens))}

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict]:
        if len(self.nonempty) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), {}
        sim = self.emb @ q.T  # [n_tokens, n_q]
        per_doc = np.maximum.reduceat(sim, self.off[self.nonempty], axis=0)  # [n_nonempty, n_q]
        scores = per_doc.sum(axis=1)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((self.nonempty[top], -scores[top]))]  # score desc, then position
        return self.nonempty[top].astype(np.int64), scores[top].astype(np.float32), {}


def _torch_docs(torch: Any, embeddings: np.ndarray, offsets: np.ndarray) -> list:
    """The documents as the Rust peers take them: one contiguous tensor each (checked)."""
    _check_docs(embeddings, offsets)
    return [torch.from_numpy(np.ascontiguousarray(d)) for d in _split_docs(embeddings, offsets)]


class FastPlaidEngine:
    """``fast_plaid.search.FastPlaid`` on CPU: ``create(documents_embeddings=[...],
    **settings["create"])`` and ``search(queries, top_k=k, **settings["search"])``."""

    name = "fast-plaid"

    def __init__(self, settings: dict[str, Any], folder: Path):
        import torch
        from fast_plaid import search as fp_search

        self.torch, self.fp = torch, fp_search
        self.create_kw = dict(settings.get("create") or {})
        self.search_kw = dict(settings.get("search") or {})
        # {"10": {...}, "100": {...}}: keyword arguments by search depth (the largest listed
        # depth >= k; above them all, the largest)
        self.by_k = {int(d): dict(kw) for d, kw in (self.search_kw.pop("by_k", None) or {}).items()}
        self.folder = folder
        self.index = None

    def build(self, embeddings: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
        docs = _torch_docs(self.torch, embeddings, offsets)
        self.index = self.fp.FastPlaid(index=str(self.folder), device="cpu")
        self.index.create(documents_embeddings=docs, **self.create_kw)
        return self._meta()

    def open(self) -> dict[str, Any]:
        self.index = self.fp.FastPlaid(index=str(self.folder), device="cpu")
        return self._meta()

    def _meta(self) -> dict[str, Any]:
        p = self.folder / "metadata.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict]:
        kw = {"show_progress": False, "n_processes": 1, **self.search_kw}
        depth = {}
        if self.by_k:
            depth = self.by_k[min((d for d in self.by_k if d >= k), default=max(self.by_k))]
            kw.update(depth)
        res = self.index.search(queries_embeddings=self.torch.from_numpy(q).unsqueeze(0),
                                top_k=k, **kw)[0]
        ids = np.fromiter((p for p, _ in res), np.int64, len(res))
        scores = np.fromiter((s for _, s in res), np.float32, len(res))
        return ids, scores, dict(depth)

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


class XtrWarpEngine:
    """``xtr_warp.XTRWarp`` on CPU: ``create(list, device="cpu", **settings["create"])``,
    ``load(device="cpu", **settings["load"])`` and ``search(queries, top_k=k,
    num_threads=1, **settings["search"])``; hyper-parameters not given are the ones the
    library derives from the index's density (``optimize_hyperparams``), reported."""

    name = "xtr-warp-rs"

    def __init__(self, settings: dict[str, Any], folder: Path):
        import torch
        import xtr_warp

        self.torch, self.xw = torch, xtr_warp
        self.create_kw = dict(settings.get("create") or {})
        self.load_kw = dict(settings.get("load") or {})
        self.search_kw = dict(settings.get("search") or {})
        self.folder = folder
        self.index = None

    def build(self, embeddings: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
        docs = _torch_docs(self.torch, embeddings, offsets)
        w = self.xw.XTRWarp(index=str(self.folder))
        w.create(docs, device="cpu", show_progress=False, **self.create_kw)
        w.free()
        return self.open()

    def open(self) -> dict[str, Any]:
        self.index = self.xw.XTRWarp(index=str(self.folder))
        self.index.load(device="cpu", **self.load_kw)
        p = self.folder / "metadata.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict]:
        t = self.torch.from_numpy(q).unsqueeze(0)
        kw = {"num_threads": 1, "show_progress": False, **self.search_kw}
        res = self.index.search(t, top_k=k, **kw)[0]
        ids = np.fromiter((p for p, _ in res), np.int64, len(res))
        scores = np.fromiter((s for _, s in res), np.float32, len(res))
        chosen = self.index.optimize_hyperparams(k, t)
        used = dict(zip(("bound", "nprobe", "centroid_score_threshold", "max_candidates",
                         "t_prime"), chosen or (), strict=False))
        used.update({key: v for key, v in self.search_kw.items() if key in used})
        return ids, scores, used

    def close(self) -> None:
        if self.index is not None:
            self.index.free()


_ENGINE_CLASSES = {c.name: c for c in (ExactEngine, FastPlaidEngine, XtrWarpEngine)}


def _versions(engine: str | None) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0], "numpy": np.__version__}
    for dist in ("torch", "fast-plaid", "xtr-warp-rs"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    if engine:
        out["engine"] = engine
    return out


# -- the server loop --------------------------------------------------------------------
class Worker:
    def __init__(self, threads: int):
        self.threads = threads
        self.engine: Any = None
        self.engine_name: str | None = None
        self._torch_limited = False

    def _limit_torch(self) -> None:
        if self._torch_limited or "torch" not in sys.modules:
            return
        import torch

        torch.set_num_threads(self.threads)
        try:
            torch.set_num_interop_threads(self.threads)
        except RuntimeError:  # already set, or parallel work has started
            pass
        self._torch_limited = True

    def _make(self, req: dict[str, Any]) -> Path:
        name = req.get("engine")
        if name not in _ENGINE_CLASSES:
            raise ValueError(f"engine={name!r} is not one of {list(_ENGINE_CLASSES)}")
        folder = req.get("index")
        if not folder:
            raise ValueError("the request needs 'index' (a folder)")
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
        self.engine = None
        settings = req.get("settings") or {}
        if not isinstance(settings, dict):
            raise TypeError(f"settings must be a JSON object, got {type(settings).__name__}")
        eng = _ENGINE_CLASSES[name](settings, Path(folder))
        self._limit_torch()
        self.engine, self.engine_name = eng, name
        return Path(folder)

    def handle(self, req: dict[str, Any], arrays: dict[str, np.ndarray]
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        op = req.get("op")
        if op == "ping":
            return {"pid": os.getpid()}, {}
        if op == "info":
            return {"versions": _versions(self.engine_name), "threads": self.threads}, {}
        if op == "build":
            for key in ("embeddings", "offsets"):
                if key not in arrays:
                    raise ValueError(f"build needs the array {key!r}")
            folder = Path(req.get("index") or "")
            if req.get("index") and folder.exists():
                shutil.rmtree(folder)
            folder = self._make(req)
            folder.mkdir(parents=True, exist_ok=True)
            emb = arrays["embeddings"]
            if emb.dtype not in (np.float16, np.float32):
                raise TypeError(f"embeddings dtype {emb.dtype}: send float16 or float32")
            t0 = time.perf_counter()
            meta = self.engine.build(emb, np.asarray(arrays["offsets"], np.int64))
            build_s = time.perf_counter() - t0
            return {"build_s": build_s, "index_bytes": _dir_bytes(folder), "meta": meta}, {}
        if op == "open":
            folder = self._make(req)
            if not folder.is_dir():
                raise FileNotFoundError(f"index folder {folder} does not exist; build it first")
            t0 = time.perf_counter()
            meta = self.engine.open()
            return {"open_s": time.perf_counter() - t0, "index_bytes": _dir_bytes(folder),
                    "meta": meta}, {}
        if op == "search":
            if self.engine is None:
                raise RuntimeError("no index: send 'build' or 'open' first")
            k = req.get("k")
            if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
                raise ValueError(f"k={k!r} must be an int > 0")
            q = arrays.get("queries")
            if q is None or q.ndim != 2:
                raise ValueError("search needs the array 'queries' of shape [n_tokens, dim], got "
                                 f"{None if q is None else q.shape}")
            q = np.ascontiguousarray(q, dtype=np.float32)
            t0 = time.perf_counter()
            ids, scores, used = self.engine.search(q, k)
            search_s = time.perf_counter() - t0
            return {"search_s": search_s, "search_settings": used}, \
                {"ids": ids, "scores": scores}
        if op == "crash":  # tests: die without a reply, as a segfaulting peer would
            os._exit(int(req.get("code", 3)))
        raise ValueError(f"unknown op {op!r} (ping, info, build, open, search, quit)")

    def serve(self, rd: BinaryIO, wr: BinaryIO) -> int:
        while True:
            try:
                req, arrays = read_frame(rd)
            except EOFError:
                return 0
            except BadArray as exc:  # the frame was read whole: refuse it and go on
                write_frame(wr, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                continue
            except (ProtocolError, ValueError) as exc:
                # the stream is out of step: say so, then stop (nothing after it can be trusted)
                write_frame(wr, {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "fatal": True})
                return 2
            if req.get("op") == "quit":
                write_frame(wr, {"ok": True})
                return 0
            try:
                reply, out = self.handle(req, arrays)
                write_frame(wr, {"ok": True, **reply}, out)
            except Exception as exc:  # noqa: BLE001 - every error travels back as a message
                write_frame(wr, {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=8)})


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="peer engine worker (see the module docstring)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for var in THREAD_VARS:
        os.environ.setdefault(var, str(args.threads))
    # the protocol owns the real stdout; anything printed by Python or a library goes to stderr
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return Worker(args.threads).serve(sys.stdin.buffer, proto_out)


if __name__ == "__main__":
    sys.exit(main())
