"""Token pooling by hierarchical Ward clustering (Clavié et al. 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from retrieval_prune.kernels import tokens as K
from retrieval_prune.preprocess.base import TokenPreprocessor
from retrieval_prune.registry import Param, register
from retrieval_prune.types import MultiVectors

__all__ = ["Pool"]


def pooled_clusters(m: np.ndarray, factor: int) -> np.ndarray:
    """Clusters for ``m`` unprotected tokens: ``ceil(m / factor)`` (0 for m == 0)."""
    return -(-np.asarray(m, dtype=np.int64) // int(factor))


@register
class Pool(TokenPreprocessor):
    """Pool each document's tokens: Ward clustering on cosine distance, mean per cluster.

    Per document, the ``m`` unprotected tokens are L2-normalised and clustered with Ward
    linkage (squared Euclidean between unit vectors = 2 x cosine distance) into
    ``ceil(m / factor)`` clusters, cut from the full dendrogram (an exact budget, also
    when merge heights tie). Each cluster becomes the mean of its member vectors,
    re-normalised when ``normalize``; a one-member cluster is its token unchanged. Output
    order: protected tokens, then clusters by their first member. Weights of a cluster
    are the sum of its members'. Queries are returned unchanged.

    The clustering is a Numba nearest-neighbour-chain Ward (same partitions as
    ``scipy.cluster.hierarchy.linkage(unit_vectors, "ward")`` cut with ``fcluster``).

    Parameters
    ----------
    factor : int >= 1, default 2
        Pool factor; 1 is the identity.
    normalize : bool, default True
        Re-normalise pooled vectors to unit length.
    protect : int, default 1
        Leading tokens kept out of the clustering ([CLS]).

    Examples
    --------
    >>> import numpy as np
    >>> from retrieval_prune import registry
    >>> from retrieval_prune.types import MultiVectors
    >>> x = np.array([[1, 0], [0, 1], [0.1, 1], [1, 0.1], [1, 0.05]], np.float32)
    >>> out = registry.build("pool:factor=2").transform(MultiVectors(x, np.array([0, 5])))
    >>> out.n_tokens   # [CLS] + ceil(4 / 2) clusters
    3
    """

    name = "pool"
    params: ClassVar[dict[str, Param]] = {
        "factor": Param(2, int, "pool factor: ceil(m / factor) clusters", low=1),
        "normalize": Param(True, bool, "re-normalise pooled vectors"),
        "protect": Param(1, int, "leading tokens kept out of pooling", low=0),
    }
    identity_params: ClassVar[dict[str, Any]] = {"factor": 1}

    def length_bounds(
        self, lengths: np.ndarray, kind: str = "documents"
    ) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.asarray(lengths, dtype=np.int64)
        if kind not in self.applies_to:
            return lengths, lengths
        p = np.minimum(lengths, self.protect)
        exact = p + pooled_clusters(lengths - p, self.factor)
        return exact, exact

    def _transform(self, docs: MultiVectors, kind: str) -> MultiVectors:
        protect = self._protect_array(docs)
        n_clusters = pooled_clusters(docs.lengths - protect, self.factor)
        raw = np.empty(docs.n_tokens, np.int64)
        K.ward_labels(np.ascontiguousarray(docs.embeddings), docs.offsets, protect, n_clusters, raw)
        return self._from_labels(docs, raw, normalize=self.normalize)
