"""HNSW index: staged search whose candidate generator is an hnswlib graph.

HPC-ColPali proposes HNSW over the centroid-reconstructed token vectors. Every token of a
K-means cell reconstructs to the same vector, so a graph over all tokens would hold only
K distinct points, each repeated (and HNSW degrades on exact duplicates); we index the
K distinct reconstructed vectors -- the centroids -- once, with inner-product distance,
and map a found centroid to its documents through the inverted file. A query token's
``nprobe`` graph neighbours replace the exact top-``nprobe`` of the score table, which
matters when K is large; approximate scoring and rerank are
:class:`~retrieval_prune.index.staged.StagedIndex`'s.

The graph is saved as hnswlib's native file inside the index generation. hnswlib checks
nothing in a file it loads and crashes in native code on a crafted header, checksums or
not, so :func:`check_graph_file` validates every field of it first -- header against the
parameters and the stored centroids, every link count and neighbour id, every neighbour's
level, the stored vectors equal to the centroids, the labels -- and hnswlib then reads a
private copy of exactly those bytes. (Rebuilding the graph at load instead was measured:
0.7 s at 4,096 centroids, 5.4 s at 16,384, against 0.01-0.02 s to validate and load;
`scripts/reliability.py`.) An index without the file rebuilds the graph, seeded.

Examples
--------
>>> import numpy as np
>>> from retrieval_prune import MultiVectors
>>> rng = np.random.default_rng(0)
>>> docs = MultiVectors.from_list([rng.standard_normal((6, 16)).astype(np.float32) for _ in range(40)])
>>> index = HNSWIndex.from_codecs("residual:k=16,nbits=2", nprobe=2)
>>> index.add(docs, [f"d{i}" for i in range(40)])
>>> index.search(docs[3:4], k=1).external(0)[0][0]
'd3'
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from retrieval_prune.index import storage
from retrieval_prune.index.staged import STAGE_PARAMS, StagedIndex
from retrieval_prune.registry import Param, register

__all__ = ["HNSWIndex"]

#: file name of the graph inside a generation
GRAPH_FILE = "centroids.hnsw"


#: hnswlib's header: offsetLevel0, max_elements, cur_element_count, size_data_per_element,
#: label_offset, offsetData (size_t), maxlevel (int), enterpoint_node (uint32), maxM, maxM0,
#: M (size_t), mult (double), ef_construction (size_t)
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


def check_graph_file(raw: bytes, centroids: np.ndarray, *, m: int, ef_construction: int) -> None:
    """Raise ``ValueError`` unless ``raw`` is exactly the hnswlib inner-product graph over
    ``centroids`` (labels 0..K-1) with degree ``m`` that hnswlib 0.8 writes, structurally
    sound: every field a search dereferences is in range, so hnswlib cannot read outside
    its arrays. Checked: header fields against K, dim and m; file length; per element the
    level-0 link count (<= 2m, no flag bits), neighbour ids < K, stored vector == centroid
    (bit for bit), label == its position; upper-level lists of whole levels, counts <= m,
    neighbour ids < K whose own level reaches that level; the entry point on the top level.
    """
    k, dim = int(centroids.shape[0]), int(centroids.shape[1])
    if len(raw) < _HEADER.size:
        raise ValueError(f"{len(raw)} bytes; not an hnswlib graph (its header alone is {_HEADER.size})")
    (off0, max_el, count, per_el, label_off, data_off, maxlevel, entry, max_m, max_m0, m_, mult,
     efc) = _HEADER.unpack_from(raw, 0)
    links0 = 4 + 2 * m * 4
    want = {"offsetLevel0": (off0, 0), "max_elements": (max_el, k), "cur_element_count": (count, k),
            "size_data_per_element": (per_el, links0 + dim * 4 + 8),
            "label_offset": (label_off, links0 + dim * 4), "offsetData": (data_off, links0),
            "maxM": (max_m, m), "maxM0": (max_m0, 2 * m), "M": (m_, m),
            "ef_construction": (efc, ef_construction)}
    for name, (got, exp) in want.items():
        if got != exp:
            raise ValueError(f"header field {name}={got}, expected {exp} for {k} centroids of dim {dim}, M={m}")
    if not (0 <= maxlevel <= 64) or not (0 <= entry < k) or not np.isfinite(mult):
        raise ValueError(f"header maxlevel={maxlevel} / enterpoint={entry} out of range")
    pos = _HEADER.size
    end0 = pos + k * per_el
    if len(raw) < end0:
        raise ValueError(f"{len(raw)} bytes; the level-0 block alone needs {end0}")
    block = np.frombuffer(raw, np.uint8, k * per_el, pos).reshape(k, per_el)
    head = block[:, :4].copy().view(np.uint32).ravel()
    cnt0 = head & 0xFFFF
    if (head >> 16).any() or (cnt0 > 2 * m).any():
        raise ValueError("a level-0 link count is over 2M or carries flag bits")
    nb0 = block[:, 4:links0].copy().view(np.uint32).reshape(k, 2 * m)
    used = np.arange(2 * m)[None, :] < cnt0[:, None]
    if (nb0[used] >= k).any():
        raise ValueError("a level-0 neighbour id is not a centroid")
    vec = block[:, links0 : links0 + dim * 4].copy().view(np.float32).reshape(k, dim)
    if not np.array_equal(vec.view(np.uint32), np.ascontiguousarray(centroids, np.float32).view(np.uint32)):
        raise ValueError("the stored vectors are not the index's centroids")
    labels = block[:, label_off:].copy().view(np.uint64).ravel()
    if not np.array_equal(labels, np.arange(k, dtype=np.uint64)):
        raise ValueError("the labels are not the centroid numbers 0..K-1")
    per_level = 4 + m * 4
    levels = np.zeros(k, np.int64)
    lists: list[tuple[int, int]] = []  # (element, byte offset of its upper-level lists)
    pos = end0
    for i in range(k):
        if pos + 4 > len(raw):
            raise ValueError("the file ends inside the upper-level link lists")
        size = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4
        if size % per_level or size // per_level > maxlevel:
            raise ValueError(f"element {i}: upper-level lists of {size} bytes (levels above maxlevel or partial)")
        if size:
            levels[i] = size // per_level
            lists.append((i, pos))
            pos += size
    if pos != len(raw):
        raise ValueError(f"{len(raw) - pos} trailing bytes after the link lists")
    if levels[entry] != maxlevel:
        raise ValueError(f"the entry point {entry} is on level {levels[entry]}, not the top level {maxlevel}")
    for i, at in lists:
        arr = np.frombuffer(raw, np.uint32, int(levels[i]) * (1 + m), at).reshape(int(levels[i]), 1 + m)
        cnt = arr[:, 0]
        if (cnt > m).any():
            raise ValueError(f"element {i}: an upper-level link count is over M={m}")
        ids = arr[:, 1:]
        ok = np.arange(m)[None, :] < cnt[:, None]
        sel = ids[ok]
        if (sel >= k).any():
            raise ValueError(f"element {i}: an upper-level neighbour id is not a centroid")
        lvl = np.broadcast_to(np.arange(1, int(levels[i]) + 1)[:, None], ids.shape)[ok]
        if (levels[sel.astype(np.int64)] < lvl).any():
            raise ValueError(f"element {i}: a neighbour is linked on a level above its own")


def _hnswlib():
    try:
        import hnswlib
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImportError(
            "the hnsw index needs hnswlib: pip install 'hnswlib>=0.8,<0.9'"
        ) from None
    return hnswlib


@register
class HNSWIndex(StagedIndex):
    """Staged search with an HNSW graph over the centroids as candidate generator.

    Parameters
    ----------
    nprobe, t_cs, n_candidates, n_rerank
        As for :class:`~retrieval_prune.index.ivf.IVFIndex`.
    m : int
        Graph degree (hnswlib ``M``).
    ef_construction : int
        Build-time beam width.
    ef : int
        Search-time beam width (at least ``nprobe`` is used).
    """

    name = "hnsw"
    index_type = "hnsw"
    params: ClassVar[dict[str, Param]] = {
        **STAGE_PARAMS,
        "m": Param(16, int, "graph degree (hnswlib M)", low=2, high=256),
        "ef_construction": Param(200, int, "build beam width", low=1),
        "ef": Param(64, int, "search beam width (>= nprobe is used)", low=1),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._graph = None

    def _after_fit(self) -> None:
        hnswlib = _hnswlib()
        cent = np.ascontiguousarray(self.storage_codec.centroids_, dtype=np.float32)
        g = hnswlib.Index(space="ip", dim=cent.shape[1])
        g.init_index(
            max_elements=cent.shape[0], ef_construction=self.ef_construction, M=self.m,
            random_seed=self.seed,
        )  # fmt: skip
        g.set_num_threads(1)  # deterministic graph
        g.add_items(cent, np.arange(cent.shape[0]))
        self._graph = g

    def _load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super()._load_state(arrays, meta)
        native = meta.get("_native_files", {})
        cent = np.ascontiguousarray(self.storage_codec.centroids_, dtype=np.float32)
        if GRAPH_FILE not in native:  # written without its graph: rebuild it (seeded, same graph)
            self._after_fit()
            return
        raw = Path(native[GRAPH_FILE]).read_bytes()
        try:
            check_graph_file(raw, cent, m=self.m, ef_construction=self.ef_construction)
        except ValueError as exc:
            raise storage.IndexCorruptedError(f"{native[GRAPH_FILE]}: {exc}") from None
        # hnswlib reads a private copy of the bytes just validated, not the shared file
        fd, tmp = tempfile.mkstemp(suffix=".hnsw")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            g = _hnswlib().Index(space="ip", dim=int(cent.shape[1]))
            g.load_index(tmp, max_elements=int(cent.shape[0]))
        finally:
            os.unlink(tmp)
        self._graph = g

    def _native_files(self, folder: Path) -> dict[str, Path]:
        if self._graph is None:
            raise ValueError("nothing to save: the hnsw graph is not built; add documents first")
        path = Path(folder) / GRAPH_FILE
        self._graph.save_index(str(path))
        return {GRAPH_FILE: path}

    def _probe(self, cache: dict[str, Any], table: np.ndarray, q: np.ndarray, rng: np.ndarray | None = None) -> np.ndarray:
        n = min(self.nprobe, table.shape[0])
        g = self._graph
        g.set_ef(max(self.ef, n))
        labels, _ = g.knn_query(q, k=n, num_threads=1)
        return np.asarray(labels, np.int64).reshape(-1)
