"""Token-stage plug-ins: prune, pool, merge or cluster each document's token vectors."""

from retrieval_prune.preprocess.tokens.attention import AttentionPrune
from retrieval_prune.preprocess.tokens.crisp import Crisp
from retrieval_prune.preprocess.tokens.merge import Merge
from retrieval_prune.preprocess.tokens.pool import Pool

__all__ = ["AttentionPrune", "Pool", "Merge", "Crisp"]
