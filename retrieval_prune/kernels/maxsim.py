"""Exact float32 MaxSim kernels: score(q, d) = sum_i max_j <q_i, d_j>.

Layout
------
Documents are the flat ``float32`` token matrix of a :class:`MultiVectors` passed as a
1-D view ``D1 = embeddings.reshape(-1)`` plus its ``int64`` offsets. A query is packed
once by the wrapper (``kernels.ops.pack_queries``) into 16-lane vectors of query tokens:
``qp[v, d, l] = q[16 * v + l, d]`` (zero rows pad the last vector), flattened, so that the
16 values a vector instruction needs sit together.

Micro-kernel
------------
Vectorising over query tokens (16 lanes per AVX-512 register) and broadcasting one
scalar of a document token avoids any horizontal reduction: for 4 document tokens x
32 query tokens the inner loop over ``d`` does 2 vector loads of ``qp``, 4 scalar
broadcasts and 8 FMAs into 8 register accumulators -- the shape of a GEMM micro-kernel.
The running max per query token then stays in two vector registers for the whole
document. Numba/LLVM does not find this layout by itself (the loop vectoriser picks
``d`` and pays a horizontal sum per dot product; Numba disables the SLP vectoriser), so
the kernel is written with the explicit vector type of :mod:`.simd`
(``Vec(float32 x 16)``, an LLVM ``<16 x float>``: one zmm register with AVX-512, two ymm
with AVX2). The measured design note (a 4 query x 1 document token loop vectorised over
``d``) reached 0.56-0.69 of sgemm here; this layout reaches about 0.85.

A partial block of document tokens re-reads the last token (``min(j + r, e - 1)``):
max is idempotent, so no remainder loop is needed. Padded query lanes hold zero
vectors; their maxima are ignored by the final sum.

All kernels use a finite sentinel ``NEG = -FLT_MAX`` instead of ``-inf`` (``fastmath``
lets LLVM assume no infinities); wrappers turn it into ``-inf``.

AVX2 variant
------------
With 8-lane registers (``isa == ISA_AVX2``, see :mod:`.simd`) the 4 x 32 block above needs
16 accumulator registers plus the query and broadcast ones: more than the 16 there are,
and it spills (0.42 of sgemm measured on an AVX2 EPYC). There the micro-kernel is
:func:`dot6x1`: 6 document tokens x one 16-lane query vector = 12 accumulator registers,
2 query and 1 broadcast register. Every query vector of a block of 6 tokens is done while
those tokens are in L1, and the running maxima live in ``mbuf`` (one load and store per
block and vector, against 6 x ``dim`` FMAs).
"""

import numpy as np
from numba import njit, prange

from ._config import NJIT, NJIT_PARALLEL
from .simd import (
    ISA,
    ISA_AVX2,
    prefetch,
    vbroadcast,
    vbroadcast_f32,
    vfma,
    vload,
    vmax,
    vsplat,
    vstore,
)
from .topk import topk_push

#: Finite stand-in for -inf inside kernels (largest negative float32).
NEG = np.float32(-3.4028234663852886e38)
#: Query tokens per vector register.
LANES = 16


# --------------------------------------------------------------------------------------
# Per-document MaxSim
# --------------------------------------------------------------------------------------
@njit(**NJIT)
def _prefetch_rows(D1, start, count, limit):
    """Prefetch ``D1[start:start+count]`` (the next block of document tokens), one line per
    16 floats, unless it would run past the array. The hardware prefetcher alone leaves a
    single query at ~0.7 of sgemm (DRAM stalls); with this it matches a query batch."""
    if start <= limit:
        for i in range(0, count, 16):
            prefetch(D1, start + i)


