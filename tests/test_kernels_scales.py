"""Group scales decoded inside the kernels: XLA path, Triton in interpret mode, lowering.

A leaf with ``scales`` ``(ceil(K / scale_group_size), N)`` decodes weight ``(r, c)`` to
``codebook value * scales[r // scale_group_size, c]``; every implementation must agree
with `shared_matmul_reference` (``x @ w.materialize()``) without decoding the whole
weight, and `qws_jax._src.parts.matmul` must route scaled leaves to the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qws_jax
from qws_jax import SharedArray
from qws_jax._src import ops as ops_lib
from qws_jax._src import packing
from qws_jax._src import parts
from qws_jax._src import types
from qws_jax.kernels import BlockSizes
from qws_jax.kernels import _common
from qws_jax.kernels import ops
from qws_jax.kernels import xla
from qws_jax.kernels import shared_matmul
from qws_jax.kernels import shared_matmul_reference
from qws_jax.kernels._decode import SharedSpec
from _compress_helpers import float_values

# Small tiles: several tiles, K steps (block_k=16, xla_block_k=32) and padding.
SMALL = BlockSizes(block_m=16, block_n=32, block_k=16, xla_block_k=32)
AXIS = {"tensor": None, "col": 1, "row": 0, "group": None}


def make_scaled(rng, K, N, k, layout="tensor", *, sgs, dtype=jnp.float32, group_size=32,
                n_outliers=0, codebook_dtype=None, scale_range=(0.25, 4.0)) -> SharedArray:
  """A random scaled leaf built by `parts.from_quantized` (scales stored as f16)."""
  gs = group_size if layout == "group" else None
  grid = types.grid_shape((K, N), AXIS[layout], gs)
  q = {"indices": rng.integers(0, k, (K, N)).astype(np.int32),
       "codebook": np.sort(rng.normal(size=grid + (k,)), axis=-1).astype(np.float32),
       "scales": rng.uniform(*scale_range, (-(-K // sgs), N)).astype(np.float32)}
  if n_outliers:
    q["outlier_positions"] = np.sort(rng.choice(K * N, n_outliers, replace=False)).astype(np.int32)
    q["outlier_values"] = (rng.normal(size=n_outliers) * 5).astype(np.float32)
  w = parts.from_quantized(q, shape=(K, N), dtype=dtype, axis=AXIS[layout], group_size=gs,
                           scale_group_size=sgs, codebook_dtype=codebook_dtype)
  qws_jax.validate_shared_array(w, "w")
  return w


def assert_close(got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(float(np.abs(want).max()), 1.0)
  rel = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * scale)


FWD_CASES = [
    # name, layout, k, K, N, scale_group_size, leading axes of x, impl, x dtype
    ("tensor-4bit-sgs-divides-interp", "tensor", 16, 96, 70, 32, (5,), "interpret", jnp.float32),
    ("tensor-4bit-ragged-interp", "tensor", 16, 100, 70, 32, (2, 3), "interpret", jnp.float32),
    ("col-2bit-ragged-interp-bf16", "col", 4, 100, 45, 24, (3,), "interpret", jnp.bfloat16),
    ("row-8bit-interp", "row", 256, 72, 37, 16, (1,), "interpret", jnp.float32),
    ("group-4bit-interp-m20", "group", 16, 100, 48, 40, (20,), "interpret", jnp.float32),
    ("col-1bit-interp", "col", 2, 50, 33, 7, (4,), "interpret", jnp.float32),
    ("tensor-3bit-unpack-xla", "tensor", 8, 100, 33, 32, (3,), "xla", jnp.float32),
    ("col-3bit-unpack-xla-bf16", "col", 8, 70, 21, 64, (3,), "xla", jnp.bfloat16),
    ("tensor-4bit-ragged-xla", "tensor", 16, 100, 70, 32, (2, 3), "xla", jnp.float32),
    ("col-4bit-xla-bf16", "col", 16, 100, 70, 48, (5,), "xla", jnp.bfloat16),
    ("row-8bit-xla", "row", 256, 72, 37, 16, (1,), "xla", jnp.float32),
    ("group-2bit-xla", "group", 4, 100, 45, 64, (17,), "xla", jnp.float32),
    ("tensor-2bit-one-group-xla", "tensor", 4, 64, 45, 64, (2,), "xla", jnp.float32),
    ("tensor-5bit-xla", "tensor", 32, 33, 19, 8, (4,), "xla", jnp.float32),
    # XLA blocking (xla_block_k=32): a group of 37 rows neither divides nor is divided by
    # any block near 32 (row gather); 40 -> blocks of 20; 64 -> two blocks per group.
    ("tensor-4bit-gather-xla", "tensor", 16, 100, 45, 37, (3,), "xla", jnp.float32),
    ("col-4bit-divisor-xla", "col", 16, 100, 45, 40, (3,), "xla", jnp.float32),
    ("tensor-8bit-inside-group-xla", "tensor", 256, 150, 45, 64, (3,), "xla", jnp.float32),
]


@pytest.mark.parametrize("layout,k,K,N,sgs,lead,impl,dtype", [c[1:] for c in FWD_CASES],
                         ids=[c[0] for c in FWD_CASES])
def test_forward_matches_reference(layout, k, K, N, sgs, lead, impl, dtype):
  rng = np.random.default_rng(89)
  w = make_scaled(rng, K, N, k, layout, sgs=sgs)
  x = jnp.asarray(rng.normal(size=lead + (K,)), dtype)
  y = shared_matmul(x, w, impl=impl, block_sizes=SMALL)
  assert y.shape == lead + (N,) and y.dtype == dtype
  assert_close(y, shared_matmul_reference(x, w), dtype)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_scales_along_the_right_axis(impl):
  """K != N, scales 1e-2 .. 1e1 by row group (times 1..2 by column): a scale looked up
  by the wrong row group or column, or missing, gives a far-off product."""
  rng = np.random.default_rng(101)
  K, N, sgs = 128, 48, 32
  w = make_scaled(rng, K, N, 16, "tensor", sgs=sgs)
  by_row = 10.0 ** np.arange(-2, 2)[:, None] * rng.uniform(1.0, 2.0, (1, N))
  w = SharedArray(w.indices, w.codebook, w.shape, w.dtype, w.bits,
                  scales=jnp.asarray(by_row, jnp.float16), scale_group_size=sgs)
  x = jnp.asarray(rng.normal(size=(3, K)), jnp.float32)
  want = shared_matmul_reference(x, w)
  y = shared_matmul(x, w, impl=impl, block_sizes=SMALL)
  assert_close(y, want, jnp.float32)
  for wrong in (jnp.ones_like(w.scales),  # no scales
                jnp.asarray(by_row[::-1].copy(), jnp.float16)):  # groups in the wrong order
    ww = SharedArray(w.indices, w.codebook, w.shape, w.dtype, w.bits, scales=wrong,
                     scale_group_size=sgs)
    assert not np.allclose(np.asarray(shared_matmul_reference(x, ww)), np.asarray(y),
                           rtol=1e-2, atol=1e-2)
  # Row group by row group: only x's rows of group i meet scales[i].
  dense = np.asarray(w.materialize(), np.float32)
  for i in range(K // sgs):
    xi = jnp.zeros_like(x).at[:, i * sgs:(i + 1) * sgs].set(x[:, i * sgs:(i + 1) * sgs])
    want_i = np.asarray(xi) @ dense
    got_i = np.asarray(shared_matmul(xi, w, impl=impl, block_sizes=SMALL))
    np.testing.assert_allclose(got_i, want_i, rtol=1e-5, atol=1e-5 * np.abs(want_i).max())


def test_bf16_leaf_rounds_like_materialize():
  """A bf16 leaf with f32 activations: the scaled value is rounded to bf16 like
  ``materialize`` (bit-exact decode, so only the summation order differs)."""
  rng = np.random.default_rng(129)
  w = make_scaled(rng, 96, 40, 16, "col", sgs=32, dtype=jnp.bfloat16)
  x = jnp.asarray(rng.normal(size=(4, 96)), jnp.float32)
  want = shared_matmul_reference(x, w)
  for impl in ("xla", "interpret"):
    np.testing.assert_allclose(shared_matmul(x, w, impl=impl, block_sizes=SMALL), want,
                               rtol=1e-5, atol=1e-4)


GRAD_CASES = [
    # name, layout, k, impl, x dtype, leading axes (M <= 8: GEMV, M >= 16: dot branch),
    # scale group size (24: XLA blocks of 24 rows, 37: row gather, 64: inside one group)
    ("tensor-4bit-interp", "tensor", 16, "interpret", jnp.float32, (2, 3), 24),
    ("group-4bit-interp-m20", "group", 16, "interpret", jnp.float32, (4, 5), 24),
    ("col-8bit-interp-bf16", "col", 256, "interpret", jnp.bfloat16, (2, 3), 24),
    ("tensor-4bit-xla", "tensor", 16, "xla", jnp.float32, (2, 3), 24),
    ("col-3bit-xla", "col", 8, "xla", jnp.float32, (2, 3), 24),
    ("row-2bit-xla-bf16", "row", 4, "xla", jnp.bfloat16, (2, 3), 24),
    ("group-4bit-xla", "group", 16, "xla", jnp.float32, (2, 3), 24),
    ("tensor-4bit-xla-gather", "tensor", 16, "xla", jnp.float32, (2, 3), 37),
    ("col-4bit-xla-inside-group", "col", 16, "xla", jnp.float32, (2, 3), 64),
    ("col-4bit-interp-inside-group", "col", 16, "interpret", jnp.float32, (2, 3), 64),
]


@pytest.mark.parametrize("layout,k,impl,dtype,lead,sgs", [c[1:] for c in GRAD_CASES],
                         ids=[c[0] for c in GRAD_CASES])
def test_gradients_match_jnp(layout, k, impl, dtype, lead, sgs):
  """dx and d codebook (which carries the scale factor) against jax.grad of the reference."""
  rng = np.random.default_rng(158)
  K, N = 100, 42
  w = make_scaled(rng, K, N, k, layout, sgs=sgs, dtype=dtype)
  x = jnp.asarray(rng.normal(size=lead + (K,)), dtype)
  t = jnp.asarray(rng.normal(size=lead + (N,)), jnp.float32)

  def loss(fn):
    def f(x, cb):
      ww = SharedArray(w.indices, cb, w.shape, w.dtype, w.bits, w.axis, w.group_size,
                       scales=w.scales, scale_group_size=w.scale_group_size)
      return jnp.sum((fn(x, ww).astype(jnp.float32) - t) ** 2)
    return f

  got = jax.grad(loss(lambda x, ww: shared_matmul(x, ww, impl=impl, block_sizes=SMALL)),
                 (0, 1))(x, w.codebook)
  want = jax.grad(loss(shared_matmul_reference), (0, 1))(x, w.codebook)
  for a, b in zip(got, want):
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = np.abs(b).max()
    np.testing.assert_allclose(a, b, rtol=0, atol=(3e-2 if dtype == jnp.bfloat16 else 1e-4) * scale)


def test_xla_blocking_modes():
  """The blocks the XLA path picks for a scale group size (see `xla._blocking`)."""

  def blocking(K, sgs):
    return xla._blocking(SharedSpec(K=K, N=64, bits=4, k=16, gid="tensor", group_size=None,
                                    scale_group_size=sgs, dtype=jnp.float32, impl="xla",
                                    bs=BlockSizes()))
  assert blocking(4096, 128) == (512, "slice")
  assert blocking(4096, 48) == (480, "slice")  # a multiple of the group
  assert blocking(4096, 1000) == (500, "slice")  # a divisor of the group
  assert blocking(4096, 1024) == (512, "slice")  # two blocks per group
  assert blocking(4096, 1009) == (512, "gather")  # a prime group: row gather
  assert blocking(300, 1009) == (512, "slice")  # one block
  assert blocking(4096, None) == (512, "none")


def test_d_codebook_includes_the_scale_and_scales_get_zero_gradient():
  rng = np.random.default_rng(198)
  w = make_scaled(rng, 64, 24, 4, "tensor", sgs=16, scale_range=(3.0, 5.0))
  x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
  g = jax.grad(lambda w: jnp.sum(shared_matmul(x, w, impl="xla")), allow_int=True)(w)
  # d cb[j] = sum over weights (r, c) with index j of x.sum(0)[r] * scales[r // 16, c].
  idx = np.asarray(w.unpacked_indices())
  coef = np.asarray(x).sum(0)[:, None] * np.repeat(np.asarray(w.scales, np.float32), 16, axis=0)
  want = np.array([coef[idx == j].sum() for j in range(4)], np.float32)
  np.testing.assert_allclose(np.asarray(g.codebook), want, rtol=1e-5, atol=1e-4)
  # Documented: group scales are not trained (zero cotangent), like the indices.
  assert g.scales.shape == w.scales.shape and not np.any(np.asarray(g.scales))
  assert g.indices.dtype == jax.dtypes.float0


@pytest.mark.parametrize("bits,layout,m,dtype", [
    (4, "tensor", 1, jnp.bfloat16), (4, "group", 32, jnp.float32), (8, "col", 16, jnp.bfloat16),
    (2, "row", 4, jnp.float32)])
def test_pallas_lowers_for_cuda(bits, layout, m, dtype):
  rng = np.random.default_rng(216)
  w = make_scaled(rng, 256, 96, 2**bits, layout, sgs=64, group_size=128, dtype=dtype)
  x = jnp.asarray(rng.normal(size=(m, 256)), dtype)
  fwd = jax.jit(lambda x, w: shared_matmul(x, w, impl="pallas"))
  text = fwd.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "__gpu$xla.gpu.triton" in text and "_scaled" in text
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(shared_matmul(x, w, impl="pallas").astype(jnp.float32))))
  text = grad.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2  # forward kernel and the dx kernel
  assert "shared_matmul_dx" in text


def _largest_float(fn, *args) -> int:
  """Elements of the largest floating value any equation of ``fn``'s jaxpr produces."""
  return max(int(np.prod(shape)) for _, shape in float_values(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("with_outliers", [False, True], ids=["scales", "scales+outliers"])
def test_xla_path_never_materialises_the_weight(with_outliers):
  """With scales (and outliers), no floating value as large as the (K, N) weight exists in
  the jaxpr of the forward or the backward pass: the weight is decoded 512 rows at a time."""
  rng = np.random.default_rng(237)
  K, N = 2048, 96
  params = {"w": jnp.asarray(rng.normal(size=(K, N)), jnp.float32)}
  w = qws_jax.share(params, k=16, scale_group_size=64, outliers=0.01 if with_outliers else 0.0,
                    predicate=lambda p, l: True)["w"]
  assert w.scales is not None and (w.outlier_values is not None) == with_outliers
  x = jnp.asarray(rng.normal(size=(4, K)), jnp.float32)
  fwd = lambda x, w: ops_lib.matmul(x, w)  # what every layer calls
  assert _largest_float(fwd, x, w) < K * N
  assert _largest_float(lambda x, w: shared_matmul(x, w, impl="xla"), x, w) < K * N
  grad = jax.grad(lambda x, cb: jnp.sum(fwd(x, SharedArray(
      w.indices, cb, w.shape, w.dtype, w.bits, scales=w.scales,
      scale_group_size=w.scale_group_size, outlier_values=w.outlier_values,
      outlier_positions=w.outlier_positions))), (0, 1))
  assert _largest_float(grad, x, w.codebook) < K * N
  # The oracle, by contrast, holds the whole weight (the check can fail).
  assert _largest_float(shared_matmul_reference, x, w) >= K * N
  assert_close(jax.jit(fwd)(x, w), shared_matmul_reference(x, w), jnp.float32)


@pytest.mark.parametrize("cdt", [None, jnp.float16], ids=["cb_f32", "cb_f16"])
@pytest.mark.parametrize("n_outliers", [0, 9])
def test_parts_matmul_routes_scaled_leaves_to_the_kernel(monkeypatch, cdt, n_outliers):
  """Scales (with or without outliers, any codebook dtype) go to the kernel, never
  through ``materialize``; `shared_matmul` takes such leaves directly too."""
  rng = np.random.default_rng(262)
  w = make_scaled(rng, 100, 45, 16, "col", sgs=24, n_outliers=n_outliers, codebook_dtype=cdt)
  x = jnp.asarray(rng.normal(size=(2, 3, 100)), jnp.float32)
  want = np.asarray(shared_matmul_reference(x, w))
  calls = []
  orig = types.SharedArray.materialize

  def spy(self):
    calls.append(self.shape)
    return orig(self)
  monkeypatch.setattr(types.SharedArray, "materialize", spy)
  seen = []

  def base(a, b):
    seen.append(b)
    return shared_matmul(a, b, impl="xla", block_sizes=SMALL)
  got = parts.matmul(x, w, base)
  assert not calls
  assert len(seen) == 1 and seen[0].scales is not None and seen[0].outlier_values is None
  assert_close(got, want, jnp.float32)
  for impl in ("xla", "interpret"):
    assert_close(shared_matmul(x, w, impl=impl, block_sizes=SMALL), want, jnp.float32)
  assert not calls


def test_outlier_correction_decodes_only_outlier_positions():
  """`parts.decoded_at` equals ``materialize`` at any positions: every layout, bit width
  (3 and 5 bits cross byte boundaries) and a vector codebook."""
  rng = np.random.default_rng(290)
  for k in (2, 8, 16, 32, 200):
    for layout in ("tensor", "col", "row", "group"):
      w = make_scaled(rng, 40, 27, k, layout, sgs=12, group_size=16)
      pos = jnp.arange(40 * 27, dtype=jnp.int32)
      np.testing.assert_array_equal(np.asarray(parts.decoded_at(w, pos)),
                                    np.asarray(w.materialize()).reshape(-1))
  cb = jnp.asarray(rng.normal(size=(3, 8, 2)), jnp.float32)  # per channel (axis=0), d=2
  idx = rng.integers(0, 8, (3, 5))
  wv = SharedArray(packing.pack(idx, 3), cb, (3, 10), jnp.float32, 3, axis=0, vector_dim=2)
  qws_jax.validate_shared_array(wv, "wv")
  np.testing.assert_array_equal(np.asarray(parts.decoded_at(wv, jnp.arange(30))),
                                np.asarray(wv.materialize()).reshape(-1))


def test_tpu_kernel_refuses_scales_and_dispatch_falls_back():
  rng = np.random.default_rng(306)
  w = make_scaled(rng, 256, 128, 16, "tensor", sgs=64)
  why = ops.pallas_unsupported(w, "mosaic")
  assert why and "scale" in why
  assert ops.pallas_unsupported(w, "triton") is None
  assert _common.resolve_impl(None, functools.partial(ops.pallas_unsupported, w)) == "xla"
  x = jnp.ones((2, 256), jnp.float32)
  with pytest.raises(NotImplementedError, match="scale"):
    ops._run(x, w, "mosaic_interpret", BlockSizes())


def test_jit_second_call_does_not_retrace():
  rng = np.random.default_rng(318)
  traces = []

  @jax.jit
  def f(x, w):
    traces.append(1)
    return shared_matmul(x, w)

  w1, w2 = (make_scaled(rng, 48, 24, 16, sgs=16) for _ in range(2))
  x = jnp.asarray(rng.normal(size=(2, 48)), jnp.float32)
  for w in (w1, w2):
    assert_close(f(x, w), shared_matmul_reference(x, w), jnp.float32)
  assert len(traces) == 1
