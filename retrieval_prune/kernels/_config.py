"""Numba flags, read from one place (stumpy/pynndescent style)."""

import os

#: Flags for every @njit kernel. RETRIEVAL_PRUNE_NUMBA_CACHE=0 disables the on-disk cache.
NJIT = {
    "fastmath": True,
    "nogil": True,
    "cache": os.environ.get("RETRIEVAL_PRUNE_NUMBA_CACHE", "1") != "0",
    "error_model": "numpy",
}
#: Flags for kernels that run parallel over documents.
NJIT_PARALLEL = {**NJIT, "parallel": True}
