"""Small versions of the patterns of real Flax models, run compressed.

Each case builds a model pattern seen in flax's examples or google-research's ViT
(attention with ``num_heads * head_dim >= 1024``, a learned position embedding,
``nn.with_logical_partitioning`` boxes, an ``nnx.Embed`` subclass with its own
``__call__``, ``nnx.Einsum``, linen and NNX ``Conv``, a hashed Conv) and checks:

* default selection takes the matmul weights only (never biases, norm scales or
  position embeddings);
* the compressed model agrees with the unshared one;
* the fast path holds: in the jaxpr of the compressed forward, no floating value is as
  large as the compressed weight (nothing decodes it whole).
"""

from __future__ import annotations

import math
import re

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qws_jax
from qws_jax._src import nnx_share
from qws_jax._src import tree as tree_lib
from qws_jax._src import types

from _compress_helpers import float_values, hand_hash_tree, hand_share_tree

ATOL = 3e-5


def _float_shapes(jaxpr):
  """Shapes of every floating value any equation of ``jaxpr`` (recursively) produces."""
  return (shape for _, shape in float_values(jaxpr))


# The XLA kernel decodes BlockSizes().xla_block_k = 512 rows at a time: a weight with at
# most 512 rows is one block. The check below is about weights larger than one block.
_BLOCK_ROWS = 512


def _is_whole(shape, w) -> bool:
  """``shape`` holds all of ``w``'s values laid out as ``w`` or one of its matrix views
  (``prod(w.shape[:i])`` rows), or flat."""
  if math.prod(shape) != w.size:
    return False
  views = {math.prod(w.shape[:i]) for i in range(1, len(w.shape))}
  return len(shape) <= 1 or shape[0] in views or shape[:2] == tuple(w.shape[:2])


def _assert_never_whole(fn, args, compressed_tree):
  """No floating value in ``fn``'s jaxpr holds a whole compressed weight larger than one
  decode block (in its own shape, a matrix view or flat), and none is larger than the
  largest compressed weight."""
  produced = set(_float_shapes(jax.make_jaxpr(fn)(*args).jaxpr))
  leaves = [l for l in jax.tree_util.tree_leaves(compressed_tree, is_leaf=types.is_compressed)
            if types.is_compressed(l)]
  big = [l for l in leaves if math.prod(l.shape[:-1]) > _BLOCK_ROWS]
  assert big, "nothing larger than one decode block was compressed"
  whole = [(s, l.shape) for s in produced for l in big if _is_whole(s, l)]
  assert not whole, f"weights decoded whole (value shape, weight shape): {whole}"
  assert max(math.prod(s) for s in produced) < max(l.size for l in leaves)


def _selected_paths(params) -> set[str]:
  """Paths the default predicate selects (as `qws_jax.share` would, without k-means)."""
  out = set()
  tree_lib.map_selected(params, lambda p, x, o: out.add(str(p)) or x, defaults={},
                        predicate=None, rules=(), what="test")
  return out


# ----------------------------------------------------------------------------- linen


class ViTBlock(nn.Module):
  """ViT-style: patch Conv, learned position embedding, wide attention, MLP, head."""
  dim: int = 1024

  @nn.compact
  def __call__(self, x):
    d = self.dim
    x = nn.Conv(d, (2, 2), strides=(2, 2), padding="VALID", name="embedding")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, 16, d)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], d))
    x = x + pos
    y = nn.LayerNorm()(x)
    # num_heads * head_dim = 16 * 64 = 1024: the q/k/v biases are (16, 64).
    y = nn.MultiHeadDotProductAttention(num_heads=16, qkv_features=1024, out_features=d)(y, y)
    x = x + y
    x = x + nn.Dense(d)(nn.gelu(nn.Dense(d)(nn.LayerNorm()(x))))
    return nn.Dense(10, name="head")(x.mean(axis=1))


def _vit():
  model = ViTBlock()
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  return model, x, params


def test_default_selection_takes_matmul_weights_only():
  _, _, params = _vit()
  sel = _selected_paths(params)
  mha = "MultiHeadDotProductAttention_0"
  for name in ("query", "key", "value"):
    assert f"{mha}/{name}/kernel" in sel
    assert params[mha][name]["bias"].shape == (16, 64)  # 2-D, 1024 elements
    assert f"{mha}/{name}/bias" not in sel
  assert f"{mha}/out/kernel" in sel
  assert "pos_embedding" not in sel and params["pos_embedding"].size >= 1024
  assert "Dense_0/kernel" in sel and "Dense_1/kernel" in sel
  assert not any(re.search(r"bias|scale|LayerNorm", p) for p in sel), sel


