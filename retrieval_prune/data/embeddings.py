"""Precomputed multi-vector sets (ViDoRe/ColPali-style page embeddings made elsewhere).

Users with a GPU encode page images with ColPali (or any late-interaction model) and
hand us the vectors. The folder format::

    DIR/embeddings.json        {"format": "retrieval_prune.embeddings", "version": 1,
                                "name": "...", "dim": 128, "encoder": "vidore/colpali-v1.2"}
    DIR/documents.safetensors  "embeddings" float32|float16 (n_patches, dim),
                               "offsets" int64 (n_docs + 1),
                               "importance" float32 (n_patches,)   optional, e.g. attention
    DIR/queries.safetensors    "embeddings" (n_qtokens, dim), "offsets" int64 (n_queries + 1)
    DIR/doc_ids.txt            one document id per line (n_docs lines)
    DIR/query_ids.txt          one query id per line
    DIR/qrels/<split>.tsv      query-id <tab> corpus-id <tab> score   (header line)

``.npy`` files with the same stems (``documents.embeddings.npy``, ``documents.offsets.npy``,
...) are accepted instead of safetensors. Nothing is pickled. Published ViDoRe figures
need the real ColPali encoder; :func:`make_synthetic_colpali_set` only builds a set of the
same *shape* (1,030 patch vectors of 128-d per page) for tests.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune.types import MultiVectors

__all__ = ["EmbeddingSet", "load_embedding_set", "save_embedding_set", "is_embedding_set",
           "make_synthetic_colpali_set", "FORMAT"]

FORMAT = "retrieval_prune.embeddings"


@dataclass
class EmbeddingSet:
    name: str
    docs: MultiVectors
    doc_ids: list[str]
    queries: MultiVectors
    query_ids: list[str]
    qrels: dict[str, dict[str, int]]
    split: str = "test"
    encoder: str = "precomputed"

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def settings(self) -> dict[str, Any]:
        return {"mode": "precomputed", "encoder": self.encoder, "dim": self.docs.dim,
                "name": self.name}


def is_embedding_set(folder: str | Path) -> bool:
    return (Path(folder) / "embeddings.json").is_file()


def _read_group(folder: Path, stem: str) -> dict[str, np.ndarray]:
    st = folder / f"{stem}.safetensors"
    if st.is_file():
        from safetensors.numpy import load_file

        return dict(load_file(str(st)))
    out = {}
    for p in folder.glob(f"{stem}.*.npy"):
        out[p.name[len(stem) + 1 : -4]] = np.load(p, allow_pickle=False)
    if not out:
        raise FileNotFoundError(f"{folder} has neither {stem}.safetensors nor {stem}.*.npy")
    return out


def _to_mv(group: dict[str, np.ndarray], what: str, folder: Path) -> MultiVectors:
    for key in ("embeddings", "offsets"):
        if key not in group:
            raise ValueError(f"{folder}: {what} lack the {key!r} tensor (have {sorted(group)})")
    emb = group["embeddings"]
    if emb.dtype not in (np.float32, np.float16):
        raise TypeError(f"{folder}: {what} embeddings are {emb.dtype}; store float32 or float16")
    w = group.get("importance")
    mv = MultiVectors(np.ascontiguousarray(emb, dtype=np.float32),
                      np.ascontiguousarray(group["offsets"], dtype=np.int64),
                      None if w is None else np.ascontiguousarray(w, dtype=np.float32))
    return mv.validate_finite(f"{what} in {folder}")


def _read_ids(path: Path, n: int, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (one {what} id per line)")
    ids = [line.rstrip("\n") for line in open(path, encoding="utf-8", newline="\n")]
    ids = [i for i in ids if i != ""]
    if len(ids) != n:
        raise ValueError(f"{path} lists {len(ids)} ids for {n} {what}s")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path} repeats an id")
    return ids


def load_embedding_set(folder: str | Path, split: str = "test") -> EmbeddingSet:
    folder = Path(folder)
    meta_path = folder / "embeddings.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing; see retrieval_prune.data.embeddings for the format")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > 1:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')} "
                         f"is not {FORMAT!r} v1")
    docs = _to_mv(_read_group(folder, "documents"), "documents", folder)
    queries = _to_mv(_read_group(folder, "queries"), "queries", folder)
    if docs.dim != queries.dim:
        raise ValueError(f"{folder}: documents are {docs.dim}-d but queries {queries.dim}-d")
    doc_ids = _read_ids(folder / "doc_ids.txt", len(docs), "document")
    query_ids = _read_ids(folder / "query_ids.txt", len(queries), "query")
    qrels: dict[str, dict[str, int]] = {}
    qpath = folder / "qrels" / f"{split}.tsv"
    if not qpath.is_file():
        raise FileNotFoundError(f"{qpath} is missing")
    with open(qpath, encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t"):
            if len(row) >= 3 and row[0] not in ("query-id", "qid"):
                qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    return EmbeddingSet(meta.get("name", folder.name), docs, doc_ids, queries, query_ids, qrels,
                        split, meta.get("encoder", "precomputed"))


def save_embedding_set(folder: str | Path, s: EmbeddingSet) -> Path:
    from safetensors.numpy import save_file

    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    dg = {"embeddings": s.docs.embeddings, "offsets": s.docs.offsets}
    if s.docs.weights is not None:
        dg["importance"] = s.docs.weights
    save_file({k: np.ascontiguousarray(v) for k, v in dg.items()}, str(folder / "documents.safetensors"))
    save_file({"embeddings": np.ascontiguousarray(s.queries.embeddings),
               "offsets": np.ascontiguousarray(s.queries.offsets)}, str(folder / "queries.safetensors"))
    (folder / "doc_ids.txt").write_text("\n".join(s.doc_ids) + "\n", encoding="utf-8")
    (folder / "query_ids.txt").write_text("\n".join(s.query_ids) + "\n", encoding="utf-8")
    with open(folder / "qrels" / f"{s.split}.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, rel in s.qrels.items():
            for d, g in rel.items():
                f.write(f"{q}\t{d}\t{g}\n")
    (folder / "embeddings.json").write_text(json.dumps(
        {"format": FORMAT, "version": 1, "name": s.name, "dim": s.docs.dim, "encoder": s.encoder},
        indent=1), encoding="utf-8")
    return folder


def make_synthetic_colpali_set(n_docs: int = 40, n_queries: int = 12, patches: int = 1030,
                               dim: int = 128, q_tokens: int = 20, seed: int = 0,
                               name: str = "synthetic-colpali") -> EmbeddingSet:
    """A SYNTHETIC set with ColPali's output shape: ``patches`` unit vectors per page.

    Each page has a few "content" directions its informative patches lie near (with an
    importance above the rest); most patches are background near a shared direction, as
    blank page regions are. Each query is built from one page's content directions, and
    that page is its relevant document. Only for tests and shape checks.
    """
    rng = np.random.default_rng(seed)
    background = rng.standard_normal(dim).astype(np.float32)
    docs, weights, topics = [], [], []
    for _ in range(n_docs):
        t = rng.standard_normal((6, dim)).astype(np.float32)
        topics.append(t)
        n_content = patches // 5
        content = t[rng.integers(0, 6, n_content)] + 0.6 * rng.standard_normal((n_content, dim))
        bg = background + 0.8 * rng.standard_normal((patches - n_content, dim))
        x = np.concatenate([content, bg]).astype(np.float32)
        perm = rng.permutation(patches)
        x = x[perm]
        w = np.concatenate([rng.uniform(0.5, 1.0, n_content),
                            rng.uniform(0.0, 0.4, patches - n_content)]).astype(np.float32)[perm]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        docs.append(x)
        weights.append(w / w.sum())
    qs, qrels, qids = [], {}, []
    for i in range(n_queries):
        d = int(rng.integers(0, n_docs))
        t = topics[d]
        q = t[rng.integers(0, 6, q_tokens)] + 0.9 * rng.standard_normal((q_tokens, dim))
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        qs.append(q)
        qids.append(f"q{i}")
        qrels[f"q{i}"] = {f"page{d}": 1}
    return EmbeddingSet(name, MultiVectors.from_list(docs, weights), [f"page{i}" for i in range(n_docs)],
                        MultiVectors.from_list(qs), qids, qrels, encoder="synthetic")
