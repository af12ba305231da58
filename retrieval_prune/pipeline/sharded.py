"""The sharded build: the one build path, its maps run by an executor, its output in shards.

:func:`build_sharded` makes a sharded index folder
(:class:`~retrieval_prune.index.sharded.ShardedIndex`) in four resumable phases:

1. **encode** -- the corpus is cut into blocks of ``block_docs`` documents (no block crosses
   a shard boundary; shard ``s`` holds documents ``[round(sN/S), round((s+1)N/S))`` in
   corpus order). The executor maps :func:`encode_block` over them -- the encoder is made
   once per worker (``encoder_factory``), the pipeline's token steps run on each block --
   and the driver writes each block's vectors to ``OUT/.build/`` (two ``.npy`` files and a
   marker with their sha256, written last);
2. **fit** -- the codec is fitted once, on the blocks laid end to end (the same call on the
   same vectors as a single-index build), and saved as a checksummed codebook generation;
3. **shards** -- the executor maps :func:`write_shard` over the shards: each codes its
   blocks with the shared codebook and commits ``OUT/shard-XXXX`` through the normal
   crash-safe writer (:func:`~retrieval_prune.index.staged.build_streaming`);
4. **commit** -- the top-level manifest names every shard's generation and sha256.

A build that is interrupted anywhere resumes when run again with the same input: blocks
whose files pass their sha256, a committed codebook, and shards committed by this build
(their manifest records the build key and codebook; opening them checks every file's
sha256) are kept; the rest is redone. The result equals an uninterrupted build.

Executors: ``local`` runs every map in this process; ``ray`` runs them on a Ray cluster
(an actor pool for encoding, one task per shard). The folder must be reachable from every
worker (one machine, or a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune.atomic import atomic_write_json
from retrieval_prune.index import storage
from retrieval_prune.index.base import index_types, load_index
from retrieval_prune.index.sharded import MAX_SHARDS, ShardedIndex, codebook_sha256, shard_name
from retrieval_prune.npyio import NpyAppender
from retrieval_prune.pipeline.executors import Executor, get_executor
from retrieval_prune.pipeline.spec import Pipeline, make_pipeline
from retrieval_prune.types import MultiVectors

__all__ = ["build_sharded", "shard_bounds", "encode_block", "write_shard", "BUILD_DIR"]

#: scratch folder of an unfinished sharded build (inside the index folder)
BUILD_DIR = ".build"
_CODEBOOK = "codebook"


def shard_bounds(n: int, shards: int) -> list[int]:
    """Document boundaries of ``shards`` contiguous shards of ``n`` documents (sizes differ by
    at most one)."""
    return [(s * n) // shards for s in range(shards + 1)]


def _blocks(bounds: list[int], block_docs: int) -> list[tuple[int, int, int]]:
    """``(shard, start, stop)`` blocks of at most ``block_docs`` documents within each shard."""
    out = []
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        for lo in range(a, b, block_docs):
            out.append((s, lo, min(lo + block_docs, b)))
    return out


def encode_block(state: Any, item: tuple) -> tuple[int, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One block: ``item = (block number, pipeline spec, texts or (embeddings, offsets, weights))``
    -> ``(block number, embeddings, offsets, token-step reports)`` after the token steps.
    ``state`` is the worker's encoder (None when the item carries vectors)."""
    bno, spec, payload = item
    pipe = make_pipeline(spec)
    if isinstance(payload, tuple):
        emb, off, w = payload
        docs = MultiVectors(np.ascontiguousarray(emb), np.asarray(off) - off[0],
                            None if w is None else np.ascontiguousarray(w))
    else:
        docs = state.encode_documents(list(payload), progress=False, return_importance=pipe.needs_importance)
    docs.validate_finite("documents")
    out = pipe.transform_documents(docs, fit=False)
    return bno, np.ascontiguousarray(out.embeddings, np.float32), np.asarray(out.offsets, np.int64), pipe.reports


def _block_paths(work: Path, bno: int) -> tuple[Path, Path, Path]:
    stem = work / f"block-{bno:06d}"
    return Path(f"{stem}.emb.npy"), Path(f"{stem}.off.npy"), Path(f"{stem}.json")


def _block_done(work: Path, bno: int) -> bool:
    emb, off, marker = _block_paths(work, bno)
    try:
        rec = json.loads(marker.read_text())
        return rec["emb"] == storage.sha256_file(emb) and rec["off"] == storage.sha256_file(off)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_block(work: Path, bno: int, emb: np.ndarray, off: np.ndarray, reports: list) -> None:
    pe, po, marker = _block_paths(work, bno)
    for path, arr in ((pe, emb), (po, off)):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        tmp.replace(path)
    atomic_write_json(marker, {"emb": storage.sha256_file(pe), "off": storage.sha256_file(po), "reports": reports})


