"""Pipeline specs: every stage, in order, parsed once through the registry.

A pipeline is steps of six stages, in this order (:data:`STAGE_ORDER`)::

    data   | model  | table  | tokens        | codec             | index
    (pairs)  (weights) (vocab)  pool:factor=2   residual:nbits=2    ivf:nprobe=4

Data, model and table steps change what is encoded and how; token, codec and index steps
change what is stored. Names that stand for whole specs live in :data:`ALIASES`::

    exact                               -> flat index, uncompressed (alias of "flat")
    default                             -> the recommended compressed index
    pool:factor=2                       -> pooled tokens, flat index
    pool:factor=2 | residual:nbits=2    -> pooled tokens, residual codes, brute-force search

The spec string is split by :func:`retrieval_prune.registry.parse_spec` -- the one parser --
and nowhere else. A :class:`Pipeline` prints its canonical spec (every default filled) and
its steps per stage; composite parts (a codec chain, a staged index over its codecs) derive
their specs from their parts. The canonical spec of every stage is written into the index
manifest, so :meth:`Pipeline.for_index` rebuilds the query path from a loaded index alone.

Examples
--------
>>> p = make_pipeline("pool:factor=2 | residual:k=16,nbits=2 | ivf")
>>> p.stages()["tokens"], p.stages()["index"][0].split(":")[0]
(['pool:factor=2,normalize=true,protect=1'], 'ivf')
>>> make_pipeline(p.spec).spec == p.spec
True
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from retrieval_prune import registry
from retrieval_prune.compress.chain import CodecChain
from retrieval_prune.index.base import MultiVectorIndex
from retrieval_prune.index.compressed import CompressedIndex
from retrieval_prune.types import MultiVectors

__all__ = ["Pipeline", "make_pipeline", "ALIASES", "STAGE_ORDER", "UnsupportedStageError"]

#: the order stages take in a spec (the registry's)
STAGE_ORDER = registry.STAGES
#: stages that act before encoding (run by ``retrieval-prune preprocess``, not the builder)
PRE_ENCODING_STAGES = ("data", "model", "table")

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


class UnsupportedStageError(ValueError):
    """A spec names data, model or table steps, which the build path cannot apply yet."""


class Pipeline:
    """Steps of every stage: pre-encoding steps (data, model, table), token steps, and an
    index whose own spec covers its codecs and search settings."""

    def __init__(
        self,
        token_steps: Sequence[registry.Component],
        index: MultiVectorIndex,
        *,
        data_steps: Sequence[registry.Component] = (),
        model_steps: Sequence[registry.Component] = (),
        table_steps: Sequence[registry.Component] = (),
    ):
        self.data_steps = list(data_steps)
        self.model_steps = list(model_steps)
        self.table_steps = list(table_steps)
        self.token_steps = list(token_steps)
        self.index = index
        self.reports: list[dict[str, Any]] = []

    # -- description ---------------------------------------------------------------------
    def stages(self) -> dict[str, list[str]]:
        """Canonical spec of every step, by stage (what the manifest records)."""
        index = self.index
        chain = getattr(index, "chain", None)
        out = {
            "data": [s.spec for s in self.data_steps],
            "model": [s.spec for s in self.model_steps],
            "table": [s.spec for s in self.table_steps],
            "tokens": [s.spec for s in self.token_steps],
            "codec": [s.spec for s in chain.steps] if chain is not None else [],
            "index": [],
        }
        if index.name in registry.available("index"):  # a registered type (flat, ivf, hnsw)
            out["index"] = [registry.format_spec([(index.name, index.get_params())])]
        return out

    @property
    def spec(self) -> str:
        pre = self.data_steps + self.model_steps + self.table_steps + self.token_steps
        return " | ".join([s.spec for s in pre] + [self.index.spec])

    def __repr__(self) -> str:
        return f"Pipeline({self.spec!r})"

    @property
    def needs_importance(self) -> bool:
        return any(getattr(s, "needs_importance", False) for s in self.token_steps)

    @property
    def pre_encoding_steps(self) -> list[registry.Component]:
        return self.data_steps + self.model_steps + self.table_steps

    def check_buildable(self) -> None:
        """Refuse data/model/table steps with a message naming them and what is missing."""
        if self.pre_encoding_steps:
            names = ", ".join(f"{s.spec} ({s.stage})" for s in self.pre_encoding_steps)
            raise UnsupportedStageError(
                f"{names}: {'/'.join(PRE_ENCODING_STAGES)} steps act before encoding; apply "
                "them with 'retrieval-prune preprocess --pipeline STEPS --out DIR' (data steps: "
                "--out FILE.json, then 'train --select FILE.json') and build with "
                "--checkpoint DIR and the remaining token/codec/index steps"
            )

    # -- the query path and the in-memory vector build ------------------------------------
    @classmethod
    def for_index(cls, index: MultiVectorIndex) -> Pipeline:
        """The pipeline recorded in ``index``'s manifest, around ``index`` itself: its token
        steps replay on queries (nothing is built to recover them)."""
        steps = _parse(index.pipeline_spec or index.spec)
        by_stage = _instantiate(steps)
        return cls(by_stage["tokens"], index, data_steps=by_stage["data"],
                   model_steps=by_stage["model"], table_steps=by_stage["table"])

    def transform_documents(self, docs: MultiVectors, fit: bool = True) -> MultiVectors:
        self.reports = []
        for step in self.token_steps:
            t0 = time.perf_counter()
            if fit and hasattr(step, "fit"):
                step.fit(docs)
            before = docs
            docs = step.transform(docs, kind="documents")
            self.reports.append(step_report(step, before, docs, time.perf_counter() - t0))
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
        """Token steps, codec fit and index over already-encoded ``docs``; returns the index.

        The whole path from a corpus (encoder included) is :func:`retrieval_prune.pipeline.build.build`.
        """
        self.check_buildable()
        if len(docs) == 0:
            raise ValueError("the corpus is empty; an index needs at least one document")
        docs.validate_finite("documents")
        docs = self.transform_documents(docs)
        if hasattr(self.index, "fit"):
            self.index.fit(docs)
        self.index.add(docs, ids, texts)
        self.finish(encoder_settings)
        return self.index

    def finish(self, encoder_settings: dict[str, Any] | None) -> None:
        """Record the pipeline in the index (manifest): canonical spec, stages, encoder."""
        self.index.pipeline_spec = self.spec
        self.index.encoder_settings = encoder_settings
        self.index.info["token_steps"] = self.reports
        self.index.info["stages"] = self.stages()


def step_report(step: Any, before: MultiVectors, after: MultiVectors, seconds: float) -> dict[str, Any]:
    """What one token step did: vectors and bytes before/after, seconds, lossless."""
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


def _parse(spec: str) -> list[tuple[type[registry.Component], dict[str, Any]]]:
    if not isinstance(spec, str):
        raise TypeError(f"a pipeline spec is a string, got {type(spec).__name__}")
    spec = spec.strip()
    spec = ALIASES.get(spec, spec)
    steps = [(registry.get(name), params) for name, params in registry.parse_spec(spec)]
    seen = -1
    for cls, _ in steps:
        stage = STAGE_ORDER.index(cls.stage)
        if stage < seen:
            raise ValueError(
                f"step {cls.name!r} (stage {cls.stage}) comes after a later stage in {spec!r}; "
                f"order steps as {' | '.join(STAGE_ORDER)}"
            )
        seen = stage
    if sum(cls.stage == "index" for cls, _ in steps) > 1:
        raise ValueError(f"{spec!r} names two index types; give one")
    return steps


def _instantiate(steps) -> dict[str, Any]:
    out: dict[str, Any] = {s: [] for s in STAGE_ORDER}
    for cls, params in steps:
        if cls.stage == "index":
            out["index"].append((cls, params))
        else:
            out[cls.stage].append(cls(**dict(params)))
    return out


def make_pipeline(spec: str) -> Pipeline:
    """Parse ``spec`` (any stage; aliases allowed) into a :class:`Pipeline` whose index is
    flat unless codecs or an index type are named."""
    steps = _parse(spec)
    by_stage = _instantiate(steps)
    codecs = by_stage["codec"]
    chain = CodecChain(codecs) if codecs else None
    if not by_stage["index"]:
        index: MultiVectorIndex = registry.get("flat")() if chain is None else CompressedIndex(chain)
    else:
        (cls, params), = by_stage["index"]
        if chain is None:
            index = cls(**params)
        elif hasattr(cls, "from_codecs"):
            index = cls(chain, **params)
        else:
            raise ValueError(f"index type {cls.name!r} takes no codec; drop {chain.spec!r}")
    if not isinstance(index, MultiVectorIndex):
        raise TypeError(f"{index!r} is not an index")
    return Pipeline(by_stage["tokens"], index, data_steps=by_stage["data"],
                    model_steps=by_stage["model"], table_steps=by_stage["table"])
