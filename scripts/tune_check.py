#!/usr/bin/env python
"""Does `retrieval-prune tune` keep its promise on real judgements?

For each collection: run ``tune`` (no qrels read) for a loss budget, then evaluate its chosen
spec with ``eval`` on the real test qrels beside exact MaxSim, and record the estimated and
the real relative nDCG@10 loss (``-delta / exact``), the size, and whether the real loss is
within the budget. Also (``--prior NAME:SPLIT``) the chance that exact MaxSim's rank-r
document is relevant on a training split, the measurement behind tune's pseudo-judgement
grades (train qrels only).

Usage::

    python scripts/tune_check.py --data med --data cranfield --data cisi --data scifact \\
        --checkpoint ft128 --max-loss 0.01
    python scripts/tune_check.py --prior scifact:train --checkpoint ft128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval_prune.atomic import atomic_write_json  # noqa: E402
from retrieval_prune.evaluation.tune import QUERY_SOURCES  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "eval" / "results"


def relevance_by_rank(name: str, split: str, checkpoint: str | None) -> dict[str, Any]:
    """P(relevant | exact MaxSim rank r), r = 1..100, on ``name``'s ``split`` qrels, and the
    power-law exponent fitted over ranks 1-30."""
    from retrieval_prune.data.beir import load_beir, resolve_dataset
    from retrieval_prune.encode import Encoder
    from retrieval_prune.encode.cache import EmbeddingCache, cache_root
    from retrieval_prune.evaluation.runner import exact_maxsim_run

    c = load_beir(resolve_dataset(name), split=split)
    enc = Encoder.load(checkpoint)
    docs = EmbeddingCache(cache_root() / "embeddings").get_or_encode(
        enc, c.name, c.doc_ids, c.doc_texts, kind="docs")
    qids, qtexts = c.judged_queries()
    run = exact_maxsim_run(docs, c.doc_ids, enc.encode_queries(qtexts), qids)
    hits = np.zeros(100)
    for q in qids:
        rel = {d for d, g in c.qrels[q].items() if g > 0}
        for r, (d, _) in enumerate(sorted(run[q].items(), key=lambda x: -x[1])[:100]):
            hits[r] += d in rel
    pi = hits / len(qids)
    r = np.arange(1, 31)
    m = pi[:30] > 0
    power = float(-np.polyfit(np.log(r[m]), np.log(pi[:30][m]), 1)[0])
    return {"data": name, "split": split, "checkpoint": checkpoint or "zero-shot",
            "queries": len(qids), "p_rel_by_rank": [round(float(x), 5) for x in pi],
            "power": power}


def check(name: str, checkpoint: str | None, max_loss: float, queries: str,
          n_queries: int) -> dict[str, Any]:
    from retrieval_prune.evaluation.runner import evaluate_grid
    from retrieval_prune.evaluation.tune import tune

    t0 = time.perf_counter()
    res = tune(name, checkpoint=checkpoint, max_loss=max_loss, queries=queries,
               n_queries=n_queries, progress=False)
    tune_s = time.perf_counter() - t0
    chosen = next(p for p in res.tried if p["pipeline"] == res.chosen and p["n_docs"] == res.n_docs)
    specs = list(dict.fromkeys([res.chosen, "default"]))
    rows = evaluate_grid([name], specs, checkpoint=checkpoint, progress=False)
    real = {r["pipeline"]: r for r in rows}
    out = {"data": name, "checkpoint": checkpoint or "zero-shot", "max_loss": max_loss,
           "queries": queries, "n_queries": res.n_queries, "tune_s": tune_s,
           "builds": len(res.tried), "rungs": res.rungs, "chosen": res.chosen,
           "feasible": res.feasible, "est_loss": chosen["est_loss"],
           "exact_ndcg@10": rows[0]["exact_ndcg@10"]}
    for spec, tag in ((res.chosen, "chosen"), ("default", "default")):
        r = real[spec]
        out[f"{tag}_ndcg@10"] = r["ndcg@10"]
        out[f"{tag}_real_loss"] = -r["delta_ndcg@10"] / r["exact_ndcg@10"]
        out[f"{tag}_bytes_per_doc"] = r["bytes_per_doc"]
        out[f"{tag}_compression_ratio"] = r["compression_ratio"]
        out[f"{tag}_p50_ms"] = r["p50_ms"]
    from retrieval_prune.pipeline.spec import ALIASES

    out["default_est_loss"] = next((p["est_loss"] for p in res.tried[::-1]
                                    if p["pipeline"] in ("default", ALIASES["default"])), None)
    out["within_budget"] = out["chosen_real_loss"] <= max_loss
    out["frontier"] = res.frontier
    return out


def write_md(doc: dict[str, Any], path: Path) -> None:
    lines = ["# `retrieval-prune tune` against real judgements", "",
             "tune reads no qrels: its loss is 1 - nDCG@10 against graded pseudo-judgements of "
             "exact MaxSim (see retrieval_prune/evaluation/tune.py). Each chosen spec is then "
             "evaluated on the collection's real test qrels; real loss = -delta nDCG@10 / "
             "exact nDCG@10 of the same encoder. `default` beside it for scale.", "",
             "| data | encoder | queries | budget | chosen | est. loss | real loss | within | "
             "B/doc | ratio | p50 ms | default real loss | default B/doc | tune s | builds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc.get("checks", []):
        lines.append(
            f"| {r['data']} | {r['checkpoint']} | {r['queries']} {r['n_queries']} | "
            f"{r['max_loss']:.3f} | `{r['chosen']}` | {r['est_loss']:.4f} | "
            f"{r['chosen_real_loss']:+.4f} | {'yes' if r['within_budget'] else 'NO'} | "
            f"{r['chosen_bytes_per_doc']:.0f} | {r['chosen_compression_ratio']:.1f}x | "
            f"{r['chosen_p50_ms']:.2f} | {r['default_real_loss']:+.4f} | "
            f"{r['default_bytes_per_doc']:.0f} | {r['tune_s']:.0f} | {r['builds']} |")
    checks = doc.get("checks", [])
    if checks:
        held = sum(r["within_budget"] for r in checks)
        lines += ["", f"Within budget on real qrels: {held} of {len(checks)}."]
    for p in doc.get("priors", []):
        lines += ["", f"P(relevant | exact rank r) on {p['data']} {p['split']} "
                      f"({p['checkpoint']}, {p['queries']} queries): ranks 1-10 "
                      f"{', '.join(f'{x:.3f}' for x in p['p_rel_by_rank'][:10])}; "
                      f"fitted r^-{p['power']:.2f} over ranks 1-30."]
    if doc.get("commands"):
        lines += ["", "Reproduce:", "", "```", *doc["commands"], "```"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", default=[])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--max-loss", type=float, default=0.01)
    ap.add_argument("--queries", default="corpus", choices=QUERY_SOURCES)
    ap.add_argument("--queries-n", type=int, default=100)
    ap.add_argument("--prior", action="append", default=[], metavar="NAME:SPLIT")
    ap.add_argument("--json", default=str(RESULTS / "tune_check.json"))
    ap.add_argument("--md", default=str(RESULTS / "tune_check.md"))
    args = ap.parse_args(argv)
    path = Path(args.json)

    def read() -> dict[str, Any]:
        return json.loads(path.read_text()) if path.is_file() else {"checks": [], "priors": []}

    cmd = "python scripts/tune_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for spec in args.prior:
        name, _, split = spec.partition(":")
        p = relevance_by_rank(name, split or "train", args.checkpoint)
        doc = read()
        doc["priors"] = [x for x in doc.get("priors", []) if (x["data"], x["split"], x["checkpoint"])
                         != (p["data"], p["split"], p["checkpoint"])] + [p]
        atomic_write_json(path, doc, indent=1)
        print(json.dumps({k: p[k] for k in ("data", "split", "checkpoint", "power")}))
    for name in args.data:
        r = check(name, args.checkpoint, args.max_loss, args.queries, args.queries_n)
        doc = read()
        key = (r["data"], r["checkpoint"], r["max_loss"], r["queries"])
        doc["checks"] = [x for x in doc.get("checks", [])
                         if (x["data"], x["checkpoint"], x["max_loss"], x["queries"]) != key] + [r]
        atomic_write_json(path, doc, indent=1)
        print(json.dumps({k: r[k] for k in ("data", "chosen", "est_loss", "chosen_real_loss",
                                             "within_budget", "tune_s")}))
    doc = read()
    doc["commands"] = list(dict.fromkeys(doc.get("commands", []) + [cmd]))
    atomic_write_json(path, doc, indent=1)
    write_md(doc, Path(args.md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
