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

Large arrays can be streamed to disk in batches (:class:`~retrieval_prune.npyio.NpyAppender`)
and handed to :func:`write_generation` as ready ``.npy`` files.

``manifest.json`` records the format name and version, the package version, the
caller's metadata (pipeline spec, settings) and, for every file, its size and
sha256. :func:`read_generation` verifies them before any byte reaches numpy
(which does not check ``.npy`` lengths) or a native library.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune import __version__
from retrieval_prune.index.manifest import ManifestError, check_manifest, parse_manifest
from retrieval_prune.npyio import NpyAppender, npy_header

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IndexCorruptedError",
    "IndexLockedError",
    "IndexChangedError",
    "SIGNING_KEY_ENV",
    "write_generation",
    "read_generation",
    "current_generation",
    "live_pointer",
    "set_pointer",
    "write_lock",
    "lock_holder",
    "sha256_file",
    "fsync_dir",
    "gc_generations",
    "NpyAppender",
    "scratch_dir",
]

FORMAT_NAME = "retrieval_prune.index"
FORMAT_VERSION = 1
#: environment variable holding the key of the optional HMAC signature of ``CURRENT``
SIGNING_KEY_ENV = "RETRIEVAL_PRUNE_INDEX_KEY"
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_POINTER_RE = re.compile(r"^(gen-\d{6,})\n([0-9a-f]{64})\n(?:hmac-sha256:([0-9a-f]{64})\n)?$")
_TMP_RE = re.compile(r"^\.(tmp-gen-|tmp-scratch-|CURRENT\.)(?:(\d+)[-.])?")
#: a pointer file is a few lines; anything longer is not one
_POINTER_MAX_BYTES = 256
#: largest manifest read (a manifest lists files and settings; doc metadata can make it big)
MANIFEST_MAX_BYTES = 1 << 30


class IndexCorruptedError(ValueError):
    """An index file is missing, truncated, changed or malformed; the message names the file."""


class IndexChangedError(ValueError):
    """Another writer committed a generation since this copy of the index was loaded."""


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


def _signing_key() -> bytes | None:
    key = os.environ.get(SIGNING_KEY_ENV)
    return key.encode("utf-8") if key else None


def _signature(key: bytes, gen_name: str, manifest_sha: str) -> str:
    return hmac.new(key, f"{FORMAT_NAME}\n{gen_name}\n{manifest_sha}\n".encode(), "sha256").hexdigest()


def _read_pointer(root: Path, verify_signature: bool = True) -> tuple[str, str]:
    """``(generation name, manifest sha256)`` from ``root/CURRENT``; the HMAC signature is
    checked when ``RETRIEVAL_PRUNE_INDEX_KEY`` is set (and ``verify_signature``)."""
    pointer = root / "CURRENT"
    if not pointer.is_file():
        raise IndexCorruptedError(
            f"{pointer} is missing: {root} is not a retrieval_prune index (or its build never finished)"
        )
    with open(pointer, "rb") as f:
        raw = f.read(_POINTER_MAX_BYTES + 1)
    if len(raw) > _POINTER_MAX_BYTES:
        raise IndexCorruptedError(f"{pointer} is over {_POINTER_MAX_BYTES} bytes; not a pointer file")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise IndexCorruptedError(f"{pointer} is not ASCII text; the pointer file is corrupted") from None
    m = _POINTER_RE.match(text)
    if m is None:
        if _GEN_RE.match(text.strip()):
            raise IndexCorruptedError(
                f"{pointer} names {text.strip()!r} without the manifest's sha256 (a pointer "
                "written before checksummed pointers, or an edited one); unchecked pointers are "
                "refused -- rebuild the index (`retrieval-prune build`)"
            )
        raise IndexCorruptedError(f"{pointer} holds {text[:80]!r}, not a generation name and checksum")
    name, sha, sig = m.group(1), m.group(2), m.group(3)
    key = _signing_key() if verify_signature else None
    if key is not None:
        if sig is None:
            raise IndexCorruptedError(
                f"{pointer} is not signed, but {SIGNING_KEY_ENV} is set: the folder was not "
                "written with this key (unset the variable to open unsigned indexes)"
            )
        if not hmac.compare_digest(sig, _signature(key, name, sha)):
            raise IndexCorruptedError(
                f"{pointer}: the HMAC signature does not match {SIGNING_KEY_ENV} (another key, "
                "or the index was changed after it was signed)"
            )
    return name, sha


