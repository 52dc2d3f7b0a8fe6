"""Tests of qws_jax.kernels.hashed_matmul: XLA path, Pallas interpret mode, CUDA lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qws_jax import HashedArray
from qws_jax import validate_hashed_array
from qws_jax._src import hashing
from qws_jax.kernels import BlockSizes
from qws_jax.kernels import hashed_matmul
from qws_jax.kernels import hashed_matmul_reference
from qws_jax.kernels._decode import HashedSpec
from qws_jax.kernels._decode import tile_hash

SMALL = BlockSizes(block_m=16, block_n=32, block_k=16, xla_block_k=32)


def make_hashed(rng, K, N, B, *, dtype=jnp.float32, signed=True, seed=None) -> HashedArray:
  seed = hashing.leaf_seed("params/Dense_0/kernel", int(rng.integers(0, 2**32))) if seed is None else seed
  w = HashedArray(jnp.asarray(rng.normal(size=B), dtype), (K, N), dtype, seed, signed)
  validate_hashed_array(w)
  return w


def tol(dtype):
  return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-4)


def dense_f32(x, w):
  return np.asarray(x, np.float32) @ np.asarray(w.materialize(), np.float32)


def test_tile_hash_is_the_library_hash():
  """The kernels' tile hash gives exactly HashedArray.bucket_and_sign (spec v1 integers)."""
  rng = np.random.default_rng(39)
  w = make_hashed(rng, 37, 53, 29, seed=2**32 - 1)
  spec = HashedSpec(K=37, N=53, num_buckets=29, seed=w.seed, signed=True, impl="xla", bs=BlockSizes())
  b, s = tile_hash(0, 37, 0, 53, spec)
  b0, s0 = w.bucket_and_sign()
  np.testing.assert_array_equal(b, b0)
  np.testing.assert_array_equal(s, s0)
  # A sub-tile at an offset.
  b, s = jax.jit(lambda r, c: tile_hash(r, 8, c, 16, spec))(20, 30)
  np.testing.assert_array_equal(b, b0[20:28, 30:46])
  np.testing.assert_array_equal(s, s0[20:28, 30:46])


FWD_CASES = [
    ("signed-interp", True, 100, 70, 37, (5,), "interpret"),
    ("unsigned-interp", False, 48, 33, 200, (2, 3), "interpret"),
    ("signed-interp-m20", True, 40, 64, 11, (20,), "interpret"),
    ("signed-xla", True, 100, 70, 37, (5,), "xla"),
    ("unsigned-xla", False, 48, 33, 200, (2, 3), "xla"),
    ("one-bucket-xla", True, 20, 9, 1, (1,), "xla"),
]


@pytest.mark.parametrize("signed,K,N,B,lead,impl", [c[1:] for c in FWD_CASES],
                         ids=[c[0] for c in FWD_CASES])