@njit(inline="always", **NJIT)
def dot4x2(qp, base, b1, dim, D1, r0, r1, r2, r3):
    """The register-blocked GEMM step of MaxSim and of the score table: dot products of the
    rows at offsets ``r0..r3`` of ``D1`` (float32, or signed integers read as their values)
    with the 2 x 16 query lanes of the packed vectors at ``base`` and ``b1``. Returns the
    8 accumulators ``(a00, a01, a10, a11, a20, a21, a30, a31)`` (row, vector)."""
    z = vsplat(np.float32(0.0), 16)
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = z
    for d in range(dim):
        qa = vload(qp, base + d * LANES, 16)
        qb = vload(qp, b1 + d * LANES, 16)
        x = vbroadcast_f32(D1, r0 + d, 16)
        a00 = vfma(qa, x, a00)
        a01 = vfma(qb, x, a01)
        x = vbroadcast_f32(D1, r1 + d, 16)
        a10 = vfma(qa, x, a10)
        a11 = vfma(qb, x, a11)
        x = vbroadcast_f32(D1, r2 + d, 16)
        a20 = vfma(qa, x, a20)
        a21 = vfma(qb, x, a21)
        x = vbroadcast_f32(D1, r3 + d, 16)
        a30 = vfma(qa, x, a30)
        a31 = vfma(qb, x, a31)
    return a00, a01, a10, a11, a20, a21, a30, a31


@njit(inline="always", **NJIT)
def dot8x1(qp, base, dim, D1, r0, r1, r2, r3, r4, r5, r6, r7):
    """:func:`dot4x2` for one vector of 16 query lanes and 8 rows: ``(a0, ..., a7)``."""
    z = vsplat(np.float32(0.0), 16)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
    for d in range(dim):
        qa = vload(qp, base + d * LANES, 16)
        a0 = vfma(qa, vbroadcast_f32(D1, r0 + d, 16), a0)
        a1 = vfma(qa, vbroadcast_f32(D1, r1 + d, 16), a1)
        a2 = vfma(qa, vbroadcast_f32(D1, r2 + d, 16), a2)
        a3 = vfma(qa, vbroadcast_f32(D1, r3 + d, 16), a3)
        a4 = vfma(qa, vbroadcast_f32(D1, r4 + d, 16), a4)
        a5 = vfma(qa, vbroadcast_f32(D1, r5 + d, 16), a5)
        a6 = vfma(qa, vbroadcast_f32(D1, r6 + d, 16), a6)
        a7 = vfma(qa, vbroadcast_f32(D1, r7 + d, 16), a7)
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(inline="always", **NJIT)
def dot6x1(qp, base, d0, d1, D1, r0, r1, r2, r3, r4, r5, a0, a1, a2, a3, a4, a5):
    """The AVX2 GEMM step: the accumulators ``a0..a5`` plus the dot products, over
    dimensions ``d0:d1``, of the rows at offsets ``r0..r5`` of ``D1`` (float32, or signed
    integers read as their values) with the 16 query lanes of the packed vector at
    ``base``: 12 ymm accumulators, 2 query and 1 broadcast register of the 16. Callers
    step ``d0`` by 16 to interleave a prefetch per row and 16 dimensions."""
    for d in range(d0, d1):
        qa = vload(qp, base + d * LANES, 16)
        a0 = vfma(qa, vbroadcast_f32(D1, r0 + d, 16), a0)
        a1 = vfma(qa, vbroadcast_f32(D1, r1 + d, 16), a1)
        a2 = vfma(qa, vbroadcast_f32(D1, r2 + d, 16), a2)
        a3 = vfma(qa, vbroadcast_f32(D1, r3 + d, 16), a3)
        a4 = vfma(qa, vbroadcast_f32(D1, r4 + d, 16), a4)
        a5 = vfma(qa, vbroadcast_f32(D1, r5 + d, 16), a5)
    return a0, a1, a2, a3, a4, a5


