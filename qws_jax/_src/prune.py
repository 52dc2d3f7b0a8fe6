"""Magnitude pruning of parameter pytrees, and an optax wrapper that keeps zeros at zero.

Deep Compression's first stage (Han et al. 2015, 2016): remove the weights of smallest
magnitude, then retrain the rest with the removed ones held at exactly 0. `prune`
writes the zeros; `prune_optimizer` wraps any optax optimizer so that retraining never
moves a pruned weight.

Exact count: a leaf of ``n`` weights pruned at ``sparsity`` gets exactly
``round(sparsity * n)`` weights set to 0 (ties in magnitude are broken by flat index, the
earlier weight goes first), so the result does not depend on how many weights share the
threshold value. Weights that were already 0 are the smallest and are counted.

Scope: ``scope="leaf"`` prunes every selected leaf to the same sparsity (the per-layer
rate of the papers, where each layer's rate is chosen by hand: use `qws_jax.Rule` with
``sparsity=`` to set it per leaf); ``scope="global"`` ranks the magnitudes of all selected
leaves together (one threshold for the whole tree: exactly ``round(sparsity * N)`` of
their ``N`` weights are removed; leaves with larger weights keep more). Leaves whose
`Rule` sets ``sparsity`` are pruned on their own at that rate in both scopes.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qws_jax._src import tree as tree_lib
from qws_jax._src import types

SCOPES = ("leaf", "global")


def _check_sparsity(sparsity, where: str) -> float:
  if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
    raise TypeError(f"{where}: sparsity must be a Python float in [0, 1),"
                    f" got {type(sparsity).__name__}")
  s = float(sparsity)
  if not 0.0 <= s < 1.0:  # also rejects NaN
    raise ValueError(f"{where}: sparsity={s!r} must be in [0, 1)")
  return s


def _num_pruned(sparsity: float, n: int) -> int:
  return min(n, int(round(sparsity * n)))


def _keep_mask(mags: jax.Array, num_pruned: int) -> jax.Array:
  """Boolean mask of ``mags``'s shape: False on the ``num_pruned`` smallest (stable)."""
  flat = mags.reshape(-1)
  if num_pruned == 0:
    return jnp.ones(mags.shape, bool)
  order = jnp.argsort(flat, stable=True)
  keep = jnp.ones(flat.shape, bool).at[order[:num_pruned]].set(False)
  return keep.reshape(mags.shape)


def _magnitude(x: jax.Array, dtype) -> jax.Array:
  return jnp.abs(x).astype(dtype)


def _zero_out(x: jax.Array, keep: jax.Array) -> jax.Array:
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


def _rule_sets_sparsity(path: str, rules) -> bool:
  rule = next((r for r in rules if r.matches(path)), None)
  return rule is not None and not rule.skip and "sparsity" in dict(rule.overrides)


def prune(params, sparsity: float, *, scope: str = "leaf", predicate=None, rules=()):
  """Magnitude pruning: sets the smallest-magnitude weights of selected leaves to 0.

  Selection is the one `qws_jax.share` uses (by default the matmul weights: floating
  leaves with ``ndim >= 2``, at least 1024 elements and not a bias, norm parameter or
  position embedding by name, see ``tree.default_predicate``);
  ``predicate(path, leaf)`` replaces the default rule and ``rules`` (`qws_jax.Rule`,
  option ``sparsity``) select, skip or set a per-leaf sparsity. Compressed leaves and
  unselected leaves pass through untouched (the same objects). Selected leaves keep
  their shape and dtype. Works under ``jax.jit`` (``sparsity`` and the selection are
  static).

  With ``scope="leaf"`` each selected leaf of ``n`` weights gets exactly
  ``round(sparsity * n)`` zeros; with ``scope="global"`` the selected leaves are ranked
  together by ``|w|`` and exactly ``round(sparsity * N)`` of their ``N`` weights become
  0 (ties: earlier leaf in tree order, then earlier flat index, goes first). A leaf whose
  `Rule` sets ``sparsity`` is always pruned on its own at that rate.

  Args:
    params: any pytree of arrays (linen ``{'params': ...}``, ``nnx.State``...).
    sparsity: fraction of weights to remove, in ``[0, 1)``.
    scope: ``"leaf"`` (one rate per leaf) or ``"global"`` (one threshold over all
      selected leaves).
    predicate: ``(path, leaf) -> bool`` selecting leaves not matched by a rule.
    rules: sequence of `qws_jax.Rule`; the option they may set is ``sparsity``.

  Returns:
    A pytree of the same structure with the pruned weights set to 0.

  Raises:
    ValueError: ``sparsity`` outside ``[0, 1)`` (a rule's value: the message names the
      leaf path), unknown ``scope``, a rule setting another option.
    TypeError: ``sparsity`` not a real number; a rule or predicate selected a
      non-floating leaf (the message names the path).

  Example:
    >>> import jax, jax.numpy as jnp, qws_jax
    >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.ones(32)}
    >>> pruned = qws_jax.prune(params, 0.9)
    >>> int((pruned["w"] == 0).sum()), pruned["b"] is params["b"]
    (1843, True)

  References:
    Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient Neural
    Networks", NeurIPS 2015; Han, Mao, Dally, "Deep Compression", ICLR 2016.
  """
  sparsity = _check_sparsity(sparsity, "prune")
  if scope not in SCOPES:
    raise ValueError(f"prune: scope={scope!r} is not one of {SCOPES}")
  rules = tuple(rules or ())
  defaults = dict(sparsity=sparsity)

  if scope == "leaf":
    def one_leaf(path, leaf, options):
      s = _check_sparsity(options["sparsity"], f"prune: leaf {path!r}")
      x = jnp.asarray(leaf)
      n = int(np.prod(x.shape, dtype=np.int64))
      return _zero_out(x, _keep_mask(_magnitude(x, jnp.float32), _num_pruned(s, n)))
    return tree_lib.map_selected(params, one_leaf, defaults=defaults, predicate=predicate,
                                 rules=rules, what="prune")

  # Global: first mark the selected leaves, then rank the pooled ones together.
  class _Selected(NamedTuple):
    leaf: Any
    sparsity: float
    own: bool

  def mark(path, leaf, options):
    s = _check_sparsity(options["sparsity"], f"prune: leaf {path!r}")
    return _Selected(jnp.asarray(leaf), s, _rule_sets_sparsity(path, rules))

  marked = tree_lib.map_selected(params, mark, defaults=defaults, predicate=predicate,
                                 rules=rules, what="prune")
  is_mark = lambda x: isinstance(x, _Selected) or types.is_compressed(x)
  leaves, treedef = jax.tree_util.tree_flatten(marked, is_leaf=is_mark)
  pooled = [i for i, m in enumerate(leaves) if isinstance(m, _Selected) and not m.own]
  mag_dtype = (jnp.float64 if any(leaves[i].leaf.dtype == jnp.float64 for i in pooled)
               else jnp.float32)
  out = list(leaves)
  if pooled:
    mags = jnp.concatenate([_magnitude(leaves[i].leaf, mag_dtype).reshape(-1) for i in pooled])
    keep = _keep_mask(mags, _num_pruned(sparsity, int(mags.shape[0])))
    start = 0
    for i in pooled:
      x = leaves[i].leaf
      n = int(np.prod(x.shape, dtype=np.int64))
      out[i] = _zero_out(x, keep[start:start + n].reshape(x.shape))
      start += n
  for i, m in enumerate(leaves):
    if isinstance(m, _Selected) and m.own:
      n = int(np.prod(m.leaf.shape, dtype=np.int64))
      out[i] = _zero_out(m.leaf, _keep_mask(_magnitude(m.leaf, jnp.float32),
                                            _num_pruned(m.sparsity, n)))
  return jax.tree_util.tree_unflatten(treedef, out)


class PruneState(NamedTuple):
  """State of `prune_optimizer`: the keep masks of the selected leaves and ``tx``'s state.

  ``masks`` holds one boolean array per selected leaf (True where the weight is kept),
  in tree order; ``inner`` is the wrapped optimizer's state.
  """

  masks: tuple
  inner: optax.OptState


def _selected_flags(params, predicate, rules) -> list[bool]:
  """One flag per leaf of ``params`` (compressed leaves are one leaf): selected or not."""
  marker = object()
  marked = tree_lib.map_selected(params, lambda path, leaf, options: marker, defaults={},
                                 predicate=predicate, rules=rules, what="prune_optimizer")
  leaves = jax.tree_util.tree_leaves(marked, is_leaf=lambda x: x is marker or
                                     types.is_compressed(x))
  return [x is marker for x in leaves]


