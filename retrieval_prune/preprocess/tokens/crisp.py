"""Post-hoc CRISP: per-sequence k-means of token vectors (Veneroso et al. 2025)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from retrieval_prune.kernels import tokens as K
from retrieval_prune.preprocess.base import TokenPreprocessor, frac_count
from retrieval_prune.registry import Param, register
from retrieval_prune.types import MultiVectors

__all__ = ["Crisp"]

#: the paper's C8x32 setting, used when neither q/d nor rel is given
DEFAULT_Q, DEFAULT_D = 8, 32


@register
class Crisp(TokenPreprocessor):
    """Replace each sequence's tokens by the centroids of a k-means over them.

    Applies to documents **and** queries (the same clustering runs at index and query
    time). This is the untrained (post-hoc) form; training with CRISP in the loop is a
    separate step.

    Per sequence, the ``m`` unprotected tokens are clustered into ``k`` clusters:
    fixed ``k`` (``d`` for documents, ``q`` for queries; the paper's C4x8 is
    ``crisp:q=4,d=8``) or relative ``k = ceil(rel * m)``. A sequence with ``m <= k``
    keeps all its tokens unchanged. Init: k-means++ (D^2 sampling) from a splitmix64
    stream seeded by ``seed`` and the sequence length only, so a sequence gets the same
    clusters wherever it sits in a batch. Then up to ``iters`` Lloyd steps (stopping
    early when assignments settle). Each output vector is the mean of its cluster's
    members (re-normalised when ``normalize``); clusters left empty are dropped, never
    zero-padded, so ``k`` is an upper bound (reached whenever the sequence has at least
    ``k`` distinct vectors, in practice). Weights of a centroid are the sum of its members'.

    Parameters
    ----------
    q, d : int >= 1
        Clusters per query / per document (default 8 and 32 when ``rel`` is not given).
    rel : float in (0, 1], optional
        Relative k for both sides; exclusive with ``q``/``d``. ``rel=1.0`` is the identity.
    iters : int >= 1, default 10
    seed : int >= 0, default 0
    normalize : bool, default True
    protect : int, default 0
        Leading tokens kept out of the clustering (the paper clusters all tokens).
    """

    name = "crisp"
    applies_to: ClassVar[tuple[str, ...]] = ("documents", "queries")
    params: ClassVar[dict[str, Param]] = {
        "q": Param(None, int, "clusters per query (fixed k)", low=1),
        "d": Param(None, int, "clusters per document (fixed k)", low=1),
        "rel": Param(
            None, float, "relative k = ceil(rel * tokens), both sides", low=1e-9, high=1.0
        ),
        "iters": Param(10, int, "Lloyd iterations", low=1),
        "seed": Param(0, int, "k-means++ seed", low=0),
        "normalize": Param(True, bool, "re-normalise centroids"),
        "protect": Param(0, int, "leading tokens kept out of the clustering", low=0),
    }
    identity_params: ClassVar[dict[str, Any]] = {"rel": 1.0}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.rel is not None:
            if self.q is not None or self.d is not None:
                raise ValueError(
                    f"crisp: give either rel= (relative k) or q=/d= (fixed k), not both; "
                    f"got q={self.q}, d={self.d}, rel={self.rel}"
                )
        else:
            self.q = DEFAULT_Q if self.q is None else self.q
            self.d = DEFAULT_D if self.d is None else self.d

    def _k(self, m: np.ndarray, kind: str) -> np.ndarray:
        m = np.asarray(m, dtype=np.int64)
        if self.rel is not None:
            return np.maximum(frac_count(self.rel, m), 1)
        return np.full(m.shape, self.q if kind == "queries" else self.d, np.int64)

    def length_bounds(
        self, lengths: np.ndarray, kind: str = "documents"
    ) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.asarray(lengths, dtype=np.int64)
        p = np.minimum(lengths, self.protect)
        m = lengths - p
        return p + np.minimum(m, 1), p + np.minimum(m, self._k(m, kind))

    def _transform(self, docs: MultiVectors, kind: str) -> MultiVectors:
        protect = self._protect_array(docs)
        k = self._k(docs.lengths - protect, kind)
        raw = np.empty(docs.n_tokens, np.int64)
        K.kmeans_labels(
            np.ascontiguousarray(docs.embeddings),
            docs.offsets,
            protect,
            k,
            int(self.iters),
            int(self.seed),
            raw,
        )
        return self._from_labels(docs, raw, normalize=self.normalize)