def test_forward_matches_reference(signed, K, N, B, lead, impl):
  rng = np.random.default_rng(65)
  w = make_hashed(rng, K, N, B, signed=signed)
  x = jnp.asarray(rng.normal(size=lead + (K,)), jnp.float32)
  y = hashed_matmul(x, w, impl=impl, block_sizes=SMALL)
  assert y.shape == lead + (N,) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, hashed_matmul_reference(x, w), **tol(jnp.float32))
  np.testing.assert_allclose(y, dense_f32(x, w), **tol(jnp.float32))


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_bf16(impl):
  rng = np.random.default_rng(76)
  w = make_hashed(rng, 80, 40, 50, dtype=jnp.bfloat16)
  x = jnp.asarray(rng.normal(size=(3, 80)), jnp.bfloat16)
  y = hashed_matmul(x, w, impl=impl, block_sizes=SMALL)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(hashed_matmul_reference(x, w), np.float32), **tol(jnp.bfloat16))
  np.testing.assert_allclose(np.asarray(y, np.float32), dense_f32(x, w), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("m,split", [(1, None), (20, 4)])
def test_split_k(m, split):
  rng = np.random.default_rng(88)
  w = make_hashed(rng, 64, 40, 33)
  x = jnp.asarray(rng.normal(size=(m, 64)), jnp.float32)
  bs = BlockSizes(block_m=16, block_n=32, block_k=16, split_k=split)
  np.testing.assert_allclose(hashed_matmul(x, w, impl="interpret", block_sizes=bs),
                             hashed_matmul_reference(x, w), **tol(jnp.float32))


def test_default_blocks_and_dispatch():
  rng = np.random.default_rng(97)
  w = make_hashed(rng, 128, 96, 300)
  x = jnp.asarray(rng.normal(size=(24, 128)), jnp.float32)
  ref = hashed_matmul_reference(x, w)
  for impl in ("interpret", "xla", None):
    np.testing.assert_allclose(hashed_matmul(x, w, impl=impl), ref, **tol(jnp.float32))


@pytest.mark.parametrize("impl,signed,dtype,lead", [
    ("interpret", True, jnp.float32, (2, 3)), ("interpret", False, jnp.float32, (20,)),
    ("xla", True, jnp.float32, (2, 3)), ("xla", False, jnp.float32, (2, 3)),
    ("xla", True, jnp.bfloat16, (2, 3))],
    ids=["interp", "interp-unsigned-m20", "xla", "xla-unsigned", "xla-bf16"])
def test_gradients_match_jnp(impl, signed, dtype, lead):
  rng = np.random.default_rng(111)
  w = make_hashed(rng, 70, 42, 23, signed=signed, dtype=dtype)
  x = jnp.asarray(rng.normal(size=lead + (70,)), dtype)
  t = jnp.asarray(rng.normal(size=lead + (42,)), jnp.float32)

  def loss(fn):
    def f(x, b):
      ww = HashedArray(b, w.shape, w.dtype, w.seed, w.signed)
      return jnp.sum((fn(x, ww).astype(jnp.float32) - t) ** 2)
    return f

  got = jax.grad(loss(lambda x, ww: hashed_matmul(x, ww, impl=impl, block_sizes=SMALL)),
                 (0, 1))(x, w.buckets)
  want = jax.grad(loss(lambda x, ww: x @ ww.materialize()), (0, 1))(x, w.buckets)
  for a, b in zip(got, want):
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = np.abs(b).max()
    np.testing.assert_allclose(a, b, rtol=0, atol=(3e-2 if dtype == jnp.bfloat16 else 1e-4) * scale)


def test_training_step_under_jit_reduces_loss():
  rng = np.random.default_rng(133)
  w = make_hashed(rng, 32, 8, 16)
  x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  target = x @ jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)

  @jax.jit
  def step(w):
    loss, g = jax.value_and_grad(lambda w: jnp.mean((hashed_matmul(x, w) - target) ** 2))(w)
    return HashedArray(w.buckets - 0.05 * g.buckets, w.shape, w.dtype, w.seed, w.signed), loss

  losses = []
  for _ in range(5):
    w, loss = step(w)
    losses.append(float(loss))
  assert losses[-1] < losses[0]


def test_errors_name_the_problem():
  rng = np.random.default_rng(151)
  w = make_hashed(rng, 16, 8, 5)
  x = jnp.ones((2, 16), jnp.float32)
  with pytest.raises(TypeError, match="HashedArray"):
    hashed_matmul(x, w.materialize())
  with pytest.raises(ValueError, match="K=16"):
    hashed_matmul(jnp.ones((2, 8), jnp.float32), w)
  with pytest.raises(ValueError, match="impl"):
    hashed_matmul(x, w, impl="cuda")
  with pytest.raises(ValueError, match="hash version"):
    hashed_matmul(x, HashedArray(w.buckets, w.shape, w.dtype, w.seed, version=99))
  with pytest.raises(ValueError, match="2-D"):
    hashed_matmul(x, HashedArray(w.buckets, (2, 8, 1), w.dtype, w.seed))


@pytest.mark.parametrize("m,dtype,signed", [(1, jnp.bfloat16, True), (32, jnp.float32, False)])
def test_pallas_lowers_for_cuda(m, dtype, signed):
  rng = np.random.default_rng(168)
  w = make_hashed(rng, 256, 96, 1000, dtype=dtype, signed=signed)
  x = jnp.asarray(rng.normal(size=(m, 256)), dtype)
  fwd = jax.jit(lambda x, w: hashed_matmul(x, w, impl="pallas"))
  assert "__gpu$xla.gpu.triton" in fwd.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(hashed_matmul(x, w, impl="pallas").astype(jnp.float32))))
  text = grad.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2  # forward kernel and the dx kernel
  assert "hashed_matmul_dx" in text


def test_leaf_from_hash_share():
  """What users run: a leaf produced by qws_jax.hash_share, through the dispatch default."""
  import qws_jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(182)
  params = {"dense": {"kernel": jnp.zeros((96, 40), jnp.float32)}}
  w = qws_jax.hash_share(params, compression=1 / 4, key=jax.random.key(0))["dense"]["kernel"]
  assert isinstance(w, HashedArray)
  x = jnp.asarray(rng.normal(size=(3, 96)), jnp.float32)
  want = dense_f32(x, w)
  np.testing.assert_allclose(hashed_matmul(x, w), want, **tol(jnp.float32))
  np.testing.assert_allclose(hashed_matmul(x, w, impl="interpret", block_sizes=SMALL), want,
                             **tol(jnp.float32))
