"""The coordinate hash of hashed weight sharing (HashedNets).

Specification, version 1 (``HASH_VERSION``). All arithmetic is on uint32 and wraps
modulo 2**32; the same integers come out on every backend, inside and outside ``jit``.

* ``fmix32(h)`` is murmur3's finaliser::

      h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16

* ``fnv1a32(b)`` is 32-bit FNV-1a over bytes (offset 0x811C9DC5, prime 0x01000193).
* The seed of a leaf is ``leaf_seed(path, seed) = fmix32(fnv1a32(utf8(path)) ^ fmix32(seed))``
  where ``path`` is the leaf's path string (``"params/Dense_0/kernel"``) and ``seed`` the
  user's seed, an integer in ``[0, 2**32)``.
* For the element with flat C-order index ``f`` of the virtual array (``f < 2**32``)::

      h      = fmix32(f ^ leaf_seed)
      bucket = (h & 0x7FFFFFFF) % B
      sign   = +1 if (h >> 31) == 0 else -1      (always +1 when unsigned)

  so the bucket uses bits 0..30 and the sign bit 31: independent bits of one hash.
* ``V.flat[f] = sign * buckets[bucket]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HASH_VERSION = 1
SUPPORTED_HASH_VERSIONS = (1,)

_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35


def fmix32(h: jax.typing.ArrayLike) -> jax.Array:
  """murmur3 fmix32 on uint32 arrays (wrapping arithmetic)."""
  h = jnp.asarray(h, dtype=jnp.uint32)
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_M1)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(_M2)
  h = h ^ (h >> 16)
  return h


def fmix32_int(h: int) -> int:
  """fmix32 on a Python int (host side, for seeds)."""
  h &= 0xFFFFFFFF
  h ^= h >> 16
  h = (h * _M1) & 0xFFFFFFFF
  h ^= h >> 13
  h = (h * _M2) & 0xFFFFFFFF
  h ^= h >> 16
  return h


def fnv1a32(data: bytes) -> int:
  """32-bit FNV-1a of ``data``."""
  h = 0x811C9DC5
  for byte in data:
    h ^= byte
    h = (h * 0x01000193) & 0xFFFFFFFF
  return h


def check_seed(seed, what: str = "seed") -> int:
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"{what} must be an int in [0, 2**32), got {seed!r}")
  seed = int(seed)
  if not 0 <= seed < 2**32:
    raise ValueError(f"{what} must fit uint32, i.e. lie in [0, 2**32), got {seed}")
  return seed


def leaf_seed(path: str, seed: int) -> int:
  """Stable per-leaf seed from the leaf's path string and the user's seed."""
  seed = check_seed(seed)
  return fmix32_int(fnv1a32(path.encode("utf-8")) ^ fmix32_int(seed))


def bucket_and_sign(flat_index: jax.typing.ArrayLike, seed: int, num_buckets: int,
                    signed: bool = True) -> tuple[jax.Array, jax.Array]:
  """Bucket index (int32) and sign (+1/-1 as int8) of flat coordinates.

  Args:
    flat_index: uint32 (or non-negative int) array of flat C-order coordinates.
    seed: the leaf seed (already mixed with the path), a uint32 Python int.
    num_buckets: B, at least 1.
    signed: when False the sign is always +1.
  """
  f = jnp.asarray(flat_index).astype(jnp.uint32)
  h = fmix32(f ^ jnp.uint32(seed))
  bucket = ((h & jnp.uint32(0x7FFFFFFF)) % jnp.uint32(num_buckets)).astype(jnp.int32)
  if signed:
    sign = (1 - 2 * (h >> 31).astype(jnp.int32)).astype(jnp.int8)
  else:
    sign = jnp.ones(h.shape, jnp.int8)
  return bucket, sign
