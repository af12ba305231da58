#!/usr/bin/env python
"""int8 rerank (rerank=int8) against the float32 rerank of the same candidates: process CPU
time per query, one thread, 40 SciFact test queries x 5 repeats, interleaved. Needs the
zero-shot default index at .cache/idx/zs_default (retrieval-prune build --data scifact
--pipeline default --out .cache/idx/zs_default)."""
import sys, time, numpy as np, argparse
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
from staged_fidelity import open_index
ns = argparse.Namespace(index=".cache/idx/zs_default", data="scifact", checkpoint=None, pipeline="default")
ctx, index, queries = open_index(ns)
import numba; numba.set_num_threads(1)
from retrieval_prune.kernels.ops import _pack
cache = index._prepare()
rng = np.random.default_rng(0)
for nc in (64, 256):
    cand = np.sort(rng.choice(index.n_positions, nc, replace=False)).astype(np.int64)
    res = {"float32": [], "int8": []}
    for qi in range(40):
        q = np.ascontiguousarray(index.chain.transform(queries[qi:qi+1].embeddings), np.float32)
        qp = _pack(q, np.array([0, q.shape[0]]))[0]
        fs = {"float32": lambda: index._rerank(cache, None, q, cand, qp), "int8": lambda: index._rerank_i8(cache, q.shape[0], qp, cand)}
        for name in (("float32", "int8") if qi % 2 else ("int8", "float32")):
            fs[name]()
            t0 = time.process_time(); [fs[name]() for _ in range(5)]; res[name].append((time.process_time() - t0) / 5)
    print(nc, {k: round(np.median(v) * 1e3, 3) for k, v in res.items()}, "ms (process CPU time, 40 queries x 5, interleaved)")
