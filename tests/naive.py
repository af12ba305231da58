"""Slow, obviously-correct NumPy references for every kernel (float64 where it helps).

Each function mirrors one wrapper of :mod:`retrieval_prune.kernels.ops`; tests compare the
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


# ---- centroid codes -----------------------------------------------------------------
def code_scores(table, codes, offsets) -> np.ndarray:
    """sum_i max_j table[codes_j, i] per document (float64); -inf if empty."""
    t = np.asarray(table, np.float64)
    out = np.full(len(offsets) - 1, -np.inf)
    for d in range(len(offsets) - 1):
        c = codes[offsets[d] : offsets[d + 1]]
        if c.size:
            out[d] = t[c.astype(np.int64)].max(axis=0).sum()
    return out


def code_scores_u8(t8, scale, lo, codes, offsets) -> np.ndarray:
    """Dequantised score of the uint8 table: scale * sum_i max_j t8 + n_q * lo."""
    raw = code_scores(t8.astype(np.float64), codes, offsets)
    return np.where(np.isfinite(raw), scale * raw + t8.shape[1] * lo, -np.inf)


# ---- residuals ------------------------------------------------------------------------
def residual_decode(codes, packed, centroids, bucket_values, nbits, normalize=False):
    """Unpack LSB-first nbits indices dimension by dimension and add the centroid."""
    n, nbytes = packed.shape
    dim = centroids.shape[1]
    per = 8 // nbits
    out = np.zeros((n, dim), np.float64)
    for i in range(n):
        for d in range(dim):
            byte = int(packed[i, d // per])
            idx = (byte >> ((d % per) * nbits)) & ((1 << nbits) - 1)
            out[i, d] = float(centroids[codes[i], d]) + float(bucket_values[idx])
        if normalize:
            nrm = np.linalg.norm(out[i])
            if nrm > 0:
                out[i] /= nrm
    return out


# ---- sign bits ------------------------------------------------------------------------
def bits_to_signs(bits, dim) -> np.ndarray:
    """Canonical LSB-first sign bits -> +-1 float64 (n, dim)."""
    b = np.unpackbits(bits, axis=1, count=dim, bitorder="little")
    return b.astype(np.float64) * 2.0 - 1.0


def maxsim_binary(q, bits, offsets) -> np.ndarray:
    """Exact asymmetric MaxSim: float query vs +-1 documents."""
    s = bits_to_signs(bits, q.shape[1])
    return maxsim_scores(q.astype(np.float64), s, offsets)


def maxsim_hamming(q, bits, offsets, dim) -> np.ndarray:
    """sum_i max_j (dim - 2 hamming) == +-1 dot-product MaxSim of the sign-binarised query."""
    qs = bits_to_signs(np.packbits(q > 0, axis=1, bitorder="little"), dim)
    return maxsim_scores(qs, bits_to_signs(bits, dim), offsets)


def hamming_topk(q_codes_u8, codes_u8, k):
    """Smallest-first Hamming top-k of uint8 (n_q, 16) queries over uint8 (n, 16) codes."""
    qb = np.unpackbits(q_codes_u8, axis=1)
    cb = np.unpackbits(codes_u8, axis=1)
    nq, n = qb.shape[0], cb.shape[0]
    dist = np.full((nq, k), np.iinfo(np.int32).max, np.int64)
    ids = np.full((nq, k), -1, np.int64)
    for i in range(nq):
        d = (qb[i][None, :] != cb).sum(axis=1)
        order = np.lexsort((np.arange(n), d))[:k]
        dist[i, : order.size] = d[order]
        ids[i, : order.size] = order
    return dist, ids


def assert_dot_close(actual: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``actual`` equals ``a @ b.T`` within float32 rounding of *any* summation order.

    The bound is derived from the operands, not fixed: a float32 dot product of length d
    summed in any order (with or without FMA, 8 or 16 lanes) is within
    ``d * eps32 * sum(|a_i * b_i|)`` of the exact value (Higham's gamma_d bound), so the
    test passes on every CPU while still catching a wrong element or index.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    exact = a64 @ b64.T
    eps = float(np.finfo(np.float32).eps)
    d = a64.shape[1]
    bound = (d + 2) * eps * (np.abs(a64) @ np.abs(b64).T) + np.finfo(np.float32).tiny
    err = np.abs(np.asarray(actual, np.float64) - exact)
    bad = err > bound
    if bad.any():
        i = tuple(int(x) for x in np.argwhere(bad)[0])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.size} entries off by more than the rounding bound; "
            f"first at {i}: got {actual[i]!r}, exact {exact[i]!r}, bound {bound[i]:.3g}"
        )


# ---- rounding bounds derived from the operands -----------------------------------------
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 = 2u (u: float32 unit roundoff)
TINY32 = float(np.finfo(np.float32).tiny)


def sum_bound(terms: np.ndarray, axis=-1) -> np.ndarray:
    """Rounding bound of a float32 sum of ``terms`` in any order (gamma_n, doubled: n terms
    plus the final float32 store): ``(n + 2) * eps32 * sum |terms|``."""
    t = np.abs(np.asarray(terms, np.float64))
    return (t.shape[axis] + 2) * EPS32 * t.sum(axis=axis)


def _segment_max(x: np.ndarray, offsets) -> np.ndarray:
    """Row-wise max of ``x (n_q, n_tokens)`` over each document's columns: (n_q, n_docs);
    -inf for an empty document."""
    off = np.asarray(offsets, np.int64)
    out = np.full((x.shape[0], len(off) - 1), -np.inf)
    full = np.flatnonzero(np.diff(off) > 0)
    if full.size and x.shape[0]:
        out[:, full] = np.maximum.reduceat(x, off[full], axis=1)
    return out


def maxsim_bound(q, d_emb, d_offsets, coef=None) -> np.ndarray:
    """Per-document bound on |float32 MaxSim - exact MaxSim| for any summation order.

    Each dot product <q_i, d_j> is within ``e_ij = coef * (|q_i| . |d_j|)`` of exact
    (``coef = (dim + 2) * eps32``: Higham's gamma_dim, doubled, as in
    :func:`assert_dot_close`); max over j is exact, so the max of the computed entries is
    within ``max_j e_ij``; the float32 sum over the n_q query tokens adds
    ``(n_q + 2) * eps32 * sum_i |m_i|``. Empty documents get 0 (-inf on both sides).
    """
    q64, d64 = np.asarray(q, np.float64), np.asarray(d_emb, np.float64)
    coef = (q64.shape[1] + 2) * EPS32 if coef is None else coef
    n_q = q64.shape[0]
    if n_q == 0:
        return np.zeros(len(d_offsets) - 1)
    # (n_q, n_docs); 0 for an empty document
    err = np.nan_to_num(_segment_max(coef * (np.abs(q64) @ np.abs(d64).T), d_offsets), neginf=0.0)
    m = np.abs(np.nan_to_num(_segment_max(q64 @ d64.T, d_offsets), neginf=0.0)) + err
    return err.sum(axis=0) + (n_q + 2) * EPS32 * m.sum(axis=0) + TINY32


def code_sum_bound(table, codes, offsets) -> np.ndarray:
    """Per-document rounding bound of a code-table MaxSim on a given float32 ``table (K,
    n_q)``: max is exact, only the float32 sum of the n_q maxima rounds (:func:`sum_bound`)."""
    t = np.asarray(table, np.float64)
    m = np.nan_to_num(_segment_max(t[np.asarray(codes, np.int64)].T, offsets), neginf=0.0)
    return (t.shape[1] + 2) * EPS32 * np.abs(m).sum(axis=0) + TINY32


def assert_within(actual, exact, bound, what="value") -> None:
    """|actual - exact| <= bound elementwise (infinities must match), with a useful message."""
    actual = np.asarray(actual, np.float64)
    exact = np.broadcast_to(np.asarray(exact, np.float64), actual.shape)
    bound = np.broadcast_to(np.asarray(bound, np.float64), actual.shape)
    assert np.array_equal(np.isinf(actual), np.isinf(exact)), f"{what}: infinities differ"
    fin = np.isfinite(exact)
    err = np.abs(actual[fin] - exact[fin])
    bad = err > bound[fin]
    if bad.any():
        j = int(np.argmax(bad))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} entries off by more than the rounding "
            f"bound; first: got {actual[fin][j]!r}, exact {exact[fin][j]!r}, "
            f"bound {bound[fin][j]:.3g}"
        )


def assert_maxsim_close(actual, q, d_emb, d_offsets, coef=None) -> None:
    """``actual`` (one score per document) equals float64 MaxSim within :func:`maxsim_bound`."""
    assert_within(actual, maxsim_scores(q, d_emb, d_offsets), maxsim_bound(q, d_emb, d_offsets, coef), "MaxSim")


def assert_topk_close(scores, ids, exact, bound, valid=None) -> None:
    """A top-k row (best first) is right up to rounding: every returned score is within
    ``bound[id]`` of ``exact[id]``, ids are distinct and valid, the row is full (up to the
    number of valid documents), and no document left out can beat the last one kept by
    more than the rounding bounds allow (a near-tie may go either way; nothing else may).
    """
    scores, ids = np.asarray(scores, np.float64), np.asarray(ids)
    exact, bound = np.asarray(exact, np.float64), np.asarray(bound, np.float64)
    ok = np.isfinite(exact) if valid is None else (np.asarray(valid, bool) & np.isfinite(exact))
    k = scores.shape[0]
    n = min(k, int(ok.sum()))
    kept = ids[:n]
    assert (ids[n:] == -1).all() and np.isneginf(scores[n:]).all(), ids
    assert (kept >= 0).all() and len(set(kept.tolist())) == n, ids
    assert ok[kept].all(), f"invalid document returned: {ids}"
    assert np.all(np.diff(scores[:n]) <= 0), f"not best first: {scores}"
    assert_within(scores[:n], exact[kept], bound[kept], "top-k score")
    if n:
        out = np.ones(exact.shape[0], bool)
        out[kept] = False
        out &= ok
        # a left-out document x was computed <= the last kept score s_last, so
        # exact[x] - bound[x] <= s_last
        worst = exact[out] - bound[out]
        assert np.all(worst <= scores[n - 1]), "a better document was left out"
