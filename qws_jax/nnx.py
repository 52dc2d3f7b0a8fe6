"""Flax NNX layers and helpers for compressed parameters."""

from qws_jax._src.layers import HashedLinear
from qws_jax._src.nnx_share import SharedParam
from qws_jax._src.nnx_share import share

__all__ = [
    "HashedLinear",
    "SharedParam",
    "share",
]
