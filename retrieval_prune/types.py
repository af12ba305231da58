"""Core data types shared by every stage.

The one currency between stages is :class:`MultiVectors`: a ragged (CSR) set of
token vectors, one flat ``float32 (n_tokens, dim)`` matrix plus ``int64`` offsets
``(n_docs + 1,)`` so that document ``i`` owns rows ``offsets[i]:offsets[i+1]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["MultiVectors", "SearchResult", "Corpus", "check_k", "all_finite"]


def all_finite(arr: np.ndarray, chunk_rows: int = 1 << 16) -> bool:
    """``np.isfinite(arr).all()`` in row blocks: bounded memory on a memory-mapped array."""
    a = np.asarray(arr)
    if a.dtype.kind != "f" or a.size == 0:
        return True
    if a.ndim < 2:
        a = a.reshape(-1, 1)
    return all(bool(np.isfinite(a[i : i + chunk_rows]).all()) for i in range(0, a.shape[0], chunk_rows))


def check_k(k: object) -> int:
    """Validate a result depth ``k`` (an integer >= 1) and return it as int."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k={k!r} must be an integer >= 1")
    if k <= 0:
        raise ValueError(f"k={k} must be >= 1; ask for at least one result")
    return int(k)


@dataclass(frozen=True, eq=False)
class MultiVectors:
    """Ragged set of token vectors in CSR layout.

    Parameters
    ----------
    embeddings : ndarray of float32, shape (n_tokens, dim)
        All token vectors, documents one after the other.
    offsets : ndarray of int64, shape (n_docs + 1,)
        ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == n_tokens``. A document
        with no tokens (``offsets[i] == offsets[i+1]``) is allowed and never matches.
    weights : ndarray of float32, shape (n_tokens,), optional
        Per-token importance (e.g. [CLS] attention) carried along for pruning.

    Examples
    --------
    >>> import numpy as np
    >>> mv = MultiVectors.from_list([np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32)])
    >>> len(mv), mv.dim, mv.doc(0).shape, mv.doc(1).shape
    (2, 4, (2, 4), (0, 4))
    """

    embeddings: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        emb, off, w = self.embeddings, self.offsets, self.weights
        if not isinstance(emb, np.ndarray) or emb.ndim != 2:
            shape = getattr(emb, "shape", None)
            raise ValueError(
                f"embeddings must be a 2-D array (n_tokens, dim), got shape {shape}; "
                "reshape a single document with x.reshape(-1, dim)"
            )
        if emb.dtype != np.float32:
            raise TypeError(
                f"embeddings dtype is {emb.dtype}, expected float32; convert with "
                "x.astype(np.float32)"
            )
        if emb.shape[1] == 0:
            raise ValueError("embeddings have dim=0; vectors need at least one dimension")
        if not isinstance(off, np.ndarray) or off.ndim != 1 or off.shape[0] < 1:
            shape = getattr(off, "shape", None)
            raise ValueError(
                f"offsets must be a 1-D array of n_docs + 1 entries, got {type(off).__name__} of shape {shape}"
            )
        if off.dtype != np.int64:
            raise TypeError(f"offsets dtype is {off.dtype}, expected int64")
        if off[0] != 0 or off[-1] != emb.shape[0]:
            raise ValueError(
                f"offsets must start at 0 and end at n_tokens={emb.shape[0]}, "
                f"got offsets[0]={off[0]}, offsets[-1]={off[-1]}"
            )
        if off.shape[0] > 1 and np.any(np.diff(off) < 0):
            bad = int(np.argmax(np.diff(off) < 0))
            raise ValueError(f"offsets must be non-decreasing; offsets[{bad}] > offsets[{bad + 1}]")
        if w is not None:
            if not isinstance(w, np.ndarray) or w.shape != (emb.shape[0],):
                raise ValueError(
                    f"weights must have shape ({emb.shape[0]},), got {getattr(w, 'shape', None)}"
                )
            if w.dtype != np.float32:
                raise TypeError(f"weights dtype is {w.dtype}, expected float32")

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_list(
        cls,
        docs: Sequence[np.ndarray],
        weights: Sequence[np.ndarray] | None = None,
        dim: int | None = None,
    ) -> MultiVectors:
        """Build from a list of per-document ``(n_i, dim)`` float32 arrays."""
        if len(docs) == 0:
            if dim is None:
                raise ValueError("cannot infer dim from an empty list; pass dim=")
            return cls(np.zeros((0, dim), np.float32), np.zeros(1, np.int64))
        dims = {d.shape[1] for d in docs if d.ndim == 2}
        if any(d.ndim != 2 for d in docs):
            raise ValueError("every document must be a 2-D array (n_tokens, dim)")
        if dim is not None:
            dims.add(dim)
        if len(dims) != 1:
            raise ValueError(f"documents have different dims {sorted(dims)}; all must match")
        lens = np.fromiter((d.shape[0] for d in docs), np.int64, len(docs))
        offsets = np.zeros(len(docs) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        emb = np.ascontiguousarray(np.concatenate(docs, axis=0), dtype=np.float32)
        w = None
        if weights is not None:
            w = np.ascontiguousarray(np.concatenate(list(weights)), dtype=np.float32)
        return cls(emb, offsets, w)

    @classmethod
    def concat(cls, parts: Iterable[MultiVectors]) -> MultiVectors:
        """Concatenate several sets (documents of ``parts[1]`` follow those of ``parts[0]``)."""
        parts = list(parts)
        if not parts:
            raise ValueError("concat needs at least one MultiVectors")
        dims = {p.dim for p in parts}
        if len(dims) != 1:
            raise ValueError(f"cannot concatenate MultiVectors of dims {sorted(dims)}")
        has_w = {p.weights is not None for p in parts}
        emb = np.concatenate([p.embeddings for p in parts], axis=0)
        offs = [np.zeros(1, np.int64)]
        base = 0
        for p in parts:
            offs.append(p.offsets[1:] + base)
            base += p.n_tokens
        w = None
        if has_w == {True}:
            w = np.concatenate([p.weights for p in parts])  # type: ignore[misc]
        return cls(np.ascontiguousarray(emb), np.concatenate(offs), w)

    # -- access ---------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per document, int64 ``(n_docs,)``."""
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        """Token vectors of document ``i`` as a ``(n_i, dim)`` view."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document index {i} out of range for {n} documents")
        i %= n
        return self.embeddings[self.offsets[i] : self.offsets[i + 1]]

    def doc_weights(self, i: int) -> np.ndarray | None:
        if self.weights is None:
            return None
        i %= len(self)
        return self.weights[self.offsets[i] : self.offsets[i + 1]]

    def __getitem__(self, key: slice | Sequence[int] | np.ndarray) -> MultiVectors:
        """Select documents by slice or integer index array; returns a new set."""
        if isinstance(key, (int, np.integer)):
            raise TypeError("use mv.doc(i) for one document; mv[i:j] or mv[[...]] selects a set")
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                a, b = self.offsets[start], self.offsets[max(stop, start)]
                off = self.offsets[start : max(stop, start) + 1] - a
                w = None if self.weights is None else self.weights[a:b]
                return MultiVectors(self.embeddings[a:b], off, w)
            key = np.arange(start, stop, step)
        idx = np.asarray(key, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError("document selection must be 1-D")
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"document index out of range for {len(self)} documents")
        idx = idx % max(len(self), 1)
        lens = self.lengths[idx]
        off = np.zeros(idx.size + 1, np.int64)
        np.cumsum(lens, out=off[1:])
        rows = (
            np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
            if idx.size
            else np.zeros(0, np.int64)
        )
        w = None if self.weights is None else self.weights[rows]
        return MultiVectors(np.ascontiguousarray(self.embeddings[rows]), off, w)

    def validate_finite(self, what: str = "embeddings") -> MultiVectors:
        """Raise ``ValueError`` if any vector holds NaN or Inf; returns self."""
        if not all_finite(self.embeddings):
            bad = np.flatnonzero(~np.isfinite(self.embeddings).all(axis=1))
            tok = int(bad[0])
            d = int(np.searchsorted(self.offsets, tok, side="right") - 1)
            raise ValueError(
                f"{what} contain NaN or Inf ({bad.size} token vectors, first: token {tok} of "
                f"document {d}); clean or drop those vectors before indexing"
            )
        return self


@dataclass(frozen=True)
class SearchResult:
    """Top-k results for a batch of queries, faiss-style fixed shape.

    ``scores`` float32 ``(n_queries, k)`` and ``ids`` int64 ``(n_queries, k)`` internal
    document positions, best first; missing slots hold ``-1`` and ``-inf``.
    ``doc_ids`` (optional) maps positions to external string ids.
    """

    scores: np.ndarray
    ids: np.ndarray
    doc_ids: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.scores.shape != self.ids.shape or self.scores.ndim != 2:
            raise ValueError(
                f"scores {self.scores.shape} and ids {self.ids.shape} must be equal 2-D shapes"
            )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def external(self, q: int) -> list[tuple[str, float]]:
        """``[(external_id, score), ...]`` for query ``q``, padding dropped."""
        if self.doc_ids is None:
            raise ValueError("this result carries no external ids")
        return [
            (self.doc_ids[int(i)], float(s))
            for i, s in zip(self.ids[q], self.scores[q], strict=False)
            if i >= 0
        ]

    def to_run(self, query_ids: Sequence[str]) -> dict[str, dict[str, float]]:
        """TREC-style run ``{qid: {doc_id: score}}`` for metric libraries."""
        if len(query_ids) != len(self):
            raise ValueError(f"{len(query_ids)} query ids for {len(self)} result rows")
        return {qid: dict(self.external(q)) for q, qid in enumerate(query_ids)}


@dataclass(frozen=True)
class Corpus:
    """A retrieval collection: documents, queries and relevance judgements.

    ``docs`` maps doc id -> {"title", "text", ...}; ``queries`` maps query id -> text;
    ``qrels`` maps query id -> {doc id: grade}. ``name`` identifies it in caches/reports.
    """

    name: str
    doc_ids: list[str]
    doc_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split: str = "test"
    metadata: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.doc_ids)

    def judged_queries(self) -> tuple[list[str], list[str]]:
        """(query ids, texts) of queries that have at least one judgement."""
        qids = [q for q in self.queries if q in self.qrels]
        return qids, [self.queries[q] for q in qids]
