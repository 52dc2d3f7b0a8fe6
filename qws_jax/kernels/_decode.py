"""The index -> weight math every backend shares: static specs, codebook and scale ids, hash.

A kernel never sees a `SharedArray` / `HashedArray`, only its arrays and a static spec
(`SharedSpec`, `HashedSpec`: hashable, so they are the ``nondiff_argnums`` of the custom
VJPs). The functions here turn tile coordinates into codebook / scale / bucket positions
with integer arithmetic only, so the same code runs in the XLA path, inside the Pallas
kernels (which then gather-load from refs) and in the backward passes.

Shared layout (see `qws_jax._src.types.SharedArray`): ``w`` has logical shape
``(K, N)``; its indices are uint8 packed along ``N`` as a little-endian bit stream, so for
``bits`` in `PLANAR_BITS` byte ``c`` of a row holds the ``g = 8 // bits`` indices of
columns ``c*g .. c*g + g-1``, index ``p`` in bits ``[p*bits, (p+1)*bits)``. Every backend
works on *planes*: plane ``p`` is the ``(K, ceil(N/g))`` matrix of the ``p``-th index of
every byte, decoded with one shift and mask, and gives output columns ``p, p+g, ...``.
Other bit widths (*unpack mode*, XLA only) unpack a block of rows to ``(rows, N)``.

The codebook entry of index ``idx`` at ``(row, col)`` is ``codebook.flat[gid * k + idx]``
with ``gid`` = 0 (per tensor), ``col`` (per channel, ``axis=1``), ``row`` (``axis=0``) or
``(row // group_size) * N + col`` (per group along ``K``), as in
`qws_jax._src.types.group_ids`. With group scales the decoded weight is that entry
times ``scales.flat[(row // scale_group_size) * N + col]``, multiplied in f32 and rounded
to the leaf dtype (`apply_scale`), as `SharedArray.materialize` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax

from qws_jax._src import hashing
from qws_jax._src import packing
from qws_jax._src.types import SharedArray
from qws_jax.kernels._common import BlockSizes

PLANAR_BITS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class SharedSpec:
  """Static description of one shared matmul ``(M, K) @ (K, N)``.

  Attributes:
    K, N: the logical weight shape.
    bits: bits per index.
    k: codebook entries per codebook.
    gid: which codebook a weight reads: ``"tensor"``, ``"col"``, ``"row"`` or ``"group"``.
    group_size: rows per codebook group (``gid == "group"``), else None.
    scale_group_size: rows per scale group, or None for a leaf without scales.
    dtype: the leaf dtype (scaled values are rounded to it, as in ``materialize``).
    impl: the backend (`qws_jax.kernels._common.BACKENDS`).
    bs: block sizes, already clamped to the problem.
  """

  K: int
  N: int
  bits: int
  k: int
  gid: str
  group_size: int | None
  scale_group_size: int | None
  dtype: Any
  impl: str
  bs: BlockSizes

  @property
  def planar(self) -> bool:
    return self.bits in PLANAR_BITS

  @property
  def g(self) -> int:
    """Planes per packed byte (1 in unpack mode)."""
    return 8 // self.bits if self.planar else 1

  @property
  def ncols(self) -> int:
    """Columns of one plane."""
    return packing.packed_length(self.N, self.bits) if self.planar else self.N

  @property
  def scaled(self) -> bool:
    return self.scale_group_size is not None


def gid_kind(w: SharedArray) -> str:
  """`SharedSpec.gid` of a leaf."""
  if w.group_size is not None:
    return "group"
  if w.axis is None:
    return "tensor"
  return "col" if w.axis == 1 else "row"


def _clamp(rows, cols, spec: SharedSpec):
  """Padded rows / columns read a valid entry (their x or output is zero / dropped)."""
  return jnp.minimum(rows, spec.K - 1), jnp.minimum(cols, spec.N - 1)


def flat_ids(idx, rows, cols, spec: SharedSpec):
  """Flat codebook position of ``idx`` at ``rows (bk, 1)``, ``cols (1, nc)`` (int32)."""
  rows, cols = _clamp(rows, cols, spec)
  if spec.gid == "tensor":
    return idx
  if spec.gid == "col":
    gid = cols
  elif spec.gid == "row":
    gid = rows
  else:
    gid = (rows // spec.group_size) * spec.N + cols
  return gid * spec.k + idx


def scale_ids(rows, cols, spec: SharedSpec):
  """Flat position in ``scales`` of the weights at ``rows (bk, 1)``, ``cols (1, nc)``."""
  rows, cols = _clamp(rows, cols, spec)
  return (rows // spec.scale_group_size) * spec.N + cols


def plane_ids(pb, row0, spec: SharedSpec, col0=0, *, with_scale_ids: bool = False):
  """Codebook (and scale) ids of each plane of a packed block ``pb (bk, nb)`` at ``row0``.

  ``col0`` is the block's first packed byte column.

  Returns:
    A list of ``g`` pairs ``(cb_ids, s_ids)`` of int32 ``(bk, nb)`` arrays (one pair of
    ``(bk, N)`` arrays in unpack mode); ``s_ids`` is None unless ``with_scale_ids``.
  """
  bk = pb.shape[0]
  rows = row0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)

  def pair(idx, cols):
    s = scale_ids(rows, cols, spec) if with_scale_ids else None
    return flat_ids(idx, rows, cols, spec), s

  if not spec.planar:
    idx = packing.unpack(pb, spec.bits, spec.N).astype(jnp.int32)
    return [pair(idx, lax.broadcasted_iota(jnp.int32, (1, spec.N), 1))]
  g, mask = spec.g, (1 << spec.bits) - 1
  byte = pb.astype(jnp.int32)
  bcols = col0 + lax.broadcasted_iota(jnp.int32, (1, pb.shape[1]), 1)
  return [pair((byte >> (p * spec.bits)) & mask if g > 1 else byte, bcols * g + p)
          for p in range(g)]


def scale_planes(scales, row0, nrows: int, spec: SharedSpec):
  """The scales of rows ``[row0, row0 + nrows)`` as ``g`` f32 planes ``(nrows, ncols)``.

  For the XLA path: one row gather of the ``(ceil(K / scale_group_size), N)`` scales,
  then the strided columns ``p, p+g, ...`` of each plane (``(nrows, N)`` in unpack mode).
  """
  rows = jnp.minimum(row0 + jnp.arange(nrows, dtype=jnp.int32), spec.K - 1)
  s = jnp.take(scales.astype(jnp.float32), rows // spec.scale_group_size, axis=0)
  if spec.g == 1:
    return [s]
  s = jnp.pad(s, ((0, 0), (0, spec.ncols * spec.g - spec.N))).reshape(nrows, spec.ncols, spec.g)
  return [s[:, :, p] for p in range(spec.g)]


def apply_scale(v, s, spec: SharedSpec, dtype):
  """``v * s`` in f32, rounded to the leaf dtype (as ``materialize``), then in ``dtype``."""
  w = v.astype(jnp.float32) * s.astype(jnp.float32)
  return w.astype(spec.dtype).astype(dtype)


def interleave(planes, spec: SharedSpec, m: int):
  """``g`` plane outputs ``(m, ncols)`` -> ``(m, N)``."""
  if len(planes) == 1:
    return planes[0][:, :spec.N]
  return jnp.stack(planes, axis=-1).reshape(m, -1)[:, :spec.N]


# ----------------------------------------------------------------------------- hashed


@dataclasses.dataclass(frozen=True)
class HashedSpec:
  """Static description of one hashed matmul (see `qws_jax._src.hashing`)."""

  K: int
  N: int
  num_buckets: int
  seed: int
  signed: bool
  impl: str
  bs: BlockSizes


def tile_hash(row0, nrows: int, col0, ncols: int, spec: HashedSpec):
  """int32 bucket and int8 sign of the tile ``[row0, row0+nrows) x [col0, col0+ncols)``.

  Calls `qws_jax._src.hashing.bucket_and_sign` (uint32 arithmetic only, so it runs in
  kernels too) on the flat C-order coordinates ``row * N + col``. Coordinates past the
  matrix (padding) wrap modulo 2**32 and still give valid buckets.
  """
  rows = (row0 + lax.broadcasted_iota(jnp.int32, (nrows, 1), 0)).astype(jnp.uint32)
  cols = (col0 + lax.broadcasted_iota(jnp.int32, (1, ncols), 1)).astype(jnp.uint32)
  f = rows * jnp.uint32(spec.N) + cols
  return hashing.bucket_and_sign(f, spec.seed, spec.num_buckets, spec.signed)


def signed(v, s, is_signed: bool):
  """``v * s`` for a signed hash, ``v`` otherwise."""
  return v * s.astype(v.dtype) if is_signed else v

