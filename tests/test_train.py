"""codebook_optimizer: centroid gradients, frozen indices, fine-tuning (linen + NNX)."""

from __future__ import annotations

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qws_jax
import qws_jax.nnx
from qws_jax._src import train
from qws_jax._src import types

from _compress_helpers import hand_hashed, hand_share_tree, hand_shared


@pytest.mark.parametrize("kw", [{}, {"axis": 1}, {"axis": 0}, {"group_size": 5}],
                         ids=["tensor", "channel1", "channel0", "group5"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_codebook_grad_is_segment_reduction_of_dense_grad(kw, reduction):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(12, 6)).astype(np.float32)
  x = jnp.asarray(rng.normal(size=(4, 12)).astype(np.float32))
  sa = hand_shared(w, 4, **kw)

  def loss_dense(wd):
    return jnp.sum(jnp.tanh(x @ wd) ** 2)

  def loss_c(s):
    return loss_dense(s.materialize())

  g = jax.grad(loss_c, allow_int=True)(sa)
  assert g.indices.dtype == jax.dtypes.float0
  if reduction == "mean":
    g = train.cluster_mean_grads(g, sa)
  # Dense reference: segment reduction of d loss / d W by (codebook row, index).
  gd = np.asarray(jax.grad(loss_dense)(sa.materialize())).reshape(-1)
  idx = np.asarray(sa.unpacked_indices()).astype(np.int64)
  gid = types.group_ids(sa.shape, sa.axis, sa.group_size)
  seg = (idx if gid is None else np.asarray(gid) * sa.k + idx).reshape(-1)
  n = sa.codebook.size
  want = np.bincount(seg, weights=gd, minlength=n)
  if reduction == "mean":
    want = want / np.maximum(np.bincount(seg, minlength=n), 1)
  np.testing.assert_allclose(np.asarray(g.codebook).reshape(-1), want, rtol=1e-5, atol=1e-5)


def test_hashed_bucket_mean_grads():
  h = hand_hashed(np.ones((8, 5)), 7)
  g = jax.grad(lambda h: jnp.sum(h.materialize() * jnp.arange(40.0).reshape(8, 5)))(h)
  b, s = h.bucket_and_sign()
  gm = train.cluster_mean_grads(g, h)
  b = np.asarray(b).reshape(-1)
  want = np.bincount(b, np.asarray(s, np.float64).reshape(-1) * np.arange(40.0), minlength=7)
  np.testing.assert_allclose(g.buckets, want, rtol=1e-6)
  np.testing.assert_allclose(gm.buckets, want / np.maximum(np.bincount(b, minlength=7), 1), rtol=1e-6)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(5)(x)


def _data():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(128, 16)).astype(np.float32)
  y = (x[:, :5] * 2 + x[:, 5:10] ** 2).argmax(-1)
  return jnp.asarray(x), jnp.asarray(y)


def _fine_tune(params_c, freeze=None, steps=25, reduction="sum"):
  model = MLP()
  x, y = _data()
  f = qws_jax.apply(model.apply)

  def loss_fn(p):
    logits = f({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = qws_jax.codebook_optimizer(optax.adam(3e-2), freeze=freeze, reduction=reduction)
  state = tx.init(params_c)
  # Indices are never handed to the inner optimizer: no integer leaves in its state.
  assert not any(jnp.issubdtype(l.dtype, jnp.integer) for l in jax.tree_util.tree_leaves(state)
                 if hasattr(l, "dtype") and l.ndim > 0)

  @jax.jit
  def step(p, state):
    loss, g = jax.value_and_grad(loss_fn, allow_int=True)(p)
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state, loss

  losses = []
  p = params_c
  with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction is not strict-clean
    for _ in range(steps):
      p, state, loss = step(p, state)
      losses.append(float(loss))
  return p, losses, float(jax.jit(loss_fn)(p))


@pytest.fixture(scope="module")
def trained_params():
  model = MLP()
  x, y = _data()
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.adam(1e-2)
  st = tx.init(params)

  @jax.jit
  def step(p, st):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y).mean())(p)
    u, st = tx.update(g, st)
    return optax.apply_updates(p, u), st

  with jax.numpy_dtype_promotion("standard"):  # optax.adam is not strict-clean
    for _ in range(150):
      params, st = step(params, st)
  return params


