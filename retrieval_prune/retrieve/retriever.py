"""Text in, documents out: an index, the encoder that built it and its token steps.

:class:`Retriever` is the one object the LangChain adapter and the HTTP server share. It
encodes a query with the encoder the index records, replays the pipeline's token steps,
searches, and returns :class:`Hit` objects carrying the stored text and metadata. It also
adds and deletes documents (encoded the same way) and saves a new index generation.

Processes: every write to an index folder holds the folder's write lock
(:func:`~retrieval_prune.index.storage.write_lock`). :meth:`Retriever.transaction` holds it
over a whole read-modify-write -- it first brings memory up to the generation on disk if
another writer committed meanwhile, and on a failed save puts memory back to what is on
disk -- so two processes (a server and a CLI ``add``, say) never lose each other's writes.

Thread safety: searches hold a shared (read) lock and run together; ``add`` / ``delete`` /
``compact`` hold the exclusive (write) lock, so a search sees the index either before or
after a mutation, never half of one. Encoder calls are serialised by their own lock (HF
fast tokenizers are not safe to share between threads, and torch already uses every core),
and happen outside the index lock so a slow encoding never blocks searches.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrieval_prune.index import storage
from retrieval_prune.index.base import MultiVectorIndex, load_index
from retrieval_prune.pipeline import Pipeline
from retrieval_prune.pipeline.build import build as build_pipeline
from retrieval_prune.retrieve._rwlock import RWLock
from retrieval_prune.retrieve.hashing import HASHING_MODE, HashingEncoder
from retrieval_prune.types import MultiVectors, check_k

__all__ = [
    "Retriever",
    "Hit",
    "DuplicateIdError",
    "UnknownIdError",
    "load_encoder",
    "METADATA_KEY",
    "Transaction",
]

#: most queries per ``retrieve_batch`` call and characters per query (named errors beyond)
MAX_BATCH = 10_000
MAX_QUERY_CHARS = 100_000

#: key of ``index.info`` holding ``{doc_id: metadata dict}`` (documents with metadata only)
METADATA_KEY = "doc_metadata"


class DuplicateIdError(ValueError):
    """An added id is already live in the index (or repeated in the batch)."""


class UnknownIdError(KeyError):
    """A deleted id is not live in the index."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass
class Transaction:
    """What :meth:`Retriever.transaction` committed: the live generation's folder."""

    generation: Path | None = None


class TextEncoder(Protocol):
    """What a retriever needs from an encoder (``Encoder``, ``HashingEncoder``, a fake)."""

    @property
    def settings(self) -> dict[str, Any]: ...

    def encode_queries(self, texts: Sequence[str], **kw: Any) -> MultiVectors: ...

    def encode_documents(self, texts: Sequence[str], **kw: Any) -> MultiVectors: ...


@dataclass(frozen=True)
class Hit:
    """One retrieved document: external ``id``, MaxSim ``score``, stored ``text`` (None when
    the index keeps no texts) and ``metadata`` (empty dict when none was given)."""

    id: str
    score: float
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_text: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "score": self.score}
        if with_text:
            d["text"] = self.text
            d["metadata"] = self.metadata
        return d


# -- encoder resolution ---------------------------------------------------------------------
def _json_norm(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True))


