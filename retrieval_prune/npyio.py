"""``.npy`` files written in batches and read back header first (no pickle, bounded memory).

:class:`NpyAppender` appends rows to a ``.npy`` file and writes its header on close, so an
array larger than memory is written a block at a time; :func:`npy_header` reads a file's
dtype and shape without loading it. Ground floor: imports nothing of ours.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NpyAppender", "npy_header", "release_pages"]

#: bytes reserved for the header of a streamed .npy file (a multiple of 64, numpy's alignment)
_NPY_HEADER = 128


def npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) from a .npy header; refuses Fortran order and object dtypes."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: only C-order arrays without objects can be stored")
    return dtype, tuple(shape)


class NpyAppender:
    """Append rows to a ``.npy`` file in batches; the header is written on :meth:`close`.

    Memory stays bounded by the batch: rows go straight to the file. The result is a
    plain C-order ``.npy`` (version 1.0) that ``np.load(..., mmap_mode="r")`` opens.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.npy"
    >>> with NpyAppender(p, np.float32, (2,)) as app:
    ...     app.append(np.ones((3, 2), np.float32)); app.append(np.zeros((1, 2), np.float32))
    >>> np.load(p).shape
    (4, 2)
    """

    def __init__(self, path: str | Path, dtype: Any, tail: tuple[int, ...] = ()) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if self.dtype.hasobject:
            raise TypeError("object arrays cannot be stored")
        self.tail = tuple(int(t) for t in tail)
        self.rows = 0
        self._f = open(self.path, "wb")
        self._f.write(b"\0" * _NPY_HEADER)

    def append(self, rows: np.ndarray) -> None:
        a = np.asarray(rows)
        if a.shape[1:] != self.tail:
            raise ValueError(f"{self.path.name}: rows of shape {a.shape[1:]}, expected {self.tail}")
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if a.size:
            self._f.write(memoryview(a.reshape(-1)).cast("B"))
        self.rows += a.shape[0]

    def close(self) -> Path:
        if self._f.closed:
            return self.path
        header = repr(
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (self.rows, *self.tail),
            }
        ).encode("latin1")
        body = _NPY_HEADER - 10
        if len(header) + 1 > body:
            raise ValueError(f"{self.path.name}: header too long for the reserved space")
        header = header + b" " * (body - len(header) - 1) + b"\n"
        self._f.seek(0)
        self._f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", body) + header)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self.path

    def __enter__(self) -> NpyAppender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def release_pages(arr: Any) -> None:
    """Drop the pages a memory-mapped array has touched from this process's resident set
    (``madvise(MADV_DONTNEED)`` on its read-only file mapping: the data stay in the page
    cache and read back on the next access). Streaming passes call it after each block so
    that reading a large file does not grow the process's RSS by the file's size. A no-op
    for arrays that are not memory-mapped, or where the platform lacks ``madvise``."""
    import mmap

    mm = getattr(arr, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass
