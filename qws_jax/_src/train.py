"""Fine-tuning compressed parameters with optax: codebooks train, indices stay frozen.

After `qws_jax.share`, a `SharedArray` leaf has two children: uint8 ``indices`` (which
centroid each weight uses, frozen) and a float ``codebook`` (trainable). Differentiating
a loss through ``materialize()`` (or the kernels' custom VJP) gives each centroid the
*sum* of the gradients of the weights that point at it, which is Deep Compression's
"trained quantization" update. `codebook_optimizer` wraps any optax optimizer so that:

* only floating leaves are handed to it (codebooks, hashed buckets, biases, norms...),
  each compressed leaf represented by its codebook / buckets array at the leaf's own
  path; integer leaves (indices) never are, and get zero updates of their own dtype,
  so ``optax.apply_updates`` leaves them bit-for-bit unchanged;
* ``jax.grad(..., allow_int=True)`` gradients, whose integer leaves are ``float0``,
  are accepted as they are;
* optionally the centroid gradient is the *mean* of its members' gradients
  (``reduction="mean"``), and chosen float leaves can be frozen (``freeze=``).

It is an ordinary `optax.GradientTransformation`, so it works under ``jax.jit`` and
with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qws_jax._src import packing
from qws_jax._src import tree as tree_lib
from qws_jax._src import types

FreezeSpec = str | Sequence[str] | Callable[[str, Any], bool] | None
REDUCTIONS = ("sum", "mean")


def _freeze_fn(freeze: FreezeSpec) -> Callable[[str, Any], bool]:
  if freeze is None:
    return lambda path, leaf: False
  if callable(freeze):
    return freeze
  patterns = (freeze,) if isinstance(freeze, str) else tuple(freeze)
  for p in patterns:
    if not isinstance(p, str):
      raise TypeError(f"freeze must be a regex, a sequence of regexes or a callable(path, leaf),"
                      f" got an element of type {type(p).__name__}")
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"freeze pattern {p!r} is not a valid regex: {e}") from None
  return lambda path, leaf: any(re.search(p, path) for p in patterns)


def _is_trainable_dtype(leaf) -> bool:
  dt = getattr(leaf, "dtype", None)
  return dt is not None and jnp.issubdtype(dt, jnp.inexact)


def trainable_mask(params, freeze: FreezeSpec = None):
  """Boolean pytree (the structure of ``params``, compressed leaves expanded).

  True for floating leaves not matched by ``freeze``; False for integer leaves (e.g.
  the indices of a `SharedArray`) and frozen leaves. Paths seen by ``freeze`` are
  `qws_jax` path strings.
  """
  frozen = _freeze_fn(freeze)

  def visit(path, leaf):
    if not _is_trainable_dtype(leaf):
      return False
    return not frozen(tree_lib.path_str(path), leaf)

  return jax.tree_util.tree_map_with_path(visit, params)


def _cluster_counts(w) -> jax.Array:
  """How many weights use each codebook entry / bucket, in the codebook's shape."""
  if w.stack_shape:  # a stacked leaf: per slice
    return jax.vmap(_cluster_counts)(w)
  if isinstance(w, types.SharedArray):
    idx = w.unpacked_indices().astype(jnp.int32)
    gid = types.group_ids(w.shape, w.axis, w.group_size, w.vector_dim)
    flat = idx if gid is None else gid * w.k + idx
    n = int(np.prod(w.codebook.shape[:-1] if w.vector_dim == 1 else w.codebook.shape[:-2],
                    dtype=np.int64)) * w.k
    counts = jnp.zeros((n,), jnp.float32).at[flat.reshape(-1)].add(1.0)
    cshape = w.codebook.shape if w.vector_dim == 1 else w.codebook.shape[:-1]
    counts = counts.reshape(cshape)
    return counts if w.vector_dim == 1 else counts[..., None]
  b, _ = w.bucket_and_sign()
  return jnp.zeros((w.num_buckets,), jnp.float32).at[b.reshape(-1)].add(1.0)


