"""Sign-bit binary codes: asymmetric MaxSim, Hamming MaxSim and a 128-bit Hamming scan.

Canonical storage of a token is ``np.packbits(x > 0, bitorder="little")``: byte ``b``
holds dimensions ``8b .. 8b+7``, dimension ``8b+t`` at bit ``t``; a set bit means +1,
a clear bit -1.

Asymmetric MaxSim (float query vs +-1 document bits)
    score = sum_i max_j sum_d q_id * (2 bit_jd - 1). Per query the wrapper builds, for
    every byte position ``b`` and byte value ``v``, the partial dot product of the 8
    query dimensions of that byte with the +-1 pattern ``v``, for all query tokens at
    once: ``lut[g, b, v, lane]`` (lanes = query tokens, 32 per group). A document token
    is then ``n_bytes`` row loads + adds of a 32-lane vector, and its running max is one
    lane-wise max -- no per-dimension work. The row loads are random accesses into an
    L2-resident table, which bounds the speed: this machine serves about 0.55 G random
    64-byte L2 rows per second and core (vs ~2 G from an L1-sized table), i.e. ~0.6 M
    documents/s at 32 x 128 tokens, d = 128. A nibble table (32 KiB, L1-sized) needs
    twice the lookups and measured no faster. The table is int16, quantised per query with
    ``scale = max|partial| / (32767 // n_bytes)`` so that a sum of ``n_bytes`` entries
    cannot overflow; the score error is at most ``n_q * n_bytes * scale / 2`` (about
    1e-4 of the score range at d = 128). For d = 128 the table is 256 KiB (L2-resident).

Hamming MaxSim (bits vs bits)
    similarity = dim - 2 * hamming (= the +-1 dot product), score = sum_i max_j.
    Documents use a planar layout built once by ``kernels.ops.to_planar``: word ``w`` of
    every token is contiguous (``words[w, token]``), and each document is padded to a
    multiple of 8 tokens by repeating its last token (max is idempotent). 8 tokens are
    then one ``uint64 x 8`` vector per word: xor, ``VPOPCNTQ``, add, min.

128-bit Hamming scan
    One or a few 128-bit query codes against ``uint64 (n, 2)`` codes, 8 codes per vector
    step (see :func:`hamming_scan_kernel`); distances only leave the registers when one
    of them can enter the current top-k.
"""

import numpy as np
from numba import njit, prange

from ._config import NJIT, NJIT_PARALLEL
from .maxsim import NEG
from .simd import (
    ISA,
    ISA_AVX2,
    load_u64,
    popcount,
    vadd,
    vbitcast,
    vhadd,
    vhmin,
    vload,
    vlt_any,
    vmax,
    vmin,
    vpairadd,
    vpopcount,
    vsadbw,
    vsplat,
    vstore,
    vxor,
)
from .topk import topk_push

#: query-token lanes of the asymmetric lookup table (int16 x 32 = one 512-bit vector)
LANES_I16 = 32
#: minimum codes per parallel chunk of the Hamming scan
SCAN_BLOCK = 4096


# --------------------------------------------------------------------------------------
# asymmetric: float query vs +-1 bits
# --------------------------------------------------------------------------------------
@njit(**NJIT)
def _lut_token(lut, gb, nb, row):
    a = vsplat(np.int16(0), 32)
    for b in range(nb):
        a = vadd(a, vload(lut, (gb + b * 256 + np.int64(row[b])) * 32, 32))
    return a


@njit(**NJIT)
def doc_binary_lut(lut, n_groups, nb, bits, s, e):
    """Integer score sum_i max_j sum_b lut[g, b, bits[j, b], i] over tokens ``s:e``.

    ``lut`` is flat ``(n_groups, nb, 256, 32)`` int16; ``bits`` is ``(n_tokens, nb)``
    uint8. Two tokens are summed side by side: the row loads are random accesses into a
    256 KiB (L2) table and the second independent chain keeps more of them in flight
    (measured ~1.2x). Requires ``e > s``.
    """
    db = bits[s:e]  # a slice: provably non-negative indices, no wraparound fix-ups
    n = db.shape[0]
    total = 0
    for g in range(n_groups):
        gb = g * nb * 256
        m0 = vsplat(np.int16(-32768), 32)
        m1 = m0
        j = 0
        while j + 2 <= n:
            r0 = db[j]
            r1 = db[j + 1]
            a0 = vsplat(np.int16(0), 32)
            a1 = a0
            for b in range(nb):
                base = gb + b * 256
                a0 = vadd(a0, vload(lut, (base + np.int64(r0[b])) * 32, 32))
                a1 = vadd(a1, vload(lut, (base + np.int64(r1[b])) * 32, 32))
            m0 = vmax(m0, a0)
            m1 = vmax(m1, a1)
            j += 2
        if j < n:
            m0 = vmax(m0, _lut_token(lut, gb, nb, db[j]))
        total += vhadd(vmax(m0, m1))
    return total


