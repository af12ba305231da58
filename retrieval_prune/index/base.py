"""The index protocol: ``add`` / ``delete`` / ``search`` / ``save`` / ``load``.

:class:`MultiVectorIndex` holds what every index type shares — external string ids,
the tombstone mask, optional stored texts, the pipeline spec and the encoder
settings — and its persistence through :mod:`retrieval_prune.index.storage`.
Subclasses implement four hooks:

``_add_vectors(docs)``      append (already preprocessed) documents to the payload
``_search(queries, k)``     -> (scores, positions) over live documents
``_state_arrays()``         -> dict of arrays to persist (payload only)
``_load_state(arrays, meta)``  restore the payload from mmapped arrays

External ids are stable: positions are internal, deletes are tombstones until
:meth:`compact`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from retrieval_prune.index import storage
from retrieval_prune.registry import Component
from retrieval_prune.types import MultiVectors, SearchResult, check_k

__all__ = [
    "MultiVectorIndex", "encode_strings", "decode_strings", "restore_common", "load_index", "index_types",
]

#: most queries in one ``search`` call, most vectors in one query (named errors beyond)
MAX_QUERIES = 100_000
MAX_QUERY_VECTORS = 8192

def encode_strings(items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pack strings as a UTF-8 byte blob (uint8) plus int64 offsets (no pickle)."""
    encoded = [s.encode("utf-8") for s in items]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return blob, offsets


def decode_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Inverse of :func:`encode_strings`; raises ``ValueError`` on offsets that do not
    walk the blob from 0 to its end, or bytes that are not UTF-8."""
    off = np.asarray(offsets)
    b = np.asarray(blob)
    if off.ndim != 1 or off.shape[0] < 1 or off.dtype.kind not in "iu" or b.ndim != 1:
        raise ValueError(f"string offsets of dtype {off.dtype} and shape {off.shape} are not a 1-D integer array")
    if int(off[0]) != 0 or int(off[-1]) != b.shape[0] or (off.shape[0] > 1 and np.any(np.diff(off) < 0)):
        raise ValueError("string offsets must rise from 0 to the blob's length")
    raw = bytes(np.asarray(b, dtype=np.uint8))
    lst = off.tolist()
    return [raw[lst[i] : lst[i + 1]].decode("utf-8") for i in range(len(lst) - 1)]


def restore_common(obj: MultiVectorIndex, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Restore what every index type saves (ids, tombstones, texts, spec, encoder, info),
    checking that the arrays agree with each other."""
    obj.dim = meta["dim"]
    obj.doc_ids = decode_strings(arrays["doc_ids_blob"], arrays["doc_ids_offsets"])
    obj._pos = {d: p for p, d in enumerate(obj.doc_ids)}
    alive = np.asarray(arrays["alive"])
    if alive.ndim != 1 or alive.dtype != np.uint8 or np.any(alive > 1):
        raise storage.IndexCorruptedError("alive.npy must be a 1-D uint8 mask of 0/1")
    obj.alive = np.array(alive, dtype=np.uint8)
    if len(obj.alive) != len(obj.doc_ids):
        raise storage.IndexCorruptedError("alive mask and id list disagree in length")
    live_ids = [d for d, a in zip(obj.doc_ids, obj.alive.tolist(), strict=True) if a]
    if len(set(live_ids)) != len(live_ids) or any(obj._pos[d] != p for p, d in enumerate(obj.doc_ids) if obj.alive[p]):
        raise storage.IndexCorruptedError("doc_ids: a live id appears twice or is shadowed by a later position")
    if "texts_blob" in arrays:
        obj.texts = decode_strings(arrays["texts_blob"], arrays["texts_offsets"])
        if len(obj.texts) != len(obj.doc_ids):
            raise storage.IndexCorruptedError("texts and ids disagree in length")
    obj.pipeline_spec = meta.get("pipeline") or meta["spec"]
    obj.encoder_settings = meta.get("encoder")
    obj.info = meta.get("info") or {}


