"""Flax NNX layers and helpers for compressed parameters.

`share` (k-means) and `hash_share` (HashedNets, e.g. to train a hashed model from
scratch) return a compressed copy of an NNX model; `compress` takes any tree function.
`HashedLinear` is a Linear layer that is hashed from the start.
"""

from qws_jax._src.layers import HashedLinear
from qws_jax._src.nnx_share import SharedParam
from qws_jax._src.nnx_share import compress
from qws_jax._src.nnx_share import hash_share
from qws_jax._src.nnx_share import share

__all__ = [
    "HashedLinear",
    "SharedParam",
    "compress",
    "hash_share",
    "share",
]
