"""Crash-safe, checksummed, pickle-free index folders.

Layout of an index folder ``INDEX/``::

    INDEX/CURRENT                 one line: the name of the live generation, e.g. "gen-000003"
    INDEX/gen-000003/manifest.json
    INDEX/gen-000003/<array>.npy  (and any native files listed in the manifest)

A new generation is written to a temporary folder, every file fsynced, the folder
renamed into place, and only then is ``CURRENT`` replaced by an atomic rename of a
temporary pointer file. A crash at any moment leaves the old or the new generation
live, never a mix. Readers resolve ``CURRENT`` once and pin that generation.

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
]

FORMAT_NAME = "retrieval_prune.index"
FORMAT_VERSION = 1
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


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


def current_generation(root: str | Path) -> Path:
    """The folder of the live generation of index ``root``."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no index at {root}; build one with `retrieval-prune build`")
    pointer = root / "CURRENT"
    if not pointer.is_file():
        raise IndexCorruptedError(
            f"{pointer} is missing: {root} is not a retrieval_prune index (or its build never finished)"
        )
    name = pointer.read_text(encoding="utf-8").strip()
    if not _GEN_RE.match(name):
        raise IndexCorruptedError(f"{pointer} names {name!r}, not a generation folder")
    gen = root / name
    if not gen.is_dir():
        raise IndexCorruptedError(f"{pointer} names {name}, but {gen} does not exist")
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
            f.write(gen_name + "\n")
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
        if p.name.startswith(".tmp-gen-") or (p.name.startswith(".CURRENT.") and p.name.endswith(".tmp")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _read_manifest(gen: Path) -> dict[str, Any]:
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
    gen = current_generation(root)
    manifest = _read_manifest(gen)
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
