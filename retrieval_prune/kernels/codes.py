"""MaxSim against compressed documents: centroid-id codes and PLAID-style residuals.

Centroid codes
--------------
Document tokens are centroid ids ``codes (n_tokens,)`` (uint8 for K <= 256, uint16
above) with CSR offsets. Per query the wrapper builds the table
``T = centroids @ q.T`` (K x n_q) and stores it row-major with the query tokens padded
to whole vectors (zero columns): ``table[c, l]``, row stride ``W``. Then

    score(q, d) = sum_i max_j T[code_j, i]

is, per document token, one table-row load and a lane-wise max: the running max of all
query tokens lives in registers (2 x 16 float32 lanes, or 32 uint8 lanes) and is updated
from a tree over 4 tokens (``max(max(r0, r1), max(r2, r3))``), so the dependency chain
through the running max is 4x shorter than a per-token update. Padding lanes stay 0 and
add nothing to the final horizontal sum.

The uint8 kernel uses a table quantised per query: ``T8 = round((T - lo) / scale)``.
max commutes with this increasing map, so the score is
``scale * sum_i max_j T8[code_j, i] + n_q * lo`` with an error of at most
``n_q * scale / 2``.

Residuals
---------
A token is ``centroids[code] + bucket_values[b_d]`` with ``nbits``-bit bucket indices
packed LSB-first: byte ``b`` holds dimensions ``b*(8/nbits) .. (b+1)*(8/nbits)-1``, the
t-th of them at bit ``t*nbits``. A per-byte lookup table ``lut[v, t]`` (256 x 8/nbits,
built by the wrapper) turns each packed byte into its 8/nbits bucket values at once.
The rerank kernel decodes a candidate document into a scratch buffer (optionally
L2-renormalising every token, as colbert-ai does) and runs the exact float32 MaxSim
micro-kernel of :mod:`.maxsim` on it.
"""

import numpy as np
from numba import njit, prange

from ._config import NJIT, NJIT_PARALLEL
from .maxsim import LANES, NEG, doc_maxsim
from .popcount import load_u64, vadd, vhadd, vload, vmax, vsplat, vstore
from .topk import topk_push

#: uint8 lanes per vector of the quantised-table kernel
LANES_U8 = 32


# --------------------------------------------------------------------------------------
# centroid codes, float32 table
# --------------------------------------------------------------------------------------
@njit(**NJIT)
def doc_code_f32(table, W, codes, s, e):
    """sum over query lanes of max over tokens ``s:e`` of ``table[codes[j], :]`` (float32).

    ``table`` is flat ``(K, W)`` with ``W`` a multiple of 16 and zero padding lanes.
    Requires ``e > s``. (The document's codes are taken as a slice so that indices are
    provably non-negative: Numba's negative-index fix-up would cost a compare per load.)
    """
    cs = codes[s:e]
    n = cs.shape[0]
    total = 0.0
    g = 0
    while g + 2 * LANES <= W:
        m0 = vsplat(NEG, 16)
        m1 = vsplat(NEG, 16)
        j = 0
        while j + 4 <= n:
            c0 = np.int64(cs[j]) * W + g
            c1 = np.int64(cs[j + 1]) * W + g
            c2 = np.int64(cs[j + 2]) * W + g
            c3 = np.int64(cs[j + 3]) * W + g
            r0 = vmax(vmax(vload(table, c0, 16), vload(table, c1, 16)),
                      vmax(vload(table, c2, 16), vload(table, c3, 16)))  # fmt: skip
            r1 = vmax(vmax(vload(table, c0 + 16, 16), vload(table, c1 + 16, 16)),
                      vmax(vload(table, c2 + 16, 16), vload(table, c3 + 16, 16)))  # fmt: skip
            m0 = vmax(m0, r0)
            m1 = vmax(m1, r1)
            j += 4
        while j < n:
            c0 = np.int64(cs[j]) * W + g
            m0 = vmax(m0, vload(table, c0, 16))
            m1 = vmax(m1, vload(table, c0 + 16, 16))
            j += 1
        total += vhadd(m0) + vhadd(m1)
        g += 2 * LANES
    if g < W:
        m0 = vsplat(NEG, 16)
        j = 0
        while j + 4 <= n:
            r0 = vmax(vmax(vload(table, np.int64(cs[j]) * W + g, 16),
                           vload(table, np.int64(cs[j + 1]) * W + g, 16)),
                      vmax(vload(table, np.int64(cs[j + 2]) * W + g, 16),
                           vload(table, np.int64(cs[j + 3]) * W + g, 16)))  # fmt: skip
            m0 = vmax(m0, r0)
            j += 4
        while j < n:
            m0 = vmax(m0, vload(table, np.int64(cs[j]) * W + g, 16))
            j += 1
        total += vhadd(m0)
    return np.float32(total)


