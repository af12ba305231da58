#!/usr/bin/env python
"""Which MatMuls of the int8 ONNX query encoder to keep in float32 (issue #14 item 1),
chosen on a **training** split, never test.

For one checkpoint, every variant of ``onnx_int8_model(..., keep_float=PATTERNS)`` encodes
every judged query of ``--split`` alone at one thread (interleaved query by query with the
float32 encoder, the starting variant rotating), and the vectors are searched by exact
MaxSim against the float32 document vectors (``EmbeddingCache``, as an int8 index stores
them). Each row: nDCG@10 and its delta against float32 on the same queries, the mean share
of float32's top 10 the variant returns (``top10_overlap``), and encode p50 in ms.

int8 is accepted where it loses at most 0.005 nDCG@10 (``query_encoder_bench.MAX_NDCG_LOSS``).

Usage::

    python scripts/int8_keep_float.py --checkpoint ft128 --data scifact --split train \\
        --json eval/results/int8_keep_float_scifact_train.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from query_encoder_bench import MAX_NDCG_LOSS, cpu_name, encode_interleaved  # noqa: E402

from retrieval_prune.data import load_beir  # noqa: E402
from retrieval_prune.encode import EmbeddingCache, Encoder  # noqa: E402
from retrieval_prune.encode.cache import cache_root  # noqa: E402
from retrieval_prune.encode.onnx_int8 import onnx_int8_model  # noqa: E402
from retrieval_prune.evaluation.runner import DatasetContext, run_quality  # noqa: E402
from retrieval_prune.index.flat import FlatIndex  # noqa: E402
from retrieval_prune.types import MultiVectors  # noqa: E402

#: label -> substrings of the ONNX MatMul node names kept in float32 (BERT's node names:
#: ``/encoder/layer.N/attention/self/{query,key,value}/MatMul``, ``.../intermediate/dense/``
#: (FFN up), ``.../output/dense/`` (FFN down and attention output), ``/projection/``)
VARIANTS: dict[str, tuple[str, ...]] = {
    "all-int8": (),
    "keep-proj": ("/projection/",),
    "keep-ffn-down": ("/output/dense/",),
    "keep-ffn-down+proj": ("/output/dense/", "/projection/"),
    "keep-ffn-up": ("/intermediate/dense/",),
    "keep-layer5": ("layer.5/",),
    "keep-layer0": ("layer.0/",),
    "keep-attn-qkv": ("/query/", "/key/", "/value/"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="ft128")
    ap.add_argument("--data", default="scifact")
    ap.add_argument("--split", default="train", help="a training split (never tune on test)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", default=None, help="default eval/results/int8_keep_float_"
                    "{data}_{split}.json (and .md beside it)")
    ap.add_argument("--note", default=None, help="a line for the report (e.g. what else ran)")
    args = ap.parse_args(argv)
    out_json = Path(args.json or f"eval/results/int8_keep_float_{args.data}_{args.split}.json")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])

    corpus = load_beir(args.data, split=args.split)
    qids, qtexts = (list(x) for x in corpus.judged_queries())
    docs = EmbeddingCache(cache_root() / "embeddings").get_or_encode(
        Encoder.load(args.checkpoint), corpus.name, corpus.doc_ids, corpus.doc_texts,
        kind="docs")
    torch.set_num_threads(1)
    enc = Encoder.load(args.checkpoint, precision="float32", num_threads=1)
    models = {"float32": enc._query_model}
    models.update({name: onnx_int8_model(enc.model, 1, keep_float=kf)
                   for name, kf in VARIANTS.items()})
    names = list(models)

    def encode(name: str, text: str) -> MultiVectors:
        enc._query_model = models[name]  # the same tokeniser and markers for every variant
        return enc.encode_queries([text])

    times, vecs = encode_interleaved({n: (lambda t, n=n: encode(n, t)) for n in names},
                                     qtexts, args.warmup)
    enc._query_model = models["float32"]
    ctx = DatasetContext(
        name=corpus.name, split=corpus.split, doc_ids=corpus.doc_ids, docs=docs, qids=qids,
        queries=MultiVectors.from_list(vecs["float32"]), qrels=corpus.qrels,
        encoder_settings=enc.settings, encoder_name=enc.name,
        query_encode_ms=float(np.median(times["float32"])),
    )
    index = FlatIndex()
    index.add(docs, corpus.doc_ids)
    base = ctx.exact_metrics["ndcg@10"]
    base_p50 = float(np.median(times["float32"]))
    rows = []
    for n in names:
        run = (ctx.exact_run if n == "float32"
               else index.search(MultiVectors.from_list(vecs[n]), k=100).to_run(qids))
        q = run_quality(ctx, run)
        p50 = float(np.median(times[n]))
        rows.append({
            "variant": n, "keep_float": list(VARIANTS.get(n, ())),
            "ndcg@10": round(q["ndcg@10"], 4), "delta_ndcg@10": round(q["ndcg@10"] - base, 5),
            "top10_overlap": round(q["exact_top10_recall"], 4),
            "encode_p50_ms": round(p50, 3), "speedup_p50_vs_float32": round(base_p50 / p50, 3),
            "accepted": n == "float32" or q["ndcg@10"] - base >= -MAX_NDCG_LOSS,
        })
        print(json.dumps(rows[-1]), flush=True)
    out = {"data": corpus.name, "split": corpus.split, "checkpoint": args.checkpoint,
           "n_queries": len(qids), "threads": 1, "cpu": cpu_name(),
           "max_ndcg_loss": MAX_NDCG_LOSS, "command": command, "note": args.note,
           "rows": rows}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(out, indent=1) + "\n")
    md = [f"# int8 ONNX query encoder: float32 MatMuls kept, {corpus.name} {corpus.split} "
          f"({len(qids)} queries, {args.checkpoint})", "",
          "Exact MaxSim over float32 document vectors; delta and top-10 overlap against the "
          "float32 encoder on the same queries; encode p50 at one thread, variants interleaved "
          f"query by query. Accepted: loses at most {MAX_NDCG_LOSS} nDCG@10.", "",
          "| variant | kept float32 | nDCG@10 | delta | top-10 overlap | encode p50 ms | "
          "speed-up | accepted |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {', '.join(r['keep_float']) or '-'} | {r['ndcg@10']:.4f} "
                  f"| {r['delta_ndcg@10']:+.4f} | {r['top10_overlap']:.4f} | "
                  f"{r['encode_p50_ms']:.2f} | {r['speedup_p50_vs_float32']:.2f}x | "
                  f"{'yes' if r['accepted'] else 'no'} |")
    md += ["", f"CPU: {out['cpu']}. Reproduce: `{command}`", ""]
    if args.note:
        md += [f"Note: {args.note}", ""]
    out_json.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
