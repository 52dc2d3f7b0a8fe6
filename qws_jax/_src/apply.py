"""Running Flax linen models on compressed parameters without materialising the tree.

`apply` wraps ``model.apply``. Every `SharedArray` / `HashedArray` leaf of the
variables is put in a small `flax.core.meta.AxisMetadata` box (`_Lazy`) whose
``unbox()`` materialises that one leaf. Flax unboxes a parameter at the moment a module
reads it (``self.param``), so a layer we know nothing about gets the dense value of
its own compressed weights, just where it uses them, and never the dense tree.

Dense, DenseGeneral, Einsum, Embed and Conv calls are intercepted
(`flax.linen.intercept_methods`) and run on the compressed weight directly:
matmul-shaped layers call `compressed_matmul` (the single switch between the
`qws_jax.kernels` entry points and per-layer materialisation), Embed gathers only the
looked-up rows. A layer configured in a way the fast path does not cover (a custom
``dot_general``, ``batch_dims``, grouped convolutions...) falls back to the generic
per-layer materialisation, with identical results.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
from flax import struct
from flax.core import meta
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import hashing
from qws_jax._src import packing
from qws_jax._src import types

Compressed = Any  # SharedArray | HashedArray


# --------------------------------------------------------------------------------------
# The single switch: compressed (M, K) @ (K, N).
# --------------------------------------------------------------------------------------


def _kernel_entry(w) -> Callable | None:
  """``qws_jax.kernels.shared_matmul`` / ``hashed_matmul`` when that package has them."""
  try:
    from qws_jax import kernels  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  name = "shared_matmul" if isinstance(w, types.SharedArray) else "hashed_matmul"
  return getattr(kernels, name, None)


def compressed_matmul(x: jax.Array, w: Compressed, *, precision=None) -> jax.Array:
  """``x @ w`` for a 2-D compressed ``w`` of logical shape ``(K, N)``; ``x`` is ``(M, K)``.

  The one place that decides how a compressed matmul runs: the `qws_jax.kernels`
  entry point when it exists, else the materialised weight of this one layer.
  ``x`` and ``w`` must already have the computation dtype.
  """
  if len(w.shape) != 2 or x.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"compressed_matmul needs x (M, K) and w (K, N); got {x.shape} and {w.shape}")
  fn = _kernel_entry(w)
  if fn is not None:
    return fn(x, w)
  return jnp.matmul(x, w.materialize(), precision=precision)


def _cast(w: Compressed, dtype) -> Compressed:
  """The same compressed weight with values (codebook / buckets) in ``dtype``."""
  dtype = np.dtype(dtype)
  if np.dtype(w.dtype) == dtype:
    return w
  if isinstance(w, types.SharedArray):
    return dataclasses.replace(w, codebook=w.codebook.astype(dtype), dtype=dtype)
  return dataclasses.replace(w, buckets=w.buckets.astype(dtype), dtype=dtype)


def matrix_view(w: Compressed, n_in: int) -> Compressed | None:
  """``w`` seen as the 2-D matrix ``(prod(shape[:n_in]), prod(shape[n_in:]))``.

  Free for `HashedArray` (the hash is on the flat row-major coordinate) and for a
  `SharedArray` whose leading axes merge; merging trailing axes needs the packed rows
  to be byte-aligned. Per-channel codebooks are re-indexed to the new row / column.
  Returns None when the view cannot be formed without unpacking (the caller then
  materialises).
  """
  shape = tuple(w.shape)
  if not 1 <= n_in < len(shape):
    return None
  rows = math.prod(shape[:n_in])
  cols = math.prod(shape[n_in:])
  if isinstance(w, types.HashedArray):
    return dataclasses.replace(w, shape=(rows, cols))
  if not isinstance(w, types.SharedArray):
    return None
  if len(shape) == 2:
    return w
  n_out = len(shape) - n_in
  if n_out == 1:
    idx = w.indices.reshape((rows, w.indices.shape[-1]))
  else:
    if w.vector_dim != 1 or shape[-1] % packing.group_values(w.bits) or w.group_size is not None:
      return None
    idx = w.indices.reshape((rows, -1))
  if w.group_size is not None:  # n_out == 1: same (R, C) matmul view, same grid.
    return dataclasses.replace(w, indices=idx, shape=(rows, cols))
  if w.axis is None:
    return dataclasses.replace(w, indices=idx, shape=(rows, cols))
  # Per channel: map every row (channel axis among the inputs) or column to its channel.
  a = w.axis
  if a >= n_in:
    if a == len(shape) - 1 and n_out == 1:
      return dataclasses.replace(w, indices=idx, shape=(rows, cols), axis=1)
    inner = math.prod(shape[a + 1:])
    chan = (np.arange(cols) // inner) % shape[a]
    new_axis = 1
  else:
    if a == 0 and n_in == 1:
      return dataclasses.replace(w, indices=idx, shape=(rows, cols), axis=0)
    inner = math.prod(shape[a + 1:n_in])
    chan = (np.arange(rows) // inner) % shape[a]
    new_axis = 0
  cb = jnp.take(w.codebook, jnp.asarray(chan, jnp.int32), axis=0)
  return dataclasses.replace(w, indices=idx, codebook=cb, shape=(rows, cols), axis=new_axis)


def take_rows(w: Compressed, ids: jax.Array) -> jax.Array:
  """``w[ids]`` for a 2-D compressed ``w`` (an embedding table) without materialising it.

  Only the looked-up rows are decoded. Returns ``ids.shape + (w.shape[1],)``.
  """
  if len(w.shape) != 2:
    raise ValueError(f"take_rows needs a 2-D table, got shape {w.shape}")
  n_rows, dim = w.shape
  flat = ids.reshape(-1).astype(jnp.int32)
  n = flat.shape[0]
  if isinstance(w, types.HashedArray):
    f = flat.astype(jnp.uint32)[:, None] * jnp.uint32(dim) + jnp.arange(dim, dtype=jnp.uint32)[None, :]
    b, s = hashing.bucket_and_sign(f, w.seed, w.num_buckets, w.signed)
    out = (jnp.take(w.buckets, b, axis=0) * s.astype(w.buckets.dtype)).astype(w.dtype)
    return out.reshape(ids.shape + (dim,))
  idx = jnp.take(w.indices, flat, axis=0, mode="clip")
  if w.group_size is not None:
    cb = jnp.take(w.codebook, flat // w.group_size, axis=0, mode="clip")
    sub = dataclasses.replace(w, indices=idx, codebook=cb, shape=(n, dim), group_size=1)
  elif w.axis == 0:
    cb = jnp.take(w.codebook, flat, axis=0, mode="clip")
    sub = dataclasses.replace(w, indices=idx, codebook=cb, shape=(n, dim))
  else:
    sub = dataclasses.replace(w, indices=idx, shape=(n, dim))
  out = sub.materialize()
  # Out-of-range ids give NaN, like flax's Embed (jnp.take's default "fill" mode).
  if jnp.issubdtype(out.dtype, jnp.inexact):
    bad = (flat < 0) | (flat >= n_rows)
    out = jnp.where(bad[:, None], jnp.array(jnp.nan, out.dtype), out)
  return out.reshape(ids.shape + (dim,))


# --------------------------------------------------------------------------------------
# The lazy box.
# --------------------------------------------------------------------------------------


class _Lazy(struct.PyTreeNode, meta.AxisMetadata):
  """Boxes a compressed leaf; flax's unboxing (a module reading it) materialises it."""

  value: Any

  def unbox(self):
    v = self.value
    return v.materialize() if types.is_compressed(v) else v

  def replace_boxed(self, val):
    return self.replace(value=val)

  def add_axis(self, index, params):
    raise NotImplementedError(
        "qws_jax.apply: lifted transforms that add an axis to compressed parameters"
        " (nn.scan / nn.vmap over params) are not supported")

  def remove_axis(self, index, params):
    raise NotImplementedError(
        "qws_jax.apply: lifted transforms that remove an axis from compressed parameters"
        " (nn.scan / nn.vmap over params) are not supported")


