"""Benchmark against colbert-ai's PLAID on the same vectors, in one process.

Both engines index the *same* precomputed document vectors and search with the *same*
query vectors, so the comparison measures the index (size, search latency, the quality
its compression and candidate stages keep), not the encoder:

- **PLAID** (colbert-ai 0.2.22, its own indexer and searcher) at ``nbits`` 1, 2, 4. The
  encoder is replaced by a shim checkpoint whose ``docFromText`` returns our cached
  vectors (the "passages" are document positions), so colbert-ai's sampling, k-means
  (its centroid-count rule), residual codec, compaction and IVF run unchanged on them.
  Search is ``Searcher.dense_search(Q, k)`` with our query vectors and colbert-ai's own
  defaults for ``ncells``, ``centroid_score_threshold`` and ``ndocs`` at k=10 and k=100
  (one searcher per k, sharing the loaded index: the defaults are set on first use).
- **retrieval_prune**: pipelines built, saved, reopened from disk and searched with
  :func:`~retrieval_prune.evaluation.runner.evaluate_pipeline` (quality row), then
  reopened for the latency pass.

Latency: one query at a time, k=10 and k=100, every query of the split; the engines run
*interleaved query by query* (the order rotating), after a warm-up, with torch, Numba,
BLAS and OpenMP restricted to the same number of threads, so ratios survive a busy
machine. Query encoding is excluded from search latency for both and reported once
(``query_encode_ms``); document encoding is timed on a sample of documents and
extrapolated (``encode_docs_s_est``, added to ``build_s`` as ``build_s_with_encoding``).

Rows have the ``eval --json`` shape plus ``engine``, ``nbits``, ``threads``,
``build_s_with_encoding``, ``p50_ms_k10``, ``p95_ms_k10``, ``p50_ms_k100``,
``p95_ms_k100`` (at the first thread count) and ``latency`` (every thread count).
``p50_ms``/``p95_ms`` are the k=100 figures (the runner searches at k=100).

Run::

    retrieval-prune bench plaid --data scifact --checkpoint .cache/checkpoints/ft128 \\
        --json eval/results/plaid_scifact.json --markdown eval/results/plaid_scifact.md

colbert-ai is optional (``pip install -e '.[plaid]'``); it is imported only here, only
when PLAID rows are requested.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune.evaluation.runner import current_rss_mb, run_quality

__all__ = [
    "DEFAULT_PIPELINES",
    "DEFAULT_NBITS",
    "FailedEngine",
    "PlaidEngine",
    "OurEngine",
    "require_colbert",
    "run",
    "summarize",
    "format_markdown",
]

#: our engine's pipelines (``default`` = pool:factor=2 | residual:nbits=2,normalize=true | ivf)
DEFAULT_PIPELINES: tuple[str, ...] = (
    "default",
    "residual:nbits=1,normalize=true | ivf",
    "residual:nbits=2,normalize=true | ivf",
    "residual:nbits=4,normalize=true | ivf",
    "pool:factor=2 | residual:nbits=1,normalize=true | ivf",
)
DEFAULT_NBITS: tuple[int, ...] = (1, 2, 4)
KS: tuple[int, ...] = (10, 100)
INSTALL_HINT = "pip install -e '.[plaid]'"
#: nDCG@10 tolerance of the acceptance comparison against PLAID nbits=2
NDCG_TOL = 0.005


def require_colbert() -> None:
    """Raise ImportError with the install command when colbert-ai is not importable."""
    try:
        import colbert  # noqa: F401
        from colbert.infra import ColBERTConfig  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"the PLAID benchmark needs colbert-ai 0.2.22, which is not installed: {INSTALL_HINT} "
            f"(or pip install colbert-ai==0.2.22 'torch==2.13.0' 'transformers<5'); "
            f"import failed with: {exc}"
        ) from exc


# -- helpers ---------------------------------------------------------------------------
def _dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (recursively)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@contextlib.contextmanager
def thread_limit(n: int):
    """Restrict torch, Numba, BLAS and OpenMP (faiss) to ``n`` threads."""
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    before_t, before_nb = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before_t)
        numba.set_num_threads(before_nb)


@contextlib.contextmanager
def _quiet(log: Path | None):
    """Send colbert-ai's chatter (stdout and stderr) to ``log``."""
    if log is None:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


# -- engines ---------------------------------------------------------------------------
class OurEngine:
    """A retrieval_prune pipeline: quality row from ``evaluate_pipeline``, then reopened."""

    engine = "retrieval_prune"
    #: the encoder precision whose vectors this engine searches (end-to-end pass)
    query_precision = "float32"

    def __init__(self, ctx: Any, spec: str, folder: Path, *, checkpoint: str | None,
                 progress: bool = False):
        from retrieval_prune.evaluation.runner import evaluate_pipeline, peak_rss_reset

        self.spec = spec
        self.folder = Path(folder)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        peak_rss_reset()
        rss0 = current_rss_mb()
        self.row = evaluate_pipeline(ctx, spec, checkpoint=checkpoint, index_dir=self.folder,
                                     progress=progress)
        self.row.update({"engine": self.engine, "rss_at_start_mb": rss0,
                         "encoder_precision": self.query_precision})
        nbits = _nbits_of(self.row["pipeline_canonical"])
        if nbits is not None:
            self.row["nbits"] = nbits
        self._ctx = ctx
        self.index = None

    def open(self) -> None:
        from retrieval_prune.index.base import load_index

        self.index = load_index(self.folder)
        from retrieval_prune.pipeline import Pipeline

        self._pipe = Pipeline.for_index(self.index)
        self.queries = self._pipe.transform_queries(self._query_vectors())
        self._doc_ids = self.index.doc_ids

    def _query_vectors(self) -> Any:
        return self._ctx.queries

    def search(self, qi: int, k: int) -> list[tuple[str, float]]:
        res = self.index.search(self.queries[qi : qi + 1], k=k)
        return list(res.external(0))

    def search_encoded(self, mv: Any, k: int) -> list[tuple[str, float]]:
        """One query straight from the encoder: the index's query steps, then search."""
        res = self.index.search(self._pipe.transform_queries(mv), k=k)
        return list(res.external(0))

    def close(self) -> None:
        self.index = None


