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

Stages ``data`` (training-pair selection: ``select(PairSet...) -> Selection``), ``model``
(encoder weights: ``apply(model, ModelContext) -> ModelResult``) and ``table`` (vocabulary:
``apply(model, texts, spec) -> TableResult``) have their protocol classes here; every step of
those stages reports a :class:`StepReport`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
    "StepReport",
    "PairSet",
    "Selection",
    "ModelContext",
    "ModelResult",
    "TableResult",
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


@dataclass
class StepReport:
    """What one data / model / table step did (JSON-able through :meth:`to_dict`).

    ``kept_fraction``: data: pairs kept; model: non-zero share of the parameters a step acts
    on; table: embedding rows kept. ``bytes_before``/``bytes_after``: what the step's subject
    takes on disk (training-pair count for data steps is in ``details``).
    """

    step: str
    stage: str
    kept_fraction: float
    bytes_before: int
    bytes_after: int
    seconds: float
    lossless: bool
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairSet:
    """One collection's training queries as a data step sees them.

    name : collection name.
    query_ids : one per training query (a query stands for its (query, positive) pairs).
    embeddings : float32 ``(n, d)`` unit vectors of the pairs (zero-shot encoder), or None.
    scores : float64 ``(n,)`` per-query difficulty from a full-data run (EL2N), or None.
    """

    name: str
    query_ids: list[str]
    embeddings: np.ndarray | None = None
    scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.query_ids)


@dataclass
class Selection:
    """Output of a data step: kept query ids per collection (input order), the removed
    near-duplicates as ``removed id -> kept id`` per collection, and the step report."""

    kept: dict[str, list[str]]
    aliases: dict[str, dict[str, str]]
    report: StepReport

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "aliases": self.aliases, "report": self.report.to_dict()}


