"""Tests of the hashed Flax layers: linen `HashedDense` and NNX `HashedLinear`."""

from __future__ import annotations

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qws_jax
from qws_jax import linen as qlinen
from qws_jax import nnx as qnnx
from qws_jax._src import hashing

_X = jax.random.normal(jax.random.key(0), (16, 24), jnp.float32)


class _LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(qlinen.HashedDense(32, compression=1 / 4)(x))
    return qlinen.HashedDense(4, buckets=16)(x)


def test_hashed_dense_params_and_dense_equivalence():
  layer = qlinen.HashedDense(32, compression=1 / 4, seed=5)
  v = layer.init(jax.random.key(1), _X)
  k = v["params"]["kernel"]
  assert isinstance(k, qws_jax.HashedArray)
  assert (k.shape, k.num_buckets, k.seed) == ((24, 32), 192, hashing.leaf_seed("params/kernel", 5))
  np.testing.assert_array_equal(np.asarray(v["params"]["bias"]), np.zeros(32))
  y = layer.apply(v, _X)
  # unshare turns the layer's params into nn.Dense params.
  want = nn.Dense(32).apply(qws_jax.unshare(v), _X)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-6)
  # The reference path (explicit precision: materialise + jnp.dot) agrees.
  y_ref = qlinen.HashedDense(32, compression=1 / 4, seed=5,
                             precision=jax.lax.Precision.HIGHEST).apply(v, _X)
  np.testing.assert_allclose(np.asarray(y_ref), np.asarray(y), rtol=1e-5, atol=1e-5)
  y3 = jax.jit(layer.apply)(v, _X.reshape(2, 8, 24))
  np.testing.assert_allclose(np.asarray(y3).reshape(16, 32), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_hashed_dense_layers_get_distinct_seeds_and_default_variance():
  v = _LinenNet().init(jax.random.key(0), _X)["params"]
  s0, s1 = v["HashedDense_0"]["kernel"].seed, v["HashedDense_1"]["kernel"].seed
  assert s0 == hashing.leaf_seed("params/HashedDense_0/kernel", 0) and s0 != s1
  big = qlinen.HashedDense(256, use_bias=False).init(jax.random.key(2), jnp.ones((1, 128)))
  assert set(big["params"]) == {"kernel"}
  w = np.asarray(big["params"]["kernel"].materialize())
  assert abs(w.var() * 128 - 1) < 0.1  # lecun_normal: variance 1 / in_features


def test_hashed_dense_dtypes_and_errors():
  layer = qlinen.HashedDense(8, buckets=20, param_dtype=jnp.bfloat16, dtype=jnp.float32)
  v = layer.init(jax.random.key(0), _X)
  assert v["params"]["kernel"].buckets.dtype == jnp.bfloat16
  assert layer.apply(v, _X).dtype == jnp.float32
  with pytest.raises(ValueError, match=r"compression=2.*'params/kernel'"):
    qlinen.HashedDense(8, compression=2.0).init(jax.random.key(0), _X)
  with pytest.raises(ValueError, match=r"buckets=1000.*\[1, 192\]"):
    qlinen.HashedDense(8, buckets=1000).init(jax.random.key(0), _X)
  with pytest.raises(ValueError, match=r"uint32"):
    qlinen.HashedDense(8, seed=-3).init(jax.random.key(0), _X)
  with pytest.raises(ValueError, match=r"virtual shape \(24, 8\) != expected \(12, 8\)"):
    layer.apply(v, _X[:, :12])


def test_hashed_dense_trains_with_optax():
  net = _LinenNet()
  params = net.init(jax.random.key(0), _X)["params"]
  y = jnp.sin(_X[:, :4])
  tx = optax.sgd(0.1, momentum=0.9)
  state = tx.init(params)

  def loss_fn(p):
    return jnp.mean((net.apply({"params": p}, _X) - y)**2)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  first = float(loss_fn(params))
  for _ in range(60):
    params, state, _ = step(params, state)
  assert isinstance(params["HashedDense_0"]["kernel"], qws_jax.HashedArray)
  assert float(loss_fn(params)) < 0.5 * first


def test_hashed_dense_bucket_grads_are_the_hashednets_rule():
  layer = qlinen.HashedDense(10, buckets=30)
  v = layer.init(jax.random.key(3), _X)
  t = jax.random.normal(jax.random.key(4), (16, 10))
  g = jax.grad(lambda p: jnp.sum((layer.apply({"params": p}, _X) - t)**2))(v["params"])
  k = v["params"]["kernel"]
  dv = jax.grad(lambda w: jnp.sum((_X @ w + v["params"]["bias"][None, :] - t)**2))(k.materialize())
  b, s = k.bucket_and_sign()
  want = jax.ops.segment_sum((s.astype(jnp.float32) * dv).reshape(-1), b.reshape(-1),
                             num_segments=30)
  np.testing.assert_allclose(np.asarray(g["kernel"].buckets), np.asarray(want), rtol=1e-4,
                             atol=1e-5)


def test_hashed_conv_is_nn_conv_on_the_virtual_kernel():
  x = jax.random.normal(jax.random.key(1), (2, 7, 7, 6))
  conv = qlinen.HashedConv(8, (3, 3), strides=2, padding="VALID", feature_group_count=2,
                           buckets=50)
  v = conv.init(jax.random.key(2), x)
  k = v["params"]["kernel"]
  assert isinstance(k, qws_jax.HashedArray)
  assert (k.shape, k.num_buckets, k.seed) == ((3, 3, 3, 8), 50,
                                              hashing.leaf_seed("params/kernel", 0))
  y = jax.jit(conv.apply)(v, x)
  want = nn.Conv(8, (3, 3), strides=2, padding="VALID", feature_group_count=2).apply(
      qws_jax.unshare(v), x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(conv.apply({"params": p}, x)**2))(v["params"])
  assert isinstance(g["kernel"], qws_jax.HashedArray) and g["kernel"].buckets.shape == (50,)
  big = qlinen.HashedConv(64, (3, 3)).init(jax.random.key(3), jnp.ones((1, 5, 5, 32)))
  w = np.asarray(big["params"]["kernel"].materialize())
  assert abs(w.var() * 3 * 3 * 32 - 1) < 0.1  # lecun_normal: 1 / (kh * kw * C_in)
  with pytest.raises(ValueError, match=r"compression=0.*'params/kernel'"):
    qlinen.HashedConv(8, (3, 3), compression=0.0).init(jax.random.key(0), x)


class _NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.l1 = qnnx.HashedLinear(24, 32, compression=1 / 4, seed=1, rngs=rngs)
    self.l2 = qnnx.HashedLinear(32, 4, buckets=16, seed=2, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_hashed_linear_forward_and_state():
  layer = qnnx.HashedLinear(24, 32, buckets=100, seed=3, rngs=nnx.Rngs(0))
  k = layer.kernel
  assert isinstance(k, qws_jax.HashedArray)
  assert (k.shape, k.num_buckets, k.seed) == ((24, 32), 100, hashing.leaf_seed("kernel", 3))
  params = nnx.state(layer, nnx.Param)
  assert params["buckets"].get_value().shape == (100,)
  assert params["bias"].get_value().shape == (32,)
  want = _X @ k.materialize() + layer.bias.get_value()[None, :]
  np.testing.assert_allclose(np.asarray(layer(_X)), np.asarray(want), rtol=1e-5, atol=1e-6)
  w = np.asarray(qnnx.HashedLinear(128, 256, rngs=nnx.Rngs(1)).kernel.materialize())
  assert abs(w.var() * 128 - 1) < 0.1
  nobias = qnnx.HashedLinear(24, 8, use_bias=False, buckets=10, rngs=nnx.Rngs(0))
  assert nobias.bias is None and nobias(_X).shape == (16, 8)
  with pytest.raises(ValueError, match=r"compression=0.*HashedLinear"):
    qnnx.HashedLinear(24, 8, compression=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"buckets=193.*HashedLinear.*\[1, 192\]"):
    qnnx.HashedLinear(24, 8, buckets=193, rngs=nnx.Rngs(0))


def test_hashed_linear_trains_with_nnx_optimizer():
  model = _NnxNet(nnx.Rngs(0))
  y = jnp.sin(_X[:, :4])
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes dtypes
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(_X) - y)**2))(model)
    with jax.numpy_dtype_promotion("standard"):
      optimizer.update(model, grads)
    return loss

  first = float(step(model, optimizer))
  before = np.asarray(model.l1.buckets.get_value())
  for _ in range(60):
    loss = step(model, optimizer)
  assert not np.array_equal(before, np.asarray(model.l1.buckets.get_value()))
  assert model.l1.buckets.get_value().shape == (192,)
  assert float(loss) < 0.5 * first
