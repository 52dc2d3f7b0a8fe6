"""Tests of qws_jax.kernels.shared_matmul: XLA path, Pallas interpret mode, CUDA lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qws_jax import SharedArray
from qws_jax import validate_shared_array
from qws_jax._src import packing
from qws_jax._src import types
from qws_jax.kernels import BlockSizes
from qws_jax.kernels import shared_matmul
from qws_jax.kernels import _common
from qws_jax.kernels import mosaic
from qws_jax.kernels import ops
from qws_jax.kernels import triton
from qws_jax.kernels import shared_matmul_reference

# Small tiles so that small test shapes span several tiles, several K steps and padding.
SMALL = BlockSizes(block_m=16, block_n=32, block_k=16, xla_block_k=32)
AXIS = {"tensor": None, "col": 1, "row": 0, "group": None}


def make_shared(rng, K, N, k, layout="tensor", *, dtype=jnp.float32, group_size=None,
                vector_dim=1) -> SharedArray:
  """A random valid SharedArray built by hand: sorted codebook, random indices."""
  bits = types.bits_for(k)
  axis = AXIS[layout]
  gs = group_size if layout == "group" else None
  grid = types.grid_shape((K, N), axis, gs, vector_dim)
  tail = (k,) if vector_dim == 1 else (k, vector_dim)
  cb = jnp.asarray(rng.normal(size=grid + tail), dtype)
  if vector_dim == 1:
    cb = jnp.sort(cb, axis=-1)
  idx = rng.integers(0, k, types.index_shape((K, N), vector_dim))
  w = SharedArray(packing.pack(idx, bits), cb, (K, N), dtype, bits, axis, gs, vector_dim)
  validate_shared_array(w)
  return w


def tol(dtype):
  return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-4)


def dense_f32(x, w):
  return np.asarray(x, np.float32) @ np.asarray(w.materialize(), np.float32)


FWD_CASES = [
    # name, layout, k, K, N, x shape lead, impl
    ("tensor-4bit-interp", "tensor", 16, 100, 70, (5,), "interpret"),
    ("tensor-8bit-interp", "tensor", 256, 72, 37, (2, 3), "interpret"),
    ("col-4bit-interp", "col", 16, 50, 33, (20,), "interpret"),
    ("row-8bit-interp", "row", 200, 40, 64, (1,), "interpret"),
    ("group-4bit-interp", "group", 16, 100, 48, (17,), "interpret"),
    ("group-2bit-interp", "group", 4, 64, 45, (3,), "interpret"),
    ("tensor-4bit-xla", "tensor", 16, 100, 70, (5,), "xla"),
    ("tensor-8bit-xla", "tensor", 256, 72, 37, (2, 3), "xla"),
    ("col-4bit-xla", "col", 13, 50, 33, (20,), "xla"),
    ("row-8bit-xla", "row", 200, 40, 64, (1,), "xla"),
    ("group-4bit-xla", "group", 16, 100, 48, (17,), "xla"),
    ("group-3bit-xla", "group", 8, 64, 45, (3,), "xla"),
    ("tensor-5bit-xla", "tensor", 32, 33, 19, (4,), "xla"),
    ("col-1bit-xla", "col", 2, 30, 21, (2,), "xla"),
]


@pytest.mark.parametrize("layout,k,K,N,lead,impl", [c[1:] for c in FWD_CASES],
                         ids=[c[0] for c in FWD_CASES])
def test_forward_matches_reference(layout, k, K, N, lead, impl):
  rng = np.random.default_rng(74)
  w = make_shared(rng, K, N, k, layout, group_size=32)
  x = jnp.asarray(rng.normal(size=lead + (K,)), jnp.float32)
  y = shared_matmul(x, w, impl=impl, block_sizes=SMALL)
  assert y.shape == lead + (N,) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, shared_matmul_reference(x, w), **tol(jnp.float32))
  np.testing.assert_allclose(y, dense_f32(x, w), **tol(jnp.float32))


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("cb_dtype", [jnp.float32, jnp.bfloat16], ids=["cb_f32", "cb_bf16"])
def test_bf16_activations(impl, cb_dtype):
  rng = np.random.default_rng(86)
  w = make_shared(rng, 96, 40, 16, "col", dtype=cb_dtype)
  x = jnp.asarray(rng.normal(size=(3, 96)), jnp.bfloat16)
  y = shared_matmul(x, w, impl=impl, block_sizes=SMALL)
  assert y.dtype == jnp.bfloat16
  ref = shared_matmul_reference(x, w)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), **tol(jnp.bfloat16))
  # And against the f32 product of the rounded inputs: f32 accumulation, one final rounding.
  np.testing.assert_allclose(np.asarray(y, np.float32), dense_f32(x, w), rtol=2e-2, atol=5e-2)


def test_bf16_codebook_f32_activations_exact_decode():
  rng = np.random.default_rng(98)
  w = make_shared(rng, 64, 32, 16, "tensor", dtype=jnp.bfloat16)
  x = jnp.asarray(rng.normal(size=(4, 64)), jnp.float32)
  y = shared_matmul(x, w, impl="xla")
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, dense_f32(x, w), rtol=1e-5, atol=1e-4)


def test_default_blocks_large_m_uses_dot_path():
  rng = np.random.default_rng(107)
  w = make_shared(rng, 128, 64, 16, "group", group_size=64)
  x = jnp.asarray(rng.normal(size=(40, 128)), jnp.float32)
  for impl in ("interpret", "xla", None):
    np.testing.assert_allclose(shared_matmul(x, w, impl=impl), shared_matmul_reference(x, w),
                               **tol(jnp.float32))


@pytest.mark.parametrize("m,split", [(1, None), (20, 2), (3, 1)])
def test_split_k(m, split):
  """K split over programs (partial sums added afterwards) == reference."""
  rng = np.random.default_rng(118)
  w = make_shared(rng, 96, 40, 16, "group", group_size=32)
  x = jnp.asarray(rng.normal(size=(m, 96)), jnp.float32)
  bs = BlockSizes(block_m=16, block_n=32, block_k=16, split_k=split)
  assert _common.split_k(bs.clamp(m, 96, 40), m, 6) == (2 if split is None else split)
  np.testing.assert_allclose(shared_matmul(x, w, impl="interpret", block_sizes=bs),
                             shared_matmul_reference(x, w), **tol(jnp.float32))


def test_vector_codebook_xla_only():
  rng = np.random.default_rng(128)
  w = make_shared(rng, 24, 16, 8, "tensor", vector_dim=2)
  x = jnp.asarray(rng.normal(size=(3, 24)), jnp.float32)
  np.testing.assert_allclose(shared_matmul(x, w), dense_f32(x, w), **tol(jnp.float32))
  with pytest.raises(NotImplementedError, match="vector_dim=2"):
    shared_matmul(x, w, impl="interpret")


GRAD_CASES = [
    # name, layout, k, impl, dtype, leading axes of x (M <= 8: GEMV path, M >= 16: dot path)
    ("group-4bit-interp", "group", 16, "interpret", jnp.float32, (2, 3)),
    ("col-8bit-interp-bf16-m20", "col", 256, "interpret", jnp.bfloat16, (4, 5)),
    ("col-8bit-xla", "col", 256, "xla", jnp.float32, (2, 3)),
    ("row-4bit-xla", "row", 16, "xla", jnp.float32, (2, 3)),
    ("tensor-3bit-xla", "tensor", 8, "xla", jnp.float32, (2, 3)),
    ("group-4bit-xla-bf16", "group", 16, "xla", jnp.bfloat16, (2, 3)),
]


@pytest.mark.parametrize("layout,k,impl,dtype,lead", [c[1:] for c in GRAD_CASES],
                         ids=[c[0] for c in GRAD_CASES])
def test_gradients_match_jnp(layout, k, impl, dtype, lead):
  rng = np.random.default_rng(150)
  w = make_shared(rng, 70, 42, k, layout, group_size=32, dtype=dtype)
  x = jnp.asarray(rng.normal(size=lead + (70,)), dtype)
  t = jnp.asarray(rng.normal(size=lead + (42,)), jnp.float32)

  def loss(fn):
    def f(x, cb):
      ww = SharedArray(w.indices, cb, w.shape, w.dtype, w.bits, w.axis, w.group_size)
      return jnp.sum((fn(x, ww).astype(jnp.float32) - t) ** 2)
    return f

  got = jax.grad(loss(lambda x, ww: shared_matmul(x, ww, impl=impl, block_sizes=SMALL)),
                 (0, 1))(x, w.codebook)
  want = jax.grad(loss(lambda x, ww: x @ ww.materialize()), (0, 1))(x, w.codebook)
  for a, b in zip(got, want):
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = np.abs(b).max()
    np.testing.assert_allclose(a, b, rtol=0, atol=(3e-2 if dtype == jnp.bfloat16 else 1e-4) * scale)


def test_indices_get_no_gradient_and_vjp_under_jit():
  rng = np.random.default_rng(172)
  w = make_shared(rng, 32, 16, 16)
  x = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)
  g = jax.jit(jax.grad(lambda w: jnp.sum(shared_matmul(x, w)), allow_int=True))(w)
  assert isinstance(g, SharedArray)
  assert g.indices.dtype == jax.dtypes.float0
  assert g.codebook.shape == w.codebook.shape
  np.testing.assert_allclose(jnp.sum(g.codebook), jnp.sum(x) * w.shape[1], rtol=1e-4)


def test_jit_second_call_does_not_retrace():
  rng = np.random.default_rng(183)
  traces = []

  @jax.jit
  def f(x, w):
    traces.append(1)
    return shared_matmul(x, w)

  w1, w2 = make_shared(rng, 48, 24, 16), make_shared(rng, 48, 24, 16)
  x = jnp.asarray(rng.normal(size=(2, 48)), jnp.float32)
  np.testing.assert_allclose(f(x, w1), shared_matmul_reference(x, w1), **tol(jnp.float32))
  np.testing.assert_allclose(f(x, w2), shared_matmul_reference(x, w2), **tol(jnp.float32))
  assert len(traces) == 1


def test_empty_batch():
  rng = np.random.default_rng(199)
  w = make_shared(rng, 16, 8, 4)
  y = shared_matmul(jnp.zeros((0, 16), jnp.float32), w)
  assert y.shape == (0, 8) and y.dtype == jnp.float32


def test_errors_name_the_problem():
  rng = np.random.default_rng(206)
  w = make_shared(rng, 16, 8, 8)
  x = jnp.ones((2, 16), jnp.float32)
  with pytest.raises(TypeError, match="SharedArray"):
    shared_matmul(x, w.materialize())
  with pytest.raises(ValueError, match="K=16"):
    shared_matmul(jnp.ones((2, 15), jnp.float32), w)
  with pytest.raises(TypeError, match="floating"):
    shared_matmul(jnp.ones((2, 16), jnp.int32), w)
  with pytest.raises(ValueError, match="impl"):
    shared_matmul(x, w, impl="triton")
  with pytest.raises(NotImplementedError, match="bits=3"):
    shared_matmul(x, w, impl="pallas")
  w3 = SharedArray(packing.pack(np.zeros((2, 8, 4), np.int32), 4), jnp.arange(16.0), (2, 8, 4),
                   jnp.float32, 4)
  with pytest.raises(ValueError, match="2-D"):
    shared_matmul(x, w3)
  with pytest.raises(TypeError, match="BlockSizes"):
    shared_matmul(x, w, block_sizes=(16, 16, 16))


def test_dispatch_on_this_backend():
  backend = jax.default_backend()
  assert _common.default_impl() == ("xla" if backend == "cpu" else "pallas")
  assert _common.pallas_kernel() == ("mosaic" if backend == "tpu" else "triton")
  assert _common.resolve_impl(None, lambda kernel: "bits=3") == "xla"
  assert _common.resolve_impl("interpret", lambda kernel: None) == "interpret"
  assert _common.resolve_impl("xla", lambda kernel: "anything") == "xla"
  assert _common.resolve_impl("pallas", lambda kernel: None) == _common.pallas_kernel()
  with pytest.raises(NotImplementedError, match="bits=3"):
    _common.resolve_impl("interpret", lambda kernel: "bits=3")


def test_block_sizes_validate_and_clamp():
  with pytest.raises(ValueError, match="block_n"):
    BlockSizes(block_n=48)
  with pytest.raises(ValueError, match="block_k"):
    BlockSizes(block_k=8)
  with pytest.raises(ValueError, match="split_k"):
    BlockSizes(split_k=3)
  with pytest.raises(TypeError):
    BlockSizes(64)  # keyword-only
  bs = BlockSizes().clamp(1, 14336, 4096)
  assert (bs.block_m, bs.block_k, bs.block_n) == (1, 64, 128)
  bs = BlockSizes().clamp(20, 100, 10)
  assert bs.block_m == 32 and bs.block_n == 16 and bs.block_k == 64  # 100 has no pow2 divisor >= 16
  assert BlockSizes().clamp(5, 96, 10).block_k == 32


@pytest.mark.parametrize("bits,layout,m,dtype", [
    (4, "tensor", 1, jnp.bfloat16), (4, "group", 32, jnp.float32), (8, "col", 16, jnp.bfloat16),
    (2, "row", 4, jnp.float32)])
def test_pallas_lowers_for_cuda(bits, layout, m, dtype):
  rng = np.random.default_rng(259)
  w = make_shared(rng, 256, 96, 2**bits, layout, group_size=128, dtype=dtype)
  x = jnp.asarray(rng.normal(size=(m, 256)), dtype)
  fwd = jax.jit(lambda x, w: shared_matmul(x, w, impl="pallas"))
  text = fwd.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "__gpu$xla.gpu.triton" in text
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(shared_matmul(x, w, impl="pallas").astype(jnp.float32))))
  text = grad.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2  # forward kernel and the dx kernel
  assert "shared_matmul_dx" in text


# The TPU (Mosaic) kernel: per-tensor and axis=0 codebooks, lane-gather decode.
TPU_CASES = [
    ("tensor-4bit", "tensor", 16, 300, 70, 1, jnp.float32),
    ("tensor-8bit-bf16", "tensor", 256, 256, 200, 20, jnp.bfloat16),
    ("row-8bit", "row", 200, 200, 130, 3, jnp.float32),
    ("row-2bit", "row", 4, 128, 33, 17, jnp.float32),
]


@pytest.mark.parametrize("layout,k,K,N,m,dtype", [c[1:] for c in TPU_CASES],
                         ids=[c[0] for c in TPU_CASES])
def test_tpu_kernel_interpret_matches_reference(layout, k, K, N, m, dtype):
  rng = np.random.default_rng(283)
  w = make_shared(rng, K, N, k, layout, dtype=dtype)
  x = jnp.asarray(rng.normal(size=(m, K)), dtype)
  y = ops._run(x, w, "mosaic_interpret", BlockSizes(block_k=128))
  assert y.shape == (m, N) and y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(shared_matmul_reference(x, w), np.float32), **tol(dtype))


def test_tpu_kernel_lowers_for_tpu_and_refuses_other_layouts():
  rng = np.random.default_rng(293)
  w = make_shared(rng, 512, 256, 16, "tensor", dtype=jnp.bfloat16)
  x = jnp.asarray(rng.normal(size=(1, 512)), jnp.bfloat16)
  f = jax.jit(lambda x, w: ops._run(x, w, "mosaic", BlockSizes()))
  assert "tpu_custom_call" in f.trace(x, w).lower(lowering_platforms=("tpu",)).as_text()
  for layout in ("col", "group"):
    wl = make_shared(rng, 64, 32, 16, layout, group_size=32)
    assert "TPU kernel" in ops.pallas_unsupported(wl, "mosaic")
    assert "TPU kernel" in mosaic.shared_unsupported(wl)
    assert ops.pallas_unsupported(wl, "triton") is None
    assert triton.shared_unsupported(wl) is None


@pytest.mark.parametrize("opts", [dict(k=16, axis=-1), dict(k=16, group_size=32)],
                         ids=["col", "group-ragged"])
def test_leaves_from_share(opts):
  """What users run: a leaf produced by qws_jax.share, through the dispatch default."""
  import qws_jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(311)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(70, 48)), jnp.float32)}}
  # Lloyd: a fast share (the default exact "dp" k-means costs ~20 s here to compile).
  w = qws_jax.share(params, method="lloyd", max_iters=20, **opts)["dense"]["kernel"]
  assert isinstance(w, SharedArray)
  x = jnp.asarray(rng.normal(size=(2, 5, 70)), jnp.float32)
  want = dense_f32(x, w)
  np.testing.assert_allclose(shared_matmul(x, w), want, **tol(jnp.float32))
  np.testing.assert_allclose(shared_matmul(x, w, impl="interpret", block_sizes=SMALL), want,
                             **tol(jnp.float32))
