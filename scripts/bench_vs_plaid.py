#!/usr/bin/env python
"""Benchmark against colbert-ai's PLAID (issue #5 item 6): a thin wrapper of
``retrieval-prune bench plaid`` (logic: ``retrieval_prune/evaluation/bench_plaid.py``).

Usage::

    python scripts/bench_vs_plaid.py --data scifact --checkpoint .cache/checkpoints/ft128 \\
        --json eval/results/plaid_scifact.json --markdown eval/results/plaid_scifact.md

Needs colbert-ai (``pip install -e '.[plaid]'``); ``--nbits`` with no value runs our
engine only.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval_prune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "plaid", *sys.argv[1:]]))
