"""Golden vectors pinning the version-1 coordinate hash (part of the file format).

The expected integers were computed once with the pure-Python integer implementation of
the spec below (``_py_*``), written from the spec in ``qws_jax/_src/hashing.py``
independently of the jnp code. If one of these tests fails, the hash changed and every
saved hashed model would silently load different weights: bump ``HASH_VERSION``
instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qws_jax
from qws_jax._src import hashing

_M = 0xFFFFFFFF


def _py_fmix32(h: int) -> int:
  h &= _M
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & _M
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & _M
  h ^= h >> 16
  return h


def _py_fnv1a32(data: bytes) -> int:
  h = 0x811C9DC5
  for byte in data:
    h = ((h ^ byte) * 0x01000193) & _M
  return h


def _py_leaf_seed(path: str, seed: int) -> int:
  return _py_fmix32(_py_fnv1a32(path.encode("utf-8")) ^ _py_fmix32(seed))


def _py_bucket_sign(f: int, seed: int, num_buckets: int, signed: bool = True):
  h = _py_fmix32(f ^ seed)
  sign = -1 if (signed and h >> 31) else 1
  return (h & 0x7FFFFFFF) % num_buckets, sign


def _np_bucket_sign(f: np.ndarray, seed: int, num_buckets: int):
  """The spec in numpy uint64 arithmetic masked to 32 bits (no uint32 wrap-around)."""
  h = (f.astype(np.uint64) ^ np.uint64(seed)) & np.uint64(_M)
  h ^= h >> np.uint64(16)
  h = (h * np.uint64(0x85EBCA6B)) & np.uint64(_M)
  h ^= h >> np.uint64(13)
  h = (h * np.uint64(0xC2B2AE35)) & np.uint64(_M)
  h ^= h >> np.uint64(16)
  bucket = (h & np.uint64(0x7FFFFFFF)) % np.uint64(num_buckets)
  sign = np.where(h >> np.uint64(31), -1, 1)
  return bucket.astype(np.int64), sign.astype(np.int64)


# murmur3 fmix32 of 1 is the published 0x514E28B7; FNV-1a vectors are from the FNV spec.
FMIX32_GOLDEN = {0: 0x0, 1: 0x514E28B7, 2: 0x30F4C306, 0xFFFFFFFF: 0x81F16F39,
                 0xDEADBEEF: 0x0DE5C6A9, 12345: 0x3C46C9DC}
FNV1A32_GOLDEN = {b"": 0x811C9DC5, b"a": 0xE40C292C, b"foobar": 0xBF9CF968,
                  b"params/Dense_0/kernel": 0x641135F0}
LEAF_SEED_GOLDEN = [
    ("params/Dense_0/kernel", 0, 3101479557),
    ("params/Dense_0/kernel", 1, 398434190),
    ("Dense_1/kernel", 42, 3186007533),
    ("", 0, 2872998923),
    ("w", 2**32 - 1, 1462255741),
    ("params/bloc\u00e9/kernel", 7, 2928138819),
]
# leaf_seed("params/Dense_0/kernel", 0), B = 7, f = 0..11.
SEED = 3101479557
B7_BUCKETS = [0, 2, 0, 2, 0, 6, 6, 5, 0, 3, 0, 2]
B7_SIGNS = [-1, -1, -1, -1, 1, -1, -1, -1, 1, -1, -1, 1]
# Same seed, B = 1000, large coordinates.
B1000_F = [0, 1, 2, 3, 100, 4095, 65535, 2**31, 2**32 - 1]
B1000_BUCKETS = [763, 104, 834, 55, 596, 115, 12, 887, 561]
B1000_SIGNS = [-1, -1, -1, -1, -1, 1, -1, 1, 1]


def test_reference_implementations_match_golden():
  for x, want in FMIX32_GOLDEN.items():
    assert _py_fmix32(x) == want
  for data, want in FNV1A32_GOLDEN.items():
    assert _py_fnv1a32(data) == want
  for path, seed, want in LEAF_SEED_GOLDEN:
    assert _py_leaf_seed(path, seed) == want
  got = [_py_bucket_sign(f, SEED, 7) for f in range(12)]
  assert got == list(zip(B7_BUCKETS, B7_SIGNS))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_fmix32_golden(jit):
  fn = jax.jit(hashing.fmix32) if jit else hashing.fmix32
  x = np.array(list(FMIX32_GOLDEN), np.uint32)
  got = fn(x)
  assert got.dtype == jnp.uint32
  np.testing.assert_array_equal(np.asarray(got), np.array(list(FMIX32_GOLDEN.values()), np.uint32))
  for x, want in FMIX32_GOLDEN.items():
    assert hashing.fmix32_int(x) == want


def test_fnv1a32_and_leaf_seed_golden():
  for data, want in FNV1A32_GOLDEN.items():
    assert hashing.fnv1a32(data) == want
  for path, seed, want in LEAF_SEED_GOLDEN:
    assert hashing.leaf_seed(path, seed) == want
  assert hashing.leaf_seed("params/Dense_0/kernel", 0) == SEED


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bucket_and_sign_golden(jit):
  fn = hashing.bucket_and_sign
  if jit:
    fn = jax.jit(fn, static_argnums=(1, 2, 3))
  b, s = fn(jnp.arange(12, dtype=jnp.uint32), SEED, 7, True)
  assert b.dtype == jnp.int32 and s.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(b), B7_BUCKETS)
  np.testing.assert_array_equal(np.asarray(s), B7_SIGNS)
  b, s = fn(jnp.asarray(np.array(B1000_F, np.uint32)), SEED, 1000, True)
  np.testing.assert_array_equal(np.asarray(b), B1000_BUCKETS)
  np.testing.assert_array_equal(np.asarray(s), B1000_SIGNS)
  b, s = fn(jnp.arange(12, dtype=jnp.uint32), SEED, 7, False)
  np.testing.assert_array_equal(np.asarray(b), B7_BUCKETS)
  np.testing.assert_array_equal(np.asarray(s), np.ones(12))


@pytest.mark.parametrize("num_buckets", [1, 3, 256, 1000, 2**31 - 1])
def test_bucket_and_sign_matches_numpy_reference(num_buckets):
  rng = np.random.default_rng(num_buckets)
  f = np.concatenate([np.arange(64), rng.integers(0, 2**32, 2000, dtype=np.uint64)])
  seed = int(rng.integers(0, 2**32))
  want_b, want_s = _np_bucket_sign(f, seed, num_buckets)
  for fn in (hashing.bucket_and_sign, jax.jit(hashing.bucket_and_sign, static_argnums=(1, 2))):
    b, s = fn(jnp.asarray(f.astype(np.uint32)), seed, num_buckets)
    np.testing.assert_array_equal(np.asarray(b), want_b)
    np.testing.assert_array_equal(np.asarray(s), want_s)
  for i in (0, 5, 63, 64, 1000):
    assert _py_bucket_sign(int(f[i]), seed, num_buckets) == (want_b[i], want_s[i])


def test_sign_and_bucket_bits_are_balanced():
  b, s = hashing.bucket_and_sign(jnp.arange(1 << 16, dtype=jnp.uint32), SEED, 16)
  counts = np.bincount(np.asarray(b), minlength=16)
  assert counts.min() > 0.9 * 4096 and counts.max() < 1.1 * 4096
  assert abs(float(np.mean(np.asarray(s)))) < 0.02
  # The sign is (nearly) independent of the bucket: both signs in every bucket.
  for k in range(16):
    sk = np.asarray(s)[np.asarray(b) == k]
    assert abs(float(sk.mean())) < 0.1


def test_hashed_array_materialize_golden():
  buckets = jnp.arange(1, 8, dtype=jnp.float32)  # bucket k holds k + 1
  h = qws_jax.HashedArray(buckets=buckets, shape=(3, 4), dtype=np.dtype("float32"), seed=SEED)
  want = (np.array(B7_BUCKETS) + 1) * np.array(B7_SIGNS)
  np.testing.assert_array_equal(np.asarray(h.materialize()), want.reshape(3, 4))
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x.materialize())(h)),
                                want.reshape(3, 4))


def test_unknown_hash_version_raises():
  h = qws_jax.HashedArray(buckets=jnp.ones((4,)), shape=(2, 4), dtype=np.dtype("float32"),
                          seed=1, version=99)
  with pytest.raises(ValueError, match="unknown hash version 99"):
    h.materialize()
  with pytest.raises(ValueError, match="unknown hash version 99.*'params/w'"):
    qws_jax.validate_hashed_array(h, "params/w")


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_out_of_uint32_raises(seed):
  with pytest.raises(ValueError, match="uint32"):
    hashing.leaf_seed("a", seed)


def test_seed_wrong_type_raises():
  with pytest.raises(TypeError, match="seed"):
    hashing.leaf_seed("a", 1.5)
  with pytest.raises(TypeError, match="seed"):
    hashing.leaf_seed("a", True)


_CHILD = r"""
import hashlib, sys
import jax, jax.numpy as jnp, numpy as np
import qws_jax
params = {"params": {"Dense_0": {"kernel": jax.ShapeDtypeStruct((48, 40), jnp.float32)},
                     "Dense_1": {"kernel": jax.ShapeDtypeStruct((40, 30), jnp.float32)}}}
h = qws_jax.hash_share(params, compression=1/8, key=jax.random.key(3), seed=11)
w = qws_jax.unshare(h)
digest = hashlib.sha256()
for path in ("Dense_0", "Dense_1"):
  leaf = h["params"][path]["kernel"]
  digest.update(str(leaf.seed).encode())
  digest.update(np.asarray(w["params"][path]["kernel"]).tobytes())
print(digest.hexdigest(), hash("params/Dense_0/kernel"))
"""


def test_identical_weights_across_processes_with_different_pythonhashseed():
  outs = []
  for hashseed in ("1", "12345"):
    env = dict(os.environ, PYTHONHASHSEED=hashseed, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    outs.append(res.stdout.split())
  (d1, py1), (d2, py2) = outs
  assert py1 != py2, "the two processes should have different Python str hashes"
  assert d1 == d2
