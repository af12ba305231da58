"""Validating Python wrappers around the Numba kernels in :mod:`retrieval_prune.kernels`.

Each wrapper coerces its inputs (``np.ascontiguousarray`` to the kernel dtype), checks
shapes and values with a ``ValueError`` that names the value and the fix, allocates the
outputs and calls the kernel. Kernels themselves never validate.

Documents are passed CSR-style, as in :class:`~retrieval_prune.types.MultiVectors`:
``d_emb float32 (n_tokens, dim)`` and ``d_offsets int64 (n_docs + 1,)``. Document
vectors are not scanned for NaN/Inf on every call (that would cost a full pass over the
index); validate them once when building (``MultiVectors.validate_finite``). Queries are
small and are checked here.

Examples
--------
>>> import numpy as np
>>> from retrieval_prune.kernels.ops import maxsim_search
>>> rng = np.random.default_rng(0)
>>> d = rng.standard_normal((10, 8)).astype(np.float32)
>>> d_off = np.array([0, 3, 3, 10])            # doc 1 is empty: never returned
>>> q = d[:2].copy(); q_off = np.array([0, 2])
>>> scores, ids = maxsim_search(q, q_off, d, d_off, k=3)
>>> ids.tolist()[0][2], float(scores[0, 2])
(-1, -inf)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numba
import numpy as np

from ..types import check_k
from . import binary as _bin
from . import codes as _codes_k
from . import maxsim as _ms
from . import simd as _simd
from .topk import topk_merge

__all__ = [
    "pack_queries",
    "maxsim_search",
    "maxsim_scores",
    "maxsim_rerank",
    "QuantizedTable",
    "code_table",
    "quantize_table",
    "maxsim_code_scores",
    "maxsim_code_search",
    "residual_decode",
    "maxsim_residual_rerank",
    "PlanarBits",
    "sign_bits",
    "to_planar",
    "maxsim_hamming",
    "BinaryLUT",
    "binary_lut",
    "maxsim_binary",
    "hamming_scan_128",
    "isa_variant",
    "current_isa",
]

_LANES = _ms.LANES
#: the kernel variant these wrappers run (``simd.ISA`` unless :func:`isa_variant` says)
_VARIANT = [_simd.ISA]


def current_isa() -> str:
    """The kernel variant the wrappers run now: ``"avx2"`` or ``"avx512"``."""
    return "avx2" if _VARIANT[0] == _simd.ISA_AVX2 else "avx512"


@contextmanager
def isa_variant(name: str) -> Iterator[None]:
    """Run the wrappers' kernels with another register-blocking variant inside a ``with``
    block (``"avx2"`` or ``"avx512"``; both are plain LLVM IR and give correct results on
    any x86-64 CPU, only their speed differs). For tests and benchmarks: the process-wide
    choice is ``RETRIEVAL_PRUNE_ISA``, read once at import. Not thread-safe."""
    codes = {"avx2": _simd.ISA_AVX2, "avx512": _simd.ISA_AVX512}
    if name not in codes:
        raise ValueError(f"isa variant {name!r}: use 'avx2' or 'avx512'")
    prev = _VARIANT[0]
    _VARIANT[0] = codes[name]
    try:
        yield
    finally:
        _VARIANT[0] = prev


# --------------------------------------------------------------------------------------
# coercion and validation helpers
# --------------------------------------------------------------------------------------
def _f32_matrix(x, name: str, dim: int | None = None, allow_empty: bool = False) -> np.ndarray:
    a = np.asarray(x)
    if allow_empty and a.ndim == 2 and a.shape[0] == 0:
        return np.ascontiguousarray(a, dtype=np.float32)  # no tokens at all: dim is moot
    if a.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (n_tokens, dim), got shape {a.shape}; "
            f"reshape one vector with x.reshape(1, -1)"
        )
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} dtype is {a.dtype}, expected a float array (float32)")
    if a.shape[1] == 0:
        raise ValueError(f"{name} has dim=0; vectors need at least one dimension")
    if dim is not None and dim > 0 and a.shape[1] != dim:
        raise ValueError(
            f"{name} has dim={a.shape[1]} but the documents have dim={dim}; "
            "encode queries and documents with the same model"
        )
    return np.ascontiguousarray(a, dtype=np.float32)


def _finite(a: np.ndarray, name: str) -> None:
    if a.size and not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a).reshape(a.shape[0], -1).all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or Inf (first at row {bad}); clean the input")


def _offsets(off, n_rows: int, name: str) -> np.ndarray:
    o = np.asarray(off)
    if o.ndim != 1 or o.shape[0] < 1:
        raise ValueError(f"{name} must be a 1-D array of n + 1 offsets, got shape {o.shape}")
    if not np.issubdtype(o.dtype, np.integer):
        raise TypeError(f"{name} dtype is {o.dtype}, expected int64 offsets")
    o = np.ascontiguousarray(o, dtype=np.int64)
    if o[0] != 0 or o[-1] != n_rows:
        raise ValueError(
            f"{name} must start at 0 and end at the number of rows ({n_rows}), "
            f"got {name}[0]={o[0]}, {name}[-1]={o[-1]}"
        )
    if o.shape[0] > 1 and (np.diff(o) < 0).any():
        bad = int(np.argmax(np.diff(o) < 0))
        raise ValueError(f"{name} must be non-decreasing; {name}[{bad}] > {name}[{bad + 1}]")
    return o


def _alive_mask(alive, n_docs: int) -> tuple[np.ndarray, bool]:
    if alive is None:
        return np.ones(1, np.uint8), False
    a = np.asarray(alive)
    if a.shape != (n_docs,):
        raise ValueError(
            f"alive must have shape (n_docs,) = ({n_docs},), got {a.shape}; "
            "pass one flag per document (True = searchable)"
        )
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a).view(np.uint8), True
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a), True
    if np.issubdtype(a.dtype, np.integer):
        return (a != 0).astype(np.uint8), True
    raise TypeError(f"alive dtype is {a.dtype}, expected bool or uint8")


def _aligned(a: np.ndarray, align: int = 64) -> np.ndarray:
    """C-contiguous copy of ``a`` whose data starts on an ``align``-byte boundary.

    Kernels load 64-byte rows (query vectors, lookup tables, planar words); numpy only
    guarantees 16-byte alignment, and a row that straddles two cache lines costs a split
    load -- measured 1.8x slower for the binary lookup table.
    """
    a = np.asarray(a)
    if a.flags.c_contiguous and a.ctypes.data % align == 0:
        return a
    out = _empty_aligned(a.shape, a.dtype, align)
    out[...] = a
    return out


def _empty_aligned(shape, dtype, align: int = 64) -> np.ndarray:
    """Uninitialised C-contiguous array whose data starts on an ``align``-byte boundary
    (large numpy allocations come from ``mmap`` 16 bytes past a page: never 64-aligned,
    so a kernel output made with ``np.empty`` would be copied by :func:`_aligned`)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + align, np.uint8)
    start = (-buf.ctypes.data) % align
    return buf[start : start + n].view(dtype).reshape(shape)