def cluster_mean_grads(grads, params):
  """Divides each codebook / bucket gradient by its number of member weights.

  Turns the natural (sum) centroid gradient into the mean of the members' gradients.
  Entries with no members keep a zero gradient.
  """
  def f(g, p):
    if isinstance(p, types.SharedArray) and isinstance(g, types.SharedArray):
      c = jnp.maximum(_cluster_counts(p), 1.0).astype(g.codebook.dtype)
      return dataclasses.replace(g, codebook=g.codebook / c)
    if isinstance(p, types.HashedArray) and isinstance(g, types.HashedArray):
      c = jnp.maximum(_cluster_counts(p), 1.0).astype(g.buckets.dtype)
      return dataclasses.replace(g, buckets=g.buckets / c)
    return g

  return jax.tree_util.tree_map(f, grads, params, is_leaf=types.is_compressed)


def _project(tree):
  """Each compressed leaf replaced by its trainable array (codebook / buckets)."""
  def f(x):
    if isinstance(x, types.SharedArray):
      return x.codebook
    if isinstance(x, types.HashedArray):
      return x.buckets
    return x
  return jax.tree_util.tree_map(f, tree, is_leaf=types.is_compressed)


def _embed_updates(params, proj_updates, mask):
  """Full updates in the structure of ``params`` from the projected (trained) ones."""
  def f(p, u, m):
    if isinstance(p, types.SharedArray):
      # Only the codebook trains: indices, scales and outliers get zero updates, and so
      # does the pruned zero (entry 0) of a sparse leaf.
      zeros = {n: None if a is None else jnp.zeros_like(a)
               for n, a in types.children(p).items()}
      cb = u if m else zeros["codebook"]
      if p.sparse and m:
        cb = cb.at[..., 0].set(0)
      return dataclasses.replace(p, **{**zeros, "codebook": cb})
    if isinstance(p, types.HashedArray):
      return dataclasses.replace(p, buckets=u if m else jnp.zeros_like(p.buckets))
    return u if m else jnp.zeros_like(p)
  return jax.tree_util.tree_map(f, params, proj_updates, mask, is_leaf=types.is_compressed)


