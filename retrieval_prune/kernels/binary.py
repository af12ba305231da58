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
    lane-wise max -- no per-dimension work. The table is int16, quantised per query with
    ``scale = max|partial| / (32767 // n_bytes)`` so that a sum of ``n_bytes`` entries
    cannot overflow; the score error is at most ``n_q * n_bytes * scale / 2`` (about
    1e-4 of the score range at d = 128). For d = 128 the table is 256 KiB (L2-resident).

Hamming MaxSim (bits vs bits)
    similarity = dim - 2 * hamming (= the +-1 dot product), score = sum_i max_j.
    Documents use a planar layout built once by ``index.ops.to_planar``: word ``w`` of
    every token is contiguous (``words[w, token]``), and each document is padded to a
    multiple of 8 tokens by repeating its last token (max is idempotent). 8 tokens are
    then one ``uint64 x 8`` vector per word: xor, ``VPOPCNTQ``, add, min.

128-bit Hamming scan
    One or a few 128-bit query codes against ``uint64 (n, 2)`` codes; distances of a
    block of 256 codes are computed (LLVM vectorises the popcounts), and the block is
    only walked for top-k insertion when its minimum can enter the current top-k.
"""

import numpy as np
from numba import njit, prange

from ._config import NJIT, NJIT_PARALLEL
from .maxsim import NEG
from .popcount import popcount, vadd, vhadd, vhmin, vload, vmax, vmin, vpopcount, vsplat, vxor
from .topk import topk_push

#: query-token lanes of the asymmetric lookup table (int16 x 32 = one 512-bit vector)
LANES_I16 = 32
#: codes per block of the Hamming scan
SCAN_BLOCK = 256


# --------------------------------------------------------------------------------------
# asymmetric: float query vs +-1 bits
# --------------------------------------------------------------------------------------
@njit(**NJIT)
def doc_binary_lut(lut, n_groups, nb, bits, s, e):
    """Integer score sum_i max_j sum_b lut[g, b, bits[j, b], i] over tokens ``s:e``.

    ``lut`` is flat ``(n_groups, nb, 256, 32)`` int16; ``bits`` is ``(n_tokens, nb)``
    uint8. Two accumulators halve the add dependency chain. Requires ``e > s``.
    """
    total = 0
    half = nb // 2
    for g in range(n_groups):
        gb = g * nb * 256
        m = vsplat(np.int16(-32768), 32)
        for j in range(s, e):
            a0 = vsplat(np.int16(0), 32)
            a1 = vsplat(np.int16(0), 32)
            for h in range(half):
                b = 2 * h
                a0 = vadd(a0, vload(lut, (gb + b * 256 + np.int64(bits[j, b])) * 32, 32))
                a1 = vadd(a1, vload(lut, (gb + (b + 1) * 256 + np.int64(bits[j, b + 1])) * 32, 32))
            if nb % 2:
                b = nb - 1
                a0 = vadd(a0, vload(lut, (gb + b * 256 + np.int64(bits[j, b])) * 32, 32))
            m = vmax(m, vadd(a0, a1))
        total += vhadd(m)
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
@njit(**NJIT_PARALLEL)
def hamming_scan_kernel(codes, q, bounds, k, ts, ti, cnt):
    """Top-k smallest Hamming distances of queries ``q (n_q, 2)`` over ``codes (n, 2)``.

    Per chunk ``c`` of ``bounds`` and query, a best-first list of ``-distance`` in
    ``ts[c, qi]`` / ids in ``ti[c, qi]`` with ``cnt[c, qi]`` entries (ties: lower id).
    """
    nch = bounds.shape[0] - 1
    nq = q.shape[0]
    for c in prange(nch):
        buf = np.empty(SCAN_BLOCK, np.int64)
        for qi in range(nq):
            cnt[c, qi] = 0
        lo = bounds[c]
        end = bounds[c + 1]
        while lo < end:
            hi = min(lo + SCAN_BLOCK, end)
            for qi in range(nq):
                q0 = q[qi, 0]
                q1 = q[qi, 1]
                mn = np.int64(1 << 20)
                for i in range(lo, hi):
                    d = popcount(codes[i, 0] ^ q0) + popcount(codes[i, 1] ^ q1)
                    buf[i - lo] = d
                    mn = min(mn, d)
                n = cnt[c, qi]
                if n == k and mn >= -ts[c, qi, k - 1]:
                    continue  # nothing in this block beats the current k-th
                for i in range(lo, hi):
                    d = buf[i - lo]
                    if n < k or d < -ts[c, qi, k - 1]:
                        n = topk_push(ts[c, qi], ti[c, qi], n, k, -d, i)
                cnt[c, qi] = n
            lo = hi


@njit(**NJIT_PARALLEL)
def hamming_distances_kernel(codes, q, out):
    """All distances ``out[qi, i]`` of queries ``q (n_q, 2)`` to ``codes (n, 2)``."""
    n = codes.shape[0]
    nq = q.shape[0]
    nch = min(n, 1024)
    for c in prange(nch):
        for qi in range(nq):
            q0 = q[qi, 0]
            q1 = q[qi, 1]
            for i in range(c * n // nch, (c + 1) * n // nch):
                out[qi, i] = popcount(codes[i, 0] ^ q0) + popcount(codes[i, 1] ^ q1)
