#!/usr/bin/env python
"""The latency table (issue #14, items 3 and 5): ours beside the strongest CPU peers —
colbert-ai PLAID, fast-plaid and xtr-warp-rs — with search-only and end-to-end columns.

A thin wrapper of ``retrieval-prune bench peers`` (logic:
``retrieval_prune/evaluation/bench_plaid.py`` and ``peers.py``) that writes
``eval/results/latency_{data}.json`` and ``.md`` unless ``--json`` / ``--markdown`` are
given, at one thread unless ``--threads`` is. Every other option is ``bench peers``'s.

Needs colbert-ai for the PLAID rows (``pip install -e '.[plaid]'``; ``--nbits`` with no
value skips them) and ``make peers`` for fast-plaid and xtr-warp-rs (without it their rows
carry an ``error`` and the rest still run).

Usage::

    python scripts/latency_table.py --data scifact --checkpoint .cache/checkpoints/ft128 \\
        --pipeline default -q
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval_prune.cli import main  # noqa: E402


def argv_for(args: list[str]) -> list[str]:
    """``bench peers`` arguments: ``args`` plus the default outputs and thread count."""
    data = None
    for i, a in enumerate(args):
        if a == "--data" and i + 1 < len(args):
            data = args[i + 1]
        elif a.startswith("--data="):
            data = a.split("=", 1)[1]
    if data is None:
        raise SystemExit("latency_table.py needs --data NAME (e.g. --data scifact)")
    name = Path(data).name or data
    out = ["bench", "peers", *args]
    if not any(a == "--json" or a.startswith("--json=") for a in args):
        out += ["--json", f"eval/results/latency_{name}.json"]
    if not any(a == "--markdown" or a.startswith("--markdown=") for a in args):
        out += ["--markdown", f"eval/results/latency_{name}.md"]
    if not any(a == "--threads" or a.startswith("--threads=") for a in args):
        out += ["--threads", "1"]
    return out


if __name__ == "__main__":
    sys.exit(main(argv_for(sys.argv[1:])))
