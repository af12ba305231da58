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

The table kernels come in the register-blocking variants of :mod:`.simd` (``isa``): with
AVX2 a step is 6 centroids x 16 query lanes (:func:`.maxsim.rows6x1`).

The uint8 kernel uses a table quantised per query: ``T8 = round((T - lo) / scale)``.
max commutes with this increasing map, so the score is
``scale * sum_i max_j T8[code_j, i] + n_q * lo`` with an error of at most
``n_q * scale / 2``.

With an int8 codebook (``C = diag(s) C8``) the table can be built in integers: the
query is quantised per token (``q = s_q q8``, ``max |q8| = 127``) and
``T[c, l] = s[c] s_q[l] sum_d C8[c, d] q8[l, d]``. The sum is exact (below 2**24), so the
AVX-512 VNNI kernel (``vpdpbusd``: unsigned x signed bytes, hence ``q8 + 128`` and a
per-centroid correction ``-128 sum_d C8[c, d]``), the AVX2 kernel (``vpmaddwd`` on int16
pairs) and the portable kernel (the float32 micro-kernel on the same small integers)
produce the same float32 table.

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
from .maxsim import LANES, NEG, doc_maxsim_scaled, dot4x2, dot8x1, rows6x1
from .simd import (
    HAS_AVX2,
    HAS_VNNI,
    ISA,
    ISA_AVX2,
    load_index,
    vadd,
    vbroadcast_i16x2,
    vbroadcast_i32,
    vconcat,
    vcvt_f32,
    vdpbusd,
    vfma,
    vhadd,
    vload,
    vload_f32,
    vload_i8_i16,
    vload_i32,
    vmaddwd,
    vmax,
    vsplat,
    vstore,
)
from .topk import topk_push

#: uint8 lanes per vector of the quantised-table kernel
LANES_U8 = 32


# --------------------------------------------------------------------------------------
# the score table itself
# --------------------------------------------------------------------------------------
@njit(**NJIT)
def _rows4(c, c1, dim):
    """``(n, r0, r1, r2, r3)``: how many of centroids ``c .. c+3`` exist below ``c1`` and
    their row offsets (a missing one repeats row ``c``: computed, never stored)."""
    n = min(4, c1 - c)
    r0 = c * dim
    return (n, r0, r0 + dim if n > 1 else r0, r0 + 2 * dim if n > 2 else r0,
            r0 + 3 * dim if n > 3 else r0)  # fmt: skip


@njit(**NJIT)
def _store_rows(out, o, W, n, a0, a1, a2, a3):
    """Store the first ``n`` of 4 row vectors to rows ``o, o + W, ...`` of ``out``."""
    vstore(out, o, a0)
    if n > 1:
        vstore(out, o + W, a1)
    if n > 2:
        vstore(out, o + 2 * W, a2)
    if n > 3:
        vstore(out, o + 3 * W, a3)


@njit(**NJIT)
def _table_rows2(qp, base, dim, C1, c0, c1, out, W, col):
    """Dot products of centroids ``c0:c1`` with the 32 query lanes of vectors at ``base``,
    stored to ``out[c * W + col : + 32]``: 4 centroids x 2 vectors per step (the GEMM
    micro-kernel :func:`.maxsim.dot4x2` of MaxSim, storing instead of taking the max)."""
    b1 = base + dim * LANES
    c = c0
    while c < c1:
        n, r0, r1, r2, r3 = _rows4(c, c1, dim)
        a00, a01, a10, a11, a20, a21, a30, a31 = dot4x2(qp, base, b1, dim, C1, r0, r1, r2, r3)
        o = c * W + col
        _store_rows(out, o, W, n, a00, a10, a20, a30)
        _store_rows(out, o + LANES, W, n, a01, a11, a21, a31)
        c += 4


@njit(**NJIT)
def _table_rows1(qp, base, dim, C1, c0, c1, out, W, col):
    """:func:`_table_rows2` for one vector of 16 query lanes (8 centroids per step,
    :func:`.maxsim.dot8x1`)."""
    c = c0
    while c < c1:
        n, r0, r1, r2, r3 = _rows4(c, c1, dim)
        if c + 4 < c1:
            m, r4, r5, r6, r7 = _rows4(c + 4, c1, dim)
        else:  # no second four: repeat row c (computed, never stored)
            m, r4, r5, r6, r7 = 0, r0, r0, r0, r0
        a0, a1, a2, a3, a4, a5, a6, a7 = dot8x1(qp, base, dim, C1, r0, r1, r2, r3, r4, r5, r6, r7)
        o = c * W + col
        _store_rows(out, o, W, n, a0, a1, a2, a3)
        if m > 0:
            _store_rows(out, o + 4 * W, W, m, a4, a5, a6, a7)
        c += 8


@njit(**NJIT)
def _store_rows6(out, o, W, n, a0, a1, a2, a3, a4, a5):
    """Store the first ``n`` of 6 row vectors to rows ``o, o + W, ...`` of ``out``."""
    _store_rows(out, o, W, n, a0, a1, a2, a3)
    if n > 4:
        vstore(out, o + 4 * W, a4)
    if n > 5:
        vstore(out, o + 5 * W, a5)


