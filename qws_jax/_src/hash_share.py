"""`hash_share`: hashed weight sharing (HashedNets) over parameter pytrees.

A selected leaf of shape ``shape`` becomes a `HashedArray` holding ``B`` bucket values;
the virtual weight ``V.flat[f] = sign(f) * buckets[bucket(f)]`` is given by the hash
of `qws_jax._src.hashing` seeded with ``leaf_seed(path, seed)``.
"""

from __future__ import annotations

import dataclasses

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import hashing
from qws_jax._src import sharding as sharding_lib
from qws_jax._src import tree as tree_lib
from qws_jax._src import types

INITS = ("fan_in", "from_dense")

# Standard deviation of a standard normal truncated to [-2, 2]; flax's / jax's
# ``variance_scaling(..., "truncated_normal")`` divides by it so the variance is exact.
_TRUNC_STD = 0.87962566103423978


def fan_in(shape: tuple[int, ...]) -> int:
  """``prod(shape[:-1])``: the fan-in of a Dense ``(K, N)`` or Conv ``(..., C_in, C_out)`` kernel.

  Returns 1 for a 1-D leaf.
  """
  return max(1, int(np.prod(shape[:-1], dtype=np.int64)))


def num_buckets_for(size: int, compression: float | None, buckets: int | None,
                    path: str = "") -> int:
  """The bucket count ``B`` of a leaf of ``size`` virtual weights.

  ``buckets`` wins when given; otherwise ``B = max(1, round(compression * size))``.

  Raises:
    ValueError: ``compression`` outside ``(0, 1]``, or ``B`` not in ``[1, size]``.
    TypeError: ``buckets`` not an int.
  """
  where = f" for leaf {path!r}" if path else ""
  if buckets is not None:
    if isinstance(buckets, (bool, np.bool_)) or not isinstance(buckets, (int, np.integer)):
      raise TypeError(f"buckets must be an int{where}, got {buckets!r}")
    b = int(buckets)
    if not 1 <= b <= size:
      raise ValueError(f"buckets={b}{where} must lie in [1, {size}] (the virtual size)")
    return b
  if compression is None:
    raise ValueError(f"one of compression and buckets must be set{where}")
  if isinstance(compression, bool) or not isinstance(compression, (int, float, np.floating,
                                                                   np.integer)):
    raise TypeError(f"compression must be a float in (0, 1]{where}, got {compression!r}")
  c = float(compression)
  if not (math.isfinite(c) and 0.0 < c <= 1.0):
    raise ValueError(f"compression={compression!r}{where} must lie in (0, 1]")
  return int(min(size, max(1, round(c * size))))


def fan_in_buckets(key: jax.Array, num_buckets: int, shape: tuple[int, ...],
                   dtype: Any, scale: float = 1.0) -> jax.Array:
  """Bucket values whose virtual weights have variance ``scale / fan_in(shape)``.

  Every virtual weight is ``±`` one bucket, so it has the bucket's distribution (a
  symmetric one, so the sign does not change it): drawing the buckets from
  ``lecun_normal`` of the *virtual* shape -- a normal truncated to two standard
  deviations, rescaled to variance ``scale / fan_in`` exactly as flax's default
  ``nn.Dense`` / ``nnx.Linear`` / ``nn.Conv`` kernel initialiser does -- gives the
  virtual kernel the variance of the dense layer's usual initialisation.
  """
  std = math.sqrt(scale / fan_in(shape)) / _TRUNC_STD
  z = jax.random.truncated_normal(key, -2.0, 2.0, (num_buckets,), jnp.float32)
  return (z * jnp.float32(std)).astype(dtype)


def from_dense_buckets(w: jax.Array, seed: int, num_buckets: int, signed: bool) -> jax.Array:
  """Least-squares buckets for a dense weight: ``mean(sign * w)`` over each bucket's members.

  Minimises ``sum_f (sign(f) * buckets[bucket(f)] - w.flat[f])**2``; a bucket with no
  member gets 0. Computed in float32, returned in ``w.dtype``.
  """
  size = int(np.prod(w.shape, dtype=np.int64))
  f = jnp.arange(size, dtype=jnp.uint32)
  b, s = hashing.bucket_and_sign(f, seed, num_buckets, signed)
  vals = jnp.reshape(w, (-1,)).astype(jnp.float32) * s.astype(jnp.float32)
  total = jax.ops.segment_sum(vals, b, num_segments=num_buckets)
  count = jax.ops.segment_sum(jnp.ones((size,), jnp.float32), b, num_segments=num_buckets)
  return (total / jnp.maximum(count, jnp.float32(1.0))).astype(w.dtype)


