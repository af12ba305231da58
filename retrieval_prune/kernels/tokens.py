"""Numba kernels of the token preprocessors (``retrieval_prune.preprocess.tokens``).

Every kernel works on the flat CSR arrays (``emb`` float32 ``(n_tokens, dim)``,
``offsets`` int64 ``(n_docs + 1,)``), runs in parallel over documents, writes into
preallocated outputs and validates nothing: the wrappers in ``preprocess/`` do.

The plug-ins share one shape of result: a *raw label* per token (int64, local to its
document): ``-1`` drops the token, otherwise tokens with the same label form one output
vector (their mean). The first ``protect[i]`` tokens of document ``i`` always get their own
position as label, so they pass through untouched. :func:`relabel_first_appearance`
turns raw labels into output rows ``0..c_i-1`` in order of first appearance and
:func:`aggregate_labels` computes the output vectors.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from retrieval_prune.kernels._config import NJIT, NJIT_PARALLEL

#: finite "infinity" (fastmath assumes no inf)
_BIG = 1e300


# -- shared: labels -> output rows --------------------------------------------------------
@njit(**NJIT_PARALLEL)
def relabel_first_appearance(raw, offsets, local, counts):
    """Map raw labels to ``0..c_i-1`` in order of first appearance; ``-1`` stays ``-1``.

    raw, local : int64 (n_tokens,); counts : int64 (n_docs,) output, ``c_i`` per document.
    """
    n_docs = offsets.shape[0] - 1
    for i in prange(n_docs):
        s = offsets[i]
        e = offsets[i + 1]
        n = e - s
        seen = np.full(n, -1, np.int64)
        c = 0
        for t in range(n):
            r = raw[s + t]
            if r < 0:
                local[s + t] = -1
                continue
            if seen[r] < 0:
                seen[r] = c
                c += 1
            local[s + t] = seen[r]
        counts[i] = c


@njit(**NJIT_PARALLEL)
def aggregate_labels(emb, weights, has_w, local, offsets, out_offsets, normalize, out_emb, out_w):
    """Mean of the tokens of each output row; weights are summed.

    ``out_emb`` float32 ``(n_out, dim)`` and ``out_w`` float32 ``(n_out,)`` must be zeroed.
    A row with one member is copied bit for bit; a row with two or more members is the
    mean of its members, re-normalised to unit length when ``normalize`` (a zero mean
    stays zero).
    """
    n_docs = offsets.shape[0] - 1
    dim = emb.shape[1]
    for i in prange(n_docs):
        s = offsets[i]
        e = offsets[i + 1]
        o = out_offsets[i]
        c = out_offsets[i + 1] - o
        size = np.zeros(c, np.int64)
        for t in range(s, e):
            lab = local[t]
            if lab < 0:
                continue
            row = o + lab
            size[lab] += 1
            for k in range(dim):
                out_emb[row, k] += emb[t, k]
            if has_w:
                out_w[row] += weights[t]
        for lab in range(c):
            if size[lab] < 2:
                continue
            row = o + lab
            inv = np.float32(1.0) / np.float32(size[lab])
            for k in range(dim):
                out_emb[row, k] *= inv
            if normalize:
                nrm = 0.0
                for k in range(dim):
                    nrm += out_emb[row, k] * out_emb[row, k]
                if nrm > 0.0:
                    f = np.float32(1.0 / np.sqrt(nrm))
                    for k in range(dim):
                        out_emb[row, k] *= f


@njit(**NJIT)
def _protect_labels(raw, s, p):
    for t in range(p):
        raw[s + t] = t


# -- attention pruning --------------------------------------------------------------------
@njit(**NJIT_PARALLEL)
def topk_labels(weights, offsets, protect, budget, raw):
    """Keep the ``budget[i]`` unprotected tokens of highest weight (ties: earlier token)."""
    n_docs = offsets.shape[0] - 1
    for i in prange(n_docs):
        s = offsets[i]
        e = offsets[i + 1]
        p = protect[i]
        _protect_labels(raw, s, p)
        m = e - s - p
        if m <= 0:
            continue
        order = np.argsort(-weights[s + p : e], kind="mergesort")
        for r in range(m):
            t = order[r]
            raw[s + p + t] = p + t if r < budget[i] else -1


@njit(**NJIT_PARALLEL)
def adaptive_labels(weights, offsets, protect, k_std, raw):
    """Keep unprotected tokens with weight >= mean + k_std * std of the document's weights."""
    n_docs = offsets.shape[0] - 1
    for i in prange(n_docs):
        s = offsets[i]
        e = offsets[i + 1]
        p = protect[i]
        _protect_labels(raw, s, p)
        m = e - s - p
        if m <= 0:
            continue
        mean = 0.0
        for t in range(s + p, e):
            mean += weights[t]
        mean /= m
        var = 0.0
        for t in range(s + p, e):
            dlt = weights[t] - mean
            var += dlt * dlt
        thr = mean + k_std * np.sqrt(var / m)
        # a constant document has std 0: keep all (w >= mean), no rounding surprises
        for t in range(s + p, e):
            raw[t] = t - s if (weights[t] >= thr or var == 0.0) else -1


