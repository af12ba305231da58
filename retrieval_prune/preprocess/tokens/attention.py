"""Attention-guided token pruning (HPC-ColPali's idea, DocPruner's adaptive threshold)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from retrieval_prune.kernels import tokens as K
from retrieval_prune.preprocess.base import TokenPreprocessor, frac_count
from retrieval_prune.registry import Param, register
from retrieval_prune.types import MultiVectors

__all__ = ["AttentionPrune"]


@register
class AttentionPrune(TokenPreprocessor):
    """Drop the document tokens the encoder's [CLS] attends to least.

    Importance is ``docs.weights``: last-layer attention from [CLS] to each token,
    averaged over heads (build the index with importance; the pipeline asks the encoder
    for it because ``needs_importance`` is True). Queries are returned unchanged.

    Parameters
    ----------
    keep : float in [0, 1], default 0.6
        ``mode="top"``: each document keeps its ``ceil(keep * m)`` most important
        unprotected tokens (``m`` = unprotected tokens; ties go to the earlier token) —
        an exact budget. ``keep=1.0`` is the identity.
    mode : {"top", "adaptive"}
        ``"adaptive"``: keep the unprotected tokens whose importance is
        ``>= mean + std * sd`` of that document's unprotected importances (DocPruner);
        ``keep`` is then unused. A document with constant importances keeps everything.
    std : float, default 0.0
        The ``k`` of the adaptive threshold ``mean + k * sd`` (may be negative).
    protect : int, default 1
        Leading tokens always kept ([CLS] at position 0).

    Kept tokens stay in their original order with their weights. If a rule would leave a
    document with nothing (``keep=0``, ``protect=0``), it keeps its most important token and
    a ``RuntimeWarning`` gives the count.

    Examples
    --------
    >>> import numpy as np
    >>> from retrieval_prune import registry
    >>> from retrieval_prune.types import MultiVectors
    >>> x = np.eye(5, dtype=np.float32)
    >>> w = np.array([9, 1, 5, 3, 4], np.float32)
    >>> docs = MultiVectors(x, np.array([0, 5]), w)
    >>> out = registry.build("attn_prune:keep=0.5").transform(docs)
    >>> out.weights.tolist()   # [CLS] protected, then the top ceil(0.5 * 4) = 2 of the rest
    [9.0, 5.0, 4.0]
    """

    name = "attn_prune"
    needs_importance: ClassVar[bool] = True
    params: ClassVar[dict[str, Param]] = {
        "keep": Param(0.6, float, "fraction of unprotected tokens kept (ceil)", low=0.0, high=1.0),
        "mode": Param(
            "top",
            str,
            "top: fixed fraction; adaptive: mean + std*sd threshold",
            choices=("top", "adaptive"),
        ),
        "std": Param(0.0, float, "k of the adaptive threshold mean + k*sd"),
        "protect": Param(1, int, "leading tokens always kept", low=0),
    }
    identity_params: ClassVar[dict[str, Any]] = {"keep": 1.0, "mode": "top"}

    def length_bounds(
        self, lengths: np.ndarray, kind: str = "documents"
    ) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.asarray(lengths, dtype=np.int64)
        if kind not in self.applies_to:
            return lengths, lengths
        p = np.minimum(lengths, self.protect)
        floor = np.maximum(p, np.minimum(lengths, 1))
        if self.mode == "adaptive":
            return floor, lengths
        exact = np.maximum(p + frac_count(self.keep, lengths - p), floor)
        return exact, exact

    def _transform(self, docs: MultiVectors, kind: str) -> MultiVectors:
        protect = self._protect_array(docs)
        raw = np.empty(docs.n_tokens, np.int64)
        w = np.ascontiguousarray(docs.weights)
        if self.mode == "adaptive":
            K.adaptive_labels(w, docs.offsets, protect, float(self.std), raw)
        else:
            budget = frac_count(self.keep, docs.lengths - protect)
            K.topk_labels(w, docs.offsets, protect, budget, raw)
        return self._from_labels(docs, raw, normalize=False)
