"""Numba kernels: @njit functions that never validate, their validating wrappers (:mod:`.ops`)
and the LLVM popcount / SIMD vector intrinsics they are written with (:mod:`.simd`)."""
