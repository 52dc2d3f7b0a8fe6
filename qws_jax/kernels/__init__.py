"""Matmul kernels that read compressed weights directly.

``shared_matmul(x, w)`` for `qws_jax.SharedArray` (codebook + packed indices) and
``hashed_matmul(x, w)`` for `qws_jax.HashedArray` (hashed buckets): Pallas (Triton) on
GPU, a blocked-decode XLA path on CPU and TPU, ``impl="interpret"`` for tests, and a
custom VJP so training runs through them. See docs/kernels.md.
"""

from qws_jax.kernels._common import BlockSizes
from qws_jax.kernels._hashed import hashed_matmul
from qws_jax.kernels._shared import shared_matmul

__all__ = [
    "BlockSizes",
    "hashed_matmul",
    "shared_matmul",
]
