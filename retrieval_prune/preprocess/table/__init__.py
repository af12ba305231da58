"""Table-stage plug-ins: trim the input vocabulary and its embedding rows."""

from retrieval_prune.preprocess.table.vocabtrim import VocabTrim, query_token_change_share

__all__ = ["VocabTrim", "query_token_change_share"]