@njit(**NJIT)
def _row32(table, w, k):
    """uint8 table row of the k-th code byte packed in ``w`` (row stride 32)."""
    return vload(table, np.int64((w >> np.uint64(8 * k)) & np.uint64(255)) * 32, 32)


@njit(**NJIT)
def _doc_code_u8_w32(table, cs, n):
    """:func:`doc_code_u8` for uint8 codes and ``W == 32``: 8 codes per 64-bit load
    (one load and shifts instead of eight byte loads: measured 1.2x)."""
    m0 = vsplat(np.uint8(0), 32)
    m1 = m0
    j = 0
    while j + 8 <= n:
        w = load_u64(cs, j)
        m0 = vmax(m0, vmax(vmax(_row32(table, w, 0), _row32(table, w, 1)),
                           vmax(_row32(table, w, 2), _row32(table, w, 3))))  # fmt: skip
        m1 = vmax(m1, vmax(vmax(_row32(table, w, 4), _row32(table, w, 5)),
                           vmax(_row32(table, w, 6), _row32(table, w, 7))))  # fmt: skip
        j += 8
    while j < n:
        m0 = vmax(m0, vload(table, np.int64(cs[j]) * 32, 32))
        j += 1
    return vhadd(vmax(m0, m1))


@njit(**NJIT)
def _u8_score(table, W, codes, s, e, fast):
    """:func:`doc_code_u8`, or its ``W == 32`` uint8-code version when ``fast`` (decided
    once per scan: a per-document dispatch inside ``doc_code_u8`` cost ~15 %)."""
    if fast:
        return _doc_code_u8_w32(table, codes[s:e], e - s)
    return doc_code_u8(table, W, codes, s, e)


@njit(**NJIT)
def doc_code_u8(table, W, codes, s, e):
    """Integer sum over lanes of max over tokens of a uint8 table ``(K, W)``, W % 32 == 0."""
    cs = codes[s:e]
    n = cs.shape[0]
    total = 0
    g = 0
    while g < W:
        m0 = vsplat(np.uint8(0), 32)
        m1 = m0
        j = 0
        while j + 8 <= n:
            r0 = vmax(vmax(vload(table, np.int64(cs[j]) * W + g, 32),
                           vload(table, np.int64(cs[j + 1]) * W + g, 32)),
                      vmax(vload(table, np.int64(cs[j + 2]) * W + g, 32),
                           vload(table, np.int64(cs[j + 3]) * W + g, 32)))  # fmt: skip
            r1 = vmax(vmax(vload(table, np.int64(cs[j + 4]) * W + g, 32),
                           vload(table, np.int64(cs[j + 5]) * W + g, 32)),
                      vmax(vload(table, np.int64(cs[j + 6]) * W + g, 32),
                           vload(table, np.int64(cs[j + 7]) * W + g, 32)))  # fmt: skip
            m0 = vmax(m0, r0)
            m1 = vmax(m1, r1)
            j += 8
        while j < n:
            m0 = vmax(m0, vload(table, np.int64(cs[j]) * W + g, 32))
            j += 1
        total += vhadd(vmax(m0, m1))
        g += LANES_U8
    return total


