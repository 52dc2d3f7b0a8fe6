"""qws_jax.apply (linen) and qws_jax.nnx.share: outputs equal the unshared model's."""

from __future__ import annotations

import functools

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qws_jax
from qws_jax._src import apply as apply_lib
from qws_jax._src import nnx_share
from qws_jax._src import ops
from qws_jax._src import types

from _compress_helpers import hand_hash_tree, hand_share_tree, hand_shared, hand_hashed

ATOL = 2e-5


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(48)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


class Block(nn.Module):
  """Embedding, attention (DenseGeneral), MLP, an Einsum head and a tied read-out."""
  vocab: int = 40
  dim: int = 32

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(self.vocab, self.dim)
    h = emb(ids)
    h = h + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=self.dim)(nn.LayerNorm()(h))
    m = nn.Dense(64)(nn.LayerNorm()(h))
    h = h + nn.Dense(self.dim)(nn.gelu(m))
    e = nn.Einsum((self.dim, 2, 16), "btd,dhf->bthf")(h)
    return emb.attend(h) + e.sum(axis=(-2, -1))[..., None]


class Custom(nn.Module):
  """Uses a parameter outside any known layer: materialised where read."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], 16))
    return jnp.tanh(x @ w) + nn.Dense(16)(x)


def _models():
  k = jax.random.key(0)
  return {
      "mlp": (MLP(), jax.random.normal(k, (5, 24))),
      "cnn": (CNN(), jax.random.normal(k, (2, 8, 8, 3))),
      "block": (Block(), jax.random.randint(k, (2, 7), 0, 40)),
      "custom": (Custom(), jax.random.normal(k, (3, 20))),
  }


@functools.lru_cache(maxsize=None)
def _init(model_name):
  model, x = _models()[model_name]
  return model, x, jax.jit(model.init)(jax.random.key(1), x)["params"]


COMPRESSIONS = {
    "tensor_k8": lambda p: hand_share_tree(p, 8),
    "channel_k4": lambda p: hand_share_tree(p, 4, axis=-1),
    "group_k16": lambda p: hand_share_tree(p, 16, group_size=8),
    "hashed": hand_hash_tree,
}


_SLOW = pytest.mark.slow
LINEN_CASES = [("mlp", c) for c in COMPRESSIONS] + [
    ("block", "tensor_k8"), ("block", "hashed"), ("cnn", "channel_k4"), ("custom", "tensor_k8"),
    pytest.param("block", "channel_k4", marks=_SLOW), pytest.param("block", "group_k16", marks=_SLOW)]


@pytest.mark.parametrize("model_name,comp", LINEN_CASES)
def test_linen_apply_matches_unshare(model_name, comp):
  model, x, params = _init(model_name)
  params_c = COMPRESSIONS[comp](params)
  assert any(types.is_compressed(l) for l in jax.tree_util.tree_leaves(
      params_c, is_leaf=types.is_compressed))
  want = jax.jit(model.apply)({"params": qws_jax.unshare(params_c)}, x)
  f = qws_jax.apply(model.apply)
  got_jit = jax.jit(f)({"params": params_c}, x)
  np.testing.assert_allclose(got_jit, want, atol=ATOL, rtol=1e-5)
  if model_name == "mlp":  # eager too (the interceptors run the same code unjitted)
    np.testing.assert_allclose(f({"params": params_c}, x), want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("model_name", ["mlp", "block"])
def test_linen_apply_grads_match(model_name):
  model, x, params = _init(model_name)
  params_c = hand_share_tree(params, 8, axis=-1)
  f = qws_jax.apply(model.apply)

  def loss_c(p):
    return jnp.sum(jnp.sin(f({"params": p}, x)))

  def loss_ref(p):
    return jnp.sum(jnp.sin(model.apply({"params": qws_jax.unshare(p)}, x)))

  g = jax.jit(jax.grad(loss_c, allow_int=True))(params_c)
  g_ref = jax.jit(jax.grad(loss_ref, allow_int=True))(params_c)
  leaves = jax.tree_util.tree_leaves(g)
  ref_leaves = jax.tree_util.tree_leaves(g_ref)
  assert len(leaves) == len(ref_leaves)
  n_float = 0
  scale = max(float(np.abs(b).max()) for b in ref_leaves if b.dtype != jax.dtypes.float0)
  for a, b in zip(leaves, ref_leaves):
    if a.dtype == jax.dtypes.float0:
      assert b.dtype == jax.dtypes.float0
      continue
    n_float += 1
    np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4)
  assert n_float > 0


def test_grad_wrt_inputs_matches():
  model, x, params = _init("mlp")
  params_c = hand_share_tree(params, 4)
  f = qws_jax.apply(model.apply)
  gx = jax.jit(jax.grad(lambda x: jnp.sum(f({"params": params_c}, x) ** 2)))(x)
  gx_ref = jax.grad(lambda x: jnp.sum(model.apply({"params": qws_jax.unshare(params_c)}, x) ** 2))(x)
  np.testing.assert_allclose(gx, gx_ref, atol=1e-4, rtol=1e-4)


def test_mutable_collections_returned_compressed():
  class BN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False)(nn.Dense(16)(x))

  model = BN()
  x = jax.random.normal(jax.random.key(2), (4, 12))
  v = model.init(jax.random.key(0), x)
  params_c = hand_share_tree(v["params"], 8)
  y, upd = qws_jax.apply(model.apply)({"params": params_c, "batch_stats": v["batch_stats"]}, x,
                                      mutable=["batch_stats"])
  y_ref, upd_ref = model.apply({"params": qws_jax.unshare(params_c), "batch_stats": v["batch_stats"]},
                               x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, atol=ATOL)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL), upd, upd_ref)


@pytest.mark.parametrize("layout", ["tensor", "channel_last", "channel_first", "channel_mid", "group"])
def test_dense_general_matrix_view(layout):
  """DenseGeneral kernels of rank 3 (attention-like) in every codebook layout."""
  w = np.random.default_rng(0).normal(size=(6, 4, 8)).astype(np.float32)
  kw = {"tensor": {}, "channel_last": {"axis": 2}, "channel_first": {"axis": 0},
        "channel_mid": {"axis": 1}, "group": {"group_size": 4}}[layout]
  sa = hand_shared(w, 4, **kw)
  dense = np.asarray(sa.materialize())
  for n_in in (1, 2):
    view = ops.matrix_view(sa, n_in)
    if view is None:
      continue
    rows = int(np.prod(w.shape[:n_in]))
    np.testing.assert_array_equal(view.materialize(), dense.reshape(rows, -1))
  # Both orientations through the layer.
  for axis, feats, kernel in (((-1,), (4, 8), w), ((-2, -1), (8,), w)):
    m = nn.DenseGeneral(features=feats, axis=axis)
    x = jax.random.normal(jax.random.key(3), (3, 6) if len(axis) == 1 else (3, 6, 4))
    p = {"kernel": sa, "bias": jnp.arange(np.prod(feats), dtype=jnp.float32).reshape(feats)}
    got = qws_jax.apply(m.apply)({"params": p}, x)
    want = m.apply({"params": qws_jax.unshare(p)}, x)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


def test_hashed_matrix_view_is_free():
  h = hand_hashed(np.ones((4, 3, 5)), 9)
  v = ops.matrix_view(h, 1)
  np.testing.assert_array_equal(v.materialize(), np.asarray(h.materialize()).reshape(4, 15))


@pytest.mark.parametrize("kind", ["tensor", "channel0", "channel1", "group", "hashed"])
def test_take_rows(kind):
  w = np.random.default_rng(1).normal(size=(20, 12)).astype(np.float32)
  c = {"tensor": lambda: hand_shared(w, 8), "channel0": lambda: hand_shared(w, 4, axis=0),
       "channel1": lambda: hand_shared(w, 4, axis=1), "group": lambda: hand_shared(w, 4, group_size=6),
       "hashed": lambda: hand_hashed(w, 37)}[kind]()
  ids = jnp.array([[0, 19, 3], [7, 7, 12]], jnp.int32)
  got = ops.take_rows(c, ids)
  np.testing.assert_array_equal(got, jnp.take(c.materialize(), ids, axis=0))


def test_fast_path_does_not_materialise(monkeypatch):
  """Dense/Embed with compressed weights never call materialize on the full leaf."""
  calls = []
  orig = types.SharedArray.materialize

  def spy(self):
    calls.append(self.shape)
    return orig(self)

  monkeypatch.setattr(types.SharedArray, "materialize", spy)
  monkeypatch.setattr(ops.kernels, "shared_matmul", lambda x, w: x @ orig(w))

  class M(nn.Module):
    @nn.compact
    def __call__(self, ids):
      return nn.Dense(8)(nn.Embed(50, 16)(ids))

  model = M()
  ids = jnp.array([[1, 2, 3]], jnp.int32)
  params_c = hand_share_tree(model.init(jax.random.key(0), ids)["params"], 8)
  qws_jax.apply(model.apply)({"params": params_c}, ids)
  # Embed decodes only the 3 looked-up rows; Dense goes to the kernel entry.
  assert calls == [(3, 16)], calls


def test_apply_rejects_non_callable():
  with pytest.raises(TypeError, match="callable"):
    qws_jax.apply(3)


# ------------------------------------------------------------------------------ NNX


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(24, 48, rngs=rngs)
    self.l2 = nnx.Linear(48, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.out = nnx.Linear(8 * 8 * 8, 10, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.c1(x))
    return self.out(h.reshape(h.shape[0], -1))


class NnxBlock(nnx.Module):
  def __init__(self, rngs, vocab=40, dim=32):
    self.emb = nnx.Embed(vocab, dim, rngs=rngs)
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.att = nnx.MultiHeadAttention(num_heads=4, in_features=dim, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 64, rngs=rngs)
    self.down = nnx.Linear(64, dim, rngs=rngs)
    self.eins = nnx.Einsum("btd,dhf->bthf", (dim, 2, 16), rngs=rngs)

  def __call__(self, ids):
    h = self.emb(ids)
    h = h + self.att(self.ln1(h))
    h = h + self.down(nnx.gelu(self.up(self.ln2(h))))
    return self.emb.attend(h) + self.eins(h).sum(axis=(-2, -1))[..., None]


def _nnx_models():
  k = jax.random.key(0)
  return {
      "mlp": (NnxMLP, jax.random.normal(k, (5, 24))),
      "cnn": (NnxCNN, jax.random.normal(k, (2, 8, 8, 3))),
      "block": (NnxBlock, jax.random.randint(k, (2, 7), 0, 40)),
  }


@pytest.mark.parametrize("model_name,comp", [
    ("mlp", "tensor_k8"), ("cnn", "channel_k4"), ("block", "tensor_k8"),
    pytest.param("block", "hashed", marks=_SLOW)])
def test_nnx_compressed_model_matches(model_name, comp):
  cls, x = _nnx_models()[model_name]
  model = cls(nnx.Rngs(0))
  model_c = nnx_share.compress_model(model, COMPRESSIONS[comp])
  # The original model is untouched.
  assert not any(types.is_compressed(v) for v in jax.tree_util.tree_leaves(
      nnx.to_pure_dict(nnx.state(model)), is_leaf=types.is_compressed))
  pure_c = nnx.to_pure_dict(nnx.state(model_c, nnx.Param))
  assert any(types.is_compressed(v) for v in jax.tree_util.tree_leaves(pure_c, is_leaf=types.is_compressed))
  # Reference: the same compressed values, unshared into the original dense model.
  want = nnx.jit(lambda m, x: m(x))(_with_params(model, _dense_state(model_c)), x)
  if model_name == "mlp":  # eager too
    np.testing.assert_allclose(model_c(x), want, atol=ATOL, rtol=1e-5)
  got = nnx.jit(lambda m, x: m(x))(model_c, x)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


def _dense_state(model_c):
  pure = nnx.to_pure_dict(nnx.state(model_c, nnx.Param))
  return qws_jax.unshare(pure)


def _with_params(model, pure):
  """A copy of the dense ``model`` with its Param values replaced by ``pure``."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree_util.tree_map(lambda x: x, params)
  nnx.replace_by_pure_dict(params, pure)
  return nnx.merge(graphdef, params, rest)


def test_nnx_grads_match_reference():
  cls, x = _nnx_models()["block"]
  model = cls(nnx.Rngs(0))
  model_c = nnx_share.compress_model(model, lambda p: hand_share_tree(p, 8))
  g = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))), allow_int=True))(model_c)
  gk = nnx.to_pure_dict(g)["up"]["kernel"]
  assert isinstance(gk, types.SharedArray)
  # Reference: d loss / d codebook through the dense weight.
  up_c = nnx.to_pure_dict(nnx.state(model_c, nnx.Param))["up"]["kernel"]
  dense = _dense_state(model_c)

  def loss_cb(cb):
    w = types.SharedArray(up_c.indices, cb, up_c.shape, up_c.dtype, up_c.bits, up_c.axis,
                          up_c.group_size).materialize()
    pure = jax.tree_util.tree_map(lambda a: a, dense)
    pure["up"]["kernel"] = w
    return jnp.sum(jnp.sin(_with_params(model, pure)(x)))

  want = jax.jit(jax.grad(loss_cb))(up_c.codebook)
  np.testing.assert_allclose(gk.codebook, want, atol=1e-5 * float(np.abs(want).max()), rtol=1e-4)