def prune_optimizer(tx: optax.GradientTransformation, *, predicate=None,
                    rules: Sequence[tree_lib.Rule] = ()) -> optax.GradientTransformation:
  """Wraps ``tx`` so that weights that are 0 at ``init`` stay exactly 0 while training.

  ``init(params)`` records, for every selected leaf (the selection of `prune`: same
  ``predicate`` and ``rules``, by default the matmul weights of
  ``tree.default_predicate``), a keep mask ``params != 0``. ``update`` zeroes the gradients of the
  pruned weights before ``tx`` sees them (so its moments stay 0 there) and zeroes
  ``tx``'s updates there afterwards (so momentum, weight decay or any other term cannot
  move them): ``optax.apply_updates`` then adds exactly 0 to an exact 0. Other leaves
  (biases, norms, compressed leaves) are passed to ``tx`` unchanged. An ordinary
  `optax.GradientTransformation`: works under ``jax.jit`` and with ``nnx.Optimizer``.

  Prune first, then build the optimizer state from the pruned parameters::

    params = qws_jax.prune(params, 0.9)
    tx = qws_jax.prune_optimizer(optax.adam(1e-3))
    state = tx.init(params)

  Note that a selected weight that happens to be exactly 0 at ``init`` counts as pruned.

  Args:
    tx: any optax gradient transformation.
    predicate: ``(path, leaf) -> bool`` selecting leaves not matched by a rule.
    rules: sequence of `qws_jax.Rule` (their ``sparsity`` option, if any, is ignored).

  Returns:
    An `optax.GradientTransformation` whose state is a `PruneState`.

  Raises:
    ValueError: ``update`` called with a tree whose selected leaves do not match the
      masks recorded at ``init`` (the message names the leaf path).
    TypeError: a rule or predicate selected a non-floating leaf.

  Example:
    >>> import jax, jax.numpy as jnp, optax, qws_jax
    >>> params = qws_jax.prune({"w": jax.random.normal(jax.random.key(0), (64, 32))}, 0.5)
    >>> tx = qws_jax.prune_optimizer(optax.adam(1e-2))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> bool(((new["w"] == 0) == (params["w"] == 0)).all())
    True
  """
  rules = tuple(rules or ())
  rules_no_sparsity = tuple(
      r if "sparsity" not in dict(r.overrides) else
      tree_lib.Rule(r.pattern, **{k: v for k, v in r.overrides if k != "sparsity"})
      for r in rules)

  def flat(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=types.is_compressed)

  def init_fn(params):
    flags = _selected_flags(params, predicate, rules_no_sparsity)
    leaves = jax.tree_util.tree_leaves(params, is_leaf=types.is_compressed)
    masks = tuple(jnp.asarray(x) != 0 for x, f in zip(leaves, flags) if f)
    return PruneState(masks=masks, inner=tx.init(params))

  def apply_masks(tree, flags, masks):
    pairs, treedef = flat(tree)
    if len(pairs) != len(flags):
      raise ValueError(f"prune_optimizer: the update tree has {len(pairs)} leaves, params"
                       f" {len(flags)}")
    out, it = [], iter(masks)
    for (path, u), f in zip(pairs, flags):
      if f:
        m = next(it)
        if tuple(u.shape) != tuple(m.shape):
          raise ValueError(f"prune_optimizer: leaf {tree_lib.path_str(path)!r} has shape"
                           f" {tuple(u.shape)}, its mask from init {tuple(m.shape)}")
        u = jnp.where(m, u, jnp.zeros((), u.dtype))
      out.append(u)
    return jax.tree_util.tree_unflatten(treedef, out)

  def update_fn(updates, state, params=None):
    ref = updates if params is None else params
    flags = _selected_flags(ref, predicate, rules_no_sparsity)
    if sum(flags) != len(state.masks):
      raise ValueError(f"prune_optimizer: {sum(flags)} leaves selected now, {len(state.masks)}"
                       " at init; build the state with tx.init on the same parameter tree")
    updates = apply_masks(updates, flags, state.masks)
    updates, inner = tx.update(updates, state.inner, params)
    updates = apply_masks(updates, flags, state.masks)
    return updates, PruneState(masks=state.masks, inner=inner)

  return optax.GradientTransformation(init_fn, update_fn)

