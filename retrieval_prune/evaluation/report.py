"""Report formatting shared by ``retrieval-prune eval`` and the benchmarks: the eval table."""

from __future__ import annotations

from typing import Any

__all__ = ["EVAL_COLUMNS", "format_table"]

EVAL_COLUMNS = [
    ("dataset", "dataset", "{}"),
    ("pipeline", "pipeline", "{}"),
    ("ndcg@10", "nDCG@10", "{:.4f}"),
    ("delta_ndcg@10", "Δ exact", "{:+.4f}"),
    ("recall@100", "R@100", "{:.4f}"),
    ("mrr@10", "MRR@10", "{:.4f}"),
    ("exact_top10_recall", "top10∩exact", "{:.3f}"),
    ("bytes_per_doc", "bytes/doc", "{:,.0f}"),
    ("vectors_per_doc", "vec/doc", "{:.1f}"),
    ("compression_ratio", "x fp32", "{:.1f}"),
    ("build_s", "build s", "{:.1f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p95_ms", "p95 ms", "{:.2f}"),
    ("peak_rss_mb", "peak MiB", "{:,.0f}"),
]


def format_table(rows: list[dict[str, Any]], columns=EVAL_COLUMNS) -> str:
    """A Markdown table of eval rows."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