def codebook_optimizer(tx: optax.GradientTransformation, *, reduction: str = "sum",
                       freeze: FreezeSpec = None) -> optax.GradientTransformation:
  """Wraps ``tx`` to fine-tune compressed parameters: codebooks train, indices do not.

  The inner optimizer sees the parameter tree with every `SharedArray` replaced by its
  codebook and every `HashedArray` by its buckets (so its state mirrors the model's
  structure with plain arrays: ``mu["Dense_0"]["kernel"]`` is the codebook's moment),
  and only the trainable leaves of it (floating, not frozen; `optax.masked`): it holds
  no state for indices or frozen leaves. ``update`` needs ``params`` (as optax's
  ``add_decayed_weights`` does) and returns zero updates, in each leaf's own dtype, for
  what it does not train, so ``optax.apply_updates`` leaves indices bit-for-bit
  unchanged. Gradients from ``jax.grad(..., allow_int=True)`` (``float0`` for integer
  leaves) are accepted as they are.

  Args:
    tx: any optax gradient transformation (``optax.adam(1e-3)``, a chain...).
    reduction: ``"sum"`` (Deep Compression: a centroid's gradient is the sum of its
      members' gradients, what autodiff gives) or ``"mean"`` (divided by the member
      count, as TF-MOT's option; applied to `SharedArray` codebooks and `HashedArray`
      buckets).
    freeze: float leaves not to train: a regex (or several) searched in the leaf's path
      string, e.g. ``r"bias|scale"`` or ``r"Dense_0/"``, or a callable
      ``(path, leaf) -> bool``. A compressed leaf is seen at its own path
      (``"Dense_0/kernel"``) with its codebook / buckets as ``leaf``.

  Returns:
    An `optax.GradientTransformation`; works under ``jax.jit`` and with
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

  Raises:
    ValueError: unknown ``reduction`` or bad ``freeze`` regex; ``update`` called without
      ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, qws_jax
    >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.zeros(32)}
    >>> params_c = qws_jax.share(params, k=4)
    >>> x = jax.random.normal(jax.random.key(1), (8, 64))
    >>> loss = lambda p: jnp.mean((x @ qws_jax.unshare(p)["w"] + p["b"] - 1.0) ** 2)
    >>> tx = qws_jax.codebook_optimizer(optax.sgd(1e-2))
    >>> state = tx.init(params_c)
    >>> grads = jax.grad(loss, allow_int=True)(params_c)
    >>> updates, state = tx.update(grads, state, params_c)
    >>> new = optax.apply_updates(params_c, updates)
    >>> bool((new["w"].indices == params_c["w"].indices).all())
    True
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
  _freeze_fn(freeze)  # validate early
  inner = optax.masked(tx, lambda proj: trainable_mask(proj, freeze))

  def init_fn(params):
    return inner.init(_project(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("codebook_optimizer's update needs params: tx.update(grads, state, params)")
    if reduction == "mean":
      updates = cluster_mean_grads(updates, params)
    proj_params = _project(params)
    mask = trainable_mask(proj_params, freeze)
    proj_updates, state = inner.update(_project(updates), state, proj_params)
    return _embed_updates(params, proj_updates, mask), state

  return optax.GradientTransformation(init_fn, update_fn)


def _canonical_leaf(x: types.SharedArray) -> types.SharedArray:
  if x.vector_dim != 1:
    return x
  if x.stack_shape:  # a stacked leaf: per slice
    return jax.vmap(_canonical_leaf)(x)
  order = jnp.argsort(x.codebook, axis=-1)
  if x.sparse:  # the pruned zero stays entry 0
    rest = jnp.argsort(x.codebook[..., 1:], axis=-1) + 1
    order = jnp.concatenate([jnp.zeros_like(rest[..., :1]), rest], axis=-1)
  inv = jnp.argsort(order, axis=-1).astype(jnp.int32).reshape(-1)
  idx = x.unpacked_indices().astype(jnp.int32)
  gid = types.group_ids(x.shape, x.axis, x.group_size, x.vector_dim)
  flat = idx if gid is None else gid * x.k + idx
  new = jnp.take(inv, flat, axis=0).astype(jnp.uint8)
  return dataclasses.replace(x, indices=packing.pack(new, x.bits),
                             codebook=jnp.take_along_axis(x.codebook, order, axis=-1))


def canonicalize(tree):
  """Restores the canonical form of every `SharedArray` after codebook training.

  Fine-tuning moves centroids independently, so a codebook may no longer be sorted
  (`validate_shared_array` then fails). This sorts each scalar codebook ascending and
  renumbers the indices so that every weight keeps its value: ``unshare`` is unchanged.
  Vector codebooks and other leaves pass through. Pure and jit-compatible.

  Args:
    tree: a pytree with `SharedArray` leaves (e.g. fine-tuned params).

  Returns:
    The same tree with sorted codebooks and matching indices.

  Example:
    >>> import dataclasses, jax, jax.numpy as jnp, qws_jax
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> params_c = qws_jax.share({"kernel": w}, k=4)
    >>> sa = params_c["kernel"]  # as if training had reversed the codebook's order:
    >>> params_c = {"kernel": dataclasses.replace(sa, codebook=-sa.codebook)}
    >>> fixed = qws_jax.canonicalize(params_c)
    >>> bool(jnp.all(jnp.diff(fixed["kernel"].codebook) > 0))
    True
    >>> bool(jnp.array_equal(qws_jax.unshare(fixed)["kernel"], qws_jax.unshare(params_c)["kernel"]))
    True
  """
  return jax.tree_util.tree_map(
      lambda x: _canonical_leaf(x) if isinstance(x, types.SharedArray) else x, tree,
      is_leaf=types.is_compressed)