def _box(tree):
  return jax.tree_util.tree_map(lambda x: _Lazy(x) if types.is_compressed(x) else x, tree,
                                is_leaf=types.is_compressed)


def _unbox_raw(tree):
  return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, _Lazy) else x, tree,
                                is_leaf=lambda x: isinstance(x, _Lazy))


def _raw_param(module, name: str):
  """The compressed leaf behind ``params/<name>`` of ``module``, else None."""
  scope = module.scope
  if scope is None or not scope.has_variable("params", name):
    return None
  v = scope.get_variable("params", name)
  if isinstance(v, _Lazy) and types.is_compressed(v.value):
    return v.value
  return None


def _dense_param(module, name: str):
  """``params/<name>`` of ``module`` unboxed (materialised if compressed), or None."""
  scope = module.scope
  if scope is None or not scope.has_variable("params", name):
    return None
  return meta.unbox(scope.get_variable("params", name))


def _bias_add(y, bias, shape):
  return y + jnp.reshape(bias.astype(y.dtype), shape)


# --------------------------------------------------------------------------------------
# Fast paths. Each returns the layer's output, or _FALLBACK to run the layer itself.
# --------------------------------------------------------------------------------------

_FALLBACK = object()


def _default_promote(module) -> bool:
  return getattr(module, "promote_dtype", flax_dtypes.promote_dtype) is flax_dtypes.promote_dtype


