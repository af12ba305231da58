"""BEIR-layout collections: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

A bare name (``"scifact"``) resolves to ``../shared/data/<name>`` (or any folder in
``RETRIEVAL_PRUNE_DATA``, colon-separated) when it exists; otherwise a BEIR dataset
is downloaded from the public BEIR archive into ``~/.cache/retrieval_prune/beir``
(or fails with a message saying how to point at a local folder).
"""

from __future__ import annotations

import csv
import json
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from retrieval_prune.types import Corpus

__all__ = ["load_beir", "resolve_dataset", "read_jsonl", "BEIR_URL", "DEFAULT_DATASET"]

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
DEFAULT_DATASET = "scifact"


def _search_roots() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("RETRIEVAL_PRUNE_DATA", "").split(":") if p]
    here = Path(__file__).resolve()
    # <repo>/retrieval_prune/data/beir.py -> <repo>/../shared/data ; also cwd-relative
    roots += [here.parents[3] / "shared" / "data", Path.cwd().parent / "shared" / "data",
              Path.cwd() / "shared" / "data"]
    roots.append(Path.home() / ".cache" / "retrieval_prune" / "beir")
    return roots


def read_jsonl(path: Path):
    """Yield one JSON object per line, splitting on ``\\n`` only (texts may hold U+2028)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip("\r\n")
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno} is not valid JSON: {exc}") from None


def _download(name: str, dest_root: Path) -> Path:
    url = BEIR_URL.format(name=name)
    dest_root.mkdir(parents=True, exist_ok=True)
    zpath = dest_root / f"{name}.zip.part"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(zpath, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        zpath.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"dataset {name!r} is not a local folder and downloading {url} failed ({exc}). "
            "Point --data at a local BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) "
            "or set RETRIEVAL_PRUNE_DATA to a folder that holds it."
        ) from None
    with zipfile.ZipFile(zpath) as z:
        z.extractall(dest_root)
    zpath.unlink()
    return dest_root / name


def resolve_dataset(name_or_dir: str | os.PathLike, download: bool = True) -> Path:
    """The folder of a dataset given as a path or a bare name."""
    p = Path(name_or_dir)
    if p.is_dir():
        return p
    name = str(name_or_dir)
    if os.sep not in name and "/" not in name:
        for root in _search_roots():
            if (root / name / "corpus.jsonl").is_file():
                return root / name
        if download:
            return _download(name, Path.home() / ".cache" / "retrieval_prune" / "beir")
    raise FileNotFoundError(
        f"dataset folder {name!r} does not exist; give a BEIR-layout folder "
        "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or a BEIR dataset name"
    )


def load_beir(name_or_dir: str | os.PathLike, split: str = "test", download: bool = True,
              max_docs: int | None = None) -> Corpus:
    """Load a BEIR-layout collection.

    Document text is ``title + " " + text`` (just ``text`` when the title is empty).
    ``max_docs`` keeps the first documents plus every judged document of the split
    (for small real-data tests), dropping judgements whose document is gone.
    """
    folder = resolve_dataset(name_or_dir, download=download)
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for p in (corpus_path, queries_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; a BEIR folder holds corpus.jsonl and queries.jsonl")
    if not qrels_path.is_file():
        have = sorted(x.stem for x in (folder / "qrels").glob("*.tsv"))
        raise FileNotFoundError(f"{qrels_path} is missing; splits available: {have}")

    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header and header[0] not in ("query-id", "query_id", "qid"):
            rows = [header, *reader]
        else:
            rows = list(reader)
        for row in rows:
            if len(row) < 3:
                continue
            qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))

    doc_ids, texts, metas = [], [], []
    judged = {d for rel in qrels.values() for d in rel}
    seen: set[str] = set()
    for obj in read_jsonl(corpus_path):
        did = str(obj["_id"])
        if did in seen:
            raise ValueError(f"{corpus_path}: duplicate document id {did!r}")
        if max_docs is not None and len(doc_ids) >= max_docs and did not in judged:
            continue
        seen.add(did)
        title = (obj.get("title") or "").strip()
        body = (obj.get("text") or "").strip()
        doc_ids.append(did)
        texts.append(f"{title} {body}".strip() if title else body)
        metas.append({"title": title, **(obj.get("metadata") or {})})
    if not doc_ids:
        raise ValueError(f"{corpus_path} holds no documents; an index needs at least one")
    queries = {str(o["_id"]): o.get("text", "") for o in read_jsonl(queries_path)}
    if max_docs is not None:
        qrels = {q: {d: g for d, g in rel.items() if d in seen} for q, rel in qrels.items()}
        qrels = {q: rel for q, rel in qrels.items() if rel}
    qrels = {q: rel for q, rel in qrels.items() if q in queries}
    name = folder.name if max_docs is None else f"{folder.name}[:{max_docs}]"
    return Corpus(name=name, doc_ids=doc_ids, doc_texts=texts, queries=queries, qrels=qrels,
                  split=split, metadata=metas)
