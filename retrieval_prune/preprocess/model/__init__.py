"""Model-stage plug-ins: they act on the encoder's weights.

``gmp`` (global magnitude pruning with a per-layer minimum) and ``dare`` (drop-and-rescale
of a fine-tune's delta over its base, DAREx-q, magnitude). Importing this package registers
them.
"""

from retrieval_prune.preprocess.model.dare import Dare
from retrieval_prune.preprocess.model.gmp import GlobalMagnitude
from retrieval_prune.preprocess.model.loraprune import LoRAPrune

__all__ = ["Dare", "GlobalMagnitude", "LoRAPrune"]
