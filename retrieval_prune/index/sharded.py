"""A sharded index: standard index folders that share one codebook, one manifest over them.

Layout of a sharded index folder ``INDEX/``::

    INDEX/CURRENT                 the live top-level generation (as any index folder)
    INDEX/gen-000002/manifest.json
                                  type "sharded": the canonical pipeline spec, the shared
                                  codebook's sha256 and every shard's name, pinned
                                  generation, manifest sha256 and document counts
    INDEX/shard-0000/             a standard index folder (opens on its own too)
    INDEX/shard-0001/ ...

**One codebook.** Every shard holds the same codec state (fitted once, on the whole corpus),
so a document's score does not depend on which shard holds it. Each stage of the staged
search scores a document from the query, the codebook and that document alone; only the
stages' top-``n`` cuts look across documents. :meth:`ShardedIndex.search` therefore runs the
search in two exchanges with the shards (:meth:`StagedIndex.shard_phase1`/``phase2``) and
makes every cut globally (:func:`merge_staged`): the answer is the one a single index over
the same documents, in the same order, with the same codebook gives -- ids and scores.
Brute-force index types answer in one exchange (each shard's top-``k``, merged).

**One commit.** A change writes new generations of the shards it touched through the normal
crash-safe writer, then a new top-level generation naming them; readers open each shard at
the generation the top-level manifest pins, never at the shard's own ``CURRENT``. A crash
before the top-level switch leaves the old top-level generation live with its shards'
generations intact (each shard keeps its previous generation); the next writer points such a
shard back at its pinned generation and removes the orphan. So a generation switch covers
all shards or none.

**Global ids.** Document ids are unique across shards; ``add`` routes a batch to the shard
with the fewest positions, ``delete`` to the shards holding the ids, ``compact`` runs per
shard. Global positions are the shards' positions laid end to end (shard order), which is
also the tie-break order of the merge.

Where shards are searched is a *runner*: :class:`LocalShards` (in this process) here; a Ray
runner (``retrieval_prune.retrieve.ray_shards``) keeps one actor per shard.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from retrieval_prune.index import storage
from retrieval_prune.index.base import MultiVectorIndex, load_index
from retrieval_prune.types import MultiVectors

__all__ = [
    "ShardedIndex", "LocalShards", "ShardUnavailableError", "codebook_sha256", "shard_name",
    "merge_staged", "SHARDED_VERSION", "MAX_SHARDS", "is_sharded", "live_generations",
]

SHARDED_VERSION = 1
#: most shards one index may have (a crafted manifest cannot ask for more)
MAX_SHARDS = 4096
_SHARD_RE = re.compile(r"^shard-\d{4,}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class ShardUnavailableError(RuntimeError):
    """A shard could not answer (after retries); ``shards`` names them."""

    def __init__(self, message: str, shards: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.shards = tuple(shards)


def shard_name(i: int) -> str:
    return f"shard-{i:04d}"


def codebook_sha256(index: MultiVectorIndex) -> str | None:
    """sha256 over an index's codec spec and fitted state (names, dtypes, shapes, bytes);
    None for an index without a codec (flat)."""
    chain = getattr(index, "chain", None)
    if chain is None or not chain.is_fitted:
        return None
    h = hashlib.sha256(chain.spec.encode())
    for name, arr in sorted(chain.state_arrays().items()):
        a = np.ascontiguousarray(arr)
        h.update(f"\n{name}:{a.dtype.str}:{list(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def live_generations(path: str | Path) -> list[Path]:
    """Folders of an index's live generation: one for a single index; for a sharded one the
    top-level generation and every shard generation it pins (what its bytes on disk are)."""
    meta, _, gen = storage.read_generation(path, verify=False)
    out = [gen]
    if meta.get("type") == "sharded":
        for e in (meta.get("sharded") or {}).get("shards") or []:
            out.append(Path(path) / str(e.get("name")) / str(e.get("generation")))
    return out


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded index folder (its live manifest says so)."""
    try:
        meta, _, _ = storage.read_generation(path, verify=False)
    except (OSError, ValueError):
        return False
    return meta.get("type") == "sharded"


