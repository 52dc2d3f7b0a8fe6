"""Selecting leaves of a parameter pytree: path strings, predicates and `Rule`s."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import types

Predicate = Callable[[str, Any], bool]


def path_str(path) -> str:
  """``"params/Dense_0/kernel"`` for a jax key path (NNX ``.value`` suffixes dropped)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name == "value":  # flax.nnx Variable payload
        continue
      parts.append(str(key.name))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts)


def is_array_like(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
      hasattr(x, "shape") and hasattr(x, "dtype") and not types.is_compressed(x))


def is_floating(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def default_predicate(path: str, leaf) -> bool:
  """Floating leaves with ``ndim >= 2`` and at least 1024 elements (kernels, embeddings)."""
  del path
  return is_floating(leaf) and len(leaf.shape) >= 2 and int(np.prod(leaf.shape)) >= 1024


@dataclasses.dataclass(frozen=True, init=False)
class Rule:
  """Selects leaves whose path matches a regex and overrides options for them.

  ``Rule(r"embedding", k=256)`` selects every leaf whose path string (``"params/Embed_0/
  embedding"``) matches ``re.search(pattern, path)`` and compresses it with ``k=256``;
  ``Rule(r"Dense_0", skip=True)`` leaves matching leaves untouched. The first matching
  rule wins; a matching rule selects its leaves even where the predicate would not.
  Leaves matched by no rule are selected by the predicate with the call's options.

  Args:
    pattern: regular expression searched in the leaf's path string.
    skip: leave matching leaves untouched.
    **overrides: options of the function the rule is passed to (``k``, ``axis``,
      ``group_size``, ``compression``, ...).
  """

  pattern: str
  skip: bool
  overrides: tuple[tuple[str, Any], ...]

  def __init__(self, pattern: str, *, skip: bool = False, **overrides):
    if not isinstance(pattern, str):
      raise TypeError(f"Rule pattern must be a str, got {type(pattern).__name__}")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"Rule pattern {pattern!r} is not a valid regex: {e}") from None
    if skip and overrides:
      raise ValueError(f"Rule({pattern!r}, skip=True) takes no options, got {sorted(overrides)}")
    object.__setattr__(self, "pattern", pattern)
    object.__setattr__(self, "skip", bool(skip))
    object.__setattr__(self, "overrides", tuple(sorted(overrides.items())))

  def matches(self, path: str) -> bool:
    return re.search(self.pattern, path) is not None


def map_selected(tree, fn: Callable[[str, Any, dict], Any], *, defaults: Mapping[str, Any],
                 predicate: Predicate | None, rules, what: str):
  """Applies ``fn(path, leaf, options)`` to the selected leaves; others pass through.

  Compressed leaves already in the tree pass through. A selected leaf that is not a
  floating array raises TypeError naming its path.
  """
  rules = tuple(rules or ())
  for r in rules:
    if not isinstance(r, Rule):
      raise TypeError(f"rules must be qws_jax.Rule objects, got {type(r).__name__}")
    unknown = sorted(set(dict(r.overrides)) - set(defaults))
    if unknown:
      raise ValueError(f"Rule({r.pattern!r}) sets unknown option(s) {unknown} for {what};"
                       f" known: {sorted(defaults)}")
  pred = default_predicate if predicate is None else predicate

  def visit(path, leaf):
    if types.is_compressed(leaf) or not is_array_like(leaf):
      return leaf
    p = path_str(path)
    rule = next((r for r in rules if r.matches(p)), None)
    if rule is not None:
      if rule.skip:
        return leaf
      options = {**defaults, **dict(rule.overrides)}
      origin = f"Rule({rule.pattern!r})"
    else:
      if not pred(p, leaf):
        return leaf
      options = dict(defaults)
      origin = "the predicate"
    if not is_floating(leaf):
      raise TypeError(f"{what}: {origin} selected leaf {p!r} of dtype {leaf.dtype};"
                      " only floating leaves can be compressed")
    return fn(p, leaf, options)

  return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=types.is_compressed)
