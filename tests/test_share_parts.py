"""share's leaf-part options: calibration, outliers, group scales, codebook dtype, pruned
zeros and stacked (scanned) layers, end to end through apply, training and checkpoints."""

from __future__ import annotations

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qws_jax
from qws_jax._src import types

from _compress_helpers import float_values


def _out_err(w, q, x):
  d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
  return float(np.sum((np.asarray(x, np.float64) @ d) ** 2))


@pytest.fixture(scope="module")
def layer():
  rng = np.random.default_rng(0)
  # Inputs with very unequal channel scales: what calibration is for.
  x = rng.standard_normal((512, 128)) * np.exp(rng.standard_normal(128))
  w = rng.standard_normal((128, 48)) * 0.1
  w[rng.random(w.shape) < 0.003] *= 30  # a few large weights
  return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


def test_calibration_lowers_the_output_error_and_follows_the_reduction_axis(layer):
  x, w = layer
  stats = qws_jax.calibrate(lambda p, x: x @ p["w"], {"w": w}, [(x,)])
  plain = qws_jax.share({"w": w}, k=8)["w"]
  cal = qws_jax.share({"w": w}, k=8, calibration=stats)["w"]
  err_plain = _out_err(w, plain.materialize(), x)
  assert _out_err(w, cal.materialize(), x) < 0.9 * err_plain
  # The same layer stored torch-style (out, in): the statistics say axis 1 is contracted.
  stats_t = qws_jax.calibrate(lambda p, x: x @ p["w"].T, {"w": w.T}, [(x,)])
  assert stats_t["w"].contract_axes == (1,)
  cal_t = qws_jax.share({"w": w.T}, k=8, calibration=stats_t)["w"]
  assert _out_err(w, cal_t.materialize().T, x) < 0.9 * err_plain
  # A square weight quantised with the statistics of the other axis (what a wrong
  # reduction axis would do) is worse than with the right ones.
  sq = jnp.concatenate([w, w, w[:, :32]], axis=1)  # (128, 128)
  right = qws_jax.calibrate(lambda p, x: x @ p["w"], {"w": sq}, [(x,)])
  other = qws_jax.calibrate(lambda p, x: x @ p["w"].T, {"w": sq}, [(x,)])
  q_right = qws_jax.share({"w": sq}, k=8, calibration=right)["w"].materialize()
  q_other = qws_jax.share({"w": sq}, k=8, calibration=other)["w"].materialize()
  assert _out_err(sq, q_right, x) < 0.9 * _out_err(sq, q_other, x)


def test_outliers_are_kept_exactly(layer):
  x, w = layer
  stats = qws_jax.calibrate(lambda p, x: x @ p["w"], {"w": w}, [(x,)])
  base = qws_jax.share({"w": w}, k=4, calibration=stats)["w"]
  sa = qws_jax.share({"w": w}, k=4, calibration=stats, outliers=0.01)["w"]
  qws_jax.validate_shared_array(sa, "w")
  assert sa.num_outliers == round(0.01 * w.size)
  pos = np.asarray(sa.outlier_positions)
  dense = np.asarray(sa.materialize()).reshape(-1)
  np.testing.assert_array_equal(dense[pos], np.asarray(w).reshape(-1)[pos])
  # The largest weights are among them, and the output error drops.
  big = np.argsort(-np.abs(np.asarray(w)).reshape(-1))[:10]
  assert set(big) <= set(pos)
  assert _out_err(w, sa.materialize(), x) < _out_err(w, base.materialize(), x)
  assert sa.nbytes == base.nbytes + sa.num_outliers * 8
  # A lost outlier would show: the compressed matmul (apply's path) keeps them too.
  from qws_jax._src import ops  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(np.asarray(ops.matmul(x, sa)), np.asarray(x @ sa.materialize()),
                             rtol=1e-4, atol=1e-3)