# -- runners: where shards are searched ---------------------------------------------------------
class LocalShards:
    """Shards searched in this process, one after another. The runner protocol: ``phase1``
    returns ``(token, answers)``; ``phase2(token, orders, n_final)`` finishes that search.
    The token carries the search's state, so concurrent searches never share any."""

    def __init__(self, shards: Sequence[MultiVectorIndex]) -> None:
        self.shards = list(shards)

    def phase1(self, queries: MultiVectors, k: int) -> tuple[Any, list[list[tuple]]]:
        states, answers = [], []
        tables = None  # the shards share one codebook: the first shard's score tables serve all
        for s in self.shards:
            st, ans = s.shard_phase1(queries, k, tables)
            if tables is None:
                tables = [None if x is None else x[0] for x in st]
            states.append(st)
            answers.append(ans)
        return states, answers

    def phase2(self, token: Any, orders: list[list[tuple | None]], n_final: int) -> list[list[tuple | None]]:
        return [s.shard_phase2(st, o, n_final) for s, st, o in zip(self.shards, token, orders, strict=True)]

    def subset(self, live: Sequence[int]) -> LocalShards:
        return LocalShards([self.shards[j] for j in live])

    def topk(self, queries: MultiVectors, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for s in self.shards:
            if s.n_positions == 0 or not int(np.count_nonzero(s.alive)):
                out.append((np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)))
            else:
                out.append(s._search(queries, k))
        return out