def _chunk_bounds(d_off: np.ndarray, n_chunks: int) -> np.ndarray:
    """Document boundaries of ``n_chunks`` chunks holding about equal token counts."""
    n_docs = d_off.shape[0] - 1
    n_chunks = max(1, min(n_chunks, n_docs))
    targets = np.linspace(0, d_off[-1], n_chunks + 1)
    b = np.searchsorted(d_off, targets, side="left").astype(np.int64)
    b[0], b[-1] = 0, n_docs
    b = np.maximum.accumulate(np.minimum(b, n_docs))
    # token balance can leave a chunk empty (long documents): that is harmless
    return b


def _n_chunks(n_docs: int) -> int:
    return min(max(n_docs, 1), 4 * numba.get_num_threads())


# --------------------------------------------------------------------------------------
# queries
# --------------------------------------------------------------------------------------
def pack_queries(q_emb, q_offsets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack CSR queries into the 16-lane layout of :mod:`retrieval_prune.kernels.maxsim`.

    Parameters
    ----------
    q_emb : float32 (n_qtok, dim)
    q_offsets : int64 (n_queries + 1,)

    Returns
    -------
    qp : float32 (n_vectors * dim * 16,)
        ``qp[v, d, l] = q[16 v + l, d]`` per query, zero-padded, flattened.
    qv_off : int64 (n_queries + 1,)
        First vector of every query (``ceil(n_tokens / 16)`` vectors each).
    q_len : int64 (n_queries,)
        Tokens per query.
    """
    q = _f32_matrix(q_emb, "q_emb")
    off = _offsets(q_offsets, q.shape[0], "q_offsets")
    return _pack(q, off)


def _pack(q: np.ndarray, off: np.ndarray):
    dim = q.shape[1]
    q_len = np.diff(off)
    nv = (q_len + _LANES - 1) // _LANES
    qv_off = np.zeros(off.shape[0], np.int64)
    np.cumsum(nv, out=qv_off[1:])
    qp = np.zeros((int(qv_off[-1]), _LANES, dim), np.float32)
    for i in range(q_len.shape[0]):
        n = int(q_len[i])
        if n:
            blk = qp[qv_off[i] : qv_off[i + 1]].reshape(-1, dim)
            blk[:n] = q[off[i] : off[i + 1]]
    qp = _aligned(qp.transpose(0, 2, 1)).reshape(-1)
    return qp, qv_off, q_len


def _docs(d_emb, d_offsets):
    d = _f32_matrix(d_emb, "d_emb", allow_empty=True)
    off = _offsets(d_offsets, d.shape[0], "d_offsets")
    return d, off


# --------------------------------------------------------------------------------------
# exact MaxSim
# --------------------------------------------------------------------------------------
def maxsim_search(q_emb, q_offsets, d_emb, d_offsets, k: int, alive=None):
    """Exact MaxSim top-k for a batch of queries over all documents.

    score(q, d) = sum_i max_j <q_i, d_j>. The scan is parallel over document chunks and
    keeps the top-k inside the scan (no full score matrix).

    Parameters
    ----------
    q_emb : float32 (n_qtok, dim)
        Token vectors of all queries, one after the other.
    q_offsets : int64 (n_queries + 1,)
        Query ``i`` owns rows ``q_offsets[i]:q_offsets[i+1]``.
    d_emb : float32 (n_tokens, dim)
    d_offsets : int64 (n_docs + 1,)
        Documents, CSR; an empty document is never returned.
    k : int >= 1
    alive : bool or uint8 (n_docs,), optional
        ``False``/0 excludes a (deleted) document.

    Returns
    -------
    scores : float32 (n_queries, k)
        Best first; ties are ordered by lower document id. Missing slots: ``-inf``.
    ids : int64 (n_queries, k)
        Document positions; missing slots ``-1``.
    """
    k = check_k(k)
    d, d_off = _docs(d_emb, d_offsets)
    q = _f32_matrix(q_emb, "q_emb", dim=d.shape[1])
    q_off = _offsets(q_offsets, q.shape[0], "q_offsets")
    _finite(q, "q_emb")
    n_docs = d_off.shape[0] - 1
    alive_u8, use_alive = _alive_mask(alive, n_docs)
    n_q = q_off.shape[0] - 1
    out_s = np.full((n_q, k), -np.inf, np.float32)
    out_i = np.full((n_q, k), -1, np.int64)
    if n_q == 0 or d.shape[0] == 0:
        return out_s, out_i  # no document has a token: nothing can match
    qp, qv_off, q_len = _pack(q, q_off)
    kk = min(k, n_docs)
    bounds = _chunk_bounds(d_off, _n_chunks(n_docs))
    nch = bounds.shape[0] - 1
    ts = np.empty((nch, n_q, kk), np.float32)
    ti = np.empty((nch, n_q, kk), np.int64)
    cnt = np.zeros((nch, n_q), np.int64)
    _ms.maxsim_search_kernel(
        qp,
        qv_off,
        q_len,
        d.shape[1],
        d.reshape(-1),
        d_off,
        alive_u8,
        use_alive,
        bounds,
        kk,
        ts,
        ti,
        cnt,
        _VARIANT[0],
    )
    topk_merge(ts, ti, cnt, _ms.NEG, out_s[:, :kk], out_i[:, :kk])
    out_s[out_i < 0] = -np.inf
    return out_s, out_i


def _single_query(q, dim: int):
    q = _f32_matrix(q, "q", dim=dim)
    _finite(q, "q")
    qp, qv_off, q_len = _pack(q, np.array([0, q.shape[0]], np.int64))
    return qp, int(qv_off[1]), int(q_len[0])


def maxsim_scores(q, d_emb, d_offsets) -> np.ndarray:
    """MaxSim of one query against every document.

    Parameters
    ----------
    q : float32 (n_qtok, dim)
    d_emb : float32 (n_tokens, dim)
    d_offsets : int64 (n_docs + 1,)

    Returns
    -------
    float32 (n_docs,)
        ``-inf`` for an empty document.
    """
    d, d_off = _docs(d_emb, d_offsets)
    qp, nv, nq = _single_query(q, d.shape[1])
    out = np.empty(d_off.shape[0] - 1, np.float32)
    if out.size and d.shape[0]:
        _ms.maxsim_scores_kernel(qp, nv, nq, d.shape[1], d.reshape(-1), d_off, out, _VARIANT[0])
    out[d_off[1:] == d_off[:-1]] = -np.inf
    return out


def _cand_ids(cand_ids, n_docs: int) -> np.ndarray:
    c = np.asarray(cand_ids)
    if c.ndim != 1:
        raise ValueError(f"cand_ids must be 1-D, got shape {c.shape}")
    if c.size and not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"cand_ids dtype is {c.dtype}, expected integer document ids")
    c = np.ascontiguousarray(c, dtype=np.int64)
    if c.size and (c.max() >= n_docs or c.min() < -1):
        bad = c[(c >= n_docs) | (c < -1)][0]
        raise ValueError(
            f"cand_ids holds {bad}, outside [0, n_docs={n_docs}); -1 (padding) is allowed"
        )
    return c


def maxsim_rerank(q, d_emb, d_offsets, cand_ids) -> np.ndarray:
    """Exact MaxSim of one query against candidate documents ``cand_ids``.

    Parameters
    ----------
    q : float32 (n_qtok, dim)
    d_emb, d_offsets : the documents (CSR)
    cand_ids : int (n_cand,)
        Document positions; ``-1`` (padding of a candidate list) is allowed.

    Returns
    -------
    float32 (n_cand,)
        Scores in the order of ``cand_ids``; ``-inf`` for ``-1`` or an empty document.
    """
    d, d_off = _docs(d_emb, d_offsets)
    qp, nv, nq = _single_query(q, d.shape[1])
    ids = _cand_ids(cand_ids, d_off.shape[0] - 1)
    out = np.empty(ids.shape[0], np.float32)
    if out.size and d.shape[0]:
        _ms.maxsim_rerank_kernel(
            qp, nv, nq, d.shape[1], d.reshape(-1), d_off, ids, out, _VARIANT[0]
        )
    out[(ids < 0) | (d_off[ids + 1] == d_off[ids])] = -np.inf
    return out


# --------------------------------------------------------------------------------------
# centroid codes
# --------------------------------------------------------------------------------------
class QuantizedTable(NamedTuple):
    """A code table quantised to uint8 per query: ``T ~= scale * t8 + lo``.

    ``t8`` uint8 ``(K, n_q)``; ``n_q`` real query tokens.
    """

    t8: np.ndarray
    scale: float
    lo: float


def code_table(centroids, q) -> np.ndarray:
    """Per-query table ``T = centroids @ q.T``: float32 ``(K, n_q)``.

    Parameters
    ----------
    centroids : float32 (K, dim)
    q : float32 (n_q, dim)
    """
    c = _f32_matrix(centroids, "centroids")
    qq = _f32_matrix(q, "q", dim=c.shape[1])
    _finite(qq, "q")
    return np.ascontiguousarray(c @ qq.T)


def quantize_table(table) -> QuantizedTable:
    """Quantise a float table to uint8 with one scale/offset per query (round to nearest).

    The score error of :func:`maxsim_code_scores` with the result is at most
    ``n_q * scale / 2``.
    """
    t = _f32_matrix(table, "table")
    _finite(t, "table")
    lo = float(t.min()) if t.size else 0.0
    hi = float(t.max()) if t.size else 0.0
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    t8 = np.clip(np.rint((t.astype(np.float64) - lo) / scale), 0, 255).astype(np.uint8)
    return QuantizedTable(t8, scale, lo)


def _codes(codes, offsets, n_centroids: int):
    c = np.asarray(codes)
    if c.ndim != 1:
        raise ValueError(f"codes must be 1-D (n_tokens,), got shape {c.shape}")
    if c.dtype not in (np.uint8, np.uint16):
        if not np.issubdtype(c.dtype, np.integer):
            raise TypeError(f"codes dtype is {c.dtype}, expected uint8 (K <= 256) or uint16")
        if c.size and (c.min() < 0 or c.max() > 65535):
            raise ValueError("codes must be in [0, 65535]; store them as uint8/uint16")
        c = c.astype(np.uint8 if n_centroids <= 256 else np.uint16)
    c = np.ascontiguousarray(c)
    limit = 256 if c.dtype == np.uint8 else 65536
    if n_centroids < limit and c.size and int(c.max()) >= n_centroids:
        raise ValueError(
            f"codes hold id {int(c.max())} but the table has only K={n_centroids} rows; "
            "use the codebook the codes were built with"
        )
    off = _offsets(offsets, c.shape[0], "offsets")
    return c, off


def _pad_lanes(t: np.ndarray, lanes: int) -> np.ndarray:
    """``t (K, n)`` with zero columns appended up to a whole number of ``lanes`` (aligned);
    ``t`` itself when it already has that width and is aligned (no copy)."""
    k, n = t.shape
    w = max(lanes, -(-n // lanes) * lanes)
    if w == n:
        return _aligned(t)
    out = _aligned(np.zeros((k, w), t.dtype))
    out[:, :n] = t
    return out


def _mark_missing(out: np.ndarray, ids: np.ndarray, use_ids: bool, off: np.ndarray) -> None:
    """Set ``-inf`` where the document is empty (or the candidate id is -1)."""
    if use_ids:
        out[(ids < 0) | (off[ids + 1] == off[ids])] = -np.inf
    else:
        out[off[1:] == off[:-1]] = -np.inf


def _ids_or_all(cand_ids, n_docs: int):
    if cand_ids is None:
        return np.zeros(1, np.int64), False, n_docs
    ids = _cand_ids(cand_ids, n_docs)
    return ids, True, ids.shape[0]


def maxsim_code_scores(table, codes, offsets, cand_ids=None) -> np.ndarray:
    """MaxSim of one query against centroid-id documents: ``sum_i max_j T[code_j, i]``.

    Parameters
    ----------
    table : float32 (K, n_q) or QuantizedTable
        From :func:`code_table` (optionally :func:`quantize_table`, ~2-3x faster).
    codes : uint8 (K <= 256) or uint16 (n_tokens,)
    offsets : int64 (n_docs + 1,)
    cand_ids : int (n_cand,), optional
        Score only these documents (``-1`` allowed as padding).

    Returns
    -------
    float32 (n_docs,) or (n_cand,)
        ``-inf`` for an empty document or a ``-1`` candidate.
    """
    quant = isinstance(table, QuantizedTable)
    t = table.t8 if quant else _f32_matrix(table, "table")
    if quant and (t.dtype != np.uint8 or t.ndim != 2):
        raise TypeError("QuantizedTable.t8 must be a uint8 (K, n_q) array")
    c, off = _codes(codes, offsets, t.shape[0])
    ids, use_ids, n = _ids_or_all(cand_ids, off.shape[0] - 1)
    out = np.empty(n, np.float32)
    if n == 0:
        return out
    n_q = t.shape[1]
    if quant:
        tp = _pad_lanes(np.ascontiguousarray(t), _codes_k.LANES_U8)
        _codes_k.code_u8_scores_kernel(
            tp.reshape(-1), tp.shape[1], float(table.scale), float(n_q * table.lo),
            c, off, ids, use_ids, out,
        )  # fmt: skip
    else:
        tp = _pad_lanes(t, _LANES)
        _codes_k.code_f32_scores_kernel(tp.reshape(-1), tp.shape[1], c, off, ids, use_ids, out)
    _mark_missing(out, ids, use_ids, off)
    return out


def maxsim_code_search(table, codes, offsets, k: int, alive=None):
    """Top-k documents of one query by code MaxSim (fused into the scan).

    Same inputs as :func:`maxsim_code_scores`; returns ``(scores float32 (k,),
    ids int64 (k,))`` best first, ties by lower id, padded with ``-inf`` / ``-1``.
    """
    k = check_k(k)
    quant = isinstance(table, QuantizedTable)
    t = table.t8 if quant else _f32_matrix(table, "table")
    c, off = _codes(codes, offsets, t.shape[0])
    n_docs = off.shape[0] - 1
    alive_u8, use_alive = _alive_mask(alive, n_docs)
    out_s = np.full((1, k), -np.inf, np.float32)
    out_i = np.full((1, k), -1, np.int64)
    if n_docs == 0:
        return out_s[0], out_i[0]
    kk = min(k, n_docs)
    bounds = _chunk_bounds(off, _n_chunks(n_docs))
    nch = bounds.shape[0] - 1
    ts = np.empty((nch, 1, kk), np.float32)
    ti = np.empty((nch, 1, kk), np.int64)
    cnt = np.zeros((nch, 1), np.int64)
    n_q = t.shape[1]
    if quant:
        t8 = _pad_lanes(np.ascontiguousarray(t), _codes_k.LANES_U8)
        t32, W, scale, offset = np.zeros(16, np.float32), t8.shape[1], table.scale, n_q * table.lo
    else:
        t32 = _pad_lanes(t, _LANES)
        t8, W, scale, offset = np.zeros(32, np.uint8), t32.shape[1], 1.0, 0.0
    _codes_k.code_search_kernel(
        t32.reshape(-1), t8.reshape(-1), quant, W, float(scale), float(offset), c, off,
        alive_u8, use_alive, bounds, kk, ts, ti, cnt,
    )  # fmt: skip
    topk_merge(ts, ti, cnt, _ms.NEG, out_s[:, :kk], out_i[:, :kk])
    out_s[out_i < 0] = -np.inf
    return out_s[0], out_i[0]


# --------------------------------------------------------------------------------------
# residuals
# --------------------------------------------------------------------------------------
def _residual_inputs(codes, packed, centroids, bucket_values, nbits):
    if nbits not in (1, 2, 4):
        raise ValueError(f"nbits={nbits!r}: residual bits must be 1, 2 or 4")
    cent = _f32_matrix(centroids, "centroids")
    dim = cent.shape[1]
    if dim * nbits % 8:
        raise ValueError(f"dim={dim} with nbits={nbits} does not fill whole bytes")
    bv = np.ascontiguousarray(np.asarray(bucket_values, dtype=np.float32).reshape(-1))
    if bv.shape[0] != 1 << nbits:
        raise ValueError(
            f"bucket_values has {bv.shape[0]} entries, nbits={nbits} needs {1 << nbits}"
        )
    _finite(bv.reshape(1, -1), "bucket_values")
    c = np.asarray(codes)
    if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"codes must be a 1-D integer array, got {c.dtype} {c.shape}")
    if c.size and (c.min() < 0 or c.max() >= cent.shape[0]):
        raise ValueError(
            f"codes hold ids outside [0, K={cent.shape[0]}); use the matching centroids"
        )
    c = np.ascontiguousarray(c)
    p = np.asarray(packed)
    nbytes = dim * nbits // 8
    if p.dtype != np.uint8 or p.shape != (c.shape[0], nbytes):
        raise ValueError(
            f"packed residuals must be uint8 ({c.shape[0]}, {nbytes}) for dim={dim}, "
            f"nbits={nbits}; got {p.dtype} {p.shape}"
        )
    per = 8 // nbits
    v = np.arange(256)[:, None] >> (np.arange(per)[None, :] * nbits) & ((1 << nbits) - 1)
    lut = np.ascontiguousarray(bv[v], dtype=np.float32)  # (256, per)
    return c, np.ascontiguousarray(p), cent, lut, per


def residual_decode(codes, packed, centroids, bucket_values, nbits: int, normalize=False):
    """Decode residual-coded tokens: ``centroids[code] + bucket_values[bits]`` per dim.

    Parameters
    ----------
    codes : int (n_tokens,)
    packed : uint8 (n_tokens, dim * nbits / 8), LSB-first bucket indices
    centroids : float32 (K, dim)
    bucket_values : float32 (2 ** nbits,)
    nbits : 1, 2 or 4
    normalize : L2-renormalise every decoded vector (colbert-ai does)

    Returns
    -------
    float32 (n_tokens, dim)
    """
    c, p, cent, lut, per = _residual_inputs(codes, packed, centroids, bucket_values, nbits)
    out = np.empty((c.shape[0], cent.shape[1]), np.float32)
    if c.size:
        _codes_k.residual_decode_kernel(c, p, cent, lut, per, bool(normalize), out.reshape(-1))
    return out


def maxsim_residual_rerank(
    q, codes, packed, offsets, centroids, bucket_values, nbits: int, cand_ids=None,
    normalize=False,
) -> np.ndarray:  # fmt: skip
    """Exact MaxSim of one query against residual-decoded candidate documents.

    Documents are decoded on the fly (never materialised). ``cand_ids=None`` scores all.

    Returns
    -------
    float32 (n_cand,) (or (n_docs,)); ``-inf`` for an empty document or id ``-1``.
    """
    c, p, cent, lut, per = _residual_inputs(codes, packed, centroids, bucket_values, nbits)
    off = _offsets(offsets, c.shape[0], "offsets")
    n_docs = off.shape[0] - 1
    ids = np.arange(n_docs, dtype=np.int64) if cand_ids is None else _cand_ids(cand_ids, n_docs)
    qp, nv, nq = _single_query(q, cent.shape[1])
    out = np.empty(ids.shape[0], np.float32)
    if out.size:
        max_len = int(np.diff(off).max()) if n_docs else 0
        _codes_k.residual_rerank_kernel(
            qp, nv, nq, c, p, cent.reshape(-1), np.zeros(0, np.float32), False, cent.shape[1],
            lut, per, bool(normalize), off, ids, max_len, out, _VARIANT[0],
        )  # fmt: skip
        out[(ids < 0) | (off[ids + 1] == off[ids])] = -np.inf
    return out


# --------------------------------------------------------------------------------------
# sign bits
# --------------------------------------------------------------------------------------
class PlanarBits(NamedTuple):
    """Planar sign bits for :func:`maxsim_hamming` (built by :func:`to_planar`).

    ``words`` uint64 ``(n_words, n_padded)``: word ``w`` of every (padded) token,
    contiguous; ``offsets`` int64 ``(n_docs + 1,)`` into the padded tokens (documents
    padded to a multiple of 8 tokens by repeating their last token); ``dim``.
    """

    words: np.ndarray
    offsets: np.ndarray
    dim: int


def _bits(bits, dim: int | None = None) -> np.ndarray:
    b = np.asarray(bits)
    if b.ndim != 2 or b.dtype != np.uint8:
        raise ValueError(
            f"bits must be uint8 (n_tokens, dim/8) from np.packbits(x > 0, axis=1, "
            f"bitorder='little'), got {b.dtype} {b.shape}"
        )
    if dim is not None and b.shape[1] != -(-dim // 8):
        raise ValueError(f"bits have {b.shape[1]} bytes per token; dim={dim} needs {-(-dim // 8)}")
    return np.ascontiguousarray(b)


def _words(bits: np.ndarray) -> np.ndarray:
    """uint8 (n, nbytes) -> little-endian uint64 words (n, ceil(nbytes / 8))."""
    n, nb = bits.shape
    nw = -(-nb // 8)
    if nb != nw * 8:
        bits = np.concatenate([bits, np.zeros((n, nw * 8 - nb), np.uint8)], axis=1)
    return np.ascontiguousarray(bits).view("<u8").astype(np.uint64, copy=False).reshape(n, nw)


def sign_bits(x) -> np.ndarray:
    """Canonical sign bits ``np.packbits(x > 0, axis=1, bitorder='little')``."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"x must be 2-D (n, dim), got shape {a.shape}")
    return np.packbits(a > 0, axis=1, bitorder="little")


def to_planar(bits, offsets, dim: int | None = None) -> PlanarBits:
    """Build the planar word layout of :mod:`retrieval_prune.kernels.binary` (once per index).

    Parameters
    ----------
    bits : uint8 (n_tokens, ceil(dim / 8)), canonical sign bits
    offsets : int64 (n_docs + 1,)
    dim : vector dimension (default ``8 * bits.shape[1]``)
    """
    b = _bits(bits, dim)
    dim = 8 * b.shape[1] if dim is None else int(dim)
    off = _offsets(offsets, b.shape[0], "offsets")
    lens = np.diff(off)
    plen = -(-lens // 8) * 8
    p_off = np.zeros_like(off)
    np.cumsum(plen, out=p_off[1:])
    words = _words(b)
    doc = np.repeat(np.arange(lens.shape[0]), plen)
    r = np.arange(int(p_off[-1])) - p_off[doc]
    src = off[doc] + np.minimum(r, lens[doc] - 1)
    planar = _aligned(words[src].T)
    return PlanarBits(planar, p_off, dim)


def maxsim_hamming(q, planar: PlanarBits, cand_ids=None) -> np.ndarray:
    """Bits-vs-bits MaxSim: ``sum_i max_j (dim - 2 * hamming(q_i, d_j))``.

    Parameters
    ----------
    q : float (n_qtok, dim) -- sign-binarised here -- or uint8 canonical bits
    planar : PlanarBits from :func:`to_planar`
    cand_ids : optional candidate documents (``-1`` allowed)

    Returns
    -------
    float32 (n_docs,) or (n_cand,); equals the +-1 dot-product MaxSim. ``-inf`` if empty.
    """
    if not isinstance(planar, PlanarBits):
        raise TypeError("planar must come from to_planar(bits, offsets)")
    dim = planar.dim
    qa = np.asarray(q)
    if qa.dtype == np.uint8:
        qb = _bits(qa, dim)
    else:
        qf = _f32_matrix(qa, "q", dim=dim)
        _finite(qf, "q")
        qb = sign_bits(qf)
    qw = _words(qb)
    nw = qw.shape[1]
    if planar.words.shape[0] != nw:
        raise ValueError(f"query has {nw} words per token, planar codes {planar.words.shape[0]}")
    p_off = planar.offsets
    ids, use_ids, n = _ids_or_all(cand_ids, p_off.shape[0] - 1)
    out = np.empty(n, np.float32)
    if n:
        P = _aligned(planar.words)
        if nw == 2 and _VARIANT[0] == _simd.ISA_AVX2 and _simd.HAS_AVX2:
            _bin.hamming_scores_avx2_kernel(
                qw.reshape(-1), qw.shape[0], dim, P.reshape(-1), P.shape[1], p_off, ids,
                use_ids, out,
            )  # fmt: skip
        else:
            _bin.hamming_scores_kernel(
                qw.reshape(-1), qw.shape[0], nw, dim, P.reshape(-1), P.shape[1], p_off, ids,
                use_ids, out,
            )  # fmt: skip
        _mark_missing(out, ids, use_ids, p_off)
    return out


class BinaryLUT(NamedTuple):
    """Per-query int16 lookup table of :func:`maxsim_binary` (see kernels/binary.py)."""

    lut: np.ndarray  # int16 (n_groups, n_bytes, 256, 32)
    scale: float
    n_q: int
    dim: int


def binary_lut(q) -> BinaryLUT:
    """Build the asymmetric scoring table of a float query (``dim`` from ``q``)."""
    qf = _f32_matrix(q, "q")
    _finite(qf, "q")
    n_q, dim = qf.shape
    nb = -(-dim // 8)
    lanes = _bin.LANES_I16
    ng = max(1, -(-n_q // lanes))
    qpad = np.zeros((ng * lanes, nb * 8), np.float64)
    qpad[:n_q, :dim] = qf
    # signs[v, t] = +1 if bit t of v is set else -1
    signs = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1) * 2.0 - 1.0
    # partial[b, v, i] = sum_t q[i, 8b + t] * signs[v, t]
    partial = np.einsum("vt,ibt->bvi", signs, qpad.reshape(-1, nb, 8))
    qmax = 32767 // nb
    amax = float(np.abs(partial).max())
    scale = amax / qmax if amax > 0 else 1.0
    lut16 = np.rint(partial / scale).astype(np.int16)  # (nb, 256, ng * lanes)
    lut = _aligned(lut16.reshape(nb, 256, ng, lanes).transpose(2, 0, 1, 3))
    return BinaryLUT(lut, scale, n_q, dim)


def maxsim_binary(q, bits, offsets, cand_ids=None) -> np.ndarray:
    """Asymmetric MaxSim: float query vs +-1 document bits.

    ``score = sum_i max_j sum_d q_id * (2 bit_jd - 1)``, computed with a per-query int16
    lookup table (:func:`binary_lut`); absolute error at most ``n_q * n_bytes * scale / 2``
    (``BinaryLUT.scale``), about 1e-4 of the score range at d = 128.

    Parameters
    ----------
    q : float32 (n_qtok, dim) or a prebuilt BinaryLUT
    bits : uint8 (n_tokens, ceil(dim / 8)), canonical sign bits
    offsets : int64 (n_docs + 1,)
    cand_ids : optional candidate documents (``-1`` allowed)

    Returns
    -------
    float32 (n_docs,) or (n_cand,); ``-inf`` for an empty document.
    """
    lut = q if isinstance(q, BinaryLUT) else binary_lut(q)
    b = _bits(bits, lut.dim)
    off = _offsets(offsets, b.shape[0], "offsets")
    ids, use_ids, n = _ids_or_all(cand_ids, off.shape[0] - 1)
    out = np.empty(n, np.float32)
    if n:
        ng, nb = lut.lut.shape[0], lut.lut.shape[1]
        _bin.binary_lut_scores_kernel(
            _aligned(lut.lut).reshape(-1), ng, nb, float(lut.scale), b, off, ids, use_ids, out
        )
        _mark_missing(out, ids, use_ids, off)
    return out


def _codes128(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 2 and a.dtype == np.uint8 and a.shape[1] == 16:
        a = np.ascontiguousarray(a).view("<u8").astype(np.uint64, copy=False)
    if a.ndim != 2 or a.shape[1] != 2 or a.dtype != np.uint64:
        raise ValueError(
            f"{name} must be uint64 (n, 2) or uint8 (n, 16) 128-bit codes, got {a.dtype} {a.shape}"
        )
    return np.ascontiguousarray(a)


def hamming_scan_128(q_codes, codes, k: int):
    """Top-k smallest Hamming distances of 128-bit query codes over 128-bit codes.

    Parameters
    ----------
    q_codes : uint64 (2,) / (n_q, 2) or uint8 (16,) / (n_q, 16)
    codes : uint64 (n, 2) or uint8 (n, 16) (little-endian words, as ``.view('<u8')``)
    k : int >= 1

    Returns
    -------
    distances : int32 (n_q, k), smallest first (ties: lower id); padding ``2**31 - 1``
    ids : int64 (n_q, k); padding ``-1``
    """
    k = check_k(k)
    qa = np.asarray(q_codes)
    if qa.ndim == 1:
        qa = qa.reshape(1, -1)
    qc = _codes128(qa, "q_codes")
    c = _codes128(codes, "codes")
    n = c.shape[0]
    n_q = qc.shape[0]
    out_s = np.full((n_q, k), np.iinfo(np.int64).min, np.int64)
    out_i = np.full((n_q, k), -1, np.int64)
    if n and n_q:
        kk = min(k, n)
        nch = max(1, min(4 * numba.get_num_threads(), n // _bin.SCAN_BLOCK))
        # chunk starts on 64-byte boundaries of the codes (4 codes), so that the kernel's
        # 8-code vector loads never straddle cache lines; a0 = first aligned code
        a0 = ((-c.ctypes.data) % 64) // 16 if c.ctypes.data % 16 == 0 else 0
        bounds = (np.arange(nch + 1, dtype=np.int64) * n) // nch
        bounds[1:-1] = np.minimum(a0 + (bounds[1:-1] - a0) // 8 * 8, n)
        bounds = np.maximum.accumulate(bounds)
        ts = np.empty((nch, n_q, kk), np.int64)
        ti = np.empty((nch, n_q, kk), np.int64)
        cnt = np.zeros((nch, n_q), np.int64)
        qpat = _aligned(np.tile(qc, (1, 4)))  # (n_q, 8): q0 q1 q0 q1 ...
        _bin.hamming_scan_kernel(
            c.reshape(-1), qpat.reshape(-1), bounds, a0, kk, ts, ti, cnt, _VARIANT[0]
        )
        topk_merge(ts, ti, cnt, np.iinfo(np.int64).min, out_s[:, :kk], out_i[:, :kk])
    dist = np.where(out_i >= 0, -out_s, np.iinfo(np.int32).max).astype(np.int32)
    return dist, out_i