def test_group_scales_and_codebook_dtype():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((384, 384)) * np.exp(rng.standard_normal((384, 1))),
                  jnp.float32)
  per_ch32 = qws_jax.share({"w": w}, k=16, axis=-1)["w"]
  per_ch16 = qws_jax.share({"w": w}, k=16, axis=-1, codebook_dtype=jnp.float16)["w"]
  # 16 entries per output channel over its 384 rows: f16 halves the codebook's share.
  assert per_ch32.bits_per_weight == pytest.approx(4 + 16 * 32 / 384, abs=1e-9)
  assert per_ch16.bits_per_weight == pytest.approx(4 + 16 * 16 / 384, abs=1e-9)
  assert per_ch16.codebook.dtype == jnp.float16
  lut = qws_jax.share({"w": w}, k=16, scale_group_size=64, codebook_dtype=jnp.float16)["w"]
  assert lut.bits_per_weight == pytest.approx(4.0 + 16 / 64 + 16 * 16 / w.size, abs=1e-9)
  assert lut.scales.shape == (6, 384) and lut.scales.dtype == jnp.float16
  plain = qws_jax.share({"w": w}, k=16)["w"]
  err = lambda sa: float(jnp.mean((sa.materialize() - w) ** 2))  # noqa: E731
  assert err(lut) < 0.5 * err(plain)  # rows of very different scales: scales pay


@pytest.mark.parametrize("kw,match", [
    (dict(outliers=0.2), r"leaf 'w': outliers must be a fraction in \[0, 0.1\)"),
    (dict(outliers=-0.01), "outliers"),
    (dict(scale_group_size=1000), r"leaf 'w': scale_group_size=1000 does not fit"),
    (dict(codebook_dtype=jnp.int8), "codebook_dtype must be one of"),
    (dict(stack_axes=2), "stack_axes=2"),
    (dict(sparse=True, k=2), "sparse=True needs k >= 3"),
])
def test_bad_part_options_name_the_leaf(kw, match):
  w = jnp.ones((64, 32), jnp.float32)
  with pytest.raises(ValueError, match=match):
    qws_jax.share({"w": w}, **{"k": 4, **kw})


def test_calibration_of_another_tree_is_refused(layer):
  x, w = layer
  stats = qws_jax.calibrate(lambda p, x: x @ p["w"], {"w": w}, [(x,)])
  with pytest.raises(ValueError, match="not in params: w.*another tree"):
    qws_jax.share({"v": w}, k=4, calibration=stats)
  with pytest.raises(ValueError, match="statistics of leaf 'w' are for shape"):
    qws_jax.share({"w": w[:64]}, k=4, calibration={"w": stats["w"]})
  with pytest.raises(NotImplementedError, match="sparse=True takes plain k-means"):
    qws_jax.share({"w": w}, k=4, sparse=True, outliers=0.01)


def test_rules_set_part_options_per_leaf(layer):
  _, w = layer
  out = qws_jax.share({"q": w, "v": w}, k=4, rules=[qws_jax.Rule("^q$", outliers=0.01)])
  assert out["q"].num_outliers > 0 and out["v"].outlier_values is None


# ----------------------------------------------------------------------------- sparse


def test_sparse_share_keeps_pruned_zeros_through_training_and_checkpoints(tmp_path):
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
            "b": jnp.zeros((32,), jnp.float32)}
  pruned = qws_jax.prune(params, 0.8, predicate=lambda p, l: l.ndim == 2)
  zero = np.asarray(pruned["w"]) == 0
  sc = qws_jax.share(pruned, k=8, sparse=True, predicate=lambda p, l: l.ndim == 2)
  sa = sc["w"]
  qws_jax.validate_shared_array(sa, "w")
  assert sa.sparse and sa.k == 8 and float(sa.codebook[0]) == 0.0
  dense = np.asarray(sa.materialize())
  assert np.all(dense[zero] == 0.0) and np.all(dense[~zero] != 0.0)
  # 7 clusters fitted to the non-zeros only: as good as sharing them alone.
  alone = qws_jax.share({"v": pruned["w"][~zero][:, None] * jnp.ones((1, 8))}, k=7,
                        predicate=lambda p, l: True)["v"]
  np.testing.assert_allclose(np.sort(np.unique(np.asarray(sa.codebook[1:]))),
                             np.sort(np.unique(np.asarray(alone.codebook))), rtol=1e-5)
  x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
  loss = lambda p: jnp.mean((x @ qws_jax.unshare(p)["w"] + p["b"][None, :] - 1.0) ** 2)  # noqa: E731
  tx = qws_jax.codebook_optimizer(optax.sgd(0.1))
  st = tx.init(sc)
  for _ in range(3):
    g = jax.grad(loss, allow_int=True)(sc)
    u, st = tx.update(g, st, sc)
    sc = optax.apply_updates(sc, u)
  assert float(sc["w"].codebook[0]) == 0.0
  assert np.all(np.asarray(sc["w"].materialize())[zero] == 0.0)
  qws_jax.save(tmp_path / "c", sc)
  back = qws_jax.restore(tmp_path / "c")["w"]
  np.testing.assert_array_equal(np.asarray(back.indices), np.asarray(sc["w"].indices))
  np.testing.assert_array_equal(np.asarray(back.codebook), np.asarray(sc["w"].codebook))


