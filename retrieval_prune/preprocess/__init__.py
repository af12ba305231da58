"""Preprocessor plug-ins by stage; importing this package registers the built-in ones.

Token stage (``retrieval_prune.preprocess.tokens``): ``attn_prune``, ``pool``, ``merge``,
``crisp``. The ``data``, ``model`` and ``table`` stages have their protocol classes in
:mod:`retrieval_prune.preprocess.base` and no plug-ins yet.
"""

from retrieval_prune.preprocess.base import (
    DataPreprocessor,
    ModelPreprocessor,
    TablePreprocessor,
    TokenPreprocessor,
)
from retrieval_prune.preprocess.tokens import AttentionPrune, Crisp, Merge, Pool

__all__ = [
    "TokenPreprocessor",
    "DataPreprocessor",
    "ModelPreprocessor",
    "TablePreprocessor",
    "AttentionPrune",
    "Pool",
    "Merge",
    "Crisp",
]
