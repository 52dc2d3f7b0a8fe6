"""Compressed ops: the one module every integration calls to compute with compressed leaves.

Linen `qws_jax.apply`, the NNX layers of `qws_jax.nnx.share` / `qws_jax.nnx.hash_share`
and the hashed layers (`HashedDense`, `HashedLinear`) all run their weights through
these functions; none of them multiplies, casts or views a compressed weight itself.

* `matmul`: ``x @ w`` for a 2-D `SharedArray` / `HashedArray` ``w`` (the single switch
  to `qws_jax.kernels.shared_matmul` / `hashed_matmul`).
* `dense`: a Dense layer's computation (dtype as flax promotes it, matmul, bias).
* `matrix_view`: a rank-n weight seen as the 2-D matrix of a contraction.
* `einsum`: a two-operand einsum whose right operand is the compressed weight.
* `conv`: a channels-last convolution (im2col: the patches of ``x`` times the matrix
  view of the kernel; the kernel is never decoded whole).
* `take_rows`: embedding lookups that decode only the looked-up rows.
* `cast`: the same compressed weight with its values (codebook / buckets) in a dtype.
* `unbox`: the compressed leaf inside flax metadata boxes (``nn.Partitioned``,
  ``nn.LogicallyPartitioned``...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from qws_jax import kernels
from qws_jax._src import hashing
from qws_jax._src import packing
from qws_jax._src import parts
from qws_jax._src import types

Compressed = Any  # SharedArray | HashedArray

_DEFAULT_PRECISIONS = (None, lax.Precision.DEFAULT, "default", "DEFAULT", "fastest")


def unbox(v) -> Any:
  """The value inside flax `AxisMetadata` boxes (``Partitioned``, ``LogicallyPartitioned``...).

  Boxes are peeled through their ``value`` field without applying their sharding
  constraints (a compressed leaf is not an array); anything else is returned as is.
  """
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  seen = 0
  while isinstance(v, meta.AxisMetadata) and hasattr(v, "value") and seen < 16:
    v = v.value
    seen += 1
  return v


def cast(w: Compressed, dtype) -> Compressed:
  """The same compressed weight with its values (codebook / buckets) in ``dtype``."""
  dtype = np.dtype(dtype)
  if isinstance(w, types.SharedArray):
    if np.dtype(w.dtype) == dtype and w.codebook.dtype == dtype:
      return w
    vals = w.outlier_values
    return dataclasses.replace(w, codebook=w.codebook.astype(dtype), dtype=dtype,
                               outlier_values=None if vals is None else vals.astype(dtype))
  if isinstance(w, types.HashedArray):
    if np.dtype(w.dtype) == dtype and w.buckets.dtype == dtype:
      return w
    return dataclasses.replace(w, buckets=w.buckets.astype(dtype), dtype=dtype)
  raise TypeError(f"expected a SharedArray or HashedArray, got {type(w).__name__}")


def matmul(x: jax.typing.ArrayLike, w: Compressed, *, precision=None) -> jax.Array:
  """``x @ w`` for a 2-D compressed ``w`` of logical shape ``(K, N)``; ``x`` is ``(..., K)``.

  The one place that decides how a compressed matmul runs. With the default
  ``precision`` it calls `qws_jax.kernels.shared_matmul` / `hashed_matmul` (the weight
  is decoded tile by tile, never whole; products accumulate in f32). An explicit
  non-default ``precision`` (``"highest"``...) is honoured by the reference path:
  this one weight is materialised and multiplied by ``jnp.matmul(..., precision=)``.
  ``x`` and ``w`` should already have the computation dtype (see `dense`); the result
  has ``x``'s dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from qws_jax import HashedArray
    >>> from qws_jax._src import ops
    >>> w = HashedArray(jnp.array([0.5, -1.0, 2.0]), (4, 3), jnp.float32, seed=7)
    >>> x = jnp.ones((2, 4))
    >>> bool(jnp.allclose(ops.matmul(x, w), x @ w.materialize()))
    True
  """
  x = jnp.asarray(x)
  if len(w.shape) != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"ops.matmul needs x (..., K) and w (K, N); got x.shape={x.shape} and"
                     f" w.shape={tuple(w.shape)}")
  if precision not in _DEFAULT_PRECISIONS:
    return jnp.matmul(x, w.materialize().astype(x.dtype), precision=precision)
  if isinstance(w, types.SharedArray):  # scales in the decode, outliers as a correction
    return kernels.shared_matmul(x, w)
  if isinstance(w, types.HashedArray):
    return kernels.hashed_matmul(x, w)
  raise TypeError(f"expected a SharedArray or HashedArray, got {type(w).__name__}")


def result_dtype(dtype, x, w, bias=None):
  """The computation dtype flax's default ``promote_dtype`` gives a layer."""
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.result_type(jnp.asarray(x).dtype, w.dtype,
                         *([jnp.asarray(bias).dtype] if bias is not None else []))