# ----------------------------------------------------------------------------- stacked


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return nn.relu(nn.Dense(640)(h)) + h, None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = scan()(x, None)
    return h


def _no_full_weight(jaxpr, rows):
  """Float values in the jaxpr (recursively) holding a whole decoded (rows, 640) weight."""
  return [(name, shp) for name, shp in float_values(jaxpr.jaxpr)
          if len(shp) >= 2 and shp[-2:] == (rows, 640)]


def test_linen_scan_over_stacked_leaves(tmp_path):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 640)), jnp.float32)
  params = _Scanned().init(jax.random.key(0), x)["params"]
  pc = qws_jax.share(params, k=16, rules=[qws_jax.Rule(r"Scan_Block_0/.*/kernel$", stack_axes=1)])
  kernel = pc["Scan_Block_0"]["Dense_0"]["kernel"]
  assert kernel.stack_shape == (3,) and kernel.shape == (640, 640)
  for i in range(3):  # each layer its own codebook: the one share gives that layer alone
    one = qws_jax.share({"k": params["Scan_Block_0"]["Dense_0"]["kernel"][i]}, k=16,
                        predicate=lambda p, l: True)["k"]
    np.testing.assert_array_equal(np.asarray(kernel.codebook[i]), np.asarray(one.codebook))
  want = _Scanned().apply({"params": qws_jax.unshare(pc)}, x)
  fwd = qws_jax.apply(_Scanned().apply)
  got = jax.jit(fwd)({"params": pc}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert not _no_full_weight(jax.make_jaxpr(fwd)({"params": pc}, x), 640)
  assert qws_jax.report(params, pc).leaves[1].shape == (3, 640, 640)
  qws_jax.save(tmp_path / "c", pc)
  back = qws_jax.restore(tmp_path / "c")
  np.testing.assert_array_equal(np.asarray(fwd({"params": back}, x)), np.asarray(got))


class _NBlock(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(640, 640, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.linear(x)) + x


class _NModel(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return _NBlock(rngs)
    self.blocks = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def fwd(block, x):
      return block(x)
    return fwd(self.blocks, x)


def test_nnx_scan_over_stacked_leaves():
  model = _NModel(nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 640)), jnp.float32)
  mc = qws_jax.nnx.share(model, k=16, rules=[qws_jax.Rule(r"blocks/.*/kernel$", stack_axes=1)])
  kernel = mc.blocks.linear.kernel.get_value()
  assert isinstance(kernel, types.SharedArray) and kernel.stack_shape == (3,)
  dense = nnx.merge(*nnx.split(mc))
  ref_params = qws_jax.unshare(nnx.to_pure_dict(nnx.state(mc, nnx.Param)))
  ref = _NModel(nnx.Rngs(0))
  nnx.update(ref, ref_params)
  np.testing.assert_allclose(np.asarray(mc(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)
  del dense
  graphdef, state = nnx.split(mc)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  assert not _no_full_weight(jaxpr, 640)


def test_calibrated_share_of_an_nnx_model():
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(64, 96, rngs=rngs)
      self.l2 = nnx.Linear(96, 32, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  model = Mlp(nnx.Rngs(0))
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((256, 64)) * np.exp(rng.standard_normal(64)), jnp.float32)
  graphdef, state = nnx.split(model)
  stats = qws_jax.calibrate(lambda s, x: nnx.merge(graphdef, s)(x), state, [(x,)])
  plain = qws_jax.nnx.share(model, k=4, predicate=lambda p, l: l.ndim == 2)
  cal = qws_jax.nnx.share(model, k=4, predicate=lambda p, l: l.ndim == 2, calibration=stats,
                          outliers=0.005, codebook_dtype=jnp.float16)
  assert cal.l1.kernel.get_value().num_outliers > 0
  ref = np.asarray(model(x))
  err = lambda m: float(np.mean((np.asarray(m(x)) - ref) ** 2))  # noqa: E731
  assert err(cal) < err(plain)
