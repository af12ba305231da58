"""Evaluation runner: (datasets x pipelines) -> one row per pair, in the `eval --json` shape.

For each dataset the corpus and queries are encoded once (cached on disk), the exact
uncompressed MaxSim reference is computed once (cached too), and each pipeline is
built, saved to disk, reopened from disk (mmap) and searched one query at a time.
Every row carries the delta to the exact reference of the same encoder and data.

Row keys: dataset, split, pipeline, pipeline_canonical, checkpoint, encoder, ndcg@10,
recall@100, mrr@10, exact_ndcg@10, delta_ndcg@10, exact_top10_recall, n_docs,
n_queries, bytes_per_doc, vectors_per_doc, compression_ratio, build_s, p50_ms,
p95_ms, query_encode_ms, peak_rss_mb.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retrieval_prune.atomic import atomic_write_json
from retrieval_prune.data import load_beir
from retrieval_prune.encode.cache import cache_root
from retrieval_prune.evaluation.metrics import evaluate
from retrieval_prune.pipeline import Pipeline, make_pipeline
from retrieval_prune.pipeline.build import build
from retrieval_prune.types import Corpus, MultiVectors

__all__ = ["evaluate_grid", "evaluate_pipeline", "exact_maxsim_run", "index_bytes", "peak_rss_reset",
           "peak_rss_mb"]


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux; no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _proc_status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (NaN where /proc is missing)."""
    mb = _proc_status_mb("VmRSS")
    return float("nan") if mb is None else mb


class RssSampler:
    """Peaks of this process's anonymous and file-backed resident memory, sampled from
    ``/proc/self/status`` every ``interval`` seconds in a thread while the block runs.

    ``RssAnon`` is what the process allocated; ``RssFile`` is pages of memory-mapped files
    it has touched (clean page cache the kernel reclaims under pressure). ``VmHWM`` counts
    both. Linux only; elsewhere the peaks stay None.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_anon_mb: float | None = None
        self.peak_file_mb: float | None = None
        self.samples: list[tuple[float, float | None, float | None]] = []
        self._stop = None

    def by_phase(self, phases: list[tuple[str, float]]) -> dict[str, tuple[float, float]]:
        """``{phase: (anonymous peak, file-backed peak)}`` in MiB, phases given as
        ``[(name, monotonic start)]`` in order (each runs until the next starts)."""
        out = {}
        for i, (name, start) in enumerate(phases):
            end = phases[i + 1][1] if i + 1 < len(phases) else float("inf")
            rows = [(a, f) for t, a, f in self.samples if start <= t < end and a is not None]
            if rows:
                out[name] = (max(a for a, _ in rows), max(f or 0.0 for _, f in rows))
        return out

    def _sample(self) -> None:
        anon, file_ = _proc_status_mb("RssAnon"), _proc_status_mb("RssFile")
        self.samples.append((time.monotonic(), anon, file_))
        if anon is not None:
            self.peak_anon_mb = max(self.peak_anon_mb or 0.0, anon)
        if file_ is not None:
            self.peak_file_mb = max(self.peak_file_mb or 0.0, file_)

    def __enter__(self) -> RssSampler:
        import threading

        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self._sample()

        self._sample()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset, in MiB."""
    mb = _proc_status_mb("VmHWM")
    if mb is not None:
        return mb
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def index_bytes(path: str | Path) -> int:
    """Bytes of every file of an index's live generation (manifest included; a sharded
    index: its top-level manifest and every shard's pinned generation)."""
    from retrieval_prune.index.sharded import live_generations

    return sum(p.stat().st_size for gen in live_generations(path) for p in gen.iterdir() if p.is_file())