def add_bias(y: jax.Array, bias, shape: Sequence[int]) -> jax.Array:
  """``y + bias.reshape(shape)`` in ``y``'s dtype."""
  return y + jnp.reshape(jnp.asarray(bias).astype(y.dtype), tuple(shape))


def dense(x: jax.typing.ArrayLike, w: Compressed, bias=None, *, dtype=None,
          precision=None) -> jax.Array:
  """A Dense layer: ``x @ w + bias`` with flax's dtype promotion, ``w`` 2-D compressed.

  Args:
    x: ``(..., K)`` activations.
    w: a `SharedArray` / `HashedArray` of shape ``(K, N)``.
    bias: ``(N,)`` dense array or None.
    dtype: computation dtype (None: the promoted dtype of ``x``, ``w`` and ``bias``).
    precision: see `matmul`.

  Returns:
    ``(..., N)`` in the computation dtype.
  """
  x = jnp.asarray(x)
  dtype = result_dtype(dtype, x, w, bias)
  y = matmul(x.astype(dtype), cast(w, dtype), precision=precision)
  if bias is not None:
    y = add_bias(y, bias, (1,) * (y.ndim - 1) + (-1,))
  return y


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
    return w if len(shape) == 2 else dataclasses.replace(w, shape=(rows, cols))
  if not isinstance(w, types.SharedArray):
    return None
  if len(shape) == 2:
    return w
  if w.scales is not None or w.outlier_values is not None:
    return None  # laid out on the leaf's own matmul view: decode this one weight
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


def einsum_plan(spec: str, x_shape, w_shape) -> tuple | None:
  """How ``einsum(spec, x, w)`` maps onto one matmul with a matrix view of ``w``.

  Returns ``(lhs, out, lfree, contracted, kfree)`` (index strings) when ``w``'s indices
  are the contracted ones followed by its free ones, every index appears once per
  operand and no index is a batch index; else None.
  """
  import opt_einsum  # pylint: disable=g-import-not-at-top
  spec = spec.replace(" ", "")
  if "->" not in spec or spec.count(",") != 1 or "." in spec:
    return None
  try:
    operands, out, _ = opt_einsum.parser.parse_einsum_input(
        (spec, jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32),
         jax.ShapeDtypeStruct(tuple(w_shape), jnp.float32)))
  except ValueError:
    return None
  lhs, rhs = operands.split(",")
  if len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs) or len(set(out)) != len(out):
    return None
  contracted = [c for c in rhs if c in lhs and c not in out]
  kfree = [c for c in rhs if c not in lhs]
  lfree = [c for c in lhs if c not in rhs]
  if (any(c in lhs and c in out for c in rhs) or any(c not in out for c in lfree + kfree)
      or set(out) != set(lfree + kfree) or list(rhs) != contracted + kfree
      or not contracted or not kfree):
    return None
  return lhs, out, "".join(lfree), "".join(contracted), "".join(kfree)


