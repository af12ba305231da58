"""Slow, obviously-correct NumPy references for every kernel (float64 where it helps).

Each function mirrors one wrapper of :mod:`retrieval_prune.index.ops`; tests compare the
Numba kernels against these on small seeded data.
"""

from __future__ import annotations

import numpy as np


def maxsim(q: np.ndarray, d: np.ndarray) -> float:
    """sum_i max_j <q_i, d_j> in float64; -inf for an empty document."""
    if d.shape[0] == 0:
        return -np.inf
    if q.shape[0] == 0:
        return 0.0
    return float((q.astype(np.float64) @ d.astype(np.float64).T).max(axis=1).sum())


def maxsim_scores(q, d_emb, d_offsets) -> np.ndarray:
    n = len(d_offsets) - 1
    return np.array([maxsim(q, d_emb[d_offsets[i] : d_offsets[i + 1]]) for i in range(n)])


def topk(scores: np.ndarray, k: int, valid: np.ndarray | None = None):
    """Best-first top-k of one score row: higher score first, ties by lower id.

    Returns (scores float64 (k,), ids int64 (k,)) padded with -inf / -1.
    """
    n = scores.shape[0]
    ok = np.isfinite(scores) if valid is None else (valid & np.isfinite(scores))
    ids = np.flatnonzero(ok)
    order = np.lexsort((ids, -scores[ids]))[:k]
    sel = ids[order]
    out_s = np.full(k, -np.inf)
    out_i = np.full(k, -1, np.int64)
    out_s[: sel.size] = scores[sel]
    out_i[: sel.size] = sel
    assert n >= 0
    return out_s, out_i


def maxsim_search(q_emb, q_offsets, d_emb, d_offsets, k, alive=None):
    nq = len(q_offsets) - 1
    S = np.full((nq, k), -np.inf)
    ids = np.full((nq, k), -1, np.int64)
    valid = None if alive is None else np.asarray(alive).astype(bool)
    for i in range(nq):
        q = q_emb[q_offsets[i] : q_offsets[i + 1]]
        sc = maxsim_scores(q, d_emb, d_offsets)
        S[i], ids[i] = topk(sc, k, valid)
    return S, ids
