"""On-disk cache of encoded corpora and query sets.

An entry is keyed by sha256 of JSON ``(encoder.settings, dataset name, sha256 of the ids and
texts, kind)`` and stored as a folder of ``.npy`` arrays (``embeddings`` float32,
``offsets`` int64, optional ``weights`` float32) plus ``meta.json`` holding the key's inputs
and every file's size. An entry is written to a temporary folder and renamed into place, so a
reader sees a whole entry or none. Arrays load with ``allow_pickle=False`` and
``mmap_mode="r"``. The root is ``$RETRIEVAL_PRUNE_CACHE`` if set, else ``.cache/embeddings``.

An entry written with importance weights also serves requests without them; a request with
importance against an entry without re-encodes and replaces the entry.

Examples
--------
>>> cache = EmbeddingCache()                                                    # doctest: +SKIP
>>> docs = cache.get_or_encode(enc, "scifact", corpus.doc_ids, corpus.doc_texts)  # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrieval_prune.atomic import atomic_write_text
from retrieval_prune.npyio import NpyAppender
from retrieval_prune.types import MultiVectors

__all__ = ["EmbeddingCache", "cache_key", "cache_root", "texts_digest", "CACHE_ENV", "DEFAULT_CACHE_ROOT"]

CACHE_ENV = "RETRIEVAL_PRUNE_CACHE"
DEFAULT_CACHE_ROOT = ".cache/embeddings"
_CACHE_VERSION = 1
_KINDS = ("docs", "queries")


class _EncoderLike(Protocol):
    settings: dict[str, Any]

    def encode_documents(self, texts: list[str], **kw: Any) -> MultiVectors: ...

    def encode_queries(self, texts: list[str], **kw: Any) -> MultiVectors: ...


def cache_root() -> Path:
    """Root of the project's on-disk caches: ``$RETRIEVAL_PRUNE_CACHE`` or ``.cache``
    (embeddings under ``embeddings/``, exact runs, training negatives)."""
    return Path(os.environ.get(CACHE_ENV, ".cache")).resolve()


def texts_digest(ids: Sequence[str], texts: Sequence[str]) -> str:
    """sha256 over the (id, text) pairs, order included."""
    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids for {len(texts)} texts; they must pair up")
    h = hashlib.sha256()
    for i, t in zip(ids, texts, strict=True):
        for s in (str(i), t):
            b = s.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def cache_key(settings: dict[str, Any], dataset: str, digest: str, kind: str) -> str:
    """Hex sha256 of the canonical JSON of the key's parts."""
    blob = json.dumps(
        {
            "v": _CACHE_VERSION,
            "settings": settings,
            "dataset": dataset,
            "texts": digest,
            "kind": kind,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Folder of cached :class:`MultiVectors`, one sub-folder per key.

    Parameters
    ----------
    root : path, optional
        Cache folder; default ``$RETRIEVAL_PRUNE_CACHE`` or ``.cache/embeddings``. Created
        on first write, not by the constructor.
    mmap : bool
        Open cached arrays memory-mapped read-only (default) or read them into memory.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, mmap: bool = True) -> None:
        self.root = Path(
            root if root is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT
        )
        self.mmap = mmap

    def __repr__(self) -> str:
        return f"EmbeddingCache(root={str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get_or_encode(
        self,
        encoder: _EncoderLike,
        dataset_name: str,
        doc_ids: Sequence[str],
        texts: Sequence[str],
        kind: str = "docs",
        with_importance: bool = False,
        *,
        progress: bool = True,
        chunk_docs: int | None = None,
    ) -> MultiVectors:
        """Cached vectors of ``texts`` under ``encoder``; encode and store them on a miss.

        Parameters
        ----------
        encoder : Encoder
        dataset_name : str
            Name of the collection (part of the key, and recorded in meta.json).
        doc_ids : list of str
            Ids of the texts (queries' ids for ``kind="queries"``), same order.
        texts : list of str
        kind : ``"docs"`` or ``"queries"``
        with_importance : bool
            Return [CLS]-attention importance as ``weights``.
        progress : bool
            Progress bar while encoding a miss.
        chunk_docs : int, optional
            Encode a miss this many texts at a time, appending each block to the entry's
            files (memory: one block). The entry is the same format; its vectors can differ
            from a one-call encoding in the last bits (other padding per batch), so a build
            that must match another uses the same entry.
        """
        if kind not in _KINDS:
            raise ValueError(f"kind={kind!r} must be one of {_KINDS}")
        if not isinstance(dataset_name, str) or not dataset_name:
            raise ValueError(f"dataset_name={dataset_name!r} must be a non-empty string")
        # documents: the settings that shape document vectors (an int8 query path encodes
        # documents as the float32 encoder does, so both share one entry)
        settings = encoder.settings
        if kind == "docs":
            settings = getattr(encoder, "document_settings", settings)
        key = cache_key(settings, dataset_name, texts_digest(doc_ids, texts), kind)
        hit = self._usable(self.load(key), with_importance)
        if hit is not None:
            return hit
        # One process encodes a key at a time: others wait on the lock, then find the entry.
        lock_path = self.path_for(key).with_suffix(".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                hit = self._usable(self.load(key), with_importance)
                if hit is not None:
                    return hit
                if chunk_docs is not None and len(texts) > chunk_docs:
                    return self._encode_chunked(encoder, key, settings, dataset_name, texts, kind,
                                                with_importance, progress, int(chunk_docs))
                return self._encode_and_store(encoder, key, settings, dataset_name, texts, kind,
                                              with_importance, progress)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _usable(hit: MultiVectors | None, with_importance: bool) -> MultiVectors | None:
        if hit is None or (with_importance and hit.weights is None):
            return None
        if hit.weights is not None and not with_importance:
            return MultiVectors(hit.embeddings, hit.offsets)
        return hit

    def _encode_and_store(self, encoder: _EncoderLike, key: str, settings: dict[str, Any],
                          dataset_name: str, texts: Sequence[str], kind: str,
                          with_importance: bool, progress: bool) -> MultiVectors:
        if kind == "docs":
            mv = encoder.encode_documents(
                list(texts), progress=progress, return_importance=with_importance
            )
        else:
            mv = encoder.encode_queries(
                list(texts), progress=progress, return_importance=with_importance
            )
        if len(mv) != len(texts):
            raise RuntimeError(f"encoder returned {len(mv)} items for {len(texts)} texts")
        meta = {
            "cache_version": _CACHE_VERSION,
            "key": key,
            "settings": settings,
            "dataset": dataset_name,
            "kind": kind,
            "n": len(mv),
            "n_tokens": mv.n_tokens,
            "dim": mv.dim,
        }
        self._store(key, mv, meta, replace=self.path_for(key).exists())
        stored = self.load(key)
        return mv if stored is None else stored

    def _encode_chunked(self, encoder: _EncoderLike, key: str, settings: dict[str, Any],
                        dataset_name: str, texts: Sequence[str], kind: str,
                        with_importance: bool, progress: bool, chunk: int) -> MultiVectors:
        enc = encoder.encode_documents if kind == "docs" else encoder.encode_queries
        folder = self.path_for(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            emb = off = w = None
            n_tok = 0
            starts = range(0, len(texts), chunk)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc=f"encode {dataset_name} ({chunk} texts a block)")
            for a in starts:
                mv = enc(list(texts[a : a + chunk]), progress=False, return_importance=with_importance)
                if emb is None:
                    emb = NpyAppender(tmp / "embeddings.npy", np.float32, (mv.dim,))
                    off = NpyAppender(tmp / "offsets.npy", np.int64)
                    off.append(np.zeros(1, np.int64))
                    if mv.weights is not None:
                        w = NpyAppender(tmp / "weights.npy", np.float32)
                emb.append(mv.embeddings)
                off.append(mv.offsets[1:] + n_tok)
                if w is not None:
                    w.append(mv.weights)
                n_tok += mv.n_tokens
            files = {}
            for app in (emb, off, w):
                if app is not None:
                    app.close()
                    files[app.path.name] = app.path.stat().st_size
            meta = {"cache_version": _CACHE_VERSION, "key": key, "settings": settings,
                    "dataset": dataset_name, "kind": kind, "n": len(texts), "n_tokens": n_tok,
                    "dim": emb.tail[0] if emb is not None else 0, "chunk_docs": chunk}
            self._commit(key, tmp, meta, files, replace=folder.exists())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        stored = self.load(key)
        if stored is None:
            raise RuntimeError(f"the cache entry {folder} did not read back after writing it")
        return stored

    # -- storage ------------------------------------------------------------------------
    def load(self, key: str) -> MultiVectors | None:
        """The entry for ``key``, or None if absent or unreadable (a damaged entry is a miss)."""
        folder = self.path_for(key)
        meta_file = folder / "meta.json"
        if not meta_file.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            files = meta["files"]
            for fname, size in files.items():
                if (folder / fname).stat().st_size != size:
                    return None
            mode = "r" if self.mmap else None
            emb = np.load(folder / "embeddings.npy", mmap_mode=mode, allow_pickle=False)
            off = np.load(folder / "offsets.npy", allow_pickle=False)
            w = None
            if "weights.npy" in files:
                w = np.load(folder / "weights.npy", mmap_mode=mode, allow_pickle=False)
            if emb.shape != (meta["n_tokens"], meta["dim"]) or off.shape != (meta["n"] + 1,):
                return None
            return MultiVectors(emb, off, w)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            return None

    def _store(self, key: str, mv: MultiVectors, meta: dict[str, Any], *, replace: bool) -> None:
        folder = self.path_for(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            arrays = {"embeddings.npy": mv.embeddings, "offsets.npy": mv.offsets}
            if mv.weights is not None:
                arrays["weights.npy"] = mv.weights
            files = {}
            for fname, arr in arrays.items():
                with open(tmp / fname, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
                files[fname] = (tmp / fname).stat().st_size
            self._commit(key, tmp, meta, files, replace=replace)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, key: str, tmp: Path, meta: dict[str, Any], files: dict[str, int], *,
                replace: bool) -> None:
        """Write ``meta.json`` into the filled temporary folder and rename it into place."""
        folder = self.path_for(key)
        atomic_write_text(  # fsyncs the file and the folder (with the .npy entries)
            tmp / "meta.json", json.dumps({**meta, "files": files}, indent=1, sort_keys=True)
        )
        if folder.exists():
            if not replace and self.load(key) is not None:
                return  # another process stored the same entry meanwhile
            old = folder.parent / f".{key}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if self.load(key) is None:  # lost a race to a writer whose entry is broken
                raise
