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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from retrieval_prune.safejson import value_depth
from retrieval_prune.types import Corpus

__all__ = ["load_beir", "resolve_dataset", "read_jsonl", "iter_jsonl", "iter_documents",
           "DocumentRecord", "MAX_METADATA_DEPTH", "BEIR_URL", "DEFAULT_DATASET"]

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


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, value)`` for each non-blank line of a JSONL file.

    The file is read as bytes and split on ``\\n`` only (texts may hold U+2028 or U+0085
    inside JSON strings); each line is decoded as UTF-8 on its own (a BOM before the first
    line is allowed), so a bad byte, bad JSON, or JSON nested too deeply for the parser
    raises a one-line :class:`ValueError` naming the file and the line.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte "
                    f"{exc.start + 1} of the line); save the file as UTF-8"
                ) from None
            line = line.strip("\r\n")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except RecursionError:
                raise ValueError(
                    f"{path}:{lineno}: the JSON on this line nests too deeply to parse; "
                    "a record is a flat object"
                ) from None
            except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
                detail = (f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
                          if isinstance(exc, json.JSONDecodeError) else str(exc))
                raise ValueError(f"{path}:{lineno}: not valid JSON ({detail})") from None
            yield lineno, value


def read_jsonl(path: str | os.PathLike) -> Iterator[Any]:
    """Yield one JSON value per non-blank line (see :func:`iter_jsonl`)."""
    for _, value in iter_jsonl(path):
        yield value


# -- validated document records -----------------------------------------------------------------
MAX_METADATA_DEPTH = 32
"""Deepest nesting allowed in a document's ``metadata`` (the object itself is level 1)."""


class DocumentRecord(NamedTuple):
    """One validated line of a corpus file; ``title`` is ``""`` when absent or null."""

    lineno: int
    id: str
    title: str
    text: str
    metadata: dict[str, Any]


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: str, n: int = 60) -> str:
    r = repr(value)  # repr escapes newlines, U+2028 and surrogates: the message stays one line
    return r if len(r) <= n else r[: n - 4] + "...'"