# -- Ward pooling -------------------------------------------------------------------------
@njit(**NJIT)
def _unit_rows(x):
    m, d = x.shape
    u = np.empty((m, d), np.float32)
    for a in range(m):
        nrm = 0.0
        for k in range(d):
            nrm += x[a, k] * x[a, k]
        f = np.float32(1.0 / np.sqrt(nrm)) if nrm > 0.0 else np.float32(0.0)
        for k in range(d):
            u[a, k] = x[a, k] * f
    return u


@njit(**NJIT)
def _sq_dists(u):
    """Squared Euclidean distances (float64 (m, m)) between rows of ``u``."""
    m, d = u.shape
    sq = np.empty(m, np.float64)
    for a in range(m):
        acc = np.float32(0.0)
        for k in range(d):
            acc += u[a, k] * u[a, k]
        sq[a] = acc
    out = np.zeros((m, m), np.float64)
    for a in range(m):
        for b in range(a + 1, m):
            acc = np.float32(0.0)
            for k in range(d):
                acc += u[a, k] * u[b, k]
            v = sq[a] + sq[b] - 2.0 * acc
            if v < 0.0:
                v = 0.0
            out[a, b] = v
            out[b, a] = v
    return out


@njit(**NJIT)
def _uf_find(parent, a):
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


@njit(**NJIT)
def ward_tree(dist):
    """Ward dendrogram by the nearest-neighbour chain on squared Euclidean ``dist``.

    ``dist`` float64 ``(m, m)`` is overwritten. Returns ``(a, b, height)`` of the
    ``m - 1`` merges in the order found (``a``, ``b`` are member tokens of the two
    merged clusters); Lance-Williams update for Ward on squared distances.
    """
    m = dist.shape[0]
    ma = np.empty(max(m - 1, 0), np.int64)
    mb = np.empty(max(m - 1, 0), np.int64)
    mh = np.empty(max(m - 1, 0), np.float64)
    size = np.ones(m, np.float64)
    active = np.ones(m, np.bool_)
    chain = np.empty(m, np.int64)
    length = 0
    for step in range(m - 1):
        if length == 0:
            for a in range(m):
                if active[a]:
                    chain[0] = a
                    break
            length = 1
        while True:
            x = chain[length - 1]
            if length > 1:
                y = chain[length - 2]
                best = dist[x, y]
            else:
                y = -1
                best = _BIG
            for a in range(m):
                if active[a] and a != x and dist[x, a] < best:
                    best = dist[x, a]
                    y = a
            if length > 1 and y == chain[length - 2]:
                break
            chain[length] = y
            length += 1
        x = chain[length - 1]
        y = chain[length - 2]
        length -= 2
        ma[step] = x
        mb[step] = y
        mh[step] = best
        nx = size[x]
        ny = size[y]
        for a in range(m):
            if active[a] and a != x and a != y:
                na = size[a]
                v = ((nx + na) * dist[x, a] + (ny + na) * dist[y, a] - na * best) / (nx + ny + na)
                dist[y, a] = v
                dist[a, y] = v
        active[x] = False
        size[y] = nx + ny
    return ma, mb, mh


@njit(**NJIT)
def cut_tree(ma, mb, mh, m, n_clusters, raw, base):
    """Apply the ``m - n_clusters`` lowest merges; write each token's cluster root + base."""
    parent = np.arange(m)
    order = np.argsort(mh, kind="mergesort")
    for r in range(m - n_clusters):
        j = order[r]
        ra = _uf_find(parent, ma[j])
        rb = _uf_find(parent, mb[j])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    for a in range(m):
        raw[a] = base + _uf_find(parent, a)