def _read_block(work: Path, bno: int) -> MultiVectors:
    pe, po, _ = _block_paths(work, bno)
    return MultiVectors(np.load(pe, allow_pickle=False), np.load(po, allow_pickle=False))


def _save_codebook(index: Any, folder: Path, key: str) -> None:
    meta = {"type": index.index_type, "spec": index.spec, "info": index.info, "build_key": key}
    storage.write_generation(folder, index.chain.state_arrays(), meta)


def _load_codebook(folder: Path) -> tuple[Any, dict[str, Any]]:
    meta, arrays, _ = storage.read_generation(folder)
    cls = index_types()[meta["type"]]
    index = cls.from_spec(meta["spec"])  # type: ignore[attr-defined]
    index.chain.load_state({k: np.array(v) for k, v in arrays.items()})
    index.info = dict(meta.get("info") or {})
    after = getattr(index, "_after_fit", None)
    if after is not None:
        after()
    return index, meta


def _committed(folder: Path, mark: dict[str, Any], n_docs: int) -> tuple[str, str] | None:
    """The pointer of a shard this build already committed (its manifest carries ``mark``;
    opening it checks every file's sha256), else None (missing, damaged or foreign)."""
    if not (folder / "CURRENT").is_file():
        return None
    try:
        done = load_index(folder)
    except (OSError, ValueError):
        return None
    ok = done.info.get("sharded_build") == mark and done.n_positions == n_docs
    return done.loaded_pointer if ok else None


def write_shard(item: tuple) -> tuple[int, str, str]:
    """One shard: ``item = (shard, of, out, build key, pipeline spec, block numbers, ids,
    texts or None, encoder settings)`` -> ``(shard, generation, manifest sha256)``. Codes the
    shard's blocks with the build's codebook and commits ``out/shard-XXXX``; a shard this
    build already committed (same key and codebook; every file's sha256 checked) is kept."""
    s, of, out, key, spec, bnos, ids, texts, enc = item
    out = Path(out)
    folder = out / shard_name(s)
    work = out / BUILD_DIR
    mark = {"key": key, "shard": s, "of": of}
    done = _committed(folder, mark, len(ids))
    if done is not None:
        return s, *done  # type: ignore[misc]
    from retrieval_prune.index.staged import build_streaming

    index, _ = _load_codebook(work / _CODEBOOK)
    pipe = make_pipeline(spec)
    index.pipeline_spec = pipe.spec
    index.info["sharded_build"] = mark

    def batches():
        a = 0
        for bno in bnos:
            block = _read_block(work, bno)
            b = a + len(block)
            yield (block, ids[a:b]) if texts is None else (block, ids[a:b], texts[a:b])
            a = b

    gen = build_streaming(index, folder, batches(), encoder_settings=enc)
    return s, gen.name, storage.sha256_file(gen / "manifest.json")