@njit(inline="always", **NJIT)
def rows6x1(qp, base, dim, D1, r0, r1, r2, r3, r4, r5, ahead):
    """Dot products of the rows at offsets ``r0..r5`` of ``D1`` with the 16 query lanes of
    the packed vector at ``base``, over all ``dim`` dimensions (:func:`dot6x1` per 16
    dimensions). With ``ahead`` the same place of the next 6 rows (from ``r0 + 6 dim``) is
    prefetched as it goes, one line per row and 16 dimensions: spread over the block, since
    one burst per block measured slower. Shared by the AVX2 MaxSim and score table."""
    z = vsplat(np.float32(0.0), 16)
    a0 = a1 = a2 = a3 = a4 = a5 = z
    for d0 in range(0, dim, 16):
        if ahead:
            p = r0 + 6 * dim + d0
            prefetch(D1, p)
            prefetch(D1, p + dim)
            prefetch(D1, p + 2 * dim)
            prefetch(D1, p + 3 * dim)
            prefetch(D1, p + 4 * dim)
            prefetch(D1, p + 5 * dim)
        a0, a1, a2, a3, a4, a5 = dot6x1(
            qp, base, d0, min(d0 + 16, dim), D1, r0, r1, r2, r3, r4, r5, a0, a1, a2, a3, a4, a5
        )
    return a0, a1, a2, a3, a4, a5


@njit(**NJIT)
def _max_avx2(qp, base, nv, dim, D1, s, e, mbuf, inv, use_inv):
    """Max over document tokens ``s:e`` for all ``nv`` query vectors from ``base``
    (the AVX2 variant of :func:`_max2`): 6 tokens x 16 query lanes per micro-kernel call,
    every query vector per block of 6 tokens; maxima to ``mbuf[:16 nv]``. While the first
    vector passes, the same place of the next 6 tokens is prefetched, one line per token
    and 16 dimensions (spread over the block: one burst per block measured slower)."""
    neg = vsplat(NEG, 16)
    z = vsplat(np.float32(0.0), 16)
    for v in range(nv):
        vstore(mbuf, v * LANES, neg)
    last = e - 1
    limit = D1.shape[0] - 12 * dim
    stride = dim * LANES
    j = s
    while j < e:
        r0 = j * dim
        r1 = min(j + 1, last) * dim
        r2 = min(j + 2, last) * dim
        r3 = min(j + 3, last) * dim
        r4 = min(j + 4, last) * dim
        r5 = min(j + 5, last) * dim
        ahead = r0 <= limit
        for v in range(nv):
            a0, a1, a2, a3, a4, a5 = rows6x1(
                qp, base + v * stride, dim, D1, r0, r1, r2, r3, r4, r5, v == 0 and ahead
            )
            if use_inv:
                a0 = vfma(a0, vbroadcast(inv, j, 16), z)
                a1 = vfma(a1, vbroadcast(inv, min(j + 1, last), 16), z)
                a2 = vfma(a2, vbroadcast(inv, min(j + 2, last), 16), z)
                a3 = vfma(a3, vbroadcast(inv, min(j + 3, last), 16), z)
                a4 = vfma(a4, vbroadcast(inv, min(j + 4, last), 16), z)
                a5 = vfma(a5, vbroadcast(inv, min(j + 5, last), 16), z)
            m = vmax(vmax(vmax(a0, a1), vmax(a2, a3)), vmax(a4, a5))
            mo = v * LANES
            vstore(mbuf, mo, vmax(vload(mbuf, mo, 16), m))
        j += 6