@njit(**NJIT_PARALLEL)
def code_f32_scores_kernel(table, W, codes, d_off, ids, use_ids, out):
    """``out[r]`` = code MaxSim (float32 table) of document ``ids[r]`` (or ``r`` when
    ``use_ids`` is False); ``NEG`` for an empty document or id -1."""
    n = out.shape[0]
    nch = min(n, 1024)
    for c in prange(nch):
        for r in range(c * n // nch, (c + 1) * n // nch):
            doc = ids[r] if use_ids else r
            if doc < 0:
                out[r] = NEG
                continue
            s = d_off[doc]
            e = d_off[doc + 1]
            out[r] = doc_code_f32(table, W, codes, s, e) if e > s else NEG


@njit(**NJIT_PARALLEL)
def code_u8_scores_kernel(table, W, scale, offset, codes, d_off, ids, use_ids, out):
    """Like :func:`code_f32_scores_kernel` with a uint8 table; ``out`` is dequantised:
    ``scale * sum + offset`` (``offset`` = n_q * lo)."""
    n = out.shape[0]
    nch = min(n, 1024)
    fast = W == LANES_U8 and codes.itemsize == 1
    for c in prange(nch):
        lo = c * n // nch
        hi = (c + 1) * n // nch
        if not use_ids and fast:
            # the common case, kept lean: slices (no index fix-ups), no dispatch per doc
            offs = d_off[lo : hi + 1]
            o = out[lo:hi]
            for r in range(hi - lo):
                s = offs[r]
                e = offs[r + 1]
                if e > s:
                    o[r] = np.float32(scale * _doc_code_u8_w32(table, codes[s:e], e - s) + offset)
                else:
                    o[r] = NEG
            continue
        for r in range(lo, hi):
            doc = ids[r] if use_ids else r
            if doc < 0:
                out[r] = NEG
                continue
            s = d_off[doc]
            e = d_off[doc + 1]
            if e > s:
                out[r] = np.float32(scale * _u8_score(table, W, codes, s, e, fast) + offset)
            else:
                out[r] = NEG


@njit(**NJIT_PARALLEL)
def code_search_kernel(
    table_f32, table_u8, use_u8, W, scale, offset, codes, d_off, alive, use_alive,
    bounds, k, ts, ti, cnt,
):  # fmt: skip
    """Fused top-k of code MaxSim for one query over all documents (chunks ``bounds``);
    per-chunk lists ``ts/ti[c, 0, :]`` with ``cnt[c, 0]`` entries (see ``topk_merge``)."""
    nch = bounds.shape[0] - 1
    fast = W == LANES_U8 and codes.itemsize == 1
    for c in prange(nch):
        n = 0
        for doc in range(bounds[c], bounds[c + 1]):
            s = d_off[doc]
            e = d_off[doc + 1]
            if e <= s or (use_alive and alive[doc] == 0):
                continue
            if use_u8:
                sc = np.float32(scale * _u8_score(table_u8, W, codes, s, e, fast) + offset)
            else:
                sc = doc_code_f32(table_f32, W, codes, s, e)
            if n < k or sc > ts[c, 0, k - 1]:
                n = topk_push(ts[c, 0], ti[c, 0], n, k, sc, doc)
        cnt[c, 0] = n


# --------------------------------------------------------------------------------------
# residuals
# --------------------------------------------------------------------------------------
@njit(**NJIT)
def decode_token(code, packed_row, centroids, lut, per, normalize, out, o):
    """Decode one token into ``out[o:o+dim]``: centroid + bucket values, optional L2 norm.

    One packed byte holds ``per = 8 / nbits`` dimensions; ``lut[v]`` holds their ``per``
    bucket values, so a byte is one ``per``-lane vector load + add + store.
    """
    dim = centroids.shape[1]
    nbytes = packed_row.shape[0]
    crow = centroids[code]
    tok = out[o : o + dim]
    if per == 4:
        for b in range(nbytes):
            v = np.int64(packed_row[b])
            vstore(tok, 4 * b, vadd(vload(crow, 4 * b, 4), vload(lut, 4 * v, 4)))
    elif per == 8:
        for b in range(nbytes):
            v = np.int64(packed_row[b])
            vstore(tok, 8 * b, vadd(vload(crow, 8 * b, 8), vload(lut, 8 * v, 8)))
    else:
        for b in range(nbytes):
            v = np.int64(packed_row[b])
            vstore(tok, 2 * b, vadd(vload(crow, 2 * b, 2), vload(lut, 2 * v, 2)))
    if normalize:
        ss = np.float32(0.0)
        for d in range(dim):
            ss += tok[d] * tok[d]
        if ss > 0:
            inv = np.float32(1.0) / np.sqrt(ss)
            for d in range(dim):
                tok[d] *= inv


@njit(**NJIT_PARALLEL)
def residual_decode_kernel(codes, packed, centroids, lut, per, normalize, out):
    """Decode every token: ``out`` float32 ``(n_tokens, dim)`` flattened."""
    n = codes.shape[0]
    dim = centroids.shape[1]
    for i in prange(n):
        decode_token(np.int64(codes[i]), packed[i], centroids, lut, per, normalize, out, i * dim)


@njit(**NJIT_PARALLEL)
def residual_rerank_kernel(
    qp, nv, nq, codes, packed, centroids, lut, per, normalize, d_off, ids, max_len, out
):
    """``out[r]`` = exact MaxSim of the packed query with decoded document ``ids[r]``.

    Each thread decodes a candidate into its own scratch (``max_len`` tokens) and runs the
    float32 micro-kernel on it; ``NEG`` for an empty document or id -1.
    """
    n = ids.shape[0]
    dim = centroids.shape[1]
    nch = min(n, 256)
    for c in prange(nch):
        buf = np.empty(max(max_len, 1) * dim, np.float32)
        mbuf = np.empty(max(nv, 1) * LANES, np.float32)
        for r in range(c * n // nch, (c + 1) * n // nch):
            doc = ids[r]
            if doc < 0:
                out[r] = NEG
                continue
            s = d_off[doc]
            e = d_off[doc + 1]
            if e <= s:
                out[r] = NEG
                continue
            for j in range(s, e):
                decode_token(
                    np.int64(codes[j]),
                    packed[j],
                    centroids,
                    lut,
                    per,
                    normalize,
                    buf,
                    (j - s) * dim,
                )
            out[r] = doc_maxsim(qp, 0, nv, nq, dim, buf, 0, e - s, mbuf)
