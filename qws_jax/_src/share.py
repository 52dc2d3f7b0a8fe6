"""`share` / `unshare`: k-means weight sharing over parameter pytrees."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import hashing
from qws_jax._src import kmeans as kmeans_lib
from qws_jax._src import packing
from qws_jax._src import sharding as sharding_lib
from qws_jax._src import tree as tree_lib
from qws_jax._src import types


def unshare(tree):
  """Materialises every `SharedArray` / `HashedArray` leaf; everything else passes through.

  Args:
    tree: any pytree, possibly containing compressed leaves.

  Returns:
    The same structure with each compressed leaf replaced by its dense array (its
    logical ``shape`` and ``dtype``). Other leaves are returned as the same objects.

  Raises:
    ValueError: a hashed leaf with an unknown hash version (the message names its path).
  """
  def one(path, x):
    if not types.is_compressed(x):
      return x
    if isinstance(x, types.HashedArray) and x.version not in hashing.SUPPORTED_HASH_VERSIONS:
      raise ValueError(f"leaf {tree_lib.path_str(path)!r}: unknown hash version {x.version};"
                       f" this qws_jax knows {hashing.SUPPORTED_HASH_VERSIONS}")
    dense = sharding_lib.materialize(x)  # None unless spread over several devices
    return x.materialize() if dense is None else dense
  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=types.is_compressed)


# ----------------------------------------------------------------------------- share

_VECTOR_DIMS = (1, 2, 4, 8)


def _check_options(path: str, leaf, o: dict) -> dict:
  """Validates and normalises the options of one leaf; errors name the path."""
  where = f"leaf {path!r}"
  k = o["k"]
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f"{where}: k must be an int, got {k!r}")
  if not 2 <= k <= 256:
    raise ValueError(f"{where}: k must be in [2, 256] (indices are at most 8 bits), got {k=}")
  shape = tuple(leaf.shape)
  if len(shape) == 0:
    raise ValueError(f"{where}: cannot share a scalar (shape ())")
  if int(np.prod(shape)) == 0:
    raise ValueError(f"{where}: cannot share an empty leaf of shape {shape}")
  d = o["vector_dim"]
  if d not in _VECTOR_DIMS:
    raise ValueError(f"{where}: vector_dim must be one of {_VECTOR_DIMS}, got {d!r}")
  if shape[-1] % d:
    raise ValueError(f"{where}: vector_dim={d} must divide the last axis of shape {shape}")
  axis, gs = o["axis"], o["group_size"]
  if axis is not None and gs is not None:
    raise ValueError(f"{where}: set axis (per-channel) or group_size (per-group), not both")
  if axis is not None:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
      raise TypeError(f"{where}: axis must be an int or None, got {axis!r}")
    if not -len(shape) <= axis < len(shape):
      raise ValueError(f"{where}: axis={axis} out of range for shape {shape} (ndim {len(shape)})")
    axis = int(axis) % len(shape)
  if gs is not None:
    if isinstance(gs, bool) or not isinstance(gs, (int, np.integer)) or gs < 1:
      raise ValueError(f"{where}: group_size must be a positive int, got {gs!r}")
    gs = int(gs)
  if o["method"] not in kmeans_lib.METHODS:
    raise ValueError(f"{where}: method must be one of {kmeans_lib.METHODS}, got {o['method']!r}")
  if o["init"] not in kmeans_lib.INITS:
    raise ValueError(f"{where}: init must be one of {kmeans_lib.INITS}, got {o['init']!r}")
  return dict(k=int(k), axis=axis, group_size=gs, vector_dim=int(d), method=o["method"],
              init=o["init"])


def _to_groups(x, shape, axis, group_size, d):
  """(G, n, d) view of the index-shaped data, and the inverse for (G, n) assignments."""
  ishape = types.index_shape(shape, d)
  xv = x.reshape(ishape + (d,))
  if group_size is not None:
    r, c = types.matmul_view(ishape)
    ng = -(-r // group_size)
    xm = xv.reshape(r, c, d)
    pad = ng * group_size - r
    valid = jnp.ones((r, c), jnp.float32)
    if pad:
      xm = jnp.pad(xm, ((0, pad), (0, 0), (0, 0)))
      valid = jnp.pad(valid, ((0, pad), (0, 0)))
    # (ng, gs, c, d) -> (ng, c, gs, d) -> (ng * c, gs, d)
    g = xm.reshape(ng, group_size, c, d).transpose(0, 2, 1, 3).reshape(ng * c, group_size, d)
    vmask = valid.reshape(ng, group_size, c).transpose(0, 2, 1).reshape(ng * c, group_size)

    def back(a):
      a = a.reshape(ng, c, group_size).transpose(0, 2, 1).reshape(ng * group_size, c)[:r]
      return a.reshape(ishape)
    return g, vmask, back
  if axis is not None:
    moved = jnp.moveaxis(xv, axis, 0)
    g = moved.reshape(ishape[axis], -1, d)
    moved_shape = moved.shape[:-1]

    def back(a):
      return jnp.moveaxis(a.reshape(moved_shape), 0, axis)
    return g, None, back
  g = xv.reshape(1, -1, d)

  def back(a):
    return a.reshape(ishape)
  return g, None, back


@functools.partial(jax.jit, static_argnames=("shape", "axis", "group_size", "vector_dim"))
def _groups(x, w, *, shape, axis, group_size, vector_dim):
  g, vmask, _ = _to_groups(x.astype(jnp.float32), shape, axis, group_size, vector_dim)
  if w is None:
    wg = jnp.ones(g.shape[:2], jnp.float32)
  else:
    wg, _, _ = _to_groups(w.astype(jnp.float32), shape, axis, group_size, vector_dim)
    wg = jnp.sum(wg, -1)  # a vector's importance: the sum over its elements
  if vmask is not None:
    wg = wg * vmask
  return g, wg


@functools.partial(jax.jit, static_argnames=("shape", "axis", "group_size", "vector_dim",
                                             "dtype"))
def _pack_leaf(cent, assign, *, shape, axis, group_size, vector_dim, dtype):
  _, _, back = _to_groups(jnp.zeros(shape, jnp.float32), shape, axis, group_size, vector_dim)
  k = cent.shape[1]
  indices = packing.pack(back(assign), types.bits_for(k))
  grid = types.grid_shape(shape, axis, group_size, vector_dim)
  return indices, cent.reshape(grid + cent.shape[1:]).astype(dtype)


@functools.partial(jax.jit, static_argnames=("k", "init", "max_iters", "tol"))
def _vector_batch(g, wg, keys, *, k, init, max_iters, tol):
  fn = functools.partial(kmeans_lib._vector_kmeans, k=k, init=init,  # pylint: disable=protected-access
                         max_iters=max_iters, tol=tol)
  return jax.vmap(fn)(g, wg, keys)


def _share_leaf(x, w, key, *, shape, k, axis, group_size, vector_dim, method, init, num_atoms,
                polish_iters, max_iters, tol):
  st = dict(shape=shape, axis=axis, group_size=group_size, vector_dim=vector_dim)
  g, wg = _groups(x, w, **st)
  keys = jax.random.split(key, g.shape[0])
  if vector_dim == 1:
    cent, assign = kmeans_lib.kmeans_1d_batch(
        g[..., 0], wg, keys, k=k, method=method, init=init, num_atoms=num_atoms,
        polish_iters=polish_iters, max_iters=max_iters)
  else:
    cent, assign = _vector_batch(g, wg, keys, k=k, init=init, max_iters=max_iters, tol=tol)
  return _pack_leaf(cent, assign, dtype=np.dtype(x.dtype), **st)


def share(params, k: int = 32, *, axis: int | None = None, group_size: int | None = None,
          vector_dim: int = 1, method: str = "dp", init: str = "linear", weights=None,
          rules=(), predicate=None, num_atoms: int | None = None, polish_iters: int = 1000,
          max_iters: int = 300, tol: float = 1e-6, key: jax.Array | None = None):
  """Compresses a parameter pytree by k-means weight sharing (Deep Compression).

  Each selected leaf becomes a `SharedArray`: a codebook of ``k`` values (per tensor,
  per channel along ``axis``, or per group of ``group_size`` consecutive weights along
  the reduction axis of the matmul view ``(prod(shape[:-1]), shape[-1])``, one codebook
  per group and output column; a ragged last group is allowed) and, per weight, the
  index of its nearest centroid in ``bits = ceil(log2 k)`` bits, bit-packed. Other
  leaves pass through untouched (the same objects).

  Selection: by default floating leaves with ``ndim >= 2`` and at least 1024 elements.
  ``predicate(path, leaf) -> bool`` replaces that rule; ``rules`` (`qws_jax.Rule`) match
  path strings such as ``"params/Dense_0/kernel"`` and select (or skip) leaves with
  their own options (``k``, ``axis``, ``group_size``, ``vector_dim``, ``method``,
  ``init``). The first matching rule wins.

  Clustering: 1-D k-means with `qws_jax.kmeans` (``method="dp"``: near-exact optimum;
  ``"lloyd"``: Lloyd from ``init``), or vector k-means on ``vector_dim`` consecutive
  weights along the last axis. ``weights`` (a pytree with the structure of ``params``,
  or with ``None`` where not needed) gives per-weight importances: the objective becomes
  ``sum_i w_i (x_i - c)^2`` (sensitivity-weighted k-means, as in SqueezeLLM).

  Deterministic: the same input and key give bit-identical output, jitted or not. The
  codebook is sorted ascending (scalar codebooks) and has the leaf's dtype.

  Args:
    params: any pytree of arrays (linen ``{'params': ...}``, nested containers,
      ``flax.nnx.State``).
    k: codebook size, 2..256.
    axis: per-channel codebooks along this axis (e.g. ``-1`` for a Dense kernel).
    group_size: per-group codebooks (see above); exclusive with ``axis``.
    vector_dim: 1 (scalar codebook) or 2, 4, 8 (vector codebook).
    method: ``"dp"`` or ``"lloyd"``.
    init: Lloyd / vector k-means initialisation: ``"linear"``, ``"quantile"``,
      ``"kmeans++"``.
    weights: optional pytree of non-negative per-weight importances.
    rules: sequence of `qws_jax.Rule`.
    predicate: ``(path, leaf) -> bool`` selecting leaves not matched by a rule.
    num_atoms, polish_iters, max_iters, tol: k-means settings (see `qws_jax.kmeans`).
    key: PRNG key for random inits (keyword-only).

  Returns:
    A pytree of the same structure with `SharedArray` leaves where selected.

  Raises:
    ValueError: bad ``k``/``axis``/``group_size``/``vector_dim``, empty or scalar
      leaves, NaN/Inf values, mismatched ``weights`` -- the message names the leaf path.
    TypeError: a rule or predicate selected a non-floating leaf.

  Example:
    >>> import jax, jax.numpy as jnp, qws_jax
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 32)),
    ...                     "bias": jnp.zeros(32)}}
    >>> shared = qws_jax.share(params, k=16)
    >>> shared["dense"]["kernel"]
    SharedArray(shape=(64, 32), dtype=float32, k=16, bits=4, layout='tensor')
    >>> shared["dense"]["bias"] is params["dense"]["bias"]
    True
  """
  if key is None:
    key = jax.random.key(0)
  weight_map = {}
  if weights is not None:
    for p, wl in jax.tree_util.tree_leaves_with_path(weights):
      weight_map[tree_lib.path_str(p)] = wl
  defaults = dict(k=k, axis=axis, group_size=group_size, vector_dim=vector_dim, method=method,
                  init=init)

  def compress(path, leaf, options):
    o = _check_options(path, leaf, options)
    x = jnp.asarray(leaf)
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f"leaf {path!r}: has NaN or Inf values; cannot share it")
    w = weight_map.get(path)
    if w is not None:
      w = jnp.asarray(w)
      if w.shape != x.shape:
        raise ValueError(f"leaf {path!r}: weights shape {w.shape} != leaf shape {x.shape}")
      if not isinstance(w, jax.core.Tracer) and bool(jnp.any(w < 0) | ~jnp.all(jnp.isfinite(w))):
        raise ValueError(f"leaf {path!r}: weights must be finite and non-negative")
    leaf_key = jax.random.fold_in(key, hashing.fnv1a32(path.encode()))
    kw = dict(
        k=o["k"], axis=o["axis"],
        group_size=o["group_size"], vector_dim=o["vector_dim"], method=o["method"],
        init=o["init"],
        num_atoms=num_atoms,
        polish_iters=int(polish_iters), max_iters=int(max_iters), tol=float(tol))
    if sharding_lib.named_sharding(x) is not None:  # spread over devices: shard by shard
      indices, codebook = sharding_lib.share_leaf(
          x, w, leaf_key, **kw,
          single_device=lambda xr, wr: _share_leaf(xr, wr, leaf_key, shape=tuple(x.shape), **kw))
    else:
      indices, codebook = _share_leaf(x, w, leaf_key, shape=tuple(x.shape), **kw)
    return types.SharedArray(
        indices=indices, codebook=codebook, shape=tuple(x.shape), dtype=np.dtype(x.dtype),
        bits=types.bits_for(o["k"]), axis=o["axis"], group_size=o["group_size"],
        vector_dim=o["vector_dim"])

  return tree_lib.map_selected(params, compress, defaults=defaults, predicate=predicate,
                               rules=rules, what="share")