@njit(**NJIT)
def _table_rows_avx2(qp, nv, dim, C1, c0, c1, out, W):
    """The AVX2 variant: 6 centroids x 16 query lanes per step (:func:`.maxsim.rows6x1`),
    every query vector while the 6 rows are in L1. While the first vector passes, the
    same place of the next 6 rows is prefetched, one line per row and 16 dimensions: a
    codebook beyond the L3 share (d = 384: 24 MiB) otherwise left the table at 0.75 of
    sgemm (in one burst per block, the prefetches did not help)."""
    c = c0
    while c < c1:
        n = min(6, c1 - c)  # a missing row repeats row c: computed, never stored
        r0 = c * dim
        r1 = r0 + dim if n > 1 else r0
        r2 = r0 + 2 * dim if n > 2 else r0
        r3 = r0 + 3 * dim if n > 3 else r0
        r4 = r0 + 4 * dim if n > 4 else r0
        r5 = r0 + 5 * dim if n > 5 else r0
        ahead = c + 12 <= c1  # the next 6 rows lie in this chunk
        for v in range(nv):
            a0, a1, a2, a3, a4, a5 = rows6x1(
                qp, v * dim * LANES, dim, C1, r0, r1, r2, r3, r4, r5, v == 0 and ahead
            )
            _store_rows6(out, c * W + v * LANES, W, n, a0, a1, a2, a3, a4, a5)
        c += 6


#: rows per block of the portable int8 table kernel (scaled while the block is in L1)
_TABLE_BLOCK = 64


@njit(**NJIT)
def _table_block(qp, nv, dim, C1, c0, c1, out, W, isa):
    if isa == ISA_AVX2:
        _table_rows_avx2(qp, nv, dim, C1, c0, c1, out, W)
        return
    v = 0
    while v + 2 <= nv:
        _table_rows2(qp, v * dim * LANES, dim, C1, c0, c1, out, W, v * LANES)
        v += 2
    if v < nv:
        _table_rows1(qp, v * dim * LANES, dim, C1, c0, c1, out, W, v * LANES)


