"""Building and using the optional parts of a `SharedArray`.

The leaf schema (`types.py`) defines the parts: codebook dtype, group ``scales``,
``outlier_values``/``outlier_positions``, the pruned zero of ``sparse`` leaves and
leading stack axes. This module holds what `share` and the kernels do with them, in
one place:

* `from_quantized`: a `SharedArray` from a quantiser's arrays (unpacked indices,
  codebook, optional scales and outliers), packed and cast to the schema's dtypes;
* `add_pruned_zero`: turns a leaf fitted to the non-zeros of a pruned weight into a
  sparse leaf (entry 0 = the exact zero);
* `map_stacked`: runs a per-slice compressor over the leading stack axes of a weight
  and stacks the results (one codebook per scanned layer);
* `matmul`: ``x @ w`` for any leaf, routing the parts around a base kernel that
  decodes indices, a codebook in the leaf's dtype and group scales (outliers are a
  sparse correction on top, `outlier_correction`, decoding only their positions).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import packing
from qws_jax._src import types


def from_quantized(parts: dict, *, shape, dtype, axis=None, group_size=None, vector_dim=1,
                   scale_group_size=None, codebook_dtype=None) -> types.SharedArray:
  """A `SharedArray` from unpacked ``indices`` (index shape), ``codebook`` and optional
  ``scales`` / ``outlier_values`` / ``outlier_positions``."""
  cb = jnp.asarray(parts["codebook"])
  k = cb.shape[-1] if vector_dim == 1 else cb.shape[-2]
  bits = types.bits_for(k)
  cdt = jnp.dtype(codebook_dtype) if codebook_dtype is not None else jnp.dtype(dtype)
  ishape = types.index_shape(tuple(shape), vector_dim)
  idx = jnp.asarray(parts["indices"]).reshape(ishape)
  scales = parts.get("scales")
  vals, pos = parts.get("outlier_values"), parts.get("outlier_positions")
  return types.SharedArray(
      indices=packing.pack(idx, bits), codebook=cb.astype(cdt), shape=tuple(shape),
      dtype=jnp.dtype(dtype), bits=bits, axis=axis, group_size=group_size,
      vector_dim=vector_dim,
      scales=None if scales is None else jnp.asarray(scales).astype(jnp.float16),
      scale_group_size=None if scales is None else scale_group_size,
      outlier_values=None if vals is None else jnp.asarray(vals).astype(
          cdt if codebook_dtype is not None else dtype),
      outlier_positions=None if pos is None else jnp.asarray(pos).astype(jnp.int32))


def add_pruned_zero(w: types.SharedArray, zero: jax.Array) -> types.SharedArray:
  """A sparse leaf from ``w`` (fitted to the non-zeros) and the pruned mask ``zero``.

  Index 0 of every codebook becomes the pruned zero (exactly 0.0); ``w``'s entries move
  to 1..k. ``zero`` is a bool array in ``w.shape``.
  """
  if w.vector_dim != 1 or w.scales is not None:
    raise NotImplementedError("sparse sharing takes scalar codebooks without scales")
  k = w.k + 1
  if k > 256:
    raise ValueError(f"a sparse leaf needs k <= 256 with its zero entry, got {k}")
  bits = types.bits_for(k)
  idx = w.unpacked_indices().astype(jnp.int32) + 1
  idx = jnp.where(zero.reshape(idx.shape), 0, idx)
  cb = jnp.concatenate([jnp.zeros(w.codebook.shape[:-1] + (1,), w.codebook.dtype), w.codebook],
                       axis=-1)
  return dataclasses.replace(w, indices=packing.pack(idx, bits), codebook=cb, bits=bits,
                             sparse=True)


def stack(leaves, lead: tuple[int, ...]):
  """Compressed leaves of one slice shape stacked into one leaf with stack shape ``lead``."""
  return jax.tree.map(lambda *a: jnp.stack(a).reshape(tuple(lead) + a[0].shape), *leaves)


def map_stacked(x: jax.Array, stack_axes: int, one: Callable[[jax.Array, int], object]):
  """``one(slice, i)`` over the leading ``stack_axes`` axes of ``x``, results stacked.

  ``one`` returns a compressed leaf of the slice shape; the result carries the stack
  axes on every child (see `types.SharedArray`, stacked leaves).
  """
  lead = tuple(x.shape[:stack_axes])
  flat = x.reshape((math.prod(lead),) + tuple(x.shape[stack_axes:]))
  return stack([one(flat[i], i) for i in range(flat.shape[0])], lead)


def has_parts(w) -> bool:
  """True when a base kernel (indices, codebook in the leaf dtype, scales) cannot run
  ``w`` alone: outliers, or a codebook in another dtype."""
  return isinstance(w, types.SharedArray) and (
      w.outlier_values is not None or np.dtype(w.codebook.dtype) != np.dtype(w.dtype))


def base_leaf(w: types.SharedArray) -> types.SharedArray:
  """``w`` without outliers, codebook cast to the leaf dtype (what base kernels take;
  the scales stay)."""
  return dataclasses.replace(w, codebook=w.codebook.astype(w.dtype), outlier_values=None,
                             outlier_positions=None)


def _indices_at(w: types.SharedArray, prow: jax.Array, pcol: jax.Array) -> jax.Array:
  """int32 index at row ``prow`` (packing rows: all axes but the last) and index column
  ``pcol`` of one slice, read from the packed bit stream without unpacking the rows."""
  return packing.take(w.indices.reshape(-1, w.indices.shape[-1]), w.bits, prow, pcol)


def decoded_at(w: types.SharedArray, pos: jax.Array) -> jax.Array:
  """``w.materialize().reshape(-1)[pos]`` without outliers, decoding only ``pos``.

  ``pos`` are flat row-major positions of one slice; the result has ``w.dtype``: the
  codebook entry times the group scale, computed as ``materialize`` computes it.
  """
  pos = jnp.asarray(pos).astype(jnp.int32)
  d = w.vector_dim
  ishape = types.index_shape(w.shape, d)
  ipos = pos // d  # the last axis holds shape[-1] // d indices of d values each
  prow, pcol = ipos // ishape[-1], ipos % ishape[-1]
  flat = _indices_at(w, prow, pcol)
  if w.group_size is not None:
    _, c = types.matmul_view(ishape)
    flat = ((ipos // c // w.group_size) * c + ipos % c) * w.k + flat
  elif w.axis is not None:
    inner = math.prod(ishape[w.axis + 1:])
    flat = ((ipos // inner) % ishape[w.axis]) * w.k + flat
  ct = w.decode_dtype()
  if d == 1:
    v = w.codebook.reshape(-1)[flat].astype(ct)
  else:
    v = w.codebook.reshape(-1, d)[flat, pos % d].astype(ct)
  if w.scales is not None:
    _, c = types.matmul_view(w.shape)
    v = v * w.scales[(pos // c) // w.scale_group_size, pos % c].astype(ct)
  return v.astype(w.dtype)


def outlier_correction(x: jax.Array, w: types.SharedArray) -> jax.Array:
  """``x @ (W - W_without_outliers)`` for a leaf with outliers: a sparse product.

  The decoded value at each outlier position (codebook entry times its group scale,
  what the base kernel multiplied there) is replaced by the stored value, so the
  correction adds ``x[..., r] * (value - decoded)`` to output column ``c``. Only the
  outlier positions are decoded.
  """
  r, c = types.matmul_view(w.shape)
  pos = w.outlier_positions
  dense_at = decoded_at(base_leaf(w), pos)  # the k-means value there, scaled
  delta = (w.outlier_values.astype(jnp.float32) - dense_at.astype(jnp.float32))
  rows, cols = pos // c, pos % c
  xs = x.reshape(-1, r)[:, rows].astype(jnp.float32) * delta[None, :]  # (M, n)
  out = jnp.zeros((xs.shape[0], c), jnp.float32).at[:, cols].add(xs)
  return out.reshape(x.shape[:-1] + (c,))


def matmul(x: jax.Array, w: types.SharedArray, base: Callable) -> jax.Array:
  """``x @ w`` (matmul view) for a leaf with parts, around ``base(x, leaf)``.

  ``base`` (`qws_jax.kernels.shared_matmul`) decodes indices, codebook and group scales;
  a codebook in another dtype is cast (k values) before it, and outliers are a separate
  sparse product (`outlier_correction`) on top of it.
  """
  if not has_parts(w):
    return base(x, w)
  y = base(x, base_leaf(w))
  if w.outlier_values is not None:
    y = (y.astype(jnp.float32) + outlier_correction(x, w)).astype(y.dtype)
  return y