def _is_concrete(x) -> bool:
  return isinstance(x, (np.ndarray, jax.Array))


def hash_share(params, compression: float | None = 1 / 8, *, key: jax.Array | None = None,
               buckets: int | None = None, seed: int = 0, init: str = "fan_in",
               rules=(), predicate: Callable[[str, Any], bool] | None = None,
               signed: bool = True, stack_axes: int = 0):
  """Replaces selected leaves of a parameter tree by `HashedArray` leaves (HashedNets).

  Each selected leaf of shape ``shape`` becomes ``B`` trainable bucket values; its
  virtual weight is ``V.flat[f] = sign(f) * buckets[bucket(f)]`` with the version-1
  coordinate hash seeded by ``leaf_seed(path, seed)`` (see `qws_jax._src.hashing`). The
  per-leaf seed depends on the leaf's path string and ``seed`` only, so the same call
  gives the same hash in every process; it is stored in the leaf, so ``unshare`` does
  not need the path later.

  Two entry points:

  * ``init="fan_in"`` (from scratch): buckets are drawn so the virtual weights have the
    variance of flax's default kernel initialiser, ``lecun_normal``: a normal truncated
    at two standard deviations with variance ``1 / fan_in``, ``fan_in =
    prod(shape[:-1])`` (Dense ``(K, N)``: ``K``; Conv ``(kh, kw, C_in, C_out)``:
    ``kh * kw * C_in``). Works on concrete params and on abstract trees of
    ``jax.ShapeDtypeStruct`` (``jax.eval_shape(model.init, ...)``), so the dense tree
    never has to exist. Needs ``key``; each leaf uses ``fold_in(key, fnv1a32(path))``.
  * ``init="from_dense"``: buckets are the least-squares fit to the given dense weights
    (each bucket is the mean of ``sign * w`` over its members). Needs concrete leaves.

  Args:
    params: any pytree of arrays (Flax linen variables, NNX state, dicts) or of
      ``jax.ShapeDtypeStruct``. `SharedArray` / `HashedArray` leaves pass through.
    compression: real / virtual parameters in ``(0, 1]``; ``B = max(1, round(compression
      * size))`` per leaf. Ignored where ``buckets`` is set.
    key: PRNG key, needed for ``init="fan_in"``.
    buckets: a fixed bucket count ``B`` in ``[1, size]`` instead of ``compression``.
    seed: user seed in ``[0, 2**32)``, mixed with each leaf's path.
    init: ``"fan_in"`` or ``"from_dense"``.
    rules: `qws_jax.Rule` s matched on path strings; they may override
      ``compression``, ``buckets``, ``seed``, ``init``, ``signed`` per leaf (a rule that
      sets ``compression`` where the call set ``buckets`` must also pass
      ``buckets=None``), or ``skip=True``.
    predicate: ``predicate(path, leaf) -> bool`` for leaves no rule matches; default:
      the matmul weights (``tree.default_predicate``: floating, ``ndim >= 2``, at least
      1024 elements, not a bias, norm parameter or position embedding by name).
    signed: use the sign hash ``xi``; when False every sign is ``+1``.
    stack_axes: leading axes that stack independent layers (a scanned model's
      ``(layers, ...)`` params): each slice gets its own buckets (the same hash
      pattern, ``B`` from the slice size), so ``scan`` slices the `HashedArray` like an
      array. Usually set per leaf with ``Rule(r"layers", stack_axes=1)``.

  Returns:
    The tree with each selected leaf replaced by a `HashedArray` of the leaf's shape
    and dtype (its ``buckets`` in that dtype); other leaves are the same objects.

  Raises:
    ValueError: compression outside ``(0, 1]``, a bucket count outside ``[1, size]``,
      a seed outside ``[0, 2**32)``, an unknown ``init``, a missing ``key``,
      ``init="from_dense"`` on an abstract leaf, a leaf of ``2**32`` or more elements,
      or a `HashedArray` already in the tree with an unknown hash version -- each
      naming the leaf path.
    TypeError: a selected leaf that is not floating, or a non-int seed / bucket count.

  Example:
    >>> import jax, jax.numpy as jnp, qws_jax
    >>> params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros((32,))}}
    >>> h = qws_jax.hash_share(params, compression=1/8, key=jax.random.key(0))
    >>> h["dense"]["kernel"].num_buckets, h["dense"]["kernel"].shape
    (256, (64, 32))
    >>> qws_jax.unshare(h)["dense"]["kernel"].shape
    (64, 32)

  References:
    Chen, Wilson, Tyree, Weinberger, Chen. "Compressing Neural Networks with the
    Hashing Trick", ICML 2015.
  """
  hashing.check_seed(seed, "hash_share seed")
  # Hashed leaves already present must be readable by this version of the hash.
  def check(path, leaf):
    if isinstance(leaf, types.HashedArray):
      types.validate_hashed_array(leaf, tree_lib.path_str(path))
    return leaf
  jax.tree_util.tree_map_with_path(check, params, is_leaf=types.is_compressed)

  def one(path: str, leaf, options: dict):
    st = options["stack_axes"]
    if isinstance(st, bool) or not isinstance(st, (int, np.integer)) or not 0 <= st < len(leaf.shape):
      raise ValueError(f"leaf {path!r}: stack_axes={st!r} must be an int in [0, {len(leaf.shape)})"
                       f" for shape {tuple(leaf.shape)}")
    if st:
      return _stacked(path, leaf, int(st), options)
    shape = tuple(int(d) for d in leaf.shape)
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2**32:
      raise ValueError(f"leaf {path!r} has {size} elements; the uint32 hash allows < 2**32")
    if size == 0:
      raise ValueError(f"leaf {path!r} has no elements; nothing to hash")
    b = num_buckets_for(size, options["compression"], options["buckets"], path)
    sd = hashing.leaf_seed(path, hashing.check_seed(options["seed"], f"seed for leaf {path!r}"))
    how = options["init"]
    if how == "fan_in":
      if key is None:
        raise ValueError(f"hash_share(init='fan_in') needs key= (leaf {path!r})")
      k = jax.random.fold_in(key, hashing.fnv1a32(path.encode("utf-8")))
      vals = sharding_lib.replicate_like(fan_in_buckets(k, b, shape, leaf.dtype), leaf)
    elif how == "from_dense":
      if not _is_concrete(leaf) and not isinstance(leaf, jax.core.Tracer):
        raise ValueError(f"init='from_dense' needs the dense values of leaf {path!r},"
                         f" got an abstract {type(leaf).__name__}; use init='fan_in'")
      vals = sharding_lib.from_dense_buckets(leaf, sd, b, bool(options["signed"]))  # sharded
      if vals is None:
        vals = from_dense_buckets(jnp.asarray(leaf), sd, b, bool(options["signed"]))
    else:
      raise ValueError(f"init={how!r} for leaf {path!r}: expected one of {INITS}")
    return types.HashedArray(buckets=vals, shape=shape, dtype=np.dtype(leaf.dtype), seed=sd,
                             signed=bool(options["signed"]))

  def _stacked(path, leaf, st, options):
    """One set of buckets per slice of the leading ``st`` axes, stacked."""
    lead = tuple(int(d) for d in leaf.shape[:st])
    slice_shape = tuple(int(d) for d in leaf.shape[st:])
    n = math.prod(lead)
    opts = {**options, "stack_axes": 0}
    abstract = not _is_concrete(leaf) and not isinstance(leaf, jax.core.Tracer)
    flat = None if abstract else jnp.asarray(leaf).reshape((n,) + slice_shape)
    outs = []
    for i in range(n):
      sl = jax.ShapeDtypeStruct(slice_shape, leaf.dtype) if abstract else flat[i]
      h = one(path, sl, opts)
      if options["init"] == "fan_in" and i:  # independent draws per slice
        k = jax.random.fold_in(jax.random.fold_in(key, hashing.fnv1a32(path.encode("utf-8"))), i)
        h = dataclasses.replace(h, buckets=fan_in_buckets(k, h.num_buckets, slice_shape,
                                                          leaf.dtype))
      outs.append(h)
    return jax.tree.map(lambda *a: jnp.stack(a).reshape(lead + a[0].shape), *outs)

  defaults = dict(compression=compression, buckets=buckets, seed=seed, init=init,
                  signed=signed, stack_axes=stack_axes)
  return tree_lib.map_selected(params, one, defaults=defaults, predicate=predicate,
                               rules=rules, what="hash_share")
