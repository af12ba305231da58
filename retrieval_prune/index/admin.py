"""Index maintenance commands: ``add``, ``delete``, ``compact``, ``inspect``.

Each command opens the live generation (checksums verified), changes it in memory and
writes a new generation with the crash-safe protocol of :mod:`.storage`; any error is
raised before the first byte is written, so a rejected command leaves the index as it
was. :func:`add_index_parsers` plugs them into the ``retrieval-prune`` command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune.index import storage

__all__ = ["read_documents", "inspect_index", "format_inspect", "add_index_parsers"]


def read_documents(path: str | Path) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """``(ids, texts, metadatas)`` from a BEIR folder (its ``corpus.jsonl``) or a JSONL file.

    Each line is ``{"_id" or "id": str, "text": str, "title": str (optional),
    "metadata": {...} (optional)}``; the text is ``title + " " + text`` as in
    :func:`~retrieval_prune.data.beir.load_beir`. Every line is validated first (see
    :func:`~retrieval_prune.data.beir.iter_documents`): the first bad one raises a one-line
    :class:`ValueError` naming the file, the line and the field, before anything is returned.
    """
    from retrieval_prune.data.beir import iter_documents

    p = Path(path)
    if p.is_dir():
        p = p / "corpus.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; give a BEIR folder or a .jsonl file of documents")
    ids, texts, metas = [], [], []
    for doc in iter_documents(p, require_text=True):
        title, body = doc.title.strip(), doc.text.strip()
        ids.append(doc.id)
        texts.append(f"{title} {body}".strip() if title else body)
        meta = dict(doc.metadata)
        if title:
            meta.setdefault("title", title)
        metas.append(meta)
    if not ids:
        raise ValueError(f"{p} holds no documents")
    return ids, texts, metas


def inspect_index(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """A description of the live generation: spec, sizes per file, vectors, documents,
    format version, encoder and codebook drift (checksums verified unless ``verify=False``)."""
    root = Path(path)
    meta, arrays, gen = storage.read_generation(root, verify=verify)
    manifest = json.loads((gen / "manifest.json").read_text(encoding="utf-8"))
    files = {name: int(entry["size"]) for name, entry in manifest["files"].items()}
    files["manifest.json"] = (gen / "manifest.json").stat().st_size
    total = sum(files.values())
    n_pos = int(arrays["alive"].shape[0]) if "alive" in arrays else int(meta.get("n_positions", 0))
    n_live = int(np.count_nonzero(np.asarray(arrays["alive"]))) if "alive" in arrays else n_pos
    n_vec = int(np.asarray(arrays["offsets"])[-1]) if "offsets" in arrays else None
    if n_vec is None and "embeddings" in arrays:
        n_vec = int(arrays["embeddings"].shape[0])
    enc = meta.get("encoder") or {}
    info = meta.get("info") or {}
    codec = info.get("codec") or {}
    return {
        "path": str(root),
        "generation": gen.name,
        "format": manifest.get("format"),
        "format_version": manifest.get("format_version"),
        "package_version": manifest.get("package_version"),
        "type": meta.get("type"),
        "spec": meta.get("spec"),
        "pipeline": meta.get("pipeline"),
        "dim": meta.get("dim"),
        "dim_search": codec.get("dim_search"),
        "code_size": codec.get("code_size"),
        "n_centroids": codec.get("n_centroids"),
        "documents": n_live,
        "positions": n_pos,
        "tombstones": n_pos - n_live,
        "vectors": n_vec,
        "vectors_per_doc": (n_vec / n_pos) if n_vec is not None and n_pos else None,
        "bytes": total,
        "bytes_per_doc": total / n_live if n_live else None,
        "files": dict(sorted(files.items())),
        "encoder": {
            "mode": enc.get("mode"),
            "checkpoint": (enc.get("checkpoint") or {}).get("name")
            if isinstance(enc.get("checkpoint"), dict)
            else enc.get("checkpoint"),
            "dim": enc.get("dim"),
        }
        if enc
        else None,
        "drift": info.get("drift"),
        "verified": verify,
    }


def format_inspect(d: dict[str, Any]) -> str:
    """Human-readable form of :func:`inspect_index`'s dict."""

    def num(v: Any, fmt: str = "{:,}") -> str:
        return "-" if v is None else fmt.format(v)

    lines = [
        f"index      {d['path']}  ({d['generation']}, {d['format']} v{d['format_version']}, "
        f"written by retrieval-prune {d['package_version']})",
        f"type       {d['type']}",
        f"spec       {d['spec']}",
        f"pipeline   {d['pipeline']}",
    ]
    if d.get("encoder"):
        e = d["encoder"]
        lines.append(f"encoder    {e.get('checkpoint') or e.get('mode')} ({e.get('dim')}-d)")
    dims = f"{d['dim']}" + (f" (searched at {d['dim_search']})" if d.get("dim_search") else "")
    lines.append(f"dim        {dims}")
    if d.get("code_size") is not None:
        lines.append(
            f"codes      {d['code_size']} bytes/vector, {num(d.get('n_centroids'))} centroids"
        )
    lines += [
        f"documents  {num(d['documents'])} live, {num(d['tombstones'])} tombstones "
        f"({num(d['positions'])} positions)",
        f"vectors    {num(d['vectors'])} ({num(d['vectors_per_doc'], '{:.1f}')} per document)",
        f"bytes      {num(d['bytes'])} total, {num(d['bytes_per_doc'], '{:,.0f}')} per live document",
        "files",
    ]
    width = max(len(n) for n in d["files"])
    lines += [f"  {n:<{width}}  {s:>14,}" for n, s in d["files"].items()]
    drift = d.get("drift")
    if drift:
        ratio = drift.get("ratio")
        lines.append(
            f"drift      fit mse {drift.get('fit_mse', 0):.4g}; added {num(drift.get('added_tokens'))} "
            f"tokens, ratio {num(ratio, '{:.3f}')}"
            + ("  -> REBUILD RECOMMENDED" if drift.get("rebuild_recommended") else "")
        )
    lines.append(f"checksums  {'verified' if d['verified'] else 'sizes only (--no-verify)'}")
    return "\n".join(lines)


