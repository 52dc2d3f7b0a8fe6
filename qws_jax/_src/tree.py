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


def _key_part(key):
  """The plain key of one key-path entry (None for an NNX ``.value`` payload)."""
  if isinstance(key, jax.tree_util.DictKey):
    return key.key
  if isinstance(key, jax.tree_util.SequenceKey):
    return key.idx
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name == "value" else key.name  # flax.nnx Variable payload
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return key.key
  return str(key)


def path_keys(path) -> tuple:
  """The key tuple of a jax key path: ``("params", "Dense_0", "kernel")``.

  Keys keep their type (``0`` and ``"0"`` differ) and a key holding ``"/"`` stays one
  key, so two different leaves never get the same tuple. Use it to match leaves
  between trees; `path_str` is for display and regex rules.
  """
  return tuple(p for p in map(_key_part, path) if p is not None)


def _escape(part) -> str:
  s = str(part)
  return s.replace("\\", "\\\\").replace("/", "\\/") if isinstance(part, str) else s


class LeafPath(str):
  """A leaf's path string (``"params/Dense_0/kernel"``) that also carries its key tuple.

  It is a ``str`` for messages and regex rules; ``.keys`` (see `path_keys`) is what
  matching between trees uses, so keys such as ``"a/b"`` never collide with nesting.
  """

  keys: tuple

  def __new__(cls, path):
    keys = path_keys(path)
    self = super().__new__(cls, "/".join(_escape(k) for k in keys))
    self.keys = keys
    return self


def path_str(path) -> LeafPath:
  """``"params/Dense_0/kernel"`` for a jax key path (NNX ``.value`` suffixes dropped).

  A ``"/"`` or ``"\\"`` inside a key is escaped with a backslash (``"a\\/b"``), so
  different leaves have different strings. The result is a `LeafPath`.
  """
  return LeafPath(path)


def leaves_by_keys(tree, *, is_leaf=None) -> dict:
  """``{path_keys: leaf}`` of a pytree's leaves (``None`` leaves are left out)."""
  out = {}
  for p, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf):
    out[path_keys(p)] = leaf
  return out


def is_array_like(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
      hasattr(x, "shape") and hasattr(x, "dtype") and not types.is_compressed(x))


def is_floating(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


# Names that are never matmul weights (last path key, or its last "."-separated part for
# flat checkpoint names such as "encoder.layer.0.attention.self.query.bias").
_NOT_WEIGHT_NAMES = frozenset({"bias", "b", "scale", "mean", "var", "variance", "gamma",
                               "beta", "running_mean", "running_var", "num_batches_tracked"})
# Position embeddings (learned or fixed tables added to activations, not used as a matmul
# weight) and normalisation layers, recognised in the leaf's name or its module's name.
_NOT_WEIGHT_PATTERN = re.compile(r"pos_?emb|posemb|position|norm|(^|[._/])ln(_?\d*|f)([._/]|$)")


def _leaf_names(path) -> tuple[str, str]:
  """``(module name, leaf name)`` in lower case from a path string or `LeafPath`."""
  keys = getattr(path, "keys", None)
  if keys is None:
    keys = tuple(str(path).split("/"))
  keys = tuple(str(k) for k in keys) or ("",)
  *parents, last = keys
  if "." in last:  # a flat name from a .safetensors / torch checkpoint
    *dotted, last = last.split(".")
    parents = parents + [".".join(dotted)]
  return (parents[-1] if parents else "").lower(), last.lower()


def default_predicate(path: str, leaf) -> bool:
  """The default selection: matmul weights (kernels, embedding tables, Einsum weights).

  A leaf is selected when all of these hold:

  * it is floating, has ``ndim >= 2`` and at least 1024 elements (the role of a matmul
    weight; smaller tables cost more in codebook than they save);
  * its name (the last path key; for flat checkpoint names such as ``"a.b.weight"`` the
    part after the last ``"."``) is not a bias, norm or statistics name (``bias``,
    ``b``, ``scale``, ``mean``, ``var``, ``gamma``, ``beta``...): so the ``(heads,
    head_dim)`` q/k/v biases of ``MultiHeadDotProductAttention`` are never selected;
  * neither its name nor its module's name is a position embedding (``pos_embedding``,
    ``posembed_input``, ``position_embeddings``...) or a normalisation layer (``norm``,
    ``ln_1``...).

  So ``kernel`` (Dense, DenseGeneral, Einsum, Conv, NNX ``Linear`` / ``Einsum`` /
  ``Conv``, the hashed layers), ``embedding`` (``Embed``), Gemma-style Einsum ``w``
  and flat ``*.weight`` matrices are selected; use ``predicate=`` or `Rule` for
  anything else.

  Example:
    >>> import jax.numpy as jnp
    >>> default_predicate("params/Dense_0/kernel", jnp.zeros((64, 32)))
    True
    >>> default_predicate("params/attn/query/bias", jnp.zeros((16, 64)))
    False
    >>> default_predicate("params/posembed_input/pos_embedding", jnp.zeros((1, 197, 768)))
    False
  """
  if not is_floating(leaf) or len(leaf.shape) < 2 or int(np.prod(leaf.shape)) < 1024:
    return False
  module, name = _leaf_names(path)
  if name in _NOT_WEIGHT_NAMES:
    return False
  return not (_NOT_WEIGHT_PATTERN.search(name) or _NOT_WEIGHT_PATTERN.search(module))


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
    self._check_share_options(pattern, overrides)
    object.__setattr__(self, "pattern", pattern)
    object.__setattr__(self, "skip", bool(skip))
    object.__setattr__(self, "overrides", tuple(sorted(overrides.items())))

  @staticmethod
  def _check_share_options(pattern: str, o: Mapping[str, Any]) -> None:
    """Checks the k-means options a rule sets when it is built (not per leaf)."""
    where = f"Rule({pattern!r})"

    def is_int(v):
      return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if "k" in o and not (is_int(o["k"]) and 2 <= o["k"] <= 256):
      raise ValueError(f"{where}: k must be an int in [2, 256], got k={o['k']!r}")
    if o.get("axis") is not None and not is_int(o["axis"]):
      raise TypeError(f"{where}: axis must be an int or None, got {o['axis']!r}")
    if o.get("group_size") is not None and not (is_int(o["group_size"]) and o["group_size"] >= 1):
      raise ValueError(f"{where}: group_size must be a positive int, got {o['group_size']!r}")
    if o.get("axis") is not None and o.get("group_size") is not None:
      raise ValueError(f"{where}: set axis (per-channel) or group_size (per-group), not both")
    if "vector_dim" in o and o["vector_dim"] not in (1, 2, 4, 8):
      raise ValueError(f"{where}: vector_dim must be one of (1, 2, 4, 8), got"
                       f" {o['vector_dim']!r}")

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
