"""Flat index: uncompressed float32 token vectors, exact MaxSim by brute force."""

from __future__ import annotations

from typing import Any

import numpy as np

from retrieval_prune.index.base import MultiVectorIndex
from retrieval_prune.registry import register
from retrieval_prune.types import MultiVectors

__all__ = ["FlatIndex"]


@register
class FlatIndex(MultiVectorIndex):
    """Exact MaxSim over uncompressed vectors — the reference every pipeline is measured against.

    Examples
    --------
    >>> import numpy as np
    >>> from retrieval_prune import MultiVectors
    >>> rng = np.random.default_rng(0)
    >>> docs = MultiVectors.from_list([rng.standard_normal((5, 8)).astype(np.float32) for _ in range(3)])
    >>> index = FlatIndex()
    >>> index.add(docs, ["a", "b", "c"])
    >>> res = index.search(docs[0:1], k=2)
    >>> res.external(0)[0][0]
    'a'
    """

    name = "flat"
    index_type = "flat"
    params: dict = {}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._emb = np.zeros((0, 0), np.float32)
        self._offsets = np.zeros(1, np.int64)

    @property
    def vectors(self) -> MultiVectors:
        return MultiVectors(np.asarray(self._emb), np.asarray(self._offsets))

    @property
    def n_vectors(self) -> int:
        return int(self._offsets[-1])

    def _add_vectors(self, docs: MultiVectors) -> None:
        if self._emb.shape[0] == 0:
            self._emb = np.ascontiguousarray(docs.embeddings)
            self._offsets = docs.offsets.copy()
            return
        self._emb = np.concatenate([self._emb, docs.embeddings], axis=0)
        self._offsets = np.concatenate([self._offsets, docs.offsets[1:] + self._offsets[-1]])

    def _search(self, queries: MultiVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        from retrieval_prune.kernels.ops import maxsim_search

        return maxsim_search(
            queries.embeddings, queries.offsets, self._emb, self._offsets, k, alive=self.alive
        )

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"embeddings": self._emb, "offsets": self._offsets}

    def _load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self._emb, self._offsets = arrays["embeddings"], np.asarray(arrays["offsets"])
        MultiVectors(self._emb, self._offsets).validate_finite("embeddings.npy")  # shapes, offsets
        if self._offsets.shape[0] - 1 != len(self.doc_ids):
            raise ValueError("offsets and ids disagree in length")
        if self.dim is not None and self._emb.shape[1] != self.dim:
            raise ValueError(f"embeddings.npy has dim {self._emb.shape[1]}, manifest says {self.dim}")

    def _compact_vectors(self, keep: np.ndarray) -> None:
        kept = self.vectors[keep]
        self._emb, self._offsets = kept.embeddings, kept.offsets