@njit(**NJIT)
def _max2(qp, base, dim, D1, s, e, mbuf, mo, inv, use_inv):
    """Max over document tokens ``s:e`` for the 32 query lanes of vectors at ``base``.

    Writes the 32 maxima to ``mbuf[mo:mo+32]``. 4 document tokens x 2 vectors per step.
    With ``use_inv`` token ``j``'s dot products are multiplied by ``inv[j]`` before the max
    (scores against L2-normalised tokens without rewriting them: see ``residual_rerank``).
    """
    m0 = vsplat(NEG, 16)
    m1 = vsplat(NEG, 16)
    b1 = base + dim * LANES
    last = e - 1
    z = vsplat(np.float32(0.0), 16)
    limit = D1.shape[0] - 4 * dim
    j = s
    while j < e:
        r0 = j * dim
        r1 = min(j + 1, last) * dim
        r2 = min(j + 2, last) * dim
        r3 = min(j + 3, last) * dim
        _prefetch_rows(D1, (j + 4) * dim, 4 * dim, limit)
        a00, a01, a10, a11, a20, a21, a30, a31 = dot4x2(qp, base, b1, dim, D1, r0, r1, r2, r3)
        if use_inv:
            x = vbroadcast(inv, j, 16)
            a00 = vfma(a00, x, z)
            a01 = vfma(a01, x, z)
            x = vbroadcast(inv, min(j + 1, last), 16)
            a10 = vfma(a10, x, z)
            a11 = vfma(a11, x, z)
            x = vbroadcast(inv, min(j + 2, last), 16)
            a20 = vfma(a20, x, z)
            a21 = vfma(a21, x, z)
            x = vbroadcast(inv, min(j + 3, last), 16)
            a30 = vfma(a30, x, z)
            a31 = vfma(a31, x, z)
        m0 = vmax(m0, vmax(vmax(a00, a10), vmax(a20, a30)))
        m1 = vmax(m1, vmax(vmax(a01, a11), vmax(a21, a31)))
        j += 4
    vstore(mbuf, mo, m0)
    vstore(mbuf, mo + LANES, m1)


@njit(**NJIT)
def _max1(qp, base, dim, D1, s, e, mbuf, mo, inv, use_inv):
    """Like :func:`_max2` for one vector of 16 query lanes (8 document tokens per step)."""
    m0 = vsplat(NEG, 16)
    last = e - 1
    z = vsplat(np.float32(0.0), 16)
    limit = D1.shape[0] - 8 * dim
    j = s
    while j < e:
        _prefetch_rows(D1, (j + 8) * dim, 8 * dim, limit)
        r0 = j * dim
        r1 = min(j + 1, last) * dim
        r2 = min(j + 2, last) * dim
        r3 = min(j + 3, last) * dim
        r4 = min(j + 4, last) * dim
        r5 = min(j + 5, last) * dim
        r6 = min(j + 6, last) * dim
        r7 = min(j + 7, last) * dim
        a0, a1, a2, a3, a4, a5, a6, a7 = dot8x1(qp, base, dim, D1, r0, r1, r2, r3, r4, r5, r6, r7)
        if use_inv:
            a0 = vfma(a0, vbroadcast(inv, j, 16), z)
            a1 = vfma(a1, vbroadcast(inv, min(j + 1, last), 16), z)
            a2 = vfma(a2, vbroadcast(inv, min(j + 2, last), 16), z)
            a3 = vfma(a3, vbroadcast(inv, min(j + 3, last), 16), z)
            a4 = vfma(a4, vbroadcast(inv, min(j + 4, last), 16), z)
            a5 = vfma(a5, vbroadcast(inv, min(j + 5, last), 16), z)
            a6 = vfma(a6, vbroadcast(inv, min(j + 6, last), 16), z)
            a7 = vfma(a7, vbroadcast(inv, min(j + 7, last), 16), z)
        m0 = vmax(m0, vmax(vmax(vmax(a0, a1), vmax(a2, a3)), vmax(vmax(a4, a5), vmax(a6, a7))))
        j += 8
    vstore(mbuf, mo, m0)


@njit(**NJIT)
def doc_maxsim(qp, qv0, nv, nq, dim, D1, s, e, mbuf, isa=ISA):
    """MaxSim of one packed query against document tokens ``D1[s*dim:e*dim]``.

    ``qv0``: first vector of the query in ``qp``; ``nv`` vectors, ``nq`` real tokens;
    ``mbuf``: float32 scratch of at least ``nv * 16``; ``isa``: the register blocking
    (:mod:`.simd`). Requires ``e > s``.
    """
    return doc_maxsim_scaled(qp, qv0, nv, nq, dim, D1, s, e, mbuf, mbuf, False, isa)