def settings_diff(
    recorded: Mapping[str, Any], actual: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted keys whose values differ between two settings dicts (recorded keys only)."""
    out = []
    for key, want in recorded.items():
        have = actual.get(key, "<missing>")
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            out += settings_diff(want, have, f"{prefix}{key}.")
        elif _json_norm(want) != _json_norm(have):
            out.append(f"{prefix}{key}: index {want!r}, encoder {have!r}")
    return out


def load_encoder(settings: Mapping[str, Any], checkpoint: str | Path | None = None) -> TextEncoder:
    """An encoder equal to the one described by ``settings`` (an index's ``encoder_settings``).

    ``checkpoint`` names the checkpoint folder when the settings record a trained checkpoint
    (an index records its name and sha256, not where it lives on this machine).
    """
    settings = dict(settings)
    if settings.get("mode") == HASHING_MODE:
        return HashingEncoder.from_settings(settings)
    from retrieval_prune.encode import Encoder

    return Encoder.from_settings(settings, checkpoint=checkpoint)


# -- input checks ---------------------------------------------------------------------------
def _str_list(values: Any, what: str, allow_empty_items: bool) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{what} must be a list of strings, got {type(values).__name__}")
    out = list(values)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise TypeError(f"{what}[{i}] is a {type(v).__name__}, expected str")
        if not allow_empty_items and not v.strip():
            raise ValueError(f"{what}[{i}] is empty; give some text")
    return out


class Retriever:
    """Search an index with text; add and delete documents by text. Thread-safe.

    Parameters
    ----------
    index : MultiVectorIndex
        A built or loaded index (an empty one is fine; :meth:`add` fills it).
    encoder : object with ``settings``, ``encode_queries``, ``encode_documents``
        Must be the encoder the index was built with: when the index records encoder
        settings they are compared and a mismatch raises ``ValueError``.
    pipeline : Pipeline, optional
        Whose token steps are replayed on queries and added documents; default
        the one recorded in the index's manifest (:meth:`Pipeline.for_index`).
    path : str or Path, optional
        Index folder :meth:`save` writes to by default (set by :meth:`from_index`).
    auto_compact : float or None
        After a delete, compact when more than this fraction of positions are tombstones
        (None: never; call :meth:`compact`).

    Examples
    --------
    >>> from retrieval_prune.retrieve import HashingEncoder, Retriever
    >>> r = Retriever.from_texts(["a", "b"], ["red apples", "green pears"], HashingEncoder())
    >>> [h.id for h in r.retrieve("apples", k=1)]
    ['a']
    >>> r.add(["c"], ["ripe pears"], [{"shop": "x"}]); r.delete(["b"])
    >>> [(h.id, h.metadata) for h in r.retrieve("pears", k=5)]  # every live document
    [('c', {'shop': 'x'}), ('a', {})]
    """

    def __init__(
        self,
        index: MultiVectorIndex,
        encoder: TextEncoder,
        pipeline: Pipeline | None = None,
        *,
        path: str | Path | None = None,
        auto_compact: float | None = 0.5,
    ) -> None:
        if not isinstance(index, MultiVectorIndex):
            raise TypeError(f"index must be a MultiVectorIndex, got {type(index).__name__}")
        for attr in ("settings", "encode_queries", "encode_documents"):
            if not hasattr(encoder, attr):
                raise TypeError(f"encoder {encoder!r} has no {attr!r}; pass an Encoder")
        if auto_compact is not None and not 0.0 < auto_compact <= 1.0:
            raise ValueError(f"auto_compact={auto_compact!r} must be in (0, 1] or None")
        settings = dict(encoder.settings)
        if index.encoder_settings:
            diff = settings_diff(index.encoder_settings, settings)
            if diff:
                raise ValueError(
                    "the encoder differs from the one the index was built with ("
                    + "; ".join(diff[:5])
                    + "); queries would be encoded differently from the documents"
                )
        else:
            index.encoder_settings = settings
        self.index = index
        self.encoder = encoder
        self.pipeline = pipeline if pipeline is not None else Pipeline.for_index(index)
        self.path = Path(path) if path is not None else None
        self.auto_compact = auto_compact
        self._metadata: dict[str, dict[str, Any]] = index.info.setdefault(METADATA_KEY, {})
        self._lock = RWLock()
        self._encode_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._version = 0  # bumped by every mutation
        self._saved: tuple[Path, int] | None = (self.path, 0) if self.path is not None else None
        self._txn_lock = threading.RLock()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_index(
        cls,
        path: str | Path,
        *,
        encoder: TextEncoder | None = None,
        checkpoint: str | Path | None = None,
        verify: bool = True,
        auto_compact: float | None = 0.5,
        address: str | None = None,
        allow_partial: bool = False,
    ) -> Retriever:
        """Open a saved index with the encoder its manifest records and its token steps.

        ``checkpoint`` is needed only for an index built with a trained checkpoint folder;
        ``encoder`` skips the lookup (it is still checked against the recorded settings).
        A sharded index (``build --shards N``) opens with all shards in this process, or
        with ``address`` on Ray, one actor per shard (``"local"``: start a local cluster;
        ``"auto"``: the running one; or a cluster address). ``allow_partial``: answer from
        the shards that respond when one stays down (the index's ``missing_shards`` names
        the absent ones) instead of failing.
        """
        index = load_index(path, verify=verify)
        _open_shards(index, path, address, allow_partial)
        if encoder is None:
            if not index.encoder_settings:
                raise ValueError(
                    f"{path} records no encoder settings (built from vectors); pass encoder="
                )
            encoder = load_encoder(index.encoder_settings, checkpoint)
        r = cls(index, encoder, Pipeline.for_index(index), path=path, auto_compact=auto_compact)
        r._shard_options = (address, allow_partial)
        return r

    @classmethod
    def from_texts(
        cls,
        ids: Sequence[str],
        texts: Sequence[str],
        encoder: TextEncoder,
        pipeline: str = "exact",
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        path: str | Path | None = None,
        progress: bool = False,
        auto_compact: float | None = 0.5,
    ) -> Retriever:
        """Encode ``texts``, build an index with ``pipeline`` (a spec), optionally save it."""
        ids = [str(i) for i in _str_list(ids, "ids", allow_empty_items=False)]
        texts = _str_list(texts, "texts", allow_empty_items=True)
        metas = _check_metadatas(metadatas, len(ids))
        built = build_pipeline(pipeline, ids, texts=texts, encoder=encoder, progress=progress)
        index = built.index
        index.info[METADATA_KEY] = {i: m for i, m in zip(ids, metas, strict=True) if m}
        r = cls(index, encoder, built.pipeline, path=path, auto_compact=auto_compact)
        if path is not None:
            r._saved = None
            r.save()
        return r

    # -- search ---------------------------------------------------------------------------
    def retrieve(self, query: str, k: int = 10) -> list[Hit]:
        """The ``k`` best documents for one query, best first."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        return self.retrieve_batch([query], k)[0]

    def retrieve_batch(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """The ``k`` best documents for each query (fewer when the index holds fewer)."""
        queries = _str_list(queries, "queries", allow_empty_items=False)
        k = check_k(k)  # the index clamps it to its live documents before allocating
        if not queries:
            return []
        if len(queries) > MAX_BATCH:
            raise ValueError(f"{len(queries)} queries in one call; at most {MAX_BATCH} (split the batch)")
        for i, q in enumerate(queries):
            if len(q) > MAX_QUERY_CHARS:
                raise ValueError(
                    f"queries[{i}] has {len(q)} characters; at most {MAX_QUERY_CHARS} (the encoder "
                    "keeps only its first query_maxlen tokens anyway)"
                )
        with self._encode_lock:
            qv = self.encoder.encode_queries(queries, progress=False)
        qv = self.pipeline.transform_queries(qv)
        with self._lock.read():
            res = self.index.search(qv, k)
            texts, ids = self.index.texts, self.index.doc_ids
            out = []
            for row_pos, row_score in zip(res.ids, res.scores, strict=True):
                hits = []
                for pos, score in zip(row_pos.tolist(), row_score.tolist(), strict=True):
                    if pos < 0:
                        continue
                    did = ids[pos]
                    hits.append(
                        Hit(
                            did,
                            float(score),
                            None if texts is None else texts[pos],
                            dict(self._metadata.get(did, {})),
                        )
                    )
                out.append(hits)
        return out

    # -- mutation -------------------------------------------------------------------------
    def __contains__(self, doc_id: object) -> bool:
        with self._lock.read():
            return self._is_live(str(doc_id))

    def _is_live(self, doc_id: str) -> bool:
        pos = self.index._pos.get(doc_id)
        return pos is not None and bool(self.index.alive[pos])

    def get(self, doc_id: str) -> Hit:
        """The stored text and metadata of a live document (score 0.0)."""
        with self._lock.read():
            if not self._is_live(doc_id):
                raise UnknownIdError(f"unknown document id {doc_id!r}")
            pos = self.index.position_of(doc_id)
            text = None if self.index.texts is None else self.index.texts[pos]
            return Hit(doc_id, 0.0, text, dict(self._metadata.get(doc_id, {})))

    def add(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        """Encode and add documents (same encoder and token steps as the index).

        Raises :class:`DuplicateIdError` (a ``ValueError``) when an id is repeated or
        already live; nothing is added then. Empty texts are allowed (they never match).
        """
        ids = _str_list(ids, "ids", allow_empty_items=False)
        texts = _str_list(texts, "texts", allow_empty_items=True)
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts; give one id per text")
        metas = _check_metadatas(metadatas, len(ids))
        if not ids:
            return
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise DuplicateIdError(f"id {i!r} appears twice in the batch; ids must be unique")
            seen.add(i)
        self._check_new(ids)  # fail before the (slow) encoding
        with self._encode_lock:
            docs = self.encoder.encode_documents(
                texts, progress=False, return_importance=self.pipeline.needs_importance
            )
            docs = self.pipeline.transform_documents(docs, fit=False)
        with self._lock.write():
            self._check_new(ids, locked=True)  # another thread may have added them meanwhile
            self.index.add(docs, ids, texts)
            for i, m in zip(ids, metas, strict=True):
                if m:
                    self._metadata[i] = m
                else:
                    self._metadata.pop(i, None)
            self._version += 1

    def _check_new(self, ids: list[str], locked: bool = False) -> None:
        def clashes() -> list[str]:
            return [i for i in ids if self._is_live(i)]

        if locked:
            dup = clashes()
        else:
            with self._lock.read():
                dup = clashes()
        if dup:
            raise DuplicateIdError(
                f"id {dup[0]!r} is already in the index ({len(dup)} of {len(ids)} ids); "
                "delete it first or choose another id"
            )

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents by id; an unknown id raises :class:`UnknownIdError` (a
        ``KeyError``) and nothing is deleted."""
        ids = _str_list(ids, "ids", allow_empty_items=False)
        if not ids:
            return
        with self._lock.write():
            unknown = [i for i in ids if not self._is_live(i)]
            if unknown:
                raise UnknownIdError(
                    f"unknown document id {unknown[0]!r} ({len(unknown)} unknown); nothing deleted"
                )
            self.index.delete(list(dict.fromkeys(ids)))
            for i in ids:
                self._metadata.pop(i, None)
            self._version += 1
            n = self.index.n_positions
            if (
                self.auto_compact is not None
                and n
                and (n - len(self.index)) / n > self.auto_compact
            ):
                self.index.compact()

    def compact(self) -> None:
        """Drop tombstoned documents from the payload now (ids are kept)."""
        with self._lock.write():
            self.index.compact()
            self._version += 1

    def save(self, path: str | Path | None = None, *, lock_timeout: float | None = None) -> Path:
        """Write the current state as a new crash-safe generation; returns its folder.

        Runs under the shared lock (searches go on) and the folder's write lock. Concurrent
        saves are serialised and a save that finds the same state already on disk writes
        nothing, so a newer generation is never replaced by an older state. When another
        process committed to the folder since this retriever loaded or saved it, the save is
        refused with :class:`~retrieval_prune.index.storage.IndexChangedError` instead of
        overwriting that commit: mutate inside :meth:`transaction` to merge.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("this retriever has no index folder; call save(path)")
        with self._save_lock, storage.write_lock(target, lock_timeout), self._lock.read():
            on_disk = self._pointer(target)  # a stale copy is refused by index.save itself
            if self._saved == (target, self._version) and on_disk is not None:
                return storage.current_generation(target)
            gen = self.index.save(target)
            self._saved = (target, self._version)
            if self.path is None:
                self.path = target
            return gen

    @property
    def _disk(self) -> tuple[str, str] | None:
        """``(generation, manifest sha256)`` of :attr:`path` that memory equals: the
        index's own record of what it was loaded from or last saved to (None: unknown)."""
        idx = self.index
        if self.path is None or idx.loaded_from != Path(self.path).resolve():
            return None
        return idx.loaded_pointer

    @staticmethod
    def _pointer(path: Path) -> tuple[str, str] | None:
        if not (path / "CURRENT").is_file():
            return None
        return storage.live_pointer(path, verify_signature=False)  # load_index checks it

    @contextmanager
    def transaction(self, *, lock_timeout: float | None = None) -> Iterator[Transaction]:
        """Change the index folder as one writer among many processes.

        Holds the folder's write lock throughout; first reloads the index when another
        writer committed since this retriever last read or wrote it; on normal exit saves a
        new generation when anything changed (``tx.generation`` names it). When the body
        raises, or the save fails, memory is put back to the generation on disk and the
        error propagates, so memory never runs ahead of disk.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> from retrieval_prune.retrieve import HashingEncoder, Retriever
        >>> folder = pathlib.Path(tempfile.mkdtemp()) / "ix"
        >>> r = Retriever.from_texts(["a"], ["red apples"], HashingEncoder(), path=folder)
        >>> with r.transaction() as tx:
        ...     r.add(["b"], ["green pears"])
        >>> tx.generation.name, len(Retriever.from_index(folder))
        ('gen-000002', 2)
        """
        if self.path is None:
            raise ValueError("transaction() needs a retriever with an index folder (from_index or path=)")
        tx = Transaction()
        with self._txn_lock, storage.write_lock(self.path, lock_timeout):
            on_disk = self._pointer(self.path)
            if on_disk is not None and on_disk != self._disk:
                self._reload()
            start = self._version
            try:
                yield tx
                if self._version != start or on_disk is None:
                    tx.generation = self.save()
                else:
                    tx.generation = storage.current_generation(self.path)
            except BaseException:
                if self._version != start and self._pointer(self.path) is not None:
                    self._reload()
                raise

    def refresh(self) -> bool:
        """Adopt a generation another process committed to :attr:`path` since this retriever
        last read or wrote it (a serving process calls this before answering reads). Cheap
        when nothing changed (reads the small ``CURRENT`` file); does nothing while this
        retriever holds changes it has not saved. Returns whether it reloaded."""
        if self.path is None or self._disk is None:
            return False
        try:
            on_disk = self._pointer(self.path)
        except (OSError, ValueError):
            return False  # a writer is mid-swap or the folder is damaged: keep serving memory
        if on_disk is None or on_disk == self._disk or self._saved != (self.path, self._version):
            return False
        with self._txn_lock:
            try:
                self._reload()
            except (OSError, ValueError):
                return False
        return True

    def _reload(self) -> None:
        """Replace the in-memory index with the live generation of :attr:`path`."""
        index = load_index(self.path)
        _open_shards(index, self.path, *getattr(self, "_shard_options", (None, False)))
        if index.encoder_settings:
            diff = settings_diff(index.encoder_settings, dict(self.encoder.settings))
            if diff:
                raise ValueError(
                    f"{self.path} was rebuilt with another encoder ({'; '.join(diff[:3])}); "
                    "open it again with that encoder"
                )
        pipeline = Pipeline.for_index(index)
        with self._lock.write():
            old, self.index = self.index, index
            self.pipeline = pipeline
            self._metadata = index.info.setdefault(METADATA_KEY, {})
            self._version += 1
            self._saved = (self.path, self._version)
        close = getattr(getattr(old, "runner", None), "close", None)
        if close is not None and old is not index:
            close()  # remote shard actors of the replaced generation

    # -- description ----------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock.read():
            return len(self.index)

    def stats(self) -> dict[str, Any]:
        """Documents, stored vectors, bytes, pipeline spec and encoder settings."""
        with self._lock.read():
            idx = self.index
            payload = sum(int(np.asarray(a).nbytes) for a in idx._state_arrays().values())
            out: dict[str, Any] = {
                "docs": len(idx),
                "positions": idx.n_positions,
                "tombstones": idx.n_positions - len(idx),
                "vectors": _maybe_int(getattr(idx, "n_vectors", None)),
                "dim": idx.dim,
                "bytes": payload,
                "index_type": idx.index_type,
                "pipeline": idx.pipeline_spec,
                "encoder": idx.encoder_settings,
                "has_texts": idx.texts is not None,
                "mutations": self._version,
                "path": None if self.path is None else str(self.path),
                "saved": self._saved is not None and self._saved[1] == self._version,
            }
        if self.path is not None and (self.path / "CURRENT").is_file():
            try:
                from retrieval_prune.index.sharded import live_generations

                gens = live_generations(self.path)
                out["generation"] = gens[0].name
                out["disk_bytes"] = sum(p.stat().st_size for g in gens for p in g.iterdir() if p.is_file())
            except (OSError, ValueError):  # a concurrent save swapped generations
                pass
        return out

    def __repr__(self) -> str:
        return (
            f"Retriever({len(self.index)} docs, pipeline={self.index.pipeline_spec!r}, "
            f"encoder={self.encoder!r})"
        )


def _open_shards(index: MultiVectorIndex, path: str | Path, address: str | None, allow_partial: bool) -> None:
    """Search a sharded index on Ray when ``address`` is given; set its partial-answer policy."""
    from retrieval_prune.index.sharded import ShardedIndex

    if not isinstance(index, ShardedIndex):
        if address is not None:
            raise ValueError(f"{path} is not a sharded index; address= (Ray) needs one built with --shards N")
        return
    index.allow_partial = bool(allow_partial)
    if address is not None:
        from retrieval_prune.retrieve.ray_shards import attach_ray

        attach_ray(index, path, address=address)


def _maybe_int(x: Any) -> int | None:
    return None if x is None else int(x)


def _check_metadatas(metadatas: Any, n: int) -> list[dict[str, Any]]:
    if metadatas is None:
        return [{} for _ in range(n)]
    if isinstance(metadatas, (str, bytes, Mapping)) or not isinstance(metadatas, Sequence):
        raise TypeError(f"metadatas must be a list of dicts, got {type(metadatas).__name__}")
    if len(metadatas) != n:
        raise ValueError(f"{len(metadatas)} metadatas for {n} documents; give one per document")
    out = []
    for i, m in enumerate(metadatas):
        if m is None:
            m = {}
        if not isinstance(m, Mapping):
            raise TypeError(f"metadatas[{i}] is a {type(m).__name__}, expected a dict")
        try:
            m = json.loads(json.dumps(dict(m), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadatas[{i}] is not JSON-serialisable ({exc})") from None
        out.append(m)
    return out
