"""``retrieval-prune tune``: find the index pipeline for a budget without relevance judgements.

The loss of a compressed index is estimated as its disagreement with exact (uncompressed)
MaxSim of the same encoder on a sample of queries, so no judgement is read and the search
works on a user's own corpus:

- **pseudo-judgements**: the exact run's top 100 documents of each query are graded
  ``round(1000 / rank**1.6)`` (rank 1 -> 1000, 2 -> 330, 3 -> 172, ... at least 1), a graded
  reference whose ideal ranking is the exact one; a pipeline's pseudo-nDCG@10 is 1.0 when
  it returns exact MaxSim's top 10 in order, and ``est_loss = 1 - pseudo-nDCG@10``. The
  grades follow the chance that exact MaxSim's rank-r document is relevant, which falls as
  r^-1.65 (the shipped ft128) and r^-1.68 (zero-shot) on SciFact's **train** split (ranks
  1-30; 0.60-0.66 at rank 1, 0.13 at rank 2; ``scripts/tune_check.py --prior
  scifact:train``, eval/results/tune_check.md); if relevance followed them exactly, the
  expected relative nDCG@10 loss on real judgements would be ``est_loss``. Losing exact
  top-1 costs most, a swap far down the list little. ``eval`` on real qrels checks the
  answer.
- **queries**: ``corpus`` (the default) samples pseudo-queries from the documents (a window
  of 8-16 consecutive words of a random document, as the Inverse Cloze Task does), which
  needs nothing but the corpus; ``log`` takes the collection's own query texts (a query log;
  their judgements are never read). An embedding set (precomputed vectors) has no text: its
  query vectors are the log.
- **search**: successive halving over a built-in grid (vector count x bits x search, see
  :func:`default_candidates`) or the candidates given. Rung ``r`` builds every surviving
  candidate over a nested random sample of ``n / eta**(R - r)`` documents (the last rung is
  the whole corpus), ranks them by the budget (within the budget first, then the
  objective) and keeps the best ``1/eta`` plus the lowest-loss candidate (so an answer
  within the loss budget always reaches the last rung). Exact MaxSim is recomputed on each
  sample, so every rung measures agreement on its own documents.
- **objective**: with ``max_loss`` the smallest index (bytes per document) within every
  budget; otherwise the lowest estimated loss within the byte / latency budgets. If no
  candidate fits, the lowest-loss one is chosen and ``feasible`` is false.

Example
-------
    retrieval-prune tune --data med --max-loss 0.01 --json tune_med.json
    retrieval-prune eval --data med --pipeline "$(jq -r .chosen tune_med.json)"
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retrieval_prune.pipeline import make_pipeline
from retrieval_prune.types import MultiVectors

__all__ = ["tune", "TuneResult", "default_candidates", "pseudo_queries", "pseudo_qrels",
           "QUERY_SOURCES"]

#: where the sample queries come from (see the module docstring)
QUERY_SOURCES = ("corpus", "log")
_RESIDUAL = "residual:nbits={b},normalize=true,k_scale=2,centroid_bits=8"


def default_candidates(dim: int) -> list[str]:
    """The built-in grid for a ``dim``-dimensional encoder: fewer vectors (none, Ward pooling
    by 2/3/4) x fewer bits (float16, residual codes of 4/2/1 bits with staged IVF search,
    sign bits, PCA to ``dim/2`` then sign bits), plus exact MaxSim."""
    tokens = ["", "pool:factor=2 | ", "pool:factor=3 | ", "pool:factor=4 | "]
    codecs = ["fp16", *(_RESIDUAL.format(b=b) + " | ivf" for b in (4, 2, 1)), "binary:sign"]
    if dim >= 32:
        codecs.append(f"pca:dim={dim // 2} | binary:sign")
    return ["exact"] + [t + c for t in tokens for c in codecs]


def pseudo_queries(texts: Sequence[str], n: int, seed: int = 0, min_words: int = 8,
                   max_words: int = 16) -> tuple[list[int], list[str]]:
    """``n`` pseudo-queries: windows of ``min_words``..``max_words`` consecutive words of
    random documents with at least ``min_words`` words. Returns (source document indices,
    query texts); deterministic for a seed.

    >>> pseudo_queries(["a b c d e f g h i j", "short"], 2, min_words=4, max_words=4)[0]
    [0, 0]
    """
    rng = np.random.default_rng(seed)
    words = [t.split() for t in texts]
    usable = np.array([i for i, w in enumerate(words) if len(w) >= min_words], dtype=np.int64)
    if usable.size == 0:
        raise ValueError(f"no document has {min_words} words or more; pseudo-queries need "
                         "text: pass --queries log (the collection's own queries)")
    src, out = [], []
    for i in rng.choice(usable, size=n, replace=usable.size < n):
        w = words[int(i)]
        length = int(rng.integers(min_words, min(max_words, len(w)) + 1))
        start = int(rng.integers(0, len(w) - length + 1))
        src.append(int(i))
        out.append(" ".join(w[start : start + length]))
    return src, out


#: pseudo-judgement grade of exact rank r: round(GRADE_SCALE / r**GRADE_POWER), at least 1
GRADE_SCALE, GRADE_POWER = 1000, 1.6


def pseudo_qrels(exact_run: dict[str, dict[str, float]], depth: int = 100,
                 scale: float = GRADE_SCALE, power: float = GRADE_POWER
                 ) -> dict[str, dict[str, int]]:
    """Graded pseudo-judgements from an exact run: rank r (1-based, r <= depth) gets
    ``max(1, round(scale / r**power))``.

    >>> pseudo_qrels({"q": {"a": 0.9, "b": 0.8, "c": 0.1}}, depth=2)
    {'q': {'a': 1000, 'b': 330}}
    """
    out = {}
    for q, docs in exact_run.items():
        ranked = sorted(docs.items(), key=lambda x: -x[1])[:depth]
        out[q] = {d: max(1, round(scale / r**power))
                  for r, (d, _) in enumerate(ranked, start=1)}
    return {q: g for q, g in out.items() if g}


@dataclass
class TuneResult:
    """What :func:`tune` found: ``chosen`` spec, whether it is ``feasible``, the Pareto
    ``frontier`` of the last rung (bytes per document vs estimated loss) and every
    evaluation in ``tried`` (``rung``, ``n_docs`` say on how many documents)."""

    chosen: str
    feasible: bool
    frontier: list[dict[str, Any]]
    tried: list[dict[str, Any]]
    budget: dict[str, float | None]
    dataset: str
    queries: str
    n_queries: int
    n_docs: int
    seconds: float
    encoder: str
    rungs: list[int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_budget(max_bytes_per_doc, max_ms, max_loss) -> None:
    if max_bytes_per_doc is None and max_ms is None and max_loss is None:
        raise ValueError("give a budget: --max-loss L (relative nDCG@10 loss, e.g. 0.01), "
                         "--max-bytes-per-doc B or --max-ms M")
    for name, v in (("max_bytes_per_doc", max_bytes_per_doc), ("max_ms", max_ms)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name}={v!r} must be a positive number")
    if max_loss is not None and not (math.isfinite(max_loss) and 0 <= max_loss < 1):
        raise ValueError(f"max_loss={max_loss!r} is a relative loss: give 0 <= L < 1 "
                         "(0.01 is 1%)")


def _inputs(data: str, checkpoint: str | None, queries: str, n_queries: int, seed: int,
            progress: bool) -> dict[str, Any]:
    """Document vectors (embedding cache) and the sample queries' vectors of ``data``."""
    from retrieval_prune.data.beir import load_beir, resolve_dataset
    from retrieval_prune.data.embeddings import is_embedding_set, load_embedding_set

    p = Path(data)
    folder = p if p.is_dir() or p.is_file() else resolve_dataset(data)
    rng = np.random.default_rng(seed)
    if folder.is_dir() and is_embedding_set(folder):
        if queries != "log":
            raise ValueError(f"{data} is an embedding set (vectors, no text): pseudo-queries "
                             "need text; pass --queries log to use its query vectors")
        es = load_embedding_set(folder)
        pick = np.sort(rng.choice(len(es.queries), size=min(n_queries, len(es.queries)),
                                  replace=False))
        return {"name": es.name, "doc_ids": es.doc_ids, "docs": es.docs,
                "queries": es.queries[pick], "qids": [es.query_ids[i] for i in pick],
                "settings": es.settings, "encoder": es.encoder}
    from retrieval_prune.encode import Encoder
    from retrieval_prune.encode.cache import EmbeddingCache, cache_root

    corpus = load_beir(folder, require_judgements=False)
    if queries == "log":
        texts = [t for t in corpus.queries.values() if t.strip()]
        if not texts:
            raise ValueError(f"{data} has no queries.jsonl (or it is empty): use --queries "
                             "corpus (pseudo-queries from the documents)")
        pick = np.sort(rng.choice(len(texts), size=min(n_queries, len(texts)), replace=False))
        qtexts = [texts[i] for i in pick]
    else:
        _, qtexts = pseudo_queries(corpus.doc_texts, n_queries, seed=seed)
    enc = Encoder.load(checkpoint)
    docs = EmbeddingCache(cache_root() / "embeddings").get_or_encode(
        enc, corpus.name, corpus.doc_ids, corpus.doc_texts, kind="docs", progress=progress)
    return {"name": corpus.name, "doc_ids": corpus.doc_ids, "docs": docs,
            "queries": enc.encode_queries(qtexts), "qids": [f"tq{i}" for i in range(len(qtexts))],
            "settings": enc.settings, "encoder": enc.name}