def _surrogate(s: str) -> str | None:
    """A description of the first lone surrogate in ``s`` (not encodable as UTF-8), or None."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone surrogate {s[exc.start]!r} at character {exc.start}, which is "
                "not valid Unicode (fix the \\uXXXX escape)")
    return None


def _metadata_problem(meta: dict) -> str | None:
    """Why ``meta`` is unusable (too deep, or a key or string that is not valid Unicode), or None."""
    depth = value_depth(meta, limit=MAX_METADATA_DEPTH)
    if depth > MAX_METADATA_DEPTH:
        return (f"'metadata' nests more than {MAX_METADATA_DEPTH} levels deep; flatten it "
                f"to at most {MAX_METADATA_DEPTH} levels")
    stack: list[tuple[Any, str]] = [(meta, "metadata")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                bad = _surrogate(key)
                if bad:
                    return f"a key of '{where}' {bad}"
                stack.append((child, f"{where}.{key}"))
        elif isinstance(node, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node))
        elif isinstance(node, str):
            bad = _surrogate(node)
            if bad:
                return f"'{where}' {bad}"
    return None


def iter_documents(path: str | os.PathLike, *, require_text: bool = True) -> Iterator[DocumentRecord]:
    """Validated documents of a JSONL corpus file, one :class:`DocumentRecord` per line.

    Each line is ``{"_id" (or "id"): str, "title": str | null (optional), "text": str,
    "metadata": {...} (optional)}``. ``_id`` must be a non-empty string, unique in the
    file; ``metadata`` a JSON object nested at most :data:`MAX_METADATA_DEPTH` levels;
    every id, title, text and metadata key or string valid Unicode (no lone surrogates).
    With ``require_text=False`` a missing or null ``text`` reads as ``""``.

    The first bad record raises a one-line :class:`ValueError`
    ``"<file>:<line>: <field> ..."``; consume the whole iterator before writing anything.
    """
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: the line is {_type_name(obj)}, expected a JSON object "
                             '{"_id": ..., "text": ...}')
        key = "_id" if "_id" in obj else "id"
        did = obj.get(key)
        if key not in obj:
            raise ValueError(f"{where}: the document has no '_id' (or 'id'); give each document "
                             "a unique string id")
        if not isinstance(did, str):
            hint = (f' (quote it: "{key}": "{did}")'
                    if isinstance(did, int) and not isinstance(did, bool) else "")
            raise ValueError(f"{where}: '{key}' is {_type_name(did)}, expected a non-empty "
                             f"string{hint}")
        if not did:
            raise ValueError(f"{where}: '{key}' is empty, expected a non-empty string")
        bad = _surrogate(did)
        if bad:
            raise ValueError(f"{where}: '{key}' {bad}")
        if did in seen:
            raise ValueError(f"{where}: duplicate document id {_short(did)} "
                             f"(first on line {seen[did]})")
        title = obj.get("title")
        if title is None:
            title = ""
        elif not isinstance(title, str):
            raise ValueError(f"{where}: 'title' is {_type_name(title)}, expected a string")
        elif bad := _surrogate(title):
            raise ValueError(f"{where}: 'title' {bad}")
        text = obj.get("text")
        if text is None:
            if require_text:
                state = "missing" if "text" not in obj else "null"
                raise ValueError(f"{where}: 'text' is {state}, expected a string; every "
                                 "document needs a text")
            text = ""
        elif not isinstance(text, str):
            raise ValueError(f"{where}: 'text' is {_type_name(text)}, expected a string")
        elif bad := _surrogate(text):
            raise ValueError(f"{where}: 'text' {bad}")
        meta = obj.get("metadata")
        if meta is None:
            meta = {}
        elif not isinstance(meta, dict):
            raise ValueError(f"{where}: 'metadata' is {_type_name(meta)}, expected a JSON object")
        elif problem := _metadata_problem(meta):
            raise ValueError(f"{where}: {problem}")
        seen[did] = lineno
        yield DocumentRecord(lineno, did, title, text, meta)


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
              max_docs: int | None = None, *, require_judgements: bool = True) -> Corpus:
    """Load a BEIR-layout collection.

    Document text is ``title + " " + text`` (just ``text`` when the title is empty).
    ``max_docs`` keeps the first documents plus every judged document of the split
    (for small real-data tests), dropping judgements whose document is gone.
    Every corpus line is validated (see :func:`iter_documents`; ``text`` may be absent).

    With ``require_judgements=False`` (indexing, not evaluation) a folder needs only
    ``corpus.jsonl``: a missing ``queries.jsonl`` or ``qrels/<split>.tsv`` gives empty
    queries or qrels. ``name_or_dir`` may then also be a single ``.jsonl`` file of
    documents (the collection is named after its stem, and has no judgements).
    """
    p = Path(name_or_dir)
    if p.is_file():
        if require_judgements:
            raise FileNotFoundError(
                f"{p} is a file; evaluation needs a BEIR folder holding corpus.jsonl, "
                f"queries.jsonl and qrels/{split}.tsv"
            )
        corpus_path, base_name = p, p.stem
        queries_path = qrels_path = None
    else:
        folder = resolve_dataset(name_or_dir, download=download)
        corpus_path, base_name = folder / "corpus.jsonl", folder.name
        queries_path, qrels_path = folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"
        if require_judgements:
            for f in (corpus_path, queries_path):
                if not f.is_file():
                    raise FileNotFoundError(
                        f"{f} is missing; a BEIR folder holds corpus.jsonl and queries.jsonl")
            if not qrels_path.is_file():
                have = sorted(x.stem for x in (folder / "qrels").glob("*.tsv"))
                raise FileNotFoundError(f"{qrels_path} is missing; splits available: {have}")
        else:
            if not corpus_path.is_file():
                raise FileNotFoundError(
                    f"{corpus_path} is missing; give a folder holding corpus.jsonl or a .jsonl "
                    "file of documents")
            if not queries_path.is_file():
                queries_path = None
            if not qrels_path.is_file():
                qrels_path = None

    qrels: dict[str, dict[str, int]] = {}
    if qrels_path is not None:
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
    kept: set[str] = set()
    for doc in iter_documents(corpus_path, require_text=False):  # validates every line
        if max_docs is not None and len(doc_ids) >= max_docs and doc.id not in judged:
            continue
        kept.add(doc.id)
        title, body = doc.title.strip(), doc.text.strip()
        doc_ids.append(doc.id)
        texts.append(f"{title} {body}".strip() if title else body)
        metas.append({"title": title, **doc.metadata})
    if not doc_ids:
        raise ValueError(f"{corpus_path} holds no documents; an index needs at least one")
    queries: dict[str, str] = {}
    if queries_path is not None:
        queries = {str(o["_id"]): o.get("text", "") for o in read_jsonl(queries_path)}
    if max_docs is not None:
        qrels = {q: {d: g for d, g in rel.items() if d in kept} for q, rel in qrels.items()}
        qrels = {q: rel for q, rel in qrels.items() if rel}
    qrels = {q: rel for q, rel in qrels.items() if q in queries}
    name = base_name if max_docs is None else f"{base_name}[:{max_docs}]"
    return Corpus(name=name, doc_ids=doc_ids, doc_texts=texts, queries=queries, qrels=qrels,
                  split=split, metadata=metas)
