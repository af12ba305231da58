"""Staged search over centroid codes: candidates, approximate scoring, rerank.

:class:`StagedIndex` stores what a :class:`~retrieval_prune.index.compressed.CompressedIndex`
stores (codec-chain codes, offsets, codec state) and searches it PLAID-style, each stage
with its own budget:

1. **score table** -- per query the centroid similarities ``T = C qᵀ`` (K x n_q), computed
   once by a GEMM-shaped kernel straight into the row-major, lane-padded layout the code
   kernels read (no copy), and shared by stages 2-3. With an int8 codebook
   (``centroid_bits=8``) the query is quantised to int8 per token as well and ``T`` is an
   exact integer product scaled back (AVX-512 VNNI where the CPU has it; the portable
   kernel gives the same numbers), 3-4x faster; it only ranks centroids and candidates --
   the rerank scores with the float query;
2. **candidates** -- the ``nprobe`` best centroids of every query token (found exactly
   from ``T``, by Hamming distance of sign bits, or through an HNSW graph: subclasses
   choose) and the union of their inverted lists (documents holding a token of that
   centroid); deleted documents are skipped;
3. **approximate scoring** -- centroid interaction ``Σ_i max_j T[code_j, i]`` of every
   candidate straight from its codes with a uint8-quantised table (parallel over
   documents); with ``t_cs`` set, centroids whose best similarity to any query token is
   below ``t_cs`` are pruned from this pass (PLAID's pruned interaction). The best
   ``n_candidates`` are re-scored by the full interaction with the float32 table. Where
   that cut would keep more than half of the candidates (and ``t_cs`` is unset), the
   uint8 pass is skipped and every candidate goes to the float32 interaction: one pass
   costs less than two (:meth:`StagedIndex._u8_cut`);
4. **rerank** -- the best ``n_rerank`` are scored exactly against their decompressed
   residuals (``residual`` storage) or the float table (``kmeans`` storage); top ``k``.

Ties are broken by the lower position at every stage, so a search is deterministic and
an index that had documents added and then deleted answers exactly like a fresh build
of the remaining documents with the same codebook. With budgets that cover everything
(``nprobe`` >= K, ``n_candidates`` and ``n_rerank`` >= documents) the result equals the
brute-force search of the same codes (:meth:`StagedIndex.search_bruteforce`).

The inverted file is derived from the codes when the index is opened (O(n_tokens), no
sort), so it costs no disk; the arrays stay memory-mapped.

Live updates: documents added to a fitted index are coded with the existing codebook,
and the index measures *codebook drift* -- the quantization error of the new vectors
relative to the error on the data the codebook was fitted on (:meth:`StagedIndex.drift`);
a ratio well above 1 means the codebook no longer fits and the index should be rebuilt.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from retrieval_prune import registry
from retrieval_prune.compress.chain import CodecChain
from retrieval_prune.compress.kmeans import _CentroidCodec
from retrieval_prune.index import storage
from retrieval_prune.index.base import MultiVectorIndex, encode_strings
from retrieval_prune.index.compressed import CompressedIndex
from retrieval_prune.kernels import codes as _codes_k
from retrieval_prune.kernels import ivf as _ivf_k
from retrieval_prune.kernels.ops import _empty_aligned
from retrieval_prune.registry import Param
from retrieval_prune.types import MultiVectors

__all__ = ["StagedIndex", "DRIFT_WARN", "build_streaming"]

#: drift ratio above which the index recommends a rebuild (and add() warns)
DRIFT_WARN = 1.25
#: tokens sampled per batch to measure quantization error
DRIFT_SAMPLE = 8192
#: added tokens needed before drift can recommend a rebuild (smaller samples are noise)
DRIFT_MIN_TOKENS = 256
#: uint8 lanes of the quantised-table kernel
_LANES_U8 = _codes_k.LANES_U8
#: float32 lanes (query tokens per vector) of the packed query and the score table
_LANES_F32 = _codes_k.LANES

#: the uint8 pass runs only where its cut drops more than ``1 - 1 / U8_MIN_DROP`` of the
#: candidates (:meth:`StagedIndex._u8_cut`)
U8_MIN_DROP = 2

STAGE_PARAMS: dict[str, Param] = {
    "nprobe": Param(4, int, "centroids probed per query token", low=1, high=65536),
    "t_cs": Param(
        None, float, "centroid score threshold of the pruned interaction (PLAID); unset: off"
    ),
    "n_candidates": Param(
        None, int, "documents kept by the (pruned) approximate scoring; unset: by k as "
        "PLAID's ndocs (256 for k <= 10, 1024 for k <= 100, else max(4k, 4096))", low=1
    ),
    "n_rerank": Param(
        None, int, "documents re-scored exactly (residual decompression); unset: "
        "n_candidates / 4 (PLAID), at least k", low=1
    ),
}


class StagedIndex(CompressedIndex):
    """Codec-chain codes searched in stages (see the module docstring).

    Subclasses set ``name``/``index_type``, ``params`` (``STAGE_PARAMS`` plus their own)
    and implement :meth:`_probe`. Build with :meth:`from_codecs` or a pipeline spec
    (``"pca:dim=128 | residual:nbits=2 | ivf:nprobe=4"``).
    """

    #: codec chain used when a spec names no codec
    DEFAULT_CODECS: ClassVar[str] = "residual:nbits=2"

    def __init__(self, chain: CodecChain | None = None, seed: int = 0, **params: Any) -> None:
        if chain is None:
            chain = CodecChain.from_spec(self.DEFAULT_CODECS)
        if not isinstance(chain.storage, _CentroidCodec):
            raise ValueError(
                f"{self.name}: staged search needs centroid codes (kmeans, hkmeans or residual) as "
                f"the storage codec, got {chain.storage.spec!r}; e.g. "
                f"'pca:dim=128 | residual:nbits=2 | {self.name}'"
            )
        CompressedIndex.__init__(self, chain, seed)
        for key, value in self._check_params(params).items():
            setattr(self, key, value)
        self.pipeline_spec = self.spec
        self._cache: dict[str, Any] | None = None

    # -- spec ---------------------------------------------------------------------------
    @classmethod
    def from_codecs(cls, codec_spec: str, seed: int = 0, **params: Any) -> StagedIndex:
        """An empty index over the codec chain ``codec_spec`` (``make_pipeline`` calls this)."""
        return cls(CodecChain.from_spec(codec_spec), seed=seed, **params)

    @classmethod
    def from_spec(cls, spec: str, seed: int = 0) -> StagedIndex:  # type: ignore[override]
        """Parse ``"<codec chain> | <name>:<params>"`` (the index's own canonical spec)."""
        steps = registry.parse_spec(spec)
        name, params = steps[-1]
        if name != cls.name:
            return cls(CodecChain.from_spec(spec), seed=seed)
        chain = CodecChain.from_spec(registry.format_spec(steps[:-1])) if len(steps) > 1 else None
        return cls(chain, seed=seed, **params)

    @property
    def spec(self) -> str:  # type: ignore[override]
        return f"{self.chain.spec} | {registry.format_spec([(self.name, self.get_params())])}"

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.chain == other.chain  # type: ignore[attr-defined]
            and self.get_params() == other.get_params()  # type: ignore[attr-defined]
        )

    __hash__ = MultiVectorIndex.__hash__

    def configure(self, **params: Any) -> StagedIndex:
        """Change search budgets (validated like the spec); parameters not named keep their
        current values. Returns self.

        >>> index.configure(nprobe=8, n_rerank=512)  # doctest: +SKIP
        """
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; known: {list(self.params)}")
        merged = {**self.get_params(), **params}
        for key, value in self._check_params(merged).items():
            setattr(self, key, value)
        self._check_search_params()
        if self.pipeline_spec:  # the steps before the codecs stay; the index part is rewritten
            before = [
                (name, params) for name, params in registry.parse_spec(self.pipeline_spec)
                if registry.get(name).stage not in ("codec", "index")
            ]
            self.pipeline_spec = " | ".join(([registry.format_spec(before)] if before else []) + [self.spec])
        return self

    def _check_search_params(self) -> None:
        """Subclass hook for cross-parameter checks."""

    # -- build ---------------------------------------------------------------------------
    def fit(self, docs: MultiVectors | np.ndarray, seed: int | None = None) -> StagedIndex:
        super().fit(docs, seed)
        tokens = docs.embeddings if isinstance(docs, MultiVectors) else docs
        base = self._quant_error(tokens, np.random.default_rng(self.seed))
        self.info["drift"] = {
            "fit_mse": base["mse"],
            "fit_centroid_mse": base["centroid_mse"],
            "fit_sample": base["n"],
            "added_tokens": 0,
            "added_mse": None,
            "added_centroid_mse": None,
            "ratio": None,
            "rebuild_recommended": False,
        }
        self._after_fit()
        self._cache = None
        return self

    def _after_fit(self) -> None:
        """Subclass hook: build structures over the fitted centroids."""

    def _quant_error(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        """Mean squared quantization error (search space) of a token sample: after full
        coding (``mse``) and to the nearest stored centroid alone (``centroid_mse``)."""
        n = tokens.shape[0]
        rows = np.sort(rng.choice(n, size=DRIFT_SAMPLE, replace=False)) if n > DRIFT_SAMPLE else np.arange(n)
        if rows.size == 0:
            return {"mse": 0.0, "centroid_mse": 0.0, "n": 0}
        x = self.chain.transform(np.ascontiguousarray(tokens[rows], dtype=np.float32))
        codec = self.storage_codec
        parts = codec.encode_parts(x)
        rec = codec.decode_parts(parts)
        cent = codec.centroids_[np.asarray(parts["codes"], np.int64)]
        return {
            "mse": float(np.mean(np.sum((x - rec) ** 2, axis=1))),
            "centroid_mse": float(np.mean(np.sum((x - cent) ** 2, axis=1))),
            "n": int(rows.size),
        }

    def _add_vectors(self, docs: MultiVectors) -> None:
        # drift is measured on documents added to a built index (not on the build itself)
        if self.chain.is_fitted and docs.n_tokens and self.n_positions:
            self._record_drift(docs.embeddings)
        super()._add_vectors(docs)
        self._cache = None

    def _record_drift(self, tokens: np.ndarray) -> None:
        drift = self.info.get("drift")
        if not drift or not drift.get("fit_mse"):
            return
        err = self._quant_error(tokens, np.random.default_rng(self.seed + 1 + drift["added_tokens"]))
        n_old, n_new = drift["added_tokens"], tokens.shape[0]
        w_old = n_old / (n_old + n_new)
        for key, val in (("added_mse", err["mse"]), ("added_centroid_mse", err["centroid_mse"])):
            prev = drift.get(key)
            drift[key] = val if prev is None else w_old * prev + (1 - w_old) * val
        drift["added_tokens"] = n_old + n_new
        drift["last_batch_ratio"] = max(
            err["mse"] / drift["fit_mse"], err["centroid_mse"] / max(drift["fit_centroid_mse"], 1e-30)
        )
        drift["ratio"] = max(
            drift["added_mse"] / drift["fit_mse"],
            drift["added_centroid_mse"] / max(drift["fit_centroid_mse"], 1e-30),
        )
        # a few tokens say little: decide (and warn) once enough have been added
        drift["rebuild_recommended"] = bool(
            drift["ratio"] > DRIFT_WARN and drift["added_tokens"] >= DRIFT_MIN_TOKENS
        )
        if drift["rebuild_recommended"] and (
            n_new >= DRIFT_MIN_TOKENS or drift["last_batch_ratio"] > DRIFT_WARN
        ):
            warnings.warn(
                f"codebook drift: the added vectors quantize {drift['ratio']:.2f}x worse "
                f"than the data the codebook was fitted on (threshold {DRIFT_WARN}); search "
                "quality may drop -- rebuild the index when convenient",
                stacklevel=4,
            )

    def drift(self) -> dict[str, Any]:
        """Codebook drift report: fit-sample and added-data quantization errors, their
        ratio (max over full coding and centroid-only) and ``rebuild_recommended``."""
        return dict(self.info.get("drift") or {})

    def _compact_vectors(self, keep: np.ndarray) -> None:
        super()._compact_vectors(keep)
        self._cache = None

    def _load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super()._load_state(arrays, meta)
        self._cache = None

    # -- search -------------------------------------------------------------------------
    def _prepare(self) -> dict[str, Any]:
        """Search-time structures, derived once per payload: inverted file, lookup tables."""
        cache = self._cache
        if cache is not None and cache["n_positions"] == self.n_positions:
            return cache
        codec = self.storage_codec
        off = np.ascontiguousarray(self._offsets, dtype=np.int64)
        codes = np.asarray(self._parts["codes"])
        cent = np.ascontiguousarray(codec.centroids_, dtype=np.float32)
        k = cent.shape[0]
        list_off, list_docs = _ivf_k.build_ivf_kernel(codes, off, k)
        lens = np.diff(off)
        cache = {
            "n_positions": self.n_positions,
            "off": off,
            "codes": codes,
            "centroids": cent,
            # the table and rerank kernels read the int8 codebook when there is one (a
            # quarter of the bytes: what a search that finds the codebook out of cache
            # waits on); the float32 "centroids" stay for the other stages' callers
            "codebook": (
                codec._centroids_i8.reshape(-1) if codec._centroids_i8 is not None else cent.reshape(-1)
            ),
            "codebook_scale": (
                np.ascontiguousarray(codec.centroid_scale_, np.float32)
                if codec._centroids_i8 is not None else np.zeros(0, np.float32)
            ),
            # -128 * row sums of the int8 codebook: the VNNI table kernel's offset correction
            "codebook_corr": (
                -128 * codec._centroids_i8.astype(np.int32).sum(axis=1, dtype=np.int32)
                if codec._centroids_i8 is not None else np.zeros(0, np.int32)
            ),
            "list_off": list_off,
            "list_docs": list_docs,
            "max_len": int(lens.max()) if lens.size else 0,
            "mean_len": float(lens.mean()) if lens.size else 0.0,
            "nonempty": np.flatnonzero(lens > 0),
        }
        if codec.score_kind == "residual":
            nbits = codec.nbits
            per = 8 // nbits
            v = np.arange(256)[:, None] >> (np.arange(per)[None, :] * nbits) & ((1 << nbits) - 1)
            cache["packed"] = np.asarray(self._parts["residuals"])
            cache["lut"] = np.ascontiguousarray(codec.bucket_values_[v], dtype=np.float32)
            cache["per"] = per
        self._prepare_probe(cache)
        self._cache = cache
        return cache

    def _prepare_probe(self, cache: dict[str, Any]) -> None:
        """Subclass hook: probe structures (sign bits, graphs) into ``cache``."""

    def _probe(self, cache: dict[str, Any], table: np.ndarray, q: np.ndarray, rng: np.ndarray | None = None) -> np.ndarray:
        """Probed centroid ids (int64, any order, repeats allowed) of one query.

        ``table`` float32 ``(K, n_q)`` centroid similarities; ``q`` float32 ``(n_q, dim)``.
        ``rng``: float32 ``(2,)`` a probe that reads the whole table may fill with its
        minimum and maximum over the query's columns (the approximate stage then needs no
        pass of its own); one that does not leaves it NaN.
        """
        raise NotImplementedError

    def _search(self, queries: MultiVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        # the matrix products of a query are small: a BLAS thread team only adds latency
        with _blas_single_thread():
            return self._search_staged(queries, k)

    def _search_staged(self, queries: MultiVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        from retrieval_prune.kernels.ops import _pack

        cache = self._prepare()
        q_all = np.ascontiguousarray(self.chain.transform(queries.embeddings), dtype=np.float32)
        q_off = queries.offsets
        qp, qv_off, _ = _pack(q_all, q_off)  # once for the batch: table and rerank read it
        vsize = q_all.shape[1] * _LANES_F32
        n_q = len(queries)
        n_docs = self.n_positions
        scores = np.full((n_q, k), -np.inf, np.float32)
        ids = np.full((n_q, k), -1, np.int64)
        alive = np.ascontiguousarray(self.alive, dtype=np.uint8)
        mark = np.zeros(n_docs, np.int32)
        buf = np.empty(max(n_docs, 1), np.int32)
        for i in range(n_q):
            a, b = int(q_off[i]), int(q_off[i + 1])
            if b == a:  # an empty query scores 0 against every (live, non-empty) document
                live = cache["nonempty"][alive[cache["nonempty"]] != 0][:k]
                scores[i, : live.size], ids[i, : live.size] = 0.0, live
                continue
            qpi = qp[int(qv_off[i]) * vsize : int(qv_off[i + 1]) * vsize]
            table = self._score_table(cache, qpi)
            s, d = self._search_one(cache, table, q_all[a:b], qpi, k, alive, mark, i + 1, buf)
            scores[i, : s.size], ids[i, : d.size] = s, d
        return scores, ids

    def _score_table(self, cache, qp: np.ndarray) -> np.ndarray:
        """Stage 1: ``float32 (K, W)`` centroid scores of one packed query (``qp``, 16-lane
        vectors as :func:`~retrieval_prune.kernels.ops._pack` makes them); column ``i < n_q``
        is query token ``i``, the padding columns are 0.

        With an int8 codebook the query is quantised to int8 per token too and the table
        is an int8 x int8 product (AVX-512 VNNI where the CPU has it, the same numbers
        without): it only ranks centroids and candidates, the rerank reads the float query."""
        cent = cache["centroids"]
        n_c, dim = cent.shape
        nv = qp.size // (dim * _LANES_F32)
        out = _empty_aligned((n_c, nv * _LANES_F32), np.float32)  # later stages read it as is
        with _numba_threads(float(n_c) * nv * _LANES_F32 * dim):
            if cache["codebook_scale"].size > 0:
                _codes_k.centroid_table_i8(
                    qp, nv, dim, cache["codebook"], cache["codebook_corr"],
                    cache["codebook_scale"], n_c, out.reshape(-1),
                )  # fmt: skip
            else:
                _codes_k.centroid_table_kernel(qp, nv, dim, cache["codebook"], n_c, out.reshape(-1))
        return out

    def _search_one(self, cache, table, q, qp, k, alive, mark, stamp, buf):
        """Stages 2-4 for one query; returns (scores, positions) best first (<= k).

        ``table``: the lane-padded score table (:meth:`_score_table`); ``q``: the query's
        ``(n_q, dim)`` tokens; ``qp``: the same packed."""
        rng = np.full(2, np.nan, np.float32)
        cand = self._candidates(cache, table, q, alive, mark, stamp, buf, rng)
        if cand.size == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        n_keep, n_final = self._stage_sizes(k)
        if cand.size > n_final:  # 3. approximate scoring on codes
            if self._u8_cut(cand.size, n_keep):
                s = self._interaction(cache, table, q.shape[0], cand, self._tcs_keep(table, q), rng)
                cand = cand[_select_idx(s, n_keep)]
            if cand.size > n_final:  # full interaction, float32 table, on the survivors
                cand = cand[_select_idx(self._interaction_f32(cache, table, cand), n_final)]
        # 4. rerank
        return final_order(self._rerank(cache, table, q, cand, qp), cand, k)

    def _candidates(self, cache, table, q, alive, mark, stamp, buf, rng=None) -> np.ndarray:
        """Stage 2: sorted positions of the live documents holding a probed centroid
        (``rng``: see :meth:`_probe`)."""
        probe = np.ascontiguousarray(self._probe(cache, table, q, rng), dtype=np.int64)
        n = _ivf_k.gather_kernel(probe, cache["list_off"], cache["list_docs"], alive, mark, stamp, buf)
        return np.sort(buf[:n]).astype(np.int64)

    def _u8_cut(self, n_cand: int, n_keep: int) -> bool:
        """Whether ``n_cand`` candidates go through the uint8 pass and its cut to ``n_keep``
        before the float32 interaction. Not when that cut would keep more than
        ``1 / U8_MIN_DROP`` of them: the float32 pass over all of them then costs less than
        both passes (the uint8 pass quantises the whole score table first; at SciFact 128-d,
        one thread: 0.17 ms for that, 0.14 us per document, 0.36 us per document in
        float32). The pruned interaction (``t_cs``) is the uint8 pass: always kept."""
        return self.t_cs is not None or n_cand > U8_MIN_DROP * n_keep

    def _stage_sizes(self, k: int) -> tuple[int, int]:
        """``(n_keep, n_final)``: documents kept by the uint8 approximate scoring, and re-scored
        exactly (at least ``k`` each)."""
        n_cand, n_rerank = self.budgets(k)
        return max(n_cand, n_rerank, k), max(n_rerank, k)

    def _tcs_keep(self, table: np.ndarray, q: np.ndarray) -> np.ndarray | None:
        """Rows of the score table kept by the pruned interaction (``t_cs``), None: all."""
        if self.t_cs is None:
            return None
        return (table[:, : q.shape[0]].max(axis=1) >= self.t_cs).astype(np.uint8)

    # -- one shard of a sharded index: the staged search in two exchanges ---------------------
    def shard_phase1(self, queries: MultiVectors, k: int, tables: list | None = None) -> tuple[list[tuple], list[tuple]]:
        """First exchange of an exact search over shards that share this index's codebook.

        Every stage score of a document depends on the query, the codebook and that
        document alone; only the stages' top-``n`` cuts see the other documents. So each
        shard sends, per query, its candidate count and its own best ``n_keep`` candidates by
        the approximate (uint8) score -- a superset of its share of the global best -- and
        the coordinator cuts globally (:func:`retrieval_prune.index.sharded.merge_staged`).
        A shard whose own candidates the uint8 cut would not thin (:meth:`_u8_cut`) sends
        them all: if the global count is not thinned either, the single index scores every
        candidate in float32, and the coordinator must be able to as well.
        ``k`` is the *global* depth (budgets follow it, not this shard's size).

        ``tables``: the per-query score tables another shard with the same codebook made
        for these queries (``state[i][0]``): the table depends on the query and the codebook
        only, so shards in one process compute it once.

        Returns ``(state, answers)``: ``state`` stays with the shard for
        :meth:`shard_phase2`; an answer is ``("empty", scores, positions)`` for a query with no
        vectors (scored 0 against every non-empty document) or ``("cand", count, positions,
        scores)``.
        """
        from retrieval_prune.kernels.ops import _pack

        cache = self._prepare()
        q_all = np.ascontiguousarray(self.chain.transform(queries.embeddings), dtype=np.float32)
        q_off = queries.offsets
        qp, qv_off, _ = _pack(q_all, q_off)
        vsize = q_all.shape[1] * _LANES_F32
        alive = np.ascontiguousarray(self.alive, dtype=np.uint8)
        mark = np.zeros(self.n_positions, np.int32)
        buf = np.empty(max(self.n_positions, 1), np.int32)
        n_keep, _ = self._stage_sizes(k)
        state, answers = [], []
        with _blas_single_thread():
            for i in range(len(queries)):
                a, b = int(q_off[i]), int(q_off[i + 1])
                if b == a:
                    live = cache["nonempty"][alive[cache["nonempty"]] != 0][:k].astype(np.int64)
                    answers.append(("empty", np.zeros(live.size, np.float32), live))
                    state.append(None)
                    continue
                qpi = qp[int(qv_off[i]) * vsize : int(qv_off[i + 1]) * vsize]
                table = tables[i] if tables is not None and tables[i] is not None else self._score_table(cache, qpi)
                q = q_all[a:b]
                rng = np.full(2, np.nan, np.float32)
                cand = self._candidates(cache, table, q, alive, mark, i + 1, buf, rng)
                s = self._interaction(cache, table, q.shape[0], cand, self._tcs_keep(table, q), rng) \
                    if cand.size else np.zeros(0, np.float32)
                idx = _select_idx(s, n_keep) if self._u8_cut(cand.size, n_keep) else np.arange(cand.size)
                answers.append(("cand", int(cand.size), cand[idx], s[idx]))
                state.append((table, q, qpi))
        return state, answers

    def shard_phase2(self, state: list[tuple], orders: list[tuple | None], n_final: int) -> list[tuple | None]:
        """Second exchange: per query, ``(positions, use_f32)`` from the coordinator (its
        global survivors of the approximate cut that live here). With ``use_f32`` the shard
        scores them with the float32 interaction and reranks its own best ``n_final`` of them
        (a superset of its share of the global best); else it reranks them all. Answers
        ``(f32 scores or None, reranked positions, final scores)`` (None where no order)."""
        cache = self._prepare()
        out: list[tuple | None] = []
        with _blas_single_thread():
            for st, order in zip(state, orders, strict=True):
                if order is None or st is None:
                    out.append(None)
                    continue
                table, q, qpi = st
                cand, use_f32 = np.asarray(order[0], np.int64), bool(order[1])
                f32 = None
                kept = cand
                if use_f32:
                    f32 = self._interaction_f32(cache, table, cand) if cand.size else np.zeros(0, np.float32)
                    kept = cand[_select_idx(f32, n_final)]
                out.append((f32, kept, self._rerank(cache, table, q, kept, qpi)))
        return out

    def budgets(self, k: int) -> tuple[int, int]:
        """``(n_candidates, n_rerank)`` for a search of depth ``k``: the set values, or
        colbert-ai's PLAID defaults by ``k`` where unset (rerank = a quarter, >= ``k``)."""
        n_cand = self.n_candidates
        if n_cand is None:
            n_cand = 256 if k <= 10 else 1024 if k <= 100 else max(4 * k, 4096)
        n_rerank = self.n_rerank if self.n_rerank is not None else max(n_cand // 4, k)
        return int(n_cand), int(n_rerank)

    def _interaction(self, cache, table, n_q, cand, keep, rng=None) -> np.ndarray:
        """Centroid interaction of candidates with a uint8 table (pruned rows when ``keep``).

        ``table (K, W)``: score table whose first ``n_q`` columns are the query tokens;
        ``rng``: its minimum and maximum over them if the probe found them (NaN: not)."""
        use_keep = keep is not None
        keep_arr = keep if use_keep else np.zeros(1, np.uint8)
        if use_keep:
            lo, hi = _ivf_k.table_range_kernel(table, n_q, keep_arr, use_keep)
        elif rng is not None and not np.isnan(rng[0]):
            lo, hi = rng[0], rng[1]
        else:  # numpy's SIMD reductions (3x the kernel's speed) over the real columns
            t = table if table.shape[1] == n_q else table[:, :n_q]
            lo, hi = t.min(), t.max()
        lo, hi = float(lo), float(hi)
        if not np.isfinite(hi):  # every row pruned
            hi = lo
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        w = max(_LANES_U8, -(-n_q // _LANES_U8) * _LANES_U8)
        t8 = _empty_aligned((table.shape[0], w), np.uint8)  # every lane written below
        _ivf_k.quantize_table_kernel(
            table, n_q, np.float32(lo), np.float32(1.0 / scale), keep_arr, use_keep, t8
        )
        out = np.empty(cand.size, np.float32)
        with _numba_threads(self._work(cache, cand, n_q)):
            _codes_k.code_u8_scores_kernel(
                t8.reshape(-1), w, float(scale), float(n_q * lo), cache["codes"], cache["off"],
                cand, True, out,
            )  # fmt: skip
        return out

    @staticmethod
    def _work(cache, cand, n_q: int, dim: int = 1) -> float:
        """Rough operation count of scoring ``cand`` (decides serial vs parallel)."""
        return float(cand.size) * cache["mean_len"] * n_q * dim

    def _interaction_f32(self, cache, table, cand) -> np.ndarray:
        """Full centroid interaction of candidates with the float32 table (lane-padded
        with zero columns, as :meth:`_score_table` makes it; other widths are padded)."""
        from retrieval_prune.kernels.ops import _pad_lanes

        tp = _pad_lanes(np.ascontiguousarray(table, dtype=np.float32), _LANES_F32)
        out = np.empty(cand.size, np.float32)
        with _numba_threads(self._work(cache, cand, table.shape[1])):
            _codes_k.code_f32_scores_kernel(
                tp.reshape(-1), tp.shape[1], cache["codes"], cache["off"], cand, True, out
            )
        return out

    def _rerank(self, cache, table, q, cand, qp=None) -> np.ndarray:
        """Final scores of ``cand``: exact MaxSim on decompressed residuals, or the float
        code table when the storage keeps centroid ids only. ``qp``: ``q`` packed, if at hand."""
        from retrieval_prune.kernels.ops import _pack, _pad_lanes

        out = np.empty(cand.size, np.float32)
        if cand.size == 0:
            return out
        codec = self.storage_codec
        if codec.score_kind == "residual":
            if qp is None:
                qp = _pack(q, np.array([0, q.shape[0]], np.int64))[0]
            nv = qp.size // (q.shape[1] * _LANES_F32)
            with _numba_threads(self._work(cache, cand, q.shape[0], q.shape[1])):
                _codes_k.residual_rerank_kernel(
                    qp, nv, int(q.shape[0]), cache["codes"], cache["packed"],
                    cache["codebook"], cache["codebook_scale"], cache["codebook_scale"].size > 0,
                    q.shape[1], cache["lut"], cache["per"], bool(codec.normalize),
                    cache["off"], cand, cache["max_len"], out,
                )  # fmt: skip
        else:
            # the stage-1 table is exact unless it came from the int8 codebook (query
            # quantised too): final scores then take the float table, as brute force does
            exact = cache["codebook_scale"].size == 0
            t = table if codec.score == "table" and exact else codec.query_table(q)
            tp = _pad_lanes(np.ascontiguousarray(t, dtype=np.float32), _LANES_F32)
            with _numba_threads(self._work(cache, cand, q.shape[0])):
                _codes_k.code_f32_scores_kernel(
                    tp.reshape(-1), tp.shape[1], cache["codes"], cache["off"], cand, True, out
                )
        return out

    def search_bruteforce(self, queries: MultiVectors, k: int = 10):
        """Every live document scored exactly from its codes (no candidate stages): the
        reference the staged search is measured against."""
        return self._checked_search(queries, k, lambda q, kk: CompressedIndex._search(self, q, kk))

    # -- persistence --------------------------------------------------------------------
    def _native_files(self, folder: Path) -> dict[str, Path]:
        """Subclass hook: write native files (hnswlib graphs) into ``folder``."""
        return {}

    def save(self, path: str | Path) -> Path:
        """Write the index as a new crash-safe generation (native files checksummed too)."""
        scratch = storage.scratch_dir(path)
        try:
            files = self._native_files(scratch)
            arrays, meta = self._payload()
            return self._commit_to(path, lambda: storage.write_generation(path, arrays, meta, files=files))
        finally:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)

    def _payload(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        import json

        arrays = dict(self._state_arrays())
        blob, offs = encode_strings(self.doc_ids)
        arrays.update({"doc_ids_blob": blob, "doc_ids_offsets": offs, "alive": np.asarray(self.alive)})
        if self.texts is not None:
            tb, to = encode_strings(self.texts)
            arrays.update({"texts_blob": tb, "texts_offsets": to})
        meta = self._meta()
        json.dumps(meta)
        return arrays, meta


#: operations (candidate tokens x query tokens x dims) below which a stage runs on one
#: thread: a thread team's start-up (and, on a shared machine, waiting for the second
#: core) costs more than it saves on small work
PARALLEL_MIN_WORK = 5e7

_CONTROLLER: list[Any] = []


class _numba_threads:
    """Run the enclosed Numba kernels on one thread when ``work`` is small."""

    def __init__(self, work: float) -> None:
        self.serial = work < PARALLEL_MIN_WORK

    def __enter__(self):
        if self.serial:
            import numba

            self.before = numba.get_num_threads()
            numba.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.serial:
            import numba

            numba.set_num_threads(self.before)


def _blas_single_thread():
    """Context limiting BLAS to one thread (threadpoolctl; ~20 us to enter and leave)."""
    if not _CONTROLLER:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1, user_api="blas")


def _select_idx(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` best ``scores`` (ties: lower index), in increasing order."""
    if scores.size <= n:
        return np.arange(scores.size)
    part = np.argpartition(-scores, n - 1)[:n]
    v = scores[part].min()
    gt = np.flatnonzero(scores > v)
    eq = np.flatnonzero(scores == v)[: n - gt.size]
    return np.sort(np.concatenate([gt, eq]))


def final_order(final: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of reranked ``cand`` (ties: lower position), dropping scores that are
    not finite or are the kernels' "no score" sentinel."""
    order = np.lexsort((cand, -final))[:k]
    out_s, out_i = final[order], cand[order]
    ok = np.isfinite(out_s) & (out_s > -3.0e38)
    return out_s[ok], out_i[ok]


# -- bounded-memory build ----------------------------------------------------------------------
def build_streaming(
    index: CompressedIndex,
    path: str | Path,
    batches: Iterable[tuple],
    *,
    encoder_settings: dict[str, Any] | None = None,
    progress: Any = None,
) -> Path:
    """Encode and write documents batch by batch into a new generation of ``path``.

    ``index`` must be fitted (``index.fit(sample)``) and empty; each batch's codes, offsets
    and ids go straight to ``.npy`` files (:class:`~retrieval_prune.index.storage.NpyAppender`),
    so memory is bounded by one batch whatever the corpus size. The generation is committed
    like any other (checksums, fsync, atomic pointer swap); a crash leaves the previous one.

    Returns the new generation folder. Batches are ``(MultiVectors, ids)`` or
    ``(MultiVectors, ids, texts)`` (texts stored like an in-memory build's), already through
    the pipeline's token steps.
    """
    if not index.chain.is_fitted:
        raise ValueError("fit the index on a sample first: index.fit(sample_docs)")
    if index.n_positions:
        raise ValueError("build_streaming writes a fresh index; this one already holds documents")
    scratch = storage.scratch_dir(path)
    try:
        layout = index.storage_codec.part_layout()
        apps = {
            name: storage.NpyAppender(scratch / f"codes.{name}.npy", dtype, tail)
            for name, dtype, tail in layout
        }
        offs = storage.NpyAppender(scratch / "offsets.npy", np.int64)
        blob = storage.NpyAppender(scratch / "doc_ids_blob.npy", np.uint8)
        blob_off = storage.NpyAppender(scratch / "doc_ids_offsets.npy", np.int64)
        alive = storage.NpyAppender(scratch / "alive.npy", np.uint8)
        tblob = tblob_off = None  # created with the first batch that brings texts
        offs.append(np.zeros(1, np.int64))
        blob_off.append(np.zeros(1, np.int64))
        with_texts: bool | None = None
        n_text_bytes = 0
        seen: set[str] = set()
        n_tok = n_docs = n_bytes = 0
        t0 = time.perf_counter()
        dim = index.chain.dim_in
        for batch in batches:
            docs, ids = batch[0], batch[1]
            texts = batch[2] if len(batch) > 2 else None
            if with_texts is None:
                with_texts = texts is not None
                if with_texts:
                    tblob = storage.NpyAppender(scratch / "texts_blob.npy", np.uint8)
                    tblob_off = storage.NpyAppender(scratch / "texts_offsets.npy", np.int64)
                    tblob_off.append(np.zeros(1, np.int64))
            elif with_texts != (texts is not None):
                raise ValueError("give texts with every batch or with none")
            ids = [str(i) for i in ids]
            if texts is not None:
                if len(texts) != len(ids):
                    raise ValueError(f"{len(texts)} texts for {len(ids)} ids in a batch")
                tb, tbo = encode_strings(list(texts))
                tblob.append(tb)
                tblob_off.append(tbo[1:] + n_text_bytes)
                n_text_bytes += int(tb.size)
            if len(ids) != len(docs):
                raise ValueError(f"{len(ids)} ids for {len(docs)} documents in a batch")
            if docs.dim != dim:
                raise ValueError(
                    f"documents have dim={docs.dim} but the index was fitted on dim={dim}"
                )
            docs.validate_finite("documents")
            for i in ids:
                if i in seen:
                    raise ValueError(f"duplicate id {i!r}; ids must be unique")
                seen.add(i)
            if docs.n_tokens:
                parts = index.chain.encode_parts(docs.embeddings)
                for name, arr in parts.items():
                    apps[name].append(arr)
            offs.append(docs.offsets[1:] + n_tok)
            b, bo = encode_strings(ids)
            blob.append(b)
            blob_off.append(bo[1:] + n_bytes)
            alive.append(np.ones(len(ids), np.uint8))
            n_tok += docs.n_tokens
            n_docs += len(ids)
            n_bytes += int(b.size)
            if progress is not None:
                progress(n_docs, n_tok)
        if n_docs == 0:
            raise ValueError("the corpus is empty; an index needs at least one document")
        parts = [*apps.values(), offs, blob, blob_off, alive] + ([tblob, tblob_off] if with_texts else [])
        npy = {p.path.name[: -len(".npy")]: p.close() for p in parts}
        info = index.info.setdefault("codec", {})
        info["encode_seconds"] = round(time.perf_counter() - t0, 3)
        info["streamed"] = True
        index.dim = dim if index.dim is None else index.dim
        index.encoder_settings = encoder_settings or index.encoder_settings
        meta = index._meta()
        meta["n_positions"] = n_docs
        meta["n_docs"] = n_docs
        native = getattr(index, "_native_files", None)
        files = native(scratch) if native is not None else {}
        return storage.write_generation(
            path, index.chain.state_arrays(), meta, files=files, npy_files=npy
        )
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
