"""Kernels of the benchmark's measuring instruments (:mod:`retrieval_prune.evaluation.bench_kernels`).

``sum_u64`` reads an array as fast as the machine allows (the read-bandwidth roof),
``add_chain`` times a dependent float64 add chain (the clock estimate), ``vnni_chain``
runs independent ``vpdpbusd`` chains in registers (the int8 roof; AVX-512 VNNI hosts only)
and ``avx2_i8_chain`` / ``avx2_i16_chain`` the AVX2 int8 instructions the same way
(``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd``: the int8 roof without VNNI; ``vpmaddwd`` +
``vpaddd``: what the AVX2 int8 table kernel issues).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._config import NJIT, NJIT_PARALLEL
from .simd import vadd, vbitcast, vdpbusd, vhadd, vload, vmaddubsw, vmaddwd, vsplat

__all__ = ["sum_u64", "add_chain", "vnni_chain", "avx2_i8_chain", "avx2_i16_chain"]


@njit(**NJIT_PARALLEL)
def sum_u64(a, n_chunks):
    """Parallel sum of a uint64 array: the read-bandwidth roof.

    Explicit 8-lane vectors with 4 accumulators: a plain ``for i in range(lo, hi)`` loop
    does not vectorise in Numba (the negative-index fix-up of ``a[i]`` blocks it) and
    reads at a fraction of the bandwidth.
    """
    n = a.shape[0] // 32 * 32
    part = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        lo = (c * (n // 32) // n_chunks) * 32
        hi = ((c + 1) * (n // 32) // n_chunks) * 32
        a0 = vsplat(np.uint64(0), 8)
        a1 = a0
        a2 = a0
        a3 = a0
        for i in range(lo, hi, 32):
            a0 = vadd(a0, vload(a, i, 8))
            a1 = vadd(a1, vload(a, i + 8, 8))
            a2 = vadd(a2, vload(a, i + 16, 8))
            a3 = vadd(a3, vload(a, i + 24, 8))
        part[c] = vhadd(vadd(vadd(a0, a1), vadd(a2, a3)))
    return part.sum()


# no fastmath: the adds must stay one dependent chain (3-cycle FADD latency on Zen 4)
@njit(**{**NJIT_PARALLEL, "fastmath": False})
def add_chain(n, n_threads):
    out = np.zeros(n_threads)
    for t in prange(n_threads):
        x = 0.0
        y = 1e-9 * (t + 1)
        for _ in range(n):
            x = x + y
        out[t] = x
    return out


@njit(**NJIT_PARALLEL)
def vnni_chain(n, n_threads):
    """12 independent ``vpdpbusd`` chains per thread, in registers (AVX-512 VNNI only)."""
    total = 0
    for th in prange(n_threads):
        x = vsplat(np.int32(0x01010101), 16)
        y = vsplat(np.int32(0x01020304 + th), 16)
        a0 = a1 = a2 = a3 = a4 = a5 = vsplat(np.int32(th), 16)
        b0 = b1 = b2 = b3 = b4 = b5 = vsplat(np.int32(th + 1), 16)
        for _ in range(n):
            a0 = vdpbusd(a0, x, y)
            a1 = vdpbusd(a1, x, y)
            a2 = vdpbusd(a2, x, y)
            a3 = vdpbusd(a3, x, y)
            a4 = vdpbusd(a4, x, y)
            a5 = vdpbusd(a5, x, y)
            b0 = vdpbusd(b0, x, y)
            b1 = vdpbusd(b1, x, y)
            b2 = vdpbusd(b2, x, y)
            b3 = vdpbusd(b3, x, y)
            b4 = vdpbusd(b4, x, y)
            b5 = vdpbusd(b5, x, y)
        s = vadd(vadd(vadd(a0, a1), vadd(a2, a3)), vadd(a4, a5))
        s = vadd(s, vadd(vadd(vadd(b0, b1), vadd(b2, b3)), vadd(b4, b5)))
        total += vhadd(s)
    return total


@njit(inline="always", **NJIT)
def _ubsw(a, y):
    # the products read the accumulator itself, so no two chains compute the same value
    # (identical products would be computed once)
    # vpmaddwd with ones widens the int16 pair sums to int32 (as the kernels do)
    return vadd(a, vmaddwd(vmaddubsw(vbitcast(a, y), y), vsplat(np.int16(1), 16)))


@njit(inline="always", **NJIT)
def _wd(a, y):
    return vadd(a, vmaddwd(vbitcast(a, y), y))


@njit(**NJIT)
def _i8_chain1(n, th):
    y = vsplat(np.int8(3), 32)
    # distinct starting values: equal chains could be merged into one by the compiler
    a0 = vsplat(np.int32(th + 1), 8)
    a1 = vsplat(np.int32(th + 2), 8)
    a2 = vsplat(np.int32(th + 3), 8)
    a3 = vsplat(np.int32(th + 4), 8)
    a4 = vsplat(np.int32(th + 5), 8)
    a5 = vsplat(np.int32(th + 6), 8)
    b0 = vsplat(np.int32(th + 7), 8)
    b1 = vsplat(np.int32(th + 8), 8)
    b2 = vsplat(np.int32(th + 9), 8)
    b3 = vsplat(np.int32(th + 10), 8)
    b4 = vsplat(np.int32(th + 11), 8)
    b5 = vsplat(np.int32(th + 12), 8)
    for _ in range(n):
        a0 = _ubsw(a0, y)
        a1 = _ubsw(a1, y)
        a2 = _ubsw(a2, y)
        a3 = _ubsw(a3, y)
        a4 = _ubsw(a4, y)
        a5 = _ubsw(a5, y)
        b0 = _ubsw(b0, y)
        b1 = _ubsw(b1, y)
        b2 = _ubsw(b2, y)
        b3 = _ubsw(b3, y)
        b4 = _ubsw(b4, y)
        b5 = _ubsw(b5, y)
    s = vadd(vadd(vadd(a0, a1), vadd(a2, a3)), vadd(a4, a5))
    return vhadd(vadd(s, vadd(vadd(vadd(b0, b1), vadd(b2, b3)), vadd(b4, b5))))


@njit(**NJIT)
def _i16_chain1(n, th):
    y = vsplat(np.int16(3), 16)
    # distinct starting values: equal chains could be merged into one by the compiler
    a0 = vsplat(np.int32(th + 1), 8)
    a1 = vsplat(np.int32(th + 2), 8)
    a2 = vsplat(np.int32(th + 3), 8)
    a3 = vsplat(np.int32(th + 4), 8)
    a4 = vsplat(np.int32(th + 5), 8)
    a5 = vsplat(np.int32(th + 6), 8)
    b0 = vsplat(np.int32(th + 7), 8)
    b1 = vsplat(np.int32(th + 8), 8)
    b2 = vsplat(np.int32(th + 9), 8)
    b3 = vsplat(np.int32(th + 10), 8)
    b4 = vsplat(np.int32(th + 11), 8)
    b5 = vsplat(np.int32(th + 12), 8)
    for _ in range(n):
        a0 = _wd(a0, y)
        a1 = _wd(a1, y)
        a2 = _wd(a2, y)
        a3 = _wd(a3, y)
        a4 = _wd(a4, y)
        a5 = _wd(a5, y)
        b0 = _wd(b0, y)
        b1 = _wd(b1, y)
        b2 = _wd(b2, y)
        b3 = _wd(b3, y)
        b4 = _wd(b4, y)
        b5 = _wd(b5, y)
    s = vadd(vadd(vadd(a0, a1), vadd(a2, a3)), vadd(a4, a5))
    return vhadd(vadd(s, vadd(vadd(vadd(b0, b1), vadd(b2, b3)), vadd(b4, b5))))


# the chains run in their own (non-parallel) functions: inside a prange body the same
# loop measured ~0.6x (its vectors did not all stay in registers)
@njit(**NJIT_PARALLEL)
def avx2_i8_chain(n, n_threads):
    """12 independent chains per thread of ``vpmaddubsw`` + ``vpmaddwd`` (by ones) +
    ``vpaddd`` on 256-bit registers: 32 int8 multiply-adds per step, the AVX2 form of
    ``vpdpbusd`` (AVX2 hosts only)."""
    total = 0
    for th in prange(n_threads):
        total += _i8_chain1(n, th)
    return total


@njit(**NJIT_PARALLEL)
def avx2_i16_chain(n, n_threads):
    """12 independent ``vpmaddwd`` + ``vpaddd`` chains per thread (16 int16 multiply-adds
    per step; AVX2 hosts only)."""
    total = 0
    for th in prange(n_threads):
        total += _i16_chain1(n, th)
    return total
