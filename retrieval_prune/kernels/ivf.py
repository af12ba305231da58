"""Inverted-file kernels of staged search: list building, candidate gathering, selection.

Inverted file
-------------
Over centroid ids ``codes (n_tokens,)`` (uint8/uint16) and document offsets ``d_off``,
list ``c`` holds, in increasing order and without repeats, the documents that own at
least one token coded ``c``: ``docs[list_off[c]:list_off[c+1]]`` (int32). Two passes over
the codes (count, fill) with a per-centroid "last document seen" marker: O(n_tokens),
no sort, memory ``O(K)`` besides the output.

Candidates
----------
The union of the lists of a query's probed centroids, deleted documents skipped. A
per-search ``mark (n_docs,)`` array with a stamp per query avoids clearing between
queries; the wrapper sorts the gathered ids (deterministic order, ties go to the lower
position in every later stage).

Probes run serially: a query has a few dozen tokens, too little work for a thread team
(which on a shared machine costs more than it saves).

Hamming probe
-------------
Top-``n`` nearest centroids of every query token by Hamming distance between sign bits
(``uint64`` words), the popcount through LLVM ``ctpop`` (:func:`.simd.popcount`).
"""

import numpy as np
from numba import njit

from ._config import NJIT
from .simd import popcount, vload, vlt_any, vmax, vmin, vstore

#: float32 lanes of the probe's vector path (the lane-padded table's column groups)
_L = 16


@njit(**NJIT)
def build_ivf_kernel(codes, d_off, n_centroids):
    """``(list_off int64 (K + 1,), docs int32 (n_pairs,))`` of the inverted file."""
    n_docs = d_off.shape[0] - 1
    last = np.full(n_centroids, -1, np.int64)
    list_off = np.zeros(n_centroids + 1, np.int64)
    for d in range(n_docs):
        for j in range(d_off[d], d_off[d + 1]):
            c = np.int64(codes[j])
            if last[c] != d:
                last[c] = d
                list_off[c + 1] += 1
    for c in range(n_centroids):
        list_off[c + 1] += list_off[c]
    docs = np.empty(list_off[n_centroids], np.int32)
    pos = list_off[:n_centroids].copy()
    last[:] = -1
    for d in range(n_docs):
        for j in range(d_off[d], d_off[d + 1]):
            c = np.int64(codes[j])
            if last[c] != d:
                last[c] = d
                docs[pos[c]] = d
                pos[c] += 1
    return list_off, docs


@njit(**NJIT)
def gather_kernel(probe, list_off, docs, alive, mark, stamp, out):
    """Append to ``out`` every live document of the lists ``probe`` not yet marked with
    ``stamp``; returns how many were written (``out`` holds at least n_docs entries)."""
    n = 0
    for p in range(probe.shape[0]):
        c = probe[p]
        for t in range(list_off[c], list_off[c + 1]):
            d = docs[t]
            if mark[d] != stamp and alive[d] != 0:
                mark[d] = stamp
                out[n] = d
                n += 1
    return n


@njit(**NJIT)
def hamming_probe_kernel(q_words, c_words, n_probe, out):
    """For every query token ``i`` (rows of ``q_words (n_q, n_words)``) the ``n_probe``
    centroids with the fewest differing sign bits (rows of ``c_words (K, n_words)``),
    nearest first, ties to the lower id: ``out (n_q, n_probe)`` int64."""
    n_q = q_words.shape[0]
    k = c_words.shape[0]
    nw = c_words.shape[1]
    for i in range(n_q):
        best_d = np.full(n_probe, np.int64(1) << 40, np.int64)
        best_c = np.full(n_probe, -1, np.int64)
        worst = best_d[n_probe - 1]
        for c in range(k):
            dist = np.int64(0)
            for w in range(nw):
                dist += popcount(q_words[i, w] ^ c_words[c, w])
            if dist < worst:
                p = n_probe - 1
                while p > 0 and best_d[p - 1] > dist:
                    best_d[p] = best_d[p - 1]
                    best_c[p] = best_c[p - 1]
                    p -= 1
                best_d[p] = dist
                best_c[p] = c
                worst = best_d[n_probe - 1]
        for p in range(n_probe):
            out[i, p] = best_c[p]


@njit(**NJIT)
def _topn_insert(best_s, best_c, i, p, s, c):
    """Insert ``(s, c)`` into column ``i``'s sorted best list, entering at slot ``p`` (the
    first free one while filling, else the last) and moving up past smaller scores only,
    so ties keep the lower id."""
    while p > 0 and best_s[i, p - 1] < s:
        best_s[i, p] = best_s[i, p - 1]
        best_c[i, p] = best_c[i, p - 1]
        p -= 1
    best_s[i, p] = s
    best_c[i, p] = c