def _context(name: str, doc_ids: list[str], docs: MultiVectors, qids: list[str],
             queries: MultiVectors, settings: dict, encoder: str) -> Any:
    """A :class:`DatasetContext` whose judgements are the pseudo-judgements of its own
    exact run (so its ``delta_ndcg@10`` is minus the estimated loss)."""
    from retrieval_prune.evaluation.runner import DatasetContext, exact_maxsim_run

    run = exact_maxsim_run(docs, doc_ids, queries, qids)
    return DatasetContext(name=name, split="tune", doc_ids=doc_ids, docs=docs, qids=qids,
                          queries=queries, qrels=pseudo_qrels(run), encoder_settings=settings,
                          encoder_name=encoder, query_encode_ms=None, exact_run=run)


def _point(row: dict[str, Any], rung: int) -> dict[str, Any]:
    return {"pipeline": row["pipeline"], "bytes_per_doc": row["bytes_per_doc"],
            "compression_ratio": row["compression_ratio"],
            "est_loss": max(0.0, -row["delta_ndcg@10"]),
            "top10_overlap": row["exact_top10_recall"], "p50_ms": row["p50_ms"],
            "vectors_per_doc": row["vectors_per_doc"], "n_docs": row["n_docs"], "rung": rung}


def _fits(p: dict[str, Any], budget: dict[str, float | None], final: bool) -> bool:
    """Within every budget. Before the last rung only what cannot get better on more
    documents is held against a candidate: its latency (it grows with the corpus)."""
    if budget["max_ms"] is not None and p["p50_ms"] > budget["max_ms"]:
        return False
    if not final:
        return True
    if budget["max_bytes_per_doc"] is not None and p["bytes_per_doc"] > budget["max_bytes_per_doc"]:
        return False
    return budget["max_loss"] is None or p["est_loss"] <= budget["max_loss"]


