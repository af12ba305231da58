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


def _residual_scan(codes, packed, centroids, bucket_values, nbits, normalize, q, d_off, alive, out):  # pragma: no cover
    """Decode ``centroid[code] + bucket_values[bits]`` token by token (optionally L2
    normalised) and take MaxSim with ``q float32 (n_q, dim)``."""
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
        best = np.full(nq, -np.inf, np.float32)
        buf = np.empty(dim, np.float32)
        for j in range(a, b):
            c = centroids[np.int64(codes[j])]
            for by in range(nbytes):
                v = np.int64(packed[j, by])
                for t in range(per):
                    k = by * per + t
                    buf[k] = c[k] + bucket_values[(v >> (t * nbits)) & mask]
            if normalize:
                nrm = np.float32(0.0)
                for k in range(dim):
                    nrm += buf[k] * buf[k]
                nrm = np.float32(1.0) / max(np.sqrt(nrm), np.float32(1e-12))
                for k in range(dim):
                    buf[k] *= nrm
            for i in range(nq):
                s = np.float32(0.0)
                for k in range(dim):
                    s += q[i, k] * buf[k]
                if s > best[i]:
                    best[i] = s
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
        best = np.full(nq, -np.inf, np.float32)
        buf = np.empty(dim, np.float32)
        for j in range(a, b):
            for k in range(dim):
                bit = (np.int64(bits[j, k >> 3]) >> (k & 7)) & 1
                buf[k] = scale if bit else -scale
            for i in range(nq):
                s = np.float32(0.0)
                for k in range(dim):
                    s += q[i, k] * buf[k]
                if s > best[i]:
                    best[i] = s
        s = np.float32(0.0)
        for i in range(nq):
            s += best[i]
        out[d] = s


table_scan = njit(**NJIT_PARALLEL)(_table_scan)
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
