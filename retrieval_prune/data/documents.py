"""Documents to add to an index: a BEIR folder (its ``corpus.jsonl``) or a JSONL file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval_prune.data.beir import iter_documents

__all__ = ["read_documents"]


def read_documents(path: str | Path) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """``(ids, texts, metadatas)`` from a BEIR folder (its ``corpus.jsonl``) or a JSONL file.

    Each line is ``{"_id" or "id": str, "text": str, "title": str (optional),
    "metadata": {...} (optional)}``; the text is ``title + " " + text`` as in
    :func:`~retrieval_prune.data.beir.load_beir`. Every line is validated first (see
    :func:`~retrieval_prune.data.beir.iter_documents`): the first bad one raises a one-line
    :class:`ValueError` naming the file, the line and the field, before anything is returned.
    """
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