# -- commands ---------------------------------------------------------------------------------
def cmd_add(args: argparse.Namespace) -> int:
    from retrieval_prune.retrieve import Retriever

    ids, texts, metas = read_documents(args.data)  # every record checked before any write
    retriever = Retriever.from_index(args.index, checkpoint=args.checkpoint, auto_compact=None)
    # the folder's write lock is held from here to the commit; a writer that committed since
    # from_index is merged in first, so neither writer's documents are lost
    with retriever.transaction(lock_timeout=args.lock_timeout) as tx:
        before = len(retriever.index)
        retriever.add(ids, texts, metas)  # duplicates / clashes raise before anything is written
    gen = tx.generation
    drift = getattr(retriever.index, "drift", None)
    report = {
        "index": str(args.index),
        "generation": gen.name,
        "added": len(ids),
        "documents": len(retriever.index),
        "documents_before": before,
        "drift": drift() if callable(drift) else None,
    }
    _print(report, args.json, f"added {len(ids)} documents to {args.index} ({gen.name}); "
           f"{report['documents']} live documents")
    d = report["drift"]
    if d and d.get("ratio") is not None and not args.json:
        from retrieval_prune.index.staged import DRIFT_MIN_TOKENS, DRIFT_WARN

        if d.get("rebuild_recommended"):
            verdict = " -> rebuild recommended"
        elif d["ratio"] > DRIFT_WARN:
            verdict = (f" (above {DRIFT_WARN}, but only {d['added_tokens']} vectors added; judged "
                       f"from {DRIFT_MIN_TOKENS})")
        else:
            verdict = " (ok)"
        print(f"codebook drift: added vectors quantize {d['ratio']:.3f}x as badly as the fit "
              f"data{verdict}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from retrieval_prune.index.base import load_index

    ids = list(dict.fromkeys(str(i) for i in args.ids))
    with storage.write_lock(args.index, args.lock_timeout):  # read-modify-write, one writer
        index = load_index(args.index)
        index.delete(ids)  # unknown ids raise KeyError before anything is written
        meta = index.info.get("doc_metadata")
        if isinstance(meta, dict):
            for i in ids:
                meta.pop(i, None)
        gen = index.save(args.index)
    _print({"index": str(args.index), "generation": gen.name, "deleted": len(ids),
            "documents": len(index), "tombstones": index.n_positions - len(index)}, args.json,
           f"deleted {len(ids)} documents from {args.index} ({gen.name}); {len(index)} live, "
           f"{index.n_positions - len(index)} tombstones (run `retrieval-prune compact`)")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from retrieval_prune.index.base import load_index

    with storage.write_lock(args.index, args.lock_timeout):  # read-modify-write, one writer
        index = load_index(args.index)
        dropped = index.n_positions - len(index)
        index.compact()
        gen = index.save(args.index)
    _print({"index": str(args.index), "generation": gen.name, "dropped": dropped,
            "documents": len(index)}, args.json,
           f"compacted {args.index} ({gen.name}): {dropped} tombstones dropped, "
           f"{len(index)} documents")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    d = inspect_index(args.index, verify=not args.no_verify)
    print(json.dumps(d, indent=1) if args.json else format_inspect(d))
    return 0


def _print(obj: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(obj) if as_json else text)


def _lock_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                   help="wait this long for another writer of the index (default "
                        "$RETRIEVAL_PRUNE_LOCK_TIMEOUT or 300)")


def add_index_parsers(sub: Any) -> None:
    """Register ``add``, ``delete``, ``compact`` and ``inspect`` on a subparsers object."""
    a = sub.add_parser("add", help="add documents to an index (encoded like the index)",
                       description="Encode documents with the index's encoder and token steps, "
                                   "code them with its codebook and write a new generation.")
    a.add_argument("index", metavar="INDEX")
    a.add_argument("--data", required=True, metavar="DIR_OR_JSONL",
                   help="BEIR folder (corpus.jsonl) or a .jsonl file of {_id, title, text}")
    a.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="checkpoint folder, for an index built with a trained checkpoint")
    _lock_arg(a)
    a.add_argument("--json", action="store_true", help="print a JSON report")
    a.set_defaults(func=cmd_add)

    d = sub.add_parser("delete", help="delete documents by id (tombstones)",
                       description="Tombstone documents by external id; `compact` drops them.")
    d.add_argument("index", metavar="INDEX")
    d.add_argument("ids", nargs="+", metavar="ID")
    _lock_arg(d)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_delete)

    c = sub.add_parser("compact", help="rewrite an index without its tombstones",
                       description="Rewrite the index without deleted documents; ids survive.")
    c.add_argument("index", metavar="INDEX")
    _lock_arg(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compact)

    i = sub.add_parser("inspect", help="print an index's spec, sizes, vectors and documents",
                       description="Describe the live generation of an index (checksums verified).")
    i.add_argument("index", metavar="INDEX")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--no-verify", action="store_true", help="check file sizes only (faster)")
    i.set_defaults(func=cmd_inspect)