class MultiVectorIndex(Component):
    """Base of every index type; see the module docstring for the hooks."""

    stage: ClassVar[str] = "index"
    index_type: ClassVar[str] = ""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.dim: int | None = None
        self.doc_ids: list[str] = []
        self._pos: dict[str, int] = {}
        self.alive = np.zeros(0, np.uint8)
        self.texts: list[str] | None = None
        #: full pipeline spec (token steps, codec, index) as written in the manifest
        self.pipeline_spec: str = self.spec
        #: encoder settings, so a query is encoded as the documents were
        self.encoder_settings: dict[str, Any] | None = None
        #: free-form build information (timings, reports) kept in the manifest
        self.info: dict[str, Any] = {}
        #: folder and ``(generation, manifest sha256)`` this index was loaded from or last
        #: saved to (None: built here); a save to that folder after another writer's commit
        #: is refused instead of overwriting it
        self.loaded_from: Path | None = None
        self.loaded_pointer: tuple[str, str] | None = None

    # -- hooks -------------------------------------------------------------------
    def _add_vectors(self, docs: MultiVectors) -> None:
        raise NotImplementedError

    def _search(self, queries: MultiVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _state_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        raise NotImplementedError

    def _compact_vectors(self, keep: np.ndarray) -> None:
        """Drop the payload of documents not in ``keep`` (sorted positions)."""
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------
    def __len__(self) -> int:
        """Number of live (not deleted) documents."""
        return int(self.alive.sum())

    @property
    def n_positions(self) -> int:
        return len(self.doc_ids)

    def _check_docs(self, docs: MultiVectors, what: str) -> None:
        if not isinstance(docs, MultiVectors):
            raise TypeError(f"{what} must be MultiVectors, got {type(docs).__name__}")
        if self.dim is not None and docs.dim != self.dim:
            raise ValueError(
                f"{what} have dim={docs.dim} but the index holds dim={self.dim} vectors; "
                "encode them with the encoder/pipeline the index was built with"
            )
        docs.validate_finite(what)

    def add(
        self, docs: MultiVectors, ids: Sequence[str], texts: Sequence[str] | None = None
    ) -> None:
        """Append documents under external string ``ids`` (unique, not already present)."""
        self._check_docs(docs, "documents")
        ids = [str(i) for i in ids]
        if len(ids) != len(docs):
            raise ValueError(f"{len(ids)} ids for {len(docs)} documents; give one id per document")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"duplicate id {dup!r} in the batch; ids must be unique")
        clash = [i for i in ids if i in self._pos and self.alive[self._pos[i]]]
        if clash:
            raise ValueError(
                f"id {clash[0]!r} is already in the index ({len(clash)} clashes); delete it first"
            )
        if texts is not None and len(texts) != len(ids):
            raise ValueError(f"{len(texts)} texts for {len(ids)} documents")
        if self.n_positions == 0 and texts is not None:
            self.texts = []
        if self.texts is not None and texts is None and self.n_positions:
            texts = [""] * len(ids)
        if self.dim is None:
            self.dim = docs.dim
        self._add_vectors(docs)
        start = self.n_positions
        for j, i in enumerate(ids):  # a re-added deleted id: its old position stays a tombstone
            self._pos[i] = start + j
        self.doc_ids.extend(ids)
        self.alive = np.concatenate([np.asarray(self.alive), np.ones(len(ids), np.uint8)])
        if self.texts is not None and texts is not None:
            self.texts.extend(texts)

    def delete(self, ids: Sequence[str]) -> None:
        """Tombstone documents by external id; unknown ids raise and change nothing."""
        ids = [str(i) for i in ids]
        unknown = [i for i in ids if i not in self._pos or not self.alive[self._pos[i]]]
        if unknown:
            raise KeyError(f"unknown document id {unknown[0]!r} ({len(unknown)} unknown); nothing deleted")
        alive = np.array(self.alive, copy=True)
        for i in ids:
            alive[self._pos[i]] = 0
        self.alive = alive

    def compact(self) -> None:
        """Rewrite the payload without tombstoned documents; external ids survive."""
        keep = np.flatnonzero(np.asarray(self.alive))
        if keep.size == self.n_positions:
            return
        self._compact_vectors(keep)
        self.doc_ids = [self.doc_ids[i] for i in keep]
        if self.texts is not None:
            self.texts = [self.texts[i] for i in keep]
        self._pos = {d: p for p, d in enumerate(self.doc_ids)}
        self.alive = np.ones(len(self.doc_ids), np.uint8)

    def search(self, queries: MultiVectors, k: int = 10) -> SearchResult:
        """Top-``k`` live documents per query, best first (ids -1 padded).

        ``k`` is clamped to the number of live documents, so the result has
        ``min(k, len(self))`` columns (one when the index is empty)."""
        return self._checked_search(queries, k, self._search)

    def _checked_search(self, queries: MultiVectors, k: int, scorer) -> SearchResult:
        """Validate ``queries`` and ``k``, answer empty cases, else ``scorer(queries, k)``."""
        # at most as many results as live documents: a huge k must not allocate huge arrays
        k = min(check_k(k), max(1, int(np.count_nonzero(self.alive))))
        if not isinstance(queries, MultiVectors):
            raise TypeError(f"queries must be MultiVectors, got {type(queries).__name__}")
        if len(queries) > MAX_QUERIES:
            raise ValueError(
                f"{len(queries)} queries in one search; at most {MAX_QUERIES} (search in batches)"
            )
        q_len = np.diff(queries.offsets)
        if q_len.size and int(q_len.max()) > MAX_QUERY_VECTORS:
            raise ValueError(
                f"query {int(np.argmax(q_len))} has {int(q_len.max())} vectors; at most "
                f"{MAX_QUERY_VECTORS} per query (prune or pool it first)"
            )
        if self.dim is not None and queries.dim != self.dim:
            raise ValueError(
                f"queries have dim={queries.dim} but the index holds dim={self.dim} vectors; "
                "encode queries with the index's encoder settings"
            )
        queries.validate_finite("queries")
        if self.n_positions == 0 or len(queries) == 0:
            shape = (len(queries), k)
            return SearchResult(
                np.full(shape, -np.inf, np.float32), np.full(shape, -1, np.int64), self.doc_ids
            )
        scores, ids = scorer(queries, k)
        return SearchResult(scores, ids, self.doc_ids)

    def id_of(self, position: int) -> str:
        return self.doc_ids[position]

    def position_of(self, doc_id: str) -> int:
        try:
            return self._pos[doc_id]
        except KeyError:
            raise KeyError(f"unknown document id {doc_id!r}") from None

    # -- persistence ------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "type": self.index_type,
            "spec": self.spec,
            "pipeline": self.pipeline_spec,
            "dim": self.dim,
            "n_positions": self.n_positions,
            "n_docs": len(self),
            "encoder": self.encoder_settings,
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write the index as a new crash-safe generation of folder ``path``."""
        arrays = dict(self._state_arrays())
        blob, offs = encode_strings(self.doc_ids)
        arrays.update({"doc_ids_blob": blob, "doc_ids_offsets": offs, "alive": np.asarray(self.alive)})
        if self.texts is not None:
            tb, to = encode_strings(self.texts)
            arrays.update({"texts_blob": tb, "texts_offsets": to})
        meta = self._meta()
        json.dumps(meta)  # fail before writing anything if meta is not JSON-able
        return self._commit_to(path, lambda: storage.write_generation(path, arrays, meta))

    def _commit_to(self, path: str | Path, write) -> Path:
        """Run ``write()`` under ``path``'s write lock, refusing to overwrite a generation
        another writer committed since this index was loaded from ``path``."""
        target = Path(path).resolve()
        with storage.write_lock(target):
            if self.loaded_from == target and self.loaded_pointer is not None:
                on_disk = (
                    storage.live_pointer(target, verify_signature=False)
                    if (target / "CURRENT").is_file() else None
                )
                if on_disk is not None and on_disk != self.loaded_pointer:
                    raise storage.IndexChangedError(
                        f"{path} changed on disk since this index was loaded ({self.loaded_pointer[0]} "
                        f"-> {on_disk[0]}): another writer committed. Load it again, or hold "
                        "storage.write_lock(path) from the load to the save"
                    )
            gen = write()
            self.loaded_from, self.loaded_pointer = target, storage.live_pointer(target, verify_signature=False)
            return gen

    @classmethod
    def _from_saved(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> MultiVectorIndex:
        from retrieval_prune.registry import build

        obj = build(meta["spec"])
        if not isinstance(obj, cls):
            raise storage.IndexCorruptedError(f"manifest spec {meta['spec']!r} is not a {cls.__name__}")
        restore_common(obj, meta, arrays)
        obj._load_state(arrays, meta)
        return obj

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> MultiVectorIndex:
        return load_index(path, verify=verify)


def index_types() -> dict[str, type[MultiVectorIndex]]:
    """Index type name (a manifest's ``"type"``) -> class, read off the main registry: every
    registered ``index``-stage component with an ``index_type`` (built-ins and plugins),
    plus :class:`~retrieval_prune.index.compressed.CompressedIndex`, the index a pipeline
    makes from codec steps alone, which no spec names and so is not registered."""
    from retrieval_prune import registry
    from retrieval_prune.index.compressed import CompressedIndex
    from retrieval_prune.index.sharded import ShardedIndex

    found: dict[str, type[MultiVectorIndex]] = {
        CompressedIndex.index_type: CompressedIndex, ShardedIndex.index_type: ShardedIndex,
    }
    for cls in registry.available("index").values():
        itype = getattr(cls, "index_type", "")
        if itype and isinstance(cls, type) and issubclass(cls, MultiVectorIndex):
            found.setdefault(itype, cls)
    return found


def load_index(
    path: str | Path, *, verify: bool = True, pointer: tuple[str, str] | None = None
) -> MultiVectorIndex:
    """Open any saved index by the type its manifest declares (checksums verified).

    The folder is treated as untrusted input: the manifest is checked against its schema
    and every array against the others (shapes, ranges, offsets) before a kernel sees it;
    anything wrong raises :class:`~retrieval_prune.index.storage.IndexCorruptedError`.
    The loaded index remembers which generation it came from (``loaded_pointer``);
    ``pointer=(generation, manifest sha256)`` opens that generation instead of the live one.
    A sharded index folder opens as a :class:`~retrieval_prune.index.sharded.ShardedIndex`.
    """
    from retrieval_prune.index.manifest import ManifestError, check_index_meta

    types = index_types()
    meta, arrays, gen = storage.read_generation(path, verify=verify, pointer=pointer)
    where = gen / "manifest.json"
    try:
        check_index_meta(meta, set(types))
    except ManifestError as exc:
        raise storage.IndexCorruptedError(f"{where}: {exc}") from None
    meta["_root"], meta["_verify"] = str(path), verify  # for types that open more folders
    try:
        index = types[meta["type"]]._from_saved(meta, arrays)
    except storage.IndexCorruptedError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError,
            UnicodeDecodeError, RecursionError) as exc:
        # a field the schema let through but the index could not use: still a named error
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        msg = " ".join(str(msg).split())[:500]  # one line, whatever the message held
        raise storage.IndexCorruptedError(
            f"{where}: the saved {meta['type']} index is inconsistent ({type(exc).__name__}: {msg})"
        ) from None
    index.loaded_from, index.loaded_pointer = Path(path).resolve(), meta["_pointer"]
    return index
