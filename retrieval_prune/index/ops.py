"""Validating Python wrappers around the Numba kernels in :mod:`retrieval_prune.kernels`.

Each wrapper coerces its inputs (``np.ascontiguousarray`` to the kernel dtype), checks
shapes and values with a ``ValueError`` that names the value and the fix, allocates the
outputs and calls the kernel. Kernels themselves never validate.

Documents are passed CSR-style, as in :class:`~retrieval_prune.types.MultiVectors`:
``d_emb float32 (n_tokens, dim)`` and ``d_offsets int64 (n_docs + 1,)``. Document
vectors are not scanned for NaN/Inf on every call (that would cost a full pass over the
index); validate them once when building (``MultiVectors.validate_finite``). Queries are
small and are checked here.

Examples
--------
>>> import numpy as np
>>> from retrieval_prune.index.ops import maxsim_search
>>> rng = np.random.default_rng(0)
>>> d = rng.standard_normal((10, 8)).astype(np.float32)
>>> d_off = np.array([0, 3, 3, 10])            # doc 1 is empty: never returned
>>> q = d[:2].copy(); q_off = np.array([0, 2])
>>> scores, ids = maxsim_search(q, q_off, d, d_off, k=3)
>>> ids.tolist()[0][2], float(scores[0, 2])
(-1, -inf)
"""

from __future__ import annotations

import numba
import numpy as np

from ..kernels import maxsim as _ms
from ..kernels.topk import topk_merge
from ..types import check_k

__all__ = [
    "pack_queries",
    "maxsim_search",
    "maxsim_scores",
    "maxsim_rerank",
]

_LANES = _ms.LANES


# --------------------------------------------------------------------------------------
# coercion and validation helpers
# --------------------------------------------------------------------------------------
def _f32_matrix(x, name: str, dim: int | None = None, allow_empty: bool = False) -> np.ndarray:
    a = np.asarray(x)
    if allow_empty and a.ndim == 2 and a.shape[0] == 0:
        return np.ascontiguousarray(a, dtype=np.float32)  # no tokens at all: dim is moot
    if a.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (n_tokens, dim), got shape {a.shape}; "
            f"reshape one vector with x.reshape(1, -1)"
        )
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} dtype is {a.dtype}, expected a float array (float32)")
    if a.shape[1] == 0:
        raise ValueError(f"{name} has dim=0; vectors need at least one dimension")
    if dim is not None and dim > 0 and a.shape[1] != dim:
        raise ValueError(
            f"{name} has dim={a.shape[1]} but the documents have dim={dim}; "
            "encode queries and documents with the same model"
        )
    return np.ascontiguousarray(a, dtype=np.float32)


def _finite(a: np.ndarray, name: str) -> None:
    if a.size and not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a).reshape(a.shape[0], -1).all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or Inf (first at row {bad}); clean the input")


def _offsets(off, n_rows: int, name: str) -> np.ndarray:
    o = np.asarray(off)
    if o.ndim != 1 or o.shape[0] < 1:
        raise ValueError(f"{name} must be a 1-D array of n + 1 offsets, got shape {o.shape}")
    if not np.issubdtype(o.dtype, np.integer):
        raise TypeError(f"{name} dtype is {o.dtype}, expected int64 offsets")
    o = np.ascontiguousarray(o, dtype=np.int64)
    if o[0] != 0 or o[-1] != n_rows:
        raise ValueError(
            f"{name} must start at 0 and end at the number of rows ({n_rows}), "
            f"got {name}[0]={o[0]}, {name}[-1]={o[-1]}"
        )
    if o.shape[0] > 1 and (np.diff(o) < 0).any():
        bad = int(np.argmax(np.diff(o) < 0))
        raise ValueError(f"{name} must be non-decreasing; {name}[{bad}] > {name}[{bad + 1}]")
    return o


def _alive_mask(alive, n_docs: int) -> tuple[np.ndarray, bool]:
    if alive is None:
        return np.ones(1, np.uint8), False
    a = np.asarray(alive)
    if a.shape != (n_docs,):
        raise ValueError(
            f"alive must have shape (n_docs,) = ({n_docs},), got {a.shape}; "
            "pass one flag per document (True = searchable)"
        )
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a).view(np.uint8), True
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a), True
    if np.issubdtype(a.dtype, np.integer):
        return (a != 0).astype(np.uint8), True
    raise TypeError(f"alive dtype is {a.dtype}, expected bool or uint8")


