"""retrieval_prune: compressed multi-vector (late-interaction) retrieval indexes."""

__version__ = "0.1.0"

from retrieval_prune.types import Corpus, MultiVectors, SearchResult  # noqa: E402

__all__ = ["MultiVectors", "SearchResult", "Corpus", "__version__"]