@njit(**NJIT_PARALLEL)
def ward_labels(emb, offsets, protect, n_clusters, raw):
    """Ward clustering (cosine geometry) of each document's unprotected tokens.

    Tokens are L2-normalised for the distances (squared Euclidean between unit vectors
    is ``2 * cosine distance``); ``n_clusters[i]`` clusters over the unprotected tokens.
    """
    n_docs = offsets.shape[0] - 1
    for i in prange(n_docs):
        s = offsets[i]
        e = offsets[i + 1]
        p = protect[i]
        _protect_labels(raw, s, p)
        m = e - s - p
        if m <= 0:
            continue
        c = n_clusters[i]
        if c >= m:
            for t in range(p, e - s):
                raw[s + t] = t
            continue
        dist = _sq_dists(_unit_rows(emb[s + p : e]))
        ma, mb, mh = ward_tree(dist)
        cut_tree(ma, mb, mh, m, c, raw[s + p : e], p)


# -- greedy (ToMe-style) merging ----------------------------------------------------------
@njit(**NJIT)
def _row_best(sim, active, a, m):
    best = -_BIG
    bj = -1
    for b in range(m):
        if b != a and active[b] and sim[a, b] > best:
            best = sim[a, b]
            bj = b
    return best, bj


@njit(**NJIT_PARALLEL)
def merge_labels(emb, offsets, protect, target, threshold, raw):
    """Greedily merge the most cosine-similar pair of clusters until ``target[i]`` remain.

    Stops early when the best pair's cosine is below ``threshold``. A merged cluster is
    represented by the sum (= size-weighted mean direction) of its members.
    """
    n_docs = offsets.shape[0] - 1
    for i in prange(n_docs):
        s = offsets[i]
        e = offsets[i + 1]
        p = protect[i]
        _protect_labels(raw, s, p)
        m = e - s - p
        if m <= 0:
            continue
        owner = np.arange(m)
        t_goal = target[i]
        if t_goal < m:
            x = emb[s + p : e]
            d = x.shape[1]
            sums = np.empty((m, d), np.float64)
            for a in range(m):
                for k in range(d):
                    sums[a, k] = x[a, k]
            u = _unit_rows(x)
            sim = np.empty((m, m), np.float32)
            for a in range(m):
                sim[a, a] = -2.0
                for b in range(a + 1, m):
                    acc = np.float32(0.0)
                    for k in range(d):
                        acc += u[a, k] * u[b, k]
                    sim[a, b] = acc
                    sim[b, a] = acc
            active = np.ones(m, np.bool_)
            best = np.empty(m, np.float32)
            bestj = np.empty(m, np.int64)
            for a in range(m):
                bv, bj = _row_best(sim, active, a, m)
                best[a] = bv
                bestj[a] = bj
            count = m
            while count > t_goal:
                ia = -1
                bv = -_BIG
                for a in range(m):
                    if active[a] and bestj[a] >= 0 and best[a] > bv:
                        bv = best[a]
                        ia = a
                if ia < 0 or bv < threshold:
                    break
                a = min(ia, bestj[ia])
                b = max(ia, bestj[ia])
                active[b] = False
                for k in range(d):
                    sums[a, k] += sums[b, k]
                nrm = 0.0
                for k in range(d):
                    nrm += sums[a, k] * sums[a, k]
                f = 1.0 / np.sqrt(nrm) if nrm > 0.0 else 0.0
                for k in range(d):
                    u[a, k] = np.float32(sums[a, k] * f)
                for c in range(m):
                    if active[c] and c != a:
                        acc = np.float32(0.0)
                        for k in range(d):
                            acc += u[a, k] * u[c, k]
                        sim[a, c] = acc
                        sim[c, a] = acc
                for t in range(m):
                    if owner[t] == b:
                        owner[t] = a
                count -= 1
                bv2, bj2 = _row_best(sim, active, a, m)
                best[a] = bv2
                bestj[a] = bj2
                for c in range(m):
                    if not active[c] or c == a:
                        continue
                    if bestj[c] == a or bestj[c] == b:
                        bv2, bj2 = _row_best(sim, active, c, m)
                        best[c] = bv2
                        bestj[c] = bj2
                    elif sim[a, c] > best[c] or (sim[a, c] == best[c] and a < bestj[c]):
                        best[c] = sim[a, c]
                        bestj[c] = a
        for t in range(m):
            raw[s + p + t] = p + owner[t]