def _chunk_bounds(d_off: np.ndarray, n_chunks: int) -> np.ndarray:
    """Document boundaries of ``n_chunks`` chunks holding about equal token counts."""
    n_docs = d_off.shape[0] - 1
    n_chunks = max(1, min(n_chunks, n_docs))
    targets = np.linspace(0, d_off[-1], n_chunks + 1)
    b = np.searchsorted(d_off, targets, side="left").astype(np.int64)
    b[0], b[-1] = 0, n_docs
    b = np.maximum.accumulate(np.minimum(b, n_docs))
    # token balance can leave a chunk empty (long documents): that is harmless
    return b


def _n_chunks(n_docs: int) -> int:
    return min(max(n_docs, 1), 4 * numba.get_num_threads())


# --------------------------------------------------------------------------------------
# queries
# --------------------------------------------------------------------------------------
def pack_queries(q_emb, q_offsets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack CSR queries into the 16-lane layout of :mod:`retrieval_prune.kernels.maxsim`.

    Parameters
    ----------
    q_emb : float32 (n_qtok, dim)
    q_offsets : int64 (n_queries + 1,)

    Returns
    -------
    qp : float32 (n_vectors * dim * 16,)
        ``qp[v, d, l] = q[16 v + l, d]`` per query, zero-padded, flattened.
    qv_off : int64 (n_queries + 1,)
        First vector of every query (``ceil(n_tokens / 16)`` vectors each).
    q_len : int64 (n_queries,)
        Tokens per query.
    """
    q = _f32_matrix(q_emb, "q_emb")
    off = _offsets(q_offsets, q.shape[0], "q_offsets")
    return _pack(q, off)


def _pack(q: np.ndarray, off: np.ndarray):
    dim = q.shape[1]
    q_len = np.diff(off)
    nv = (q_len + _LANES - 1) // _LANES
    qv_off = np.zeros(off.shape[0], np.int64)
    np.cumsum(nv, out=qv_off[1:])
    qp = np.zeros((int(qv_off[-1]), _LANES, dim), np.float32)
    for i in range(q_len.shape[0]):
        n = int(q_len[i])
        if n:
            blk = qp[qv_off[i] : qv_off[i + 1]].reshape(-1, dim)
            blk[:n] = q[off[i] : off[i + 1]]
    qp = np.ascontiguousarray(qp.transpose(0, 2, 1)).reshape(-1)
    return qp, qv_off, q_len


def _docs(d_emb, d_offsets):
    d = _f32_matrix(d_emb, "d_emb", allow_empty=True)
    off = _offsets(d_offsets, d.shape[0], "d_offsets")
    return d, off


# --------------------------------------------------------------------------------------
# exact MaxSim
# --------------------------------------------------------------------------------------
def maxsim_search(q_emb, q_offsets, d_emb, d_offsets, k: int, alive=None):
    """Exact MaxSim top-k for a batch of queries over all documents.

    score(q, d) = sum_i max_j <q_i, d_j>. The scan is parallel over document chunks and
    keeps the top-k inside the scan (no full score matrix).

    Parameters
    ----------
    q_emb : float32 (n_qtok, dim)
        Token vectors of all queries, one after the other.
    q_offsets : int64 (n_queries + 1,)
        Query ``i`` owns rows ``q_offsets[i]:q_offsets[i+1]``.
    d_emb : float32 (n_tokens, dim)
    d_offsets : int64 (n_docs + 1,)
        Documents, CSR; an empty document is never returned.
    k : int >= 1
    alive : bool or uint8 (n_docs,), optional
        ``False``/0 excludes a (deleted) document.

    Returns
    -------
    scores : float32 (n_queries, k)
        Best first; ties are ordered by lower document id. Missing slots: ``-inf``.
    ids : int64 (n_queries, k)
        Document positions; missing slots ``-1``.
    """
    k = check_k(k)
    d, d_off = _docs(d_emb, d_offsets)
    q = _f32_matrix(q_emb, "q_emb", dim=d.shape[1])
    q_off = _offsets(q_offsets, q.shape[0], "q_offsets")
    _finite(q, "q_emb")
    n_docs = d_off.shape[0] - 1
    alive_u8, use_alive = _alive_mask(alive, n_docs)
    n_q = q_off.shape[0] - 1
    out_s = np.full((n_q, k), -np.inf, np.float32)
    out_i = np.full((n_q, k), -1, np.int64)
    if n_q == 0 or d.shape[0] == 0:
        return out_s, out_i  # no document has a token: nothing can match
    qp, qv_off, q_len = _pack(q, q_off)
    kk = min(k, n_docs)
    bounds = _chunk_bounds(d_off, _n_chunks(n_docs))
    nch = bounds.shape[0] - 1
    ts = np.empty((nch, n_q, kk), np.float32)
    ti = np.empty((nch, n_q, kk), np.int64)
    cnt = np.zeros((nch, n_q), np.int64)
    _ms.maxsim_search_kernel(
        qp,
        qv_off,
        q_len,
        d.shape[1],
        d.reshape(-1),
        d_off,
        alive_u8,
        use_alive,
        bounds,
        kk,
        ts,
        ti,
        cnt,
    )
    topk_merge(ts, ti, cnt, _ms.NEG, out_s[:, :kk], out_i[:, :kk])
    out_s[out_i < 0] = -np.inf
    return out_s, out_i


def _single_query(q, dim: int):
    q = _f32_matrix(q, "q", dim=dim)
    _finite(q, "q")
    qp, qv_off, q_len = _pack(q, np.array([0, q.shape[0]], np.int64))
    return qp, int(qv_off[1]), int(q_len[0])


def maxsim_scores(q, d_emb, d_offsets) -> np.ndarray:
    """MaxSim of one query against every document.

    Parameters
    ----------
    q : float32 (n_qtok, dim)
    d_emb : float32 (n_tokens, dim)
    d_offsets : int64 (n_docs + 1,)

    Returns
    -------
    float32 (n_docs,)
        ``-inf`` for an empty document.
    """
    d, d_off = _docs(d_emb, d_offsets)
    qp, nv, nq = _single_query(q, d.shape[1])
    out = np.empty(d_off.shape[0] - 1, np.float32)
    if out.size and d.shape[0]:
        _ms.maxsim_scores_kernel(qp, nv, nq, d.shape[1], d.reshape(-1), d_off, out)
    out[d_off[1:] == d_off[:-1]] = -np.inf
    return out


def _cand_ids(cand_ids, n_docs: int) -> np.ndarray:
    c = np.asarray(cand_ids)
    if c.ndim != 1:
        raise ValueError(f"cand_ids must be 1-D, got shape {c.shape}")
    if c.size and not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"cand_ids dtype is {c.dtype}, expected integer document ids")
    c = np.ascontiguousarray(c, dtype=np.int64)
    if c.size and (c.max() >= n_docs or c.min() < -1):
        bad = c[(c >= n_docs) | (c < -1)][0]
        raise ValueError(
            f"cand_ids holds {bad}, outside [0, n_docs={n_docs}); -1 (padding) is allowed"
        )
    return c


def maxsim_rerank(q, d_emb, d_offsets, cand_ids) -> np.ndarray:
    """Exact MaxSim of one query against candidate documents ``cand_ids``.

    Parameters
    ----------
    q : float32 (n_qtok, dim)
    d_emb, d_offsets : the documents (CSR)
    cand_ids : int (n_cand,)
        Document positions; ``-1`` (padding of a candidate list) is allowed.

    Returns
    -------
    float32 (n_cand,)
        Scores in the order of ``cand_ids``; ``-inf`` for ``-1`` or an empty document.
    """
    d, d_off = _docs(d_emb, d_offsets)
    qp, nv, nq = _single_query(q, d.shape[1])
    ids = _cand_ids(cand_ids, d_off.shape[0] - 1)
    out = np.empty(ids.shape[0], np.float32)
    if out.size and d.shape[0]:
        _ms.maxsim_rerank_kernel(qp, nv, nq, d.shape[1], d.reshape(-1), d_off, ids, out)
    out[(ids < 0) | (d_off[ids + 1] == d_off[ids])] = -np.inf
    return out