@njit(**NJIT)
def doc_maxsim_scaled(qp, qv0, nv, nq, dim, D1, s, e, mbuf, inv, use_inv, isa=ISA):
    """:func:`doc_maxsim` where, with ``use_inv``, token ``j`` counts as ``inv[j] * D1[j]``
    (``inv`` indexed like the tokens: ``inv[s:e]``)."""
    stride = dim * LANES
    if isa == ISA_AVX2:
        _max_avx2(qp, qv0 * stride, nv, dim, D1, s, e, mbuf, inv, use_inv)
    else:
        v = 0
        while v + 2 <= nv:
            _max2(qp, (qv0 + v) * stride, dim, D1, s, e, mbuf, v * LANES, inv, use_inv)
            v += 2
        if v < nv:
            _max1(qp, (qv0 + v) * stride, dim, D1, s, e, mbuf, v * LANES, inv, use_inv)
    t = np.float32(0.0)
    for i in range(nq):
        t += mbuf[i]
    return t


# --------------------------------------------------------------------------------------
# Scans
# --------------------------------------------------------------------------------------
@njit(**NJIT_PARALLEL)
def maxsim_search_kernel(
    qp, qv_off, q_len, dim, D1, d_off, alive, use_alive, bounds, k, ts, ti, cnt, isa=ISA
):
    """Fused MaxSim top-k over all documents for a batch of packed queries.

    Parallel over document chunks ``bounds (n_chunks + 1,)``; per chunk and query a
    best-first list ``ts/ti[c, q, :k]`` with ``cnt[c, q]`` entries (merge with
    ``topk.topk_merge``). Every document is scored against all queries while its tokens
    are in cache. Empty documents and ``alive[doc] == 0`` (if ``use_alive``) are skipped.
    """
    nch = bounds.shape[0] - 1
    nqry = q_len.shape[0]
    maxnv = 1
    for q in range(nqry):
        maxnv = max(maxnv, qv_off[q + 1] - qv_off[q])
    for c in prange(nch):
        mbuf = np.empty(maxnv * LANES, np.float32)
        for q in range(nqry):
            cnt[c, q] = 0
        for doc in range(bounds[c], bounds[c + 1]):
            s = d_off[doc]
            e = d_off[doc + 1]
            if e <= s:
                continue
            if use_alive and alive[doc] == 0:
                continue
            for q in range(nqry):
                v0 = qv_off[q]
                sc = doc_maxsim(qp, v0, qv_off[q + 1] - v0, q_len[q], dim, D1, s, e, mbuf, isa)
                n = cnt[c, q]
                if n < k or sc > ts[c, q, k - 1]:
                    cnt[c, q] = topk_push(ts[c, q], ti[c, q], n, k, sc, doc)


@njit(**NJIT_PARALLEL)
def maxsim_rerank_kernel(qp, nv, nq, dim, D1, d_off, ids, out, isa=ISA):
    """``out[r]`` = MaxSim of one packed query with document ``ids[r]``.

    ``ids[r] < 0`` or an empty document gives ``NEG``.
    """
    n = ids.shape[0]
    nch = min(n, 256)
    for c in prange(nch):
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
            else:
                out[r] = doc_maxsim(qp, 0, nv, nq, dim, D1, s, e, mbuf, isa)


@njit(**NJIT_PARALLEL)
def maxsim_scores_kernel(qp, nv, nq, dim, D1, d_off, out, isa=ISA):
    """``out[doc]`` = MaxSim of one packed query with every document (empty -> ``NEG``)."""
    n = d_off.shape[0] - 1
    nch = min(n, 256)
    for c in prange(nch):
        mbuf = np.empty(max(nv, 1) * LANES, np.float32)
        for doc in range(c * n // nch, (c + 1) * n // nch):
            s = d_off[doc]
            e = d_off[doc + 1]
            if e <= s:
                out[doc] = NEG
            else:
                out[doc] = doc_maxsim(qp, 0, nv, nq, dim, D1, s, e, mbuf, isa)
