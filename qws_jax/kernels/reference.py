"""Pure-jnp oracles of the kernels: test oracle, fallback, cost baseline.

Both decode the whole weight with ``w.materialize()`` (codebook, group scales,
outliers; or the hashed virtual weight) and then compute with the kernels' numerics:
the weight is cast to ``x.dtype``, the products are accumulated in f32 and the result
has ``x.dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qws_jax._src.types import HashedArray
from qws_jax._src.types import SharedArray


def _matmul(x: jax.typing.ArrayLike, w) -> jax.Array:
  x = jnp.asarray(x)
  wd = w.materialize().astype(x.dtype)
  return jnp.matmul(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)


def shared_matmul_reference(x: jax.typing.ArrayLike, w: SharedArray) -> jax.Array:
  """``x @ w.materialize()`` with the kernels' numerics.

  Args:
    x: activations ``(..., K)``, any floating dtype.
    w: a 2-D `qws_jax.SharedArray` ``(K, N)``; every part (scales, outliers) counts.

  Returns:
    ``(..., N)`` in ``x.dtype`` (f32 accumulation).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from qws_jax import SharedArray
    >>> from qws_jax._src import packing
    >>> idx = np.arange(12).reshape(3, 4) % 4
    >>> w = SharedArray(packing.pack(idx, 2), jnp.array([-1., 0., 1., 2.]), (3, 4),
    ...                 jnp.float32, 2)
    >>> shared_matmul_reference(jnp.ones((1, 3)), w)
    Array([[-3.,  0.,  3.,  6.]], dtype=float32)
  """
  return _matmul(x, w)


def hashed_matmul_reference(x: jax.typing.ArrayLike, w: HashedArray) -> jax.Array:
  """``x @ w.materialize()`` (the virtual weight) with the kernels' numerics.

  Args:
    x: activations ``(..., K)``, any floating dtype.
    w: a 2-D `qws_jax.HashedArray` ``(K, N)``.

  Returns:
    ``(..., N)`` in ``x.dtype`` (f32 accumulation).
  """
  return _matmul(x, w)
