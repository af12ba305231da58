"""Numba scan for float16 storage, and top-k selection from per-document scores.

The code kernels (centroid table, residual, sign bits) live in
this package behind :mod:`retrieval_prune.kernels.ops`; float16 has no kernel
there (Numba has no float16 type), so it is scanned here through a
bit-pattern -> float32 table. ``@njit`` functions only take arrays and scalars, write
into ``out`` and never validate. ``out[d]`` = MaxSim of the query with document ``d``,
``-inf`` for an empty or dead document.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from retrieval_prune.kernels._config import NJIT, NJIT_PARALLEL

__all__ = [
    "half_scan",
    "HALF_LUT",
    "topk_from_scores",
]


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

half_scan = njit(**NJIT_PARALLEL)(_half_scan)


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