@njit(**NJIT_PARALLEL)
def binary_lut_scores_kernel(lut, n_groups, nb, scale, bits, d_off, ids, use_ids, out):
    """``out[r]`` = asymmetric MaxSim of document ``ids[r]`` (or ``r``); ``NEG`` if empty."""
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
            if e > s:
                out[r] = np.float32(scale * doc_binary_lut(lut, n_groups, nb, bits, s, e))
            else:
                out[r] = NEG


# --------------------------------------------------------------------------------------
# Hamming MaxSim on planar words
# --------------------------------------------------------------------------------------
@njit(**NJIT)
def doc_hamming(qw, nq, nw, P, npad, s, e):
    """sum_i min_j hamming(q_i, d_j) over padded planar tokens ``s:e`` (multiple of 8).

    ``qw`` flat ``(nq, nw)`` uint64 query words; ``P`` flat ``(nw, npad)`` planar words.
    """
    total = 0
    big = vsplat(np.uint64(1 << 40), 8)
    if nw == 2:
        for i in range(nq):
            q0 = vsplat(qw[2 * i], 8)
            q1 = vsplat(qw[2 * i + 1], 8)
            m = big
            for j in range(s, e, 8):
                h = vadd(
                    vpopcount(vxor(vload(P, j, 8), q0)),
                    vpopcount(vxor(vload(P, npad + j, 8), q1)),
                )
                m = vmin(m, h)
            total += vhmin(m)
    else:
        for i in range(nq):
            m = big
            for j in range(s, e, 8):
                h = vsplat(np.uint64(0), 8)
                for w in range(nw):
                    qv = vsplat(qw[i * nw + w], 8)
                    h = vadd(h, vpopcount(vxor(vload(P, w * npad + j, 8), qv)))
                m = vmin(m, h)
            total += vhmin(m)
    return total


@njit(**NJIT)
def _doc_hamming2_avx2(qw, nq, P, npad, s, e):
    """:func:`doc_hamming` for 128-bit tokens (``nw == 2``) with AVX2 integer instructions
    (only where ``HAS_AVX2``). Without ``VPOPCNTQ``, popcounts are taken per byte (nibble
    ``vpshufb``), the two words' byte counts added, and one ``vpsadbw`` gives 4 token
    distances; the running minimum is a 32-bit ``vpminsd`` on their low halves (an
    unsigned 64-bit minimum has no AVX2 instruction: LLVM's stand-in took 4)."""
    total = 0
    big = vsplat(np.int32(1 << 30), 8)
    b8 = vsplat(np.uint8(0), 32)
    i32 = vsplat(np.int32(0), 8)
    i64 = vsplat(np.int64(0), 4)
    for i in range(nq):
        q0 = vsplat(qw[2 * i], 4)
        q1 = vsplat(qw[2 * i + 1], 4)
        m0 = big
        m1 = big
        for j in range(s, e, 8):
            c0 = vadd(
                vpopcount(vbitcast(vxor(vload(P, j, 4), q0), b8)),
                vpopcount(vbitcast(vxor(vload(P, npad + j, 4), q1), b8)),
            )
            c1 = vadd(
                vpopcount(vbitcast(vxor(vload(P, j + 4, 4), q0), b8)),
                vpopcount(vbitcast(vxor(vload(P, npad + j + 4, 4), q1), b8)),
            )
            m0 = vmin(m0, vbitcast(vsadbw(c0), i32))
            m1 = vmin(m1, vbitcast(vsadbw(c1), i32))
        # distances sit in the even 32-bit lanes; the odd ones (zero high halves) went to
        # 0, so each 64-bit lane of the minimum is its even lane's value
        total += vhmin(vbitcast(vmin(m0, m1), i64))
    return total


