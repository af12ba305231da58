"""The one build path: corpus -> data -> model -> table -> encode -> tokens -> codec -> index.

:func:`build` takes a pipeline (spec or :class:`~retrieval_prune.pipeline.spec.Pipeline`)
and either texts with an encoder (encoded here, through the on-disk embedding cache when a
dataset name is given) or vectors already encoded, and returns the index -- in memory, and
saved as a crash-safe generation when ``out`` is given. With ``max_memory_mb`` it streams:
texts are encoded block by block into the cache, blocks go through the token steps into a
scratch file, the codec is fitted on the memory-mapped result exactly as the in-memory build
fits it, and codes are written block by block (:func:`~retrieval_prune.index.staged.build_streaming`),
so memory holds a block at a time besides the encoder and the codec's fit sample; the
index equals the in-memory build's over the same vectors.

The CLI (``retrieval-prune build``, ``eval``), :meth:`Retriever.from_texts`, the evaluation
runner, ``bench plaid`` and the scripts all build through here.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune.encode.cache import cache_root
from retrieval_prune.index import storage
from retrieval_prune.index.base import MultiVectorIndex
from retrieval_prune.index.compressed import CompressedIndex
from retrieval_prune.index.staged import build_streaming
from retrieval_prune.npyio import release_pages
from retrieval_prune.pipeline.executors import Executor, get_executor
from retrieval_prune.pipeline.spec import Pipeline, make_pipeline
from retrieval_prune.types import MultiVectors

__all__ = ["build", "BuildResult", "encode_corpus", "cache_root", "MIN_MEMORY_MB"]

#: the smallest cap ``max_memory_mb`` accepts
MIN_MEMORY_MB = 64
#: share of the cap one block of vectors may take (the rest: copies made by token steps,
#: codes, the codec's working arrays)
_BLOCK_SHARE = 0.125


@dataclass
class BuildResult:
    """What :func:`build` made: the pipeline, the index (``None`` after a streamed build:
    it lives on disk only), where it was saved, and how long it took."""

    pipeline: Pipeline
    index: MultiVectorIndex | None
    path: Path | None = None
    generation: Path | None = None
    seconds: float = 0.0
    streamed: bool = False
    stats: dict[str, Any] = field(default_factory=dict)


def encode_corpus(
    encoder: Any,
    texts: Sequence[str],
    ids: Sequence[str],
    *,
    dataset: str | None = None,
    kind: str = "docs",
    with_importance: bool = False,
    chunk_docs: int | None = None,
    progress: bool = True,
) -> MultiVectors:
    """Vectors of ``texts``: through the on-disk cache (memory-mapped) when ``dataset`` names
    the collection, else encoded in memory. ``chunk_docs`` encodes a cache miss that many
    texts at a time, streaming them to disk."""
    if dataset is None:
        enc = encoder.encode_documents if kind == "docs" else encoder.encode_queries
        return enc(list(texts), progress=progress, return_importance=with_importance)
    from retrieval_prune.encode.cache import EmbeddingCache

    cache = EmbeddingCache(cache_root() / "embeddings")
    return cache.get_or_encode(encoder, dataset, ids, texts, kind=kind, with_importance=with_importance,
                               progress=progress, chunk_docs=chunk_docs)


def build(
    pipeline: str | Pipeline,
    ids: Sequence[str],
    *,
    docs: MultiVectors | None = None,
    texts: Sequence[str] | None = None,
    encoder: Any = None,
    dataset: str | None = None,
    encoder_settings: dict[str, Any] | None = None,
    store_texts: bool = True,
    out: str | Path | None = None,
    max_memory_mb: float | None = None,
    executor: str | Executor | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = False,
) -> BuildResult:
    """Build ``pipeline`` over a corpus; see the module docstring.

    Parameters
    ----------
    pipeline : spec string (aliases allowed) or Pipeline
    ids : document ids, one per document
    docs : vectors already encoded (then ``encoder`` is not needed)
    texts : document texts: encoded with ``encoder`` when ``docs`` is None; stored in the
        index when ``store_texts``
    encoder : an encoder (``Encoder``, ``HashingEncoder``); its settings go into the manifest
    dataset : collection name: encoding goes through the on-disk cache under that name
    out : index folder to save to (a new generation)
    max_memory_mb : stream the build under this memory cap (needs ``out`` and a codec)
    executor : where block maps run (``"local"``)
    info : extra entries for the manifest's ``info`` (e.g. the dataset's name)
    """
    t0 = time.perf_counter()
    pipe = make_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    pipe.check_buildable()  # data/model/table steps: refused before any work
    ids = [str(i) for i in ids]
    if not ids:
        raise ValueError("the corpus is empty; an index needs at least one document")
    if docs is None and (texts is None or encoder is None):
        raise ValueError("give the documents' vectors (docs=) or their texts with an encoder")
    if texts is not None and len(texts) != len(ids):
        raise ValueError(f"{len(texts)} texts for {len(ids)} ids; give one text per id")
    if encoder is not None:
        encoder_settings = dict(encoder.settings)
    streamed = max_memory_mb is not None
    if streamed:
        if out is None:
            raise ValueError("a bounded-memory build writes to disk: give out= (CLI: --out)")
        if not isinstance(pipe.index, CompressedIndex):
            raise ValueError(
                f"--max-memory-mb streams codes into the index; {pipe.spec!r} stores no codes "
                "(a flat index keeps every float32 vector: name a codec, e.g. 'default')"
            )
        if not max_memory_mb >= MIN_MEMORY_MB:
            raise ValueError(f"max_memory_mb={max_memory_mb!r} must be >= {MIN_MEMORY_MB}")
    phases = [("encode", time.monotonic())]  # phase start times, for memory reports
    if docs is None:
        chunk = _chunk_docs(encoder, max_memory_mb) if streamed else None
        docs = encode_corpus(encoder, texts, ids, dataset=dataset, with_importance=pipe.needs_importance,
                             chunk_docs=chunk, progress=progress)
    if len(docs) != len(ids):
        raise ValueError(f"{len(docs)} documents for {len(ids)} ids; give one id per document")
    kept_texts = list(texts) if (store_texts and texts is not None) else None
    if not streamed:
        index = pipe.build(docs, ids, kept_texts, encoder_settings=encoder_settings)
        index.info.update(info or {})
        gen = index.save(out) if out is not None else None
        return BuildResult(pipe, index, Path(out) if out is not None else None, gen,
                           time.perf_counter() - t0, False)
    pipe.index.info.update(info or {})
    trim_heap()
    gen, stats = _build_streaming(pipe, docs, ids, kept_texts, encoder_settings, Path(out),
                                  max_memory_mb, get_executor(executor), progress, phases)
    stats["phases"] = phases
    return BuildResult(pipe, None, Path(out), gen, time.perf_counter() - t0, True, stats)


def _chunk_docs(encoder: Any, max_memory_mb: float) -> int:
    """Texts encoded at a time so that one block of vectors stays within its share of the cap."""
    dim = int(getattr(encoder, "dim", None) or encoder.settings.get("dim") or 384)
    doc_len = int(getattr(encoder, "doc_maxlen", None) or 512)
    per_doc = doc_len * dim * 4 * 3  # vectors, weights and the encoder's output copies
    return max(16, int(max_memory_mb * (1 << 20) * _BLOCK_SHARE) // per_doc)


def _blocks(docs: MultiVectors, max_tokens: int) -> list[tuple[int, int]]:
    """Document ranges of at most ``max_tokens`` tokens (a longer document stands alone)."""
    off = np.asarray(docs.offsets)
    out, a, n = [], 0, len(docs)
    while a < n:
        b = int(np.searchsorted(off, off[a] + max_tokens, side="right")) - 1
        b = min(max(b, a + 1), n)
        out.append((a, b))
        a = b
    return out


def _build_streaming(
    pipe: Pipeline, docs: MultiVectors, ids: list[str], texts: list[str] | None,
    encoder_settings: dict[str, Any] | None, out: Path, max_memory_mb: float,
    executor: Executor, progress: bool, phases: list[tuple[str, float]],
) -> tuple[Path, dict[str, Any]]:
    index = pipe.index
    if len(docs) == 0:
        raise ValueError("the corpus is empty; an index needs at least one document")
    block_tokens = max(1, int(max_memory_mb * (1 << 20) * _BLOCK_SHARE) // (docs.dim * 4 * 4))
    blocks = _blocks(docs, block_tokens)
    scratch = storage.scratch_dir(out)
    try:
        # 1. token steps, block by block, into a scratch file (what the codec is fitted on)
        phases.append(("tokens", time.monotonic()))
        emb = storage.NpyAppender(scratch / "tokens.npy", np.float32, (docs.dim,))
        offs = storage.NpyAppender(scratch / "tokens_offsets.npy", np.int64)
        offs.append(np.zeros(1, np.int64))
        n_tok = 0
        reports: dict[str, dict[str, Any]] = {}

        def run_tokens(rng: tuple[int, int]) -> tuple[MultiVectors, list[dict[str, Any]]]:
            block = _in_memory(docs[rng[0] : rng[1]])
            release_pages(docs.embeddings)  # read pages leave the resident set
            release_pages(docs.weights)
            block.validate_finite("documents")
            out_block = pipe.transform_documents(block, fit=False)
            return out_block, list(pipe.reports)

        for block, reps in executor.map(run_tokens, blocks):
            emb.append(block.embeddings)
            offs.append(block.offsets[1:] + n_tok)
            n_tok += block.n_tokens
            for r in reps:
                agg = reports.setdefault(r["step"], {**r, "vectors_before": 0, "vectors_after": 0,
                                                     "bytes_before": 0, "bytes_after": 0, "seconds": 0.0})
                for key in ("vectors_before", "vectors_after", "bytes_before", "bytes_after", "seconds"):
                    agg[key] += r[key]
        emb.close()
        offs.close()
        for r in reports.values():
            r["kept_fraction"] = r["vectors_after"] / max(r["vectors_before"], 1)
        pipe.reports = list(reports.values())
        tdocs = MultiVectors(np.load(scratch / "tokens.npy", mmap_mode="r"),
                             np.load(scratch / "tokens_offsets.npy"))
        # 2. the codec fit: the same call, on the same vectors, as the in-memory build
        trim_heap()
        phases.append(("fit", time.monotonic()))
        index.fit(tdocs)
        release_pages(tdocs.embeddings)
        pipe.finish(encoder_settings)
        index.info["streamed"] = {"max_memory_mb": max_memory_mb, "blocks": len(blocks)}
        # 3. codes, block by block, straight to the new generation's files
        trim_heap()
        phases.append(("codes", time.monotonic()))
        tblocks = _blocks(tdocs, block_tokens)

        def batches() -> Iterator[tuple]:
            for a, b in tblocks:
                block = _in_memory(tdocs[a:b])
                release_pages(tdocs.embeddings)
                yield (block, ids[a:b], None if texts is None else texts[a:b])

        gen = build_streaming(index, out, batches(), encoder_settings=encoder_settings)
        return gen, {"blocks": len(blocks), "block_tokens": block_tokens, "tokens_after_steps": n_tok}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def trim_heap() -> None:
    """Give the C heap's freed pages back to the system (glibc ``malloc_trim``), so memory
    freed by one phase of a streamed build does not stay in the resident set. No-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _in_memory(block: MultiVectors) -> MultiVectors:
    """A block read off its memory map (so the steps see ordinary arrays)."""
    w = None if block.weights is None else np.ascontiguousarray(block.weights)
    return MultiVectors(np.ascontiguousarray(block.embeddings), np.asarray(block.offsets) - block.offsets[0], w)