@njit(**NJIT_PARALLEL)
def centroid_table_kernel(qp, nv, dim, C1, n_centroids, out, isa=ISA):
    """Score table of one packed query: ``out[c * W + l]`` = ``<centroid c, query token l>``
    with ``W = 16 * nv`` (zero query rows give zero padding lanes).

    ``qp``: the query packed as in :mod:`.maxsim` (``nv`` 16-lane vectors); ``C1``: the
    centroids ``(K, dim)`` flattened, float32 (or a signed integer array, read as its
    values: the portable int8 table runs on that). The table comes out row-major and
    lane-padded, the layout every code kernel reads, so no copy follows; parallel over
    chunks of centroids.
    """
    W = nv * LANES
    nch = max(1, min(64, n_centroids // 256))
    for ch in prange(nch):
        c0 = ch * n_centroids // nch
        _table_block(qp, nv, dim, C1, c0, (ch + 1) * n_centroids // nch, out, W, isa)


# --------------------------------------------------------------------------------------
# the score table from int8 x int8 (int8 codebook, query quantised per token)
# --------------------------------------------------------------------------------------
@njit(**NJIT)
def quantize_query_i8(qp, nv, dim, q8f, qu, qs):
    """Quantise a packed query per token: ``qs[l] = max_d |q[l, d]| / 127`` and
    ``q8 = rint(q / qs)`` in [-127, 127] (0 for a zero token, so padding stays 0).

    Writes ``q8f`` (float32, the packed layout of ``qp``: the portable table kernel's
    input) and, when ``qu`` is not empty, ``qu`` = ``q8 + 128`` as uint8 in the VNNI
    layout ``(nv, dim / 4, 16, 4)``: 16 tokens x 4 consecutive dimensions per 64 bytes."""
    vnni = qu.shape[0] > 0
    for v in range(nv):
        base = v * dim * LANES
        for lane in range(LANES):
            m = np.float32(0.0)
            for d in range(dim):
                m = max(m, abs(qp[base + d * LANES + lane]))
            s = m / np.float32(127.0)
            qs[v * LANES + lane] = s
            inv = np.float32(1.0) / s if m > 0 else np.float32(0.0)
            for d in range(dim):
                x = np.rint(qp[base + d * LANES + lane] * inv)
                q8f[base + d * LANES + lane] = x
                if vnni:
                    qu[base + (d >> 2) * 64 + lane * 4 + (d & 3)] = np.uint8(np.int32(x) + 128)


@njit(**NJIT)
def _scaled(acc, m):
    """``float32(acc) * m`` for an integer-valued float32 accumulator."""
    return vfma(acc, m, vsplat(np.float32(0.0), 16))


@njit(**NJIT)
def _scale_rows(out, W, c0, c1, qs, scale):
    """``out[c, l] *= qs[l] * scale[c]`` for rows ``c0:c1`` (the portable int8 table)."""
    for c in range(c0, c1):
        sc = vsplat(scale[c], 16)
        for g in range(0, W, LANES):
            m = vfma(vload(qs, g, 16), sc, vsplat(np.float32(0.0), 16))
            vstore(out, c * W + g, _scaled(vload(out, c * W + g, 16), m))


@njit(**NJIT_PARALLEL)
def centroid_table_i8_kernel(q8f, nv, dim, C8, qs, scale, n_centroids, out, isa=ISA):
    """Portable int8 score table: ``out[c, l] = (sum_d q8[l, d] * C8[c, d]) * qs[l] *
    scale[c]``. The integer dot products run on the float32 micro-kernel (exact: every
    partial sum is an integer below 2**24), so this equals
    :func:`centroid_table_i8_vnni_kernel` bit for bit."""
    W = nv * LANES
    nch = max(1, min(64, n_centroids // 256))
    for ch in prange(nch):
        c0 = ch * n_centroids // nch
        c1 = (ch + 1) * n_centroids // nch
        b0 = c0
        while b0 < c1:
            b1 = min(b0 + _TABLE_BLOCK, c1)
            _table_block(q8f, nv, dim, C8, b0, b1, out, W, isa)
            _scale_rows(out, W, b0, b1, qs, scale)
            b0 = b1


@njit(**NJIT)
def _store_i8(out, o, acc, corr, m):
    vstore(out, o, _scaled(vcvt_f32(vadd(acc, corr)), m))


@njit(**NJIT)
def _i8_rows2(qu, base, dim, C8, corr, qs, scale, c0, c1, out, W, col):
    """VNNI micro-kernel: 4 centroids x 32 query tokens per step, 8 int32 accumulators,
    one ``vpdpbusd`` per 4 dimensions of one centroid and 16 tokens."""
    b1 = base + dim * LANES
    z = vsplat(np.int32(0), 16)
    zf = vsplat(np.float32(0.0), 16)
    qa_s = vload(qs, col, 16)
    qb_s = vload(qs, col + LANES, 16)
    c = c0
    while c < c1:
        n, r0, r1, r2, r3 = _rows4(c, c1, dim)
        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = z
        for t in range(0, dim, 4):
            qa = vload_i32(qu, base + t * LANES)
            qb = vload_i32(qu, b1 + t * LANES)
            x = vbroadcast_i32(C8, r0 + t)
            a00 = vdpbusd(a00, qa, x)
            a01 = vdpbusd(a01, qb, x)
            x = vbroadcast_i32(C8, r1 + t)
            a10 = vdpbusd(a10, qa, x)
            a11 = vdpbusd(a11, qb, x)
            x = vbroadcast_i32(C8, r2 + t)
            a20 = vdpbusd(a20, qa, x)
            a21 = vdpbusd(a21, qb, x)
            x = vbroadcast_i32(C8, r3 + t)
            a30 = vdpbusd(a30, qa, x)
            a31 = vdpbusd(a31, qb, x)
        o = c * W + col
        k = vsplat(corr[c], 16)
        sc = vsplat(scale[c], 16)
        _store_i8(out, o, a00, k, vfma(qa_s, sc, zf))
        _store_i8(out, o + LANES, a01, k, vfma(qb_s, sc, zf))
        if n > 1:
            k = vsplat(corr[c + 1], 16)
            sc = vsplat(scale[c + 1], 16)
            _store_i8(out, o + W, a10, k, vfma(qa_s, sc, zf))
            _store_i8(out, o + W + LANES, a11, k, vfma(qb_s, sc, zf))
        if n > 2:
            k = vsplat(corr[c + 2], 16)
            sc = vsplat(scale[c + 2], 16)
            _store_i8(out, o + 2 * W, a20, k, vfma(qa_s, sc, zf))
            _store_i8(out, o + 2 * W + LANES, a21, k, vfma(qb_s, sc, zf))
        if n > 3:
            k = vsplat(corr[c + 3], 16)
            sc = vsplat(scale[c + 3], 16)
            _store_i8(out, o + 3 * W, a30, k, vfma(qa_s, sc, zf))
            _store_i8(out, o + 3 * W + LANES, a31, k, vfma(qb_s, sc, zf))
        c += 4


@njit(**NJIT)
def _i8_rows1(qu, base, dim, C8, corr, qs, scale, c0, c1, out, W, col):
    """:func:`_i8_rows2` for one vector of 16 query tokens (4 centroids per step)."""
    z = vsplat(np.int32(0), 16)
    zf = vsplat(np.float32(0.0), 16)
    qa_s = vload(qs, col, 16)
    c = c0
    while c < c1:
        n, r0, r1, r2, r3 = _rows4(c, c1, dim)
        a0 = a1 = a2 = a3 = z
        for t in range(0, dim, 4):
            qa = vload_i32(qu, base + t * LANES)
            a0 = vdpbusd(a0, qa, vbroadcast_i32(C8, r0 + t))
            a1 = vdpbusd(a1, qa, vbroadcast_i32(C8, r1 + t))
            a2 = vdpbusd(a2, qa, vbroadcast_i32(C8, r2 + t))
            a3 = vdpbusd(a3, qa, vbroadcast_i32(C8, r3 + t))
        o = c * W + col
        accs = (a0, a1, a2, a3)
        for i in range(4):
            if i < n:
                m = vfma(qa_s, vsplat(scale[c + i], 16), zf)
                _store_i8(out, o + i * W, accs[i], vsplat(corr[c + i], 16), m)
        c += 4


@njit(**NJIT_PARALLEL)
def centroid_table_i8_vnni_kernel(qu, nv, dim, C8, corr, qs, scale, n_centroids, out):
    """:func:`centroid_table_i8_kernel` with AVX-512 VNNI (only where ``HAS_VNNI``):
    ``vpdpbusd`` multiplies the unsigned ``q8 + 128`` by the signed codebook bytes, and
    ``corr[c] = -128 * sum_d C8[c, d]`` takes the offset back out; ``dim % 4 == 0``.
    4x the multiply-adds of a float32 FMA per instruction."""
    W = nv * LANES
    nch = max(1, min(64, n_centroids // 256))
    for ch in prange(nch):
        c0 = ch * n_centroids // nch
        c1 = (ch + 1) * n_centroids // nch
        v = 0
        while v + 2 <= nv:
            _i8_rows2(qu, v * dim * LANES, dim, C8, corr, qs, scale, c0, c1, out, W, v * LANES)
            v += 2
        if v < nv:
            _i8_rows1(qu, v * dim * LANES, dim, C8, corr, qs, scale, c0, c1, out, W, v * LANES)


# --------------------------------------------------------------------------------------
# the int8 table with AVX2 (no VNNI): int16 vpmaddwd
# --------------------------------------------------------------------------------------
@njit(inline="always", **NJIT)
def _store8(out, o, acc, qs, col, sc):
    """Store ``float32(acc) * (qs[col:col+8] * sc)``: the rounding steps of the VNNI and
    portable kernels (:func:`_scaled`), so all three give the same table."""
    z = vsplat(np.float32(0.0), 8)
    m = vfma(vload(qs, col, 8), vsplat(sc, 8), z)
    vstore(out, o, vfma(vcvt_f32(acc), m, z))


@njit(inline="always", **NJIT)
def _i16_step2(q16, base, b1, o, C16, r0, r1, a00, a01, a02, a03, a10, a11, a12, a13):
    """One pair of dimensions of :func:`_i16_rows2` (query offset ``o``)."""
    q0 = vload(q16, base + o, 16)
    q1 = vload(q16, base + o + 16, 16)
    q2 = vload(q16, b1 + o, 16)
    q3 = vload(q16, b1 + o + 16, 16)
    x = vbroadcast_i16x2(C16, r0)
    a00 = vadd(a00, vmaddwd(q0, x))
    a01 = vadd(a01, vmaddwd(q1, x))
    a02 = vadd(a02, vmaddwd(q2, x))
    a03 = vadd(a03, vmaddwd(q3, x))
    x = vbroadcast_i16x2(C16, r1)
    a10 = vadd(a10, vmaddwd(q0, x))
    a11 = vadd(a11, vmaddwd(q1, x))
    a12 = vadd(a12, vmaddwd(q2, x))
    a13 = vadd(a13, vmaddwd(q3, x))
    return a00, a01, a02, a03, a10, a11, a12, a13


@njit(**NJIT)
def _i16_rows2(q16, base, dim, C16, cb, c0, c1, qs, scale, out, W, col):
    """AVX2 int8-table micro-kernel: 2 centroids x 32 query tokens per step (4 ymm of 8
    tokens x 2 int16 dimensions: the packed vectors at ``base`` and the next), 8 int32
    accumulators; per 2 dimensions one ``vpbroadcastd`` of a centroid's int16 pair and 4
    ``vpmaddwd`` + ``vpaddd`` per centroid, 4 dimensions per loop trip (as fast as 2 per
    trip, within noise). ``C16``: rows ``cb, cb+1, ...`` as int16."""
    b1 = base + dim * LANES
    z = vsplat(np.int32(0), 8)
    d4 = dim // 4 * 4
    c = c0
    while c < c1:
        n = min(2, c1 - c)
        r0 = (c - cb) * dim
        r1 = r0 + dim if n > 1 else r0
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
        for t in range(0, d4, 4):
            a00, a01, a02, a03, a10, a11, a12, a13 = _i16_step2(
                q16, base, b1, t * LANES, C16, r0 + t, r1 + t,
                a00, a01, a02, a03, a10, a11, a12, a13,
            )  # fmt: skip
            a00, a01, a02, a03, a10, a11, a12, a13 = _i16_step2(
                q16, base, b1, (t + 2) * LANES, C16, r0 + t + 2, r1 + t + 2,
                a00, a01, a02, a03, a10, a11, a12, a13,
            )  # fmt: skip
        if d4 < dim:
            a00, a01, a02, a03, a10, a11, a12, a13 = _i16_step2(
                q16, base, b1, d4 * LANES, C16, r0 + d4, r1 + d4,
                a00, a01, a02, a03, a10, a11, a12, a13,
            )  # fmt: skip
        o = c * W + col
        sc = scale[c]
        _store8(out, o, a00, qs, col, sc)
        _store8(out, o + 8, a01, qs, col + 8, sc)
        _store8(out, o + 16, a02, qs, col + 16, sc)
        _store8(out, o + 24, a03, qs, col + 24, sc)
        if n > 1:
            o += W
            sc = scale[c + 1]
            _store8(out, o, a10, qs, col, sc)
            _store8(out, o + 8, a11, qs, col + 8, sc)
            _store8(out, o + 16, a12, qs, col + 16, sc)
            _store8(out, o + 24, a13, qs, col + 24, sc)
        c += 2


@njit(**NJIT)
def _i16_rows1(q16, base, dim, C16, cb, c0, c1, qs, scale, out, W, col):
    """:func:`_i16_rows2` for one packed vector of 16 tokens (4 centroids per step)."""
    z = vsplat(np.int32(0), 8)
    c = c0
    while c < c1:
        n = min(4, c1 - c)
        r0 = (c - cb) * dim
        r1 = r0 + dim if n > 1 else r0
        r2 = r0 + 2 * dim if n > 2 else r0
        r3 = r0 + 3 * dim if n > 3 else r0
        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = z
        for t in range(0, dim, 2):
            q0 = vload(q16, base + t * LANES, 16)
            q1 = vload(q16, base + t * LANES + 16, 16)
            x = vbroadcast_i16x2(C16, r0 + t)
            a00 = vadd(a00, vmaddwd(q0, x))
            a01 = vadd(a01, vmaddwd(q1, x))
            x = vbroadcast_i16x2(C16, r1 + t)
            a10 = vadd(a10, vmaddwd(q0, x))
            a11 = vadd(a11, vmaddwd(q1, x))
            x = vbroadcast_i16x2(C16, r2 + t)
            a20 = vadd(a20, vmaddwd(q0, x))
            a21 = vadd(a21, vmaddwd(q1, x))
            x = vbroadcast_i16x2(C16, r3 + t)
            a30 = vadd(a30, vmaddwd(q0, x))
            a31 = vadd(a31, vmaddwd(q1, x))
        o = c * W + col
        accs = ((a00, a01), (a10, a11), (a20, a21), (a30, a31))
        for i in range(4):
            if i < n:
                sc = scale[c + i]
                _store8(out, o + i * W, accs[i][0], qs, col, sc)
                _store8(out, o + i * W + 8, accs[i][1], qs, col + 8, sc)
        c += 4


#: centroid rows widened to int16 at a time by the AVX2 int8 table (16 KiB at d = 128:
#: they stay in L1 while every query vector passes over them)
_I16_BLOCK = 64


@njit(**NJIT_PARALLEL)
def centroid_table_i8_avx2_kernel(q16, nv, dim, C8, qs, scale, n_centroids, out):
    """:func:`centroid_table_i8_kernel` with AVX2 integer instructions (only where
    ``HAS_AVX2``; ``dim % 2 == 0``). ``q16``: the quantised query as int16 in pairs of
    dimensions, ``(nv, dim / 2, 16, 2)``. A block of centroid rows is widened to int16
    once, then ``vpmaddwd`` does 16 exact multiply-adds per instruction (2x a float32
    FMA), so the table equals the portable and VNNI ones bit for bit. (``vpmaddubsw``
    would do 32, but u8 x s8 pairs saturate int16 unless one side's sign is moved to the
    other per product: one more instruction on the same busy pipes, measured slower.)"""
    W = nv * LANES
    nch = max(1, min(64, n_centroids // 256))
    d16 = dim // 16 * 16
    for ch in prange(nch):
        c0 = ch * n_centroids // nch
        c1 = (ch + 1) * n_centroids // nch
        C16 = np.empty(_I16_BLOCK * dim, np.int16)
        b0 = c0
        while b0 < c1:
            b1 = min(b0 + _I16_BLOCK, c1)
            for r in range(b1 - b0):
                src = (b0 + r) * dim
                dst = r * dim
                for d in range(0, d16, 16):
                    vstore(C16, dst + d, vload_i8_i16(C8, src + d))
                for d in range(d16, dim):
                    C16[dst + d] = C8[src + d]
            v = 0
            while v + 2 <= nv:
                _i16_rows2(q16, v * dim * LANES, dim, C16, b0, b0, b1, qs, scale, out, W, v * LANES)
                v += 2
            if v < nv:
                _i16_rows1(q16, v * dim * LANES, dim, C16, b0, b0, b1, qs, scale, out, W, v * LANES)
            b0 = b1


def _pairs16(q8f, nv, dim):
    """The quantised query (float32 integers, packed layout ``(nv, dim, 16)``) as int16
    pairs of dimensions ``(nv, dim / 2, 16, 2)``, flat: the AVX2 table's input."""
    q = q8f.reshape(nv, dim // 2, 2, LANES).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(q, dtype=np.int16).reshape(-1)


def int8_table_path(dim: int, isa: int = ISA) -> str:
    """Which kernel :func:`centroid_table_i8` runs: ``"vnni"``, ``"avx2"`` or
    ``"portable"`` (the float32 micro-kernel on integer values); all give one table."""
    if dim % 4 == 0 and HAS_VNNI and isa != ISA_AVX2:
        return "vnni"
    if dim % 2 == 0 and HAS_AVX2:
        return "avx2"
    return "portable"


def centroid_table_i8(qp, nv, dim, C8, corr, scale, n_centroids, out, isa=ISA):
    """Score table of a packed query against an int8 codebook, with the query quantised
    per token (:func:`quantize_query_i8`): the VNNI kernel where the host has AVX-512
    VNNI, the AVX2 integer kernel where it has AVX2, else the portable one
    (:func:`int8_table_path`); all give the same float32 table."""
    path = int8_table_path(dim, isa)
    q8f = np.empty_like(qp)
    qs = np.empty(nv * LANES, np.float32)
    qu = np.empty(qp.size if path == "vnni" else 0, np.uint8)
    quantize_query_i8(qp, nv, dim, q8f, qu, qs)
    if path == "vnni":
        centroid_table_i8_vnni_kernel(qu, nv, dim, C8, corr, qs, scale, n_centroids, out)
    elif path == "avx2":
        centroid_table_i8_avx2_kernel(
            _pairs16(q8f, nv, dim), nv, dim, C8, qs, scale, n_centroids, out
        )
    else:
        centroid_table_i8_kernel(q8f, nv, dim, C8, qs, scale, n_centroids, out, isa)


# --------------------------------------------------------------------------------------
# centroid codes, float32 table
# --------------------------------------------------------------------------------------
@njit(inline="always", **NJIT)
def _rowf32(table, o):
    """The float32 table row (32 lanes) at ``o`` as two 16-lane halves."""
    return vload(table, o, 16), vload(table, o + 16, 16)


@njit(**NJIT)
def _doc_code_f32_w32(table, cs, n):
    """:func:`doc_code_f32` for ``W == 32`` (one or two packed query vectors: the common
    case): the row offset is a shift (``W`` at run time cost an ``imul`` per code) and 8
    codes per step halve the loop's own instructions. Per token the floor is 4 row loads
    and 4 ``vmaxps`` (2 cycles on two load ports)."""
    m0 = vsplat(NEG, 16)
    m1 = m0
    m2 = m0
    m3 = m0
    j = 0
    while j + 8 <= n:
        a0, b0 = _rowf32(table, load_index(cs, j) * 32)
        a1, b1 = _rowf32(table, load_index(cs, j + 1) * 32)
        a2, b2 = _rowf32(table, load_index(cs, j + 2) * 32)
        a3, b3 = _rowf32(table, load_index(cs, j + 3) * 32)
        m0 = vmax(m0, vmax(vmax(a0, a1), vmax(a2, a3)))
        m1 = vmax(m1, vmax(vmax(b0, b1), vmax(b2, b3)))
        a0, b0 = _rowf32(table, load_index(cs, j + 4) * 32)
        a1, b1 = _rowf32(table, load_index(cs, j + 5) * 32)
        a2, b2 = _rowf32(table, load_index(cs, j + 6) * 32)
        a3, b3 = _rowf32(table, load_index(cs, j + 7) * 32)
        m2 = vmax(m2, vmax(vmax(a0, a1), vmax(a2, a3)))
        m3 = vmax(m3, vmax(vmax(b0, b1), vmax(b2, b3)))
        j += 8
    while j < n:
        a0, b0 = _rowf32(table, load_index(cs, j) * 32)
        m0 = vmax(m0, a0)
        m1 = vmax(m1, b0)
        j += 1
    return np.float32(vhadd(vmax(m0, m2)) + vhadd(vmax(m1, m3)))


@njit(**NJIT)
def doc_code_f32(table, W, codes, s, e):
    """sum over query lanes of max over tokens ``s:e`` of ``table[codes[j], :]`` (float32).

    ``table`` is flat ``(K, W)`` with ``W`` a multiple of 16 and zero padding lanes.
    Requires ``e > s``. (Codes are read with :func:`.simd.load_index`: Numba's
    negative-index fix-up of ``cs[j]`` would cost a compare and select per load.)
    """
    cs = codes[s:e]
    n = cs.shape[0]
    if W == 2 * LANES:
        return _doc_code_f32_w32(table, cs, n)
    total = 0.0
    g = 0
    while g + 2 * LANES <= W:
        m0 = vsplat(NEG, 16)
        m1 = vsplat(NEG, 16)
        j = 0
        while j + 4 <= n:
            c0 = load_index(cs, j) * W + g
            c1 = load_index(cs, j + 1) * W + g
            c2 = load_index(cs, j + 2) * W + g
            c3 = load_index(cs, j + 3) * W + g
            r0 = vmax(vmax(vload(table, c0, 16), vload(table, c1, 16)),
                      vmax(vload(table, c2, 16), vload(table, c3, 16)))  # fmt: skip
            r1 = vmax(vmax(vload(table, c0 + 16, 16), vload(table, c1 + 16, 16)),
                      vmax(vload(table, c2 + 16, 16), vload(table, c3 + 16, 16)))  # fmt: skip
            m0 = vmax(m0, r0)
            m1 = vmax(m1, r1)
            j += 4
        while j < n:
            c0 = load_index(cs, j) * W + g
            m0 = vmax(m0, vload(table, c0, 16))
            m1 = vmax(m1, vload(table, c0 + 16, 16))
            j += 1
        total += vhadd(m0) + vhadd(m1)
        g += 2 * LANES
    if g < W:
        m0 = vsplat(NEG, 16)
        j = 0
        while j + 4 <= n:
            r0 = vmax(vmax(vload(table, load_index(cs, j) * W + g, 16),
                           vload(table, load_index(cs, j + 1) * W + g, 16)),
                      vmax(vload(table, load_index(cs, j + 2) * W + g, 16),
                           vload(table, load_index(cs, j + 3) * W + g, 16)))  # fmt: skip
            m0 = vmax(m0, r0)
            j += 4
        while j < n:
            m0 = vmax(m0, vload(table, load_index(cs, j) * W + g, 16))
            j += 1
        total += vhadd(m0)
    return np.float32(total)


@njit(inline="always", **NJIT)
def _row32(table, cs, j):
    """uint8 table row (stride 32) of code ``cs[j]``."""
    return vload(table, load_index(cs, j) * 32, 32)


@njit(**NJIT)
def _doc_code_u8_w32(table, cs, n):
    """:func:`doc_code_u8` for uint8 codes and ``W == 32``, 8 codes per step. A code is
    one byte load (unchecked, :func:`.simd.load_index`), one shift and the row load +
    ``vpmaxub``: about 4 instructions per token, which bounds the kernel near 1 token
    per cycle (the L1 could deliver 2 rows per cycle). Extracting the codes from one
    64-bit load instead needs a shift and a mask per code: measured 1.11x slower on an
    AVX2 EPYC (it was 1.2x faster than byte loads *with* Numba's index fix-ups)."""
    m0 = vsplat(np.uint8(0), 32)
    m1 = m0
    j = 0
    while j + 8 <= n:
        m0 = vmax(m0, vmax(vmax(_row32(table, cs, j), _row32(table, cs, j + 1)),
                           vmax(_row32(table, cs, j + 2), _row32(table, cs, j + 3))))  # fmt: skip
        m1 = vmax(m1, vmax(vmax(_row32(table, cs, j + 4), _row32(table, cs, j + 5)),
                           vmax(_row32(table, cs, j + 6), _row32(table, cs, j + 7))))  # fmt: skip
        j += 8
    while j < n:
        m0 = vmax(m0, _row32(table, cs, j))
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
            r0 = vmax(vmax(vload(table, load_index(cs, j) * W + g, 32),
                           vload(table, load_index(cs, j + 1) * W + g, 32)),
                      vmax(vload(table, load_index(cs, j + 2) * W + g, 32),
                           vload(table, load_index(cs, j + 3) * W + g, 32)))  # fmt: skip
            r1 = vmax(vmax(vload(table, load_index(cs, j + 4) * W + g, 32),
                           vload(table, load_index(cs, j + 5) * W + g, 32)),
                      vmax(vload(table, load_index(cs, j + 6) * W + g, 32),
                           vload(table, load_index(cs, j + 7) * W + g, 32)))  # fmt: skip
            m0 = vmax(m0, r0)
            m1 = vmax(m1, r1)
            j += 8
        while j < n:
            m0 = vmax(m0, vload(table, load_index(cs, j) * W + g, 32))
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
@njit(inline="always", **NJIT)
def _lrow(lut, P1, i, per):
    """The ``per`` bucket values of packed byte ``P1[i]`` (row ``P1[i]`` of ``lut``)."""
    return vload(lut, per * load_index(P1, i), per)


@njit(**NJIT)
def _lut16(lut, P1, rb, g, per):
    """Bucket values of dimensions ``16g .. 16g+15`` of the token whose packed bytes start
    at ``P1[rb]`` as one vector: the per-byte rows of ``lut`` (``per`` values each) of the
    bytes that hold them, concatenated."""
    if per == 4:
        b = rb + 4 * g
        return vconcat(
            vconcat(_lrow(lut, P1, b, 4), _lrow(lut, P1, b + 1, 4)),
            vconcat(_lrow(lut, P1, b + 2, 4), _lrow(lut, P1, b + 3, 4)),
        )
    if per == 8:
        b = rb + 2 * g
        return vconcat(_lrow(lut, P1, b, 8), _lrow(lut, P1, b + 1, 8))
    b = rb + 8 * g
    lo = vconcat(
        vconcat(_lrow(lut, P1, b, 2), _lrow(lut, P1, b + 1, 2)),
        vconcat(_lrow(lut, P1, b + 2, 2), _lrow(lut, P1, b + 3, 2)),
    )
    hi = vconcat(
        vconcat(_lrow(lut, P1, b + 4, 2), _lrow(lut, P1, b + 5, 2)),
        vconcat(_lrow(lut, P1, b + 6, 2), _lrow(lut, P1, b + 7, 2)),
    )
    return vconcat(lo, hi)


@njit(inline="always", **NJIT)
def decode_token_raw(code, P1, rb, nb, src, scale, use_scale, dim, lut, per, out, o):
    """Decode one token into ``out[o:o+dim]`` (centroid + bucket values, not normalised);
    returns its squared L2 norm, accumulated in registers while decoding (re-reading the
    token would load wide vectors over narrow stores: a store-forwarding stall each).

    ``P1``: the packed residuals flattened (uint8), this token's ``nb`` bytes from
    ``P1[rb]`` (read in place: a per-token ``packed[j]`` view cost a reference-count
    update and made decoding ~3x slower). ``src``: the codebook flattened, float32, or
    int8 with ``use_scale`` (row ``c`` is ``scale[c] * src[c]``, the same product the
    dequantised codebook holds, so both decode alike; int8 rows are a quarter of the bytes
    to fetch). One packed byte holds ``per = 8 / nbits`` dimensions and ``lut[v]`` their
    ``per`` bucket values: with ``dim % 16 == 0`` the rows of 16 dimensions' bytes are
    concatenated into one 16-lane vector (one add, store and norm update per 16
    dimensions), else dimensions go one at a time.
    """
    base = code * dim
    zero = vsplat(np.float32(0.0), 16)
    s1 = scale[code] if use_scale else np.float32(1.0)
    sc = vsplat(s1, 16)
    if dim % 16 == 0:
        acc = zero
        for g in range(dim // 16):
            c = vload_f32(src, base + 16 * g, 16)
            if use_scale:
                c = vfma(c, sc, zero)
            x = vadd(c, _lut16(lut, P1, rb, g, per))
            vstore(out, o + 16 * g, x)
            acc = vfma(x, x, acc)
        return vhadd(acc)
    # other dimensions (rare): one value at a time, with the same strict (unfused) vector
    # operations as above, so int8 and float32 codebooks still decode alike
    z1 = vsplat(np.float32(0.0), 1)
    s1v = vsplat(s1, 1)
    acc1 = z1
    for b in range(nb):
        v = load_index(P1, rb + b) * per
        for t in range(per):
            d = b * per + t
            x = vadd(vfma(vload_f32(src, base + d, 1), s1v, z1), vload(lut, v + t, 1))
            vstore(out, o + d, x)
            acc1 = vfma(x, x, acc1)
    return vhadd(acc1)


@njit(**NJIT)
def inv_norm(ss):
    """``1 / sqrt(ss)``, or 1 for a zero vector (left as it is)."""
    return np.float32(1.0) / np.float32(np.sqrt(ss)) if ss > 0 else np.float32(1.0)


@njit(**NJIT_PARALLEL)
def residual_decode_kernel(codes, packed, centroids, lut, per, normalize, out):
    """Decode every token: ``out`` float32 ``(n_tokens, dim)`` flattened (centroid +
    bucket values, L2-normalised with ``normalize``)."""
    n = codes.shape[0]
    dim = centroids.shape[1]
    src = centroids.reshape(-1)
    nb = packed.shape[1]
    P1 = packed.reshape(-1)
    no_scale = np.zeros(0, np.float32)
    for i in prange(n):
        o = i * dim
        ss = decode_token_raw(
            np.int64(codes[i]), P1, i * nb, nb, src, no_scale, False, dim, lut, per, out, o
        )
        if normalize and ss > 0:
            inv = inv_norm(ss)
            for d in range(o, o + dim):
                out[d] *= inv


@njit(**NJIT_PARALLEL)
def residual_rerank_kernel(
    qp, nv, nq, codes, packed, src, scale, use_scale, dim, lut, per, normalize, d_off, ids,
    max_len, out, isa=ISA,
):  # fmt: skip
    """``out[r]`` = exact MaxSim of the packed query with decoded document ``ids[r]``.

    Each thread decodes a candidate into its own scratch (``max_len`` tokens) and runs the
    float32 micro-kernel on it; ``NEG`` for an empty document or id -1. The codebook is
    ``src``/``scale``/``use_scale`` as in :func:`decode_token_raw`. With ``normalize``
    the tokens are not rewritten: their inverse norms scale the dot products inside the
    micro-kernel (same scores; rewriting them after decoding measured 1.7x slower here).
    """
    n = ids.shape[0]
    nch = min(n, 256)
    nb = packed.shape[1]
    P1 = packed.reshape(-1)
    for c in prange(nch):
        buf = np.empty(max(max_len, 1) * dim, np.float32)
        inv = np.ones(max(max_len, 1), np.float32)
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
                ss = decode_token_raw(
                    np.int64(codes[j]), P1, j * nb, nb, src, scale, use_scale, dim, lut, per,
                    buf, (j - s) * dim,
                )  # fmt: skip
                if normalize:
                    inv[j - s] = inv_norm(ss)
            out[r] = doc_maxsim_scaled(qp, 0, nv, nq, dim, buf, 0, e - s, mbuf, inv, normalize, isa)
