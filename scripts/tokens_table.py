#!/usr/bin/env python
"""Assemble the token-pruning results table (issue #4) from ``retrieval-prune eval --json`` files.

Every input row keeps its ``eval --json`` fields (``delta_ndcg@10`` is against exact MaxSim of
*the same checkpoint*, i.e. its unpruned reference). This script adds

- ``model``: a short name of the checkpoint (``zero-shot-128``, ``ft128``, ``crisp8x32``, ...);
- ``training``: the checkpoint's training summary (steps, minutes, CRISP mode) when it has one;
- ``delta_vs_finetuned``: nDCG@10 minus the unpruned fine-tuned (non-CRISP) model's on the
  same dataset -- the comparison the CRISP acceptance criterion asks for.

Usage::

    python scripts/tokens_table.py --finetuned ft128 --json eval/results/tokens_scifact.json \\
        --markdown eval/results/tokens_scifact.md ROWS.json [ROWS.json ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def model_name(checkpoint: str) -> str:
    if checkpoint in ("zero-shot", None):
        return "zero-shot-384"
    if checkpoint == "untrained-colbert":
        return "zero-shot-128"
    return Path(checkpoint).name


def training_summary(checkpoint: str) -> dict | None:
    cfg = Path(checkpoint) / "config.json"
    if not cfg.is_file():
        return None
    meta = json.loads(cfg.read_text()).get("metadata", {}).get("training")
    if not meta:
        return None
    c = meta.get("config", {})
    return {
        "crisp": c.get("crisp"),
        "steps": meta.get("steps"),
        "schedule_steps": c.get("max_steps"),
        "minutes": round(meta.get("seconds", 0.0) / 60, 1),
        "finished": meta.get("finished"),
        "stopped_by": meta.get("stopped_by"),
        "threads": meta.get("threads"),
        "data": [d.get("name") for d in meta.get("data", [])],
        "seed": c.get("seed"),
    }


COLUMNS = [
    ("dataset", "{}"), ("model", "{}"), ("pipeline", "`{}`"), ("ndcg@10", "{:.4f}"),
    ("delta_ndcg@10", "{:+.4f}"), ("delta_vs_finetuned", "{:+.4f}"), ("recall@100", "{:.4f}"),
    ("vectors_per_doc", "{:.1f}"), ("bytes_per_doc", "{:,.0f}"), ("exact_top10_recall", "{:.3f}"),
    ("p50_ms", "{:.1f}"),
]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        cells = []
        for c, f in COLUMNS:
            v = r.get(c)
            cells.append("" if v is None else f.format(v).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="eval --json files")
    ap.add_argument("--finetuned", default="ft128", help="model name of the unpruned fine-tuned reference")
    ap.add_argument("--json", required=True)
    ap.add_argument("--markdown", required=True)
    a = ap.parse_args(argv)

    rows: list[dict] = []
    for f in a.rows:
        rows.extend(json.loads(Path(f).read_text()))
    for r in rows:
        r["model"] = model_name(r.get("checkpoint"))
        r["training"] = training_summary(r.get("checkpoint") or "")
    ref = {r["dataset"]: r["ndcg@10"] for r in rows
           if r["model"] == a.finetuned and r["pipeline"] in ("exact", "flat")}
    for r in rows:
        if r["dataset"] in ref:
            r["delta_vs_finetuned"] = r["ndcg@10"] - ref[r["dataset"]]
    Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    Path(a.markdown).write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
