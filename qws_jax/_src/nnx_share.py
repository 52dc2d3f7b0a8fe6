"""Flax NNX models whose layers hold compressed weights.

`share` and `hash_share` (exported as ``qws_jax.nnx.share`` / ``qws_jax.nnx.hash_share``)
and `compress` return a copy of an NNX model in which the selected `nnx.Param` weights
are `SharedParam` variables holding a `SharedArray` or `HashedArray`. The model keeps
working with ``nnx.jit``, ``nnx.grad`` and ``nnx.Optimizer``:

* ``nnx.Linear``, ``nnx.Einsum``, ``nnx.Conv`` (``feature_group_count=1``, no mask) and
  ``nnx.Embed``, and any subclass of them (say Gemma's ``ScaledEmbed(nnx.Embed)``,
  whose own ``__call__`` reaches ours through ``super()``), run on the compressed
  weight through `qws_jax._src.ops` (the kernels switch; im2col for convolutions;
  embedding lookups decode only the looked-up rows);
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

from qws_jax._src import hash_share as hash_share_lib
from qws_jax._src import ops
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
          and getattr(module, "einsum_op", jnp.einsum) in (None, jnp.einsum)
          and getattr(module, "conv_general_dilated", lax.conv_general_dilated)
          in (None, lax.conv_general_dilated)
          and getattr(module, "dot_general_cls", None) is None
          and getattr(module, "preferred_element_type", None) is None)


def _bias(module):
  return module.bias[...] if getattr(module, "bias", None) is not None else None


class _SharedLinear(nnx.Linear):
  """``nnx.Linear`` whose compressed kernel runs through `ops.dense`."""

  def __call__(self, inputs, out_sharding=None):
    w = _compressed(self.kernel)
    if w is None or out_sharding is not None or not _fast_ok(self) or len(w.shape) != 2:
      return super().__call__(inputs, out_sharding=out_sharding)
    return ops.dense(inputs, w, _bias(self), dtype=self.dtype, precision=self.precision)


class _SharedEinsum(nnx.Einsum):
  """``nnx.Einsum`` whose compressed kernel runs through `ops.einsum`."""

  def __call__(self, inputs, einsum_str=None, out_sharding=None):
    w = _compressed(self.kernel)
    spec = einsum_str if einsum_str is not None else self.einsum_str
    x = jnp.asarray(inputs)
    if (w is None or out_sharding is not None or not _fast_ok(self) or spec is None
        or (einsum_str is not None and self.einsum_str is not None)
        or ops.einsum_plan(spec, x.shape, w.shape) is None):
      return super().__call__(inputs, einsum_str=einsum_str, out_sharding=out_sharding)
    spec = spec.replace(" ", "")
    bias = _bias(self)
    dtype = ops.result_dtype(self.dtype, x, w, bias)
    y = ops.einsum(spec, x.astype(dtype), ops.cast(w, dtype), precision=self.precision)
    if bias is not None:
      shape = self._infer_broadcasted_bias_shape(  # pylint: disable=protected-access
          spec, x, jax.ShapeDtypeStruct(w.shape, w.dtype))
      y = ops.add_bias(y, bias, shape)
    return y


class _SharedConv(nnx.Conv):
  """``nnx.Conv`` whose compressed kernel runs through `ops.conv_layer` (im2col)."""

  def __call__(self, inputs, out_sharding=None):
    w = _compressed(self.kernel)
    if (w is None or out_sharding is not None or not _fast_ok(self)
        or self.feature_group_count != 1 or self.mask is not None
        or len(w.shape) != len(self.kernel_size) + 2):
      return super().__call__(inputs, out_sharding=out_sharding)
    return ops.conv_layer(inputs, w, _bias(self), strides=self.strides, padding=self.padding,
                          input_dilation=self.input_dilation,
                          kernel_dilation=self.kernel_dilation, dtype=self.dtype,
                          precision=self.precision)


class _SharedEmbed(nnx.Embed):
  """``nnx.Embed`` whose compressed table decodes only the looked-up rows."""

  def __call__(self, inputs, out_sharding=None):
    w = _compressed(self.embedding)
    if (w is None or out_sharding is not None or len(w.shape) != 2
        or self.promote_dtype is not nnx_dtypes.promote_dtype):
      return super().__call__(inputs, out_sharding=out_sharding)
    return ops.embed(w, inputs, dtype=self.dtype, num_embeddings=self.num_embeddings)


_FAST_CLASSES = {nnx.Linear: _SharedLinear, nnx.Einsum: _SharedEinsum, nnx.Conv: _SharedConv,
                 nnx.Embed: _SharedEmbed}
_SUBCLASS_CACHE: dict[type, type] = {}


def _fast_class(cls: type) -> type | None:
  """The fast-path class for a layer class: ours for the flax class itself, and for a
  subclass ``C`` of it a class ``C'(C, ours)``, whose method order is ``C, ours, flax
  class``: ``C``'s overrides run first and their ``super()`` calls reach the fast path.
  None for other classes (and for our classes themselves)."""
  if cls in _FAST_CLASSES:
    return _FAST_CLASSES[cls]
  if cls in _FAST_CLASSES.values() or getattr(cls, "_qws_fast", False):
    return None
  if cls in _SUBCLASS_CACHE:
    return _SUBCLASS_CACHE[cls]
  for base, fast in _FAST_CLASSES.items():
    if issubclass(cls, base):
      try:
        new = type(cls.__name__, (cls, fast), {"_qws_fast": True, "__module__": cls.__module__,
                                               "__qualname__": cls.__qualname__})
      except TypeError:  # no consistent method order: keep the class (materialises)
        new = None
      _SUBCLASS_CACHE[cls] = new
      return new
  return None


def _lookup(tree, path):
  node = tree
  for p in path:
    if isinstance(node, dict) and p in node:
      node = node[p]
    else:
      return None
  return node


def compress(model: nnx.Module, compress_fn: Callable[[Any], Any]) -> nnx.Module:
  """A copy of ``model`` whose `nnx.Param` values are replaced by ``compress_fn``'s.

  The general form of `share` and `hash_share`: any function from a parameter tree to
  the same tree with some leaves compressed.

  Args:
    model: an NNX module (left unchanged).
    compress_fn: maps the pure dict of the model's ``nnx.Param`` values (as
      ``nnx.to_pure_dict`` gives it) to the same tree with some leaves compressed, e.g.
      ``lambda p: qws_jax.share(p, k=16)`` or ``lambda p: qws_jax.hash_share(p, ...)``.

  Returns:
    A new model: compressed leaves live in `SharedParam` variables; ``nnx.Linear``,
    ``nnx.Einsum``, ``nnx.Conv`` and ``nnx.Embed`` layers (and subclasses) holding one
    take the compressed fast path.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``.
    ValueError: ``compress_fn`` changed the shape of a leaf (the message names its path).

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp, qws_jax, qws_jax.nnx
    >>> model = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    >>> model_c = qws_jax.nnx.compress(model, lambda p: qws_jax.share(p, k=4))
    >>> model_c.kernel.get_value()
    SharedArray(shape=(64, 32), dtype=float32, k=4, bits=2, layout='tensor')
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
    got = tuple(getattr(value, "full_shape", value.shape))  # stacked leaves: all layers
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
    cls = _fast_class(type(parent))
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
  return compress(model, lambda p: share_lib.share(p, k=k, **share_kwargs))


