#!/usr/bin/env python
"""Staged search benchmark: quality, search-stage loss, size and latency in one run.

For every dataset and pipeline spec: build the index from the cached embeddings, save it,
reopen it from disk (mmapped), then search every judged query one at a time (k=100, as
the eval runner does) and report

- nDCG@10 / R@100 and their delta to exact MaxSim over the uncompressed vectors;
- ``exact_top10_recall``: overlap of the top 10 with exact uncompressed MaxSim's top 10;
- ``bf_top10_recall``: overlap with a brute-force search of *the same codes* -- what the
  candidate and approximate stages lose (1.0 = nothing); ``bf_top10_recall_k10`` the same
  for a search with k=10, whose stage budgets (which follow k) are the smallest;
- bytes per document (all files of the saved generation), vectors per document;
- p50 / p95 search latency (query encoding excluded), staged and brute force, measured
  alternately query by query in the same process (a ratio that survives machine load).

Usage::

    python scripts/staged_bench.py --data scifact --data cranfield \\
        --pipeline default --json eval/results/staged_search.json --markdown eval/results/staged_search.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def overlap(a: dict, b: dict, qids) -> float:
    from retrieval_prune.evaluation.runner import _top10

    return float(np.mean([len(set(_top10(a.get(q, {}))) & set(_top10(b.get(q, {})))) / max(1, len(_top10(b.get(q, {}))))
                          for q in qids]))


def bench(ctx, spec: str, workdir: Path, bruteforce: bool) -> dict:
    from retrieval_prune.evaluation.metrics import evaluate
    from retrieval_prune.evaluation.runner import index_bytes, run_quality
    from retrieval_prune.index.base import load_index
    from retrieval_prune.pipeline import make_pipeline

    pipe = make_pipeline(spec)
    t0 = time.perf_counter()
    index = pipe.build(ctx.docs, ctx.doc_ids, encoder_settings=ctx.encoder_settings)
    path = workdir / "index"
    shutil.rmtree(path, ignore_errors=True)
    index.save(path)
    build_s = time.perf_counter() - t0
    del index
    nbytes = index_bytes(path)
    index = load_index(path)
    queries = pipe.transform_queries(ctx.queries)
    has_bf = bruteforce and hasattr(index, "search_bruteforce")
    index.search(queries[0:1], k=100)
    if has_bf:
        index.search_bruteforce(queries[0:1], k=100)
    lat, lat10, lat_bf, run, run10, run_bf = [], [], [], {}, {}, {}
    for i, qid in enumerate(ctx.qids):
        q = queries[i : i + 1]
        t = time.perf_counter()
        r = index.search(q, k=100)
        lat.append(time.perf_counter() - t)
        run[qid] = dict(r.external(0))
        t = time.perf_counter()  # k=10: the budgets that follow k are the smallest here
        r10 = index.search(q, k=10)
        lat10.append(time.perf_counter() - t)
        run10[qid] = dict(r10.external(0))
        if has_bf:
            t = time.perf_counter()
            rb = index.search_bruteforce(q, k=100)
            lat_bf.append(time.perf_counter() - t)
            run_bf[qid] = dict(rb.external(0))
    n_docs = len(ctx.doc_ids)
    row = {
        "dataset": ctx.name,
        "pipeline": spec,
        "pipeline_canonical": pipe.spec,
        "encoder": ctx.encoder_name,
        **run_quality(ctx, run),
        "n_docs": n_docs,
        "n_queries": len(ctx.qids),
        "bytes_per_doc": nbytes / n_docs,
        "vectors_per_doc": int(getattr(index, "n_vectors", 0)) / n_docs,
        "build_s": build_s,
        "p50_ms": 1e3 * float(np.median(lat)),
        "p95_ms": 1e3 * float(np.percentile(lat, 95)),
        "exact_top10_recall_k10": overlap(run10, ctx.exact_run, ctx.qids),
        "p50_ms_k10": 1e3 * float(np.median(lat10)),
    }
    if has_bf:
        mb = evaluate(ctx.qrels, run_bf)
        row.update({
            "bf_ndcg@10": mb["ndcg@10"],
            "bf_top10_recall": overlap(run, run_bf, ctx.qids),
            "bf_top10_recall_k10": overlap(run10, run_bf, ctx.qids),
            "bf_p50_ms": 1e3 * float(np.median(lat_bf)),
            "speedup_vs_bf_p50": float(np.median(lat_bf) / np.median(lat)),
        })
    return row


COLUMNS = [
    ("dataset", "{}"), ("pipeline", "`{}`"), ("ndcg@10", "{:.4f}"), ("delta_ndcg@10", "{:+.4f}"),
    ("recall@100", "{:.4f}"), ("exact_top10_recall", "{:.3f}"), ("bf_top10_recall", "{:.4f}"),
    ("bf_top10_recall_k10", "{:.4f}"), ("p50_ms_k10", "{:.2f}"),
    ("bf_ndcg@10", "{:.4f}"), ("bytes_per_doc", "{:,.0f}"), ("vectors_per_doc", "{:.1f}"),
    ("p50_ms", "{:.2f}"), ("p95_ms", "{:.2f}"), ("bf_p50_ms", "{:.2f}"), ("speedup_vs_bf_p50", "{:.1f}x"),
    ("build_s", "{:.0f}"),
]


def markdown(rows) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else f.format(r[c]) for c, f in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--pipeline", action="append", required=True)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--no-bruteforce", action="store_true", help="skip the brute-force reference")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()

    from retrieval_prune.encode import Encoder
    from retrieval_prune.encode.cache import cache_root
    from retrieval_prune.evaluation.runner import load_context

    cache: list = []

    def encoder():
        if not cache:
            cache.append(Encoder.load(args.checkpoint))
        return cache[0]

    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="rp-staged-", dir=cache_root()))
    try:
        for name in args.data:
            ctx = load_context(name, encoder)
            for spec in args.pipeline:
                row = bench(ctx, spec, workdir, not args.no_bruteforce)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
