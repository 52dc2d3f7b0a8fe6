"""Bit-packing of codebook indices (1..8 bits per index).

Format (part of the checkpoint format; do not change without a version bump):
indices are packed along the *last* axis as a little-endian bit stream. Values are
taken in groups of ``g = 8 // gcd(8, bits)`` consecutive indices, which fill exactly
``g * bits // 8`` bytes; value ``i`` of a group occupies bits ``[i*bits, (i+1)*bits)``
of the group's bytes read as one little-endian integer. The last axis is padded with
zeros to a multiple of ``g``. So 4-bit indices put element ``2j`` in the low nibble and
``2j+1`` in the high nibble of byte ``j``; 8-bit indices are stored as they are.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def group_values(bits: int) -> int:
  """Number of indices in one packing group (a whole number of bytes)."""
  _check_bits(bits)
  return 8 // math.gcd(8, bits)


def packed_length(n: int, bits: int) -> int:
  """Bytes along the last axis needed for ``n`` indices of ``bits`` bits."""
  g = group_values(bits)
  return -(-n // g) * g * bits // 8


def _check_bits(bits: int) -> None:
  if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
    raise ValueError(f"bits must be an integer in [1, 8], got {bits=!r}")


def pack(indices: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """Packs integer indices ``< 2**bits`` along the last axis into uint8 bytes.

  Args:
    indices: integer array ``(..., n)`` with values in ``[0, 2**bits)``.
    bits: bits per index, 1..8.

  Returns:
    uint8 array ``(..., packed_length(n, bits))``.
  """
  _check_bits(bits)
  idx = jnp.asarray(indices)
  if idx.ndim == 0:
    raise ValueError("pack needs an array with at least one axis")
  if bits == 8:
    return idx.astype(jnp.uint8)
  g = group_values(bits)
  nbytes = g * bits // 8
  n = idx.shape[-1]
  pad = (-n) % g
  v = idx.astype(jnp.uint32)
  if pad:
    v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
  v = v.reshape(*v.shape[:-1], -1, g)
  out = []
  for j in range(nbytes):
    acc = None
    for i in range(g):
      lo, hi = i * bits, (i + 1) * bits
      if hi <= 8 * j or lo >= 8 * j + 8:
        continue
      shift = lo - 8 * j
      vi = v[..., i]
      term = (vi << shift) if shift >= 0 else (vi >> -shift)
      acc = term if acc is None else acc | term
    out.append((acc & 0xFF).astype(jnp.uint8))
  packed = jnp.stack(out, axis=-1)
  return packed.reshape(*packed.shape[:-2], -1)


def unpack(packed: jax.typing.ArrayLike, bits: int, n: int) -> jax.Array:
  """Inverse of `pack`: uint8 ``(..., packed_length(n, bits))`` -> uint8 ``(..., n)``."""
  _check_bits(bits)
  p = jnp.asarray(packed)
  if p.shape[-1] != packed_length(n, bits):
    raise ValueError(
        f"packed last axis has {p.shape[-1]} bytes, expected"
        f" {packed_length(n, bits)} for {n=} indices of {bits=}")
  if bits == 8:
    return p.astype(jnp.uint8)
  g = group_values(bits)
  nbytes = g * bits // 8
  b = p.astype(jnp.uint32).reshape(*p.shape[:-1], -1, nbytes)
  mask = (1 << bits) - 1
  vals = []
  for i in range(g):
    lo, hi = i * bits, (i + 1) * bits
    acc = None
    for j in range(nbytes):
      if hi <= 8 * j or lo >= 8 * j + 8:
        continue
      shift = lo - 8 * j
      bj = b[..., j]
      term = (bj >> shift) if shift >= 0 else (bj << -shift)
      acc = term if acc is None else acc | term
    vals.append((acc & mask).astype(jnp.uint8))
  v = jnp.stack(vals, axis=-1).reshape(*p.shape[:-1], -1)
  return v[..., :n]


def take(packed: jax.typing.ArrayLike, bits: int, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """The indices at ``(rows, cols)`` of a packed 2-D array, without unpacking the rest.

  Args:
    packed: uint8 ``(R, packed_length(n, bits))``.
    bits: bits per index, 1..8.
    rows, cols: int arrays of one shape, in range (``cols < n``).

  Returns:
    int32 indices of the shape of ``rows``: index ``cols`` of row ``rows`` sits at bits
    ``[cols*bits, (cols+1)*bits)`` of the row's little-endian byte stream.
  """
  _check_bits(bits)
  p = jnp.asarray(packed)
  rows = jnp.asarray(rows, jnp.int32)
  off = jnp.asarray(cols, jnp.int32) * bits
  byte, shift = off // 8, off % 8
  lo = p[rows, byte].astype(jnp.int32)
  if 8 % bits:  # an index may straddle two bytes
    hi = p[rows, jnp.minimum(byte + 1, p.shape[-1] - 1)].astype(jnp.int32)
    lo = lo | (hi << 8)
  return (lo >> shift) & ((1 << bits) - 1)
