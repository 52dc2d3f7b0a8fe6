"""Matmul kernels that read compressed weights directly.

``shared_matmul(x, w)`` for `qws_jax.SharedArray` (codebook + packed indices, optional
group scales and outliers) and ``hashed_matmul(x, w)`` for `qws_jax.HashedArray`
(hashed buckets), with a custom VJP so training runs through them. See docs/kernels.md.

``impl``, the same for both:

* ``None`` (default): by backend. The backend's Pallas kernel (Triton on GPU, Mosaic on
  TPU) when it supports the weight, else the XLA path; the XLA path on CPU.
* ``"pallas"``: the backend's Pallas kernel (Mosaic on TPU, Triton elsewhere); raises
  ``NotImplementedError`` for a weight it does not support.
* ``"xla"``: the blocked-decode XLA path (any backend, any weight).
* ``"interpret"``: the Triton kernel in Pallas interpret mode (tests on CPU).

Layout of the package (like ``jax.experimental.pallas.ops``): ``ops`` (entry points,
dispatch, custom VJPs), one module per backend (``xla``, ``triton``, ``mosaic``),
``reference`` (the pure-jnp oracles), ``_decode`` (index -> weight math shared by the
backends) and ``_common`` (block sizes, the ``impl`` vocabulary).
"""

from qws_jax.kernels._common import BlockSizes
from qws_jax.kernels.ops import hashed_matmul
from qws_jax.kernels.ops import shared_matmul
from qws_jax.kernels.reference import hashed_matmul_reference
from qws_jax.kernels.reference import shared_matmul_reference

__all__ = [
    "BlockSizes",
    "hashed_matmul",
    "hashed_matmul_reference",
    "shared_matmul",
    "shared_matmul_reference",
]
