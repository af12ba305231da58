"""The compression–quality frontier (nDCG@10 against bytes per document, log scale) and
training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["pareto_front", "frontier_plot", "training_curves_plot"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (fewer-or-equal bytes and higher-or-equal quality).

    ``points`` are ``(bytes, quality)``; the result is sorted by bytes.

    >>> pareto_front([(10, 0.5), (20, 0.4), (30, 0.7), (5, 0.1)])
    [3, 0, 2]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _label_offsets(pts: Sequence[tuple[float, float]], *, height_pt: float,
                   line_pt: float = 8.0, width: float = 0.22) -> list[float]:
    """Vertical label offsets (points) so that labels of nearby points do not overlap.

    Positions are normalised to the panel (log bytes, quality); going down in quality,
    a label that would land within one text line of a label already placed less than
    ``width`` of the panel to its side is pushed down a line at a time.
    """
    import math

    if not pts:
        return []
    lx = [math.log10(max(x, 1e-9)) for x, _ in pts]
    ys = [y for _, y in pts]
    xr = (max(lx) - min(lx)) or 1.0
    yr = (max(ys) - min(ys)) or 1.0
    pt_per_y = height_pt / yr
    placed: list[tuple[float, float]] = []  # (normalised x, label baseline in points)
    out = [4.0] * len(pts)
    for i in sorted(range(len(pts)), key=lambda j: -ys[j]):
        nx = (lx[i] - min(lx)) / xr
        base = ys[i] * pt_per_y
        off = 4.0
        while any(abs(nx - px) < width and abs(base + off - pb) < line_pt for px, pb in placed):
            off -= line_pt
        placed.append((nx, base + off))
        out[i] = off
    return out


def frontier_plot(rows: Sequence[dict[str, Any]], path: str | Path, *,
                  metric: str = "ndcg@10", title: str | None = None) -> Path:
    """Write a PNG with one panel per dataset: each pipeline a point, the front joined.

    The exact uncompressed baseline is drawn as a star and a dashed line; rows whose
    ``engine`` is ``"plaid"`` are drawn as squares and labelled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no rows to plot; run an evaluation first")
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    n = len(datasets)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.6 * nrows), squeeze=False)
    for ax, ds in zip(axes.ravel(), datasets, strict=False):
        sub = [r for r in rows if r["dataset"] == ds]
        pts = [(float(r["bytes_per_doc"]), float(r[metric])) for r in sub]
        front = set(pareto_front(pts))
        offsets = _label_offsets(pts, height_pt=4.6 * 72 * 0.75)
        for i, (r, (x, y)) in enumerate(zip(sub, pts, strict=False)):
            engine = r.get("engine", "retrieval_prune")
            is_exact = r.get("pipeline") in ("exact", "flat")
            marker = "*" if is_exact else ("s" if engine == "plaid" else "o")
            color = "black" if is_exact else ("tab:red" if engine == "plaid" else
                                              ("tab:blue" if i in front else "tab:gray"))
            ax.scatter([x], [y], marker=marker, s=90 if is_exact else 40, color=color, zorder=3)
            label = r.get("label") or r.get("pipeline", "")
            if engine == "plaid":
                label = f"PLAID nbits={r.get('nbits', '?')}"
            ax.annotate(label[:34], (x, y), textcoords="offset points", xytext=(4, offsets[i]),
                        fontsize=7, color=color)
        fx = sorted((pts[i] for i in front), key=lambda p: p[0])
        ax.plot([p[0] for p in fx], [p[1] for p in fx], "-", color="tab:blue", alpha=0.6,
                label="Pareto front", zorder=2)
        exact = sub[0].get(f"exact_{metric}")
        if exact is not None:
            ax.axhline(float(exact), ls="--", color="black", lw=0.8,
                       label=f"exact MaxSim {float(exact):.3f}")
        ax.set_xscale("log")
        ax.margins(x=0.18, y=0.08)  # room for the labels of the rightmost points
        ax.set_xlabel("index bytes per document (log scale)")
        ax.set_ylabel(metric)
        ax.set_title(ds)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(title or "compression–quality frontier")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def training_curves_plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write a PNG of training curves (``scripts/crisp_long.py`` rows): held-out nDCG@10
    and held-out loss against training steps, one line per recipe; a no-CRISP row's
    post-hoc clusterings are drawn dashed in the colour of the CRISP recipe of that budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no rows to plot; run scripts/crisp_long.py first")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12.4, 4.6))
    colours = {}
    for r in rows:
        steps = [p["step"] for p in r["points"]]
        (line,) = a1.plot(steps, [p["ndcg"]["own"] for p in r["points"]], marker="o", ms=3,
                          label=f"{r['label']} ({r['trained_layers']} layers trained)")
        colours[r["label"]] = line.get_color()
        a2.plot(steps, [p["heldout_loss"] for p in r["points"]], marker="o", ms=3,
                color=line.get_color(), label=r["label"])
    for r in rows:
        if r["crisp"] is not None:
            continue
        for key in r["points"][0]["ndcg"]:
            if key == "own":
                continue
            budget = key.split()[0]
            a1.plot([p["step"] for p in r["points"]], [p["ndcg"][key] for p in r["points"]],
                    ls="--", lw=1, color=colours.get(budget, "grey"),
                    label=f"{r['label']} + {key}")
    a1.set_xlabel("training step")
    a1.set_ylabel("held-out nDCG@10 (SciFact train queries)")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    a2.set_xlabel("training step")
    a2.set_ylabel("held-out loss")
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
