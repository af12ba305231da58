"""Codecs: fp16/f32 floats, PCA projection, k-means ids, hierarchical (tree-path) ids,
PLAID residuals and sign bits — each a registered component of stage ``"codec"``
addressed by a spec string (``residual:k=4096,nbits=2``); steps chain with ``|``."""

from retrieval_prune.compress.base import Codec, NotFittedError, colbert_num_centroids
from retrieval_prune.compress.binary import BinaryCodec
from retrieval_prune.compress.chain import CodecChain
from retrieval_prune.compress.floats import Float16Codec, Float32Codec, PCACodec
from retrieval_prune.compress.kmeans import HierarchicalKMeansCodec, KMeansCodec, id_geometry
from retrieval_prune.compress.residual import ResidualCodec

__all__ = [
    "Codec",
    "CodecChain",
    "NotFittedError",
    "BinaryCodec",
    "Float16Codec",
    "Float32Codec",
    "PCACodec",
    "KMeansCodec",
    "HierarchicalKMeansCodec",
    "ResidualCodec",
    "colbert_num_centroids",
    "id_geometry",
]