@njit(**NJIT)
def topn_cols_kernel(t, n_q, n, out, rng):
    """Row ids of the ``n`` largest entries of each of the first ``n_q`` columns of
    ``t (K, W)`` float32 (a query's centroid scores), largest first, ties to the lower id:
    ``out (n_q, n)``; ``n <= K``. ``rng (2,)`` float32 receives the minimum and maximum
    over those columns (what the uint8 table of the approximate stage is scaled by), found
    in the same pass over the rows instead of a second one.

    Every column keeps a sorted best-``n`` list and its entry threshold. On the
    lane-padded table (``W % 16 == 0``) each 16-column group is one pass over the rows
    with the thresholds in a register: one vector compare per row, and the scalar
    insertion only where a lane beats its threshold (after the first rows, rarely).
    """
    k, w = t.shape
    best_s = np.full((n_q, n), -np.inf, np.float32)
    best_c = np.full((n_q, n), -1, np.int64)
    thr = np.full(max(w, n_q) + _L, np.inf, np.float32)  # padding lanes never pass
    # the first n rows fill every list
    for c in range(min(n, k)):
        for i in range(n_q):
            _topn_insert(best_s, best_c, i, c, t[c, i], c)
    for i in range(n_q):
        thr[i] = best_s[i, n - 1]
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    for c in range(min(n, k)):
        for i in range(n_q):
            lo = min(lo, t[c, i])
            hi = max(hi, t[c, i])
    if w % _L == 0 and t.strides[1] == 4 and t.strides[0] == 4 * w:
        flat = np.ascontiguousarray(t).reshape(-1)
        vlo = np.empty(_L, np.float32)
        vhi = np.empty(_L, np.float32)
        for g in range(0, n_q, _L):
            tv = vload(thr, g, _L)
            x = vload(flat, min(n, k - 1) * w + g, _L)  # any real row seeds the extremes
            mn = x
            mx = x
            for c in range(n, k):
                x = vload(flat, c * w + g, _L)
                mn = vmin(mn, x)
                mx = vmax(mx, x)
                if vlt_any(tv, x):
                    for i in range(g, min(g + _L, n_q)):
                        s = t[c, i]
                        if s > thr[i]:
                            _topn_insert(best_s, best_c, i, n - 1, s, c)
                            thr[i] = best_s[i, n - 1]
                    tv = vload(thr, g, _L)
            vstore(vlo, 0, mn)
            vstore(vhi, 0, mx)
            for i in range(min(_L, n_q - g)):  # the real lanes only: padding is not a score
                lo = min(lo, vlo[i])
                hi = max(hi, vhi[i])
    else:
        for c in range(n, k):
            for i in range(n_q):
                s = t[c, i]
                lo = min(lo, s)
                hi = max(hi, s)
                if s > thr[i]:
                    _topn_insert(best_s, best_c, i, n - 1, s, c)
                    thr[i] = best_s[i, n - 1]
    rng[0] = lo
    rng[1] = hi
    for i in range(n_q):
        for p in range(n):
            out[i, p] = best_c[i, p]


@njit(**NJIT)
def table_range_kernel(t, n_q, keep, use_keep):
    """``(lo, hi)`` over the first ``n_q`` columns of ``t (K, W)``: min and max over every
    row, or with ``use_keep`` the max over kept rows (``keep[c] != 0``) and the min over
    all rows (pruned rows are quantised to the bottom, 0). One row-major pass."""
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    for c in range(t.shape[0]):
        row = t[c]
        rlo = row[0]
        rhi = row[0]
        for i in range(1, n_q):  # branch-free: LLVM vectorises min/max reductions
            rlo = min(rlo, row[i])
            rhi = max(rhi, row[i])
        lo = min(lo, rlo)
        if not use_keep or keep[c] != 0:
            hi = max(hi, rhi)
    return lo, hi


@njit(**NJIT)
def quantize_table_kernel(t, n_q, lo, inv_scale, keep, use_keep, out):
    """uint8 code table of one query, lane-padded.

    ``t (K, W)`` float32 similarities of the centroids with the query tokens (the first
    ``n_q`` columns are real); every lane of ``out (K, W8)`` uint8 (``W8 >= n_q``, need not
    be initialised) is written: ``round((t[c, i] - lo) * inv_scale)`` for ``i < n_q``, 0 in
    the padding lanes and in every lane of a centroid with ``keep[c] == 0`` (pruned, when
    ``use_keep``), the lowest value.
    """
    k = t.shape[0]
    w8 = out.shape[1]
    for c in range(k):
        orow = out[c]
        if use_keep and keep[c] == 0:
            orow[:] = 0
            continue
        orow[n_q:w8] = 0
        row = t[c]
        for i in range(n_q):
            v = (row[i] - lo) * inv_scale + np.float32(0.5)
            if v < 0:
                v = 0
            elif v > 255:
                v = 255
            orow[i] = np.uint8(v)
