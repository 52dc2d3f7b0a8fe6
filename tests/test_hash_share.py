"""Tests of `qws_jax.hash_share`: selection, initialisation, gradients, training, errors."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import optax
import pytest

import qws_jax
from qws_jax._src import hash_share as hs
from qws_jax._src import hashing


class _MLP(nn.Module):
  hidden: int = 128
  out: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.out)(x)


_X = jax.random.normal(jax.random.key(7), (32, 40), jnp.float32)
_Y = jax.random.randint(jax.random.key(8), (32,), 0, 10)


def _is_hashed(x):
  return isinstance(x, qws_jax.HashedArray)


def _params():
  return _MLP().init(jax.random.key(0), _X)


def test_from_scratch_structure_and_pass_through():
  p = _params()
  h = qws_jax.hash_share(p, compression=1 / 8, key=jax.random.key(1))
  k0, k1 = h["params"]["Dense_0"]["kernel"], h["params"]["Dense_1"]["kernel"]
  assert _is_hashed(k0) and _is_hashed(k1)
  assert (k0.shape, k0.num_buckets) == ((40, 128), 640)
  assert (k1.shape, k1.num_buckets) == ((128, 10), 160)
  assert k0.buckets.dtype == jnp.float32 and k0.dtype == np.float32
  assert k0.seed == hashing.leaf_seed("params/Dense_0/kernel", 0)
  assert h["params"]["Dense_0"]["bias"] is p["params"]["Dense_0"]["bias"]
  qws_jax.validate_hashed_array(k0)
  d = qws_jax.unshare(h)
  assert jax.tree.structure(d) == jax.tree.structure(p)
  for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(p)):
    assert a.shape == b.shape and a.dtype == b.dtype
  # The dense model runs on the materialised tree.
  assert _MLP().apply(d, _X).shape == (32, 10)


def test_abstract_tree_gives_the_same_buckets_as_concrete():
  p = _params()
  a = jax.eval_shape(_MLP().init, jax.random.key(0), _X)
  key = jax.random.key(3)
  hc = qws_jax.hash_share(p, key=key)
  ha = qws_jax.hash_share(a, key=key)
  hj = jax.jit(lambda k: qws_jax.hash_share(_MLP().init(k, _X), key=k))(key)
  for path in ("Dense_0", "Dense_1"):
    want = hc["params"][path]["kernel"]
    for got in (ha["params"][path]["kernel"], hj["params"][path]["kernel"]):
      assert (got.shape, got.seed, got.num_buckets) == (want.shape, want.seed, want.num_buckets)
      np.testing.assert_array_equal(np.asarray(got.buckets), np.asarray(want.buckets))
  assert isinstance(ha["params"]["Dense_0"]["bias"], jax.ShapeDtypeStruct)


@pytest.mark.parametrize("shape", [(64, 512), (3, 3, 32, 256)], ids=["dense", "conv"])
def test_fan_in_init_matches_lecun_normal_variance(shape):
  p = {"w": jnp.zeros(shape, jnp.float32)}
  h = qws_jax.hash_share(p, compression=1 / 4, key=jax.random.key(0))
  v = np.asarray(h["w"].materialize())
  want = 1.0 / math.prod(shape[:-1])
  assert abs(v.var() / want - 1) < 0.1
  assert abs(v.mean()) < 0.1 * math.sqrt(want)
  assert np.abs(v).max() <= 2 * math.sqrt(want) / hs._TRUNC_STD + 1e-6  # truncated at 2 std
  # Flax's own initialiser on the dense shape has the same variance.
  ref = np.asarray(nn.initializers.lecun_normal()(jax.random.key(1), shape, jnp.float32))
  assert abs(v.var() / ref.var() - 1) < 0.15


def _np_from_dense(w, seed, num_buckets, signed=True):
  b, s = hashing.bucket_and_sign(jnp.arange(w.size, dtype=jnp.uint32), seed, num_buckets, signed)
  b, s = np.asarray(b), np.asarray(s).astype(np.float64)
  total = np.zeros(num_buckets)
  count = np.zeros(num_buckets)
  np.add.at(total, b, s * np.asarray(w, np.float64).reshape(-1))
  np.add.at(count, b, 1.0)
  return np.where(count > 0, total / np.maximum(count, 1), 0.0), b, s


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_from_dense_is_least_squares(signed):
  w = jax.random.normal(jax.random.key(5), (50, 30), jnp.float32)
  h = qws_jax.hash_share({"w": w}, buckets=100, init="from_dense", signed=signed)["w"]
  want, b, s = _np_from_dense(w, h.seed, 100, signed)
  np.testing.assert_allclose(np.asarray(h.buckets), want, rtol=1e-5, atol=1e-6)
  if not signed:
    assert np.all(s == 1)
  # Least squares: the residual is orthogonal to every bucket's direction, and
  # perturbing any bucket increases the error.
  resid = np.asarray(h.materialize(), np.float64).reshape(-1) - np.asarray(w).reshape(-1)
  grad = np.zeros(100)
  np.add.at(grad, b, s * resid)
  np.testing.assert_allclose(grad, 0.0, atol=1e-4)
  err = np.sum(resid**2)
  for j in (0, 17, 99):
    bumped = np.asarray(h.buckets, np.float64).copy()
    bumped[j] += 1e-2
    assert np.sum((s * bumped[b] - np.asarray(w).reshape(-1))**2) > err


def test_from_dense_keeps_dtype_and_is_exact_for_hashed_weights():
  h0 = qws_jax.hash_share({"w": jnp.zeros((40, 32), jnp.bfloat16)}, buckets=60,
                          key=jax.random.key(0))["w"]
  assert h0.buckets.dtype == jnp.bfloat16
  # A weight that already is a hashed weight (same path and seed) is recovered exactly.
  w = h0.materialize()
  h1 = qws_jax.hash_share({"w": w}, buckets=60, init="from_dense")["w"]
  assert h1.seed == h0.seed and h1.buckets.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(h1.buckets, np.float32),
                                np.asarray(h0.buckets, np.float32))


def test_rules_predicate_and_seeds():
  p = _params()
  key = jax.random.key(0)
  h = qws_jax.hash_share(p, key=key, rules=[qws_jax.Rule("Dense_1", compression=1 / 2),
                                            qws_jax.Rule("Dense_0/bias", buckets=10)])
  assert h["params"]["Dense_1"]["kernel"].num_buckets == 640
  assert h["params"]["Dense_0"]["bias"].num_buckets == 10  # selected by the rule
  h = qws_jax.hash_share(p, key=key, rules=[qws_jax.Rule("Dense_1", skip=True)])
  assert h["params"]["Dense_1"]["kernel"] is p["params"]["Dense_1"]["kernel"]
  h = qws_jax.hash_share(p, key=key, predicate=lambda path, x: path.endswith("Dense_0/kernel"))
  assert _is_hashed(h["params"]["Dense_0"]["kernel"])
  assert not _is_hashed(h["params"]["Dense_1"]["kernel"])
  # Deterministic; the seed changes the hash, the key only the bucket values.
  a = qws_jax.hash_share(p, key=key, seed=1)["params"]["Dense_0"]["kernel"]
  b = qws_jax.hash_share(p, key=key, seed=1)["params"]["Dense_0"]["kernel"]
  c = qws_jax.hash_share(p, key=key, seed=2)["params"]["Dense_0"]["kernel"]
  d = qws_jax.hash_share(p, key=jax.random.key(9), seed=1)["params"]["Dense_0"]["kernel"]
  np.testing.assert_array_equal(np.asarray(a.materialize()), np.asarray(b.materialize()))
  assert a.seed != c.seed and a.seed == d.seed
  assert not np.array_equal(np.asarray(a.buckets), np.asarray(d.buckets))
  # Hashed leaves already in the tree pass through.
  again = qws_jax.hash_share(h, key=key)
  assert again["params"]["Dense_0"]["kernel"] is h["params"]["Dense_0"]["kernel"]


def test_compression_one_and_single_bucket():
  w = jnp.ones((8, 16), jnp.float32)
  assert qws_jax.hash_share({"w": w}, compression=1.0, predicate=lambda *_: True,
                            key=jax.random.key(0))["w"].num_buckets == 128
  h = qws_jax.hash_share({"w": w}, buckets=1, predicate=lambda *_: True, init="from_dense",
                         signed=False)["w"]
  np.testing.assert_allclose(np.asarray(h.materialize()), 1.0)


_W = {"params": {"layer": {"kernel": jnp.ones((32, 64), jnp.float32)}}}


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(compression=0.0), ValueError, r"compression=0.0 for leaf 'params/layer/kernel'.*\(0, 1\]"),
    (dict(compression=1.5), ValueError, r"compression=1.5 for leaf 'params/layer/kernel'"),
    (dict(compression=-0.1), ValueError, r"'params/layer/kernel'"),
    (dict(compression=float("nan")), ValueError, r"'params/layer/kernel'"),
    (dict(compression="1/8"), TypeError, r"'params/layer/kernel'"),
    (dict(buckets=0), ValueError, r"buckets=0 for leaf 'params/layer/kernel'.*\[1, 2048\]"),
    (dict(buckets=2049), ValueError, r"buckets=2049 for leaf 'params/layer/kernel'"),
    (dict(buckets=12.5), TypeError, r"buckets must be an int for leaf 'params/layer/kernel'"),
    (dict(seed=2**32), ValueError, r"uint32"),
    (dict(seed=-1), ValueError, r"uint32"),
    (dict(seed=1.0), TypeError, r"seed"),
    (dict(init="uniform"), ValueError, r"init='uniform' for leaf 'params/layer/kernel'"),
    (dict(key=None), ValueError, r"needs key=.*'params/layer/kernel'"),
], ids=["c0", "c>1", "c<0", "cnan", "cstr", "b0", "b>size", "bfloat", "seed>u32", "seed<0",
        "seedfloat", "init", "nokey"])
def test_bad_input_names_the_leaf(kwargs, exc, match):
  kwargs = {"key": jax.random.key(0), **kwargs}
  with pytest.raises(exc, match=match):
    qws_jax.hash_share(_W, **kwargs)


def test_bad_input_from_rules_and_leaves_names_the_leaf():
  with pytest.raises(ValueError, match=r"seed for leaf 'params/layer/kernel'.*uint32"):
    qws_jax.hash_share(_W, key=jax.random.key(0), rules=[qws_jax.Rule("layer", seed=2**32)])
  ints = {"emb": {"table": jnp.ones((64, 32), jnp.int32)}}
  with pytest.raises(TypeError, match=r"'emb/table'.*int32"):
    qws_jax.hash_share(ints, key=jax.random.key(0), rules=[qws_jax.Rule("table")])
  abstract = {"enc": {"kernel": jax.ShapeDtypeStruct((64, 32), jnp.float32)}}
  with pytest.raises(ValueError, match=r"from_dense.*'enc/kernel'"):
    qws_jax.hash_share(abstract, init="from_dense")
  old = {"enc": {"kernel": qws_jax.HashedArray(jnp.ones((4,)), (8, 8), np.dtype("float32"),
                                               seed=3, version=7)}}
  with pytest.raises(ValueError, match=r"unknown hash version 7.*'enc/kernel'"):
    qws_jax.hash_share(old, key=jax.random.key(0))


def _loss(params, x=_X, y=_Y):
  logits = _MLP().apply(qws_jax.unshare(params), x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_bucket_grads_follow_the_hashednets_rule():
  h = qws_jax.hash_share(_params(), compression=1 / 8, key=jax.random.key(1))
  g = jax.jit(jax.grad(_loss))(h)
  dense_g = jax.grad(_loss)(qws_jax.unshare(h))  # dL/dV at the same virtual weights
  for path in ("Dense_0", "Dense_1"):
    leaf = h["params"][path]["kernel"]
    gl = g["params"][path]["kernel"]
    assert _is_hashed(gl) and gl.seed == leaf.seed and gl.buckets.shape == leaf.buckets.shape
    b, s = leaf.bucket_and_sign()
    dv = dense_g["params"][path]["kernel"]
    want = jax.ops.segment_sum((s.astype(jnp.float32) * dv).reshape(-1), b.reshape(-1),
                               num_segments=leaf.num_buckets)
    np.testing.assert_allclose(np.asarray(gl.buckets), np.asarray(want), rtol=1e-5, atol=1e-7)
    # Biases are ordinary dense parameters.
    np.testing.assert_allclose(np.asarray(g["params"][path]["bias"]),
                               np.asarray(dense_g["params"][path]["bias"]), rtol=1e-6)


def test_check_grads_through_materialize():
  h = qws_jax.hash_share({"w": jnp.zeros((12, 20))}, buckets=17, predicate=lambda *_: True,
                         key=jax.random.key(2))["w"]
  x = jax.random.normal(jax.random.key(3), (5, 12))

  def f(buckets):
    v = qws_jax.HashedArray(buckets, h.shape, h.dtype, h.seed).materialize()
    return jnp.sum(jnp.tanh(x @ v))

  with jax.numpy_dtype_promotion("standard"):  # check_grads mixes Python floats in
    jtu.check_grads(f, (h.buckets,), order=1, modes=("fwd", "rev"), eps=1e-2,
                    atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("make_tx", [lambda: optax.sgd(0.5, momentum=0.9),
                                     lambda: optax.adam(1e-2)], ids=["sgd", "adam"])
def test_optax_trains_the_hashed_tree(make_tx):
  h = qws_jax.hash_share(_params(), compression=1 / 8, key=jax.random.key(1))
  tx = make_tx()
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes dtypes
    state = tx.init(h)
    compiles = []

    @jax.jit
    def step(params, state):
      compiles.append(1)
      loss, g = jax.value_and_grad(_loss)(params)
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state, loss

    first = None
    for _ in range(30):
      h2, state, loss = step(h if first is None else h2, state)
      first = loss if first is None else first
  assert len(compiles) == 1  # the second call does not recompile
  assert jax.tree.structure(h2) == jax.tree.structure(h)
  assert float(_loss(h2)) < 0.5 * float(first)


def test_stacked_layers_get_their_own_buckets():
  w = jax.random.normal(jax.random.key(0), (3, 64, 32))
  h = qws_jax.hash_share({"layers": {"kernel": w}}, compression=1 / 8, init="from_dense",
                         rules=[qws_jax.Rule("layers", stack_axes=1)])["layers"]["kernel"]
  assert h.stack_shape == (3,) and h.shape == (64, 32) and h.num_buckets == 256
  qws_jax.validate_hashed_array(h, "layers/kernel")
  dense = np.asarray(h.materialize())
  for i in range(3):  # each slice is the from-dense fit of its own layer
    one = qws_jax.hash_share({"layers": {"kernel": w[i]}}, compression=1 / 8,
                             init="from_dense")["layers"]["kernel"]
    np.testing.assert_allclose(dense[i], np.asarray(one.materialize()), rtol=1e-6)
  fresh = qws_jax.hash_share(jax.eval_shape(lambda: {"k": w}), key=jax.random.key(1),
                             stack_axes=1, predicate=lambda p, l: True)["k"]
  b = np.asarray(fresh.buckets)
  assert b.shape == (3, 256) and not np.allclose(b[0], b[1])  # independent draws
  with pytest.raises(ValueError, match="'k'.*stack_axes=3"):
    qws_jax.hash_share({"k": w}, key=jax.random.key(1), stack_axes=3,
                       predicate=lambda p, l: True)
