#!/usr/bin/env python
"""The random control of a data selection: per collection, ``random_pairs`` keeping exactly
as many training queries as the given selection kept (SemDeDup removes a different share of
each collection, so one ``keep`` fraction cannot match it).

Usage::

    python scripts/random_like.py .cache/pre/sd-0.1.json --seed 0 --out .cache/pre/rnd-like-sd-0.1.json
    retrieval-prune train --data scifact --data squad --select .cache/pre/rnd-like-sd-0.1.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval_prune.preprocess.base import PairSet, Selection, StepReport  # noqa: E402
from retrieval_prune.train.data import load_pairs  # noqa: E402
from retrieval_prune.train.select import build_data_step, save_selection  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("like", help="a selection file (preprocess --data ... --out FILE.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.like).read_text())
    kept, details, specs, seconds = {}, {}, [], 0.0
    n_in = n_out = 0
    for name, c in doc["counts"].items():
        pairs = load_pairs(name, negatives="none", progress=False)
        n, k = len(pairs.query_ids), int(c["kept"])
        if n != int(c["queries"]):
            raise SystemExit(f"{name}: {n} training queries now, {c['queries']} in {args.like}")
        step = build_data_step(f"random_pairs:keep={k / n!r},seed={args.seed}")
        sel = step.select([PairSet(pairs.name, list(pairs.query_ids))])
        assert len(sel.kept[pairs.name]) == k, (name, k, len(sel.kept[pairs.name]))
        kept[name] = sel.kept[pairs.name]
        details[name] = {"queries": n, "kept": k, "step": step.spec}
        specs.append(step.spec)
        seconds += sel.report.seconds
        n_in, n_out = n_in + n, n_out + k
    spec = f"random_pairs like ({doc['spec']}), seed={args.seed}"
    report = StepReport(step=spec, stage="data", kept_fraction=n_out / n_in, bytes_before=n_in,
                        bytes_after=n_out, seconds=seconds, lossless=False,
                        details={**details, "like": str(args.like), "steps": specs})
    save_selection(Selection(kept, {name: {} for name in kept}, report), args.out)
    for name, d in details.items():
        print(f"{name}: kept {d['kept']} of {d['queries']} ({d['step']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