class DatasetContext:
    """Vectors of one dataset's corpus and judged queries, and the exact reference run.

    Built from a text collection and an encoder (:meth:`from_corpus`, embeddings cached
    on disk) or from a precomputed embedding set (:meth:`from_embedding_set`).
    """

    def __init__(self, *, name: str, split: str, doc_ids: list[str], docs: MultiVectors,
                 qids: list[str], queries: MultiVectors, qrels: dict, encoder_settings: dict,
                 encoder_name: str, query_encode_ms: float | None,
                 exact_run: dict[str, dict[str, float]] | None = None):
        self.name, self.split, self.doc_ids, self.docs = name, split, doc_ids, docs
        self.qids, self.queries, self.qrels = qids, queries, qrels
        self.encoder_settings, self.encoder_name = encoder_settings, encoder_name
        self.query_encode_ms = query_encode_ms
        self.exact_run = self._exact_run() if exact_run is None else exact_run
        self.exact_metrics = evaluate(qrels, self.exact_run)

    @classmethod
    def from_corpus(cls, corpus: Corpus, encoder: Any, *, with_importance: bool = False
                    ) -> DatasetContext:
        from retrieval_prune.encode.cache import EmbeddingCache

        cache = EmbeddingCache(cache_root() / "embeddings")
        docs = cache.get_or_encode(encoder, corpus.name, corpus.doc_ids, corpus.doc_texts,
                                   kind="docs", with_importance=with_importance)
        qids, qtexts = corpus.judged_queries()
        queries = cache.get_or_encode(encoder, corpus.name, qids, qtexts, kind="queries")
        return cls(name=corpus.name, split=corpus.split, doc_ids=corpus.doc_ids, docs=docs,
                   qids=qids, queries=queries, qrels=corpus.qrels,
                   encoder_settings=encoder.settings, encoder_name=encoder.name,
                   query_encode_ms=_time_query_encoding(encoder, qtexts))

    @classmethod
    def from_embedding_set(cls, es: Any) -> DatasetContext:
        judged = [i for i, q in enumerate(es.query_ids) if q in es.qrels]
        return cls(name=es.name, split=es.split, doc_ids=es.doc_ids, docs=es.docs,
                   qids=[es.query_ids[i] for i in judged], queries=es.queries[judged],
                   qrels=es.qrels, encoder_settings=es.settings, encoder_name=es.encoder,
                   query_encode_ms=None)

    def _exact_run(self) -> dict[str, dict[str, float]]:
        key = hashlib.sha256(
            json.dumps([self.encoder_settings, self.name, self.split, self.docs.n_tokens,
                        float(np.asarray(self.docs.embeddings[:64]).sum()),
                        self.queries.n_tokens, self.qids], sort_keys=True, default=str).encode()
        ).hexdigest()[:24]
        path = cache_root() / "exact_runs" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        run = exact_maxsim_run(self.docs, self.doc_ids, self.queries, self.qids)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, run)
        return run


def exact_maxsim_run(docs: MultiVectors, doc_ids: Sequence[str], queries: MultiVectors,
                     qids: Sequence[str], k: int = 100) -> dict[str, dict[str, float]]:
    """The exact (uncompressed, brute-force) MaxSim run: ``{qid: {doc_id: score}}``, top k."""
    from retrieval_prune.index.flat import FlatIndex

    index = FlatIndex()
    index.add(docs, list(doc_ids))
    return index.search(queries, k=k).to_run(list(qids))


def _time_query_encoding(encoder: Any, texts: Sequence[str], n: int = 30) -> float:
    """p50 milliseconds of encoding one query (reported apart from search latency)."""
    sample = list(texts[:n])
    if not sample:
        return 0.0
    encoder.encode_queries(sample[:2], progress=False)  # warm-up
    times = []
    for t in sample:
        t0 = time.perf_counter()
        encoder.encode_queries([t], progress=False)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def load_context(name: str, encoder: Any, *, split: str = "test", max_docs: int | None = None,
                 with_importance: bool = False) -> DatasetContext:
    """A dataset by name or folder: a precomputed embedding set or a BEIR text collection."""
    from retrieval_prune.data.beir import resolve_dataset
    from retrieval_prune.data.embeddings import is_embedding_set, load_embedding_set

    p = Path(name)
    if p.is_dir() and is_embedding_set(p):
        return DatasetContext.from_embedding_set(load_embedding_set(p, split=split))
    folder = resolve_dataset(name)
    if is_embedding_set(folder):
        return DatasetContext.from_embedding_set(load_embedding_set(folder, split=split))
    corpus = load_beir(folder, split=split, max_docs=max_docs)
    return DatasetContext.from_corpus(corpus, encoder(), with_importance=with_importance)


def _top10(run_q: dict[str, float]) -> list[str]:
    return [d for d, _ in sorted(run_q.items(), key=lambda x: -x[1])[:10]]


