"""Model-stage plug-ins: they act on the encoder's weights.

``gmp`` (global magnitude pruning with a per-layer minimum) and ``dare`` (drop-and-rescale
of a fine-tune's delta over its base, DAREx-q, magnitude), ``loraprune`` (heads and FFN
channels), ``dare_merge`` (fine-tunes of one base, Task Arithmetic over DARE deltas). Importing this
package registers them.
"""

from retrieval_prune.preprocess.model.dare import Dare
from retrieval_prune.preprocess.model.dare_merge import DareMerge
from retrieval_prune.preprocess.model.gmp import GlobalMagnitude
from retrieval_prune.preprocess.model.loraprune import LoRAPrune

__all__ = ["Dare", "DareMerge", "GlobalMagnitude", "LoRAPrune"]
