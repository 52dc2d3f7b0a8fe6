"""Flax NNX models whose layers hold compressed weights.

`share` (exported as ``qws_jax.nnx.share``) returns a copy of an NNX model in which
the selected `nnx.Param` weights are `SharedParam` variables holding a `SharedArray`
(or `HashedArray` for `compress_model` with `qws_jax.hash_share`). The model keeps
working with ``nnx.jit``, ``nnx.grad`` and ``nnx.Optimizer``:

* ``nnx.Linear`` and ``nnx.Embed`` run on the compressed weight (the matmul goes through
  `qws_jax._src.apply.compressed_matmul`, the kernels switch; an embedding lookup
  decodes only the looked-up rows);
* every other read of a compressed weight (``variable[...]``, the way NNX layers read
  their parameters, or using the variable as an array) materialises that one weight
  where it is read.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import apply as apply_lib
from qws_jax._src import share as share_lib
from qws_jax._src import types

_MISSING = nnx.variablelib.MISSING


def _is_live(v) -> bool:
  """A compressed value with real (uint8) indices, not a gradient or a repr proxy."""
  if isinstance(v, types.SharedArray):
    return isinstance(v.indices, (jax.Array, np.ndarray)) and np.dtype(v.indices.dtype) == np.uint8
  if isinstance(v, types.HashedArray):
    return isinstance(v.buckets, (jax.Array, np.ndarray))
  return False


class SharedParam(nnx.Param):
  """An `nnx.Param` whose value is a `SharedArray` / `HashedArray`.

  ``variable[...]`` (how NNX layers read weights) and using the variable as an array
  return the materialised dense weight of this one leaf; ``get_value()`` /
  ``get_raw_value()`` return the compressed leaf itself, which is what ``nnx.state``,
  ``nnx.Optimizer`` and checkpoints see.
  """

  def get_value(self, *, index: Any = _MISSING):
    raw = self.get_raw_value()
    if index is not _MISSING and _is_live(raw):
      dense = raw.materialize()
      return dense if index is Ellipsis else dense[index]
    return super().get_value(index=index)

  def __jax_array__(self):
    raw = self.get_raw_value()
    return raw.materialize() if _is_live(raw) else super().__jax_array__()


def _compressed(var) -> Any | None:
  if isinstance(var, nnx.Variable):
    raw = var.get_raw_value()
    if _is_live(raw):
      return raw
  return None


def _fast_ok(module) -> bool:
  return (getattr(module, "promote_dtype", nnx_dtypes.promote_dtype) is nnx_dtypes.promote_dtype
          and getattr(module, "dot_general", lax.dot_general) in (None, lax.dot_general)
          and getattr(module, "dot_general_cls", None) is None
          and getattr(module, "preferred_element_type", None) is None)


class _SharedLinear(nnx.Linear):
  """``nnx.Linear`` whose compressed kernel runs through `compressed_matmul`."""

  def __call__(self, inputs, out_sharding=None):
    w = _compressed(self.kernel)
    if w is None or out_sharding is not None or not _fast_ok(self) or len(w.shape) != 2:
      return super().__call__(inputs, out_sharding=out_sharding)
    x = jnp.asarray(inputs)
    bias = self.bias[...] if self.bias is not None else None
    dtype = self.dtype or jnp.result_type(x.dtype, w.dtype, *([bias.dtype] if bias is not None else []))
    x = x.astype(dtype)
    y = apply_lib.compressed_matmul(x.reshape(-1, w.shape[0]), apply_lib._cast(w, dtype),  # pylint: disable=protected-access
                                    precision=self.precision)
    y = y.reshape(x.shape[:-1] + (w.shape[1],))
    if bias is not None:
      y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


class _SharedEmbed(nnx.Embed):
  """``nnx.Embed`` whose compressed table decodes only the looked-up rows."""

  def __call__(self, inputs, out_sharding=None):
    w = _compressed(self.embedding)
    if (w is None or out_sharding is not None or len(w.shape) != 2
        or self.promote_dtype is not nnx_dtypes.promote_dtype):
      return super().__call__(inputs, out_sharding=out_sharding)
    ids = jnp.asarray(inputs)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    dtype = self.dtype or w.dtype
    if self.num_embeddings == 1:
      row = apply_lib.take_rows(w, jnp.zeros((1,), jnp.int32))[0].astype(dtype)
      return jnp.broadcast_to(row, ids.shape + (self.features,))
    return apply_lib.take_rows(w, ids).astype(dtype)


_FAST_CLASSES = {nnx.Linear: _SharedLinear, nnx.Embed: _SharedEmbed}


def _lookup(tree, path):
  node = tree
  for p in path:
    if isinstance(node, dict) and p in node:
      node = node[p]
    else:
      return None
  return node


def compress_model(model: nnx.Module, compress_fn: Callable[[Any], Any]) -> nnx.Module:
  """A copy of ``model`` whose `nnx.Param` values are replaced by ``compress_fn``'s.

  Args:
    model: an NNX module (left unchanged).
    compress_fn: maps the pure dict of the model's ``nnx.Param`` values (as
      ``nnx.to_pure_dict`` gives it) to the same tree with some leaves compressed, e.g.
      ``lambda p: qws_jax.share(p, k=16)`` or ``lambda p: qws_jax.hash_share(p, ...)``.

  Returns:
    A new model: compressed leaves live in `SharedParam` variables; ``nnx.Linear`` and
    ``nnx.Embed`` layers holding one take the compressed fast path.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"expected an nnx.Module, got {type(model).__name__}")
  graphdef, state = nnx.split(model)
  new = nnx.merge(graphdef, state)  # a copy that shares the (immutable) arrays
  pure_c = compress_fn(nnx.to_pure_dict(nnx.state(new, nnx.Param)))
  nodes = dict(nnx.iter_graph(new))
  replaced_parents = []
  for path, node in list(nodes.items()):
    if not isinstance(node, nnx.Param) or not path:
      continue
    value = _lookup(pure_c, path)
    if not types.is_compressed(value):
      continue
    got = tuple(value.shape)
    want = tuple(np.shape(node.get_raw_value()))
    if got != want:
      raise ValueError(f"compress_fn changed the shape of {'/'.join(map(str, path))!r}:"
                       f" {want} -> {got}")
    meta = {k: v for k, v in node.get_metadata().items() if k not in ("hijax", "ref")}
    new_var = SharedParam(value, **meta)
    parent = nodes[path[:-1]]
    if isinstance(parent, nnx.Module):
      setattr(parent, path[-1], new_var)
      replaced_parents.append(parent)
    else:
      parent[path[-1]] = new_var
  for parent in replaced_parents:
    cls = _FAST_CLASSES.get(type(parent))
    if cls is not None:
      object.__setattr__(parent, "__class__", cls)
  return new


def share(model: nnx.Module, k: int = 32, **share_kwargs) -> nnx.Module:
  """k-means weight sharing of an NNX model's parameters (`qws_jax.share` on its params).

  Args:
    model: an NNX module (left unchanged).
    k: codebook size.
    **share_kwargs: the other options of `qws_jax.share` (``axis``, ``group_size``,
      ``rules``, ``predicate``...); rule and predicate paths look like ``"l1/kernel"``.

  Returns:
    A copy of ``model`` whose selected weights are `SharedParam` variables holding
    `SharedArray` leaves; usable with ``nnx.jit``, ``nnx.grad(..., allow_int=True)`` and
    ``nnx.Optimizer(model, qws_jax.codebook_optimizer(tx), wrt=nnx.Param)``.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp, qws_jax.nnx
    >>> model = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    >>> model_c = qws_jax.nnx.share(model, k=16)
    >>> model_c(jnp.ones((2, 64))).shape
    (2, 32)
  """
  return compress_model(model, lambda p: share_lib.share(p, k=k, **share_kwargs))