@njit(**NJIT_PARALLEL)
def hamming_scores_avx2_kernel(qw, nq, dim, P, npad, p_off, ids, use_ids, out):
    """:func:`hamming_scores_kernel` for 128-bit tokens with :func:`_doc_hamming2_avx2`
    (only where ``HAS_AVX2``)."""
    n = out.shape[0]
    nch = min(n, 1024)
    for c in prange(nch):
        for r in range(c * n // nch, (c + 1) * n // nch):
            doc = ids[r] if use_ids else r
            if doc < 0:
                out[r] = NEG
                continue
            s = p_off[doc]
            e = p_off[doc + 1]
            if e > s:
                out[r] = np.float32(nq * dim - 2 * _doc_hamming2_avx2(qw, nq, P, npad, s, e))
            else:
                out[r] = NEG


@njit(**NJIT_PARALLEL)
def hamming_scores_kernel(qw, nq, nw, dim, P, npad, p_off, ids, use_ids, out):
    """``out[r]`` = sum_i (dim - 2 min_j hamming) for document ``ids[r]`` (or ``r``)."""
    n = out.shape[0]
    nch = min(n, 1024)
    for c in prange(nch):
        for r in range(c * n // nch, (c + 1) * n // nch):
            doc = ids[r] if use_ids else r
            if doc < 0:
                out[r] = NEG
                continue
            s = p_off[doc]
            e = p_off[doc + 1]
            if e > s:
                out[r] = np.float32(nq * dim - 2 * doc_hamming(qw, nq, nw, P, npad, s, e))
            else:
                out[r] = NEG


# --------------------------------------------------------------------------------------
# 128-bit Hamming scan with fused top-k
# --------------------------------------------------------------------------------------
@njit(**NJIT)
def _scan_insert(dist, base, n_valid, k, ts, ti, n):
    """Insert the first ``n_valid`` distances of ``dist`` (ids ``base + r``) into a
    best-first list of ``-distance``; returns the new count."""
    for r in range(n_valid):
        d = np.int64(dist[r])
        if n < k or -d > ts[k - 1]:
            n = topk_push(ts, ti, n, k, -d, base + r)
    return n


@njit(inline="always", **NJIT)
def _dist4(codes, i, q0, q1):
    """Scalar ``POPCNT`` distances of codes ``i .. i+3`` to the query ``(q0, q1)``."""
    d0 = popcount(load_u64(codes, 2 * i) ^ q0) + popcount(load_u64(codes, 2 * i + 1) ^ q1)
    d1 = popcount(load_u64(codes, 2 * i + 2) ^ q0) + popcount(load_u64(codes, 2 * i + 3) ^ q1)
    d2 = popcount(load_u64(codes, 2 * i + 4) ^ q0) + popcount(load_u64(codes, 2 * i + 5) ^ q1)
    d3 = popcount(load_u64(codes, 2 * i + 6) ^ q0) + popcount(load_u64(codes, 2 * i + 7) ^ q1)
    return d0, d1, d2, d3


@njit(**NJIT)
def _scan1_avx2(codes, qpat, i, end, k, ts, ti, cnt, thr, buf):
    """The AVX2 main loop of :func:`hamming_scan_kernel` for one query, from code ``i``
    (8 codes per step while they last; returns where it stopped). Without ``VPOPCNTQ`` a
    vector popcount costs ~7 instructions per 4 words, so 4 of the 8 codes go through the
    vector unit and 4 through scalar ``POPCNT`` on the integer ALUs, side by side
    (all-vector measured 20 GB/s from DRAM here, all-scalar 23, this mix 25). The query
    and the admission threshold stay in registers; ``cnt[0]``/``thr`` are written back."""
    q0 = qpat[0]
    q1 = qpat[1]
    qv = vload(qpat, 0, 4)
    n = cnt[0]
    th = thr[0]
    tv = vsplat(th, 4)
    tq = np.int64(th)
    while i + 8 <= end:
        dv = vpairadd(
            vpopcount(vxor(vload(codes, 2 * i, 4), qv)),
            vpopcount(vxor(vload(codes, 2 * i + 4, 4), qv)),
        )
        d4, d5, d6, d7 = _dist4(codes, i + 4, q0, q1)
        if vlt_any(dv, tv) or min(min(d4, d5), min(d6, d7)) < tq:
            vstore(buf, 0, dv)
            buf[4] = np.uint64(d4)
            buf[5] = np.uint64(d5)
            buf[6] = np.uint64(d6)
            buf[7] = np.uint64(d7)
            n = _scan_insert(buf, i, 8, k, ts, ti, n)
            if n == k:
                th = np.uint64(-ts[k - 1])
                tv = vsplat(th, 4)
                tq = np.int64(th)
        i += 8
    cnt[0] = n
    thr[0:8] = th
    return i


@njit(**NJIT_PARALLEL)
def hamming_scan_kernel(codes, qpat, bounds, a0, k, ts, ti, cnt, isa=ISA):
    """Top-k smallest Hamming distances of queries over 128-bit codes.

    ``codes``: flat uint64 ``(2 n,)`` (code ``i`` = words ``2i, 2i+1``); ``qpat``: flat
    uint64 ``(n_q, 8)``, each query's two words repeated 4 times. 8 codes per step: two
    8-lane loads, xor with the query pattern, ``VPOPCNTQ``, and a pairwise add of the two
    words' counts give 8 distances in one vector; only when one of them beats the
    query's current k-th distance (``vlt_any``) are they inserted one by one. Codes
    before the first 64-byte boundary of a chunk (index ``a0`` mod 4) are done one by
    one, so the vector loads stay within cache lines. The AVX2 variant (``isa``) scans a
    single query with :func:`_scan1_avx2` (half the codes through scalar ``POPCNT``).
    Per chunk ``c`` of ``bounds`` and query: a best-first list of ``-distance`` in
    ``ts[c, qi]`` / ids in ``ti[c, qi]`` with ``cnt[c, qi]`` entries (ties: lower id).
    """
    nch = bounds.shape[0] - 1
    nq = qpat.shape[0] // 8
    for c in prange(nch):
        buf = np.empty(8, np.uint64)
        # per query: current admission threshold (k-th distance, or 2**40 while not full)
        thr = np.full(nq * 8, np.uint64(1 << 40), np.uint64)
        for qi in range(nq):
            cnt[c, qi] = 0
        lo = bounds[c]
        end = bounds[c + 1]
        i = lo
        while i < end and (i - a0) % 4 != 0:
            for qi in range(nq):
                d = popcount(codes[2 * i] ^ qpat[qi * 8]) + popcount(
                    codes[2 * i + 1] ^ qpat[qi * 8 + 1]
                )
                buf[0] = np.uint64(d)
                cnt[c, qi] = _scan_insert(buf, i, 1, k, ts[c, qi], ti[c, qi], cnt[c, qi])
                if cnt[c, qi] == k:
                    thr[qi * 8 : qi * 8 + 8] = np.uint64(-ts[c, qi, k - 1])
            i += 1
        if isa == ISA_AVX2 and nq == 1 and i + 8 <= end:
            i = _scan1_avx2(codes, qpat, i, end, k, ts[c, 0], ti[c, 0], cnt[c], thr, buf)
        while i + 8 <= end:
            a = vload(codes, 2 * i, 8)
            b = vload(codes, 2 * i + 8, 8)
            for qi in range(nq):
                qv = vload(qpat, qi * 8, 8)
                dv = vpairadd(vpopcount(vxor(a, qv)), vpopcount(vxor(b, qv)))
                if vlt_any(dv, vload(thr, qi * 8, 8)):
                    vstore(buf, 0, dv)
                    n = _scan_insert(buf, i, 8, k, ts[c, qi], ti[c, qi], cnt[c, qi])
                    cnt[c, qi] = n
                    if n == k:
                        thr[qi * 8 : qi * 8 + 8] = np.uint64(-ts[c, qi, k - 1])
            i += 8
        while i < end:
            for qi in range(nq):
                d = popcount(codes[2 * i] ^ qpat[qi * 8]) + popcount(
                    codes[2 * i + 1] ^ qpat[qi * 8 + 1]
                )
                buf[0] = np.uint64(d)
                cnt[c, qi] = _scan_insert(buf, i, 1, k, ts[c, qi], ti[c, qi], cnt[c, qi])
            i += 1


@njit(**NJIT_PARALLEL)
def hamming_distances_kernel(codes, q, out):
    """All distances ``out[qi, i]`` of queries ``q (n_q, 2)`` to ``codes (n, 2)``."""
    n = codes.shape[0]
    nq = q.shape[0]
    nch = min(n, 1024)
    for c in prange(nch):
        lo = c * n // nch
        blk = codes[lo : (c + 1) * n // nch]
        for qi in range(nq):
            q0 = q[qi, 0]
            q1 = q[qi, 1]
            o = out[qi, lo : lo + blk.shape[0]]
            for i in range(blk.shape[0]):
                o[i] = popcount(blk[i, 0] ^ q0) + popcount(blk[i, 1] ^ q1)