def _key(p: dict[str, Any], budget: dict[str, float | None]) -> tuple:
    """Sort key, best first: within the budgets, then the objective."""
    over = 0.0  # how far outside the budgets, relative to each
    for k, v in (("bytes_per_doc", budget["max_bytes_per_doc"]), ("p50_ms", budget["max_ms"]),
                 ("est_loss", budget["max_loss"])):
        if v is not None:
            over += max(0.0, p[k] - v) / max(v, 1e-3)
    if budget["max_loss"] is not None:
        return (over > 0, over, p["bytes_per_doc"], p["est_loss"])
    return (over > 0, over, p["est_loss"], p["bytes_per_doc"])


def tune(data: str, *, checkpoint: str | None = None, max_bytes_per_doc: float | None = None,
         max_ms: float | None = None, max_loss: float | None = None,
         candidates: Sequence[str] | None = None, queries: str = "corpus",
         n_queries: int = 100, eta: int = 3, min_docs: int = 300, seed: int = 0,
         progress: bool = True) -> TuneResult:
    """Search index pipelines for a budget on ``data`` without judgements (module docstring).

    Parameters
    ----------
    data : str
        A BEIR-layout folder or name, a ``.jsonl`` file of documents, or an embedding set.
    checkpoint : str, optional
        The encoder (folder or shipped name); zero-shot when omitted.
    max_bytes_per_doc, max_ms, max_loss : float, optional
        Budgets: index bytes per document, search p50 in ms at k=100 (one query at a time),
        relative nDCG@10 loss estimated against exact MaxSim (0.01 = 1%). At least one.
    candidates : list of str, optional
        Index specs to search (default :func:`default_candidates`).
    queries : ``"corpus"`` or ``"log"``
    n_queries : int
        Sample queries (default 100).
    eta : int
        Halving factor (keep 1/eta of the candidates per rung).
    min_docs : int
        Documents in the first rung's sample, at least (a corpus smaller than
        ``eta * min_docs`` is searched in one rung).
    """
    _check_budget(max_bytes_per_doc, max_ms, max_loss)
    if queries not in QUERY_SOURCES:
        raise ValueError(f"queries={queries!r}; choose one of {QUERY_SOURCES}")
    if not (isinstance(n_queries, int) and n_queries >= 1):
        raise ValueError(f"n_queries={n_queries!r} must be a positive integer")
    if not (isinstance(eta, int) and eta >= 2):
        raise ValueError(f"eta={eta!r} must be an integer >= 2")
    from retrieval_prune.evaluation.runner import evaluate_pipeline

    t0 = time.perf_counter()
    budget = {"max_bytes_per_doc": max_bytes_per_doc, "max_ms": max_ms, "max_loss": max_loss}
    inp = _inputs(data, checkpoint, queries, n_queries, seed, progress)
    docs, doc_ids = inp["docs"], inp["doc_ids"]
    specs = list(dict.fromkeys(candidates or default_candidates(docs.dim)))
    if not specs:
        raise ValueError("no candidate pipeline to search")
    for s in specs:
        pipe = make_pipeline(s)  # a bad spec fails before any build
        if pipe.needs_importance:
            raise ValueError(f"{s!r} needs attention importance, which tune does not encode; "
                             "search it with `retrieval-prune eval`")
    n = len(doc_ids)
    n_rungs = max(0, int(math.floor(math.log(max(n / min_docs, 1.0), eta))))
    sizes = [n if r == n_rungs else int(math.ceil(n / eta ** (n_rungs - r)))
             for r in range(n_rungs + 1)]
    order = np.random.default_rng(seed).permutation(n)  # nested samples: prefixes of it
    tried: list[dict[str, Any]] = []
    alive = specs
    bar = tqdm(total=len(specs), desc="tune", unit="build", disable=not progress)
    last: list[dict[str, Any]] = []
    for rung, size in enumerate(sizes):
        idx = np.sort(order[:size]) if size < n else np.arange(n)
        ctx = _context(inp["name"], [doc_ids[i] for i in idx], docs[idx] if size < n else docs,
                       inp["qids"], inp["queries"], inp["settings"], inp["encoder"])
        points = []
        for spec in alive:
            bar.set_postfix_str(f"rung {rung} ({size} docs): {spec[:40]}")
            row = evaluate_pipeline(ctx, spec, checkpoint=checkpoint, progress=False)
            points.append(_point(row, rung))
            bar.update(1)
        tried.extend(points)
        final = rung == len(sizes) - 1
        if final:
            last = points
            break
        ranked = sorted(points, key=lambda p: (not _fits(p, budget, False), _key(p, budget)))
        keep = ranked[: max(1, math.ceil(len(alive) / eta))]
        safest = min(points, key=lambda p: (p["est_loss"], p["bytes_per_doc"]))
        if safest not in keep:
            keep.append(safest)
        alive = [p["pipeline"] for p in keep]
        bar.total += len(alive)
        bar.refresh()
    bar.close()
    fit = [p for p in last if _fits(p, budget, True)]
    if fit:
        best = min(fit, key=lambda p: _key(p, budget))
    else:
        best = min(last, key=lambda p: (p["est_loss"], p["bytes_per_doc"]))
    front = [last[i] for i in _pareto(last)]
    return TuneResult(chosen=best["pipeline"], feasible=bool(fit), frontier=front, tried=tried,
                      budget=budget, dataset=inp["name"], queries=queries,
                      n_queries=len(inp["qids"]), n_docs=n, seconds=time.perf_counter() - t0,
                      encoder=inp["encoder"], rungs=sizes)


def _pareto(points: list[dict[str, Any]]) -> list[int]:
    from retrieval_prune.evaluation.plot import pareto_front

    return pareto_front([(p["bytes_per_doc"], -p["est_loss"]) for p in points])