def _dense(module: nn.Dense, inputs):
  w = _raw_param(module, "kernel")
  if (w is None or module.dot_general is not None or module.dot_general_cls is not None
      or not _default_promote(module) or len(w.shape) != 2):
    return _FALLBACK
  x = jnp.asarray(inputs)
  bias, dtype = _bias_and_dtype(module, x, w)
  x = x.astype(dtype)
  y = compressed_matmul(x.reshape(-1, w.shape[0]), _cast(w, dtype), precision=module.precision)
  y = y.reshape(x.shape[:-1] + (w.shape[1],))
  if bias is not None:
    y = _bias_add(y, bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def _normalize_axes(axes, ndim):
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


def _dense_general(module: nn.DenseGeneral, inputs):
  w = _raw_param(module, "kernel")
  if (w is None or module.batch_dims or module.dot_general is not None
      or module.dot_general_cls is not None or not _default_promote(module)):
    return _FALLBACK
  x = jnp.asarray(inputs)
  axis = _normalize_axes(module.axis, x.ndim)
  features = _normalize_features(module.features)
  w2 = matrix_view(w, len(axis))
  if w2 is None:
    return _FALLBACK
  bias, dtype = _bias_and_dtype(module, x, w)
  x = x.astype(dtype)
  nb = x.ndim - len(axis)
  xt = jnp.moveaxis(x, axis, tuple(range(nb, x.ndim)))
  lead = xt.shape[:nb]
  y = compressed_matmul(xt.reshape(-1, w2.shape[0]), _cast(w2, dtype), precision=module.precision)
  y = y.reshape(lead + features)
  if bias is not None:
    y = _bias_add(y, bias, (1,) * nb + features)
  return y


def _bias_and_dtype(module, x, w):
  """The layer's (dense) bias or None, and its computation dtype as flax promotes it."""
  bias = _dense_param(module, "bias") if module.use_bias else None
  dtype = module.dtype or jnp.result_type(x.dtype, w.dtype,
                                          *([bias.dtype] if bias is not None else []))
  return bias, dtype


def _normalize_features(f):
  return (f,) if isinstance(f, int) else tuple(f)


def _einsum(module: nn.Einsum, inputs, einsum_str=None):
  import opt_einsum  # pylint: disable=g-import-not-at-top
  w = _raw_param(module, "kernel")
  if w is None or not _default_promote(module) or module.preferred_element_type is not None:
    return _FALLBACK
  x = jnp.asarray(inputs)
  spec = nn.module.merge_param("einsum_str", module.einsum_str, einsum_str).replace(" ", "")
  if "->" not in spec or spec.count(",") != 1:
    return _FALLBACK  # the layer raises its own error
  operands, out, _ = opt_einsum.parser.parse_einsum_input(
      (spec, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype)))
  lhs, rhs = operands.split(",")
  if len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs):
    return _FALLBACK
  contracted = [c for c in rhs if c in lhs and c not in out]
  kfree = [c for c in rhs if c not in lhs]
  lfree = [c for c in lhs if c not in rhs]
  if (any(c in lhs and c in out for c in rhs) or any(c not in out for c in lfree + kfree)
      or list(rhs) != contracted + kfree or not contracted or not kfree):
    return _FALLBACK
  w2 = matrix_view(w, len(contracted))
  if w2 is None:
    return _FALLBACK
  bias, dtype = _bias_and_dtype(module, x, w)
  x = x.astype(dtype)
  lf, ct, kf = "".join(lfree), "".join(contracted), "".join(kfree)
  xt = jnp.einsum(f"{lhs}->{lf}{ct}", x)
  lead = xt.shape[:len(lf)]
  y = compressed_matmul(xt.reshape(-1, w2.shape[0]), _cast(w2, dtype), precision=module.precision)
  y = y.reshape(lead + tuple(w.shape[len(ct):]))
  y = jnp.einsum(f"{lf}{kf}->{out}", y)
  if bias is not None:
    _, bshape = module._get_bias_shape(spec, x, jax.ShapeDtypeStruct(w.shape, w.dtype))  # pylint: disable=protected-access
    y = _bias_add(y, bias, tuple(bshape))
  return y


