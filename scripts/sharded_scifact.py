"""Acceptance run of the sharded index on SciFact (real data, the real encoder).

Builds the same pipeline three ways and searches all judged test queries at k=100:

- a 4-shard index with ``--executor local`` (every map in this process);
- a 4-shard index with ``--executor ray`` (a local Ray cluster: an encoder actor pool, one
  task per shard);
- one unsharded index, fitted independently on the same vectors (the blocks the sharded
  builds encode, encoded here by the same call).

and reports whether top-100 ids and scores are identical, the codebooks' sha256, nDCG@10 and
R@100 of each, and the build times.

    python scripts/sharded_scifact.py --json eval/results/sharded_scifact.json \
        --markdown eval/results/sharded_scifact.md
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from retrieval_prune.data import load_beir
from retrieval_prune.encode import Encoder
from retrieval_prune.evaluation.metrics import evaluate
from retrieval_prune.evaluation.runner import index_bytes
from retrieval_prune.index.base import load_index
from retrieval_prune.index.sharded import codebook_sha256
from retrieval_prune.pipeline import make_pipeline
from retrieval_prune.pipeline.executors import RayExecutor
from retrieval_prune.pipeline.sharded import _blocks, build_sharded, shard_bounds
from retrieval_prune.types import MultiVectors


def run_of(index, qv, qids, k):
    res = index.search(qv, k)
    ids = [[index.doc_ids[p] for p in row if p >= 0] for row in res.ids]
    run = {q: {d: float(s) for d, s in zip(row, res.scores[i], strict=False)} for i, (q, row) in enumerate(zip(qids, ids, strict=True))}
    return ids, res.scores, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="scifact")
    ap.add_argument("--pipeline", default="default")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--block-docs", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="indexes/sharded_acceptance")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)

    corpus = load_beir(args.data)
    qids, qtexts = corpus.judged_queries()
    ids, texts = corpus.doc_ids, corpus.doc_texts
    factory = functools.partial(Encoder.load, args.checkpoint)
    enc = factory()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    out: dict = {"data": corpus.name, "docs": len(ids), "queries": len(qids), "pipeline": args.pipeline,
                 "shards": args.shards, "encoder": enc.settings.get("checkpoint"), "rows": []}

    t = time.perf_counter()
    build_sharded(args.pipeline, ids, texts=texts, encoder_factory=factory, shards=args.shards,
                  out=work / "local", executor="local", block_docs=args.block_docs, progress=True)
    t_local = time.perf_counter() - t
    ex = RayExecutor(workers=args.workers)
    t = time.perf_counter()
    build_sharded(args.pipeline, ids, texts=texts, encoder_factory=factory, shards=args.shards,
                  out=work / "ray", executor=ex, block_docs=args.block_docs, progress=True)
    t_ray = time.perf_counter() - t
    ex.close()

    # the unsharded reference: the same blocks, encoded by the same call, fitted on its own
    t = time.perf_counter()
    parts = [enc.encode_documents(texts[a:b], progress=False)
             for _, a, b in _blocks(shard_bounds(len(ids), args.shards), args.block_docs)]
    lens = np.concatenate([np.diff(p.offsets) for p in parts])
    vecs = MultiVectors(np.concatenate([p.embeddings for p in parts]),
                        np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    pipe = make_pipeline(args.pipeline)
    single = pipe.build(vecs, ids, texts, encoder_settings=dict(enc.settings))
    single.save(work / "single")
    t_single = time.perf_counter() - t

    qv = pipe.transform_queries(enc.encode_queries(qtexts, progress=False))
    ref_ids, ref_scores, ref_run = run_of(single, qv, qids, 100)
    single_metrics = evaluate(corpus.qrels, ref_run)
    for name, path, secs in (("unsharded", work / "single", t_single), (f"{args.shards} shards, local", work / "local", t_local),
                             (f"{args.shards} shards, ray", work / "ray", t_ray)):
        idx = load_index(path)
        got_ids, got_scores, run = run_of(idx, qv, qids, 100)
        m = evaluate(corpus.qrels, run)
        out["rows"].append({
            "index": name,
            "build_seconds": round(secs, 1),
            "codebook_sha256": codebook_sha256(idx),
            "ndcg@10": round(m["ndcg@10"], 4),
            "recall@100": round(m["recall@100"], 4),
            "bytes_per_doc": round(index_bytes(path) / len(ids), 1),
            "top100_ids_identical": got_ids == ref_ids,
            "top100_scores_identical": bool(np.array_equal(got_scores, ref_scores)),
            "ndcg@10_equal_unsharded": m["ndcg@10"] == single_metrics["ndcg@10"],
        })
    out["command"] = "python scripts/sharded_scifact.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.markdown:
        lines = [f"# Sharded index on {corpus.name}: {args.shards} shards (local and Ray) vs one index", "",
                 f"{len(ids):,} documents, {len(qids)} judged test queries, pipeline `{args.pipeline}`, "
                 f"encoder `{out['encoder']}`; top-100 of every query compared with the unsharded "
                 "index's (ids and float32 scores, exact equality).", "",
                 "| index | build s | nDCG@10 | R@100 | B/doc | codebook sha256 | ids identical | scores identical |",
                 "|---|---:|---:|---:|---:|---|:-:|:-:|"]
        for r in out["rows"]:
            lines.append(f"| {r['index']} | {r['build_seconds']} | {r['ndcg@10']:.4f} | {r['recall@100']:.4f} | "
                         f"{r['bytes_per_doc']:,.0f} | `{(r['codebook_sha256'] or '')[:16]}…` | "
                         f"{'yes' if r['top100_ids_identical'] else 'NO'} | {'yes' if r['top100_scores_identical'] else 'NO'} |")
        lines += ["", "Build times include encoding; the unsharded row's time is its encode and in-memory "
                  "build. Bytes per document count every file of every shard (each shard stores the "
                  "codebook: shards x codebook bytes in all).", "", f"Command: `{out['command']}`", ""]
        Path(args.markdown).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
