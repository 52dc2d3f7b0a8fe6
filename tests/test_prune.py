"""prune / prune_optimizer: exact sparsity, selection, zeros kept through training, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qws_jax
from qws_jax._src import prune as prune_lib


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(64, 48)).astype(np.float32)),
                  "bias": jnp.asarray(rng.normal(size=(48,)).astype(np.float32))},
      "Dense_1": {"kernel": jnp.asarray((3.0 * rng.normal(size=(48, 40))).astype(np.float32)),
                  "bias": jnp.asarray(rng.normal(size=(40,)).astype(np.float32))},
      "step": jnp.asarray(3, jnp.int32),
  }


def _zeros(x) -> int:
  return int((np.asarray(x) == 0).sum())


@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.9, 0.999])
def test_leaf_scope_exact_count_and_smallest_magnitudes(sparsity):
  p = _params()
  out = qws_jax.prune(p, sparsity)
  for name in ("Dense_0", "Dense_1"):
    w, o = np.asarray(p[name]["kernel"]), np.asarray(out[name]["kernel"])
    n_pruned = round(sparsity * w.size)
    assert _zeros(o) == n_pruned
    assert o.dtype == w.dtype and o.shape == w.shape
    kept = o != 0
    np.testing.assert_array_equal(o[kept], w[kept])  # survivors untouched
    if 0 < n_pruned < w.size:
      assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()
  # Unselected leaves are the same objects.
  assert out["Dense_0"]["bias"] is p["Dense_0"]["bias"]
  assert out["step"] is p["step"]


def test_ties_broken_by_flat_index():
  w = jnp.asarray(np.tile(np.array([1.0, -1.0, 2.0, 0.5], np.float32), (32, 16)))  # (32, 64)
  out = np.asarray(qws_jax.prune({"w": w}, 0.5)["w"])
  assert _zeros(out) == 1024
  flat = np.asarray(w).reshape(-1)
  ones = np.flatnonzero(np.abs(flat) == 1.0)
  # All 0.5s go (512) then the first 512 of the 1024 tied |w| == 1 in flat order.
  assert (out.reshape(-1)[np.abs(flat) == 0.5] == 0).all()
  assert (out.reshape(-1)[ones[:512]] == 0).all() and (out.reshape(-1)[ones[512:]] != 0).all()


def test_global_scope_one_threshold():
  p = _params()
  out = qws_jax.prune(p, 0.8, scope="global")
  w0, w1 = np.asarray(p["Dense_0"]["kernel"]), np.asarray(p["Dense_1"]["kernel"])
  o0, o1 = np.asarray(out["Dense_0"]["kernel"]), np.asarray(out["Dense_1"]["kernel"])
  total = w0.size + w1.size
  assert _zeros(o0) + _zeros(o1) == round(0.8 * total)
  # One threshold: every removed magnitude <= every kept magnitude, across leaves.
  removed = np.concatenate([np.abs(w0[o0 == 0]), np.abs(w1[o1 == 0])])
  kept = np.concatenate([np.abs(w0[o0 != 0]), np.abs(w1[o1 != 0])])
  assert removed.max() <= kept.min()
  # Dense_1 has 3x larger weights, so it keeps more than Dense_0.
  assert _zeros(o1) / w1.size < _zeros(o0) / w0.size
  assert out["Dense_1"]["bias"] is p["Dense_1"]["bias"]


def test_rules_predicate_and_per_leaf_rate():
  p = _params()
  out = qws_jax.prune(p, 0.5, rules=[qws_jax.Rule("Dense_1", sparsity=0.25),
                                     qws_jax.Rule("Dense_0/bias", sparsity=0.5)])
  assert _zeros(out["Dense_0"]["kernel"]) == round(0.5 * 64 * 48)
  assert _zeros(out["Dense_1"]["kernel"]) == round(0.25 * 48 * 40)
  assert _zeros(out["Dense_0"]["bias"]) == 24  # selected by its rule despite ndim 1
  assert _zeros(out["Dense_1"]["bias"]) == 10  # "Dense_1" matches the bias too: selected
  out = qws_jax.prune(p, 0.5, rules=[qws_jax.Rule("Dense_0", skip=True)])
  assert out["Dense_0"]["kernel"] is p["Dense_0"]["kernel"]
  assert _zeros(out["Dense_1"]["kernel"]) == 960
  out = qws_jax.prune(p, 0.5, predicate=lambda path, leaf: path.endswith("Dense_0/kernel"))
  assert out["Dense_1"]["kernel"] is p["Dense_1"]["kernel"]
  # Global scope: a rule's own rate is applied to that leaf alone.
  out = qws_jax.prune(p, 0.9, scope="global", rules=[qws_jax.Rule("Dense_0/kernel",
                                                                  sparsity=0.1)])
  assert _zeros(out["Dense_0"]["kernel"]) == round(0.1 * 64 * 48)
  assert _zeros(out["Dense_1"]["kernel"]) == round(0.9 * 48 * 40)


def test_jit_matches_eager_and_dtypes_kept():
  p = {"a": jnp.asarray(np.random.default_rng(1).normal(size=(40, 40)), jnp.bfloat16),
       "b": jnp.asarray(np.random.default_rng(2).normal(size=(40, 40)), jnp.float32)}
  for scope in ("leaf", "global"):
    eager = qws_jax.prune(p, 0.7, scope=scope)
    jitted = jax.jit(lambda t, s=scope: qws_jax.prune(t, 0.7, scope=s))(p)
    for name in p:
      assert eager[name].dtype == p[name].dtype
      np.testing.assert_array_equal(np.asarray(eager[name], np.float32),
                                    np.asarray(jitted[name], np.float32))


def test_compressed_leaves_pass_through():
  p = _params()
  shared = qws_jax.share({"w": p["Dense_0"]["kernel"]}, k=4)
  out = qws_jax.prune(shared, 0.5)
  assert out["w"] is shared["w"]


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 2])
def test_bad_sparsity_value(bad):
  with pytest.raises(ValueError, match=r"sparsity=.*\[0, 1\)"):
    qws_jax.prune(_params(), bad)


def test_bad_sparsity_in_rule_names_path():
  with pytest.raises(ValueError, match=r"'Dense_1/kernel'.*sparsity=1.5"):
    qws_jax.prune(_params(), 0.5, rules=[qws_jax.Rule("Dense_1/kernel", sparsity=1.5)])


def test_errors_type_scope_unknown_option_non_floating():
  with pytest.raises(TypeError, match="sparsity must be"):
    qws_jax.prune(_params(), "0.5")
  with pytest.raises(TypeError, match="sparsity must be"):
    qws_jax.prune(_params(), True)
  with pytest.raises(ValueError, match="scope='layer'"):
    qws_jax.prune(_params(), 0.5, scope="layer")
  with pytest.raises(ValueError, match=r"unknown option.*\['k'\]"):
    qws_jax.prune(_params(), 0.5, rules=[qws_jax.Rule("Dense", k=4)])
  with pytest.raises(TypeError, match="'step'.*int32"):
    qws_jax.prune(_params(), 0.5, rules=[qws_jax.Rule("step")])


def _loss(p, x, y):
  h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None])
  return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None] - y) ** 2)


@pytest.mark.parametrize("make_tx", [lambda: optax.adam(1e-2),
                                     lambda: optax.adamw(1e-2, weight_decay=0.1),
                                     lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                                         optax.sgd(0.1, momentum=0.9))],
                         ids=["adam", "adamw", "sgd_momentum"])
def test_pruned_weights_stay_zero_under_jit(make_tx):
  p = qws_jax.prune(_params(), 0.9)
  p.pop("step")
  zeros_before = {n: np.asarray(p[n]["kernel"]) == 0 for n in ("Dense_0", "Dense_1")}
  tx = qws_jax.prune_optimizer(make_tx())
  state = tx.init(p)
  assert len(state.masks) == 2
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(16, 64)).astype(np.float32))
  y = jnp.asarray(rng.normal(size=(16, 40)).astype(np.float32))

  @jax.jit
  def step(p, state):
    g = jax.grad(_loss)(p, x, y)
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state

  loss0 = float(_loss(p, x, y))
  p1 = p
  with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction is not strict-clean
    for _ in range(5):
      p1, state = step(p1, state)
  assert float(_loss(p1, x, y)) < loss0  # it trains
  for n, z in zeros_before.items():
    w = np.asarray(p1[n]["kernel"])
    assert (w[z] == 0).all() and not np.signbit(w[z]).any()  # exact +0
    assert (w[~z] != np.asarray(p[n]["kernel"])[~z]).any()  # survivors move
  assert not np.array_equal(np.asarray(p1["Dense_0"]["bias"]), np.asarray(p["Dense_0"]["bias"]))


def test_prune_optimizer_state_and_mismatch_error():
  p = qws_jax.prune({"w": jnp.asarray(np.random.default_rng(0).normal(size=(32, 64)),
                                      jnp.float32)}, 0.5)
  tx = qws_jax.prune_optimizer(optax.adam(1e-2))
  state = tx.init(p)
  assert isinstance(state, prune_lib.PruneState)
  np.testing.assert_array_equal(np.asarray(state.masks[0]), np.asarray(p["w"]) != 0)
  other = {"w": jnp.ones((32, 32), jnp.float32)}
  with pytest.raises(ValueError, match=r"'w' has shape \(32, 32\)"):
    tx.update(other, state, other)
  with pytest.raises(ValueError, match="1 leaves selected now, 0 at init"):
    tx.update(p, tx.init({"b": jnp.ones((3,), jnp.float32)}), p)


def test_nnx_state_and_optimizer():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  pruned = qws_jax.prune(nnx.state(model, nnx.Param), 0.75)
  nnx.update(model, pruned)
  zeros = np.asarray(model.kernel[...]) == 0
  assert zeros.sum() == 0.75 * 64 * 32
  opt = nnx.Optimizer(model, qws_jax.prune_optimizer(optax.sgd(0.1, momentum=0.9)),
                      wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32))

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads)

  before = np.asarray(model.kernel[...]).copy()
  for _ in range(3):
    step(model, opt)
  after = np.asarray(model.kernel[...])
  assert (after[zeros] == 0).all() and (after[~zeros] != before[~zeros]).any()