class OurFastQueryEngine(OurEngine):
    """The index of ``base`` searched with queries from another encoder precision (e.g.
    ``int8-onnx``: documents stay float32, only queries are approximate). Its query vectors
    are each query text encoded alone by ``encoder``; quality is scored on them."""

    def __init__(self, base: OurEngine, encoder: Any, texts: Sequence[str]):
        from retrieval_prune.types import MultiVectors

        self.spec, self.folder, self._ctx = base.spec, base.folder, base._ctx
        self.query_precision = encoder.precision
        self.index = None
        qs = [encoder.encode_queries([t], progress=False) for t in texts]
        self._qvecs = MultiVectors.from_list([np.asarray(q.embeddings) for q in qs],
                                             dim=qs[0].dim)
        self.open()
        self.search(0, 100)  # warm-up
        run = {qid: dict(self.search(qi, 100)) for qi, qid in enumerate(self._ctx.qids)}
        self.close()
        self.row = {**{k: v for k, v in base.row.items() if not k.startswith(("p50", "p95"))},
                    **run_quality(self._ctx, run),
                    "encoder": f"{base.row['encoder']} {encoder.precision}",
                    "encoder_precision": encoder.precision,
                    "shares_index_with": base.spec}

    def _query_vectors(self) -> Any:
        return self._qvecs


def _nbits_of(spec: str) -> int | None:
    """Residual bits of the codec a pipeline spec stores with (None: not residual codes)."""
    from retrieval_prune.pipeline import make_pipeline

    chain = getattr(make_pipeline(spec).index, "chain", None)
    return getattr(chain.storage, "nbits", None) if chain is not None else None


class _VectorCheckpoint:
    """Stands in for colbert-ai's ``Checkpoint``: ``docFromText`` returns precomputed
    vectors. Passages are document positions as strings ("0", "1", ...)."""

    docs: Any = None  # MultiVectors, set before indexing

    def __init__(self, name: Any = None, colbert_config: Any = None, verbose: int = 0):
        from colbert.modeling.colbert import ColBERT

        self.name, self.colbert_config = name, colbert_config
        # what the real Checkpoint's constructor does on CPU: load the C++ MaxSim kernel
        ColBERT.try_load_torch_extensions(use_gpu=False)

    def cuda(self):  # pragma: no cover - CPU only
        raise RuntimeError("the PLAID benchmark runs on CPU")

    def docFromText(self, docs, bsize=None, keep_dims=True, to_cpu=False, showprogress=False,
                    return_tokens=False, pool_factor=1, clustering_mode="hierarchical",
                    protected_tokens=0):  # noqa: N802 - colbert-ai's name
        import torch

        if keep_dims != "flatten" or pool_factor != 1:
            raise ValueError(f"shim checkpoint: unsupported keep_dims={keep_dims!r}, "
                             f"pool_factor={pool_factor}")
        mv = type(self).docs
        idx = np.asarray([int(p) for p in docs], np.int64)
        off = np.asarray(mv.offsets, np.int64)
        parts = [np.asarray(mv.embeddings[off[i] : off[i + 1]], np.float32) for i in idx]
        doclens = [int(off[i + 1] - off[i]) for i in idx]
        embs = np.concatenate(parts) if parts else np.zeros((0, mv.dim), np.float32)
        return torch.from_numpy(np.ascontiguousarray(embs)), doclens


class FailedEngine:
    """An engine whose build failed: its row carries the error, it is never searched."""

    query_precision = "float32"

    def __init__(self, engine: str, pipeline: str, ctx: Any, checkpoint: str | None,
                 error: str, **extra: Any):
        self.engine = engine
        self.failed = error
        self.row = {"engine": engine, "pipeline": pipeline, "dataset": ctx.name,
                    "n_docs": len(ctx.doc_ids), "n_queries": len(ctx.qids),
                    "encoder": ctx.encoder_name, "checkpoint": checkpoint or "zero-shot",
                    "error": error, **extra}

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class PlaidEngine:
    """colbert-ai's PLAID index (indexer + searcher) over precomputed vectors."""

    engine = "plaid"
    query_precision = "float32"

    def __init__(self, ctx: Any, nbits: int, scratch: Path, *, checkpoint: str | None,
                 log: Path | None = None):
        require_colbert()
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        from colbert import Indexer
        from colbert.indexing import collection_indexer
        from colbert.infra import ColBERTConfig, Run, RunConfig

        from retrieval_prune.evaluation.runner import peak_rss_mb, peak_rss_reset

        self.nbits = int(nbits)
        self.scratch = Path(scratch).resolve()
        self.log = log
        self.ctx = ctx
        self.name = f"{ctx.name}.nbits{self.nbits}"
        self.shim = str(self.scratch / "vector-checkpoint")  # never loaded: the shim serves it
        self.run_config = RunConfig(nranks=1, experiment="bench", root=str(self.scratch),
                                    avoid_fork_if_possible=True, gpus=0)
        n = len(ctx.doc_ids)
        collection = [str(i) for i in range(n)]
        _VectorCheckpoint.docs = ctx.docs
        peak_rss_reset()
        rss0 = current_rss_mb()
        t0 = time.perf_counter()
        import torch

        with _quiet(log), Run().context(self.run_config), \
                _patched(collection_indexer, "Checkpoint", _VectorCheckpoint), \
                _patched(torch.Tensor, "quantile", _quantile_any_size(torch.Tensor.quantile)):
            config = ColBERTConfig(nbits=self.nbits, dim=ctx.docs.dim, doc_maxlen=256,
                                   query_maxlen=int(np.diff(ctx.queries.offsets).max()),
                                   avoid_fork_if_possible=True)
            indexer = Indexer(checkpoint=self.shim, config=config, verbose=1)
            self.index_path = Path(indexer.index(name=self.name, collection=collection,
                                                 overwrite="force_silent_overwrite"))
        build_s = time.perf_counter() - t0
        self.open()
        # quality pass at k=100, one query at a time (as the runner does)
        self.search(0, 100)  # warm-up
        run, lat = {}, []
        for qi, qid in enumerate(ctx.qids):
            t1 = time.perf_counter()
            hits = self.search(qi, 100)
            lat.append((time.perf_counter() - t1) * 1e3)
            run[qid] = dict(hits)
        peak = peak_rss_mb()
        self.run100 = run
        nbytes = _dir_bytes(self.index_path)
        import json

        meta = json.loads((self.index_path / "metadata.json").read_text())
        fp32 = ctx.docs.n_tokens * ctx.docs.dim * 4
        n_docs = len(ctx.doc_ids)
        self.row = {
            "dataset": ctx.name,
            "split": ctx.split,
            "pipeline": f"plaid:nbits={self.nbits}",
            "pipeline_canonical": (
                f"colbert-ai {_colbert_version()} PLAID: nbits={self.nbits}, "
                f"num_partitions={meta['num_partitions']}, kmeans_niters={config.kmeans_niters}"),
            "checkpoint": checkpoint or "zero-shot",
            "encoder": ctx.encoder_name,
            **run_quality(ctx, run),
            "n_docs": n_docs,
            "n_queries": len(ctx.qids),
            "bytes_per_doc": nbytes / n_docs,
            "vectors_per_doc": meta["num_embeddings"] / n_docs,
            "compression_ratio": fp32 / max(nbytes, 1),
            "build_s": build_s,
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "query_encode_ms": ctx.query_encode_ms,
            "peak_rss_mb": peak,
            "engine": self.engine,
            "encoder_precision": self.query_precision,
            "nbits": self.nbits,
            "rss_at_start_mb": rss0,
            "num_partitions": meta["num_partitions"],
        }

    def open(self) -> None:
        import torch
        from colbert import Searcher
        from colbert.infra import Run

        with _quiet(self.log), Run().context(self.run_config), \
                _patched(sys.modules["colbert.searcher"], "Checkpoint", _VectorCheckpoint):
            searcher = Searcher(index=self.name, checkpoint=self.shim, collection=["-"],
                                verbose=0)
        # one searcher per k: dense_search fixes its ncells / centroid_score_threshold /
        # ndocs defaults (chosen by k) on first use; the loaded index is shared
        self.searchers = {}
        for k in KS:
            s = copy.copy(searcher)
            s.config = copy.deepcopy(searcher.config)
            self.searchers[k] = s
        q = self.ctx.queries
        off = np.asarray(q.offsets, np.int64)
        self.Q = [torch.from_numpy(np.array(q.embeddings[off[i] : off[i + 1]],  # a copy
                                            dtype=np.float32)).unsqueeze(0)
                  for i in range(len(q))]
        self._doc_ids = self.ctx.doc_ids

    def search_settings(self) -> dict[str, dict[str, Any]]:
        """The ncells / centroid_score_threshold / ndocs each searcher used."""
        return {str(k): {key: getattr(s.config, key) for key in
                         ("ncells", "centroid_score_threshold", "ndocs")}
                for k, s in self.searchers.items()}

    def search(self, qi: int, k: int) -> list[tuple[str, float]]:
        s = self.searchers[k if k in self.searchers else max(self.searchers)]
        pids, _, scores = s.dense_search(self.Q[qi], k)
        ids = self._doc_ids
        return [(ids[p], float(sc)) for p, sc in zip(pids, scores, strict=False)]

    def search_encoded(self, mv: Any, k: int) -> list[tuple[str, float]]:
        """One query straight from the encoder (``MultiVectors`` of one query)."""
        import torch

        s = self.searchers[k if k in self.searchers else max(self.searchers)]
        q = torch.from_numpy(np.array(mv.embeddings, dtype=np.float32)).unsqueeze(0)
        pids, _, scores = s.dense_search(q, k)
        ids = self._doc_ids
        return [(ids[p], float(sc)) for p, sc in zip(pids, scores, strict=False)]

    def close(self) -> None:
        self.searchers = {}


