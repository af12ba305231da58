"""Text retrieval over an index: :class:`Retriever`, a LangChain adapter, an HTTP server.

- :class:`Retriever` — ``Retriever.from_index(path)`` opens an index with the encoder its
  manifest records; ``retrieve`` / ``retrieve_batch`` return :class:`Hit` (id, score, text,
  metadata); ``add`` / ``delete`` / ``save`` keep it up to date. Thread-safe.
- :mod:`retrieval_prune.retrieve.langchain` — ``RetrievalPruneRetriever`` (needs
  ``pip install 'retrieval-prune[langchain]'``).
- :mod:`retrieval_prune.retrieve.server` — ``retrieval-prune serve INDEX`` and
  ``create_app(retriever)`` (needs ``pip install 'retrieval-prune[serve]'``).
- :class:`HashingEncoder` — a model-free toy encoder for tests and examples.

Importing this package imports neither torch, LangChain nor FastAPI.
"""

from retrieval_prune.retrieve._rwlock import RWLock
from retrieval_prune.retrieve.hashing import HashingEncoder
from retrieval_prune.retrieve.retriever import (
    DuplicateIdError,
    Hit,
    Retriever,
    UnknownIdError,
    load_encoder,
)

__all__ = [
    "Retriever",
    "Hit",
    "DuplicateIdError",
    "UnknownIdError",
    "HashingEncoder",
    "RWLock",
    "load_encoder",
]
