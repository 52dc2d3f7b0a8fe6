"""Entry points and custom VJPs: `shared_matmul` and `hashed_matmul`.

Each entry point validates its inputs, resolves ``impl`` to a backend
(`qws_jax.kernels._common.resolve_impl`, one vocabulary for both), builds the static
spec (`_decode.SharedSpec` / `_decode.HashedSpec`) and runs the backend's forward under
a ``jax.custom_vjp``:

* forward: `xla`, `triton` (also ``impl="interpret"``) or `mosaic` (shared only);
* backward: ``dx = g @ w.T`` by the transposed Triton kernel for the Triton backends,
  else by the blocked XLA loop; the codebook / bucket gradient (a scatter-add) by the
  XLA loop on every backend. Indices and group scales get no gradient (a zero
  cotangent): the library trains codebooks only (`qws_jax.codebook_optimizer`);
  differentiate `qws_jax.kernels.reference.shared_matmul_reference` for scale gradients.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qws_jax._src import hashing
from qws_jax._src import parts
from qws_jax._src import sharding as sharding_lib
from qws_jax._src.types import HashedArray
from qws_jax._src.types import SharedArray
from qws_jax.kernels import _common
from qws_jax.kernels import _decode
from qws_jax.kernels import mosaic
from qws_jax.kernels import reference
from qws_jax.kernels import triton
from qws_jax.kernels import xla
from qws_jax.kernels._common import BlockSizes
from qws_jax.kernels._decode import HashedSpec
from qws_jax.kernels._decode import SharedSpec

_TRITON = ("triton", "interpret")
_MOSAIC = ("mosaic", "mosaic_interpret")


# ----------------------------------------------------------------------------- shared


def pallas_unsupported(w: SharedArray, kernel: str) -> str | None:
  """Why the Pallas ``kernel`` (``"triton"`` or ``"mosaic"``) cannot run ``w`` (None if it can)."""
  if kernel == "mosaic":
    return mosaic.shared_unsupported(w)
  return triton.shared_unsupported(w)


def _shared_forward(x2, indices, codebook, scales, spec: SharedSpec):
  if spec.impl == "xla":
    return xla.shared_forward(x2, indices, codebook, scales, spec)
  if spec.impl in _MOSAIC:
    return mosaic.shared_forward(x2, indices, codebook, spec,
                                 interpret=spec.impl == "mosaic_interpret")
  return triton.shared_forward(x2, indices, codebook, scales, spec,
                               interpret=spec.impl == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _shared_mm(x2, indices, codebook, scales, spec: SharedSpec):
  return _shared_forward(x2, indices, codebook, scales, spec)


def _shared_mm_fwd(x2, indices, codebook, scales, spec: SharedSpec):
  return _shared_forward(x2, indices, codebook, scales, spec), (x2, indices, codebook, scales)


def _shared_mm_bwd(spec: SharedSpec, res, g):
  x2, indices, codebook, scales = res
  if spec.impl in _TRITON:
    _, dcb = xla.shared_backward(x2, indices, codebook, scales, g, spec, with_dx=False)
    dx = triton.shared_dx(g, indices, codebook, scales, spec, interpret=spec.impl == "interpret")
  else:
    dx, dcb = xla.shared_backward(x2, indices, codebook, scales, g, spec)
  return dx, None, dcb, None  # indices and scales: zero cotangents


_shared_mm.defvjp(_shared_mm_fwd, _shared_mm_bwd)


def _run(x, w: SharedArray, impl: str, block_sizes: BlockSizes) -> jax.Array:
  """Runs backend ``impl`` (`qws_jax.kernels._common.BACKENDS`) on a leaf without outliers."""
  K, N = w.shape
  if w.vector_dim != 1:
    return reference.shared_matmul_reference(x, w)
  if impl in _MOSAIC and mosaic.shared_unsupported(w):
    raise NotImplementedError(f"impl={impl!r}: {mosaic.shared_unsupported(w)}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, K)
  if x2.shape[0] == 0:
    return jnp.zeros(lead + (N,), x.dtype)
  spec = SharedSpec(K=K, N=N, bits=w.bits, k=w.k, gid=_decode.gid_kind(w),
                    group_size=w.group_size, scale_group_size=w.scale_group_size,
                    dtype=jnp.dtype(w.dtype), impl=impl,
                    bs=block_sizes.clamp(x2.shape[0], K, N))
  y = _shared_mm(x2, w.indices, w.codebook, w.scales, spec)
  return y.reshape(lead + (N,))


def shared_matmul(x: jax.typing.ArrayLike, w: SharedArray, *, impl: str | None = None,
                  block_sizes: BlockSizes | None = None) -> jax.Array:
  """``x @ w.materialize()`` reading only the packed indices, the codebook and the scales.

  Args:
    x: activations ``(..., K)``, f32 or bf16 (any floating dtype); leading axes are
      batch axes.
    w: a 2-D `qws_jax.SharedArray` of logical shape ``(K, N)``: per-tensor, per-channel
      (``axis`` 0 or 1) or per-group codebook, any bit width, scalar or vector codebook,
      with or without group ``scales`` (decoded inside the kernels) and outliers (a
      sparse correction added to the kernel's product).
    impl: ``None`` (by backend), ``"pallas"``, ``"xla"`` or ``"interpret"``: the
      vocabulary of `qws_jax.kernels`.
    block_sizes: tile sizes (default `BlockSizes()`), clamped to the problem.

  Returns:
    ``(..., N)`` in ``x.dtype``: the weight is cast to ``x.dtype`` and products are
    accumulated in f32. Differentiable in ``x`` and ``w.codebook`` (custom VJP);
    ``w.indices`` and ``w.scales`` get zero cotangents.

  Raises:
    TypeError: ``w`` is not a SharedArray, or ``x`` is not floating.
    ValueError: ``w`` is not 2-D, ``x``'s last axis is not ``K``, or ``impl`` is unknown.
    NotImplementedError: ``impl="pallas"``/``"interpret"`` for a weight the kernel does
      not handle (vector codebooks, bit widths other than 1, 2, 4, 8; on TPU also
      per-channel ``axis=1`` and per-group codebooks, and group scales).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from qws_jax import SharedArray
    >>> from qws_jax._src import packing
    >>> idx = np.arange(12).reshape(3, 4) % 4
    >>> w = SharedArray(packing.pack(idx, 2), jnp.array([-1., 0., 1., 2.]), (3, 4),
    ...                 jnp.float32, 2)
    >>> shared_matmul(jnp.ones((1, 3)), w)
    Array([[-3.,  0.,  3.,  6.]], dtype=float32)
  """
  if not isinstance(w, SharedArray):
    raise TypeError(f"w must be a qws_jax.SharedArray, got {type(w).__name__}")
  if w.ndim != 2:
    raise ValueError(f"shared_matmul needs a 2-D weight (K, N), got w.shape={w.shape}")
  block_sizes = _common.block_sizes_or_default(block_sizes)
  K, _ = w.shape
  x = _common.check_x(x, K, f"w.shape={w.shape}")
  backend = _common.resolve_impl(impl, functools.partial(pallas_unsupported, w))

  def local(xl, wl):
    # Outliers (dense-and-sparse): the kernel, then the sparse correction; a codebook
    # in another dtype is cast first (`parts.matmul`).
    return parts.matmul(xl, wl, lambda a, b: _run(a, b, backend, block_sizes))

  # Weights sharded over Explicit mesh axes: block by block under shard_map (each block
  # with its codebook, scales and the outliers that fall inside it).
  y = sharding_lib.tensor_parallel_matmul(x, w, local)
  if y is not None:
    return y
  return local(x, w)


# ----------------------------------------------------------------------------- hashed


def _hashed_forward(x2, buckets, spec: HashedSpec):
  if spec.impl == "xla":
    return xla.hashed_forward(x2, buckets, spec)
  return triton.hashed_forward(x2, buckets, spec, interpret=spec.impl == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _hashed_mm(x2, buckets, spec: HashedSpec):
  return _hashed_forward(x2, buckets, spec)


def _hashed_mm_fwd(x2, buckets, spec: HashedSpec):
  return _hashed_forward(x2, buckets, spec), (x2, buckets)


def _hashed_mm_bwd(spec: HashedSpec, res, g):
  x2, buckets = res
  if spec.impl in _TRITON:
    _, db = xla.hashed_backward(x2, buckets, g, spec, with_dx=False)
    return triton.hashed_dx(g, buckets, spec, interpret=spec.impl == "interpret"), db
  return xla.hashed_backward(x2, buckets, g, spec)


_hashed_mm.defvjp(_hashed_mm_fwd, _hashed_mm_bwd)


def _hashed_unsupported(kernel: str) -> str | None:
  return mosaic.HASHED_UNSUPPORTED if kernel == "mosaic" else None


def hashed_matmul(x: jax.typing.ArrayLike, w: HashedArray, *, impl: str | None = None,
                  block_sizes: BlockSizes | None = None) -> jax.Array:
  """``x @ w.materialize()`` hashing the coordinates on the fly, reading only the buckets.

  Args:
    x: activations ``(..., K)``, f32 or bf16 (any floating dtype); leading axes are
      batch axes.
    w: a 2-D `qws_jax.HashedArray` of logical shape ``(K, N)``.
    impl: ``None`` (by backend), ``"pallas"``, ``"xla"`` or ``"interpret"``: the
      vocabulary of `qws_jax.kernels`.
    block_sizes: tile sizes (default `BlockSizes()`), clamped to the problem.

  Returns:
    ``(..., N)`` in ``x.dtype``; products are accumulated in f32. Differentiable in
    ``x`` and ``w.buckets`` (custom VJP).

  Raises:
    TypeError: ``w`` is not a HashedArray, or ``x`` is not floating.
    ValueError: ``w`` is not 2-D, has an unknown hash version, ``x``'s last axis is not
      ``K``, or ``impl`` is unknown.
    NotImplementedError: ``impl="pallas"`` on a TPU backend (no Mosaic kernel).

  Example:
    >>> import jax.numpy as jnp
    >>> from qws_jax import HashedArray
    >>> w = HashedArray(jnp.array([0.5, -1.0, 2.0]), (4, 3), jnp.float32, seed=7)
    >>> x = jnp.ones((2, 4))
    >>> bool(jnp.allclose(hashed_matmul(x, w), x @ w.materialize()))
    True
  """
  if not isinstance(w, HashedArray):
    raise TypeError(f"w must be a qws_jax.HashedArray, got {type(w).__name__}")
  if w.ndim != 2:
    raise ValueError(f"hashed_matmul needs a 2-D weight (K, N), got w.shape={w.shape}")
  if w.version not in hashing.SUPPORTED_HASH_VERSIONS:
    raise ValueError(f"unknown hash version {w.version}; this qws_jax knows"
                     f" {hashing.SUPPORTED_HASH_VERSIONS}")
  if w.size >= 2**32:
    raise ValueError(f"virtual size {w.size} of w.shape={w.shape} does not fit the uint32 hash")
  block_sizes = _common.block_sizes_or_default(block_sizes)
  K, N = w.shape
  x = _common.check_x(x, K, f"w.shape={w.shape}")
  backend = _common.resolve_impl(impl, _hashed_unsupported)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, K)
  if x2.shape[0] == 0:
    return jnp.zeros(lead + (N,), x.dtype)
  spec = HashedSpec(K=K, N=N, num_buckets=w.num_buckets, seed=hashing.check_seed(w.seed),
                    signed=bool(w.signed), impl=backend,
                    bs=block_sizes.clamp(x2.shape[0], K, N))
  y = _hashed_mm(x2, w.buckets, spec)
  return y.reshape(lead + (N,))