def _quantile_any_size(quantile: Callable) -> Callable:
    """``Tensor.quantile`` that also takes inputs over torch's 2**24-element limit (through
    NumPy's same linear interpolation). colbert-ai's indexer takes the residual quantiles
    of its held-out sample (5 % of the sampled tokens x dim values): at 384 dimensions
    SciFact's sample is over the limit and its build stops with "quantile() input tensor
    is too large"."""

    def wrapper(self, q, *args, **kw):
        try:
            return quantile(self, q, *args, **kw)
        except RuntimeError as exc:
            if "too large" not in str(exc) or args or kw:
                raise
            import torch

            qs = q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else q
            out = np.quantile(self.detach().cpu().numpy().reshape(-1), qs)
            return torch.as_tensor(out, dtype=self.dtype, device=self.device)

    return wrapper


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any):
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


def warm_colbert_extensions(log: Path | None = None) -> float:
    """Compile (first time only) and load colbert-ai's four C++ extensions, outside any
    timed section; returns the seconds it took."""
    t0 = time.perf_counter()
    with _quiet(log):
        from colbert.indexing.codecs.residual import ResidualCodec
        from colbert.modeling.colbert import ColBERT
        from colbert.search.index_storage import IndexScorer
        from colbert.search.strided_tensor import StridedTensor

        ColBERT.try_load_torch_extensions(False)
        ResidualCodec.try_load_torch_extensions(False)
        StridedTensor.try_load_torch_extensions(False)
        IndexScorer.try_load_torch_extensions(False)
    return time.perf_counter() - t0


def _colbert_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("colbert-ai")
    except PackageNotFoundError:  # pragma: no cover
        return "?"


# -- measurements ----------------------------------------------------------------------
def _interleaved(engines: Sequence[Any], n_queries: int, call: Callable[[Any, int, int], list],
                 *, ks: Sequence[int], threads: int, warmup: int, progress: bool, desc: str,
                 ) -> tuple[list[dict[str, dict[str, float]]], list[dict[int, dict]]]:
    """Per engine and k: p50/p95/mean ms of ``call(engine, qi, k)`` over every query,
    engines interleaved query by query (their order rotating) after ``warmup`` queries each,
    ``threads`` threads; also each engine's results per k (``{k: {qi: hits}}``)."""
    stats: list[dict[str, dict[str, float]]] = [{} for _ in engines]
    results: list[dict[int, dict]] = [{} for _ in engines]
    m = len(engines)
    with thread_limit(threads):
        for k in ks:
            for e in engines:
                for qi in range(min(warmup, n_queries)):
                    call(e, qi, k)
            lat: list[list[float]] = [[] for _ in engines]
            for e_i in range(m):
                results[e_i][k] = {}
            it = range(n_queries)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, desc=f"{desc} k={k} threads={threads}", leave=False)
            for qi in it:
                for j in range(m):
                    e_i = (qi + j) % m
                    t0 = time.perf_counter()
                    hits = call(engines[e_i], qi, k)
                    lat[e_i].append((time.perf_counter() - t0) * 1e3)
                    results[e_i][k][qi] = hits
            for e_i in range(m):
                stats[e_i][str(k)] = {
                    "p50_ms": float(np.percentile(lat[e_i], 50)),
                    "p95_ms": float(np.percentile(lat[e_i], 95)),
                    "mean_ms": float(np.mean(lat[e_i])),
                }
    return stats, results


def measure_latency(engines: Sequence[Any], n_queries: int, *, ks: Sequence[int] = KS,
                    threads: int = 1, warmup: int = 10, progress: bool = False,
                    ) -> tuple[list[dict[str, dict[str, float]]], list[dict[int, dict]]]:
    """Search only: per engine and k, p50/p95 ms of ``engine.search(qi, k)`` over every
    query, interleaved (:func:`_interleaved`); also each engine's results per k."""
    return _interleaved(engines, n_queries, lambda e, qi, k: e.search(qi, k), ks=ks,
                        threads=threads, warmup=warmup, progress=progress, desc="latency")


