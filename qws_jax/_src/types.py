"""Compressed leaves: `SharedArray` (codebook + indices) and `HashedArray` (buckets).

Both are immutable pytree nodes: arrays are children, everything else is static
metadata, so ``jit``, ``vmap``, ``grad``, optax and Orbax see them without special cases.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import hashing
from qws_jax._src import packing

LAYOUTS = ("tensor", "channel", "group")


def bits_for(k: int) -> int:
  """Bits per index for a codebook of ``k`` entries: ``max(1, ceil(log2 k))``."""
  return max(1, math.ceil(math.log2(k)))


def _nbytes(a) -> int:
  return int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize


def index_shape(shape: tuple[int, ...], vector_dim: int) -> tuple[int, ...]:
  """Logical shape of the (unpacked) index array: the last axis is split in vectors."""
  return tuple(shape[:-1]) + (shape[-1] // vector_dim,)


def matmul_view(ishape: tuple[int, ...]) -> tuple[int, int]:
  """``(R, C)``: rows = all axes but the last, columns = the last (``(n, 1)`` for 1-D)."""
  if len(ishape) == 1:
    return ishape[0], 1
  return int(np.prod(ishape[:-1], dtype=np.int64)), ishape[-1]


def grid_shape(shape: tuple[int, ...], axis: int | None, group_size: int | None,
               vector_dim: int = 1) -> tuple[int, ...]:
  """Shape of the codebook grid (codebook shape without the trailing ``k`` [, d])."""
  ishape = index_shape(shape, vector_dim)
  if group_size is not None:
    r, c = matmul_view(ishape)
    return (-(-r // group_size), c)
  if axis is not None:
    return (ishape[axis],)
  return ()


def group_ids(shape: tuple[int, ...], axis: int | None, group_size: int | None,
              vector_dim: int = 1) -> jax.Array | None:
  """int32 array broadcastable to the index shape: the codebook row of each index.

  ``None`` for a per-tensor codebook.
  """
  ishape = index_shape(shape, vector_dim)
  nd = len(ishape)
  if group_size is not None:
    r, c = matmul_view(ishape)
    rows = jnp.arange(r, dtype=jnp.int32) // group_size
    if nd == 1:
      return rows
    gid = rows[:, None] * c + jnp.arange(c, dtype=jnp.int32)[None, :]
    return gid.reshape(ishape)
  if axis is not None:
    ids = jnp.arange(ishape[axis], dtype=jnp.int32)
    return ids.reshape([ishape[axis] if a == axis else 1 for a in range(nd)])
  return None


class _Compressed:
  """Shared protocol of compressed leaves (subclasses define shape and nbytes)."""

  shape: tuple[int, ...]
  nbytes: int

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def bits_per_weight(self) -> float:
    """Storage bits per logical weight (codebook / bucket storage included)."""
    return 8.0 * self.nbytes / max(self.size, 1)


@dataclasses.dataclass(frozen=True)
class SharedArray(_Compressed):
  """A weight tensor stored as codebook indices plus a codebook (weight sharing).

  Children (arrays):
    indices: uint8, the packed indices: shape ``shape[:-1] + (packed,)`` where the
      last axis holds ``shape[-1] // vector_dim`` indices of ``bits`` bits packed as in
      `qws_jax._src.packing` (little-endian bit stream along the last axis).
    codebook: ``grid + (k,)`` for scalar codebooks or ``grid + (k, vector_dim)`` for
      vector codebooks, in the logical ``dtype``. ``grid`` is ``()`` per tensor,
      ``(shape[axis],)`` per channel, ``(ceil(R / group_size), C)`` per group, where
      ``(R, C)`` is the matmul view (all leading axes flattened, last axis).

  Static metadata: ``shape``, ``dtype``, ``bits``, ``axis`` (channel axis, non-negative
  or None), ``group_size`` (or None), ``vector_dim`` (1 for scalar codebooks).

  Invariants (checked by `validate_shared_array`): every index is ``< k``;
  ``bits == max(1, ceil(log2 k))``; a scalar codebook is sorted ascending along its
  last axis; at most one of ``axis`` and ``group_size`` is set.
  """

  indices: jax.Array
  codebook: jax.Array
  shape: tuple[int, ...]
  dtype: Any
  bits: int
  axis: int | None = None
  group_size: int | None = None
  vector_dim: int = 1

  @property
  def k(self) -> int:
    return self.codebook.shape[-1] if self.vector_dim == 1 else self.codebook.shape[-2]

  @property
  def layout(self) -> str:
    if self.group_size is not None:
      return "group"
    return "channel" if self.axis is not None else "tensor"

  @property
  def nbytes(self) -> int:
    """Bytes really stored: packed indices plus codebook."""
    return _nbytes(self.indices) + _nbytes(self.codebook)

  def unpacked_indices(self) -> jax.Array:
    """uint8 indices in the index shape ``shape[:-1] + (shape[-1] // vector_dim,)``."""
    ishape = index_shape(self.shape, self.vector_dim)
    return packing.unpack(self.indices, self.bits, ishape[-1])

  def materialize(self) -> jax.Array:
    """The dense weight, ``shape`` and ``dtype``."""
    idx = self.unpacked_indices().astype(jnp.int32)
    k, d = self.k, self.vector_dim
    gid = group_ids(self.shape, self.axis, self.group_size, d)
    flat = idx if gid is None else gid * k + idx
    table = self.codebook.reshape(-1) if d == 1 else self.codebook.reshape(-1, d)
    return jnp.take(table, flat, axis=0).reshape(self.shape).astype(self.dtype)

  def __repr__(self):
    return (f"SharedArray(shape={self.shape}, dtype={np.dtype(self.dtype).name}, k={self.k},"
            f" bits={self.bits}, layout={self.layout!r}"
            + (f", axis={self.axis}" if self.axis is not None else "")
            + (f", group_size={self.group_size}" if self.group_size is not None else "")
            + (f", vector_dim={self.vector_dim}" if self.vector_dim != 1 else "") + ")")


jax.tree_util.register_dataclass(
    SharedArray, data_fields=["indices", "codebook"],
    meta_fields=["shape", "dtype", "bits", "axis", "group_size", "vector_dim"])


@dataclasses.dataclass(frozen=True)
class HashedArray(_Compressed):
  """A virtual weight tensor whose values live in ``B`` hashed buckets (HashedNets).

  ``V.flat[f] = sign(f) * buckets[bucket(f)]`` with the coordinate hash of
  `qws_jax._src.hashing` (version ``version``) seeded by ``seed`` (the per-leaf seed).

  Children: ``buckets`` ``(B,)`` in ``dtype``.
  Static metadata: ``shape``, ``dtype``, ``seed`` (uint32 int), ``signed``, ``version``.
  """

  buckets: jax.Array
  shape: tuple[int, ...]
  dtype: Any
  seed: int
  signed: bool = True
  version: int = hashing.HASH_VERSION

  @property
  def num_buckets(self) -> int:
    return self.buckets.shape[0]

  @property
  def nbytes(self) -> int:
    return _nbytes(self.buckets)

  def bucket_and_sign(self) -> tuple[jax.Array, jax.Array]:
    """int32 bucket index and int8 sign of every element, in ``shape``."""
    if self.version not in hashing.SUPPORTED_HASH_VERSIONS:
      raise ValueError(f"unknown hash version {self.version}; this qws_jax knows"
                       f" {hashing.SUPPORTED_HASH_VERSIONS}")
    f = jnp.arange(self.size, dtype=jnp.uint32).reshape(self.shape)
    return hashing.bucket_and_sign(f, self.seed, self.num_buckets, self.signed)

  def materialize(self) -> jax.Array:
    b, s = self.bucket_and_sign()
    return (jnp.take(self.buckets, b, axis=0) * s.astype(self.buckets.dtype)).astype(self.dtype)

  def __repr__(self):
    return (f"HashedArray(shape={self.shape}, dtype={np.dtype(self.dtype).name},"
            f" buckets={self.num_buckets}, seed={self.seed}, signed={self.signed},"
            f" version={self.version})")


jax.tree_util.register_dataclass(
    HashedArray, data_fields=["buckets"],
    meta_fields=["shape", "dtype", "seed", "signed", "version"])


def is_compressed(x) -> bool:
  return isinstance(x, (SharedArray, HashedArray))


def _concrete(x) -> bool:
  return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


def validate_shared_array(x: SharedArray, path: str = "", *, check_values: bool = True) -> None:
  """Checks the invariants of a `SharedArray`; raises ValueError/TypeError naming ``path``.

  Value checks (indices < k, sorted codebook) run only on concrete arrays and when
  ``check_values``.
  """
  where = f" at {path!r}" if path else ""
  if not isinstance(x, SharedArray):
    raise TypeError(f"expected a SharedArray{where}, got {type(x).__name__}")
  if x.vector_dim < 1 or x.shape[-1] % x.vector_dim:
    raise ValueError(f"vector_dim={x.vector_dim} must divide the last axis of shape={x.shape}{where}")
  if x.axis is not None and x.group_size is not None:
    raise ValueError(f"at most one of axis and group_size may be set{where}")
  if x.axis is not None and not 0 <= x.axis < len(x.shape):
    raise ValueError(f"axis={x.axis} out of range for shape={x.shape}{where}")
  if np.dtype(x.indices.dtype) != np.uint8:
    raise TypeError(f"indices must be uint8, got {x.indices.dtype}{where}")
  k = x.k
  if not 2 <= k <= 256 or x.bits != bits_for(k):
    raise ValueError(f"codebook size k={k} needs bits={bits_for(k)} (k in [2, 256]), got bits={x.bits}{where}")
  ishape = index_shape(x.shape, x.vector_dim)
  want_idx = ishape[:-1] + (packing.packed_length(ishape[-1], x.bits),)
  if tuple(x.indices.shape) != want_idx:
    raise ValueError(f"indices shape {tuple(x.indices.shape)} != expected {want_idx}{where}")
  want_cb = grid_shape(x.shape, x.axis, x.group_size, x.vector_dim) + (k,) + (
      (x.vector_dim,) if x.vector_dim > 1 else ())
  if tuple(x.codebook.shape) != want_cb:
    raise ValueError(f"codebook shape {tuple(x.codebook.shape)} != expected {want_cb}{where}")
  if np.dtype(x.codebook.dtype) != np.dtype(x.dtype):
    raise TypeError(f"codebook dtype {x.codebook.dtype} != leaf dtype {x.dtype}{where}")
  if check_values and _concrete(x.indices) and _concrete(x.codebook):
    idx = np.asarray(x.unpacked_indices())
    if idx.size and int(idx.max()) >= k:
      raise ValueError(f"index {int(idx.max())} >= k={k}{where}")
    if x.vector_dim == 1:
      cb = np.asarray(x.codebook.astype(jnp.float32))
      if not np.all(np.isfinite(cb)):
        raise ValueError(f"codebook has NaN/Inf values{where}")
      if np.any(np.diff(cb, axis=-1) < 0):
        raise ValueError(f"codebook is not sorted ascending{where}")


def validate_hashed_array(x: HashedArray, path: str = "") -> None:
  """Checks the invariants of a `HashedArray`; raises ValueError/TypeError naming ``path``."""
  where = f" at {path!r}" if path else ""
  if not isinstance(x, HashedArray):
    raise TypeError(f"expected a HashedArray{where}, got {type(x).__name__}")
  if x.version not in hashing.SUPPORTED_HASH_VERSIONS:
    raise ValueError(f"unknown hash version {x.version}{where}; supported:"
                     f" {hashing.SUPPORTED_HASH_VERSIONS}")
  hashing.check_seed(x.seed, f"seed{where}")
  if x.buckets.ndim != 1 or not 1 <= x.buckets.shape[0] <= max(x.size, 1):
    raise ValueError(f"buckets must be 1-D with 1 <= B <= {x.size} (the virtual size),"
                     f" got shape {tuple(x.buckets.shape)}{where}")
  if x.size >= 2**32:
    raise ValueError(f"virtual size {x.size} does not fit the uint32 hash{where}")
  if np.dtype(x.buckets.dtype) != np.dtype(x.dtype):
    raise TypeError(f"buckets dtype {x.buckets.dtype} != leaf dtype {x.dtype}{where}")
