"""Numba kernels: @njit functions only, no validation (see wrappers in index/ and compress/)."""