def measure_e2e(engines: Sequence[Any], texts: Sequence[str], encoders: dict[str, Any], *,
                ks: Sequence[int] = KS, threads: int = 1, warmup: int = 10,
                progress: bool = False,
                ) -> tuple[list[dict[str, dict[str, float]]], list[dict[int, dict]]]:
    """End to end, query text in, ranked ids out: per engine and k, p50/p95 ms of
    ``encoders[engine.query_precision].encode_queries([text])`` (tokenise + encode) followed
    by ``engine.search_encoded(vectors, k)``, every query, interleaved
    (:func:`_interleaved`). Engines that take vectors (PLAID, the peers) get the same
    encoder as ours. Also returns each engine's results per k."""

    def one(e: Any, qi: int, k: int) -> list:
        mv = encoders[getattr(e, "query_precision", "float32")].encode_queries(
            [texts[qi]], progress=False)
        return e.search_encoded(mv, k)

    return _interleaved(engines, len(texts), one, ks=ks, threads=threads, warmup=warmup,
                        progress=progress, desc="end-to-end")


def time_doc_encoding(checkpoint: str | None, data: str, split: str, *, n: int = 64,
                      seed: int = 0, threads: int | None = None) -> dict[str, Any] | None:
    """Encoder cost, measured once: seconds to encode ``n`` random documents of ``data``
    (extrapolated to the corpus) and p50 ms to encode one query (30 judged queries), with
    torch limited to ``threads`` (default: as configured)."""
    from retrieval_prune.data import load_beir
    from retrieval_prune.data.beir import resolve_dataset
    from retrieval_prune.encode import Encoder

    try:
        corpus = load_beir(resolve_dataset(data), split=split)
    except (FileNotFoundError, ValueError):
        return None
    enc = Encoder.load(checkpoint)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(corpus.doc_texts), size=min(n, len(corpus.doc_texts)), replace=False)
    texts = [corpus.doc_texts[i] for i in pick]
    _, qtexts = corpus.judged_queries()
    import torch

    with thread_limit(threads) if threads else contextlib.nullcontext():
        enc.encode_documents(texts[:2], progress=False)  # warm-up
        t0 = time.perf_counter()
        enc.encode_documents(texts, progress=False)
        s = time.perf_counter() - t0
        q_ms = []
        for t in qtexts[:30]:
            t1 = time.perf_counter()
            enc.encode_queries([t], progress=False)
            q_ms.append((time.perf_counter() - t1) * 1e3)
        n_threads = torch.get_num_threads()
    return {"sample_docs": len(texts), "sample_s": s, "torch_threads": n_threads,
            "n_docs": len(corpus.doc_texts),
            "corpus_s_est": s / len(texts) * len(corpus.doc_texts),
            "query_encode_ms_p50": float(np.median(q_ms)) if q_ms else None}


# -- the benchmark ---------------------------------------------------------------------
def _query_texts(data: str, split: str, max_docs: int | None, qids: Sequence[str]
                 ) -> list[str] | None:
    """The text of each of ``qids`` (a BEIR text collection), or None (an embedding set)."""
    from retrieval_prune.data.beir import resolve_dataset
    from retrieval_prune.data.embeddings import is_embedding_set

    p = Path(data)
    if p.is_dir() and is_embedding_set(p):
        return None
    folder = resolve_dataset(data)
    if is_embedding_set(folder):
        return None
    from retrieval_prune.data import load_beir

    corpus = load_beir(folder, split=split, max_docs=max_docs)
    jq, jt = corpus.judged_queries()
    by_id = dict(zip(jq, jt, strict=True))
    return [by_id[q] for q in qids]


def first_queries(ctx: Any, n: int) -> Any:
    """``ctx`` with only its first ``n`` judged queries (smoke runs)."""
    from retrieval_prune.evaluation.runner import DatasetContext

    if n >= len(ctx.qids):
        return ctx
    return DatasetContext(name=ctx.name, split=ctx.split, doc_ids=ctx.doc_ids, docs=ctx.docs,
                          qids=list(ctx.qids[:n]), queries=ctx.queries[0:n],
                          qrels={q: ctx.qrels[q] for q in ctx.qids[:n] if q in ctx.qrels},
                          encoder_settings=ctx.encoder_settings,
                          encoder_name=ctx.encoder_name, query_encode_ms=ctx.query_encode_ms)


def _e2e_encoders(checkpoint: str | None, fast: str | None, threads: int,
                  say: Callable[[str], None]) -> tuple[dict[str, Any], str | None]:
    """Query encoders for the end-to-end pass, one thread each: float32 (what the index
    vectors come from) and, when asked, the fast one (``int8-onnx``)."""
    from retrieval_prune.encode import Encoder

    encs = {"float32": Encoder.load(checkpoint, num_threads=threads)}
    err = None
    if fast and fast != "float32":
        try:
            encs[fast] = Encoder.load(checkpoint, precision=fast, num_threads=threads)
        except (ImportError, ValueError, RuntimeError) as exc:
            err = f"{type(exc).__name__}: {exc}"
            say(f"fast query encoder {fast!r} unavailable, its row is skipped: {err}")
    return encs, err


