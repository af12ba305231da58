"""What ``retrieval-prune inspect`` prints: an index folder's live generation described.

The maintenance commands themselves (``add``, ``delete``, ``compact``, ``inspect``) are
argparse handlers in :mod:`retrieval_prune.cli`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune.index import storage

__all__ = ["inspect_index", "format_inspect"]


def inspect_index(
    path: str | Path, *, verify: bool = True, pointer: tuple[str, str] | None = None
) -> dict[str, Any]:
    """A description of the live generation: spec, sizes per file, vectors, documents,
    format version, encoder and codebook drift (checksums verified unless ``verify=False``).
    A sharded index is described with its totals and one line per shard."""
    root = Path(path)
    meta, arrays, gen = storage.read_generation(root, verify=verify, pointer=pointer)
    if meta.get("type") == "sharded":
        return _inspect_sharded(root, meta, gen, verify)
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


def _inspect_sharded(root: Path, meta: dict[str, Any], gen: Path, verify: bool) -> dict[str, Any]:
    entries = (meta.get("sharded") or {}).get("shards") or []
    parts = [inspect_index(root / e["name"], verify=verify, pointer=(e["generation"], e["manifest_sha256"]))
             for e in entries]
    top = (gen / "manifest.json").stat().st_size
    d = dict(parts[0]) if parts else {}
    d.update(
        path=str(root), generation=gen.name, type="sharded", spec=meta.get("spec"), pipeline=meta.get("pipeline"),
        documents=sum(p["documents"] for p in parts), positions=sum(p["positions"] for p in parts),
        tombstones=sum(p["tombstones"] for p in parts),
        vectors=sum(p["vectors"] or 0 for p in parts) if parts and all(p["vectors"] is not None for p in parts) else None,
        bytes=top + sum(p["bytes"] for p in parts),
        files={"manifest.json": top},
        codebook_sha256=(meta.get("sharded") or {}).get("codebook_sha256"),
        shards=[{"name": e["name"], "generation": p["generation"], "documents": p["documents"],
                 "tombstones": p["tombstones"], "vectors": p["vectors"], "bytes": p["bytes"]}
                for e, p in zip(entries, parts, strict=True)],
        drift=None, verified=verify,
    )
    d["vectors_per_doc"] = d["vectors"] / d["positions"] if d["vectors"] is not None and d["positions"] else None
    d["bytes_per_doc"] = d["bytes"] / d["documents"] if d["documents"] else None
    return d


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
    if d.get("shards"):
        lines.append(f"shards     {len(d['shards'])}, one codebook (sha256 {str(d.get('codebook_sha256'))[:16]}...)")
        lines += [f"  {s['name']}  {s['generation']}  {num(s['documents']):>12} docs  "
                  f"{num(s['tombstones'])} tombstones  {num(s['bytes']):>14} bytes" for s in d["shards"]]
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
