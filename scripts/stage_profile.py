#!/usr/bin/env python
"""Where a staged search's time goes: per-stage medians over the judged queries.

Runs the stages of :meth:`StagedIndex._search_one` one by one (same calls, same order) for
every query, one query at a time on one thread, and reports the median milliseconds of each
stage and of the whole ``index.search`` call (whose excess over the stage sum is the Python
glue: argument checks, result objects).

Usage::

    python scripts/stage_profile.py INDEX --data scifact --checkpoint .cache/checkpoints/ft128 \\
        --pipeline default -k 10 -k 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile_one(index, cache, q, k, alive, mark, stamp, buf):
    """Per-stage seconds of one query (mirrors ``StagedIndex._search_one``)."""
    from retrieval_prune.index.staged import _select_idx
    from retrieval_prune.kernels import ivf as _ivf_k
    from retrieval_prune.kernels.ops import _pack

    t = {}
    t0 = time.perf_counter()
    qt = np.ascontiguousarray(index.chain.transform(q), dtype=np.float32)
    qp = _pack(qt, np.array([0, qt.shape[0]], np.int64))[0]
    table = index._score_table(cache, qp)
    t1 = time.perf_counter()
    t["table"] = t1 - t0
    rng = np.full(2, np.nan, np.float32)
    probe = np.ascontiguousarray(index._probe(cache, table, qt, rng), dtype=np.int64)
    t2 = time.perf_counter()
    t["probe"] = t2 - t1
    n = _ivf_k.gather_kernel(probe, cache["list_off"], cache["list_docs"], alive, mark, stamp, buf)
    cand = np.sort(buf[:n]).astype(np.int64)
    t3 = time.perf_counter()
    t["gather"] = t3 - t2
    t["n_gathered"] = cand.size
    n_cand, n_rerank = index.budgets(k)
    n_keep, n_final = max(n_cand, n_rerank, k), max(n_rerank, k)
    t["approx_u8"] = t["approx_f32"] = 0.0
    if cand.size > n_final:
        if index._u8_cut(cand.size, n_keep):
            keep = None
            if index.t_cs is not None:
                keep = (table[:, : qt.shape[0]].max(axis=1) >= index.t_cs).astype(np.uint8)
            s = index._interaction(cache, table, qt.shape[0], cand, keep, rng)
            cand = cand[_select_idx(s, n_keep)]
        t4 = time.perf_counter()
        t["approx_u8"] = t4 - t3
        if cand.size > n_final:
            cand = cand[_select_idx(index._interaction_f32(cache, table, cand), n_final)]
        t3 = time.perf_counter()
        t["approx_f32"] = t3 - t4
    final = index._rerank(cache, table, qt, cand, qp)
    order = np.lexsort((cand, -final))[:k]
    t5 = time.perf_counter()
    t["rerank"] = t5 - t3
    t["n_reranked"] = cand.size
    return t, cand[order]


def main() -> int:
    from staged_fidelity import add_index_args, open_index

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_index_args(ap)
    ap.add_argument("-k", type=int, action="append", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="search parameter to configure first (nprobe=2, t_cs=0.4, ...)")
    ap.add_argument("--pollute-mb", type=int, default=0,
                    help="write this many MiB between queries (cold caches, as when another "
                         "engine's search runs in between, as in bench plaid)")
    a = ap.parse_args()

    import numba

    from retrieval_prune import registry
    from retrieval_prune.index.staged import _blas_single_thread

    numba.set_num_threads(1)
    _, index, queries = open_index(a)
    if a.set:
        (_, params), = registry.parse_spec(f"{index.name}:" + ",".join(a.set))
        index.configure(**params)
    cache = index._prepare()
    alive = np.ascontiguousarray(index.alive, dtype=np.uint8)
    mark = np.zeros(index.n_positions, np.int32)
    buf = np.empty(index.n_positions, np.int32)
    junk = np.ones(a.pollute_mb << 18, np.float32) if a.pollute_mb else None

    def pollute():
        if junk is not None:
            junk[::16] += 1.0  # one write per cache line

    print(f"{a.index}: {index.spec}" + (f"  (caches polluted: {a.pollute_mb} MiB)" if junk is not None else ""))
    for k in a.k or [10]:
        rows, total = [], []
        with _blas_single_thread():
            for rep in range(2):  # first pass warms up
                rows, total = [], []
                for i in range(len(queries)):
                    q = queries[i : i + 1]
                    pollute()
                    t, ids = profile_one(index, cache, np.asarray(q.embeddings), k, alive, mark,
                                         rep * len(queries) + i + 1, buf)
                    rows.append(t)
                    pollute()
                    t0 = time.perf_counter()
                    r = index.search(q, k=k)
                    total.append(time.perf_counter() - t0)
                    assert np.array_equal(r.ids[0][: ids.size], ids), "profile differs from search"
        keys = ["table", "probe", "gather", "approx_u8", "approx_f32", "rerank"]
        med = {key: 1e3 * float(np.median([r[key] for r in rows])) for key in keys}
        print(f"k={k}  budgets={index.budgets(k)}  gathered={np.mean([r['n_gathered'] for r in rows]):.0f}")
        for key in keys:
            print(f"  {key:<11} {med[key]:7.3f} ms")
        print(f"  {'stage sum':<11} {sum(med.values()):7.3f} ms")
        print(f"  {'search()':<11} {1e3 * float(np.median(total)):7.3f} ms  (p50 of the full call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
