"""Data-stage plug-ins: training-pair selection (``select(PairSet...) -> Selection``).

- ``semdedup``: SemDeDup near-duplicate removal (Abbas et al. 2023), with aliases;
- ``dbp``: density-based pruning by cluster complexity (Abbas et al. 2024);
- ``ccs``: coverage-centric coreset selection over EL2N scores (Zheng et al. 2023);
- ``top_importance``: the hardest ``keep`` fraction (the top-importance control);
- ``random_pairs``: a uniform ``keep`` fraction (the random control).

Every plug-in selects training *queries* (a query stands for its (query, positive) pairs);
none removes a document. The pair embeddings and EL2N scores a plug-in reads are made by
:mod:`retrieval_prune.train.select`.
"""

from retrieval_prune.preprocess.data.ccs import CoverageCentric, RandomPairs, TopImportance
from retrieval_prune.preprocess.data.dbp import DensityBasedPruning
from retrieval_prune.preprocess.data.semdedup import SemDeDup

__all__ = ["SemDeDup", "DensityBasedPruning", "CoverageCentric", "TopImportance", "RandomPairs"]
