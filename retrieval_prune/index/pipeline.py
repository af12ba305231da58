"""From a pipeline spec string to a built index.

A pipeline is token preprocessors (stage ``tokens``), then optionally a codec chain
(stage ``codec``), then optionally an index type (stage ``index``)::

    exact                               -> flat index, uncompressed (alias of "flat")
    default                             -> the recommended compressed index (see ALIASES)
    pool:factor=2                       -> pooled tokens, flat index
    pool:factor=2 | residual:nbits=2    -> pooled tokens, residual codes, brute-force search

The canonical spec (every default filled) is written into the index manifest, and
the same token steps are replayed on queries (:meth:`Pipeline.transform_queries`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from retrieval_prune import registry
from retrieval_prune.index.base import MultiVectorIndex
from retrieval_prune.types import MultiVectors

__all__ = ["Pipeline", "make_pipeline", "ALIASES"]

#: names that stand for a whole pipeline spec; ``default`` is the recommended compressed
#: configuration: half the vectors (Ward pooling), 2-bit residuals of the remaining ones
#: (decoded vectors re-normalised, as ColBERTv2 does) with the codebook sized for the
#: unpooled corpus (``k_scale=2``: the colbert-ai formula would halve it after pooling), an
#: int8 codebook (``centroid_bits=8``: half the bytes of float16, no measured loss) and
#: staged PLAID-style IVF search with budgets by k. It works at any encoder dimension
#: (measurements: eval/results/staged_search.md, eval/results/plaid_scifact.md).
ALIASES: dict[str, str] = {
    "exact": "flat",
    "default": "pool:factor=2 | residual:nbits=2,normalize=true,k_scale=2,centroid_bits=8 | ivf",
}


class Pipeline:
    """Token steps + an index (whose own spec covers codec and search settings)."""

    def __init__(self, token_steps: Sequence[registry.Component], index: MultiVectorIndex):
        self.token_steps = list(token_steps)
        self.index = index
        self.reports: list[dict[str, Any]] = []

    @property
    def spec(self) -> str:
        return " | ".join([s.spec for s in self.token_steps] + [self.index.spec])

    @property
    def needs_importance(self) -> bool:
        return any(getattr(s, "needs_importance", False) for s in self.token_steps)

    def transform_documents(self, docs: MultiVectors, fit: bool = True) -> MultiVectors:
        self.reports = []
        for step in self.token_steps:
            t0 = time.perf_counter()
            if fit and hasattr(step, "fit"):
                step.fit(docs)
            before = docs
            docs = step.transform(docs, kind="documents")
            self.reports.append(_report(step, before, docs, time.perf_counter() - t0))
        return docs

    def transform_queries(self, queries: MultiVectors) -> MultiVectors:
        for step in self.token_steps:
            queries = step.transform(queries, kind="queries")
        return queries

    def build(
        self,
        docs: MultiVectors,
        ids: Sequence[str],
        texts: Sequence[str] | None = None,
        encoder_settings: dict[str, Any] | None = None,
    ) -> MultiVectorIndex:
        """Preprocess ``docs``, fit the index's codecs on them, add them; return the index."""
        if len(docs) == 0:
            raise ValueError("the corpus is empty; an index needs at least one document")
        docs.validate_finite("documents")
        docs = self.transform_documents(docs)
        if hasattr(self.index, "fit"):
            self.index.fit(docs)
        self.index.add(docs, ids, texts)
        self.index.pipeline_spec = self.spec
        self.index.encoder_settings = encoder_settings
        self.index.info["token_steps"] = self.reports
        return self.index


def _report(step: Any, before: MultiVectors, after: MultiVectors, seconds: float) -> dict[str, Any]:
    return {
        "step": step.spec,
        "vectors_before": before.n_tokens,
        "vectors_after": after.n_tokens,
        "kept_fraction": after.n_tokens / max(before.n_tokens, 1),
        "bytes_before": int(before.embeddings.nbytes),
        "bytes_after": int(after.embeddings.nbytes),
        "seconds": seconds,
        "lossless": bool(getattr(step, "lossless", False)),
    }


def make_pipeline(spec: str) -> Pipeline:
    """Parse ``spec`` into token steps and an index (flat unless codecs/an index are named)."""
    spec = spec.strip()
    spec = ALIASES.get(spec, spec)
    steps = registry.parse_spec(spec)
    token_steps, codec_steps, index_step = [], [], None
    seen_stage = -1
    for name, params in steps:
        cls = registry.get(name)
        stage = registry.STAGES.index(cls.stage)
        if stage < seen_stage:
            raise ValueError(
                f"step {name!r} (stage {cls.stage}) comes after a later stage in {spec!r}; "
                f"order steps as {list(registry.STAGES)}"
            )
        seen_stage = stage
        if cls.stage == "tokens":
            token_steps.append(cls(**params))
        elif cls.stage == "codec":
            codec_steps.append((name, params))
        elif cls.stage == "index":
            if index_step is not None:
                raise ValueError(f"{spec!r} names two index types; give one")
            index_step = (cls, params)
        else:
            raise ValueError(f"stage {cls.stage!r} ({name}) cannot appear in an index pipeline yet")
    codec_spec = registry.format_spec(codec_steps) if codec_steps else None
    if index_step is None:
        if codec_spec is None:
            index: MultiVectorIndex = registry.get("flat")()
        else:
            from retrieval_prune.index.compressed import CompressedIndex

            index = CompressedIndex.from_spec(codec_spec)
    else:
        cls, params = index_step
        if codec_spec is None:
            index = cls(**params)
        elif hasattr(cls, "from_codecs"):
            index = cls.from_codecs(codec_spec, **params)
        else:
            raise ValueError(f"index type {cls.name!r} takes no codec; drop {codec_spec!r}")
    if not isinstance(index, MultiVectorIndex):
        raise TypeError(f"{index!r} is not an index")
    return Pipeline(token_steps, index)