def live_pointer(root: str | Path, *, verify_signature: bool = True) -> tuple[str, str]:
    """``(generation name, manifest sha256)`` of the live generation of index ``root``
    (``verify_signature=False``: only to tell whether another writer committed)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no index at {root}; build one with `retrieval-prune build`")
    return _read_pointer(root, verify_signature)


def set_pointer(root: str | Path, name: str, sha: str) -> None:
    """Point ``root/CURRENT`` at generation ``name`` (manifest sha256 ``sha``) atomically,
    signed when ``RETRIEVAL_PRUNE_INDEX_KEY`` is set. For a writer that must roll a folder
    back to a generation it still holds (a sharded index's shard whose commit the top-level
    manifest never adopted); the caller holds :func:`write_lock`. The generation's manifest
    must exist and match ``sha``."""
    root = Path(root)
    if not _GEN_RE.match(name) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ValueError(f"{name!r}, {sha!r} is not a generation name and manifest sha256")
    _read_manifest(root / name, sha)  # refuse to point at anything but that manifest
    key = _signing_key()
    sig = f"hmac-sha256:{_signature(key, name, sha)}\n" if key is not None else ""
    tmp = root / f".CURRENT.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{name}\n{sha}\n{sig}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / "CURRENT")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(root)


def current_generation(root: str | Path) -> Path:
    """The folder of the live generation of index ``root``."""
    root = Path(root)
    name, _ = live_pointer(root)
    gen = root / name
    if not gen.is_dir():
        raise IndexCorruptedError(f"{root / 'CURRENT'} names {name}, but {gen} does not exist")
    return gen


def _next_generation_name(root: Path) -> str:
    nums = [int(m.group(1)) for p in root.iterdir() if (m := _GEN_RE.match(p.name))] if root.exists() else []
    return f"gen-{(max(nums) + 1 if nums else 1):06d}"


# -- the write lock ----------------------------------------------------------------------------
#: lock file inside an index folder; writers hold an exclusive ``flock`` on it
LOCK_FILE = ".lock"
#: seconds a writer waits for another writer by default (``RETRIEVAL_PRUNE_LOCK_TIMEOUT``)
DEFAULT_LOCK_TIMEOUT = 300.0


class IndexLockedError(TimeoutError):
    """Another writer held an index folder's write lock for longer than the timeout."""


_held: dict[str, list[Any]] = {}  # real path -> [fd, depth] for locks this process holds
_thread_locks: dict[str, threading.RLock] = {}
_registry_guard = threading.Lock()


def _lock_timeout(timeout: float | None) -> float:
    if timeout is None:
        raw = os.environ.get("RETRIEVAL_PRUNE_LOCK_TIMEOUT")
        if raw is None:
            return DEFAULT_LOCK_TIMEOUT
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(
                f"RETRIEVAL_PRUNE_LOCK_TIMEOUT={raw!r} is not a number of seconds"
            ) from None
    if not timeout >= 0:  # also rejects NaN
        raise ValueError(f"lock timeout {timeout!r} must be a number of seconds >= 0")
    return float(timeout)


