"""Crash-safe, checksummed, pickle-free index folders.

Layout of an index folder ``INDEX/``::

    INDEX/CURRENT                 the live generation's name and its manifest's sha256:
                                  "gen-000003\n<64 hex>\n" (a bare name: older indexes)
    INDEX/gen-000003/manifest.json
    INDEX/gen-000003/<array>.npy  (and any native files listed in the manifest)

A new generation is written to a temporary folder, every file fsynced, the folder
renamed into place, and only then is ``CURRENT`` replaced by an atomic rename of a
temporary pointer file. A crash at any moment leaves the old or the new generation
live, never a mix. Readers resolve ``CURRENT`` once and pin that generation.
Because ``CURRENT`` carries the manifest's sha256, a changed byte in the pointer or in
``manifest.json`` is caught too (the manifest's own entries then guard every other file).

Large arrays can be streamed to disk in batches (:class:`NpyAppender`, bounded memory)
and handed to :func:`write_generation` as ready ``.npy`` files.

``manifest.json`` records the format name and version, the package version, the
caller's metadata (pipeline spec, settings) and, for every file, its size and
sha256. :func:`read_generation` verifies them before any byte reaches numpy
(which does not check ``.npy`` lengths) or a native library.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune import __version__

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IndexCorruptedError",
    "write_generation",
    "read_generation",
    "current_generation",
    "sha256_file",
    "fsync_dir",
    "gc_generations",
    "NpyAppender",
    "scratch_dir",
]

FORMAT_NAME = "retrieval_prune.index"
FORMAT_VERSION = 1
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_POINTER_RE = re.compile(r"^(gen-\d{6,})\n([0-9a-f]{64})\n$")


class IndexCorruptedError(ValueError):
    """An index file is missing, truncated or changed; the message names the file."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _read_pointer(root: Path) -> tuple[str, str | None]:
    """``(generation name, manifest sha256 or None)`` from ``root/CURRENT``."""
    pointer = root / "CURRENT"
    if not pointer.is_file():
        raise IndexCorruptedError(
            f"{pointer} is missing: {root} is not a retrieval_prune index (or its build never finished)"
        )
    raw = pointer.read_bytes()
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise IndexCorruptedError(f"{pointer} is not ASCII text; the pointer file is corrupted") from None
    m = _POINTER_RE.match(text)
    if m is None:
        name = text.strip()
        if _GEN_RE.match(name) and "\n" not in name:  # legacy pointer: the name only
            return name, None
        raise IndexCorruptedError(f"{pointer} holds {text[:80]!r}, not a generation name and checksum")
    return m.group(1), m.group(2)


