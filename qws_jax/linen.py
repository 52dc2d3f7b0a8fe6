"""Flax linen layers and helpers for compressed parameters."""

from qws_jax._src.layers import HashedConv
from qws_jax._src.layers import HashedDense

__all__ = [
    "HashedConv",
    "HashedDense",
]