class DataPreprocessor(Component):
    """Stage ``"data"``: chooses training pairs (dedup, coreset selection).

    Data steps select training queries; they never remove a retrievable document.
    ``select`` validates the input, calls :meth:`_select` once per collection with a
    seeded generator, checks the plug-in's answer (sorted unique positions, never empty) and
    writes the report. Plug-ins with a ``keep`` parameter keep exactly ``round(keep * n)``
    queries of every collection (at least one).
    """

    stage: ClassVar[str] = "data"
    lossless: ClassVar[bool] = False
    #: the plug-in reads ``PairSet.embeddings`` / ``PairSet.scores``
    needs_embeddings: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    identity_params: ClassVar[dict[str, Any] | None] = None

    @classmethod
    def _check_params(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        # ``keep`` is a fraction in (0, 1]; the registry's bounds are inclusive, so 0 is
        # refused here, once for every data plug-in that declares it
        values = super()._check_params(kwargs)
        keep = values.get("keep")
        if keep is not None and not 0.0 < float(keep) <= 1.0:
            raise ValueError(
                f"{cls.name}: keep={keep} must be in (0, 1] (the fraction of training queries kept)"
            )
        return values

    def budget(self, n: int) -> int:
        """Queries kept out of ``n`` under the ``keep`` parameter (exact, at least one)."""
        keep = getattr(self, "keep", None)
        if keep is None:
            return n
        return max(1, min(n, int(round(float(keep) * n))))

    def select(self, sets: Sequence[PairSet]) -> Selection:
        import time

        t0 = time.perf_counter()
        if not sets:
            raise ValueError(f"{self.spec}: no training collections given")
        kept: dict[str, list[str]] = {}
        aliases: dict[str, dict[str, str]] = {}
        details: dict[str, Any] = {}
        n_in = n_out = 0
        for i, ps in enumerate(sets):
            if not isinstance(ps, PairSet):
                raise TypeError(f"{self.name}: select takes PairSet items, got {type(ps).__name__}")
            n = len(ps)
            if n == 0:
                raise ValueError(f"{self.spec}: collection {ps.name!r} has no training queries")
            if self.needs_embeddings:
                emb = ps.embeddings
                if emb is None or emb.shape[0] != n or emb.ndim != 2:
                    raise ValueError(
                        f"{self.spec}: collection {ps.name!r} needs pair embeddings "
                        f"(float32 (n={n}, d)); got {None if emb is None else emb.shape}"
                    )
                if not np.isfinite(emb).all():
                    raise ValueError(f"{self.spec}: embeddings of {ps.name!r} contain NaN or Inf")
            if self.needs_scores:
                sc = ps.scores
                if sc is None or np.shape(sc) != (n,) or not np.isfinite(sc).all():
                    raise ValueError(
                        f"{self.spec}: collection {ps.name!r} needs finite per-query scores "
                        f"(shape ({n},)) from a full-data run"
                    )
            rng = np.random.default_rng([int(getattr(self, "seed", 0) or 0), i])
            pos, alias, info = self._select(ps, rng)
            pos = np.asarray(pos, dtype=np.int64)
            if pos.size == 0:
                raise ValueError(
                    f"{self.spec}: the selection of {ps.name!r} is empty; raise keep/eps"
                )
            if np.any(np.diff(pos) <= 0) or pos[0] < 0 or pos[-1] >= n:
                raise RuntimeError(f"{self.name}: _select returned unsorted or bad positions")
            kept[ps.name] = [ps.query_ids[j] for j in pos]
            aliases[ps.name] = {ps.query_ids[a]: ps.query_ids[b] for a, b in alias.items()}
            details[ps.name] = {"queries": n, "kept": int(pos.size), **info}
            n_in += n
            n_out += int(pos.size)
        report = StepReport(
            step=self.spec,
            stage="data",
            kept_fraction=n_out / n_in,
            bytes_before=n_in,
            bytes_after=n_out,
            seconds=time.perf_counter() - t0,
            lossless=self.lossless,
            details=details,
        )
        return Selection(kept, aliases, report)

    def _select(
        self, ps: PairSet, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[int, int], dict[str, Any]]:
        """Sorted kept positions, ``{removed position: kept position}`` aliases, details."""
        raise NotImplementedError


@dataclass
class ModelContext:
    """What a model step may use besides the model itself.

    base : the weights of the base model a fine-tune started from (``dare``), as a state dict
        in the model's key space (:func:`retrieval_prune.encode.checkpoint.base_state`).
    base_identity : its identity (name, version, sha256 of the weights), or None.
    others : state dicts of further fine-tunes of the same base (``dare_merge``), or None.
    calibration : a list of :class:`~retrieval_prune.encode.model.Batch` (training queries
        and documents) for the step's own measurements (``dare``'s q), or None.
    loss_fn : ``loss_fn(model, batch) -> scalar tensor`` of the training recipe, or None.
    batches : ``batches(step) -> batch`` training batches, or None.
    steps : optimizer steps a training step may take.
    deadline : ``time.monotonic()`` value after which a training step stops taking steps
        (it still finishes: a pruning schedule jumps to its final widths), or None.
    progress : show progress bars.
    """

    base: Any = None
    base_identity: dict[str, Any] | None = None
    others: list[dict[str, Any]] | None = None
    calibration: list[Any] | None = None
    loss_fn: Callable[..., Any] | None = None
    batches: Callable[[int], Any] | None = None
    steps: int = 0
    deadline: float | None = None
    progress: bool = True


@dataclass
class ModelResult:
    """Output of a model step.

    model : the new model (the input is never mutated).
    masks : parameter name -> bool tensor of the entries that may be non-zero; the checkpoint
        stores those tensors as bitmask + values.
    delta_of : identity of the base when the model is to be stored as a delta over it.
    report : the step report.
    """

    model: Any
    masks: dict[str, Any]
    delta_of: dict[str, Any] | None
    report: StepReport


class ModelPreprocessor(Component):
    """Stage ``"model"``: acts on encoder weights (magnitude pruning, DARE, structured pruning).

    ``apply(model, context) -> ModelResult`` never mutates ``model``.
    """

    stage: ClassVar[str] = "model"
    lossless: ClassVar[bool] = False
    needs_base: ClassVar[bool] = False
    needs_training: ClassVar[bool] = False
    identity_params: ClassVar[dict[str, Any] | None] = None

    def apply(self, model: Any, context: ModelContext | None = None) -> ModelResult:
        context = ModelContext() if context is None else context
        if self.needs_base and context.base is None:
            raise ValueError(
                f"{self.spec} needs the base model the checkpoint was fine-tuned from "
                "(a checkpoint recording its base, or --base FOLDER)"
            )
        if self.needs_training and (context.loss_fn is None or context.batches is None):
            raise ValueError(f"{self.spec} needs training pairs (--data NAME)")
        for name, p in model.state_dict().items():
            if p.is_floating_point() and not bool(p.isfinite().all()):
                raise ValueError(f"{self.name}: parameter {name} contains NaN or Inf")
        return self._apply(model, context)

    def _apply(self, model: Any, context: ModelContext) -> ModelResult:
        raise NotImplementedError


@dataclass
class TableResult:
    """Output of a table step: the new model (its tokenizer and embedding table trimmed),
    ``id_map`` (int64, old token id -> new id, -1 where removed) and the report."""

    model: Any
    id_map: np.ndarray
    report: StepReport


class TablePreprocessor(Component):
    """Stage ``"table"``: trims the input vocabulary and its embedding rows.

    ``apply(model, texts, spec) -> TableResult``: ``texts`` are the calibration texts (corpus
    and training queries) on which the new model's vectors must equal the old one's;
    ``spec`` is the checkpoint's :class:`~retrieval_prune.encode.model.TokenizerSpec`.
    """

    stage: ClassVar[str] = "table"
    lossless: ClassVar[bool] = False
    identity_params: ClassVar[dict[str, Any] | None] = None

    def apply(self, model: Any, texts: Sequence[str], spec: Any) -> TableResult:
        if isinstance(texts, str):
            raise TypeError(f"{self.name}: texts must be a list of strings, not one string")
        return self._apply(model, list(texts), spec)

    def _apply(self, model: Any, texts: list[str], spec: Any) -> TableResult:
        raise NotImplementedError