# -- per-sequence k-means (CRISP) ---------------------------------------------------------
@njit(**NJIT)
def _splitmix64(state):
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return state, z


@njit(**NJIT)
def _uniform(state):
    state, z = _splitmix64(state)
    return state, np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(**NJIT)
def kmeans_pp_init(x, k, seed):
    """k-means++ seeding (D^2 sampling), stream seeded by ``(seed, m)`` only.

    Returns the chosen row indices (fewer than ``k`` when ``x`` has fewer distinct rows).
    """
    m, d = x.shape
    state = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(m)
    state, _ = _splitmix64(state)
    chosen = np.empty(k, np.int64)
    state, r = _uniform(state)
    chosen[0] = min(int(r * m), m - 1)
    mind = np.empty(m, np.float64)
    c0 = chosen[0]
    for a in range(m):
        acc = np.float32(0.0)
        for j in range(d):
            dl = x[a, j] - x[c0, j]
            acc += dl * dl
        mind[a] = acc
    n_chosen = 1
    while n_chosen < k:
        total = 0.0
        for a in range(m):
            total += mind[a]
        if total <= 0.0:
            break
        state, r = _uniform(state)
        target = r * total
        pick = -1
        cum = 0.0
        for a in range(m):
            if mind[a] > 0.0:
                cum += mind[a]
                pick = a
                if cum >= target:
                    break
        chosen[n_chosen] = pick
        n_chosen += 1
        for a in range(m):
            acc = np.float32(0.0)
            for j in range(d):
                dl = x[a, j] - x[pick, j]
                acc += dl * dl
            if acc < mind[a]:
                mind[a] = acc
    return chosen[:n_chosen]


@njit(**NJIT)
def lloyd(x, init, iters, labels):
    """``iters`` Lloyd steps from the rows ``init``; final assignment in ``labels``.

    Empty clusters keep their previous centroid (and are dropped by the caller if they
    stay empty). Stops early when the assignment no longer changes.
    """
    m, d = x.shape
    k = init.shape[0]
    # float32 centroids for the distance scan (SIMD with the float32 tokens); the
    # centroid means are accumulated in float64
    cent = np.empty((k, d), np.float32)
    for c in range(k):
        for j in range(d):
            cent[c, j] = x[init[c], j]
    cnorm = np.empty(k, np.float32)
    for a in range(m):
        labels[a] = -1
    for _ in range(iters):
        for c in range(k):
            acc = np.float32(0.0)
            for j in range(d):
                acc += cent[c, j] * cent[c, j]
            cnorm[c] = acc
        changed = False
        for a in range(m):
            best = np.float32(3.0e38)
            bc = 0
            for c in range(k):
                acc = np.float32(0.0)
                for j in range(d):
                    acc += x[a, j] * cent[c, j]
                v = cnorm[c] - np.float32(2.0) * acc
                if v < best:
                    best = v
                    bc = c
            if labels[a] != bc:
                labels[a] = bc
                changed = True
        if not changed:
            break
        cnt = np.zeros(k, np.int64)
        acc_c = np.zeros((k, d), np.float64)
        for a in range(m):
            c = labels[a]
            cnt[c] += 1
            for j in range(d):
                acc_c[c, j] += x[a, j]
        for c in range(k):
            if cnt[c] > 0:
                for j in range(d):
                    cent[c, j] = np.float32(acc_c[c, j] / cnt[c])


@njit(**NJIT_PARALLEL)
def kmeans_labels(emb, offsets, protect, k, iters, seed, raw):
    """Per-document k-means of the unprotected tokens into at most ``k[i]`` clusters.

    A document with ``k[i] >= m`` unprotected tokens keeps them all.
    """
    n_docs = offsets.shape[0] - 1
    for i in prange(n_docs):
        s = offsets[i]
        e = offsets[i + 1]
        p = protect[i]
        _protect_labels(raw, s, p)
        m = e - s - p
        if m <= 0:
            continue
        if k[i] >= m:
            for t in range(p, e - s):
                raw[s + t] = t
            continue
        x = emb[s + p : e]
        init = kmeans_pp_init(x, k[i], seed)
        lab = np.empty(m, np.int64)
        lloyd(x, init, max(iters, 1), lab)
        for t in range(m):
            raw[s + p + t] = p + lab[t]