def test_default_selection_flat_names_and_rules():
  z = jnp.zeros((64, 64))
  pred = tree_lib.default_predicate
  assert pred("encoder.layer.0.attention.self.query.weight", z)
  assert not pred("embeddings.position_embeddings.weight", z)
  assert not pred("encoder.layer.0.attention.self.query.bias", z)
  assert not pred("params/LayerNorm_0/scale", z)
  assert pred("params/Embed_0/embedding", z)
  assert pred("params/q_einsum/w", z)  # Gemma-style Einsum weight
  assert not pred("params/Dense_0/kernel", jnp.zeros((8, 8)))  # too small
  assert not pred("params/Dense_0/kernel", jnp.zeros((64, 64), jnp.int32))
  # A Rule still selects anything it names.
  tree = {"pos_embedding": jnp.ones((1, 32, 64)), "w": jnp.ones((64, 64))}
  got = set()
  tree_lib.map_selected(tree, lambda p, x, o: got.add(str(p)) or x, defaults={"k": 4},
                        predicate=None, rules=(qws_jax.Rule("pos"),), what="test")
  assert got == {"pos_embedding", "w"}


def test_vit_block_compressed_matches_and_stays_compressed():
  model, x, params = _vit()
  sel = _selected_paths(params)

  def share_selected(p):
    def f(path, leaf):
      return hand_share_tree(leaf, 8, min_size=1) if tree_lib.path_str(path) in sel else leaf
    return jax.tree_util.tree_map_with_path(f, p)

  params_c = share_selected(params)
  assert not types.is_compressed(params_c["pos_embedding"])
  f = qws_jax.apply(model.apply)
  got = jax.jit(f)({"params": params_c}, x)
  want = jax.jit(model.apply)({"params": qws_jax.unshare(params_c)}, x)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
  # No floating intermediate as large as a compressed weight (the 12-row patch Conv is
  # one decode block): the attention kernels, the MLP and the head stay packed.
  _assert_never_whole(lambda p: f({"params": p}, x), (params_c,), params_c)


