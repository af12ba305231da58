"""ToMe-style greedy token merging."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from retrieval_prune.kernels import tokens as K
from retrieval_prune.preprocess.base import TokenPreprocessor, frac_count
from retrieval_prune.registry import Param, register
from retrieval_prune.types import MultiVectors

__all__ = ["Merge"]


@register
class Merge(TokenPreprocessor):
    """Merge the most similar token pairs of each document, greedily (ToMe-style).

    Repeatedly take the pair of current vectors with the highest cosine similarity and
    replace it by the size-weighted mean of the two (the mean of all original members),
    until the document has ``max(ceil(keep * m), 1)`` unprotected vectors or, when
    ``threshold`` is set, no pair has cosine ``>= threshold`` — whichever comes first.
    Merged vectors are re-normalised when ``normalize``; weights of a merged vector are
    the sum of its members'. Output order: protected tokens, then merged groups by their
    first member. Queries are returned unchanged.

    Unlike ToMe's bipartite matching (built for batched GPU transformers), this is the
    exact greedy agglomeration on cosine similarity of group means (average-vector
    linkage), which is cheap at document lengths.

    Parameters
    ----------
    keep : float in [0, 1], default 0.5
        Budget: vectors kept per document (ceil, at least 1). 1.0 is the identity;
        ``keep=0`` with a ``threshold`` merges by threshold alone.
    threshold : float in [-1, 1], optional
        Never merge a pair less similar than this.
    normalize : bool, default True
    protect : int, default 1
    """

    name = "merge"
    params: ClassVar[dict[str, Param]] = {
        "keep": Param(
            0.5, float, "fraction of unprotected vectors kept (ceil, >= 1)", low=0.0, high=1.0
        ),
        "threshold": Param(
            None, float, "stop when no pair has cosine >= threshold", low=-1.0, high=1.0
        ),
        "normalize": Param(True, bool, "re-normalise merged vectors"),
        "protect": Param(1, int, "leading tokens never merged", low=0),
    }
    identity_params: ClassVar[dict[str, Any]] = {"keep": 1.0}

    def _targets(self, m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, dtype=np.int64)
        return np.where(m > 0, np.maximum(frac_count(self.keep, m), 1), 0)

    def length_bounds(
        self, lengths: np.ndarray, kind: str = "documents"
    ) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.asarray(lengths, dtype=np.int64)
        if kind not in self.applies_to:
            return lengths, lengths
        p = np.minimum(lengths, self.protect)
        low = p + self._targets(lengths - p)
        return low, (low if self.threshold is None else lengths)

    def _transform(self, docs: MultiVectors, kind: str) -> MultiVectors:
        protect = self._protect_array(docs)
        target = self._targets(docs.lengths - protect)
        thr = -2.0 if self.threshold is None else float(self.threshold)
        raw = np.empty(docs.n_tokens, np.int64)
        K.merge_labels(
            np.ascontiguousarray(docs.embeddings), docs.offsets, protect, target, thr, raw
        )
        return self._from_labels(docs, raw, normalize=self.normalize)
