#!/usr/bin/env python
"""Experiment (issue #14 item 2): would a stage-1 score table from PCA-projected queries and
centroids (d' of the 384 dims: a third to a half of the table's multiply-adds) keep the
staged search's answers? Top-10 overlap with brute force over the same codes (no qrels),
float32 projected tables against the index's own int8 table, at k=10 and k=100 budgets.

    python scripts/pca_table_fidelity.py .cache/idx/zs_default --data scifact

(the index: ``retrieval-prune build --data scifact --pipeline default --out
.cache/idx/zs_default``). Not wired into the engine: at k=10 it loses fidelity.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def projected_table(cent: np.ndarray, vt: np.ndarray, mu: np.ndarray, dp: int):
    """A ``_score_table`` replacement: ``q.c = q.mu + (P q).(P (c - mu))`` with ``P`` the
    top ``dp`` principal directions of the centroids, float32, lane-padded like the int8
    table."""
    dim = cent.shape[1]
    p = vt[:dp].T.astype(np.float32)
    cp = ((cent - mu) @ vt[:dp].T).astype(np.float32)
    mu32 = mu.astype(np.float32)

    def table(cache, qp):
        nv = qp.size // (dim * 16)
        q = qp.reshape(nv, dim, 16).transpose(0, 2, 1).reshape(nv * 16, dim)
        t = (q @ p) @ cp.T + (q @ mu32)[:, None]
        return np.ascontiguousarray(t.T, dtype=np.float32)

    return table


def overlap(res, ref) -> float:
    return float(np.mean([len(set(res.ids[i][:10]) & set(ref.ids[i][:10])) / 10
                          for i in range(len(res.ids))]))


def main() -> int:
    from staged_fidelity import add_index_args, open_index

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_index_args(ap)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 96, 128, 192])
    a = ap.parse_args()
    _, index, queries = open_index(a)
    cent = index._prepare()["centroids"].astype(np.float64)
    mu = cent.mean(0)
    _, s, vt = np.linalg.svd(cent - mu, full_matrices=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    bf = {k: index.search_bruteforce(queries, k=k) for k in (10, 100)}
    print("int8 table: " + "; ".join(
        f"k={k} top10_vs_bf {overlap(index.search(queries, k=k), bf[k]):.4f}" for k in (10, 100)))
    for dp in a.dims:
        index._score_table = projected_table(cent, vt, mu, dp)
        print(f"d'={dp} (variance kept {energy[dp - 1]:.3f}): " + "; ".join(
            f"k={k} top10_vs_bf {overlap(index.search(queries, k=k), bf[k]):.4f}" for k in (10, 100)),
            flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