def _cut(scores: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` best (ties: lower key) -- the single index's ``_select`` over
    candidates laid in key order."""
    from retrieval_prune.index.staged import _select_idx

    order = np.argsort(keys, kind="stable")
    return order[_select_idx(scores[order], n)]


def merge_staged(
    answers1: list[list[tuple]], phase2, bases: np.ndarray, k: int, n_keep: int, n_final: int,
    u8_cut=None,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact staged search over shards from their two exchanges.

    ``answers1[s][i]``: shard ``s``'s first answer for query ``i``
    (:meth:`StagedIndex.shard_phase1`); ``phase2(orders)`` sends each shard its second
    orders and returns the answers (:meth:`StagedIndex.shard_phase2`); ``bases[s]``: global
    position of shard ``s``'s first position; ``u8_cut(total, n_keep)``: whether the single
    index would cut ``total`` candidates by the uint8 score
    (:meth:`~retrieval_prune.index.staged.StagedIndex._u8_cut`; None: always). Returns
    ``(scores, global positions)`` of shape ``(n_queries, k)``, padded with ``-inf`` / ``-1``.
    """
    from retrieval_prune.index.staged import final_order

    n_sh = len(answers1)
    n_q = len(answers1[0]) if n_sh else 0
    scores = np.full((n_q, k), -np.inf, np.float32)
    ids = np.full((n_q, k), -1, np.int64)
    orders: list[list[tuple | None]] = [[None] * n_q for _ in range(n_sh)]
    use_f32 = [False] * n_q
    for i in range(n_q):
        first = [answers1[s][i] for s in range(n_sh)]
        if first[0][0] == "empty":  # the same kind on every shard: the query decides it
            sc = np.concatenate([a[1] for a in first])
            pos = np.concatenate([a[2] + bases[s] for s, a in enumerate(first)])
            o = np.lexsort((pos, -sc))[:k]
            scores[i, : o.size], ids[i, : o.size] = sc[o], pos[o]
            continue
        total = sum(a[1] for a in first)
        if total == 0:
            continue
        shard_of = np.concatenate([np.full(a[2].size, s, np.int64) for s, a in enumerate(first)])
        local = np.concatenate([a[2] for a in first]).astype(np.int64)
        approx = np.concatenate([a[3] for a in first]).astype(np.float32)
        if total > n_final:  # the single index cuts by the approximate score here
            if u8_cut is None or u8_cut(total, n_keep):
                keep = _cut(approx, local + bases[shard_of], n_keep)
                shard_of, local = shard_of[keep], local[keep]
            use_f32[i] = local.size > n_final
        for s in range(n_sh):
            orders[s][i] = (np.sort(local[shard_of == s]), use_f32[i])
    answers2 = phase2(orders) if any(o is not None for row in orders for o in row) else None
    for i in range(n_q):
        if orders[0][i] is None:
            continue
        second = [answers2[s][i] for s in range(n_sh)]
        pos = np.concatenate([a[1] + bases[s] for s, a in enumerate(second)]).astype(np.int64)
        final = np.concatenate([a[2] for a in second]).astype(np.float32)
        if use_f32[i]:  # the single index cuts by the float32 interaction here
            f32 = np.concatenate([a[0] for a in second]).astype(np.float32)
            every = np.concatenate([np.asarray(orders[s][i][0]) + bases[s] for s in range(n_sh)])
            chosen = every[_cut(f32, every, n_final)]
            # each shard reranked its own best n_final, a superset of its share of these
            where = np.isin(pos, chosen)
            if int(where.sum()) != chosen.size:
                raise RuntimeError("a shard's rerank missed a globally chosen candidate")
            pos, final = pos[where], final[where]
        s_out, i_out = final_order(final, pos, k)
        scores[i, : s_out.size], ids[i, : i_out.size] = s_out, i_out
    return scores, ids


def merge_topk(answers: list[tuple[np.ndarray, np.ndarray]], bases: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge shards' own top-``k`` (brute-force index types): best ``k`` by score, ties by
    the lower global position."""
    n_q = answers[0][0].shape[0]
    scores = np.full((n_q, k), -np.inf, np.float32)
    ids = np.full((n_q, k), -1, np.int64)
    for i in range(n_q):
        sc = np.concatenate([a[0][i] for a in answers]).astype(np.float32)
        pos = np.concatenate([np.where(a[1][i] >= 0, a[1][i] + bases[s], -1) for s, a in enumerate(answers)])
        ok = pos >= 0
        sc, pos = sc[ok], pos[ok]
        o = np.lexsort((pos, -sc))[:k]
        scores[i, : o.size], ids[i, : o.size] = sc[o], pos[o]
    return scores, ids


# -- the index -----------------------------------------------------------------------------------
class ShardedIndex(MultiVectorIndex):
    """Shards (standard indexes with one shared codebook) behind the index protocol; see the
    module docstring. Open with :func:`~retrieval_prune.index.base.load_index` or build from
    shards that share one fitted codebook (``ShardedIndex(shards)``); ``save`` commits the shards and the top-level manifest together."""

    index_type: ClassVar[str] = "sharded"
    name: ClassVar[str] = "sharded"
    #: a search that finds a shard unavailable is retried (with backoff) at least ``retries``
    #: times and for ``retry_seconds`` (a restarted actor answers again), then fails naming it
    retries: int = 2
    retry_seconds: float = 20.0

    def __init__(self, shards: Sequence[MultiVectorIndex] = ()) -> None:
        self.shards: list[MultiVectorIndex] = list(shards)
        super().__init__()
        self.refs: list[tuple[str, str] | None] = [None] * len(self.shards)
        self.dirty: list[bool] = [True] * len(self.shards)
        self.codebook_sha: str | None = None
        self.runner: Any = LocalShards(self.shards)
        self.allow_partial = False
        #: shards left out of the last search (only with ``allow_partial``)
        self.missing_shards: tuple[int, ...] = ()
        if self.shards:
            self._adopt_shards()

    # -- construction ------------------------------------------------------------------------
    def _adopt_shards(self) -> None:
        first = self.shards[0]
        shas = {codebook_sha256(s) for s in self.shards}
        if len(shas) != 1:
            raise ValueError("the shards hold different codebooks; fit one codec and code every shard with it")
        specs = {s.spec for s in self.shards}
        if len(specs) != 1:
            raise ValueError(f"the shards have different index specs {sorted(specs)}")
        self.codebook_sha = shas.pop()
        self.dim = next((s.dim for s in self.shards if s.dim is not None), None)
        self.pipeline_spec = first.pipeline_spec
        self.encoder_settings = first.encoder_settings
        self.info = dict(first.info)
        self._refresh_view()

    @property
    def spec(self) -> str:  # type: ignore[override]
        return self.shards[0].spec if self.shards else ""

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    @property
    def chain(self):
        return getattr(self.shards[0], "chain", None) if self.shards else None

    @property
    def n_vectors(self) -> int:
        return int(sum(getattr(s, "n_vectors", 0) for s in self.shards))

    def _refresh_view(self) -> None:
        """Global ids, tombstones and texts: the shards' laid end to end."""
        self.bases = np.zeros(len(self.shards) + 1, np.int64)
        ids: list[str] = []
        alive = []
        texts: list[str] | None = [] if all(s.texts is not None for s in self.shards) else None
        for j, s in enumerate(self.shards):
            self.bases[j + 1] = self.bases[j] + s.n_positions
            ids.extend(s.doc_ids)
            alive.append(np.asarray(s.alive, np.uint8))
            if texts is not None:
                texts.extend(s.texts)  # type: ignore[arg-type]
        self.doc_ids = ids
        self.alive = np.concatenate(alive) if alive else np.zeros(0, np.uint8)
        self.texts = texts
        pos: dict[str, int] = {}
        for p, d in enumerate(ids):
            if d not in pos or self.alive[p]:
                pos[d] = p
        self._pos = pos

    def shard_of(self, position: int) -> int:
        return int(np.searchsorted(self.bases, position, side="right") - 1)

    # -- mutation (routed) --------------------------------------------------------------------
    def add(self, docs: MultiVectors, ids: Sequence[str], texts: Sequence[str] | None = None) -> None:
        """Add documents to the shard with the fewest positions (ids unique across shards)."""
        ids = [str(i) for i in ids]
        clash = [i for i in ids if i in self._pos and self.alive[self._pos[i]]]
        if clash:
            raise ValueError(f"id {clash[0]!r} is already in the index ({len(clash)} clashes); delete it first")
        j = int(np.argmin([s.n_positions for s in self.shards]))
        self.shards[j].add(docs, ids, texts)
        self.dirty[j] = True
        self._refresh_view()

    def delete(self, ids: Sequence[str]) -> None:
        ids = [str(i) for i in ids]
        unknown = [i for i in ids if i not in self._pos or not self.alive[self._pos[i]]]
        if unknown:
            raise KeyError(f"unknown document id {unknown[0]!r} ({len(unknown)} unknown); nothing deleted")
        by_shard: dict[int, list[str]] = {}
        for i in dict.fromkeys(ids):
            by_shard.setdefault(self.shard_of(self._pos[i]), []).append(i)
        for j, group in by_shard.items():
            self.shards[j].delete(group)
            self.dirty[j] = True
        self._refresh_view()

    def compact(self) -> None:
        for j, s in enumerate(self.shards):
            if len(s) != s.n_positions:
                s.compact()
                self.dirty[j] = True
        self._refresh_view()

    # -- search ---------------------------------------------------------------------------------
    def _search(self, queries: MultiVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        # remote shards hold the committed generations; unsaved changes live here only, so
        # such a search runs over the in-memory shards (the same answer a save would give)
        runner = self.runner if not any(self.dirty) else LocalShards(self.shards)
        last: ShardUnavailableError | None = None
        tries, delay = 0, 0.05
        deadline = time.monotonic() + self.retry_seconds
        while True:  # a restarting shard answers again within the retry window
            try:
                self.missing_shards = ()
                return self._search_once(queries, k, runner)
            except ShardUnavailableError as exc:
                last = exc
                tries += 1
            if tries > self.retries and time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
        if not self.allow_partial:
            raise ShardUnavailableError(
                f"shard(s) {', '.join(shard_name(s) for s in last.shards)} did not answer in "
                f"{tries} tries over {self.retry_seconds:g} s; no partial answer was given "
                "(allow_partial=True answers from the other shards and names the missing ones)",
                last.shards,
            )
        live = [j for j in range(len(self.shards)) if j not in last.shards]
        sub = runner.subset(live)
        self.missing_shards = tuple(last.shards)
        return self._search_once(queries, k, sub, shards=live)

    def _search_once(self, queries: MultiVectors, k: int, runner: Any,
                     shards: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        shards = list(range(len(self.shards))) if shards is None else shards
        bases = self.bases[shards]
        first = self.shards[0]
        if hasattr(first, "shard_phase1"):
            n_keep, n_final = first._stage_sizes(k)
            token, answers1 = runner.phase1(queries, k)
            return merge_staged(answers1, lambda orders: runner.phase2(token, orders, n_final), bases, k,
                                n_keep, n_final, u8_cut=first._u8_cut)
        return merge_topk(runner.topk(queries, k), bases, k)

    # -- description ---------------------------------------------------------------------------
    def _state_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for j, s in enumerate(self.shards):
            for name, arr in s._state_arrays().items():
                out[f"{shard_name(j)}.{name}"] = arr
        return out

    # -- persistence ----------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        meta = super()._meta()
        meta["sharded"] = {
            "version": SHARDED_VERSION,
            "codebook_sha256": self.codebook_sha,
            "shards": [
                {"name": shard_name(j), "generation": ref[0], "manifest_sha256": ref[1],
                 "n_docs": len(s), "n_positions": s.n_positions}
                for j, (s, ref) in enumerate(zip(self.shards, self.refs, strict=True))
                if ref is not None
            ],
        }
        return meta

    def save(self, path: str | Path) -> Path:
        """Commit every changed shard, then the top-level manifest naming them (one switch)."""
        target = Path(path).resolve()
        with storage.write_lock(target):
            return self._commit_to(target, lambda: self._write(target))

    def _write(self, target: Path) -> Path:
        for j, s in enumerate(self.shards):
            folder = target / shard_name(j)
            here = s.loaded_from == folder and self.refs[j] is not None
            if here and not self.dirty[j]:
                continue
            with storage.write_lock(folder):
                if here and (folder / "CURRENT").is_file() and \
                        storage.live_pointer(folder, verify_signature=False) != self.refs[j]:
                    # a commit the top-level manifest never adopted (a crashed writer): undo
                    # it, so this shard's pinned generation is the one its next one follows
                    storage.set_pointer(folder, *self.refs[j])  # type: ignore[misc]
                    storage.gc_generations(folder)
                    s.loaded_pointer = self.refs[j]
                if not here:  # a new home: write the shard fresh
                    s.loaded_from = s.loaded_pointer = None
                s.save(folder)
                self.refs[j] = s.loaded_pointer
        gen = storage.write_generation(target, {}, self._meta())
        self.dirty = [False] * len(self.shards)
        update = getattr(self.runner, "update", None)
        if update is not None:  # remote shards reopen the generations just committed
            update(self)
        return gen

    @classmethod
    def _from_saved(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> ShardedIndex:
        """The loader's hook: the top-level generation holds no arrays; its folder and
        verification choice arrive in ``meta`` (``_root``, ``_verify``)."""
        return cls._from_folder(Path(meta["_root"]), meta, verify=bool(meta.get("_verify", True)))

    @classmethod
    def _from_folder(cls, root: Path, meta: dict[str, Any], *, verify: bool = True) -> ShardedIndex:
        """Open the shards a top-level manifest pins (each checked like any index folder)."""
        info = meta.get("sharded")
        if not isinstance(info, dict) or info.get("version") != SHARDED_VERSION:
            raise storage.IndexCorruptedError(f"{root}: meta.sharded is missing or of an unknown version")
        entries = info.get("shards")
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_SHARDS:
            raise storage.IndexCorruptedError(f"{root}: meta.sharded.shards must list 1..{MAX_SHARDS} shards")
        cb = info.get("codebook_sha256")
        if cb is not None and (not isinstance(cb, str) or not _SHA_RE.match(cb)):
            raise storage.IndexCorruptedError(f"{root}: meta.sharded.codebook_sha256 is not a sha256")
        shards, refs = [], []
        for j, e in enumerate(entries):
            if not isinstance(e, dict) or e.get("name") != shard_name(j) or not _SHARD_RE.match(e["name"]):
                raise storage.IndexCorruptedError(f"{root}: shard entry {j} must be named {shard_name(j)!r}")
            ref = (e.get("generation"), e.get("manifest_sha256"))
            folder = root / e["name"]
            if folder.is_symlink() or not folder.is_dir():
                raise storage.IndexCorruptedError(f"{folder} is missing or not a folder")
            shard = load_index(folder, verify=verify, pointer=ref)  # type: ignore[arg-type]
            if shard.index_type == "sharded":
                raise storage.IndexCorruptedError(f"{folder}: a shard cannot itself be sharded")
            for key, have in (("n_docs", len(shard)), ("n_positions", shard.n_positions)):
                if e.get(key) != have:
                    raise storage.IndexCorruptedError(f"{folder}: manifest says {key}={e.get(key)!r}, the shard holds {have}")
            shards.append(shard)
            refs.append(ref)
        obj = cls(shards)
        obj.refs = refs
        obj.dirty = [False] * len(shards)
        if obj.codebook_sha != cb:
            raise storage.IndexCorruptedError(f"{root}: the shards' codebook does not match meta.sharded.codebook_sha256")
        if obj.spec != meta["spec"] or (meta.get("dim") is not None and obj.dim != meta["dim"]):
            raise storage.IndexCorruptedError(f"{root}: the shards' spec or dim differs from the top-level manifest")
        obj.pipeline_spec = meta.get("pipeline") or meta["spec"]
        obj.encoder_settings = meta.get("encoder")
        obj.info = meta.get("info") or {}
        return obj
