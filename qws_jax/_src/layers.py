"""Flax layers with hashed kernels: linen `HashedDense`, `HashedConv`; NNX `HashedLinear`.

The linen layers store their kernel as a `qws_jax.HashedArray` parameter named
``kernel`` (child ``buckets`` ``(B,)``) beside an ordinary dense ``bias``, so
``qws_jax.unshare`` turns their parameters into those of ``nn.Dense`` / ``nn.Conv`` and
every tree utility of the library (reports, checkpoints, optax) sees a hashed leaf.
`HashedLinear` keeps its ``buckets`` as an ``nnx.Param`` and builds the `HashedArray`
when called.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import hash_share as hs
from qws_jax._src import hashing
from qws_jax._src import ops
from qws_jax._src import types

Initializer = Callable[..., jax.Array]


def hashed_matmul(x: jax.Array, kernel: types.HashedArray, precision=None) -> jax.Array:
  """``x @ V`` for a hashed ``(K, N)`` kernel; ``x`` is ``(..., K)``, result ``(..., N)``.

  `qws_jax._src.ops.matmul`, the switch every integration uses: with the default
  ``precision=None`` it calls `qws_jax.kernels.hashed_matmul` (hashes tiles on the fly,
  Pallas on GPU, blocked XLA on CPU, custom VJP); an explicit ``precision`` takes the
  reference path: materialise ``V`` (``K * N`` gathers) and one dense ``jnp.matmul``.
  """
  return ops.matmul(x, kernel, precision=precision)


def _make_kernel(key: jax.Array, shape: tuple[int, int], num_buckets: int, leaf_seed: int,
                 signed: bool, dtype: Any, bucket_init: Initializer | None) -> types.HashedArray:
  dtype = np.dtype(dtype)
  if bucket_init is None:
    vals = hs.fan_in_buckets(key, num_buckets, shape, dtype)
  else:
    vals = jnp.asarray(bucket_init(key, (num_buckets,), dtype), dtype)
  return types.HashedArray(buckets=vals, shape=shape, dtype=dtype, seed=leaf_seed,
                           signed=signed)


def _check_kernel(kernel, in_features: int, features: int, where: str) -> types.HashedArray:
  if not isinstance(kernel, types.HashedArray):
    raise TypeError(f"{where}: kernel must be a HashedArray, got {type(kernel).__name__}")
  if tuple(kernel.shape) != (in_features, features):
    raise ValueError(f"{where}: kernel virtual shape {kernel.shape} != expected"
                     f" {(in_features, features)}")
  types.validate_hashed_array(kernel, where)
  return kernel


class HashedDense(nn.Module):
  """A linen ``nn.Dense`` whose ``(in, features)`` kernel is hashed into ``B`` buckets.

  The parameter ``kernel`` is a `qws_jax.HashedArray`; its seed is ``leaf_seed(path,
  seed)`` where ``path`` is ``"params/<module path>/kernel"``, so layers of one model
  hash differently even with the same ``seed``. By default the buckets are drawn so
  the virtual kernel has ``nn.Dense``'s default ``lecun_normal`` variance
  (``1 / in_features``). The matmul goes through `hashed_matmul`.

  Attributes:
    features: output size.
    use_bias: add a dense bias.
    compression: ``B = max(1, round(compression * in * features))``; ignored when
      ``buckets`` is set.
    buckets: a fixed bucket count ``B`` in ``[1, in * features]``.
    seed: user hash seed in ``[0, 2**32)``.
    signed: use the sign hash.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of buckets and bias.
    precision: matmul precision.
    bucket_init: optional ``init(key, (B,), dtype)`` for the buckets instead of the
      ``lecun_normal``-matching default (it sees the bucket vector, not the kernel).
    bias_init: bias initialiser.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import qws_jax.linen
    >>> layer = qws_jax.linen.HashedDense(16, compression=1/4)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 32)))
    >>> variables["params"]["kernel"].num_buckets
    128
    >>> layer.apply(variables, jnp.ones((2, 32))).shape
    (2, 16)
  """

  features: int
  use_bias: bool = True
  compression: float | None = 1 / 8
  buckets: int | None = None
  seed: int = 0
  signed: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  bucket_init: Initializer | None = None
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    k = int(jnp.shape(inputs)[-1])
    shape = (k, int(self.features))
    path = "/".join(("params",) + tuple(str(p) for p in self.scope.path) + ("kernel",))
    where = f"HashedDense at {path!r}"

    def init_kernel(key):
      b = hs.num_buckets_for(k * self.features, self.compression, self.buckets, path)
      sd = hashing.leaf_seed(path, hashing.check_seed(self.seed, f"seed of {where}"))
      return _make_kernel(key, shape, b, sd, self.signed, self.param_dtype, self.bucket_init)

    kernel = _check_kernel(self.param("kernel", init_kernel), k, self.features, where)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return ops.dense(inputs, kernel, bias, dtype=self.dtype, precision=self.precision)


class HashedConv(nn.Conv):
  """A linen ``nn.Conv`` whose kernel ``(*kernel_size, C_in // groups, features)`` is hashed.

  Every ``nn.Conv`` option (strides, padding, dilation, ``feature_group_count``, mask,
  ...) works unchanged: the layer stores its ``kernel`` parameter as a
  `qws_jax.HashedArray`. With ``feature_group_count=1`` and no mask the convolution
  runs by im2col through the hashed matmul kernel (the kernel is hashed tile by tile);
  other configurations hand ``nn.Conv`` the materialised kernel. ``kernel_init`` is ignored; the default
  buckets give the virtual kernel ``lecun_normal`` variance ``1 / fan_in``, ``fan_in =
  prod(kernel_size) * C_in // groups``. ``qws_jax.unshare(variables)`` are valid ``nn.Conv``
  variables. The leaf seed is ``leaf_seed("params/<module path>/kernel", seed)``.

  Attributes (besides those of ``nn.Conv``):
    compression: ``B = max(1, round(compression * kernel size))``; ignored when
      ``buckets`` is set.
    buckets: a fixed bucket count in ``[1, kernel size]``.
    seed: user hash seed in ``[0, 2**32)``.
    signed: use the sign hash.
    bucket_init: optional ``init(key, (B,), dtype)`` for the buckets.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import qws_jax.linen
    >>> conv = qws_jax.linen.HashedConv(8, (3, 3), compression=1/4)
    >>> variables = conv.init(jax.random.key(0), jnp.ones((1, 6, 6, 4)))
    >>> variables["params"]["kernel"].shape, variables["params"]["kernel"].num_buckets
    ((3, 3, 4, 8), 72)
  """

  compression: float | None = 1 / 8
  buckets: int | None = None
  seed: int = 0
  signed: bool = True
  bucket_init: Initializer | None = None

  def _hashed_kernel(self, shape, dtype) -> types.HashedArray:
    """The ``kernel`` parameter: created hashed, checked, returned as a `HashedArray`."""
    shape = tuple(int(d) for d in shape)
    path = "/".join(("params",) + tuple(str(p) for p in self.scope.path) + ("kernel",))
    where = f"HashedConv at {path!r}"

    def init_kernel(key):
      b = hs.num_buckets_for(int(np.prod(shape, dtype=np.int64)), self.compression,
                             self.buckets, path)
      sd = hashing.leaf_seed(path, hashing.check_seed(self.seed, f"seed of {where}"))
      return _make_kernel(key, shape, b, sd, self.signed, dtype, self.bucket_init)

    kernel = nn.Module.param(self, "kernel", init_kernel)
    if not isinstance(kernel, types.HashedArray):
      raise TypeError(f"{where}: kernel must be a HashedArray, got {type(kernel).__name__}")
    if tuple(kernel.shape) != shape:
      raise ValueError(f"{where}: kernel virtual shape {kernel.shape} != expected {shape}")
    types.validate_hashed_array(kernel, where)
    return kernel

  def param(self, name: str, init_fn, *init_args, **init_kwargs):
    """``nn.Module.param``, except that ``kernel`` is stored hashed and read materialised
    (used by ``nn.Conv``'s own code for the configurations `__call__` leaves to it)."""
    if name != "kernel":
      return super().param(name, init_fn, *init_args, **init_kwargs)
    return self._hashed_kernel(init_args[0], init_args[1]).materialize()

  def _fast(self) -> bool:
    return (self.feature_group_count == 1 and self.mask is None and self.shared_weights
            and self.conv_general_dilated is None and self.conv_general_dilated_cls is None
            and isinstance(self.kernel_size, (tuple, list)))

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """The convolution; with ``feature_group_count=1`` and no mask it runs by im2col on
    the hashed kernel (`qws_jax._src.ops.conv_layer`: the kernel is hashed tile by tile,
    never materialised), otherwise ``nn.Conv``'s code on the materialised kernel."""
    if not self._fast():
      return super().__call__(inputs)
    return self._fast_call(inputs)

  @nn.compact
  def _fast_call(self, inputs: jax.Array) -> jax.Array:
    shape = tuple(self.kernel_size) + (int(jnp.shape(inputs)[-1]), int(self.features))
    kernel = self._hashed_kernel(shape, self.param_dtype)
    bias = (super().param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return ops.conv_layer(inputs, kernel, bias, strides=self.strides, padding=self.padding,
                          input_dilation=self.input_dilation,
                          kernel_dilation=self.kernel_dilation, dtype=self.dtype,
                          precision=self.precision)


class HashedLinear(nnx.Module):
  """An NNX ``nnx.Linear`` whose ``(in_features, out_features)`` kernel is hashed.

  ``self.buckets`` is an ``nnx.Param`` of shape ``(B,)``, the only trainable values of
  the kernel (its metadata ``hashed_shape``, ``hash_seed``, ``hash_signed``,
  ``hash_version`` describe the hash); ``self.kernel`` returns the kernel as a
  `qws_jax.HashedArray`; ``self.bias`` is an ``nnx.Param`` array or None. (An
  ``nnx.Param`` holding a `HashedArray` pytree does not survive ``nnx.Optimizer``'s
  state round trip in flax 0.12, hence the plain bucket array.) The hash
  seed is ``leaf_seed("kernel", seed)``: give each layer of a model its own ``seed``
  (HashedNets uses a different hash per layer; NNX modules do not know their path when
  they are built). Train with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

  Args:
    in_features: input size ``K``.
    out_features: output size ``N``.
    use_bias: add a dense bias.
    compression: ``B = max(1, round(compression * K * N))``; ignored when ``buckets``
      is set.
    buckets: a fixed bucket count in ``[1, K * N]``.
    seed: user hash seed in ``[0, 2**32)``.
    signed: use the sign hash.
    dtype: computation dtype (default: inferred).
    param_dtype: dtype of buckets and bias.
    precision: matmul precision.
    bucket_init: optional ``init(key, (B,), dtype)``; default: buckets whose virtual
      kernel has ``nnx.Linear``'s ``lecun_normal`` variance ``1 / K``.
    bias_init: bias initialiser.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> import qws_jax.nnx
    >>> layer = qws_jax.nnx.HashedLinear(32, 16, buckets=64, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 32))).shape
    (2, 16)
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               compression: float | None = 1 / 8, buckets: int | None = None,
               seed: int = 0, signed: bool = True, dtype: Any = None,
               param_dtype: Any = jnp.float32, precision: Any = None,
               bucket_init: Initializer | None = None,
               bias_init: Initializer = nnx.initializers.zeros_init(), rngs: nnx.Rngs):
    where = "HashedLinear"
    shape = (int(in_features), int(out_features))
    b = hs.num_buckets_for(shape[0] * shape[1], compression, buckets, where)
    sd = hashing.leaf_seed("kernel", hashing.check_seed(seed, f"seed of {where}"))
    self.in_features, self.out_features = shape
    self.use_bias = use_bias
    self.dtype = dtype
    self.precision = precision
    kernel = _make_kernel(rngs.params(), shape, b, sd, bool(signed), param_dtype, bucket_init)
    self.hash_seed = sd
    self.signed = bool(signed)
    self.buckets = nnx.Param(kernel.buckets, hashed_shape=shape, hash_seed=sd,
                             hash_signed=bool(signed), hash_version=kernel.version)
    self.bias = (nnx.Param(bias_init(rngs.params(), (shape[1],), param_dtype))
                 if use_bias else None)

  @property
  def kernel(self) -> types.HashedArray:
    """The hashed ``(in_features, out_features)`` kernel as a `qws_jax.HashedArray`."""
    buckets = self.buckets.get_value()
    return types.HashedArray(buckets=buckets, shape=(self.in_features, self.out_features),
                             dtype=np.dtype(buckets.dtype), seed=self.hash_seed,
                             signed=self.signed)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    bias = None if self.bias is None else self.bias.get_value()
    return ops.dense(inputs, self.kernel, bias, dtype=self.dtype, precision=self.precision)