def test_fine_tune_lowers_loss_and_keeps_indices(trained_params):
  params_c = hand_share_tree(trained_params, 4)
  p, losses, final = _fine_tune(params_c)
  assert final < losses[0] * 0.9, (losses[0], final)
  for a, b in zip(jax.tree_util.tree_leaves(params_c), jax.tree_util.tree_leaves(p)):
    if jnp.issubdtype(a.dtype, jnp.integer):
      np.testing.assert_array_equal(a, b)
      assert a.dtype == b.dtype
  k0 = p["Dense_0"]["kernel"]
  assert isinstance(k0, qws_jax.SharedArray)
  assert not np.allclose(k0.codebook, params_c["Dense_0"]["kernel"].codebook)
  assert not np.allclose(p["Dense_0"]["bias"], params_c["Dense_0"]["bias"])  # unshared leaves train


def test_freeze_and_mean_reduction(trained_params):
  params_c = hand_share_tree(trained_params, 4)
  p, losses, final = _fine_tune(params_c, freeze=r"bias|Dense_1/kernel", steps=10, reduction="mean")
  np.testing.assert_array_equal(p["Dense_0"]["bias"], params_c["Dense_0"]["bias"])
  np.testing.assert_array_equal(p["Dense_1"]["bias"], params_c["Dense_1"]["bias"])
  np.testing.assert_array_equal(p["Dense_1"]["kernel"].codebook, params_c["Dense_1"]["kernel"].codebook)
  assert not np.allclose(p["Dense_0"]["kernel"].codebook, params_c["Dense_0"]["kernel"].codebook)
  assert final < losses[0]


def test_sgd_strict_promotion(trained_params):
  """Under the suite's strict dtype promotion, with an optimizer that is strict-clean."""
  params_c = hand_share_tree(trained_params, 8)
  tx = qws_jax.codebook_optimizer(optax.sgd(0.05, momentum=0.9))
  x, y = _data()
  f = qws_jax.apply(MLP().apply)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(f({"params": p}, x), y).mean()

  @jax.jit
  def step(p, st):
    loss, g = jax.value_and_grad(loss_fn, allow_int=True)(p)
    u, st = tx.update(g, st, p)
    return optax.apply_updates(p, u), st, loss

  st = tx.init(params_c)
  p, st, first = step(params_c, st)
  for _ in range(5):
    p, st, last = step(p, st)
  assert float(last) < float(first)


def test_errors():
  with pytest.raises(ValueError, match="reduction"):
    qws_jax.codebook_optimizer(optax.sgd(0.1), reduction="median")
  with pytest.raises(ValueError, match="not a valid regex"):
    qws_jax.codebook_optimizer(optax.sgd(0.1), freeze="(")
  tx = qws_jax.codebook_optimizer(optax.sgd(0.1))
  p = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="needs params"):
    tx.update(p, tx.init(p))


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(16, 64, rngs=rngs)
    self.l2 = nnx.Linear(64, 5, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_nnx_optimizer_fine_tune():
  x, y = _data()
  model = NnxMLP(nnx.Rngs(0))
  model_c = qws_jax.nnx.share(model, k=4, method="lloyd", predicate=lambda path, l: l.ndim == 2)
  assert isinstance(model_c.l1.kernel, qws_jax.nnx.SharedParam)
  idx0 = np.asarray(model_c.l1.kernel.get_raw_value().indices)
  opt = nnx.Optimizer(model_c, qws_jax.codebook_optimizer(optax.adam(3e-2)), wrt=nnx.Param)

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  @nnx.jit
  def step(m, opt):
    loss, g = nnx.value_and_grad(loss_fn, allow_int=True)(m)
    opt.update(m, g)
    return loss

  with jax.numpy_dtype_promotion("standard"):  # optax.adam is not strict-clean
    first = float(step(model_c, opt))
    for _ in range(15):
      last = float(step(model_c, opt))
  assert last < first * 0.9, (first, last)
  w = model_c.l1.kernel.get_raw_value()
  assert isinstance(w, qws_jax.SharedArray)
  np.testing.assert_array_equal(w.indices, idx0)
