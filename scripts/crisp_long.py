#!/usr/bin/env python
"""CRISP trained long enough to show what it does (issue #15 item 1): training curves of
no-CRISP, C25, C50 and C8x32 on cached lower-layer states, beside the full-backprop recipe.

Every recipe trains on SciFact + SQuAD training pairs with ``--heldout`` SciFact training
queries held out (never the test split); at ``--eval-every`` steps it records the training
loss, the held-out loss and the held-out queries' nDCG@10 by exact MaxSim over their judged
documents plus ``--distractors`` seeded other SciFact documents -- with the recipe's own
clustering, and for no-CRISP also with post-hoc clustering at the C25 / C50 / C8x32 budgets
(the question: does a clusterable encoder beat clustering a normal one at the same budget?).
Each recipe's final checkpoint is saved under ``--out`` (``crisp-long-<label>``), loadable by
``eval/build --checkpoint``. Results merge into ``eval/results/crisp_long.{json,md}`` so
recipes can run one at a time.

Usage::

    python scripts/crisp_long.py --recipe no-crisp --recipe C25 --recipe C50 --recipe C8x32 \\
        --steps 400 --train-layers 2
    python scripts/crisp_long.py --recipe full --steps 102      # the reference recipe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = {  # label -> crisp spec (None: no CRISP)
    "no-crisp": None,
    "C25": "25%",
    "C50": "50%",
    "C8x32": "8x32",
    "full": None,  # the full-backprop reference (all layers trained, no cache)
}
POSTHOC = ("25%", "50%", "8x32")
OUT_JSON = Path("eval/results/crisp_long.json")
OUT_MD = Path("eval/results/crisp_long.md")
OUT_PNG = Path("eval/results/crisp_long.png")


def flatten_step(points: list[dict], key: str = "own", tol: float = 0.005) -> int | None:
    """First evaluated step from which held-out nDCG@10 never rises more than ``tol`` above
    its value there (None: still rising by more than ``tol`` at the last point)."""
    vals = [p["ndcg"][key] for p in points]
    for i, v in enumerate(vals[:-1]):
        if max(vals[i:]) - v <= tol:
            return points[i]["step"]
    return None


def run(a: argparse.Namespace) -> list[dict]:
    import torch

    from retrieval_prune.encode.checkpoint import colbert_spec, save_checkpoint
    from retrieval_prune.evaluation.metrics import evaluate
    from retrieval_prune.train.cached import heldout_split, train_curve
    from retrieval_prune.train.data import load_pairs
    from retrieval_prune.train.loop import TrainConfig

    pairs = [load_pairs(n, negatives="auto", progress=not a.quiet) for n in a.data]
    held_name = a.data[0]
    train_pairs, held = heldout_split(pairs[0], a.heldout, seed=a.seed)
    pairs = [train_pairs, *pairs[1:]]
    rows = []
    for label in a.recipe:
        crisp = RECIPES[label]
        n_frozen = 0 if label == "full" else 6 - a.train_layers
        cfg = TrainConfig(data=tuple(a.data), crisp=crisp, max_steps=a.steps, seed=a.seed,
                          threads=a.threads, precision="float32")
        steps = list(range(0, a.steps + 1, a.eval_every))
        if steps[-1] != a.steps:
            steps.append(a.steps)
        t0 = time.monotonic()
        if a.timing_only:  # no evaluation, no checkpoint: seconds per step, side by side
            print(f"== timing {label}: frozen layers {n_frozen}, {a.steps} steps", flush=True)
            _, _, info = train_curve(
                cfg, pairs, held, n_frozen=n_frozen, eval_steps=[],
                cache_folder=a.cache, distractors=a.distractors, progress=not a.quiet)
            rows.append({"label": label, "frozen_layers": n_frozen, "steps": info["steps"],
                         "threads": torch.get_num_threads(),
                         "seconds_per_step": info["seconds_per_step"],
                         "mean_seconds_per_step": info["mean_seconds_per_step"],
                         "trainable_parameters": info["trainable_parameters"],
                         "command": "python scripts/crisp_long.py " + " ".join(sys.argv[1:]),
                         "note": a.note})
            print(f"  {info['seconds_per_step']:.3f} s/step (median)", flush=True)
            continue
        print(f"== {label}: crisp={crisp}, frozen layers {n_frozen}, {a.steps} steps", flush=True)
        model, points, info = train_curve(
            cfg, pairs, held, n_frozen=n_frozen, eval_steps=steps,
            metric=lambda qrels, run: evaluate(qrels, run, ("nDCG@10",))["ndcg@10"],
            posthoc=POSTHOC if crisp is None else (), cache_folder=a.cache,
            distractors=a.distractors, progress=not a.quiet,
            log=lambda s: print(f"  {s}", flush=True))
        pts = [asdict(p) for p in points]
        ck = Path(a.out) / f"crisp-long-{label}"
        row = {
            "label": label, "crisp": crisp, "frozen_layers": n_frozen,
            "trained_layers": 6 - n_frozen, "steps": info["steps"],
            "seconds_per_step": info["seconds_per_step"],
            "mean_seconds_per_step": info["mean_seconds_per_step"], "train_seconds": info["train_seconds"],
            "cache_seconds": round(info["cache_seconds"], 1),
            "wall_seconds": round(time.monotonic() - t0, 1),
            "trainable_parameters": info["trainable_parameters"],
            "heldout": {"collection": held_name, "queries": len(held),
                        "distractors": a.distractors, "seed": a.seed},
            "flattens_at": flatten_step(pts), "points": pts, "loss_per20": info["loss_per20"],
            "checkpoint": str(ck), "config": cfg.to_dict(),
            "command": "python scripts/crisp_long.py " + " ".join(sys.argv[1:]),
            "torch_threads": torch.get_num_threads(),
            "note": a.note,
        }
        meta = {"training": {"config": cfg.to_dict(), "recipe": "cached lower layers"
                             if n_frozen else "full backprop", "frozen_layers": n_frozen,
                             "steps": info["steps"], "heldout": row["heldout"],
                             "curve": pts},
                "index_pipeline": "exact" if crisp is None else cfg.crisp_spec.plugin_spec}
        save_checkpoint(model, ck, meta, spec=colbert_spec(doc_maxlen=cfg.index_doc_maxlen,
                                                           query_maxlen=cfg.query_maxlen),
                        overwrite=True)
        rows.append(row)
        merge(row)
    if a.timing_only:
        merge_timing(rows)
    return rows


def merge(row: dict) -> None:
    old = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {"rows": []}
    rows = [r for r in old["rows"] if r["label"] != row["label"]] + [row]
    order = list(RECIPES)
    rows.sort(key=lambda r: order.index(r["label"]))
    timing = old.get("timing", [])
    OUT_JSON.write_text(json.dumps({"rows": rows, "timing": timing}, indent=1) + "\n")
    OUT_MD.write_text(markdown(rows, timing))
    from retrieval_prune.evaluation.plot import training_curves_plot

    training_curves_plot(rows, OUT_PNG)


def merge_timing(new: list[dict]) -> None:
    """``--timing-only`` rows replace those of the same recipe and thread count."""
    old = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {"rows": []}
    keys = {(r["label"], r["threads"]) for r in new}
    timing = [r for r in old.get("timing", []) if (r["label"], r["threads"]) not in keys] + new
    OUT_JSON.write_text(json.dumps({"rows": old["rows"], "timing": timing}, indent=1) + "\n")
    OUT_MD.write_text(markdown(old["rows"], timing))


def markdown(rows: list[dict], timing: list[dict] = ()) -> str:
    out = ["# CRISP trained long: training curves on cached lower-layer states (issue #15)", ""]
    out += ["Held-out SciFact **training** queries (never the test split); nDCG@10 by exact "
            "MaxSim over their judged documents plus seeded distractors; documents at the "
            "training length (180 tokens). `own` = the recipe's own clustering (none for "
            "no-CRISP); `post-hoc` = k-means of the no-CRISP encoder's vectors at the same "
            "budget. Commands: the `command` of each row in the JSON. Plot: `crisp_long.png`.", ""]
    out += ["| recipe | trained layers | steps | s/step | cache s | flattens at | held-out nDCG@10 | vec/doc | held-out loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        last = r["points"][-1]
        out.append(f"| {r['label']} | {r['trained_layers']} | {r['steps']} | "
                   f"{r['seconds_per_step']:.2f} | {r['cache_seconds']:.0f} | "
                   f"{r['flattens_at'] if r['flattens_at'] is not None else 'not yet'} | "
                   f"{last['ndcg']['own']:.4f} | {last['vectors_per_doc']['own']:.1f} | "
                   f"{last['heldout_loss']:.3f} |")
    base = next((r for r in rows if r["label"] == "no-crisp"), None)
    if base:
        last = base["points"][-1]
        out += ["", "## Same vector budget: CRISP-trained vs post-hoc clustering of no-CRISP", "",
                "| budget | CRISP-trained nDCG@10 | vec/doc | no-CRISP + post-hoc nDCG@10 | vec/doc | CRISP - post-hoc |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["crisp"] is None:
                continue
            key = f"{r['label']} post-hoc"
            if key not in last["ndcg"]:
                continue
            own = r["points"][-1]
            out.append(f"| {r['label']} | {own['ndcg']['own']:.4f} | "
                       f"{own['vectors_per_doc']['own']:.1f} | {last['ndcg'][key]:.4f} | "
                       f"{last['vectors_per_doc'][key]:.1f} | "
                       f"{own['ndcg']['own'] - last['ndcg'][key]:+.4f} |")
        out.append(f"| none (no-CRISP) | - | - | {last['ndcg']['own']:.4f} | "
                   f"{last['vectors_per_doc']['own']:.1f} | - |")
    if timing:
        out += ["", "## Time per step, measured side by side (`--timing-only`, no evaluation)", "",
                "| recipe | trained layers | threads | steps | s/step (median) | s/step (mean) | "
                "trainable parameters |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in timing:
            out.append(f"| {r['label']} | {6 - r['frozen_layers']} | {r['threads']} | "
                       f"{r['steps']} | {r['seconds_per_step']:.3f} | "
                       f"{r['mean_seconds_per_step']:.3f} | {r['trainable_parameters']:,} |")
    notes = [f"- {r['label']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        out += ["", "## Notes", "", *notes]
    out += ["", "## Curves", ""]
    for r in rows:
        keys = list(r["points"][0]["ndcg"])
        out += [f"### {r['label']}", "",
                "| step | train s | train loss | held-out loss | " + " | ".join(f"nDCG@10 {k}" for k in keys) + " |",
                "|---:|---:|---:|---:|" + "---:|" * len(keys)]
        for p in r["points"]:
            tl = "-" if p["train_loss"] != p["train_loss"] else f"{p['train_loss']:.3f}"
            out.append(f"| {p['step']} | {p['seconds']:.0f} | {tl} | {p['heldout_loss']:.3f} | "
                       + " | ".join(f"{p['ndcg'][k]:.4f}" for k in keys) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", action="append", choices=list(RECIPES), required=True)
    ap.add_argument("--data", action="append", default=None,
                    help="training collections; the first one gives the held-out queries")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--train-layers", type=int, default=2, help="top layers trained (cached recipe)")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--distractors", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=".cache/train/layer-states")
    ap.add_argument("--out", default=".cache/checkpoints")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--timing-only", action="store_true",
                    help="only time --steps steps of each recipe (no evaluation, no "
                    "checkpoint), into the report's time-per-step table")
    ap.add_argument("--note", default=None,
                    help="a line kept with the row (e.g. what else the host was running)")
    a = ap.parse_args()
    a.data = a.data or ["scifact", "squad"]
    if not 1 <= a.train_layers <= 5:
        ap.error(f"--train-layers {a.train_layers}: give 1..5 (the full recipe is --recipe full)")
    run(a)
    print(OUT_MD.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