def run_quality(ctx: DatasetContext, run: dict[str, dict[str, float]]) -> dict[str, float]:
    """nDCG@10 / R@100 / MRR@10 of ``run``, its delta to the exact reference and
    ``exact_top10_recall`` (the fraction of exact MaxSim's top 10 it returns in its top 10)."""
    m = evaluate(ctx.qrels, run)
    exact_top = {q: set(_top10(ctx.exact_run.get(q, {}))) for q in ctx.qids}
    overlap = [len(exact_top[q] & set(_top10(run.get(q, {})))) / max(len(exact_top[q]), 1)
               for q in ctx.qids]
    return {
        "ndcg@10": m["ndcg@10"],
        "recall@100": m["recall@100"],
        "mrr@10": m["mrr@10"],
        "exact_ndcg@10": ctx.exact_metrics["ndcg@10"],
        "delta_ndcg@10": m["ndcg@10"] - ctx.exact_metrics["ndcg@10"],
        "exact_top10_recall": float(np.mean(overlap)) if overlap else 0.0,
    }


def evaluate_pipeline(ctx: DatasetContext, spec: str, *, checkpoint: str | None,
                      index_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Build ``spec`` over ``ctx``'s corpus, save it, reopen it from disk, search, score."""
    from retrieval_prune.index.base import load_index

    tmpdir = None
    if index_dir is None:
        cache_root().mkdir(parents=True, exist_ok=True)
        tmpdir = tempfile.mkdtemp(prefix="rp-eval-", dir=cache_root())
        index_dir = Path(tmpdir) / "index"
    peak_rss_reset()
    built = build(spec, ctx.doc_ids, docs=ctx.docs, encoder_settings=ctx.encoder_settings,
                  out=index_dir)
    pipe, build_s = built.pipeline, built.seconds
    n_vectors = _stored_vectors(built.index)
    del built
    try:
        nbytes = index_bytes(index_dir)
        index = load_index(index_dir)
        queries = Pipeline.for_index(index).transform_queries(ctx.queries)
        index.search(queries[0:1], k=100)  # warm-up (JIT compile, page-in)
        lat, run = [], {}
        it = range(len(queries))
        if progress:
            it = tqdm(it, desc=f"search {spec[:40]}", leave=False)
        for qi in it:
            q = queries[qi : qi + 1]
            t1 = time.perf_counter()
            res = index.search(q, k=100)
            lat.append((time.perf_counter() - t1) * 1e3)
            run[ctx.qids[qi]] = dict(res.external(0))
        peak = peak_rss_mb()
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    fp32_bytes = ctx.docs.n_tokens * ctx.docs.dim * 4
    return {
        "dataset": ctx.name,
        "split": ctx.split,
        "pipeline": spec,
        "pipeline_canonical": pipe.spec,
        "checkpoint": checkpoint or "zero-shot",
        "encoder": ctx.encoder_name,
        **run_quality(ctx, run),
        "n_docs": len(ctx.doc_ids),
        "n_queries": len(ctx.qids),
        "bytes_per_doc": nbytes / len(ctx.doc_ids),
        "vectors_per_doc": n_vectors / len(ctx.doc_ids),
        "compression_ratio": fp32_bytes / max(nbytes, 1),
        "build_s": build_s,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "query_encode_ms": ctx.query_encode_ms,
        "peak_rss_mb": peak,
    }


def _stored_vectors(index: Any) -> int:
    for attr in ("n_vectors",):
        if hasattr(index, attr):
            return int(getattr(index, attr))
    return 0


def evaluate_grid(
    datasets: Sequence[str],
    pipelines: Sequence[str] = ("exact",),
    *,
    checkpoint: str | None = None,
    split: str = "test",
    max_docs: int | None = None,
    progress: bool = True,
    on_row: Any = None,
) -> list[dict[str, Any]]:
    """Evaluate every pipeline on every dataset; returns the rows (see module docstring)."""
    from retrieval_prune.encode import Encoder

    pipes = [make_pipeline(p) for p in pipelines]  # fail on a bad spec before encoding
    need_imp = any(p.needs_importance for p in pipes)
    encoder_cache: list[Any] = []

    def encoder() -> Any:  # loaded only when a text collection needs it
        if not encoder_cache:
            encoder_cache.append(Encoder.load(checkpoint))
        return encoder_cache[0]

    rows = []
    for name in datasets:
        ctx = load_context(name, encoder, split=split, max_docs=max_docs,
                           with_importance=need_imp)
        for spec in pipelines:
            row = evaluate_pipeline(ctx, spec, checkpoint=checkpoint, progress=progress)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
