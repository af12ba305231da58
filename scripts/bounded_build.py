#!/usr/bin/env python
"""Bounded-memory build (issue #5, item 4): stream a synthetic corpus far larger than the
memory the process may use through encode -> compress -> write, then search it mmapped.

The address-space limit (``RLIMIT_AS``, default 2 GiB) is set before numpy is imported,
so it covers everything the process maps: interpreter, libraries, thread stacks, the
memory-mapped index files. The corpus is synthetic (labelled so): token vectors drawn
around topic centres, generated batch by batch from a seed, so it never exists in memory
as a whole (``--tokens 20000000`` at 128-d is 10 GB of float32). The codec is fitted on
a sample, every batch is coded with it and appended to ``.npy`` files
(:func:`retrieval_prune.index.staged.build_streaming`), and the generation is committed
with the usual checksums and atomic pointer swap.

Afterwards the index is opened (checksums verified, arrays mmapped) under the same limit,
a few queries are searched with the staged search, and their top-10 is compared with a
brute-force scan of the same codes.

Usage::

    python scripts/bounded_build.py --tokens 20000000 --mem-gib 2 --out /tmp/big-index \\
        --json eval/results/bounded_build.json
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path


def vm_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmPeak", "VmSize", "VmHWM", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=20_000_000, help="token vectors (default 20M)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--doc-len", type=int, default=100, help="mean tokens per document")
    ap.add_argument("--batch-tokens", type=int, default=400_000, help="tokens per streamed batch")
    ap.add_argument("--fit-tokens", type=int, default=262_144, help="tokens the codec is fitted on")
    ap.add_argument("--spec", default="residual:k=4096,nbits=2,candidates=1 | ivf:nprobe=4",
                    help="codec chain and staged index spec")
    ap.add_argument("--mem-gib", type=float, default=2.0, help="RLIMIT_AS in GiB (0: none)")
    ap.add_argument("--out", required=True, help="index folder to write")
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()

    limit = int(args.mem_gib * (1 << 30))
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")

    import json

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from retrieval_prune.index.base import load_index
    from retrieval_prune.index.staged import build_streaming
    from retrieval_prune.pipeline import make_pipeline
    from retrieval_prune.types import MultiVectors

    n_topics = 512
    centres = np.random.default_rng(args.seed).standard_normal((n_topics, args.dim)).astype(np.float32)

    def batch(b: int, n_tokens: int, id_start: int):
        """Batch ``b``: documents of about doc_len tokens, seeded by (seed, b)."""
        rng = np.random.default_rng([args.seed, b])
        lens = rng.integers(args.doc_len // 2, args.doc_len * 3 // 2 + 1, n_tokens // args.doc_len + 2)
        off = np.concatenate([[0], np.cumsum(lens)])
        n_docs = int(np.searchsorted(off, n_tokens, side="right")) - 1
        n_docs = max(n_docs, 1)
        off = off[: n_docs + 1].astype(np.int64)
        doc_topics = rng.integers(0, n_topics, (n_docs, 4))
        tok_doc = np.repeat(np.arange(n_docs), np.diff(off))
        topic = doc_topics[tok_doc, rng.integers(0, 4, off[-1])]
        x = centres[topic]
        x += 0.7 * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"syn-{id_start + i}" for i in range(n_docs)]
        return MultiVectors(x, off), ids

    t0 = time.perf_counter()
    pipe = make_pipeline(args.spec)
    index = pipe.index
    sample, _ = batch(10**9, args.fit_tokens, 0)  # a separate seeded sample for the fit
    index.fit(sample)
    del sample
    fit_s = time.perf_counter() - t0
    print(f"fitted {index.chain.spec} on {args.fit_tokens:,} tokens in {fit_s:.0f} s; "
          f"{vm_status()}", flush=True)

    state = {"tokens": 0, "docs": 0, "batches": 0}

    def batches():
        b = 0
        while state["tokens"] < args.tokens:
            n = min(args.batch_tokens, args.tokens - state["tokens"])
            docs, ids = batch(b, n, state["docs"])
            state["tokens"] += docs.n_tokens
            state["docs"] += len(ids)
            state["batches"] += 1
            b += 1
            yield docs, ids

    def progress(n_docs: int, n_tok: int) -> None:
        if state["batches"] % 5 == 0:
            vm = vm_status()
            print(f"  {n_tok:>12,} tokens {n_docs:>9,} docs  {time.perf_counter() - t0:7.0f} s  "
                  f"RSS {vm['VmRSS'] / 2**20:,.0f} MiB  peak VM {vm['VmPeak'] / 2**20:,.0f} MiB", flush=True)

    out = Path(args.out)
    index.pipeline_spec = index.spec
    gen = build_streaming(index, out, batches(), progress=progress)
    build_s = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in gen.iterdir() if p.is_file()}
    index_bytes = sum(files.values())
    vm_build = vm_status()
    corpus_bytes = state["tokens"] * args.dim * 4
    print(f"built {out} ({gen.name}): {state['tokens']:,} tokens, {state['docs']:,} docs, "
          f"index {index_bytes / 2**20:,.0f} MiB (float32 corpus {corpus_bytes / 2**30:.1f} GiB) "
          f"in {build_s:.0f} s; peak VM {vm_build['VmPeak'] / 2**20:,.0f} MiB, "
          f"peak RSS {vm_build['VmHWM'] / 2**20:,.0f} MiB, limit {args.mem_gib} GiB", flush=True)
    del index

    t1 = time.perf_counter()
    loaded = load_index(out)  # sha256 of every file verified, arrays mmapped
    open_s = time.perf_counter() - t1
    qrng = np.random.default_rng([args.seed, 10**9 + 1])  # 32 tokens per query, 4 topics each
    q_topics = qrng.integers(0, n_topics, (args.queries, 4))[
        np.repeat(np.arange(args.queries), 32), qrng.integers(0, 4, args.queries * 32)
    ]
    qx = centres[q_topics] + 0.7 * qrng.standard_normal((args.queries * 32, args.dim), dtype=np.float32)
    qx /= np.linalg.norm(qx, axis=1, keepdims=True)
    queries = MultiVectors(qx.astype(np.float32), np.arange(args.queries + 1, dtype=np.int64) * 32)
    loaded.search(queries[0:1], k=10)  # builds the inverted file, warms up
    lat = []
    staged_ids = []
    for i in range(len(queries)):
        t = time.perf_counter()
        r = loaded.search(queries[i : i + 1], k=10)
        lat.append(time.perf_counter() - t)
        staged_ids.append(r.ids[0])
    t2 = time.perf_counter()
    bf = loaded.search_bruteforce(queries, k=10)
    bf_s = (time.perf_counter() - t2) / len(queries)
    overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(staged_ids, bf.ids, strict=False)]))
    vm_end = vm_status()
    mmapped = isinstance(loaded._parts["codes"], np.memmap) or hasattr(loaded._parts["codes"], "filename")
    report = {
        "tokens": state["tokens"],
        "docs": state["docs"],
        "dim": args.dim,
        "batches": state["batches"],
        "spec": loaded.spec,
        "mem_limit_bytes": limit,
        "corpus_float32_bytes": corpus_bytes,
        "index_bytes": index_bytes,
        "files": files,
        "fit_s": round(fit_s, 1),
        "build_s": round(build_s, 1),
        "peak_vm_build_bytes": vm_build["VmPeak"],
        "peak_rss_build_bytes": vm_build["VmHWM"],
        "open_s": round(open_s, 1),
        "arrays_mmapped": bool(mmapped),
        "search_p50_ms": round(1e3 * float(np.median(lat)), 2),
        "bruteforce_ms_per_query": round(1e3 * bf_s, 1),
        "top10_overlap_vs_bruteforce": overlap,
        "peak_vm_bytes": vm_end["VmPeak"],
        "peak_rss_bytes": vm_end["VmHWM"],
        "synthetic": True,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
