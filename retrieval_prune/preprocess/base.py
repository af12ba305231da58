"""Preprocessor protocols, one per pipeline stage that acts before the codec.

Token preprocessors (stage ``"tokens"``) are the ones built so far::

    step = registry.build("pool:factor=2")
    step.fit(docs)                                   # no-op for the built-in plug-ins
    docs2 = step.transform(docs, kind="documents")   # MultiVectors -> MultiVectors
    queries2 = step.transform(queries, kind="queries")

Contract every token preprocessor keeps (checked for every registered plug-in by
``tests/test_plugin_contract.py``):

- the number of documents and their order are unchanged; an empty document stays empty;
- a non-empty document never becomes empty: if the plug-in's rule would drop every
  vector, the document keeps one (the highest-weight one, else its first) and
  ``transform`` emits one ``RuntimeWarning`` per call with the count;
- output lengths stay within :meth:`TokenPreprocessor.length_bounds`;
- ``weights`` (importance) follow the vectors: a kept token keeps its weight, a merged
  vector carries the **sum** of its members' weights (the importance mass it stands for);
- the first ``protect`` tokens of each document (``[CLS]`` and the marker token) pass
  through untouched, in front of the document's other output vectors;
- the same spec, the same input: the same output, bit for bit (no global RNG).

Stages ``data``, ``model`` and ``table`` get their protocol classes here so that later
plug-ins (dedup / coreset, weight pruning, vocabulary or codebook trimming) slot in.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np

from retrieval_prune.kernels import tokens as K
from retrieval_prune.registry import Component
from retrieval_prune.types import MultiVectors

__all__ = [
    "TokenPreprocessor",
    "DataPreprocessor",
    "ModelPreprocessor",
    "TablePreprocessor",
    "KINDS",
    "PREPROCESS_STAGES",
    "frac_count",
]

#: what a token preprocessor may be applied to
KINDS = ("documents", "queries")
#: the stages whose plug-ins live in ``retrieval_prune.preprocess``
PREPROCESS_STAGES = ("data", "model", "tokens", "table")


def frac_count(frac: float, n: np.ndarray | int) -> np.ndarray:
    """``ceil(frac * n)`` per entry, robust to float noise (``ceil(0.6 * 5) == 3``).

    Returns int64 with the shape of ``n``.
    """
    n = np.asarray(n, dtype=np.int64)
    return np.ceil(np.round(frac * n, 9)).astype(np.int64)


class TokenPreprocessor(Component):
    """Base of every token-stage plug-in: ``MultiVectors -> MultiVectors``.

    Subclasses set ``name``, ``params`` and implement :meth:`_transform` (called with
    validated, non-empty input and only for the kinds in ``applies_to``), and usually
    :meth:`length_bounds`. The class attributes below are read by the pipeline and by the
    shared test suite.
    """

    stage: ClassVar[str] = "tokens"
    #: True when the plug-in reads ``docs.weights`` (the encoder's [CLS] attention)
    needs_importance: ClassVar[bool] = False
    #: True when no information is lost (the pipeline's report says so)
    lossless: ClassVar[bool] = False
    #: which kinds the plug-in changes; it returns the other kinds unchanged
    applies_to: ClassVar[tuple[str, ...]] = ("documents",)
    #: parameters under which the plug-in is the identity (for the shared test suite)
    identity_params: ClassVar[dict[str, Any] | None] = None

    def fit(self, docs: MultiVectors) -> TokenPreprocessor:
        """Learn state from the documents (nothing for the built-in plug-ins); returns self."""
        return self

    def transform(self, docs: MultiVectors, kind: str = "documents") -> MultiVectors:
        """Apply the plug-in to ``docs`` (``kind`` is ``"documents"`` or ``"queries"``).

        Parameters
        ----------
        docs : MultiVectors
            float32 ``(n_tokens, dim)`` vectors, int64 ``(n_docs + 1,)`` offsets, optional
            float32 ``(n_tokens,)`` weights. Must be finite.
        kind : {"documents", "queries"}

        Returns
        -------
        MultiVectors
            Same number of documents; weights carried along when the input has them.
        """
        if not isinstance(docs, MultiVectors):
            raise TypeError(
                f"{self.name}: transform takes a MultiVectors, got {type(docs).__name__}; "
                "wrap arrays with MultiVectors(embeddings, offsets) or MultiVectors.from_list"
            )
        if kind not in KINDS:
            raise ValueError(f"{self.name}: kind={kind!r} must be one of {list(KINDS)}")
        if kind not in self.applies_to or docs.n_tokens == 0:
            return docs
        if self.needs_importance and docs.weights is None:
            raise ValueError(
                f"{self.spec}: the {kind} carry no importance weights; build with importance: "
                "the encoder must return attention (encode with return_importance=True / "
                "with_importance=True, which the pipeline asks for when a step needs it)"
            )
        docs.validate_finite(kind)
        if docs.weights is not None and not np.isfinite(docs.weights).all():
            raise ValueError(f"{self.name}: the {kind}' weights contain NaN or Inf")
        return self._transform(docs, kind)

    def _transform(self, docs: MultiVectors, kind: str) -> MultiVectors:
        raise NotImplementedError

    def length_bounds(
        self, lengths: np.ndarray, kind: str = "documents"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Smallest and largest output length per document (int64 ``(n_docs,)`` each).

        Equal bounds mean the plug-in meets an exact budget. The default says only "never
        grows, never empties a non-empty document".
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        if kind not in self.applies_to:
            return lengths, lengths
        return np.minimum(lengths, 1), lengths

    # -- helpers for subclasses ---------------------------------------------------------
    def _protect_array(self, docs: MultiVectors) -> np.ndarray:
        """Protected tokens per document: ``min(protect, length)``."""
        p = int(getattr(self, "protect", 0) or 0)
        return np.minimum(docs.lengths, p).astype(np.int64)

    def _from_labels(self, docs: MultiVectors, raw: np.ndarray, normalize: bool) -> MultiVectors:
        """Build the output from raw per-token labels (see :mod:`retrieval_prune.kernels.tokens`).

        Rescues documents whose labels drop every token (keeps the highest-weight token,
        else the first) and warns once with the count.
        """
        offsets = docs.offsets
        local = np.empty_like(raw)
        counts = np.empty(len(docs), np.int64)
        K.relabel_first_appearance(raw, offsets, local, counts)
        emptied = np.flatnonzero((counts == 0) & (docs.lengths > 0))
        if emptied.size:
            for i in emptied:
                s, e = int(offsets[i]), int(offsets[i + 1])
                keep = s if docs.weights is None else s + int(np.argmax(docs.weights[s:e]))
                local[keep] = 0
            counts[emptied] = 1
            warnings.warn(
                f"{self.spec}: {emptied.size} of {int((docs.lengths > 0).sum())} non-empty "
                f"documents would have lost every vector; each keeps its "
                f"{'highest-weight' if docs.weights is not None else 'first'} vector",
                RuntimeWarning,
                stacklevel=3,
            )
        out_offsets = np.zeros(len(docs) + 1, np.int64)
        np.cumsum(counts, out=out_offsets[1:])
        n_out = int(out_offsets[-1])
        out_emb = np.zeros((n_out, docs.dim), np.float32)
        has_w = docs.weights is not None
        w_in = docs.weights if has_w else np.zeros(0, np.float32)
        out_w = np.zeros(n_out if has_w else 0, np.float32)
        emb = np.ascontiguousarray(docs.embeddings)
        K.aggregate_labels(
            emb, w_in, has_w, local, offsets, out_offsets, bool(normalize), out_emb, out_w
        )
        return MultiVectors(out_emb, out_offsets, out_w if has_w else None)


class DataPreprocessor(Component):
    """Stage ``"data"``: chooses documents or training pairs (dedup, coreset selection).

    Protocol (for the plug-ins of a later issue): ``fit(corpus) -> self`` and
    ``transform(corpus) -> corpus`` plus a mapping from removed to kept ids. Index-side
    data pruning must be lossless: a retrievable document is never silently dropped
    (duplicates become aliases of the one kept).
    """

    stage: ClassVar[str] = "data"
    lossless: ClassVar[bool] = False


class ModelPreprocessor(Component):
    """Stage ``"model"``: acts on encoder weights (magnitude pruning, DARE on deltas).

    Protocol (later issue): ``transform(state_dict) -> state_dict`` on a safetensors
    state, reporting the kept fraction of parameters per layer.
    """

    stage: ClassVar[str] = "model"
    lossless: ClassVar[bool] = False


class TablePreprocessor(Component):
    """Stage ``"table"``: trims lookup tables (input vocabulary, codebook rows).

    Protocol (later issue): ``fit(usage) -> self``, ``transform(table) -> (table, remap)``
    where ``remap`` maps old row ids to new ones.
    """

    stage: ClassVar[str] = "table"
    lossless: ClassVar[bool] = False