def _build_key(spec: str, ids: Sequence[str], texts: Sequence[str] | None, docs: MultiVectors | None,
               shards: int, block_docs: int, enc: dict | None) -> str:
    h = hashlib.sha256(json.dumps([spec, shards, block_docs, enc], sort_keys=True, default=str).encode())
    for i in ids:
        h.update(i.encode() + b"\0")
    if texts is not None:
        for t in texts:
            h.update(t.encode() + b"\0")
    if docs is not None:
        h.update(np.ascontiguousarray(docs.offsets).tobytes())
        h.update(hashlib.sha256(np.ascontiguousarray(docs.embeddings[:: max(1, docs.n_tokens // 4096)])).digest())
    return h.hexdigest()


def build_sharded(
    pipeline: str | Pipeline,
    ids: Sequence[str],
    *,
    shards: int,
    out: str | Path,
    docs: MultiVectors | None = None,
    texts: Sequence[str] | None = None,
    encoder: Any = None,
    encoder_factory: Callable[[], Any] | None = None,
    executor: str | Executor | None = None,
    encoder_settings: dict[str, Any] | None = None,
    block_docs: int = 256,
    store_texts: bool = True,
    info: dict[str, Any] | None = None,
    progress: bool = False,
):
    """Build ``pipeline`` over a corpus into a sharded index folder ``out``; see the module
    docstring. Give vectors (``docs``) or texts with an ``encoder`` (or an
    ``encoder_factory`` that makes one in each worker; with the Ray executor the encoder
    object itself is shipped to the workers when no factory is given); with vectors,
    ``encoder_settings`` records how they were encoded. Returns a
    :class:`~retrieval_prune.pipeline.build.BuildResult` whose ``stats`` time each phase."""
    from retrieval_prune.pipeline.build import BuildResult

    t0 = time.perf_counter()
    pipe = make_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    pipe.check_buildable()
    ids = [str(i) for i in ids]
    n = len(ids)
    if not n:
        raise ValueError("the corpus is empty; an index needs at least one document")
    if not isinstance(shards, int) or not 1 <= shards <= min(n, MAX_SHARDS):
        raise ValueError(f"shards={shards!r} must be an integer in 1..{min(n, MAX_SHARDS)} (at most one per document)")
    if not isinstance(block_docs, int) or block_docs < 1:
        raise ValueError(f"block_docs={block_docs!r} must be a positive integer")
    if len(set(ids)) != n:
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"duplicate id {dup!r}; ids must be unique")
    if docs is None and (texts is None or (encoder is None and encoder_factory is None)):
        raise ValueError("give the documents' vectors (docs=) or their texts with an encoder")
    if texts is not None and len(texts) != n:
        raise ValueError(f"{len(texts)} texts for {n} ids; give one text per id")
    if docs is not None and len(docs) != n:
        raise ValueError(f"{len(docs)} documents for {n} ids; give one id per document")
    ex = get_executor(executor)
    if encoder is None and encoder_factory is not None and docs is None:
        encoder = encoder_factory()  # its settings go into the manifest; local blocks reuse it
    enc_settings = dict(encoder.settings) if encoder is not None else encoder_settings
    out = Path(out)
    key = _build_key(pipe.spec, ids, texts, docs, shards, block_docs, enc_settings)
    stats: dict[str, Any] = {"executor": ex.name, "shards": shards, "key": key}
    kept_texts = list(texts) if (store_texts and texts is not None) else None

    with storage.write_lock(out):
        if (out / "CURRENT").is_file():
            try:
                done = load_index(out)
                if isinstance(done, ShardedIndex) and done.info.get("build_key") == key:
                    # a driver killed between the commit and its clean-up left the work
                    # folder (and perhaps dead writers' temporaries): finish that clean-up
                    shutil.rmtree(out / BUILD_DIR, ignore_errors=True)
                    storage.gc_generations(out)
                    stats["resumed"] = "complete"
                    return BuildResult(pipe, done, out, storage.current_generation(out),
                                       time.perf_counter() - t0, True, stats)
            except (OSError, ValueError):
                pass
        work = out / BUILD_DIR
        state_file = work / "state.json"
        try:
            same = json.loads(state_file.read_text()).get("key") == key
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            atomic_write_json(state_file, {"key": key})
        bounds = shard_bounds(n, shards)
        blocks = _blocks(bounds, block_docs)

        # 1. encode + token steps, block by block (blocks already on disk are kept)
        t = time.perf_counter()
        todo = [b for b, _ in enumerate(blocks) if not _block_done(work, b)]
        stats["blocks"], stats["blocks_reused"] = len(blocks), len(blocks) - len(todo)

        def items():
            for bno in todo:
                _, a, b = blocks[bno]
                if docs is not None:
                    w = None if docs.weights is None else docs.weights[docs.offsets[a]:docs.offsets[b]]
                    payload: Any = (docs.embeddings[docs.offsets[a]:docs.offsets[b]], docs.offsets[a:b + 1], w)
                else:
                    payload = list(texts[a:b])  # type: ignore[index]
                yield bno, pipe.spec, payload

        if docs is not None:
            init = _constant(None)  # blocks carry their vectors: no encoder in the workers
        elif encoder_factory is not None and ex.name != "local":
            init = encoder_factory  # each worker makes its own
        else:
            init = _constant(encoder)
        results = ex.map(encode_block, items(), init=init)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(todo), desc=f"encode ({ex.name})", unit="block")
        for bno, emb, off, reps in results:
            _write_block(work, bno, emb, off, reps)
        stats["encode_seconds"] = time.perf_counter() - t

        # 2. the codec, fitted once on every block (as a single-index build fits it)
        t = time.perf_counter()
        cb_folder = work / _CODEBOOK
        index = pipe.index
        reports = _merge_reports(work, len(blocks))
        has_codec = getattr(index, "chain", None) is not None
        if has_codec:
            try:
                _, cb_meta = _load_codebook(cb_folder)
                fitted = cb_meta.get("build_key") == key
            except (OSError, ValueError, KeyError):
                fitted = False
            if not fitted:
                scratch = storage.scratch_dir(work)
                try:
                    emb_app = NpyAppender(scratch / "tokens.npy", np.float32, (_block_dim(work),))
                    off_app = NpyAppender(scratch / "offsets.npy", np.int64)
                    off_app.append(np.zeros(1, np.int64))
                    n_tok = 0
                    for bno in range(len(blocks)):
                        blk = _read_block(work, bno)
                        emb_app.append(blk.embeddings)
                        off_app.append(blk.offsets[1:] + n_tok)
                        n_tok += blk.n_tokens
                    emb_app.close()
                    off_app.close()
                    tdocs = MultiVectors(np.load(scratch / "tokens.npy", mmap_mode="r"),
                                         np.load(scratch / "offsets.npy"))
                    index.fit(tdocs)
                    pipe.reports = reports
                    pipe.finish(enc_settings)
                    _save_codebook(index, cb_folder, key)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        stats["fit_seconds"] = time.perf_counter() - t

        # 3. one task per shard, each through the crash-safe writer
        t = time.perf_counter()
        if has_codec:
            shard_items = []
            for s in range(shards):
                bnos = [b for b, blk in enumerate(blocks) if blk[0] == s]
                a, b = bounds[s], bounds[s + 1]
                shard_items.append((s, shards, str(out), key, pipe.spec, bnos, ids[a:b],
                                    None if kept_texts is None else kept_texts[a:b], enc_settings))
            for _ in ex.map(write_shard, shard_items):
                pass
        else:  # a flat index: each shard holds its blocks' vectors
            for s in range(shards):
                _write_flat_shard(out, work, s, shards, key, pipe, blocks, bounds, ids, kept_texts, enc_settings)
        stats["shards_seconds"] = time.perf_counter() - t

        # 4. the top-level manifest over the committed shards (one switch)
        loaded = [load_index(out / shard_name(s)) for s in range(shards)]
        sharded = ShardedIndex(loaded)
        sharded.refs = [s.loaded_pointer for s in loaded]
        sharded.dirty = [False] * shards
        sharded.pipeline_spec = pipe.spec
        sharded.encoder_settings = enc_settings
        sharded.info = {**(info or {}), "build_key": key, "token_steps": reports, "stages": pipe.stages(),
                        "codebook_sha256": codebook_sha256(loaded[0]),
                        "sharded_build": {k: round(v, 3) if isinstance(v, float) else v
                                          for k, v in stats.items() if k != "key"}}
        gen = sharded.save(out)
        shutil.rmtree(work, ignore_errors=True)
    stats["seconds"] = time.perf_counter() - t0
    return BuildResult(pipe, sharded, out, gen, stats["seconds"], True, stats)


class _constant:
    """A picklable zero-argument callable returning one object (the encoder itself)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self) -> Any:
        return self.value


def _block_dim(work: Path) -> int:
    pe, _, _ = _block_paths(work, 0)
    from retrieval_prune.npyio import npy_header

    _, shape = npy_header(pe)
    return int(shape[1])


def _merge_reports(work: Path, n_blocks: int) -> list[dict[str, Any]]:
    """The token steps' reports summed over every block."""
    merged: dict[str, dict[str, Any]] = {}
    for bno in range(n_blocks):
        for r in json.loads(_block_paths(work, bno)[2].read_text()).get("reports", []):
            agg = merged.setdefault(r["step"], {**r, "vectors_before": 0, "vectors_after": 0,
                                                "bytes_before": 0, "bytes_after": 0, "seconds": 0.0})
            for k in ("vectors_before", "vectors_after", "bytes_before", "bytes_after", "seconds"):
                agg[k] += r[k]
    for r in merged.values():
        r["kept_fraction"] = r["vectors_after"] / max(r["vectors_before"], 1)
    return list(merged.values())


def _write_flat_shard(out, work, s, shards, key, pipe, blocks, bounds, ids, texts, enc) -> None:
    folder = out / shard_name(s)
    mark = {"key": key, "shard": s, "of": shards}
    a, b = bounds[s], bounds[s + 1]
    if _committed(folder, mark, b - a) is not None:
        return
    index = make_pipeline(pipe.spec).index
    parts = [_read_block(work, bno) for bno, blk in enumerate(blocks) if blk[0] == s]
    emb = np.concatenate([p.embeddings for p in parts])
    lens = np.concatenate([np.diff(p.offsets) for p in parts])
    index.add(MultiVectors(emb, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)),
              ids[a:b], None if texts is None else texts[a:b])
    index.pipeline_spec = pipe.spec
    index.encoder_settings = enc
    index.info["sharded_build"] = mark
    index.save(folder)