def run(
    data: str | Any,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    pipelines: Sequence[str] = DEFAULT_PIPELINES,
    nbits: Sequence[int] = DEFAULT_NBITS,
    threads: Sequence[int] = (1,),
    scratch: str | Path = ".cache/plaid",
    warmup: int = 10,
    encode_sample: int = 64,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    peers: Sequence[str] = (),
    peers_python: str | Path | None = None,
    peer_nbits: Sequence[int] = (2, 4),
    max_docs: int | None = None,
    max_queries: int | None = None,
    e2e: bool = True,
    fast_encoder: str | None = "int8-onnx",
    query_texts: Sequence[str] | None = None,
    encoders: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns ``{"rows": [...], "meta": {...}}``.

    ``data`` is a dataset name/folder (loaded with ``load_context``) or a ready
    ``DatasetContext`` (tests; give ``query_texts`` and ``encoders`` — precision to an
    object with ``encode_queries([text])`` — for the end-to-end pass). ``nbits=()`` skips
    PLAID (colbert-ai not needed); ``peers`` adds the Rust peers (see
    :mod:`~retrieval_prune.evaluation.peers`), run by ``peers_python``. ``max_docs`` /
    ``max_queries`` cut the dataset for smoke runs only (``load_beir``'s subset: the first
    documents plus every judged one; the first judged queries). ``e2e``: the end-to-end
    pass (query text in, ranked ids out), for text collections; ``fast_encoder`` adds our
    first pipeline searched with that encoder precision as its own row (None: not).
    """
    from retrieval_prune.evaluation.peers import DEFAULT_PEERS_PYTHON, PeerEngine, peer_configs
    from retrieval_prune.evaluation.runner import DatasetContext, load_context

    say = log or (lambda s: print(s, file=sys.stderr))
    if nbits:
        require_colbert()  # fail before any work
    peer_cfgs = peer_configs(peers, peer_nbits) if peers else []
    scratch = Path(scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    plaid_log = scratch / "colbert.log"
    if plaid_log.exists():
        plaid_log.unlink()
    t_start = time.perf_counter()
    texts = list(query_texts) if query_texts is not None else None
    if isinstance(data, DatasetContext):
        ctx = data
        encode_info = None
    else:
        from retrieval_prune.encode import Encoder

        ctx = load_context(data, lambda: Encoder.load(checkpoint), split=split,
                           max_docs=max_docs)
        if max_queries:
            ctx = first_queries(ctx, max_queries)
        say(f"{ctx.name}: {len(ctx.doc_ids)} docs, {ctx.docs.n_tokens} vectors, "
            f"{len(ctx.qids)} queries; exact nDCG@10 {ctx.exact_metrics['ndcg@10']:.4f}")
        encode_info = (time_doc_encoding(checkpoint, data, split, n=encode_sample,
                                         threads=threads[0]) if encode_sample else None)
        if e2e:
            texts = _query_texts(data, split, max_docs, ctx.qids)
    if max_queries and isinstance(data, DatasetContext):
        ctx = first_queries(ctx, max_queries)
    if texts is not None:
        texts = texts[: len(ctx.qids)]
    fast_err = None
    if not e2e or texts is None:
        encoders = None
    elif encoders is None:
        encoders, fast_err = _e2e_encoders(checkpoint, fast_encoder, threads[0], say)
    ext_s = None
    if nbits:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        ext_s = warm_colbert_extensions(plaid_log)
        say(f"colbert-ai C++ extensions loaded in {ext_s:.0f} s (not in build_s)")
    engines: list[Any] = []
    for spec in pipelines:
        say(f"retrieval_prune: build + quality pass: {spec}")
        e = OurEngine(ctx, spec, scratch / "ours" / f"p{len(engines)}", checkpoint=checkpoint,
                      progress=False)
        e.close()
        say(f"  nDCG@10 {e.row['ndcg@10']:.4f}, {e.row['bytes_per_doc']:,.0f} B/doc, "
            f"build {e.row['build_s']:.1f} s")
        engines.append(e)
    if engines and encoders and fast_encoder in encoders and fast_encoder != "float32":
        say(f"retrieval_prune: {pipelines[0]} with the {fast_encoder} query encoder")
        with thread_limit(threads[0]):
            e = OurFastQueryEngine(engines[0], encoders[fast_encoder], texts)
        say(f"  nDCG@10 {e.row['ndcg@10']:.4f}")
        engines.append(e)
    for nb in nbits:
        say(f"PLAID: build + quality pass: nbits={nb} (colbert-ai log: {plaid_log})")
        try:
            e = PlaidEngine(ctx, nb, scratch, checkpoint=checkpoint, log=plaid_log)
        except Exception as exc:  # colbert-ai's own failure: this row's error, not the run's
            e = FailedEngine("plaid", f"plaid:nbits={nb}", ctx, checkpoint,
                             f"{type(exc).__name__}: {exc} (colbert-ai log: {plaid_log})",
                             nbits=nb)
            say(f"  error: {e.failed}")
            engines.append(e)
            continue
        e.close()
        say(f"  nDCG@10 {e.row['ndcg@10']:.4f}, {e.row['bytes_per_doc']:,.0f} B/doc, "
            f"build {e.row['build_s']:.1f} s")
        engines.append(e)
    for cfg in peer_cfgs:
        say(f"{cfg['peer']}: build + quality pass: {cfg['kind']} "
            f"(settings {cfg['settings']})")
        e = PeerEngine(ctx, cfg["peer"], cfg["settings"], scratch,
                       python=peers_python or DEFAULT_PEERS_PYTHON, checkpoint=checkpoint,
                       kind=cfg["kind"], nbits=cfg["nbits"])
        if e.failed:
            say(f"  error: {e.failed}")
        else:
            say(f"  nDCG@10 {e.row['ndcg@10']:.4f}, {e.row['bytes_per_doc']:,.0f} B/doc, "
                f"build {e.row['build_s']:.1f} s")
        engines.append(e)
    # latency: every engine open at once, interleaved query by query
    for e in engines:
        if isinstance(e, PlaidEngine):
            with _quiet(plaid_log):
                e.open()
        else:
            e.open()
    live = [e for e in engines if not getattr(e, "failed", None)]
    n_q = len(ctx.qids)
    by_threads: dict[str, dict[int, Any]] = {}
    for t in threads:
        say(f"latency: {len(live)} engines x {n_q} queries x k={list(KS)}, {t} thread(s)")
        stats, results = measure_latency(live, n_q, threads=t, warmup=warmup,
                                         progress=progress)
        by_threads[str(t)] = {id(e): st for e, st in zip(live, stats, strict=True)}
        for e, res in zip(live, results, strict=True):
            if t == threads[0] and isinstance(e, PeerEngine):
                e.row.update(e.worker_stats(n_q))
            if getattr(e, "failed", None):
                continue
            # the k=100 results of the latency pass must score like the quality pass's
            run100 = {ctx.qids[qi]: dict(h) for qi, h in res[100].items()}
            same = abs(run_quality(ctx, run100)["ndcg@10"] - e.row["ndcg@10"]) < 1e-9
            e.row.setdefault("latency_pass_matches_quality_pass", bool(same))
    e2e_stats: dict[int, Any] = {}
    if encoders:
        live = [e for e in live if not getattr(e, "failed", None)]
        say(f"end to end: {len(live)} engines x {n_q} queries x k={list(KS)}, "
            f"{threads[0]} thread(s), encoders {sorted(encoders)}")
        stats, results = measure_e2e(live, texts, encoders, threads=threads[0], warmup=warmup,
                                     progress=progress)
        for e, st, res in zip(live, stats, results, strict=True):
            run100 = {ctx.qids[qi]: dict(h) for qi, h in res[100].items()}
            e2e_stats[id(e)] = (st, run_quality(ctx, run100)["ndcg@10"])
    for e in engines:
        if isinstance(e, PeerEngine) and not e.failed:
            ping = e.ping_ms(200)
            if ping:
                e.row["pipe_ping_ms_p50"] = float(np.percentile(ping, 50))
                e.row["pipe_ping_ms_p95"] = float(np.percentile(ping, 95))
    rows = []
    for e in engines:
        row = e.row
        if isinstance(e, PlaidEngine):
            row["plaid_search_settings"] = e.search_settings()  # as set by dense_search
        row["threads"] = int(threads[0])
        failed = getattr(e, "failed", None)
        row["latency"] = ({t: by_threads[t][id(e)] for t in by_threads}
                          if not failed and all(id(e) in v for v in by_threads.values())
                          else None)
        first = by_threads[str(threads[0])].get(id(e)) if not failed else None
        for k in KS:
            row[f"p50_ms_k{k}"] = first[str(k)]["p50_ms"] if first else None
            row[f"p95_ms_k{k}"] = first[str(k)]["p95_ms"] if first else None
            e2 = e2e_stats.get(id(e)) if not failed else None
            row[f"e2e_p50_ms_k{k}"] = e2[0][str(k)]["p50_ms"] if e2 else None
            row[f"e2e_p95_ms_k{k}"] = e2[0][str(k)]["p95_ms"] if e2 else None
        e2 = e2e_stats.get(id(e)) if not failed else None
        row["e2e_ndcg@10"] = e2[1] if e2 else None
        # the eval shape's p50/p95 are k=100 searches (as the runner's); from the
        # controlled, interleaved pass (the build-time pass ran unrestricted)
        row["p50_ms"], row["p95_ms"] = row["p50_ms_k100"], row["p95_ms_k100"]
        enc_s = encode_info["corpus_s_est"] if encode_info else None
        row["encode_docs_s_est"] = enc_s
        if encode_info and encode_info.get("query_encode_ms_p50") is not None:
            # measured with the latency pass's thread limit (the runner's figure, taken
            # with unrestricted threads, stays in meta as query_encode_ms_runner)
            row["query_encode_ms"] = encode_info["query_encode_ms_p50"]
        build_s = row.get("build_s")
        row["build_s_with_encoding"] = (build_s + enc_s if enc_s is not None
                                        and build_s is not None else None)
        row.setdefault("encoder_precision", "float32")
        row.setdefault("error", None)
        if row.get("engine") == "retrieval_prune":
            row.setdefault("nbits", row.get("nbits"))
        rows.append(row)
        e.close()
    meta = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "threads": list(threads),
        "warmup_queries": warmup,
        "doc_encoding": encode_info,
        "query_encode_ms": (encode_info or {}).get("query_encode_ms_p50", ctx.query_encode_ms),
        "query_encode_ms_runner": ctx.query_encode_ms,
        "exact_ndcg@10": ctx.exact_metrics["ndcg@10"],
        "n_vectors": int(ctx.docs.n_tokens),
        "colbert_ai": _colbert_version() if nbits else None,
        "colbert_extensions_load_s": ext_s,
        "max_docs": max_docs,
        "max_queries": max_queries,
        "e2e": bool(encoders),
        "e2e_encoders": {p: getattr(enc, "name", str(enc)) for p, enc in
                         (encoders or {}).items()},
        "fast_encoder": fast_encoder if encoders and fast_encoder in encoders else None,
        "fast_encoder_error": fast_err,
        "peers": list(peers),
        "peers_python": str(peers_python or DEFAULT_PEERS_PYTHON) if peers else None,
        "seconds": time.perf_counter() - t_start,
    }
    return {"rows": rows, "meta": meta, "summary": summarize(rows)}


def summarize(rows: Sequence[dict[str, Any]], *, ref_nbits: int = 2,
              tol: float = NDCG_TOL) -> dict[str, Any]:
    """Ratios of our rows to PLAID ``nbits=ref_nbits`` for rows within ``tol`` nDCG@10 or
    better: size (PLAID bytes / ours) and speed (PLAID p50 / ours) at k=10 and k=100;
    the acceptance target is >= 2x smaller and >= 3x faster."""
    ref = next((r for r in rows if r.get("engine") == "plaid" and r.get("nbits") == ref_nbits
                and not r.get("error")), None)
    if ref is None:
        return {"reference": None, "rows": []}
    out = []
    for r in rows:
        if r.get("engine") != "retrieval_prune":
            continue
        size = ref["bytes_per_doc"] / r["bytes_per_doc"]
        s10 = ref["p50_ms_k10"] / r["p50_ms_k10"]
        s100 = ref["p50_ms_k100"] / r["p50_ms_k100"]
        eligible = r["ndcg@10"] >= ref["ndcg@10"] - tol
        e2e = {}
        for k in KS:
            a, b = ref.get(f"e2e_p50_ms_k{k}"), r.get(f"e2e_p50_ms_k{k}")
            e2e[f"e2e_speed_ratio_k{k}"] = a / b if a and b else None
        out.append({
            "pipeline": r["pipeline"],
            "encoder_precision": r.get("encoder_precision", "float32"),
            **e2e,
            "ndcg@10": r["ndcg@10"],
            "delta_vs_plaid": r["ndcg@10"] - ref["ndcg@10"],
            "quality_ok": bool(eligible),
            "size_ratio": size,
            "speed_ratio_k10": s10,
            "speed_ratio_k100": s100,
            "meets_target_k10": bool(eligible and size >= 2 and s10 >= 3),
            "meets_target_k100": bool(eligible and size >= 2 and s100 >= 3),
        })
    return {"reference": f"plaid:nbits={ref_nbits}", "tolerance": tol,
            "reference_ndcg@10": ref["ndcg@10"], "rows": out}


def _md(text: str) -> str:
    """Escape a pipeline spec for a Markdown table cell."""
    return text.replace("|", "\\|")


def _md_columns() -> list[tuple[str, str, str]]:
    """The eval table's quality and size columns, framed by engine, build and latency ones."""
    from retrieval_prune.evaluation.report import EVAL_COLUMNS

    shared = EVAL_COLUMNS[1 : [c[0] for c in EVAL_COLUMNS].index("build_s") + 1]
    return [("engine", "engine", "{}"), shared[0], ("encoder_precision", "queries", "{}"),
            *shared[1:],
            ("build_s_with_encoding", "build s +enc", "{:.0f}"),
            ("p50_ms_k10", "p50 k10", "{:.2f}"), ("p95_ms_k10", "p95 k10", "{:.2f}"),
            ("p50_ms_k100", "p50 k100", "{:.2f}"), ("p95_ms_k100", "p95 k100", "{:.2f}"),
            ("e2e_p50_ms_k10", "e2e p50 k10", "{:.2f}"),
            ("e2e_p95_ms_k10", "e2e p95 k10", "{:.2f}"),
            ("e2e_p50_ms_k100", "e2e p50 k100", "{:.2f}"),
            ("e2e_p95_ms_k100", "e2e p95 k100", "{:.2f}"),
            ("e2e_ndcg@10", "e2e nDCG@10", "{:.4f}"),
            ("peak_rss_mb", "peak MiB", "{:,.0f}")]


def format_markdown(result: dict[str, Any], command: str | None = None) -> str:
    """The twin Markdown report: table, latency at every thread count, ratios, command."""
    from retrieval_prune.evaluation.report import format_table

    rows, meta, summ = result["rows"], result["meta"], result["summary"]
    lines = []
    ds = rows[0]["dataset"] if rows else "?"
    peers = meta.get("peers") or []
    title = "colbert-ai PLAID" if not peers else "PLAID and " + ", ".join(peers)
    lines.append(f"# retrieval_prune vs {title} — {ds}\n")
    if command:
        lines.append(f"Command:\n\n```\n{command}\n```\n")
    n_q = rows[0]["n_queries"] if rows else 0
    cut = ""
    if meta.get("max_docs") or meta.get("max_queries"):
        cut = (f" **Smoke run on a cut of the dataset** (max_docs={meta.get('max_docs')}, "
               f"max_queries={meta.get('max_queries')}): not comparable with full runs.")
    e2e = ""
    if meta.get("e2e"):
        e2e = (" `e2e` columns: query text in, ranked ids out — tokenise and encode the "
               "query alone with our encoder (the one that made the index vectors, "
               f"{meta['threads'][0]} thread; every engine gets the same encoder, so "
               "engines that take vectors pay the same encoding), then that engine's "
               "search; interleaved query by query as well; `e2e nDCG@10` scores those "
               "results (k=100). The `queries` column names the encoder precision: "
               "`int8-onnx` rows search the same index with int8 ONNX query vectors.")
    lines.append(
        f"{rows[0]['n_docs'] if rows else 0} documents ({meta['n_vectors']:,} vectors), "
        f"{n_q} queries, encoder `{rows[0]['encoder'] if rows else ''}` "
        f"(checkpoint `{rows[0]['checkpoint'] if rows else ''}`); exact MaxSim nDCG@10 "
        f"{meta['exact_ndcg@10']:.4f}.{cut} All engines index the same cached document "
        f"vectors and search with the same query vectors. Latency: one query at a time, "
        f"{meta['threads'][0]} thread(s) (torch, Numba, BLAS, OpenMP; the peers' workers "
        f"always one), engines interleaved query by query in one process after "
        f"{meta['warmup_queries']} warm-up queries; search-only columns exclude query "
        f"encoding.{e2e} `p50_ms`/`p95_ms` in the JSON are the k=100 search-only "
        f"columns.\n")
    lines.append(format_table([{**r, "pipeline": _md(r["pipeline"])} for r in rows], _md_columns()))
    lines.append("")
    if len(meta["threads"]) > 1:
        lines.append("Latency (p50 / p95 ms) at every thread count:\n")
        head = "| engine | pipeline | " + " | ".join(
            f"k={k}, {t} thr" for t in meta["threads"] for k in KS) + " |"
        lines.append(head)
        lines.append("|---|---|" + "---:|" * (len(meta["threads"]) * len(KS)))
        for r in rows:
            if not r.get("latency"):
                continue
            cells = [f"{r['latency'][str(t)][str(k)]['p50_ms']:.2f} / "
                     f"{r['latency'][str(t)][str(k)]['p95_ms']:.2f}"
                     for t in meta["threads"] for k in KS]
            lines.append(f"| {r['engine']} | {_md(r['pipeline'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if summ.get("reference"):
        lines.append(f"Against {summ['reference']} (nDCG@10 {summ['reference_ndcg@10']:.4f}); "
                     f"quality ok = nDCG@10 at least theirs − {summ['tolerance']}; target: "
                     f"≥ 2x smaller and ≥ 3x faster at p50:\n")
        lines.append("| pipeline | nDCG@10 | Δ vs PLAID | quality ok | x smaller | "
                     "x faster k=10 | x faster k=100 | target k=10 | target k=100 | "
                     "x faster e2e k=10 | x faster e2e k=100 |")
        lines.append("|---|---:|---:|---|---:|---:|---:|---|---|---:|---:|")
        for s in summ["rows"]:
            prec = s.get("encoder_precision", "float32")
            label = _md(s["pipeline"]) + ("" if prec == "float32" else f" ({prec} queries)")
            e2e_cells = " | ".join("" if s.get(f"e2e_speed_ratio_k{k}") is None
                                   else f"{s[f'e2e_speed_ratio_k{k}']:.2f}" for k in KS)
            lines.append(
                f"| {label} | {s['ndcg@10']:.4f} | {s['delta_vs_plaid']:+.4f} | "
                f"{'yes' if s['quality_ok'] else 'no'} | {s['size_ratio']:.2f} | "
                f"{s['speed_ratio_k10']:.2f} | {s['speed_ratio_k100']:.2f} | "
                f"{'met' if s['meets_target_k10'] else 'missed'} | "
                f"{'met' if s['meets_target_k100'] else 'missed'} | {e2e_cells} |")
        lines.append("")
    enc = meta.get("doc_encoding")
    if enc:
        lines.append(
            f"Encoder cost (once, not in any latency or `build_s`): query encoding p50 "
            f"{meta['query_encode_ms']:.1f} ms (30 queries, one at a time); document "
            f"encoding {enc['sample_s']:.1f} s for "
            f"{enc['sample_docs']} random documents at {enc['torch_threads']} torch threads, "
            f"extrapolated to {enc['corpus_s_est']:.0f} s for all {enc['n_docs']} "
            f"(`build_s_with_encoding` = `build_s` + that estimate).\n")
    for r in rows:
        if r.get("engine") in ("retrieval_prune", "plaid") and r.get("error"):
            lines.append(f"**{r['engine']} `{_md(r['pipeline'])}` failed**: "
                         f"{_md(str(r['error']))[:500]}\n")
    plaid = [r for r in rows if r.get("engine") == "plaid" and not r.get("error")]
    if plaid:
        st = plaid[0].get("plaid_search_settings", {})
        lines.append(
            f"PLAID: colbert-ai {meta.get('colbert_ai')}, its own indexer (sampling, "
            f"k-means with {plaid[0].get('num_partitions')} partitions by its rule, residual "
            f"codec, IVF) fed our vectors through a shim checkpoint; searched with "
            f"`Searcher.dense_search` and its defaults: "
            + "; ".join(f"k={k}: ncells={v['ncells']}, centroid_score_threshold="
                        f"{v['centroid_score_threshold']}, ndocs={v['ndocs']}"
                        for k, v in st.items())
            + ". Bytes/doc: every file of its index folder.\n")
    peer_rows = [r for r in rows if r.get("engine") not in ("retrieval_prune", "plaid")]
    if peer_rows:
        lines.append(_peers_markdown(peer_rows, meta))
    return "\n".join(lines) + "\n"


def _peers_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The peers' own paragraph: versions, settings, the worker's clock, the pipe's cost."""
    out = [
        f"Peers: each in a worker process of `{meta.get('peers_python')}` "
        "(`retrieval_prune/evaluation/peer_worker.py`; its own environment, torch 2.11, "
        "made by `make peers`), fed the same document vectors (built with every CPU) and "
        "searched in a one-thread worker (OpenMP, MKL, Rayon, torch limited to 1) over a "
        "pipe (JSON header + raw `.npy` bytes). Their latency columns are the client's "
        "wall time of the whole round trip; `worker` is the worker's own clock around the "
        "search call, `pipe` the p50 of round trip minus worker time, `ping` the p50 "
        "round trip of a no-op request. Bytes/doc: every file of the index folder.\n",
        "| engine | pipeline | settings | version | partitions | worker p50 k10 | "
        "worker p50 k100 | pipe p50 k10 | pipe p50 k100 | ping p50 | search settings | "
        "error |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]

    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "" if v is None else fmt.format(v)

    for r in rows:
        ss = r.get("peer_search_settings") or {}
        sset = "; ".join(f"k={k}: " + ", ".join(f"{a}={b}" for a, b in v.items())
                         for k, v in ss.items()) or "its defaults"
        cfg = r.get("peer_settings") or {}
        given = ", ".join(f"{a}={b}" for part in ("create", "search")
                          for a, b in (cfg.get(part) or {}).items())
        err = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:300]
        out.append(
            f"| {r['engine']} | {_md(r['pipeline'])} | {r.get('peer_settings_kind', '')}"
            f"{' (' + given + ')' if given else ''} | {r.get('peer_version') or ''} | "
            f"{f(r.get('num_partitions'), '{}')} | {f(r.get('worker_p50_ms_k10'), '{:.2f}')} | "
            f"{f(r.get('worker_p50_ms_k100'), '{:.2f}')} | "
            f"{f(r.get('pipe_overhead_ms_p50_k10'))} | {f(r.get('pipe_overhead_ms_p50_k100'))} | "
            f"{f(r.get('pipe_ping_ms_p50'))} | {sset} | {err} |")
    return "\n".join(out) + "\n"


# -- command line ----------------------------------------------------------------------
def add_arguments(p: Any, *, with_data: bool = True) -> None:
    """Options of ``retrieval-prune bench plaid`` (and ``scripts/bench_vs_plaid.py``)."""
    if with_data:
        p.add_argument("--data", metavar="NAME", help="dataset name or folder (e.g. scifact)")
        p.add_argument("--checkpoint", default=None, metavar="CKPT",
                       help="checkpoint folder whose cached vectors both engines index")
        p.add_argument("--split", default="test")
        p.add_argument("--json", metavar="PATH", help="write {rows, meta, summary} as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the Markdown twin report")
    p.add_argument("--pipeline", action="append", metavar="SPEC",
                   help="our pipeline spec (repeatable; default: the five of DEFAULT_PIPELINES)")
    p.add_argument("--nbits", type=int, nargs="*", default=None, choices=[1, 2, 4],
                   help="PLAID nbits (default 1 2 4; none: our engine only)")
    p.add_argument("--scratch", default=".cache/plaid", metavar="DIR",
                   help="folder for both engines' indexes (default .cache/plaid)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up queries per engine and k")
    p.add_argument("--encode-sample", type=int, default=64,
                   help="documents encoded to estimate corpus encoding time (0: skip)")
    p.add_argument("--max-docs", type=int, default=None, metavar="N",
                   help="smoke runs only: the first N documents plus every judged one")
    p.add_argument("--max-queries", type=int, default=None, metavar="N",
                   help="smoke runs only: the first N judged queries")
    p.add_argument("--no-e2e", action="store_true",
                   help="skip the end-to-end pass (query text in, ranked ids out)")
    p.add_argument("--fast-encoder", default="int8-onnx", metavar="PRECISION",
                   help="query encoder precision of the extra row of our first pipeline "
                        "(default int8-onnx; 'none': no such row)")
    from retrieval_prune.evaluation.peers import DEFAULT_PEERS, DEFAULT_PEERS_PYTHON

    p.add_argument("--peers", nargs="*", default=None, choices=[*DEFAULT_PEERS, "exact"],
                   help="bench peers: the Rust peers to add (default: "
                        f"{' '.join(DEFAULT_PEERS)}; 'exact' = numpy MaxSim in a worker)")
    p.add_argument("--peers-python", default=DEFAULT_PEERS_PYTHON, metavar="PATH",
                   help="bench peers: the python of the peers' environment (make peers; "
                        f"default {DEFAULT_PEERS_PYTHON})")
    p.add_argument("--peer-nbits", type=int, nargs="*", default=[2, 4], choices=[1, 2, 4],
                   help="bench peers: nbits of the rows matched to ours, besides each peer's "
                        "defaults (default 2 4; 4 is both peers' default)")


def run_from_args(args: Any, command: str, *, threads: Sequence[int],
                  with_peers: bool = False) -> int:
    """Run from parsed options; print the table; write ``--json`` / ``--markdown``.
    ``with_peers`` (``bench peers``): add the Rust peers (``--peers``)."""
    import json

    from retrieval_prune.evaluation.peers import DEFAULT_PEERS

    what = "peers" if with_peers else "plaid"
    if not args.data:
        raise ValueError(f"bench {what} needs --data NAME (e.g. --data scifact)")
    nbits = DEFAULT_NBITS if args.nbits is None else tuple(args.nbits)
    if nbits:
        require_colbert()
    peers: tuple[str, ...] = ()
    if with_peers:
        peers = DEFAULT_PEERS if args.peers is None else tuple(args.peers)
    elif args.peers:
        raise ValueError("--peers belongs to 'bench peers' (bench plaid runs PLAID only)")
    fast = None if str(args.fast_encoder).lower() == "none" else args.fast_encoder
    result = run(args.data, checkpoint=args.checkpoint, split=args.split,
                 pipelines=tuple(args.pipeline or DEFAULT_PIPELINES), nbits=nbits,
                 threads=tuple(threads), scratch=args.scratch, warmup=args.warmup,
                 encode_sample=args.encode_sample, progress=not getattr(args, "quiet", False),
                 peers=peers, peers_python=args.peers_python, peer_nbits=tuple(args.peer_nbits),
                 max_docs=args.max_docs, max_queries=args.max_queries, e2e=not args.no_e2e,
                 fast_encoder=fast)
    result["meta"]["command"] = command
    md = format_markdown(result, command)
    print(md)
    if args.json:
        p = Path(args.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=1, default=_json_default) + "\n", encoding="utf-8")
    if args.markdown:
        p = Path(args.markdown)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(md, encoding="utf-8")
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