def _embed(module: nn.Embed, inputs):
  w = _raw_param(module, "embedding")
  if w is None or not _default_promote(module) or len(w.shape) != 2:
    return _FALLBACK
  ids = jnp.asarray(inputs)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError("Input type must be an integer or unsigned integer.")
  dtype = module.dtype or w.dtype
  if module.num_embeddings == 1:
    row = take_rows(w, jnp.zeros((1,), jnp.int32))[0].astype(dtype)
    return jnp.broadcast_to(row, ids.shape + (module.features,))
  return take_rows(w, ids).astype(dtype)


def _embed_setup(module: nn.Embed):
  # Embed.setup reads the whole table into ``self.embedding``; with a compressed table
  # that would decode every row, so it is skipped and __call__ / attend read the table
  # themselves (``module.embedding`` is then not set).
  if _raw_param(module, "embedding") is None:
    return _FALLBACK
  return None


def _embed_attend(module: nn.Embed, query):
  w = _raw_param(module, "embedding")
  if w is None or not _default_promote(module):
    return _FALLBACK
  q = jnp.asarray(query)
  dtype = module.dtype or jnp.result_type(q.dtype, w.dtype)
  # x @ table.T: the packed layout runs along the feature axis, so this one decodes
  # the table (of this layer only).
  return jnp.dot(q.astype(dtype), w.materialize().astype(dtype).T)


_FAST_PATHS = {
    nn.Dense.__call__: _dense,
    nn.DenseGeneral.__call__: _dense_general,
    nn.Einsum.__call__: _einsum,
    nn.Embed.__call__: _embed,
    nn.Embed.setup: _embed_setup,
    nn.Embed.attend: _embed_attend,
}


def _interceptor(next_fun, args, kwargs, context):
  fn = getattr(type(context.module), context.method_name, None)
  fast = _FAST_PATHS.get(fn)
  if fast is not None:
    out = fast(context.module, *args, **kwargs)
    if out is not _FALLBACK:
      return out
  return next_fun(*args, **kwargs)


def apply(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a linen ``model.apply`` so that it accepts compressed parameters.

  The returned function has the signature of ``apply_fn``. Its ``variables`` may hold
  `SharedArray` / `HashedArray` leaves in any collection. ``nn.Dense``,
  ``nn.DenseGeneral``, ``nn.Einsum`` and ``nn.Embed`` run on the compressed weight
  (`compressed_matmul`, the `qws_jax.kernels` entry points once they exist; row
  gathers for embeddings); every other use of a compressed leaf (``nn.Conv``, custom
  layers, ``Embed.attend``) materialises that one leaf where the module reads it. The
  dense tree is never built. Outputs equal ``apply_fn(unshare(variables), ...)`` up to
  float rounding, under ``jax.jit`` and ``jax.grad`` (take gradients with
  ``allow_int=True``: the uint8 indices get ``float0`` cotangents; see
  `qws_jax.codebook_optimizer`).

  Variables returned by ``mutable=...`` hold the compressed leaves as they came in.
  Lifted transforms that slice parameters (``nn.scan`` / ``nn.vmap`` over params)
  are not supported on compressed leaves.

  Args:
    apply_fn: ``model.apply`` of a linen module (or any function whose first argument
      is the variables dict it passes to a linen ``apply``).

  Returns:
    A function with the same signature as ``apply_fn``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, qws_jax
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> params_c = qws_jax.unshare(params)  # any tree; compressed leaves allowed
    >>> qws_jax.apply(model.apply)({"params": params_c}, x).shape
    (2, 4)
  """
  if not callable(apply_fn):
    raise TypeError(f"qws_jax.apply expects a callable (model.apply), got {type(apply_fn).__name__}")

  @functools.wraps(apply_fn)
  def wrapped(variables, *args, **kwargs):
    with nn.intercept_methods(_interceptor):
      out = apply_fn(_box(variables), *args, **kwargs)
    return _unbox_raw(out)

  return wrapped