class Boxed(nn.Module):
  """LM1B / WMT style: every param boxed by ``nn.with_logical_partitioning``."""

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(1024, 64, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")))
    h = emb(ids)
    h = nn.Dense(1024, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("mlp",)))(h)
    return nn.DenseGeneral((4, 16), kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp", "heads", "kv")))(nn.relu(h))


def test_boxed_params_take_the_fast_path():
  model = Boxed()
  ids = jnp.array([[1, 7, 300]], jnp.int32)
  params = model.init(jax.random.key(0), ids)["params"]
  assert isinstance(params["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  params_c = hand_share_tree(params, 16, axis=-1)
  assert isinstance(params_c["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  assert types.is_compressed(params_c["Dense_0"]["kernel"].value)
  f = qws_jax.apply(model.apply)
  want = model.apply({"params": qws_jax.unshare(params_c)}, ids)
  np.testing.assert_allclose(jax.jit(f)({"params": params_c}, ids), want, atol=ATOL, rtol=1e-5)
  _assert_never_whole(lambda p: f({"params": p}, ids), (params_c,), params_c)


class MyDense(nn.Dense):
  """A subclass with its own __call__ (reaches the fast path through super())."""

  def __call__(self, x):
    return super().__call__(x) * 2.0


class LinenConvEinsum(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(128, (3, 3), padding="SAME")(x)                                 # (1, 8, 8, 128)
    h = nn.Conv(64, (3, 3), strides=2, padding=((1, 0), (0, 1)))(h)              # (1, 4, 4, 64)
    h = nn.Conv(64, (2, 2), padding="CIRCULAR", use_bias=False, kernel_dilation=2)(h)
    e = nn.Einsum((1024, 8, 128), "btd,dhf->bthf")(h.reshape(1, 1, 1024))       # (1, 1, 8, 128)
    return MyDense(24)(e.reshape(1, 1, 1024))


@pytest.mark.parametrize("comp", ["shared", "hashed"])
def test_linen_conv_einsum_subclass(comp):
  model = LinenConvEinsum()
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 64))
  params = model.init(jax.random.key(1), x)["params"]
  params_c = (hand_share_tree(params, 8, axis=-1, min_size=4096) if comp == "shared"
              else hand_hash_tree(params, 8, min_size=4096))
  f = qws_jax.apply(model.apply)
  want = jax.jit(model.apply)({"params": qws_jax.unshare(params_c)}, x)
  np.testing.assert_allclose(jax.jit(f)({"params": params_c}, x), want, atol=ATOL, rtol=1e-5)
  _assert_never_whole(lambda p: f({"params": p}, x), (params_c,), params_c)


def test_hashed_conv_layer_never_materialises():
  conv = qws_jax.linen.HashedConv(128, (3, 3), compression=1 / 16)
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 64))
  v = conv.init(jax.random.key(1), x)
  k = v["params"]["kernel"]
  dense = nn.Conv(128, (3, 3))
  want = dense.apply({"params": qws_jax.unshare(v["params"])}, x)
  np.testing.assert_allclose(conv.apply(v, x), want, atol=ATOL, rtol=1e-5)
  _assert_never_whole(lambda v: conv.apply(v, x), (v,), v)


# ----------------------------------------------------------------------------- NNX


class ScaledEmbed(nnx.Embed):
  """Gemma's pattern: an Embed subclass that scales its output in its own __call__."""

  def __call__(self, x):
    return super().__call__(x) * jnp.sqrt(jnp.float32(self.features))


class NnxModel(nnx.Module):
  def __init__(self, rngs):
    self.emb = ScaledEmbed(1024, 64, rngs=rngs)
    self.conv = nnx.Conv(64, 128, (3, 3), rngs=rngs)
    self.eins = nnx.Einsum("btd,dhf->bthf", (1024, 8, 128), (8, 128), rngs=rngs)
    self.out = nnx.Linear(1024, 16, rngs=rngs)

  def __call__(self, ids):
    h = self.emb(ids)                       # (1, 16, 64)
    h = self.conv(h.reshape(1, 4, 4, 64))   # (1, 4, 4, 128)
    e = self.eins(h.reshape(1, 2, 1024))    # (1, 2, 8, 128)
    return self.out(e.reshape(1, 2, 1024))


def _with_params(model, pure):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree_util.tree_map(lambda a: a, params)
  nnx.replace_by_pure_dict(params, pure)
  return nnx.merge(graphdef, params, rest)


@pytest.mark.parametrize("comp", ["shared", "hashed"])
def test_nnx_subclasses_einsum_conv(comp):
  model = NnxModel(nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(2), (1, 16), 0, 1024)
  fn = ((lambda p: hand_share_tree(p, 8, axis=-1, min_size=4096)) if comp == "shared"
        else (lambda p: hand_hash_tree(p, 8, min_size=4096)))
  model_c = qws_jax.nnx.compress(model, fn)
  assert isinstance(model_c.emb, ScaledEmbed)  # the user's class is kept (a subclass of it)
  fast = tuple(nnx_share._FAST_CLASSES.values())  # pylint: disable=protected-access
  for layer in (model_c.emb, model_c.conv, model_c.eins, model_c.out):
    assert isinstance(layer, fast), type(layer).__mro__
  pure_c = nnx.to_pure_dict(nnx.state(model_c, nnx.Param))
  want = _with_params(model, qws_jax.unshare(pure_c))(ids)
  got = nnx.jit(lambda m, i: m(i))(model_c, ids)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
  graphdef, state = nnx.split(model_c)
  _assert_never_whole(lambda s: nnx.merge(graphdef, s)(ids), (state,), pure_c)


def test_nnx_hash_share_trains_from_scratch():
  import optax  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(32, 64, rngs=rngs)
      self.l2 = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  model = qws_jax.nnx.hash_share(Net(nnx.Rngs(0)), compression=1 / 4, key=jax.random.key(0),
                                 predicate=lambda path, leaf: leaf.ndim == 2)
  assert isinstance(model.l1.kernel.get_value(), qws_jax.HashedArray)
  x = jax.random.normal(jax.random.key(1), (64, 32))
  y = jax.random.normal(jax.random.key(2), (64, 4))
  opt = nnx.Optimizer(model, qws_jax.codebook_optimizer(optax.adam(1e-2)), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(m)
    opt.update(m, g)
    return loss

  with jax.numpy_dtype_promotion("standard"):  # optax.adam is not strict-clean
    losses = [float(step(model, opt)) for _ in range(30)]
  assert losses[-1] < 0.7 * losses[0], losses
  assert isinstance(model.l1.kernel.get_value(), qws_jax.HashedArray)


# ----------------------------------------------------------------------------- package


def test_import_gives_subpackages():
  import importlib  # pylint: disable=g-import-not-at-top
  pkg = importlib.import_module("qws_jax")
  for name in ("linen", "nnx", "kernels"):
    assert name in pkg.__all__
    assert getattr(pkg, name).__name__ == f"qws_jax.{name}"
  assert callable(pkg.nnx.share) and callable(pkg.nnx.hash_share)


def test_readme_example_runs_as_written(tmp_path):
  with open(__file__.replace("tests/test_models.py", "README.md"), encoding="utf-8") as f:
    text = f.read()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  code = code.replace('"/tmp/ckpt"', repr(str(tmp_path / "ckpt")))
  model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(32)])
  x = jax.random.normal(jax.random.key(0), (4, 48))
  params = model.init(jax.random.key(1), x)["params"]
  ns = {"model": model, "x": x, "params": params, "key": jax.random.key(2)}
  exec(compile(code, "README.md", "exec"), ns)  # pylint: disable=exec-used
  np.testing.assert_allclose(ns["y"], model.apply({"params": qws_jax.unshare(ns["params_c"])}, x),
                             atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("comp", ["shared", "hashed"])
def test_attend_decodes_blocks_only(comp):
  """Tied read-out (Embed.attend): ``q @ table.T`` block by block, any table layout."""
  from qws_jax._src import ops  # pylint: disable=g-import-not-at-top
  w = np.random.default_rng(0).normal(size=(1100, 64)).astype(np.float32)
  table = {"t": w}
  c = (hand_share_tree(table, 8, axis=0) if comp == "shared" else hand_hash_tree(table, 8))["t"]
  q = jax.random.normal(jax.random.key(0), (2, 3, 64))
  want = q @ c.materialize().T
  np.testing.assert_allclose(ops.attend(c, q), want, atol=ATOL, rtol=1e-5)
  _assert_never_whole(lambda c: ops.attend(c, q), (c,), {"t": c})
