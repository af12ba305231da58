#!/usr/bin/env python
"""Fidelity of a saved staged index's search at several stage budgets.

For each setting (``nprobe,n_candidates,n_rerank``; ``-`` keeps the index's value, i.e. the
k-dependent default), searches every judged query one at a time at depth ``k`` and reports

- ``top10_vs_bf``: overlap of the top 10 with a brute-force search of the same codes;
- ``top{k}_vs_bf``: the same for the whole top ``k`` (what recall@k sees);
- ``p50_ms``: median search time (query encoding excluded);
- ``candidates``: mean number of documents the probe stage gathers (union of the inverted
  lists of the ``nprobe`` best centroids of every query token).

Usage (the figures in eval/results/staged_search.md and plaid_scifact.md)::

    python scripts/staged_fidelity.py INDEX --data scifact --checkpoint .cache/checkpoints/ft128 \\
        --pipeline default -k 10 --setting 1,-,- --setting 2,-,- --setting 4,-,- \\
        --setting 4,256,128 --setting 4,1024,256

``--float-table`` searches an int8-codebook index with the float32 stage-1 table (the int8
x int8 table's fidelity cost: eval/results/staged_search.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def add_index_args(ap: argparse.ArgumentParser) -> None:
    """The arguments naming a saved index and the data to search it with (shared with
    ``stage_profile.py``)."""
    ap.add_argument("index")
    ap.add_argument("--data", required=True)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--pipeline", required=True, help="the spec the index was built with")


def open_index(a: argparse.Namespace):
    """``(ctx, index, queries)``: the dataset, the saved index, the judged queries through
    the pipeline's query transform."""
    from retrieval_prune.encode import Encoder
    from retrieval_prune.evaluation.runner import load_context
    from retrieval_prune.index.base import load_index
    from retrieval_prune.pipeline import make_pipeline

    ctx = load_context(a.data, lambda: Encoder.load(a.checkpoint))
    index = load_index(a.index)
    return ctx, index, make_pipeline(a.pipeline).transform_queries(ctx.queries)


def use_float_table(index) -> None:
    """Score stage 1 of an int8-codebook index with the float32 table of its dequantised
    codebook (the query not quantised): what the int8 x int8 table costs in fidelity."""
    cache = index._prepare()
    if cache["codebook_scale"].size == 0:
        raise SystemExit("--float-table: the index has no int8 codebook (centroid_bits=8)")
    cache["codebook"] = cache["centroids"].reshape(-1)
    cache["codebook_scale"] = np.zeros(0, np.float32)


def candidate_count(index, q: np.ndarray) -> int:
    """Documents holding a token coded to one of the probed centroids of ``q``'s tokens."""
    from retrieval_prune.kernels.ops import _pack

    cache = index._prepare()
    q = np.ascontiguousarray(index.chain.transform(q), dtype=np.float32)  # as the search does
    table = index._score_table(cache, _pack(q, np.array([0, q.shape[0]], np.int64))[0])
    probed = index._probe(cache, table, q)
    codes, off = np.asarray(cache["codes"]), np.asarray(cache["off"])
    hit = np.isin(codes, probed)
    return int(np.unique(np.searchsorted(off, np.flatnonzero(hit), side="right") - 1).size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_index_args(ap)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--setting", action="append", required=True, metavar="NPROBE,NCAND,NRERANK")
    ap.add_argument("--float-table", action="store_true",
                    help="int8-codebook index: stage 1 with the float32 table instead")
    ap.add_argument("--json")
    a = ap.parse_args()

    from retrieval_prune.evaluation.runner import _top10

    ctx, index, queries = open_index(a)
    if a.float_table:
        use_float_table(index)
    n = len(ctx.qids)
    bf_runs = [dict(index.search_bruteforce(queries[i : i + 1], k=max(10, a.k)).external(0)) for i in range(n)]
    bf = [set(_top10(r)) for r in bf_runs]
    bf_k = [set(r) for r in bf_runs]  # the whole top k (k > 10: what recall@k sees)
    rows = []
    for setting in a.setting:
        keys = ("nprobe", "n_candidates", "n_rerank")
        values = {k: (None if v == "-" else int(v)) for k, v in zip(keys, setting.split(","), strict=True)}
        # "-" for nprobe keeps the built value; for the budgets it restores "by k"
        index.configure(**{k: v for k, v in values.items() if v is not None or k != "nprobe"})
        index.search(queries[0:1], k=a.k)  # warm-up
        overlap, overlap_k, lat, cands = [], [], [], []
        for i in range(n):
            q = queries[i : i + 1]
            t = time.perf_counter()
            r = index.search(q, k=a.k)
            lat.append(time.perf_counter() - t)
            got = dict(r.external(0))
            overlap.append(len(bf[i] & set(_top10(got))) / max(1, len(bf[i])))
            overlap_k.append(len(bf_k[i] & set(got)) / max(1, len(bf_k[i])))
            cands.append(candidate_count(index, np.asarray(q.embeddings, dtype=np.float32)))
        row = {"setting": setting, "k": a.k, "budgets": index.budgets(a.k), "nprobe": index.nprobe,
               "top10_vs_bf": float(np.mean(overlap)), f"top{a.k}_vs_bf": float(np.mean(overlap_k)),
               "p50_ms": 1e3 * float(np.median(lat)),
               "candidates": float(np.mean(cands)), "n_docs": len(index.doc_ids)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
