"""Numba scans scoring one query against every document straight from codes.

Interim home of the code-MaxSim kernels the compressed index needs (the kernel
package's own versions replace these when they land). ``@njit`` functions only
take arrays and scalars, write into ``out`` and never validate; the wrappers in
:mod:`retrieval_prune.index.compressed` coerce and check. Each writes ``out[d]`` =
MaxSim of the query with document ``d`` and ``-inf`` for an empty or dead document.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from retrieval_prune.kernels._config import NJIT, NJIT_PARALLEL

__all__ = [
    "table_scan",
    "residual_scan",
    "sign_scan",
    "table_scan_serial",
    "residual_scan_serial",
    "sign_scan_serial",
    "half_scan",
    "half_scan_serial",
    "HALF_LUT",
    "topk_from_scores",
]


def _table_scan(codes, table, d_off, alive, out):  # pragma: no cover - compiled
    """``table float32 (K, n_q)``; score = Σ_i max_j table[codes[j], i]."""
    n_docs = d_off.shape[0] - 1
    nq = table.shape[1]
    for d in prange(n_docs):
        a, b = d_off[d], d_off[d + 1]
        if b == a or alive[d] == 0:
            out[d] = -np.inf
            continue
        best = np.full(nq, -np.inf, np.float32)
        for j in range(a, b):
            row = table[np.int64(codes[j])]
            for i in range(nq):
                if row[i] > best[i]:
                    best[i] = row[i]
        s = np.float32(0.0)
        for i in range(nq):
            s += best[i]
        out[d] = s


@njit(**NJIT)
def _block_max(q, D, n, best):  # pragma: no cover - compiled
    """``best[i] = max(best[i], max_j <q_i, D_j>)`` for ``j < n``; 4 query tokens per pass
    share each loaded document value (register blocking, scalar accumulators)."""
    nq, dim = q.shape
    i = 0
    while i + 4 <= nq:
        b0, b1, b2, b3 = best[i], best[i + 1], best[i + 2], best[i + 3]
        for j in range(n):
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for k in range(dim):
                x = D[j, k]
                s0 += q[i, k] * x
                s1 += q[i + 1, k] * x
                s2 += q[i + 2, k] * x
                s3 += q[i + 3, k] * x
            b0 = max(b0, s0)
            b1 = max(b1, s1)
            b2 = max(b2, s2)
            b3 = max(b3, s3)
        best[i], best[i + 1], best[i + 2], best[i + 3] = b0, b1, b2, b3
        i += 4
    while i < nq:
        b0 = best[i]
        for j in range(n):
            s0 = np.float32(0.0)
            for k in range(dim):
                s0 += q[i, k] * D[j, k]
            b0 = max(b0, s0)
        best[i] = b0
        i += 1


def _residual_scan(codes, packed, centroids, bucket_values, nbits, normalize, q, d_off, alive, out):  # pragma: no cover
    """Decode ``centroid[code] + bucket_values[bits]`` document by document (optionally
    L2 normalised) and take MaxSim with ``q float32 (n_q, dim)``."""
    n_docs = d_off.shape[0] - 1
    nq, dim = q.shape
    per = 8 // nbits
    mask = (1 << nbits) - 1
    nbytes = packed.shape[1]
    for d in prange(n_docs):
        a, b = d_off[d], d_off[d + 1]
        if b == a or alive[d] == 0:
            out[d] = -np.inf
            continue
        D = np.empty((b - a, dim), np.float32)
        for j in range(a, b):
            c = centroids[np.int64(codes[j])]
            row = D[j - a]
            for by in range(nbytes):
                v = np.int64(packed[j, by])
                for t in range(per):
                    k = by * per + t
                    row[k] = c[k] + bucket_values[(v >> (t * nbits)) & mask]
            if normalize:
                nrm = np.float32(0.0)
                for k in range(dim):
                    nrm += row[k] * row[k]
                nrm = np.float32(1.0) / max(np.sqrt(nrm), np.float32(1e-12))
                for k in range(dim):
                    row[k] *= nrm
        best = np.full(nq, -np.inf, np.float32)
        _block_max(q, D, b - a, best)
        s = np.float32(0.0)
        for i in range(nq):
            s += best[i]
        out[d] = s


def _sign_scan(bits, scale, q, d_off, alive, out):  # pragma: no cover - compiled
    """Sign bits (LSB-first ``packbits``) decoded to ``±scale``; MaxSim with ``q``."""
    n_docs = d_off.shape[0] - 1
    nq, dim = q.shape
    for d in prange(n_docs):
        a, b = d_off[d], d_off[d + 1]
        if b == a or alive[d] == 0:
            out[d] = -np.inf
            continue
        D = np.empty((b - a, dim), np.float32)
        for j in range(a, b):
            for k in range(dim):
                bit = (np.int64(bits[j, k >> 3]) >> (k & 7)) & 1
                D[j - a, k] = scale if bit else -scale
        best = np.full(nq, -np.inf, np.float32)
        _block_max(q, D, b - a, best)
        s = np.float32(0.0)
        for i in range(nq):
            s += best[i]
        out[d] = s


def _half_scan(halves, lut, q, d_off, alive, out):  # pragma: no cover - compiled
    """float16 vectors given as their uint16 bit patterns, widened through
    ``lut float32 (65536,)``; MaxSim with ``q`` (Numba has no float16 type)."""
    n_docs = d_off.shape[0] - 1
    nq, dim = q.shape
    for d in prange(n_docs):
        a, b = d_off[d], d_off[d + 1]
        if b == a or alive[d] == 0:
            out[d] = -np.inf
            continue
        D = np.empty((b - a, dim), np.float32)
        for j in range(a, b):
            for k in range(dim):
                D[j - a, k] = lut[np.int64(halves[j, k])]
        best = np.full(nq, -np.inf, np.float32)
        _block_max(q, D, b - a, best)
        s = np.float32(0.0)
        for i in range(nq):
            s += best[i]
        out[d] = s


#: float32 value of every float16 bit pattern
HALF_LUT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

table_scan = njit(**NJIT_PARALLEL)(_table_scan)
half_scan = njit(**NJIT_PARALLEL)(_half_scan)
half_scan_serial = njit(**NJIT)(_half_scan)
residual_scan = njit(**NJIT_PARALLEL)(_residual_scan)
sign_scan = njit(**NJIT_PARALLEL)(_sign_scan)
#: single-threaded twins: a parallel launch costs more than a small index's scan
table_scan_serial = njit(**NJIT)(_table_scan)
residual_scan_serial = njit(**NJIT)(_residual_scan)
sign_scan_serial = njit(**NJIT)(_sign_scan)


def topk_from_scores(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of per-document scores: best first, ties to the lower id, ``-inf`` -> -1."""
    n = scores.shape[0]
    if n > 4 * k:
        part = np.argpartition(-scores, k - 1)[:k]
        kth = scores[part].min()
        cand = np.flatnonzero(scores >= kth)  # every tie of the k-th score, ids ascending
    else:
        cand = np.arange(n)
    order = cand[np.argsort(-scores[cand], kind="stable")][:k]
    out_s = np.full(k, -np.inf, np.float32)
    out_i = np.full(k, -1, np.int64)
    out_s[: order.size] = scores[order]
    out_i[: order.size] = order
    out_i[~np.isfinite(out_s)] = -1
    out_s[out_i < 0] = -np.inf
    return out_s, out_i
