"""Measure the sharded index on this machine, for the 100M-document plan (docs/scale.md).

1. **Build throughput** (documents/s, real encoder, SciFact's first ``--build-docs``
   documents, 2 shards): the local executor with 1 and 2 torch threads, and Ray with 1 and
   2 encoder workers (1 thread each) -- Ray's overhead is ray-1-worker against local-1-thread
   (the same compute).
2. **Search latency** (search only, pre-encoded queries, all judged test queries, k=10 and
   k=100): one unsharded index, and sharded indexes of 1, 2 and 4 shards over the same
   vectors and codebook, searched in this process (one thread, shards one after another)
   and on Ray (one actor per shard, one thread each). Queries interleave across setups so
   that machine noise hits every setup alike.
3. **Peak RSS per shard actor** (VmHWM of each actor process after the query stream).

    python scripts/scale_bench.py --json eval/results/scale.json --markdown eval/results/scale.md
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from retrieval_prune.data import load_beir
from retrieval_prune.encode import Encoder
from retrieval_prune.encode.cache import EmbeddingCache, cache_root
from retrieval_prune.evaluation.metrics import evaluate
from retrieval_prune.evaluation.runner import index_bytes
from retrieval_prune.index.base import load_index
from retrieval_prune.pipeline import make_pipeline
from retrieval_prune.pipeline.build import build
from retrieval_prune.pipeline.executors import RayExecutor
from retrieval_prune.pipeline.sharded import build_sharded


def pct(xs, q):
    return round(float(np.percentile(np.asarray(xs) * 1e3, q)), 3)


def bench_build(corpus, n_docs, checkpoint, work, progress):
    import torch

    ids, texts = corpus.doc_ids[:n_docs], corpus.doc_texts[:n_docs]
    factory = functools.partial(Encoder.load, checkpoint)
    rows = []
    setups = [("local", 1, None), ("local", 2, None), ("ray", 1, 1), ("ray", 1, 2)]
    for name, threads, workers in setups:
        out = work / f"build-{name}-{threads}-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        if name == "local":
            torch.set_num_threads(threads)
            ex = "local"
        else:
            ex = RayExecutor(workers=workers, threads_per_worker=threads)
        t = time.perf_counter()
        res = build_sharded("default", ids, texts=texts, encoder_factory=factory, shards=2, out=out,
                            executor=ex, progress=progress)
        secs = time.perf_counter() - t
        if name == "ray":
            ex.close()
        st = res.stats
        rows.append({"executor": name, "workers": workers or 1, "threads_per_worker": threads,
                     "docs": n_docs, "seconds": round(secs, 2), "docs_per_s": round(n_docs / secs, 2),
                     "encode_seconds": round(st["encode_seconds"], 2),
                     "encode_docs_per_s": round(n_docs / st["encode_seconds"], 2),
                     "fit_seconds": round(st["fit_seconds"], 2), "shards_seconds": round(st["shards_seconds"], 2)})
        print(rows[-1], flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


def bench_search(corpus, checkpoint, work, shard_counts, progress, reuse=False):
    import numba

    from retrieval_prune.retrieve.ray_shards import attach_ray

    enc = Encoder.load(checkpoint)
    qids, qtexts = corpus.judged_queries()
    cache = EmbeddingCache(cache_root() / "embeddings")
    docs = cache.get_or_encode(enc, corpus.name, corpus.doc_ids, corpus.doc_texts, progress=progress)
    if reuse and (work / "single" / "CURRENT").is_file():
        single = load_index(work / "single")
    else:
        single = build("default", corpus.doc_ids, docs=docs, encoder_settings=dict(enc.settings),
                       out=work / "single").index
    pipe = make_pipeline("default")
    qv = pipe.transform_queries(enc.encode_queries(qtexts, progress=False))
    setups = {"unsharded": (single, None)}
    for s in shard_counts:
        path = work / f"shards-{s}"
        if not (reuse and (path / "CURRENT").is_file()):
            shutil.rmtree(path, ignore_errors=True)
            build_sharded("default", corpus.doc_ids, docs=docs, shards=s, out=path,
                          encoder_settings=dict(enc.settings))
        setups[f"{s} shards, local"] = (load_index(path), path)
        remote = load_index(path)
        attach_ray(remote, path, address="local", threads_per_shard=1)
        setups[f"{s} shards, ray"] = (remote, path)
        if s > 2:  # one actor per core (2 here), each holding s/2 shards: one table per actor
            grouped = load_index(path)
            attach_ray(grouped, path, address="local", threads_per_shard=1, shards_per_actor=-(-s // 2))
            setups[f"{s} shards, ray, {-(-s // 2)} per actor"] = (grouped, path)
    numba.set_num_threads(1)
    # answers first: every setup must give the unsharded index's top-100
    ref = single.search(qv, 100)
    quality = {}
    for name, (idx, _) in setups.items():
        res = idx.search(qv, 100)
        ids = [[idx.doc_ids[p] for p in row if p >= 0] for row in res.ids]
        run = {q: {d: float(x) for d, x in zip(row, res.scores[i], strict=False)} for i, (q, row) in enumerate(zip(qids, ids, strict=True))}
        quality[name] = {"identical_to_unsharded": bool(np.array_equal(res.scores, ref.scores)) and
                         ids == [[single.doc_ids[p] for p in row if p >= 0] for row in ref.ids],
                         **{k: round(v, 4) for k, v in evaluate(corpus.qrels, run).items()}}
    times: dict[tuple[str, int], list[float]] = {(n, k): [] for n in setups for k in (10, 100)}
    for rep in range(2):  # warm-up pass, then the measured one
        for i in range(len(qids)):
            one = qv[i : i + 1]
            for name, (idx, _) in setups.items():
                for k in (10, 100):
                    t = time.perf_counter()
                    idx.search(one, k)
                    if rep:
                        times[(name, k)].append(time.perf_counter() - t)
    rows = []
    for name, (idx, path) in setups.items():
        row = {"setup": name, "shards": len(getattr(idx, "shards", [idx])),
               "actors": len(getattr(getattr(idx, "runner", None), "actors", [])) or None,
               "bytes_per_doc": round(index_bytes(path or work / "single") / len(corpus.doc_ids), 1),
               **quality[name]}
        for k in (10, 100):
            row[f"p50_ms_k{k}"] = pct(times[(name, k)], 50)
            row[f"p95_ms_k{k}"] = pct(times[(name, k)], 95)
        runner = getattr(idx, "runner", None)
        if runner is not None and hasattr(runner, "info"):
            info = runner.info()
            row["actor_peak_rss_mb"] = [round(i["peak_rss"] / 2**20, 1) for i in info]
            runner.close()
        rows.append(row)
        print(row, flush=True)
    return rows, {"docs": len(corpus.doc_ids), "queries": len(qids), "tokens": int(docs.n_tokens)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="scifact")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--build-docs", type=int, default=1024)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--work", default="indexes/scale_bench")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="search index folders an earlier run left in --work")
    ap.add_argument("--build-from", default=None, metavar="JSON",
                    help="take the build rows from an earlier run's JSON instead of measuring them")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    corpus = load_beir(args.data)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = {"data": corpus.name, "cpu": _cpu(), "command": "python scripts/scale_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.build_from:
        out["build"] = json.loads(Path(args.build_from).read_text())["build"]
        out["build_command"] = json.loads(Path(args.build_from).read_text()).get("command")
    elif not args.skip_build:
        out["build"] = bench_build(corpus, args.build_docs, args.checkpoint, work, not args.quiet)
    out["search"], out["corpus"] = bench_search(corpus, args.checkpoint, work, args.shards, not args.quiet, args.reuse)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(out))
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def markdown(out) -> str:
    lines = [f"# Sharded build and search on {out['data']} (one machine: {out['cpu']})", ""]
    if "build" in out:
        b = out["build"]
        lines += ["## Build throughput (real encoder, `default`, 2 shards)", "",
                  "| executor | workers x threads | docs | total s | docs/s | encode docs/s | fit s | shards s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in b:
            lines.append(f"| {r['executor']} | {r['workers']} x {r['threads_per_worker']} | {r['docs']} | {r['seconds']} | "
                         f"{r['docs_per_s']} | {r['encode_docs_per_s']} | {r['fit_seconds']} | {r['shards_seconds']} |")
        loc1 = next(r for r in b if r["executor"] == "local" and r["threads_per_worker"] == 1)
        ray1 = next(r for r in b if r["executor"] == "ray" and r["workers"] == 1)
        ray2 = next(r for r in b if r["executor"] == "ray" and r["workers"] == 2)
        lines += ["", f"Ray's overhead, 1 worker against the local executor on 1 thread (the same compute): "
                  f"{ray1['seconds'] / loc1['seconds']:.2f}x the time. Ray 2 workers against 1: "
                  f"{ray1['seconds'] / ray2['seconds']:.2f}x the throughput.", ""]
    c = out["corpus"]
    lines += [f"## Search latency (search only, {c['queries']} queries, one at a time, {c['docs']:,} docs)", "",
              "| setup | shards | p50 k=10 | p95 k=10 | p50 k=100 | p95 k=100 | nDCG@10 | identical to unsharded | B/doc | actor peak RSS MiB |",
              "|---|---:|---:|---:|---:|---:|---:|:-:|---:|---|"]
    for r in out["search"]:
        lines.append(f"| {r['setup']} | {r['shards']} | {r['p50_ms_k10']} | {r['p95_ms_k10']} | {r['p50_ms_k100']} | "
                     f"{r['p95_ms_k100']} | {r['ndcg@10']:.4f} | {'yes' if r['identical_to_unsharded'] else 'NO'} | "
                     f"{r['bytes_per_doc']:,.0f} | {', '.join(map(str, r.get('actor_peak_rss_mb', []))) or '-'} |")
    lines += ["", "Milliseconds. Local: the shards searched one after another in the calling process "
              "(numba 1 thread; the first shard's score table serves the others). Ray: one actor per "
              "shard, or a group of shards per actor (1 thread each; one score table per actor), two "
              "exchanges per query (candidates, then rerank), the exact merge in the caller. Actor "
              "peak RSS is VmHWM of each actor process: the Python interpreter, numba and the "
              "memory-mapped shard pages it touched.", ""]
    if out.get("build_command"):
        lines.append(f"Build rows: `{out['build_command']}`.")
    lines += [f"Command: `{out['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
