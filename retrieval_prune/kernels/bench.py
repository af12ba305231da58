"""Kernels of the benchmark's measuring instruments (:mod:`retrieval_prune.evaluation.bench_kernels`).

``sum_u64`` reads an array as fast as the machine allows (the read-bandwidth roof),
``add_chain`` times a dependent float64 add chain (the clock estimate) and ``vnni_chain``
runs independent ``vpdpbusd`` chains in registers (the int8 roof; AVX-512 VNNI hosts only).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._config import NJIT_PARALLEL
from .simd import vadd, vdpbusd, vhadd, vload, vsplat

__all__ = ["sum_u64", "add_chain", "vnni_chain"]


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
