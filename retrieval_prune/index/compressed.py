"""Compressed index: documents stored as codec codes, searched by brute force.

Every live document is scored with the scoring that matches the storage codec —
exact MaxSim on decoded floats (``fp16``, ``pca``), code-table MaxSim (``kmeans``,
``hkmeans``), residual decompression (``residual``), float-vs-bits or Hamming
(``binary``) — so the quality measured is the codec's alone (candidate generation
is a separate stage). The saved folder holds only what search needs: the codes,
the document offsets and the codec state (codebooks, projections, bucket tables).

Examples
--------
>>> import numpy as np
>>> from retrieval_prune import MultiVectors
>>> rng = np.random.default_rng(0)
>>> docs = MultiVectors.from_list([rng.standard_normal((6, 16)).astype(np.float32) for _ in range(40)])
>>> index = CompressedIndex.from_spec("residual:k=16,nbits=2")
>>> index.add(docs, [f"d{i}" for i in range(40)])
>>> index.search(docs[3:4], k=1).external(0)[0][0]
'd3'
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from retrieval_prune.compress.base import Codec
from retrieval_prune.compress.chain import CodecChain
from retrieval_prune.index import storage
from retrieval_prune.index.base import MultiVectorIndex, restore_common
from retrieval_prune.types import MultiVectors, all_finite

__all__ = ["CompressedIndex", "blocked_maxsim"]

#: bytes of one block of the (query tokens x document tokens) similarity matrix
BLOCK_BYTES = 1 << 27
#: query tokens scored together
QUERY_GROUP = 16384
#: below this many stored vectors the scans run single-threaded
PARALLEL_MIN_TOKENS = 1 << 16
#: document tokens decoded at a time for the exact-MaxSim kernel
DECODE_TOKENS = 1 << 17


class CompressedIndex(MultiVectorIndex):
    """Codes of a :class:`~retrieval_prune.compress.CodecChain`, brute-force search.

    Build with :meth:`from_spec` (``"pca:dim=128 | residual:nbits=2"``); ``fit`` trains
    the codecs on a sample of documents (the first ``add`` does it when not fitted).
    """

    name = "compressed"
    index_type = "compressed"
    params: dict = {}

    def __init__(self, chain: CodecChain | None = None, seed: int = 0) -> None:
        self.chain = chain if chain is not None else CodecChain.from_spec("residual")
        self.seed = seed
        super().__init__()
        self._parts: dict[str, np.ndarray] = {}
        self._offsets = np.zeros(1, np.int64)
        self._planar = None  # Hamming kernel layout, built on first search

    @classmethod
    def from_spec(cls, spec: str, seed: int = 0) -> CompressedIndex:
        """An empty index for the codec chain ``spec`` (e.g. ``"residual:k=4096,nbits=2"``)."""
        return cls(CodecChain.from_spec(spec), seed=seed)

    # the index's spec is its codec chain's canonical spec (what the manifest stores)
    @property
    def spec(self) -> str:  # type: ignore[override]
        return self.chain.spec

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressedIndex) and self.chain == other.chain

    __hash__ = MultiVectorIndex.__hash__

    @property
    def storage_codec(self) -> Codec:
        return self.chain.storage

    @property
    def n_vectors(self) -> int:
        return int(self._offsets[-1])

    @property
    def code_size(self) -> int:
        """Bytes per stored vector (codes only; the files add codebooks and offsets)."""
        return self.chain.code_size

    # -- build ------------------------------------------------------------------------
    def fit(self, docs: MultiVectors | np.ndarray, seed: int | None = None) -> CompressedIndex:
        """Train the codec chain on ``docs`` (a sample of documents or a token matrix)."""
        if self.n_vectors:
            raise ValueError(
                f"the index already holds {self.n_vectors} coded vectors; refitting the codecs "
                "would invalidate them — build a new index instead"
            )
        tokens = docs.embeddings if isinstance(docs, MultiVectors) else docs
        if seed is not None:
            self.seed = seed
        t0 = time.perf_counter()
        self.chain.fit(tokens, seed=self.seed)
        self.info["codec"] = {
            "spec": self.chain.spec,
            "fit_tokens": int(tokens.shape[0]),
            "fit_seconds": round(time.perf_counter() - t0, 3),
            "code_size": self.chain.code_size,
            "dim_search": self.chain.dim_search,
        }
        n_c = getattr(self.storage_codec, "centroids_", None)
        if n_c is not None:
            self.info["codec"]["n_centroids"] = int(n_c.shape[0])
        return self

    def _add_vectors(self, docs: MultiVectors) -> None:
        if not self.chain.is_fitted:
            if docs.n_tokens == 0:
                raise ValueError(
                    "the first batch has no token vectors to fit the codecs on; call "
                    "index.fit(sample_docs) before adding empty documents"
                )
            self.fit(docs)
        t0 = time.perf_counter()
        self._planar = None
        parts = self.chain.encode_parts(docs.embeddings)
        info = self.info.setdefault("codec", {})
        info["encode_seconds"] = round(
            info.get("encode_seconds", 0.0) + time.perf_counter() - t0, 3
        )
        if not self._parts:
            self._parts = parts
            self._offsets = docs.offsets.copy()
            return
        self._parts = {
            name: np.concatenate([np.asarray(self._parts[name]), arr], axis=0)
            for name, arr in parts.items()
        }
        self._offsets = np.concatenate([self._offsets, docs.offsets[1:] + self._offsets[-1]])

    def _compact_vectors(self, keep: np.ndarray) -> None:
        self._planar = None
        off = np.asarray(self._offsets)
        lens = np.diff(off)[keep]
        rows = (
            np.concatenate([np.arange(off[i], off[i + 1]) for i in keep])
            if keep.size
            else np.zeros(0, np.int64)
        )
        self._parts = {n: np.ascontiguousarray(np.asarray(a)[rows]) for n, a in self._parts.items()}
        self._offsets = np.zeros(keep.size + 1, np.int64)
        np.cumsum(lens, out=self._offsets[1:])

    # -- search -----------------------------------------------------------------------
    def decode_documents(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """Decoded float32 vectors (search space) of token rows ``a:b``."""
        b = self.n_vectors if b is None else b
        return self.chain.decode_search({n: np.asarray(p[a:b]) for n, p in self._parts.items()})

    def _query_side(self, q: np.ndarray) -> np.ndarray:
        """What query tokens are scored with: a code table ``(K, n_q_tok)`` or vectors."""
        codec = self.storage_codec
        if codec.score_kind == "table":
            return codec.query_table(q)
        if codec.score_kind == "binary":
            return codec.query_vectors(q)
        return q

    def _block_sim(self, qside: np.ndarray):
        if self.storage_codec.score_kind == "table":
            codes = self._parts["codes"]
            return lambda a, b: qside[:, np.asarray(codes[a:b], np.int64)]
        return lambda a, b: qside @ self.decode_documents(a, b).T

    def _search(self, queries: MultiVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        with _small_index_threads(self.n_vectors):
            return self._search_kernels(queries, k)

    def _search_kernels(self, queries: MultiVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.chain.transform(queries.embeddings)
        kind = self.storage_codec.score_kind
        if kind == "float":
            from retrieval_prune.kernels.ops import maxsim_search

            return self._search_decoded(maxsim_search, q, queries.offsets, k)
        qside = self._query_side(q) if kind == "table" else q
        return self._search_scan(qside, queries.offsets, k)

    def _planar_bits(self):
        """Planar sign-bit layout of the Hamming kernel, built once per payload."""
        if getattr(self, "_planar", None) is None:
            from retrieval_prune.kernels.ops import to_planar

            self._planar = to_planar(self._parts["bits"], self._offsets, self.storage_codec.dim_in)
        return self._planar

    def _search_scan(self, qside: np.ndarray, q_off: np.ndarray, k: int):
        """Per query, score every document straight from its codes with the matching
        kernel (:mod:`retrieval_prune.kernels.ops`; fp16 via :mod:`retrieval_prune.kernels.scan`)."""
        from retrieval_prune.kernels import ops
        from retrieval_prune.kernels import scan as _scan

        codec = self.storage_codec
        kind = codec.score_kind
        off = np.ascontiguousarray(self._offsets, dtype=np.int64)
        alive = np.ascontiguousarray(self.alive, dtype=np.uint8)
        dead = alive == 0
        n_q = q_off.shape[0] - 1
        scores = np.full((n_q, k), -np.inf, np.float32)
        ids = np.full((n_q, k), -1, np.int64)
        parts = {name: np.asarray(arr) for name, arr in self._parts.items()}
        if kind == "fp16":
            per_doc = np.empty(off.shape[0] - 1, np.float32)
            half_scan = _scan.half_scan
            halves = parts["vectors"].view(np.uint16)
        for i in range(n_q):
            if kind == "table":  # qside: the (K, n_q_tok) table; this query's columns
                qi = np.ascontiguousarray(qside[:, q_off[i] : q_off[i + 1]], dtype=np.float32)
                per_doc = ops.maxsim_code_scores(qi, parts["codes"], off)
            else:
                qi = np.ascontiguousarray(qside[q_off[i] : q_off[i + 1]], dtype=np.float32)
                if qi.shape[0] == 0:  # an empty query scores 0 against every document
                    per_doc = np.where(np.diff(off) > 0, 0.0, -np.inf).astype(np.float32)
                elif kind == "residual":
                    per_doc = ops.maxsim_residual_rerank(
                        qi, parts["codes"], parts["residuals"], off, codec.centroids_,
                        codec.bucket_values_, codec.nbits, normalize=codec.normalize,
                    )  # fmt: skip
                elif kind == "binary" and codec.score == "hamming":
                    per_doc = ops.maxsim_hamming(qi, self._planar_bits())
                elif kind == "binary":
                    per_doc = ops.maxsim_binary(qi, parts["bits"], off)
                else:
                    half_scan(halves, _scan.HALF_LUT, qi, off, alive, per_doc)
            per_doc[dead] = -np.inf
            scores[i], ids[i] = _scan.topk_from_scores(per_doc, k)
        return scores, ids

    def search_reference(self, queries: MultiVectors, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Slow NumPy search (decode, then exact MaxSim) — the check for the Numba scans."""
        qside = self._query_side(self.chain.transform(queries.embeddings))
        if self.storage_codec.score_kind == "table":
            qside = np.ascontiguousarray(qside.T)  # (n_q_tok, K)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        qoff = queries.offsets
        start = 0
        while start < len(queries):  # query groups of bounded token count
            end = int(np.searchsorted(qoff, qoff[start] + QUERY_GROUP, side="right")) - 1
            end = min(max(end, start + 1), len(queries))
            ta, tb = int(qoff[start]), int(qoff[end])
            sim = self._block_sim(qside[ta:tb])
            s, i = blocked_maxsim(sim, qoff[start : end + 1] - ta, self._offsets, k, self.alive)
            scores[start:end], ids[start:end] = s, i
            start = end
        return scores, ids

    def _search_decoded(self, maxsim_search, qv: np.ndarray, q_off: np.ndarray, k: int):
        """Decode bounded chunks of documents and run the exact MaxSim kernel on each."""
        off = np.asarray(self._offsets)
        n_docs = off.shape[0] - 1
        n_q = q_off.shape[0] - 1
        best_s = np.full((n_q, k), -np.inf, np.float32)
        best_i = np.full((n_q, k), -1, np.int64)
        alive = np.asarray(self.alive)
        da = 0
        while da < n_docs:
            db = int(np.searchsorted(off, off[da] + DECODE_TOKENS, side="right")) - 1
            db = min(max(db, da + 1), n_docs)
            ta, tb = int(off[da]), int(off[db])
            if tb > ta and alive[da:db].any():
                dec = np.ascontiguousarray(self.decode_documents(ta, tb), dtype=np.float32)
                s, i = maxsim_search(qv, q_off, dec, off[da : db + 1] - ta, k, alive=alive[da:db])
                i = np.where(i >= 0, i + da, -1)
                best_s, best_i = merge_topk(best_s, best_i, s, i, k)
            da = db
        return best_s, best_i

    # -- persistence ------------------------------------------------------------------
    def _state_arrays(self) -> dict[str, np.ndarray]:
        if not self.chain.is_fitted:
            raise ValueError(
                "nothing to save: the index's codecs are not fitted; add documents first"
            )
        out = {"offsets": np.asarray(self._offsets)}
        for name, arr in self._parts.items():
            out[f"codes.{name}"] = arr
        out.update(self.chain.state_arrays())
        return out

    def _load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.chain.load_state(arrays)
        off = np.asarray(arrays["offsets"])
        if off.ndim != 1 or off.dtype != np.int64 or off.shape[0] < 1:
            raise storage.IndexCorruptedError(
                f"offsets.npy is {off.dtype}{list(off.shape)}; expected a 1-D int64 array of n_docs + 1"
            )
        self._offsets = np.array(off, dtype=np.int64)
        self._parts = {}
        for name, dtype, tail in self.storage_codec.part_layout():
            key = f"codes.{name}"
            if key not in arrays:
                raise storage.IndexCorruptedError(f"saved index lacks its {key!r} array")
            arr = arrays[key]
            if arr.dtype != dtype or arr.shape[1:] != tail or arr.shape[0] != self._offsets[-1]:
                raise storage.IndexCorruptedError(
                    f"{key}: dtype {arr.dtype} shape {arr.shape} does not match the codec "
                    f"({np.dtype(dtype)}, (n={self._offsets[-1]}, {tail}))"
                )
            self._parts[name] = arr  # stays memory-mapped
        if self._offsets.shape[0] - 1 != len(self.doc_ids):
            raise storage.IndexCorruptedError("offsets and ids disagree in length")
        off = self._offsets
        if off[0] != 0 or (off.shape[0] > 1 and np.any(np.diff(off) < 0)):
            raise storage.IndexCorruptedError("offsets.npy must rise from 0 (document token ranges)")
        if self.dim != self.chain.dim_in:
            raise storage.IndexCorruptedError(
                f"manifest dim={self.dim} but the codec chain takes dim={self.chain.dim_in}"
            )
        # every stored value a kernel will index with or compute on is checked once here
        check_codes = getattr(self.storage_codec, "check_codes", None)
        if check_codes is not None:
            check_codes(self._parts)
        for name, arr in self._parts.items():
            if not all_finite(arr):
                raise storage.IndexCorruptedError(f"codes.{name} holds NaN or Inf")

    @classmethod
    def _from_saved(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> CompressedIndex:
        obj = cls.from_spec(meta["spec"])
        restore_common(obj, meta, arrays)
        obj._load_state(arrays, meta)
        return obj


class _small_index_threads:
    """Run the parallel kernels on one thread for a small index: a parallel launch per
    query costs more than the scan, and much more on a loaded machine."""

    def __init__(self, n_vectors: int) -> None:
        self.single = n_vectors < PARALLEL_MIN_TOKENS

    def __enter__(self):
        if self.single:
            import numba

            self.before = numba.get_num_threads()
            numba.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.single:
            import numba

            numba.set_num_threads(self.before)


def blocked_maxsim(
    sim, q_offsets: np.ndarray, d_offsets: np.ndarray, k: int, alive: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` MaxSim from a block similarity function, in bounded memory (NumPy).

    Parameters
    ----------
    sim : callable ``(a, b) -> float32 (n_q_tokens, b - a)``
        Similarity of every query token with document token rows ``a:b``.
    q_offsets : int64 ``(n_q + 1,)`` query token offsets (starting at 0).
    d_offsets : int64 ``(n_docs + 1,)`` document token offsets.
    k : results per query.
    alive : uint8 ``(n_docs,)``, optional; 0 marks a deleted document.

    Returns ``scores float32 (n_q, k)``, ``ids int64 (n_q, k)``: best first, ties broken
    by the lower id; empty and deleted documents never match (``-1`` / ``-inf`` pads).
    """
    q_offsets = np.asarray(q_offsets, np.int64)
    d_offsets = np.asarray(d_offsets, np.int64)
    n_q = q_offsets.shape[0] - 1
    n_docs = d_offsets.shape[0] - 1
    nq_tok = int(q_offsets[-1])
    q_len = np.diff(q_offsets)
    q_nonempty = np.flatnonzero(q_len > 0)
    best_s = np.full((n_q, k), -np.inf, np.float32)
    best_i = np.full((n_q, k), -1, np.int64)
    block = max(256, BLOCK_BYTES // (4 * max(nq_tok, 1)))
    da = 0
    while da < n_docs:
        db = int(np.searchsorted(d_offsets, d_offsets[da] + block, side="right")) - 1
        db = min(max(db, da + 1), n_docs)
        ta, tb = int(d_offsets[da]), int(d_offsets[db])
        lens = np.diff(d_offsets[da : db + 1])
        cols = np.flatnonzero(lens > 0)
        blk = np.full((n_q, db - da), -np.inf, np.float32)
        if cols.size and nq_tok:
            s = np.asarray(sim(ta, tb), np.float32)
            per_doc = np.maximum.reduceat(s, d_offsets[da:db][cols] - ta, axis=1)
            summed = np.zeros((n_q, cols.size), np.float32)
            if q_nonempty.size:
                summed[q_nonempty] = np.add.reduceat(per_doc, q_offsets[:-1][q_nonempty], axis=0)
            blk[:, cols] = summed
        elif cols.size:
            blk[:, cols] = 0.0
        if alive is not None:
            blk[:, np.asarray(alive[da:db]) == 0] = -np.inf
        best_s, best_i = merge_topk(
            best_s, best_i, blk, np.broadcast_to(np.arange(da, db), blk.shape), k
        )
        da = db
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


def merge_topk(best_s, best_i, s, i, k):
    """Top-``k`` of running results and a block whose ids all follow the running ones:
    best first, ties to the lower id (a stable sort keeps earlier ids first)."""
    cand_s = np.concatenate([best_s, s], axis=1)
    cand_i = np.concatenate([best_i, i], axis=1)
    order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)
