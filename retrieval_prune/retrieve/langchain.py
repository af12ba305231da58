"""LangChain adapter: a :class:`langchain_core.retrievers.BaseRetriever` over a Retriever.

Examples
--------
>>> from retrieval_prune.retrieve import HashingEncoder, Retriever
>>> from retrieval_prune.retrieve.langchain import RetrievalPruneRetriever
>>> r = Retriever.from_texts(["a", "b"], ["red apples", "green pears"], HashingEncoder())
>>> docs = RetrievalPruneRetriever(retriever=r, k=1).invoke("apples")
>>> docs[0].page_content, docs[0].metadata["id"]
('red apples', 'a')
"""

from __future__ import annotations

from typing import Any

try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from pydantic import ConfigDict, Field
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the LangChain adapter needs langchain-core; install it with "
        "pip install 'retrieval-prune[langchain]'"
    ) from exc

from retrieval_prune.retrieve.retriever import Hit, Retriever

__all__ = ["RetrievalPruneRetriever", "hit_to_document"]


def hit_to_document(hit: Hit) -> Document:
    """``Document(page_content=text, metadata={"id", "score", **metadata})``.

    The document's own metadata never overwrites ``id`` or ``score``.
    """
    return Document(
        page_content=hit.text or "",
        metadata={**hit.metadata, "id": hit.id, "score": hit.score},
        id=hit.id,
    )


class RetrievalPruneRetriever(BaseRetriever):
    """LangChain retriever returning the ``k`` best documents of a :class:`Retriever`.

    Parameters
    ----------
    retriever : Retriever
    k : int
        Documents per query (>= 1).

    ``invoke(query)`` returns ``list[Document]``; ``batch(queries)`` runs them on
    LangChain's thread pool (the Retriever is thread-safe).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Retriever
    k: int = Field(default=10, ge=1)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        k = kwargs.get("k", self.k)
        return [hit_to_document(h) for h in self.retriever.retrieve(query, k=k)]
