"""Running Flax linen models on compressed parameters without materialising the tree.

`apply` wraps ``model.apply``. Every `SharedArray` / `HashedArray` leaf of the
variables is put in a small `flax.core.meta.AxisMetadata` box (`_Lazy`) whose
``unbox()`` materialises that one leaf. Flax unboxes a parameter at the moment a module
reads it (``self.param``), so a layer we know nothing about gets the dense value of
its own compressed weights, just where it uses them, and never the dense tree.

Calls of ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` and ``nn.Embed``
(and of their subclasses, including a subclass's ``super().__call__``) are intercepted
(`flax.linen.intercept_methods`, keyed by the function flax is about to run) and run on
the compressed weight through `qws_jax._src.ops`: matmul-shaped layers and convolutions
(im2col) call `ops.matmul`, the single switch to the `qws_jax.kernels` entry points;
Embed gathers only the looked-up rows. Parameters boxed by ``nn.with_partitioning`` /
``nn.with_logical_partitioning`` take the same path. A layer configured in a way the
fast path does not cover (a custom ``dot_general``, ``batch_dims``, grouped or masked
convolutions...) falls back to the generic per-layer materialisation, with identical
results.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
from flax import struct
from flax.core import meta
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp

from qws_jax._src import ops
from qws_jax._src import types


# --------------------------------------------------------------------------------------
# The lazy box.
# --------------------------------------------------------------------------------------


class _Lazy(struct.PyTreeNode, meta.AxisMetadata):
  """Boxes a compressed leaf; flax's unboxing (a module reading it) materialises it."""

  value: Any

  def unbox(self):
    v = self.value
    return v.materialize() if types.is_compressed(v) else v

  def replace_boxed(self, val):
    return self.replace(value=val)

  # nn.scan / nn.vmap over params slice the boxed leaf like any pytree: a stacked leaf
  # (leading stack axes on every child, see `SharedArray`) loses its first stack axis
  # and each layer sees an ordinary compressed leaf. Only axis 0 is a stack axis.
  def add_axis(self, index, params):
    return self._axis(index, "add")

  def remove_axis(self, index, params):
    return self._axis(index, "remove")

  def _axis(self, index, what):
    if index != 0:
      raise NotImplementedError(
          f"qws_jax.apply: a lifted transform would {what} axis {index} of a compressed"
          " parameter; stacked (scanned) compressed leaves carry their layers on axis 0:"
          " use variable_axes={'params': 0}")
    return self


def _box(tree):
  return jax.tree_util.tree_map(lambda x: _Lazy(x) if types.is_compressed(x) else x, tree,
                                is_leaf=types.is_compressed)


def _unbox_raw(tree):
  return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, _Lazy) else x, tree,
                                is_leaf=lambda x: isinstance(x, _Lazy))


def _raw_param(module, name: str):
  """The compressed leaf behind ``params/<name>`` of ``module``, else None.

  Metadata boxes around it (``nn.with_partitioning`` / ``nn.with_logical_partitioning``
  give ``Partitioned`` / ``LogicallyPartitioned``) are looked through.
  """
  scope = module.scope
  if scope is None or not scope.has_variable("params", name):
    return None
  v = ops.unbox(scope.get_variable("params", name))
  if types.is_compressed(v):
    return v
  return None


def _dense_param(module, name: str):
  """``params/<name>`` of ``module`` unboxed (materialised if compressed), or None."""
  scope = module.scope
  if scope is None or not scope.has_variable("params", name):
    return None
  v = ops.unbox(scope.get_variable("params", name))
  return v.materialize() if types.is_compressed(v) else v


# --------------------------------------------------------------------------------------
# Fast paths. Each returns the layer's output, or _FALLBACK to run the layer itself.
# --------------------------------------------------------------------------------------

_FALLBACK = object()


def _default_promote(module) -> bool:
  return getattr(module, "promote_dtype", flax_dtypes.promote_dtype) is flax_dtypes.promote_dtype


def _plain_dot(module) -> bool:
  return (getattr(module, "dot_general", None) is None
          and getattr(module, "dot_general_cls", None) is None and _default_promote(module))


def _bias(module):
  return _dense_param(module, "bias") if module.use_bias else None


def _dense(module: nn.Dense, inputs):
  w = _raw_param(module, "kernel")
  if w is None or not _plain_dot(module) or len(w.shape) != 2:
    return _FALLBACK
  return ops.dense(inputs, w, _bias(module), dtype=module.dtype, precision=module.precision)


def _normalize_axes(axes, ndim):
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


def _dense_general(module: nn.DenseGeneral, inputs):
  w = _raw_param(module, "kernel")
  if w is None or module.batch_dims or not _plain_dot(module):
    return _FALLBACK
  x = jnp.asarray(inputs)
  axis = _normalize_axes(module.axis, x.ndim)
  features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
  w2 = ops.matrix_view(w, len(axis))
  if w2 is None:
    return _FALLBACK
  bias = _bias(module)
  nb = x.ndim - len(axis)
  xt = jnp.moveaxis(x, axis, tuple(range(nb, x.ndim)))
  y = ops.dense(xt.reshape(xt.shape[:nb] + (w2.shape[0],)), w2, None,
                dtype=ops.result_dtype(module.dtype, x, w, bias), precision=module.precision)
  y = y.reshape(xt.shape[:nb] + features)
  if bias is not None:
    y = ops.add_bias(y, bias, (1,) * nb + features)
  return y