def current_generation(root: str | Path) -> Path:
    """The folder of the live generation of index ``root``."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no index at {root}; build one with `retrieval-prune build`")
    name, _ = _read_pointer(root)
    gen = root / name
    if not gen.is_dir():
        raise IndexCorruptedError(f"{root / 'CURRENT'} names {name}, but {gen} does not exist")
    return gen


def _next_generation_name(root: Path) -> str:
    nums = [int(m.group(1)) for p in root.iterdir() if (m := _GEN_RE.match(p.name))] if root.exists() else []
    return f"gen-{(max(nums) + 1 if nums else 1):06d}"


def write_generation(
    root: str | Path,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    files: Mapping[str, Path] | None = None,
    keep_old: int = 1,
    npy_files: Mapping[str, Path] | None = None,
) -> Path:
    """Write a new generation of index ``root`` and make it current atomically.

    Parameters
    ----------
    root : path of the index folder (created if missing).
    arrays : name -> array, each saved as ``name.npy`` (no object dtypes).
    meta : JSON-able metadata stored under ``"meta"`` in the manifest.
    files : name -> path of extra already-written files (native faiss/hnswlib
        files) to move into the generation; they are checksummed too.
    keep_old : how many older generations to keep for readers that pinned them.
    npy_files : name -> path of ``.npy`` files already written (e.g. by
        :class:`NpyAppender`, in a :func:`scratch_dir` of ``root``); they are moved
        (renamed, no copy) into the generation and load as arrays ``name``.

    Returns the path of the new generation folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-gen-", dir=root))
    try:
        entries: dict[str, dict[str, Any]] = {}
        for name, arr in arrays.items():
            if not _NAME_RE.match(name):
                raise ValueError(f"array name {name!r} must be letters, digits, '_', '.', '-'")
            arr = np.asarray(arr)
            if arr.dtype.hasobject:
                raise TypeError(f"array {name!r} has an object dtype; the index format stores none")
            fname = f"{name}.npy"
            with open(tmp / fname, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            entries[fname] = {"kind": "npy", "dtype": arr.dtype.str, "shape": list(arr.shape)}
        for name, src in (npy_files or {}).items():
            if not _NAME_RE.match(name):
                raise ValueError(f"array name {name!r} must be letters, digits, '_', '.', '-'")
            fname = f"{name}.npy"
            if fname in entries:
                raise ValueError(f"array {name!r} given both in arrays and npy_files")
            os.replace(src, tmp / fname)
            _fsync_file(tmp / fname)
            dtype, shape = _npy_header(tmp / fname)
            entries[fname] = {"kind": "npy", "dtype": dtype.str, "shape": list(shape)}
        for name, src in (files or {}).items():
            if not _NAME_RE.match(name):
                raise ValueError(f"file name {name!r} must be letters, digits, '_', '.', '-'")
            shutil.copyfile(src, tmp / name)
            _fsync_file(tmp / name)
            entries[name] = {"kind": "native"}
        for fname, entry in entries.items():
            p = tmp / fname
            entry["size"] = p.stat().st_size
            entry["sha256"] = sha256_file(p)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "meta": dict(meta),
            "files": entries,
        }
        with open(tmp / "manifest.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        gen_name = _next_generation_name(root)
        gen = root / gen_name
        os.rename(tmp, gen)
        fsync_dir(root)
        # atomically point CURRENT at the new generation
        ptr_tmp = root / f".CURRENT.{os.getpid()}.tmp"
        with open(ptr_tmp, "w", encoding="utf-8") as f:
            f.write(f"{gen_name}\n{sha256_file(gen / 'manifest.json')}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(ptr_tmp, root / "CURRENT")
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    gc_generations(root, keep_old=keep_old)
    return gen


def gc_generations(root: str | Path, keep_old: int = 1) -> None:
    """Remove unreferenced generations (keeping ``keep_old`` older ones) and temp leftovers."""
    root = Path(root)
    try:
        live = current_generation(root).name
    except (FileNotFoundError, IndexCorruptedError):
        return
    gens = sorted(
        (p for p in root.iterdir() if _GEN_RE.match(p.name) and p.name != live),
        key=lambda p: int(_GEN_RE.match(p.name).group(1)),  # type: ignore[union-attr]
    )
    live_num = int(live.split("-")[1])
    older = [g for g in gens if int(g.name.split("-")[1]) < live_num]
    newer = [g for g in gens if int(g.name.split("-")[1]) > live_num]  # crashed writers
    for g in older[: max(0, len(older) - keep_old)] + newer:
        shutil.rmtree(g, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith((".tmp-gen-", ".tmp-scratch-")) or (
            p.name.startswith(".CURRENT.") and p.name.endswith(".tmp")
        ):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _read_manifest(gen: Path, sha: str | None = None) -> dict[str, Any]:
    mpath = gen / "manifest.json"
    if not mpath.is_file():
        raise IndexCorruptedError(f"{mpath} is missing; the index generation is incomplete")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexCorruptedError(f"{mpath} is not valid JSON ({exc}); the index is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexCorruptedError(
            f"{mpath}: format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
            f"is not {FORMAT_NAME!r}"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{mpath}: format version {version!r} is newer than this package reads "
            f"({FORMAT_VERSION}); upgrade retrieval-prune to open it"
        )
    if sha is not None and sha256_file(mpath) != sha:
        raise IndexCorruptedError(
            f"{mpath} fails the sha256 recorded in {gen.parent / 'CURRENT'} (manifest.json or "
            "CURRENT changed on disk)"
        )
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("meta"), dict):
        raise IndexCorruptedError(f"{mpath} lacks its 'files' or 'meta' section")
    return manifest


def read_generation(
    root: str | Path, *, verify: bool = True, mmap: bool = True
) -> tuple[dict[str, Any], dict[str, np.ndarray], Path]:
    """Open the live generation: ``(meta, arrays, generation_folder)``.

    Every file's size and sha256 are checked against the manifest before it is
    loaded (``verify=False`` checks sizes only); ``.npy`` files open with
    ``mmap_mode="r"`` and ``allow_pickle=False``. Native files are returned as paths
    in ``meta["_native_files"]`` after verification.
    """
    root = Path(root)
    current_generation(root)  # clear errors for a missing index / pointer / folder
    name, sha = _read_pointer(root)  # read once: a writer may swap CURRENT meanwhile
    gen = root / name
    if not gen.is_dir():
        raise IndexCorruptedError(f"{root / 'CURRENT'} names {name}, but {gen} does not exist")
    manifest = _read_manifest(gen, sha)
    arrays: dict[str, np.ndarray] = {}
    native: dict[str, str] = {}
    for fname, entry in manifest["files"].items():
        p = gen / fname
        if not p.is_file():
            raise IndexCorruptedError(f"index file {p} is missing")
        size = p.stat().st_size
        if size != entry.get("size"):
            raise IndexCorruptedError(
                f"index file {p} has {size} bytes, manifest says {entry.get('size')} (truncated or changed)"
            )
        if verify and sha256_file(p) != entry.get("sha256"):
            raise IndexCorruptedError(f"index file {p} fails its sha256 check (changed on disk)")
        if entry.get("kind") == "npy":
            try:
                arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
            except Exception as exc:  # header damage that slipped past a size-only check
                raise IndexCorruptedError(f"index file {p} cannot be read as .npy: {exc}") from None
            if arr.dtype.str != entry.get("dtype") or list(arr.shape) != entry.get("shape"):
                raise IndexCorruptedError(
                    f"index file {p} holds {arr.dtype.str}{list(arr.shape)}, manifest says "
                    f"{entry.get('dtype')}{entry.get('shape')}"
                )
            arrays[fname[: -len(".npy")]] = arr
        else:
            native[fname] = str(p)
    meta = dict(manifest["meta"])
    meta["_native_files"] = native
    meta["_format_version"] = manifest["format_version"]
    meta["_package_version"] = manifest.get("package_version")
    return meta, arrays, gen


# -- streaming writes ----------------------------------------------------------------------
#: bytes reserved for the header of a streamed .npy file (a multiple of 64, numpy's alignment)
_NPY_HEADER = 128


def _npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: only C-order arrays without objects can be stored")
    return dtype, tuple(shape)


def scratch_dir(root: str | Path) -> Path:
    """A fresh folder inside index ``root`` for files streamed before a commit (same
    filesystem, so :func:`write_generation` can rename them); a crashed writer's
    leftovers are removed by the next commit."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".tmp-scratch-", dir=root))


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