def hash_share(model: nnx.Module, compression: float | None = 1 / 8, *,
               key: jax.Array | None = None, **hash_kwargs) -> nnx.Module:
  """HashedNets for an NNX model: `qws_jax.hash_share` on its params, in a model copy.

  With the default ``init="fan_in"`` this is the route to train a hashed NNX model from
  scratch: build the model as usual, hash it, and train the buckets with any optax
  optimizer wrapped by `qws_jax.codebook_optimizer` (``nnx.Optimizer(model_h,
  qws_jax.codebook_optimizer(optax.adam(1e-3)), wrt=nnx.Param)``; the wrapper gives
  the optimizer the bucket arrays, so stateful optimizers keep plain-array state),
  gradients with ``nnx.grad``. Linear / Einsum / Conv / Embed layers then hash their weights tile by
  tile (`qws_jax.kernels.hashed_matmul`); no dense weight is kept.

  Args:
    model: an NNX module (left unchanged).
    compression: real / virtual parameters, as in `qws_jax.hash_share`.
    key: PRNG key for ``init="fan_in"`` (keyword-only).
    **hash_kwargs: the other options of `qws_jax.hash_share` (``buckets``, ``seed``,
      ``init``, ``rules``, ``predicate``, ``signed``); paths look like ``"l1/kernel"``.

  Returns:
    A copy of ``model`` whose selected weights are `SharedParam` variables holding
    `qws_jax.HashedArray` leaves.

  Example:
    >>> import jax, jax.numpy as jnp, optax, qws_jax
    >>> from flax import nnx
    >>> model = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    >>> model_h = qws_jax.nnx.hash_share(model, compression=1/8, key=jax.random.key(0))
    >>> model_h.kernel.get_value().num_buckets
    256
    >>> tx = qws_jax.codebook_optimizer(optax.adam(1e-3))
    >>> opt = nnx.Optimizer(model_h, tx, wrt=nnx.Param)
    >>> grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 64))) ** 2))(model_h)
    >>> _ = opt.update(model_h, grads)
    >>> model_h(jnp.ones((2, 64))).shape
    (2, 32)
  """
  return compress(model, lambda p: hash_share_lib.hash_share(p, compression, key=key,
                                                             **hash_kwargs))


compress_model = compress  # the name this function had before it was public
