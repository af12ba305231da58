"""Schema of an index generation's ``manifest.json``, checked before anything trusts it.

An index folder is untrusted input: people share them, and a crafted folder can carry
recomputed checksums, so checksums alone catch accidents, not intent. Before any field
reaches numpy, a native library or an index class, :func:`check_manifest` checks the
envelope (format name, a known version, plain file names inside the generation, sizes,
checksums, dtypes from an allow-list, shapes that fit the file) and
:func:`check_index_meta` the index's own section (types and ranges of every field the
loader reads). Each failure is one line naming the field.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from retrieval_prune.safejson import JSONLimitError, loads_bounded, value_depth

__all__ = ["ManifestError", "parse_manifest", "check_manifest", "check_index_meta", "ALLOWED_DTYPES"]

#: dtypes an index array may have (``dtype.str``): numbers and bools, native little-endian
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str
    for t in (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
              np.int64, np.uint64, np.float16, np.float32, np.float64)
)
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
#: most dimensions of a stored array, most files in a generation
MAX_NDIM, MAX_FILES = 8, 4096
#: largest file size a manifest may state (1 PiB)
MAX_SIZE = 1 << 50
#: nesting allowed in a manifest (metadata of documents lives in it)
MANIFEST_MAX_DEPTH = 64


class ManifestError(ValueError):
    """A manifest that does not fit the schema; ``newer_version`` when only its version is
    too new for this package."""

    def __init__(self, message: str, newer_version: bool = False) -> None:
        super().__init__(message)
        self.newer_version = newer_version


def _int(x: Any, lo: int | None = None, hi: int | None = None) -> bool:
    return (
        isinstance(x, int)
        and not isinstance(x, bool)
        and (lo is None or x >= lo)
        and (hi is None or x <= hi)
    )


def parse_manifest(raw: bytes) -> Any:
    """Parse manifest bytes with bounded nesting; :class:`ManifestError` on failure."""
    try:
        return loads_bounded(raw, max_depth=MANIFEST_MAX_DEPTH)
    except JSONLimitError as exc:
        raise ManifestError(str(exc)) from None


def check_manifest(manifest: Any, format_name: str, format_version: int) -> None:
    """Raise :class:`ManifestError` unless ``manifest`` fits the envelope schema."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != format_name:
        raise ManifestError(f"format {str(manifest.get('format'))[:80]!r} is not {format_name!r}")
    version = manifest.get("format_version")
    if not _int(version, 1):
        raise ManifestError(f"format_version {str(version)[:40]!r} is not a known version (1..{format_version})")
    if version > format_version:
        raise ManifestError(
            f"format version {version} is newer than this package reads ({format_version})",
            newer_version=True,
        )
    pv = manifest.get("package_version")
    if pv is not None and (not isinstance(pv, str) or len(pv) > 64):
        raise ManifestError("package_version must be a short string")
    if not isinstance(manifest.get("meta"), dict):
        raise ManifestError("'meta' is missing or not an object")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ManifestError("'files' is missing or not an object")
    if len(files) > MAX_FILES:
        raise ManifestError(f"lists {len(files)} files; at most {MAX_FILES}")
    for name, entry in files.items():
        where = f"files[{name[:80]!r}]"
        if not _FILE_RE.match(name) or name == "manifest.json" or ".." in name:
            raise ManifestError(f"{where}: not a plain file name inside the generation")
        if not isinstance(entry, dict):
            raise ManifestError(f"{where} is not an object")
        kind = entry.get("kind")
        if kind not in ("npy", "native"):
            raise ManifestError(f"{where}.kind {str(kind)[:40]!r} is not 'npy' or 'native'")
        if not _int(entry.get("size"), 0, MAX_SIZE):
            raise ManifestError(f"{where}.size {str(entry.get('size'))[:40]!r} is not a byte count")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise ManifestError(f"{where}.sha256 is not 64 lowercase hex digits")
        if kind == "npy":
            if not name.endswith(".npy"):
                raise ManifestError(f"{where}: an npy entry's name must end in .npy")
            dtype = entry.get("dtype")
            if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
                raise ManifestError(
                    f"{where}.dtype {str(dtype)[:40]!r} is not one of {sorted(ALLOWED_DTYPES)}"
                )
            shape = entry.get("shape")
            if (
                not isinstance(shape, list)
                or len(shape) > MAX_NDIM
                or not all(_int(s, 0, MAX_SIZE) for s in shape)
            ):
                raise ManifestError(f"{where}.shape is not a list of at most {MAX_NDIM} counts")
            n = 1
            for s in shape:
                n *= s
            if n * np.dtype(dtype).itemsize > entry["size"]:
                raise ManifestError(f"{where}: shape {shape} does not fit in {entry['size']} bytes")


def _str(meta: dict, key: str, optional: bool = False, max_len: int = 100_000) -> None:
    v = meta.get(key)
    if v is None and optional:
        return
    if not isinstance(v, str) or len(v) > max_len:
        raise ManifestError(f"meta.{key} must be a string (got {type(v).__name__})")


def check_index_meta(meta: dict[str, Any], known_types: set[str] | list[str]) -> None:
    """Raise :class:`ManifestError` unless an index's ``meta`` has the fields the loader
    reads, with the right types and ranges."""
    itype = meta.get("type")
    if itype not in known_types:
        raise ManifestError(f"meta.type {str(itype)[:40]!r} is not a known index type {sorted(known_types)}")
    _str(meta, "spec", max_len=10_000)
    _str(meta, "pipeline", optional=True, max_len=10_000)
    dim = meta.get("dim")
    if dim is not None and not _int(dim, 1, 1 << 16):
        raise ManifestError(f"meta.dim {str(dim)[:40]!r} is not a dimension in 1..65536")
    for key in ("n_positions", "n_docs"):
        if key in meta and not _int(meta[key], 0):
            raise ManifestError(f"meta.{key} {str(meta[key])[:40]!r} is not a count")
    for key in ("encoder", "info"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise ManifestError(f"meta.{key} must be an object or null")
    enc = meta.get("encoder")
    if isinstance(enc, dict) and value_depth(enc) > 16:
        raise ManifestError("meta.encoder is nested too deeply")
