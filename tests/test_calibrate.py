"""Tests of `qws_jax.calibrate` and the calibrated per-leaf quantiser."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qws_jax
from qws_jax._src import calibrated
from qws_jax._src import tree as tree_lib
from qws_jax._src.calibrate import LeafStats



def _normal(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _gram(x):
  x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  return x.T @ x


def _close(a, b, rtol=1e-4):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# ----------------------------------------------------------------------------- calibrate


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name="fc1")(x))
    return nn.Dense(3, name="fc2")(h)


def test_linen_mlp_matches_numpy_reference():
  model = _MLP()
  xs = [_normal(5, 7, 8, seed=i) for i in range(3)]
  variables = model.init(jax.random.key(0), xs[0])
  stats, summary = qws_jax.calibrate(lambda v, x: model.apply(v, x), variables,
                                     [(x,) for x in xs], return_summary=True)
  p = variables["params"]
  s1, s2 = stats["params"]["fc1"]["kernel"], stats["params"]["fc2"]["kernel"]
  assert isinstance(s1, LeafStats) and s1.contract_axes == (0,) and s1.shape == (8, 16)
  assert stats["params"]["fc1"]["bias"] is None
  x = np.concatenate([a.reshape(-1, 8) for a in xs])
  h = np.maximum(x @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"]), 0)
  _close(s1.gram, _gram(x))
  _close(s2.gram, _gram(h))
  assert float(s1.count) == float(s2.count) == 105.0
  assert s1.gram.dtype == jnp.float32
  assert set(summary.used) == {"params/fc1/kernel", "params/fc2/kernel"}
  assert set(summary.skipped) == {"params/fc1/bias", "params/fc2/bias"}
  s1.validate("params/fc1/kernel")


def test_nnx_model_through_split_merge():
  model = nnx.Sequential(nnx.Linear(6, 10, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(10, 4, rngs=nnx.Rngs(1)))
  graphdef, state = nnx.split(model)
  x = _normal(32, 6)
  stats = qws_jax.calibrate(lambda s, x: nnx.merge(graphdef, s)(x), state, [(x,)])
  leaves = {tree_lib.path_str(p): v for p, v in
            jax.tree_util.tree_leaves_with_path(stats, is_leaf=lambda v: isinstance(v, LeafStats))}
  kernels = {p: v for p, v in leaves.items() if isinstance(v, LeafStats)}
  assert len(kernels) == 2, leaves
  first = [v for p, v in kernels.items() if "0" in p.split("/")][0]
  _close(first.gram, _gram(x))


def test_torch_layout_out_in_weight():
  w = _normal(5, 12)  # (out, in), used as x @ w.T
  x = _normal(40, 12, seed=1)
  stats = qws_jax.calibrate(lambda p, x: x @ p["w"].T, {"w": w}, [(x,)])
  s = stats["w"]
  assert s.contract_axes == (1,) and s.output_axes == (0,) and s.size == 12
  _close(s.gram, _gram(x))
  # A bfloat16 weight cast before a squeezed, transposed use still counts.
  wb = jnp.asarray(w[None], jnp.bfloat16)
  sb = qws_jax.calibrate(lambda p, x: x @ jnp.squeeze(p, 0).astype(jnp.float32).T, wb,
                         [(x,)], progress=True)
  assert sb.shape == (1, 5, 12) and sb.contract_axes == (2,)
  _close(sb.gram, _gram(x))


def test_einsum_and_reshaped_weight():
  model = nn.Einsum((8, 3, 4), "btd,dhk->bthk", use_bias=False)
  x = _normal(2, 5, 8)
  v = model.init(jax.random.key(0), x)
  s = qws_jax.calibrate(lambda v, x: model.apply(v, x), v, [(x,)])["params"]["kernel"]
  assert s.contract_axes == (0,) and s.size == 8
  _close(s.gram, _gram(x))
  # (out, a, b) weight reshaped and transposed before the matmul: contracts (a, b).
  w = _normal(4, 3, 5)
  x2 = _normal(30, 15, seed=2)
  s2 = qws_jax.calibrate(lambda p, x: x @ p.reshape(4, 15).T, w, [(x2,)])
  assert s2.contract_axes == (1, 2)
  _close(s2.gram, _gram(x2))
  # (a, b, out) kernel whose contracted axes are permuted relative to the input.
  w3 = _normal(3, 5, 2)
  x3 = _normal(20, 5, 3, seed=3)  # contracts x3[:, j, i] with w3[i, j]
  s3 = qws_jax.calibrate(lambda p, x: jnp.einsum("nji,ijo->no", x, p), w3, [(x3,)])
  assert s3.contract_axes == (0, 1)
  _close(s3.gram, _gram(np.transpose(x3, (0, 2, 1)).reshape(20, 15)))


def _im2col(x, kh, kw):
  """NHWC patches of a 'SAME'-padded stride-1 conv, rows ordered (h, w, c)."""
  n, hh, ww, c = x.shape
  ph, pw = (kh - 1) // 2, (kw - 1) // 2
  xp = np.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
  rows = []
  for b in range(n):
    for i in range(hh):
      for j in range(ww):
        rows.append(xp[b, i:i + kh, j:j + kw, :].reshape(-1))
  return np.stack(rows)


def test_conv_gram_is_im2col_of_flattened_kernel():
  conv = nn.Conv(4, (3, 2), padding="SAME")
  x = _normal(2, 5, 6, 3)
  v = conv.init(jax.random.key(0), x)
  s = qws_jax.calibrate(lambda v, x: conv.apply(v, x), v, [(x,)])["params"]["kernel"]
  assert s.shape == (3, 2, 3, 4) and s.contract_axes == (0, 1, 2)
  patches = _im2col(x, 3, 2)
  _close(s.gram, _gram(patches))
  assert float(s.count) == patches.shape[0]
  # The Gram describes the flattened kernel: x_patch @ W.reshape(-1, out) is the conv.
  y = np.asarray(conv.apply(v, x)).reshape(-1, 4) - np.asarray(v["params"]["bias"])
  _close(patches @ np.asarray(v["params"]["kernel"]).reshape(-1, 4), y, rtol=1e-3)


def test_weight_used_twice_sums_and_unused_leaf_listed():
  p = {"w": _normal(6, 6), "unused": _normal(6, 6, seed=1), "scale": _normal(6, seed=2)}
  x = _normal(10, 6, seed=3)

  def fn(p, x):
    h = jnp.tanh(x @ p["w"])
    return (h @ p["w"]) * p["scale"][None]

  stats, summary = qws_jax.calibrate(fn, p, [(x,)], return_summary=True)
  h = np.tanh(x @ p["w"])
  _close(stats["w"].gram, _gram(x) + _gram(h))
  assert float(stats["w"].count) == 20.0
  assert stats["unused"] is None and stats["scale"] is None
  assert set(summary.skipped) == {"unused", "scale"}
  assert "not used" in summary.skipped["unused"]


def test_diagonal_mode_is_diagonal_of_full():
  p = {"w": _normal(9, 4)}
  batches = [(_normal(7, 9, seed=i),) for i in range(3)]
  fn = lambda p, x: x @ p["w"]  # noqa: E731
  full = qws_jax.calibrate(fn, p, batches)["w"]
  diag = qws_jax.calibrate(fn, p, batches, diagonal=True)["w"]
  assert diag.diagonal and diag.gram.shape == (9,)
  _close(diag.gram, np.diag(np.asarray(full.gram)))
  _close(diag.hessian_diagonal(), full.hessian_diagonal())


def test_control_flow_and_call_primitives():
  ws = {n: _normal(4, 4, seed=i) for i, n in enumerate(["scan", "cond", "remat", "jit", "loop"])}
  x = _normal(5, 4, seed=9)

  @jax.custom_jvp
  def act(a):
    return jnp.tanh(a)

  act.defjvp(lambda primals, tangents: (act(primals[0]), tangents[0]))

  def fn(p, x):
    y = jax.lax.scan(lambda c, _: (act(c @ p["scan"]), None), x, None, length=3)[0]
    z = jax.lax.cond(jnp.sum(x) > -1e9, lambda a: a @ p["cond"], lambda a: a, x)
    r = jax.checkpoint(lambda a: a @ p["remat"])(x)
    j = jax.jit(lambda a, w: a @ w)(x, p["jit"])
    l = jax.lax.fori_loop(0, 2, lambda i, c: c @ p["loop"], x)
    return y + z + r + j + l

  stats = qws_jax.calibrate(fn, ws, [(x,)])
  for n in ("cond", "remat", "jit"):
    _close(stats[n].gram, _gram(x))
  h1 = np.tanh(x @ ws["scan"])
  h2 = np.tanh(h1 @ ws["scan"])
  _close(stats["scan"].gram, _gram(x) + _gram(h1) + _gram(h2))
  _close(stats["loop"].gram, _gram(x) + _gram(x @ ws["loop"]))
  assert float(stats["scan"].count) == 15.0


def test_one_compile_per_batch_shape_and_bad_batch_named():
  traces = []

  def fn(p, x):
    traces.append(x.shape)
    return x @ p

  w = _normal(3, 2)
  qws_jax.calibrate(fn, w, [(_normal(4, 3, seed=i),) for i in range(4)])
  assert len(traces) == 2  # one shape check + one jit trace for all four batches
  traces.clear()
  qws_jax.calibrate(fn, w, [(_normal(4, 3),), (_normal(6, 3),), (_normal(6, 3),)])
  assert len(traces) == 4
  with pytest.raises(ValueError, match=r"calibration batch 1 .*dot_general"):
    qws_jax.calibrate(fn, w, [(_normal(4, 3),), (_normal(4, 5),)])
  with pytest.raises(ValueError, match="empty"):
    qws_jax.calibrate(fn, w, [])


def test_leaf_stats_validate():
  s = LeafStats(jnp.zeros((3, 3), jnp.float32), jnp.float32(2.0), (3, 2), (0,))
  s.validate()
  with pytest.raises(ValueError, match="gram shape"):
    dataclasses.replace(s, gram=jnp.zeros((2, 2), jnp.float32)).validate("a/b")
  with pytest.raises(ValueError, match="contract_axes"):
    dataclasses.replace(s, contract_axes=(2,)).validate()
  with pytest.raises(ValueError, match="count"):
    dataclasses.replace(s, count=jnp.float32(0.0)).validate()
  leaves = jax.tree_util.tree_leaves(s)
  assert len(leaves) == 2  # gram and count are children, the rest is static


# ----------------------------------------------------------------------------- quantize_leaf

K_IN = N_OUT = 64


@pytest.fixture(scope="module")
def problem():
  """Heavy-tailed weights and correlated, unevenly scaled inputs (like real layers)."""
  rng = np.random.default_rng(1)
  mix = rng.normal(size=(K_IN, K_IN)).astype(np.float32) / np.sqrt(K_IN)
  scale = np.exp(rng.normal(size=K_IN)).astype(np.float32)
  x = (rng.normal(size=(1024, K_IN)).astype(np.float32) @ mix) * scale
  w = (rng.standard_t(4, size=(K_IN, N_OUT)) * 0.05).astype(np.float32)
  stats = qws_jax.calibrate(lambda p, x: x @ p, w, [(x,)])
  return w, stats


def _err(w, out, stats, **layout):
  return calibrated.output_error(w, calibrated.dequantize(out, w.shape, **layout), stats)


def test_quantize_leaf_beats_kmeans_and_wrong_hessians(problem):
  w, stats = problem
  k = 4
  res = qws_jax.kmeans(jnp.asarray(w.reshape(-1)), k)
  plain = np.asarray(res.centroids)[np.asarray(res.assignments)].reshape(w.shape)
  e_plain = calibrated.output_error(w, plain, stats)
  out = calibrated.quantize_leaf(w, stats, k=k)
  e_cal = _err(w, out, stats)
  assert e_cal < 0.5 * e_plain
  cb, idx = np.asarray(out["codebook"]), np.asarray(out["indices"])
  assert cb.shape == (k,) and np.all(np.diff(cb) >= 0)
  assert idx.shape == w.shape and idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < k
  # The Hessian in reversed row order (a wrong reduction order) must be much worse.
  rev = dataclasses.replace(stats, gram=stats.gram[::-1, ::-1])
  assert _err(w, calibrated.quantize_leaf(w, rev, k=k), stats) > 2 * e_cal
  # The square weight quantised along the wrong axis (stats claiming torch layout).
  wrong = dataclasses.replace(stats, contract_axes=(1,))
  assert _err(w, calibrated.quantize_leaf(w, wrong, k=k), stats) > 2 * e_cal


def test_refit_never_increases_error(problem):
  w, stats = problem
  for layout in ({}, {"axis": 1}, {"group_size": 32}):
    errs = [_err(w, calibrated.quantize_leaf(w, stats, k=4, refit_iters=r, **layout), stats,
                 **layout) for r in (0, 1, 2)]
    assert errs[1] <= errs[0] * (1 + 1e-5) and errs[2] <= errs[1] * (1 + 1e-5), (layout, errs)
  # Diagonal statistics: no error feedback, but still better than plain k-means.
  diag = dataclasses.replace(stats, gram=jnp.diagonal(stats.gram), diagonal=True)
  e0 = _err(w, calibrated.quantize_leaf(w, diag, k=4, refit_iters=0), stats)
  e1 = _err(w, calibrated.quantize_leaf(w, diag, k=4, refit_iters=1), stats)
  assert e1 <= e0 * (1 + 1e-5)


def test_outliers_exact_and_lower_error(problem):
  w, stats = problem
  base = _err(w, calibrated.quantize_leaf(w, stats, k=4), stats)
  out = calibrated.quantize_leaf(w, stats, k=4, outliers=0.02)
  pos = np.asarray(out["outlier_positions"])
  assert pos.dtype == np.int32 and pos.size == round(0.02 * w.size)
  assert np.all(np.diff(pos) > 0)
  deq = np.asarray(calibrated.dequantize(out, w.shape)).reshape(-1)
  np.testing.assert_array_equal(deq[pos], w.reshape(-1)[pos])
  e_out = _err(w, out, stats)
  assert e_out < base
  # Re-clustering the error-compensated weights (kept only if it lowers the error).
  again = calibrated.quantize_leaf(w, stats, k=4, outliers=0.02, recluster_iters=1)
  assert _err(w, again, stats) <= e_out * (1 + 1e-5)
  for crit in ("error", "sensitivity"):
    o = calibrated.quantize_leaf(w, stats, k=4, outliers=0.02, outlier_criterion=crit)
    d = np.asarray(calibrated.dequantize(o, w.shape)).reshape(-1)
    p = np.asarray(o["outlier_positions"])
    np.testing.assert_array_equal(d[p], w.reshape(-1)[p])
    assert _err(w, o, stats) < base
  with pytest.raises(ValueError, match="outliers"):
    calibrated.quantize_leaf(w, stats, k=4, outliers=0.1)
  with pytest.raises(ValueError, match="outlier_criterion"):
    calibrated.quantize_leaf(w, stats, k=4, outliers=0.01, outlier_criterion="largest")


def test_scales_decode(problem):
  w, stats = problem
  g = 32
  out = calibrated.quantize_leaf(w, stats, k=4, scale_group_size=g, codebook_dtype=jnp.float16)
  s = np.asarray(out["scales"])
  assert s.dtype == np.float16 and s.shape == (K_IN // g, N_OUT)
  np.testing.assert_array_equal(s, np.abs(w).reshape(K_IN // g, g, N_OUT).max(1).astype(np.float16))
  cb = np.asarray(out["codebook"], np.float32)
  assert out["codebook"].dtype == jnp.float16 and np.abs(cb).max() <= 1.01
  manual = cb[np.asarray(out["indices"])] * np.repeat(s.astype(np.float32), g, axis=0)
  deq = np.asarray(calibrated.dequantize(out, w.shape, scale_group_size=g))
  np.testing.assert_allclose(deq, manual, rtol=1e-6)
  res = qws_jax.kmeans(jnp.asarray(w.reshape(-1)), 4)
  plain = np.asarray(res.centroids)[np.asarray(res.assignments)].reshape(w.shape)
  assert calibrated.output_error(w, deq, stats) < calibrated.output_error(w, plain, stats)


def test_layouts_and_torch_equivalence(problem):
  w, stats = problem
  out = calibrated.quantize_leaf(w, stats, k=4, group_size=32)
  assert out["codebook"].shape == (K_IN // 32, N_OUT, 4)
  assert np.all(np.diff(np.asarray(out["codebook"]), axis=-1) >= 0)
  # The same layer stored torch-style (out, in): per-output-channel codebooks agree.
  x = _normal(256, K_IN, seed=7)
  st_in = qws_jax.calibrate(lambda p, x: x @ p, w, [(x,)])
  st_t = qws_jax.calibrate(lambda p, x: x @ p.T, w.T.copy(), [(x,)])
  a = calibrated.quantize_leaf(w, st_in, k=4, axis=1)
  b = calibrated.quantize_leaf(w.T.copy(), st_t, k=4, axis=0)
  assert b["codebook"].shape == (N_OUT, 4)
  np.testing.assert_array_equal(np.asarray(a["indices"]), np.asarray(b["indices"]).T)
  np.testing.assert_allclose(np.asarray(a["codebook"]), np.asarray(b["codebook"]), rtol=1e-5,
                             atol=1e-7)


def test_quantize_leaf_errors(problem):
  w, stats = problem
  with pytest.raises(ValueError, match=r"shape \(64, 64\).*shape \(64, 32\)"):
    calibrated.quantize_leaf(w[:, :32], stats, k=4)
  st_t = qws_jax.calibrate(lambda p, x: x @ p.T, w.T.copy(), [(_normal(8, K_IN),)])
  with pytest.raises(NotImplementedError, match="group_size"):
    calibrated.quantize_leaf(w.T, st_t, k=4, group_size=32)
  with pytest.raises(NotImplementedError, match="scale_group_size"):
    calibrated.quantize_leaf(w.T, st_t, k=4, scale_group_size=32)
  with pytest.raises(ValueError, match="scale_group_size=128 does not fit"):
    calibrated.quantize_leaf(w, stats, k=4, scale_group_size=128)
  with pytest.raises(ValueError, match="axis"):
    calibrated.quantize_leaf(w, stats, k=4, axis=2)
  with pytest.raises(TypeError, match="LeafStats"):
    calibrated.quantize_leaf(w, np.eye(K_IN), k=4)


def test_conv_kernel_quantized_along_its_reduction_axes():
  conv = nn.Conv(8, (3, 3), padding="SAME", use_bias=False)
  x = _normal(4, 6, 6, 4, seed=11) * np.exp(_normal(4, seed=12))
  v = conv.init(jax.random.key(0), x)
  kern = np.asarray(v["params"]["kernel"])  # (3, 3, 4, 8): rows of the view = (h, w, in)
  s = qws_jax.calibrate(lambda v, x: conv.apply(v, x), v, [(x,)])["params"]["kernel"]
  out = calibrated.quantize_leaf(kern, s, k=4, group_size=12)
  assert out["codebook"].shape == (3, 8, 4)
  res = qws_jax.kmeans(jnp.asarray(kern.reshape(-1)), 4)
  plain = np.asarray(res.centroids)[np.asarray(res.assignments)].reshape(kern.shape)
  e = _err(kern, out, s, group_size=12)
  assert e < calibrated.output_error(kern, plain, s)
  # The same kernel stored (out, in, h, w) (torch layout) contracts axes (1, 2, 3).
  oihw = np.transpose(kern, (3, 2, 0, 1)).copy()
  dn = ("NHWC", "OIHW", "NHWC")
  s_t = qws_jax.calibrate(
      lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn),
      oihw, [(x,)])
  assert s_t.contract_axes == (1, 2, 3)
  # Gram index (in, h, w) row-major = the (h, w, in) Gram permuted.
  perm = np.transpose(np.arange(36).reshape(3, 3, 4), (2, 0, 1)).reshape(-1)
  _close(s_t.gram, np.asarray(s.gram)[np.ix_(perm, perm)])
  with pytest.raises(NotImplementedError, match="group_size"):
    calibrated.quantize_leaf(oihw, s_t, k=4, group_size=12)
  o_t = calibrated.quantize_leaf(oihw, s_t, k=4, axis=0)
  assert o_t["codebook"].shape == (8, 4)
  assert _err(oihw, o_t, s_t, axis=0) < calibrated.output_error(
      oihw, np.transpose(plain, (3, 2, 0, 1)), s_t)


# ----------------------------------------------------------------------------- stacked layers


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(8, use_bias=False, name="dense")(h)), None


class _ScanNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)
    h, _ = scan(name="layers")(x, None)
    return h


def _per_layer_inputs(ws, x):
  ins, h = [], x
  for w in ws:
    ins.append(h)
    h = np.tanh(h @ w)
  return ins


def test_scanned_layers_get_stacked_per_layer_statistics():
  model = _ScanNet()
  x = _normal(5, 8, seed=1)
  params = model.init(jax.random.key(0), x)["params"]
  stats = qws_jax.calibrate(lambda p, x: model.apply({"params": p}, x), params, [(x,), (2 * x,)])
  st = stats["layers"]["dense"]["kernel"]
  assert (st.stack_axes, st.contract_axes, st.gram.shape, st.count.shape) == (1, (1,), (3, 8, 8),
                                                                            (3,))
  st.validate()
  ws = np.asarray(params["layers"]["dense"]["kernel"])
  want = [_gram(a) + _gram(b) for a, b in zip(_per_layer_inputs(ws, x),
                                               _per_layer_inputs(ws, 2 * x))]
  for i in range(3):  # layer i's statistics are its own inputs, not the sum over layers
    _close(st.slice(i).gram, want[i])
    assert float(st.slice(i).count) == 10.0
  np.testing.assert_allclose(np.asarray(st.hessian_diagonal()),
                             np.stack([np.diag(w) for w in want]) / 10.0, rtol=1e-4)


def test_nnx_scan_statistics_and_calibrated_stacked_share():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(16, 16, use_bias=False, rngs=rngs)

  class Net(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=4)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(r):
        return Block(r)
      self.layers = make(rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def step(block, h):
        return jnp.tanh(block.linear(h))
      return step(self.layers, x)

  model = Net(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  xs = [(_normal(32, 16, seed=i),) for i in range(4)]
  stats = qws_jax.calibrate(fn, state, xs)
  st = stats["layers"]["linear"]["kernel"]
  assert st.stack_axes == 1 and st.gram.shape == (4, 16, 16)
  w = np.asarray(state["layers"]["linear"]["kernel"][...])
  # Per layer, the calibrated slice equals sharing that layer alone with its statistics.
  out = qws_jax.share(state, k=4, stack_axes=1, calibration=stats, predicate=lambda p, l: l.ndim == 3)
  leaf = out["layers"]["linear"]["kernel"].get_value()
  assert leaf.stack_shape == (4,)
  for i in range(4):
    alone = qws_jax.share({"w": w[i]}, k=4, predicate=lambda *_: True,
                          calibration={"w": st.slice(i)})["w"]
    np.testing.assert_array_equal(np.asarray(leaf.materialize()[i]), np.asarray(alone.materialize()))
    plain = qws_jax.share({"w": w[i]}, k=4, predicate=lambda *_: True)["w"]
    e_cal = calibrated.output_error(w[i], np.asarray(alone.materialize()), st.slice(i))
    e_plain = calibrated.output_error(w[i], np.asarray(plain.materialize()), st.slice(i))
    assert e_cal < e_plain  # the statistics are used
  # Stacked statistics need stack_axes; the error says so.
  with pytest.raises(ValueError, match="stack_axes"):
    qws_jax.share(state, k=4, calibration=stats, predicate=lambda p, l: l.ndim == 3)
