"""Test helpers: compressed leaves built by hand (no k-means), for apply/train tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import packing
from qws_jax._src import types


def np_pack(idx: np.ndarray, bits: int) -> np.ndarray:
  """Numpy twin of `qws_jax._src.packing.pack` (little-endian bit stream, last axis)."""
  n = idx.shape[-1]
  g = packing.group_values(bits)
  pad = (-n) % g
  v = np.pad(idx.astype(np.uint16), [(0, 0)] * (idx.ndim - 1) + [(0, pad)])
  bitstream = ((v[..., None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
  bitstream = bitstream.reshape(v.shape[:-1] + (-1,))
  return np.packbits(bitstream, axis=-1, bitorder="little")


def hand_shared(w, k: int, *, axis: int | None = None, group_size: int | None = None,
                validate: bool = False):
  """A `SharedArray` of ``w``: quantile codebook(s), nearest-centroid indices."""
  w = np.asarray(w, np.float32)
  bits = types.bits_for(k)
  qs = np.linspace(0.0, 1.0, k)
  if group_size is not None:
    r, c = types.matmul_view(w.shape)
    m = w.reshape(r, c)
    g = -(-r // group_size)
    cb = np.zeros((g, c, k), np.float32)
    for i in range(g):
      cb[i] = np.quantile(m[i * group_size:(i + 1) * group_size], qs, axis=0).T
    full = np.repeat(cb, group_size, axis=0)[:r]  # (r, c, k)
    idx = np.argmin(np.abs(m[..., None] - full), axis=-1).reshape(w.shape)
  elif axis is not None:
    axis = axis % w.ndim
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    cb = np.quantile(moved, qs, axis=1).T.astype(np.float32)  # (channels, k)
    shp = [1] * w.ndim
    shp[axis] = w.shape[axis]
    full = cb.reshape(shp + [k])
    idx = np.argmin(np.abs(w[..., None] - full), axis=-1)
  else:
    cb = np.quantile(w, qs).astype(np.float32)
    idx = np.argmin(np.abs(w[..., None] - cb), axis=-1)
  cb = np.sort(cb, axis=-1)  # quantiles are sorted already; keep the invariant explicit
  x = types.SharedArray(jnp.asarray(np_pack(idx, bits)), jnp.asarray(cb),
                        tuple(w.shape), jnp.float32, bits, axis, group_size)
  if validate:
    types.validate_shared_array(x)
  return x


def hand_share_tree(params, k: int = 8, *, axis=None, group_size=None, min_size: int = 64):
  """`hand_shared` on every floating leaf with ndim >= 2 and >= ``min_size`` elements."""
  def f(x):
    if types.is_compressed(x) or np.ndim(x) < 2 or np.size(x) < min_size:
      return x
    return hand_shared(x, k, axis=axis, group_size=group_size)
  return jax.tree_util.tree_map(f, params, is_leaf=types.is_compressed)


def hand_hashed(w, num_buckets: int, seed: int = 7):
  """A `HashedArray` with random buckets of the scale of ``w``."""
  w = np.asarray(w, np.float32)
  rng = np.random.default_rng(seed)
  b = rng.normal(scale=float(w.std()) + 1e-3, size=num_buckets).astype(np.float32)
  return types.HashedArray(jnp.asarray(b), tuple(w.shape), jnp.float32, seed)


def hand_hash_tree(params, ratio: int = 4, min_size: int = 64):
  def f(x):
    if types.is_compressed(x) or np.ndim(x) < 2 or np.size(x) < min_size:
      return x
    return hand_hashed(x, max(1, int(np.size(x)) // ratio))
  return jax.tree_util.tree_map(f, params, is_leaf=types.is_compressed)


def sub_jaxprs(v):
  """The jaxprs inside an equation parameter (closed or open, possibly in tuples)."""
  if isinstance(v, jax.extend.core.ClosedJaxpr):
    yield v.jaxpr
  elif isinstance(v, jax.extend.core.Jaxpr):
    yield v
  elif isinstance(v, (tuple, list)):
    for u in v:
      yield from sub_jaxprs(u)


def float_values(jaxpr):
  """``(primitive, shape)`` of every floating value any equation (recursively) produces."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      aval = var.aval
      if hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.floating):
        yield eqn.primitive.name, tuple(aval.shape)
    for p in eqn.params.values():
      for sub in sub_jaxprs(p):
        yield from float_values(sub)