def lock_holder(root: str | Path) -> int | None:
    """PID recorded by the process that holds (or last held) ``root``'s write lock."""
    try:
        raw = (Path(root) / LOCK_FILE).read_bytes()[:32]
        return int(raw.split()[0]) if raw.strip() else None
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def write_lock(root: str | Path, timeout: float | None = None) -> Iterator[Path]:
    """Hold the exclusive write lock of index folder ``root`` (created if missing).

    Every writer -- ``add``, ``delete``, ``compact``, a build over an existing folder, a
    serving process's saves -- holds it over its whole read-modify-write, so two writers
    never interleave. Readers never take it. The lock is an ``fcntl.flock`` on
    ``root/.lock``: the kernel releases it when its holder dies, so a crashed writer never
    leaves the folder locked. Re-entrant within one thread; other threads and processes
    wait up to ``timeout`` seconds (default ``RETRIEVAL_PRUNE_LOCK_TIMEOUT`` or 300), then
    :class:`IndexLockedError` names the holder's PID.
    """
    import fcntl

    root = Path(root)
    wait = _lock_timeout(timeout)
    root.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(root)
    with _registry_guard:
        rlock = _thread_locks.setdefault(key, threading.RLock())
    deadline = time.monotonic() + wait
    if not rlock.acquire(timeout=wait):
        raise IndexLockedError(
            f"{root} is locked by another thread of this process (pid {os.getpid()}); "
            f"waited {wait:g} s"
        )
    try:
        entry = _held.get(key)
        if entry is not None:  # this thread already holds it
            entry[1] += 1
            try:
                yield root
            finally:
                entry[1] -= 1
            return
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            delay = 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = lock_holder(root)
                        raise IndexLockedError(
                            f"{root} is locked by another writer (pid {holder if holder else '?'}); "
                            f"waited {wait:g} s. Wait for it to finish or raise --lock-timeout "
                            "(RETRIEVAL_PRUNE_LOCK_TIMEOUT)"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _held[key] = [fd, 1]
            try:
                yield root
            finally:
                del _held[key]
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        rlock.release()


def _tmp_owner(name: str) -> int | None:
    """PID in a temporary entry's name (``.tmp-gen-<pid>-...``), None for old-style names."""
    m = _TMP_RE.match(name)
    return int(m.group(2)) if m and m.group(2) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_generation(
    root: str | Path,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    files: Mapping[str, Path] | None = None,
    keep_old: int = 1,
    npy_files: Mapping[str, Path] | None = None,
    lock_timeout: float | None = None,
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
    lock_timeout : seconds to wait for another writer (see :func:`write_lock`).

    The commit runs under :func:`write_lock`; a caller doing a read-modify-write holds
    that lock itself from the read on. When ``RETRIEVAL_PRUNE_INDEX_KEY`` is set, the
    pointer is signed with it (HMAC-SHA256 over the generation and manifest checksum).

    Returns the path of the new generation folder.
    """
    root = Path(root)
    with write_lock(root, lock_timeout):
        gen = _commit(root, arrays, meta, files, npy_files)
        gc_generations(root, keep_old=keep_old)
    return gen


def _commit(root, arrays, meta, files, npy_files) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-gen-{os.getpid()}-", dir=root))
    gen: Path | None = None
    ptr_tmp = root / f".CURRENT.{os.getpid()}.tmp"
    switched = False
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
            dtype, shape = npy_header(tmp / fname)
            entries[fname] = {"kind": "npy", "dtype": dtype.str, "shape": list(shape)}
        for name, src in (files or {}).items():
            if not _NAME_RE.match(name) or name == "manifest.json":
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
            json.dump(manifest, f, indent=1, sort_keys=False, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        gen_name = _next_generation_name(root)
        gen = root / gen_name
        os.rename(tmp, gen)
        fsync_dir(root)
        # atomically point CURRENT at the new generation
        sha = sha256_file(gen / "manifest.json")
        key = _signing_key()
        sig = f"hmac-sha256:{_signature(key, gen_name, sha)}\n" if key is not None else ""
        with open(ptr_tmp, "w", encoding="utf-8") as f:
            f.write(f"{gen_name}\n{sha}\n{sig}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(ptr_tmp, root / "CURRENT")
        switched = True
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        ptr_tmp.unlink(missing_ok=True)
        if gen is not None and not switched:
            shutil.rmtree(gen, ignore_errors=True)
        raise
    return gen


def gc_generations(root: str | Path, keep_old: int = 1) -> None:
    """Remove what is provably abandoned: generations older than the live one beyond
    ``keep_old`` (kept for readers that pinned them), generations newer than the live one
    (a writer died between renaming its folder and switching ``CURRENT``; under the lock
    no other writer is in flight) and temporary entries whose writing process is gone.

    Runs under the write lock (re-entrant: a writer calls it from its own commit)."""
    root = Path(root)
    if not (root / "CURRENT").is_file():
        return
    with write_lock(root):
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
        me = os.getpid()
        for p in root.iterdir():
            if not _TMP_RE.match(p.name):
                continue
            owner = _tmp_owner(p.name)
            if owner is not None and (owner == me or _pid_alive(owner)):
                continue  # a live writer's scratch (a streaming build before its commit)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _read_manifest(gen: Path, sha: str) -> dict[str, Any]:
    """The manifest of generation ``gen``: its sha256 checked against ``CURRENT``'s before a
    byte is parsed, then parsed with bounded nesting and validated against the schema."""
    mpath = gen / "manifest.json"
    if not mpath.is_file():
        raise IndexCorruptedError(f"{mpath} is missing; the index generation is incomplete")
    size = mpath.stat().st_size
    if size > MANIFEST_MAX_BYTES:
        raise IndexCorruptedError(f"{mpath} has {size} bytes, over the {MANIFEST_MAX_BYTES} limit")
    raw = mpath.read_bytes()
    if hashlib.sha256(raw).hexdigest() != sha:
        raise IndexCorruptedError(
            f"{mpath} fails the sha256 recorded in {gen.parent / 'CURRENT'} (manifest.json or "
            "CURRENT changed on disk)"
        )
    try:
        manifest = parse_manifest(raw)
        check_manifest(manifest, FORMAT_NAME, FORMAT_VERSION)
    except ManifestError as exc:
        if exc.newer_version:
            raise ValueError(f"{mpath}: {exc}; upgrade retrieval-prune to open it") from None
        raise IndexCorruptedError(f"{mpath}: {exc}") from None
    return manifest


def read_generation(
    root: str | Path, *, verify: bool = True, mmap: bool = True, pointer: tuple[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], Path]:
    """Open the live generation: ``(meta, arrays, generation_folder)``.

    ``CURRENT``'s checksum of the manifest is checked before the manifest is parsed; the
    manifest is validated against its schema (types, ranges, plain file names); every
    file's size and sha256 are checked against it before the file is loaded
    (``verify=False`` checks sizes only); ``.npy`` headers must match the manifest's dtype
    and shape; ``.npy`` files open with ``mmap_mode="r"`` and ``allow_pickle=False``.
    Native files are returned as paths in ``meta["_native_files"]`` after verification.
    ``pointer=(generation, manifest sha256)`` opens that generation instead of the live one
    (a sharded index pins each shard's generation in its own manifest).
    """
    root = Path(root)
    if pointer is None:
        name, sha = live_pointer(root)  # read once: a writer may swap CURRENT meanwhile
    else:
        name, sha = pointer
        if not isinstance(name, str) or not _GEN_RE.match(name) or not isinstance(sha, str) \
                or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise IndexCorruptedError(f"{root}: {str(pointer)[:120]} is not a generation name and sha256")
    gen = root / name
    if gen.is_symlink():
        raise IndexCorruptedError(f"{gen} is a symbolic link; a generation must be a folder inside {root}")
    if not gen.is_dir():
        raise IndexCorruptedError(f"{root / 'CURRENT'} names {name}, but {gen} does not exist")
    manifest = _read_manifest(gen, sha)
    arrays: dict[str, np.ndarray] = {}
    native: dict[str, str] = {}
    for fname, entry in manifest["files"].items():
        p = gen / fname
        if p.is_symlink():
            raise IndexCorruptedError(f"index file {p} is a symbolic link; index files must be plain files")
        if not p.is_file():
            raise IndexCorruptedError(f"index file {p} is missing")
        size = p.stat().st_size
        if size != entry["size"]:
            raise IndexCorruptedError(
                f"index file {p} has {size} bytes, manifest says {entry['size']} (truncated or changed)"
            )
        if verify and sha256_file(p) != entry["sha256"]:
            raise IndexCorruptedError(f"index file {p} fails its sha256 check (changed on disk)")
        if entry["kind"] == "npy":
            try:
                dtype, shape = npy_header(p)
            except Exception as exc:  # header damage that slipped past a size-only check
                raise IndexCorruptedError(f"index file {p} cannot be read as .npy: {exc}") from None
            if dtype.str != entry["dtype"] or list(shape) != entry["shape"]:
                raise IndexCorruptedError(
                    f"index file {p} holds {dtype.str}{list(shape)}, manifest says "
                    f"{entry['dtype']}{entry['shape']}"
                )
            need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if size < need:
                raise IndexCorruptedError(f"index file {p} is {size} bytes, too short for {dtype.str}{list(shape)}")
            try:
                arr = np.load(p, mmap_mode="r" if mmap and need else None, allow_pickle=False)
            except Exception as exc:
                raise IndexCorruptedError(f"index file {p} cannot be read as .npy: {exc}") from None
            arrays[fname[: -len(".npy")]] = arr
        else:
            native[fname] = str(p)
    meta = dict(manifest["meta"])
    meta["_native_files"] = native
    meta["_format_version"] = manifest["format_version"]
    meta["_package_version"] = manifest.get("package_version")
    meta["_pointer"] = (name, sha)
    return meta, arrays, gen


# -- streaming writes ----------------------------------------------------------------------
def scratch_dir(root: str | Path) -> Path:
    """A fresh folder inside index ``root`` for files streamed before a commit (same
    filesystem, so :func:`write_generation` can rename them); its name carries this
    process's PID, so the next commit removes it only once this process is gone."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-scratch-{os.getpid()}-", dir=root))
