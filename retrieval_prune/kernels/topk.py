"""Small fused top-k helpers for scans: sorted insertion arrays and a k-way merge.

A scan keeps, per (chunk, query), a short list sorted best first: higher score first,
and on equal scores the lower id first (deterministic). ``topk_push`` inserts into
such a list; ``topk_merge`` merges the per-chunk lists of every query into the final
fixed-shape ``(n_queries, k)`` result, padding with ``pad_score`` / id ``-1``.

Scores may be float32 (MaxSim) or int64 (negated Hamming distances): the functions are
generic and Numba compiles one version per dtype.
"""

import numpy as np
from numba import njit

from ._config import NJIT


@njit(**NJIT)
def topk_push(ts, ti, n, k, s, i):
    """Insert ``(s, i)`` into the best-first lists ``ts``/``ti`` holding ``n`` entries.

    Returns the new entry count (at most ``k``). An entry that is not better than the
    current k-th one is dropped; equal scores keep the lower id first.
    """
    if n == k:
        ws = ts[k - 1]
        if s < ws or (s == ws and i > ti[k - 1]):
            return n
        p = k - 1
    else:
        p = n
        n += 1
    while p > 0:
        ps = ts[p - 1]
        if ps > s or (ps == s and ti[p - 1] < i):
            break
        ts[p] = ps
        ti[p] = ti[p - 1]
        p -= 1
    ts[p] = s
    ti[p] = i
    return n


@njit(**NJIT)
def topk_merge(ts, ti, cnt, pad_score, out_s, out_i):
    """Merge per-chunk lists ``ts/ti (n_chunks, n_q, k)`` with counts ``cnt (n_chunks, n_q)``.

    Writes the best ``k`` of every query into ``out_s``/``out_i`` ``(n_q, k)``; missing
    slots get ``pad_score`` and id ``-1``. Serial: it touches ``n_chunks * k`` entries
    per query, negligible next to the scan (and a parallel version compiles slower).
    """
    nch = ts.shape[0]
    nq = ts.shape[1]
    k = out_s.shape[1]
    for q in range(nq):
        pos = np.zeros(nch, np.int64)
        for r in range(k):
            best = -1
            bs = pad_score
            bi = np.int64(-1)
            for c in range(nch):
                p = pos[c]
                if p < cnt[c, q]:
                    s = ts[c, q, p]
                    i = ti[c, q, p]
                    if best < 0 or s > bs or (s == bs and i < bi):
                        best = c
                        bs = s
                        bi = i
            if best < 0:
                for rr in range(r, k):
                    out_s[q, rr] = pad_score
                    out_i[q, rr] = -1
                break
            out_s[q, r] = bs
            out_i[q, r] = bi
            pos[best] += 1
