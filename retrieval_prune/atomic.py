"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one.

The data goes to a temporary file in the same folder (same file system), which is flushed
and fsynced, then renamed over the target with :func:`os.replace` (atomic on POSIX and
Windows), and the folder is fsynced so the rename itself survives a power cut. On any
error the temporary file is removed and the target is left as it was.

Imports nothing of this package: every layer may use it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fsync_dir", "fsync_tree"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Best-effort fsync of a folder (persists renames in it); a no-op where the platform
    cannot open or sync folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file directly in ``folder``, then the folder itself."""
    for p in Path(folder).iterdir():
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` crash-safely (temp file, fsync, rename, fsync folder)."""
    target = Path(path)
    tmp = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    # os.open with mode 0o666 (less the umask), as open() would: mkstemp would make it 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(obj, **dumps_kwargs)`` plus a newline."""
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")