def _einsum(module: nn.Einsum, inputs, einsum_str=None):
  w = _raw_param(module, "kernel")
  if w is None or not _default_promote(module) or module.preferred_element_type is not None:
    return _FALLBACK
  x = jnp.asarray(inputs)
  spec = nn.module.merge_param("einsum_str", module.einsum_str, einsum_str).replace(" ", "")
  if ops.einsum_plan(spec, x.shape, w.shape) is None:
    return _FALLBACK  # the layer runs itself (and raises its own errors)
  bias = _bias(module)
  dtype = ops.result_dtype(module.dtype, x, w, bias)
  y = ops.einsum(spec, x.astype(dtype), ops.cast(w, dtype), precision=module.precision)
  if y is None:
    return _FALLBACK
  if bias is not None:
    _, bshape = module._get_bias_shape(spec, x, jax.ShapeDtypeStruct(w.shape, w.dtype))  # pylint: disable=protected-access
    y = ops.add_bias(y, bias, tuple(bshape))
  return y


def _conv(module: nn.Conv, inputs):
  w = _raw_param(module, "kernel")
  if (w is None or module.feature_group_count != 1 or module.mask is not None
      or not module.shared_weights or module.conv_general_dilated is not None
      or module.conv_general_dilated_cls is not None or not _default_promote(module)
      or not isinstance(module.kernel_size, (tuple, list)) or len(w.shape) != len(module.kernel_size) + 2):
    return _FALLBACK
  return ops.conv_layer(inputs, w, _bias(module), strides=module.strides, padding=module.padding,
                        input_dilation=module.input_dilation,
                        kernel_dilation=module.kernel_dilation, dtype=module.dtype,
                        precision=module.precision)


def _embed(module: nn.Embed, inputs):
  w = _raw_param(module, "embedding")
  if w is None or not _default_promote(module) or len(w.shape) != 2:
    return _FALLBACK
  return ops.embed(w, inputs, dtype=module.dtype, num_embeddings=module.num_embeddings)


def _embed_setup(module: nn.Embed):
  # Embed.setup reads the whole table into ``self.embedding``; with a compressed table
  # that would decode every row, so it is skipped and __call__ / attend read the table
  # themselves (``module.embedding`` is then not set).
  if _raw_param(module, "embedding") is None:
    return _FALLBACK
  return None


def _embed_attend(module: nn.Embed, query):
  w = _raw_param(module, "embedding")
  if w is None or not _default_promote(module):
    return _FALLBACK
  return ops.attend(w, query, dtype=module.dtype)


def _unwrapped(method):
  return getattr(method, "__wrapped__", method)


# Keyed by the function flax is about to run (not by the module's class), so subclasses
# of these layers, and their ``super().__call__``, take the fast path too.
_FAST_PATHS = {
    _unwrapped(nn.Dense.__call__): _dense,
    _unwrapped(nn.DenseGeneral.__call__): _dense_general,
    _unwrapped(nn.Einsum.__call__): _einsum,
    _unwrapped(nn.Conv.__call__): _conv,
    _unwrapped(nn.Embed.__call__): _embed,
    _unwrapped(nn.Embed.setup): _embed_setup,
    _unwrapped(nn.Embed.attend): _embed_attend,
}


def _interceptor(next_fun, args, kwargs, context):
  fn = getattr(context.orig_method, "func", None)
  fast = _FAST_PATHS.get(fn)
  if fast is not None:
    out = fast(context.module, *args, **kwargs)
    if out is not _FALLBACK:
      return out
  return next_fun(*args, **kwargs)


def apply(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a linen ``model.apply`` so that it accepts compressed parameters.

  The returned function has the signature of ``apply_fn``. Its ``variables`` may hold
  `SharedArray` / `HashedArray` leaves in any collection, bare or inside flax
  metadata boxes (``nn.with_logical_partitioning``). ``nn.Dense``,
  ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` and ``nn.Embed`` and their subclasses
  run on the compressed weight (the `qws_jax.kernels` entry points; im2col for
  convolutions; row gathers for embeddings); every other use of a compressed leaf
  (custom layers, ``Embed.attend``, grouped convolutions) materialises that one leaf
  where the module reads it. The dense tree is never built. Outputs equal ``apply_fn(unshare(variables), ...)`` up to
  float rounding, under ``jax.jit`` and ``jax.grad`` (take gradients with
  ``allow_int=True``: the uint8 indices get ``float0`` cotangents; see
  `qws_jax.codebook_optimizer`).

  Variables returned by ``mutable=...`` hold the compressed leaves as they came in.
  Lifted transforms that slice parameters (``nn.scan`` / ``nn.vmap`` over params)
  are not supported on compressed leaves.

  Args:
    apply_fn: ``model.apply`` of a linen module (or any function whose first argument
      is the variables dict it passes to a linen ``apply``).

  Returns:
    A function with the same signature as ``apply_fn``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, qws_jax
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> params_c = qws_jax.unshare(params)  # any tree; compressed leaves allowed
    >>> qws_jax.apply(model.apply)({"params": params_c}, x).shape
    (2, 4)
  """
  if not callable(apply_fn):
    raise TypeError(f"qws_jax.apply expects a callable (model.apply), got {type(apply_fn).__name__}")

  @functools.wraps(apply_fn)
  def wrapped(variables, *args, **kwargs):
    with nn.intercept_methods(_interceptor):
      out = apply_fn(_box(variables), *args, **kwargs)
    return _unbox_raw(out)

  return wrapped
