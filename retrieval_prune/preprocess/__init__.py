"""Preprocessor plug-ins by stage; importing this package registers the built-in ones.

Data stage (``preprocess.data``): ``semdedup``, ``dbp``, ``ccs``, ``top_importance``,
``random_pairs`` (training-pair selection). Model stage (``preprocess.model``): ``gmp``,
``dare``. Table stage (``preprocess.table``): ``vocabtrim``. Token stage
(``preprocess.tokens``): ``attn_prune``, ``pool``, ``merge``, ``crisp``. The protocols are in
:mod:`retrieval_prune.preprocess.base`.
"""

from retrieval_prune.preprocess.base import (
    DataPreprocessor,
    ModelPreprocessor,
    TablePreprocessor,
    TokenPreprocessor,
)
from retrieval_prune.preprocess.data import (
    CoverageCentric,
    DensityBasedPruning,
    RandomPairs,
    SemDeDup,
    TopImportance,
)
from retrieval_prune.preprocess.model import Dare, GlobalMagnitude
from retrieval_prune.preprocess.table import VocabTrim
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
    "Dare",
    "GlobalMagnitude",
    "VocabTrim",
    "SemDeDup",
    "DensityBasedPruning",
    "CoverageCentric",
    "TopImportance",
    "RandomPairs",
]