def einsum(spec: str, x: jax.Array, w: Compressed, *, precision=None) -> jax.Array | None:
  """``jnp.einsum(spec, x, w)`` for a compressed ``w``, or None when `einsum_plan` is None.

  ``x`` and ``w`` must already have the computation dtype. The left operand is
  transposed to ``(free..., contracted...)``, multiplied by the matrix view of ``w``
  and the result transposed to ``spec``'s output order.
  """
  plan = einsum_plan(spec, x.shape, w.shape)
  if plan is None:
    return None
  lhs, out, lf, ct, kf = plan
  w2 = matrix_view(w, len(ct))
  if w2 is None:
    return None
  xt = jnp.einsum(f"{lhs}->{lf}{ct}", x)
  lead = xt.shape[:len(lf)]
  y = matmul(xt.reshape(-1, w2.shape[0]), w2, precision=precision)
  y = y.reshape(lead + tuple(w.shape[len(ct):]))
  return jnp.einsum(f"{lf}{kf}->{out}", y)


def _pads(padding, in_sizes, window, strides) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return list(lax.padtype_to_pads(in_sizes, window, strides, padding))
  return [tuple(p) for p in padding]


def conv(x: jax.Array, w: Compressed, *, strides: Sequence[int], padding,
         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
         precision=None) -> jax.Array:
  """A channels-last convolution of ``x`` with a compressed kernel, by im2col.

  Same result as ``lax.conv_general_dilated`` with flax's channels-last dimension
  numbers and ``feature_group_count=1``: the patches of ``x`` (one strided slice per
  kernel tap, concatenated in the kernel's ``(*window, C_in)`` order) are multiplied
  by the ``(prod(window) * C_in, C_out)`` matrix view of the kernel through `matmul`,
  so the kernel is decoded tile by tile, never whole.

  Args:
    x: ``(B, *spatial, C_in)`` in the computation dtype.
    w: compressed kernel ``(*window, C_in, C_out)`` in the computation dtype.
    strides: window strides, one per spatial axis.
    padding: ``"SAME"``, ``"VALID"`` or a sequence of ``(low, high)`` pairs.
    lhs_dilation: input dilation (transposed convolutions), default 1.
    rhs_dilation: kernel dilation, default 1.
    precision: see `matmul`.

  Returns:
    ``(B, *out_spatial, C_out)``.

  Raises:
    ValueError: shapes of ``x`` and ``w`` that do not fit.
  """
  window = tuple(int(d) for d in w.shape[:-2])
  nd = len(window)
  if x.ndim != nd + 2 or x.shape[-1] != w.shape[-2]:
    raise ValueError(f"ops.conv: x.shape={x.shape} does not fit the kernel shape {tuple(w.shape)}"
                     f" (channels-last, {nd} spatial axes)")
  strides = tuple(strides)
  lhs_dilation = tuple(lhs_dilation or (1,) * nd)
  rhs_dilation = tuple(rhs_dilation or (1,) * nd)
  in_sizes = [(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], lhs_dilation)]
  eff = [(k - 1) * d + 1 for k, d in zip(window, rhs_dilation)]
  pads = _pads(padding, in_sizes, eff, strides)
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dilation)]
               + [(0, 0, 0)])
  out_sizes = [(xp.shape[1 + i] - eff[i]) // strides[i] + 1 for i in range(nd)]
  if min(out_sizes) <= 0:
    raise ValueError(f"ops.conv: empty output for x.shape={x.shape}, kernel {tuple(w.shape)}")
  taps = []
  for tap in np.ndindex(*window):
    start = [0] + [t * d for t, d in zip(tap, rhs_dilation)] + [0]
    limit = ([xp.shape[0]] + [s + (o - 1) * st + 1 for s, o, st in zip(start[1:-1], out_sizes, strides)]
             + [xp.shape[-1]])
    taps.append(lax.slice(xp, start, limit, (1,) + strides + (1,)))
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  w2 = matrix_view(w, nd + 1)
  if w2 is None:  # cannot happen for n_out == 1; kept for safety
    raise ValueError(f"ops.conv: no matrix view of the kernel {tuple(w.shape)}")
  y = matmul(patches.reshape(-1, w2.shape[0]), w2, precision=precision)
  return y.reshape((x.shape[0],) + tuple(out_sizes) + (w.shape[-1],))


def _broadcast(v, nd: int, name: str) -> tuple[int, ...]:
  if v is None:
    v = 1
  if isinstance(v, (int, np.integer)):
    return (int(v),) * nd
  v = tuple(int(a) for a in v)
  if len(v) != nd:
    raise ValueError(f"{name}={v} needs {nd} entries, one per spatial axis")
  return v


def conv_layer(inputs: jax.typing.ArrayLike, w: Compressed, bias=None, *, strides=1,
               padding="SAME", input_dilation=1, kernel_dilation=1, dtype=None,
               precision=None) -> jax.Array:
  """A flax ``Conv`` layer (linen or NNX, ``feature_group_count=1``, no mask) on a
  compressed kernel: flax's batch-axis handling and padding modes (``"SAME"``,
  ``"VALID"``, ints, pairs, ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"``), then `conv`.

  Args:
    inputs: ``(*batch, *spatial, C_in)``; no batch axis or several are allowed, as in flax.
    w: compressed kernel ``(*kernel_size, C_in, C_out)``.
    bias: ``(C_out,)`` or None.
    strides, padding, input_dilation, kernel_dilation: as the flax attributes.
    dtype: computation dtype (None: promoted from inputs, kernel and bias).
    precision: see `matmul`.

  Returns:
    The convolution's output, as flax's ``Conv`` computes it.
  """
  from flax.linen import linear as linen_linear  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(inputs)
  kernel_size = tuple(int(d) for d in w.shape[:-2])
  nd = len(kernel_size)
  num_batch = x.ndim - (nd + 1)
  if num_batch < 0:
    raise ValueError(f"conv inputs of shape {x.shape} have fewer than {nd + 1} axes")
  batch_shape = x.shape[:num_batch]
  if num_batch != 1:
    x = jnp.reshape(x, (-1,) + x.shape[num_batch:])
  strides = _broadcast(strides, nd, "strides")
  input_dilation = _broadcast(input_dilation, nd, "input_dilation")
  kernel_dilation = _broadcast(kernel_dilation, nd, "kernel_dilation")
  pad = linen_linear.canonicalize_padding(padding, nd)
  if pad in ("CIRCULAR", "REFLECT"):
    dil = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dil] + [(0, 0)]
    x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad])
    pad = "VALID"
  elif pad == "CAUSAL":
    if nd != 1:
      raise ValueError("Causal padding is only implemented for 1D convolutions.")
    x = jnp.pad(x, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
    pad = "VALID"
  dtype = result_dtype(dtype, x, w, bias)
  y = conv(x.astype(dtype), cast(w, dtype), strides=strides, padding=pad,
           lhs_dilation=input_dilation, rhs_dilation=kernel_dilation, precision=precision)
  if bias is not None:
    y = add_bias(y, bias, (1,) * (y.ndim - 1) + (-1,))
  if num_batch != 1:
    y = jnp.reshape(y, batch_shape + y.shape[1:])
  return y


def take_rows(w: Compressed, ids: jax.Array) -> jax.Array:
  """``w[ids]`` for a 2-D compressed ``w`` (an embedding table) without materialising it.

  Only the looked-up rows are decoded. Returns ``ids.shape + (w.shape[1],)``; ids out
  of range give NaN rows, like flax's ``Embed``.
  """
  if len(w.shape) != 2:
    raise ValueError(f"take_rows needs a 2-D table, got shape {w.shape}")
  n_rows, dim = w.shape
  ids = jnp.asarray(ids)
  flat = ids.reshape(-1).astype(jnp.int32)
  n = flat.shape[0]
  if isinstance(w, types.HashedArray):
    f = flat.astype(jnp.uint32)[:, None] * jnp.uint32(dim) + jnp.arange(dim, dtype=jnp.uint32)[None, :]
    b, s = hashing.bucket_and_sign(f, w.seed, w.num_buckets, w.signed)
    out = (jnp.take(w.buckets, b, axis=0) * s.astype(w.buckets.dtype)).astype(w.dtype)
  else:
    idx = jnp.take(w.indices, flat, axis=0, mode="clip")
    sub = dataclasses.replace(w, indices=idx, shape=(n, dim), outlier_values=None,
                              outlier_positions=None)
    if w.group_size is not None:
      cb = jnp.take(w.codebook, flat // w.group_size, axis=0, mode="clip")
      sub = dataclasses.replace(sub, codebook=cb, group_size=1)
    elif w.axis == 0:
      sub = dataclasses.replace(sub, codebook=jnp.take(w.codebook, flat, axis=0, mode="clip"))
    if w.scales is not None:  # each looked-up row with its row of group scales
      sub = dataclasses.replace(sub, scales=jnp.take(w.scales, flat // w.scale_group_size,
                                                      axis=0, mode="clip"), scale_group_size=1)
    out = sub.materialize()
    if w.outlier_values is not None:  # the outliers of the looked-up rows
      pos = w.outlier_positions
      hit = flat[:, None] == (pos // dim)[None, :]  # (n, outliers)
      col = jnp.where(hit, (pos % dim)[None, :], dim)  # misses: out of range, dropped
      row = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], hit.shape)
      vals = jnp.broadcast_to(w.outlier_values.astype(out.dtype)[None, :], hit.shape)
      out = out.at[row, col].set(vals, mode="drop")
  if jnp.issubdtype(out.dtype, jnp.inexact):
    bad = (flat < 0) | (flat >= n_rows)
    out = jnp.where(bad[:, None], jnp.array(jnp.nan, out.dtype), out)
  return out.reshape(ids.shape + (dim,))


def embed(w: Compressed, ids, *, dtype=None, num_embeddings: int | None = None) -> jax.Array:
  """An Embed layer's lookup: rows of ``w`` at integer ``ids`` in ``dtype`` (default ``w.dtype``).

  Raises:
    ValueError: ``ids`` is not an integer array (the message flax's ``Embed`` gives).
  """
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError("Input type must be an integer or unsigned integer.")
  dtype = w.dtype if dtype is None else dtype
  if (num_embeddings if num_embeddings is not None else w.shape[0]) == 1:
    row = take_rows(w, jnp.zeros((1,), jnp.int32))[0].astype(dtype)
    return jnp.broadcast_to(row, ids.shape + (w.shape[1],))
  return take_rows(w, ids).astype(dtype)


def attend(w: Compressed, query, *, dtype=None, precision=None,
           block_rows: int = 512) -> jax.Array:
  """``query @ w.T`` for a compressed ``(V, D)`` table (a tied read-out, ``Embed.attend``).

  The packed layout runs along ``D``, the contracted axis here, so this is not a
  `matmul`: the table is decoded ``block_rows`` rows at a time (`take_rows` of a
  contiguous range, any layout) and each block gives ``block_rows`` output columns;
  the table is never decoded whole. An explicit non-default ``precision`` materialises
  it instead (as `matmul` does).

  Args:
    w: compressed table ``(V, D)``.
    query: ``(..., D)``.
    dtype: computation dtype (None: promoted from ``query`` and ``w``).
    precision: see `matmul`.
    block_rows: table rows decoded per step.

  Returns:
    ``(..., V)`` in the computation dtype.
  """
  q = jnp.asarray(query)
  dtype = result_dtype(dtype, q, w)
  q = q.astype(dtype)
  n_rows, dim = w.shape
  if precision not in _DEFAULT_PRECISIONS or (isinstance(w, types.SharedArray) and (
      w.scales is not None or w.outlier_values is not None)):
    return jnp.dot(q, w.materialize().astype(dtype).T, precision=precision)
  q2 = q.reshape(-1, dim)
  bv = max(1, min(int(block_rows), n_rows))
  nb = -(-n_rows // bv)

  def block(b):
    ids = jnp.minimum(b * bv + jnp.arange(bv, dtype=jnp.int32), n_rows - 1)
    rows = take_rows(w, ids).astype(dtype)  # (bv, D)
    return jnp.matmul(q2, rows.T, preferred_element_type=jnp.float32).astype(dtype)

  out = lax.map(block, jnp.arange(nb, dtype=jnp.int32))  # (nb, M, bv)
  out = jnp.moveaxis(out, 0, 1).reshape(q2.shape[0], nb * bv)[:, :n_rows]
  return out.reshape(q.shape[:-1] + (n_rows,))
