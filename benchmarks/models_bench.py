"""Compressed vs dense forward at batch 1 on small versions of real Flax model patterns.

The models are written here, after the structure of the models of issue 13 (flax's
examples and google-research's ViT; the originals are not downloaded): an LM1B-style
decoder-only TransformerLM and a WMT-style encoder-decoder (params boxed by
``nn.with_logical_partitioning``), ResNet-18, an SST-2 BiLSTM classifier, the VAE,
the NNX MNIST CNN, a ViT encoder, and an NNX Gemma-style transformer (``ScaledEmbed``
subclass of ``nnx.Embed``, ``nnx.Einsum`` attention, gated MLP, tied read-out). Sizes
are reduced (fewer layers, smaller vocabularies) so the sweep runs in minutes on a
laptop CPU; the layer shapes that matter for the matmuls (512-1024 wide) are kept.

For each model: ``qws_jax.share(params, k=16)`` with the default selection, then the
jitted forward at batch 1 of the dense model and of the compressed one (`qws_jax.apply`
for linen, `qws_jax.nnx.share` for NNX), median of ``--reps`` calls each, measured in
the same process, alternating. The table reports both times, compressed / dense (> 1:
compressed slower), the fraction of weights compressed, and the largest difference to
the dense model run on ``unshare(params_c)`` (the same compressed values).

Usage::

  python benchmarks/models_bench.py              # all models, writes RESULTS.md (section models)
  python benchmarks/models_bench.py --only vae mnist --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _results import write_section  # pylint: disable=g-import-not-at-top,wrong-import-position

import qws_jax  # pylint: disable=wrong-import-position
from qws_jax._src import types  # pylint: disable=wrong-import-position

LP = nn.with_logical_partitioning


# ----------------------------------------------------------------------------- linen models


class DecoderLayer(nn.Module):
  dim: int = 512
  heads: int = 8
  mlp: int = 2048
  cross: bool = False

  @nn.compact
  def __call__(self, x, enc=None):
    kinit = LP(nn.initializers.xavier_uniform(), ("embed", "mlp"))
    h = nn.LayerNorm()(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(self.heads, kernel_init=LP(
        nn.initializers.xavier_uniform(), ("embed", "heads", "kv")))(h, h, mask=mask)
    if self.cross:
      x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x), enc)
    h = nn.relu(nn.Dense(self.mlp, kernel_init=kinit)(nn.LayerNorm()(x)))
    return x + nn.Dense(self.dim, kernel_init=LP(nn.initializers.xavier_uniform(), ("mlp", "embed")))(h)


class TransformerLM(nn.Module):
  """LM1B-style: embedding, learned positions, decoder layers, logits Dense (boxed params)."""
  vocab: int = 8192
  dim: int = 512
  layers: int = 2

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, self.dim, embedding_init=LP(nn.initializers.normal(1.0),
                                                         ("vocab", "embed")))(ids)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, ids.shape[1], self.dim))
    for _ in range(self.layers):
      x = DecoderLayer(self.dim)(x)
    return nn.Dense(self.vocab, kernel_init=LP(nn.initializers.xavier_uniform(),
                                               ("embed", "vocab")))(nn.LayerNorm()(x))


class EncoderDecoder(nn.Module):
  """WMT-style: shared embedding, one encoder and one decoder layer with cross-attention."""
  vocab: int = 8192
  dim: int = 512

  @nn.compact
  def __call__(self, src, tgt):
    emb = nn.Embed(self.vocab, self.dim, embedding_init=LP(nn.initializers.normal(1.0),
                                                           ("vocab", "embed")))
    e = emb(src)
    h = nn.LayerNorm()(e)
    e = e + nn.MultiHeadDotProductAttention(8)(h, h)
    e = e + nn.Dense(self.dim)(nn.relu(nn.Dense(2048)(nn.LayerNorm()(e))))
    d = DecoderLayer(self.dim, cross=True)(emb(tgt), e)
    return nn.Dense(self.vocab)(nn.LayerNorm()(d))


class ResBlock(nn.Module):
  filters: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    bn = lambda: nn.BatchNorm(use_running_average=True)
    y = nn.relu(bn()(nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)))
    y = bn()(nn.Conv(self.filters, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = bn()(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for i, f in enumerate((64, 128, 256, 512)):
      x = ResBlock(f, 1 if i == 0 else 2)(x)
      x = ResBlock(f)(x)
    return nn.Dense(1000)(x.mean(axis=(1, 2)))


class BiLSTM(nn.Module):
  """SST-2 style: embedding, bidirectional LSTM, MLP classifier."""
  vocab: int = 8192
  dim: int = 256

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, self.dim)(ids)
    x = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(self.dim)),
                         nn.RNN(nn.OptimizedLSTMCell(self.dim)))(x)
    return nn.Dense(2)(nn.tanh(nn.Dense(self.dim)(x[:, -1])))


class VAE(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(500)(x))
    mean, logvar = nn.Dense(20)(h), nn.Dense(20)(h)
    z = mean + jnp.exp(0.5 * logvar) * 0.1
    return nn.sigmoid(nn.Dense(784)(nn.relu(nn.Dense(500)(z))))


class ViT(nn.Module):
  """ViT-B/16 layout with 2 layers: patch Conv, cls token, learned positions."""
  dim: int = 768
  layers: int = 2

  @nn.compact
  def __call__(self, img):
    x = nn.Conv(self.dim, (16, 16), (16, 16), padding="VALID", name="embedding")(img)
    x = x.reshape(x.shape[0], -1, self.dim)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
    x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
    for _ in range(self.layers):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(12)(h, h)
      x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(3072)(nn.LayerNorm()(x))))
    return nn.Dense(1000, name="head")(nn.LayerNorm()(x[:, 0]))


# ----------------------------------------------------------------------------- NNX models


class MnistCNN(nnx.Module):
  def __init__(self, rngs):
    self.c1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.l1 = nnx.Linear(3136, 256, rngs=rngs)
    self.l2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.avg_pool(nnx.relu(self.c1(x)), (2, 2), (2, 2))
    x = nnx.avg_pool(nnx.relu(self.c2(x)), (2, 2), (2, 2))
    return self.l2(nnx.relu(self.l1(x.reshape(x.shape[0], -1))))


class ScaledEmbed(nnx.Embed):
  def __call__(self, x):
    return super().__call__(x) * jnp.sqrt(jnp.asarray(self.features, jnp.float32))


class GemmaBlock(nnx.Module):
  def __init__(self, dim, heads, hd, mlp, rngs):
    self.n1 = nnx.RMSNorm(dim, rngs=rngs)
    self.q = nnx.Einsum("btd,dnh->btnh", (dim, heads, hd), rngs=rngs)
    self.kv = nnx.Einsum("btd,dnh->btnh", (dim, 2 * heads, hd), rngs=rngs)
    self.o = nnx.Einsum("btnh,nhd->btd", (heads, hd, dim), rngs=rngs)
    self.n2 = nnx.RMSNorm(dim, rngs=rngs)
    self.gate = nnx.Linear(dim, mlp, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(dim, mlp, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(mlp, dim, use_bias=False, rngs=rngs)
    self.heads = heads

  def __call__(self, x):
    h = self.n1(x)
    q = self.q(h)
    k, v = jnp.split(self.kv(h), 2, axis=2)
    a = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / 8.0, axis=-1)
    x = x + self.o(jnp.einsum("bnts,bsnh->btnh", a, v))
    h = self.n2(x)
    return x + self.down(jax.nn.gelu(self.gate(h)) * self.up(h))


class Gemma(nnx.Module):
  def __init__(self, rngs, vocab=8192, dim=512, layers=2):
    self.emb = ScaledEmbed(vocab, dim, rngs=rngs)
    self.blocks = nnx.List([GemmaBlock(dim, 8, 64, 2048, rngs) for _ in range(layers)])
    self.norm = nnx.RMSNorm(dim, rngs=rngs)

  def __call__(self, ids):
    x = self.emb(ids)
    for b in self.blocks:
      x = b(x)
    return self.emb.attend(self.norm(x))


# ----------------------------------------------------------------------------- harness


def _linen_cases():
  k = jax.random.key(0)
  ids = jax.random.randint(k, (1, 32), 0, 8192)
  return {
      "lm1b": (TransformerLM(), (ids,)),
      "wmt": (EncoderDecoder(), (ids, ids)),
      "resnet18": (ResNet18(), (jax.random.normal(k, (1, 64, 64, 3)),)),
      "sst2": (BiLSTM(), (ids,)),
      "vae": (VAE(), (jax.random.normal(k, (1, 784)),)),
      "vit": (ViT(), (jax.random.normal(k, (1, 224, 224, 3)),)),
  }


def _nnx_cases():
  k = jax.random.key(0)
  return {
      "mnist": (MnistCNN, (jax.random.normal(k, (1, 28, 28, 1)),)),
      "gemma": (Gemma, (jax.random.randint(k, (1, 32), 0, 8192),)),
  }


def _time_pair(f_dense, a_dense, f_comp, a_comp, reps: int) -> tuple[float, float]:
  jax.block_until_ready(f_dense(*a_dense))
  jax.block_until_ready(f_comp(*a_comp))
  td, tc = [], []
  for _ in range(reps):  # alternate, so both see the same machine load
    t0 = time.perf_counter()
    jax.block_until_ready(f_dense(*a_dense))
    td.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(f_comp(*a_comp))
    tc.append(time.perf_counter() - t0)
  return float(np.median(td)) * 1e3, float(np.median(tc)) * 1e3


def _fraction(tree) -> float:
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=types.is_compressed)
  comp = sum(l.size for l in leaves if types.is_compressed(l))
  total = sum(l.size for l in leaves if types.is_compressed(l) or hasattr(l, "size"))
  return comp / max(total, 1)


def run_linen(name, model, args, k, reps):
  variables = jax.jit(model.init)(jax.random.key(1), *args)
  params = variables["params"]
  rest = {c: v for c, v in variables.items() if c != "params"}
  t0 = time.perf_counter()
  params_c = jax.block_until_ready(qws_jax.share(params, k=k))
  cold = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(qws_jax.share(params, k=k))
  warm = time.perf_counter() - t0
  dense_vars = {"params": qws_jax.unshare(params_c), **rest}
  f_dense = jax.jit(model.apply)
  f_comp = jax.jit(qws_jax.apply(model.apply))
  err = float(jnp.max(jnp.abs(f_comp({"params": params_c, **rest}, *args)
                              - f_dense(dense_vars, *args))))
  td, tc = _time_pair(f_dense, (dense_vars,) + args, f_comp, ({"params": params_c, **rest},) + args,
                      reps)
  return td, tc, _fraction(params_c), err, cold, warm


def run_nnx(name, cls, args, k, reps):
  model = cls(nnx.Rngs(0))
  t0 = time.perf_counter()
  model_c = qws_jax.nnx.share(model, k=k)
  jax.block_until_ready(nnx.state(model_c))
  cold = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(nnx.state(qws_jax.nnx.share(model, k=k)))
  warm = time.perf_counter() - t0
  pure_c = nnx.to_pure_dict(nnx.state(model_c, nnx.Param))
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  params = jax.tree_util.tree_map(lambda a: a, params)
  nnx.replace_by_pure_dict(params, qws_jax.unshare(pure_c))
  gd_c, st_c = nnx.split(model_c)
  f_dense = jax.jit(lambda p, o, *a: nnx.merge(graphdef, p, o)(*a))
  f_comp = jax.jit(lambda s, *a: nnx.merge(gd_c, s)(*a))
  err = float(jnp.max(jnp.abs(f_comp(st_c, *args) - f_dense(params, other, *args))))
  td, tc = _time_pair(f_dense, (params, other) + args, f_comp, (st_c,) + args, reps)
  return td, tc, _fraction(pure_c), err, cold, warm


def _child(name: str, k: int, reps: int) -> dict:
  """One model in this (fresh) process: share cold and warm, then the forward timings."""
  cases = {n: ("linen", c) for n, c in _linen_cases().items()}
  cases.update({n: ("nnx", c) for n, c in _nnx_cases().items()})
  api, (model, inputs) = cases[name]
  run = run_linen if api == "linen" else run_nnx
  td, tc, frac, err, cold, warm = run(name, model, inputs, k, reps)
  return dict(name=name, api=api, td=td, tc=tc, frac=frac, err=err, cold=cold, warm=warm)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", nargs="*", help="model names to run")
  ap.add_argument("--k", type=int, default=16)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--no-write", action="store_true")
  ap.add_argument("--child", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    print("ROW" + json.dumps(_child(args.child, args.k, args.reps)), flush=True)
    return
  load0 = os.getloadavg()
  rows = []
  names = list(_linen_cases()) + list(_nnx_cases())
  for name in names:
    if args.only and name not in args.only:
      continue
    # Each model in a fresh process, so its first `share` is what a user meets first.
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name,
                           "--k", str(args.k), "--reps", str(args.reps)],
                          capture_output=True, text=True, check=False)
    got = [l for l in proc.stdout.splitlines() if l.startswith("ROW")]
    if proc.returncode or not got:
      raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(got[-1][3:])
    rows.append(r)
    print(f"{name:10s} {r['api']:5s} dense {r['td']:8.3f} ms  compressed {r['tc']:8.3f} ms"
          f"  ratio {r['tc'] / r['td']:5.2f}  compressed {r['frac']:5.1%}  max|diff|"
          f" {r['err']:.1e}  share cold {r['cold']:.2f} s warm {r['warm']:.2f} s", flush=True)
  load1 = os.getloadavg()
  body = [f"Batch 1, jitted forward, median of {args.reps} calls each (dense and compressed"
          f" alternating in one process); `qws_jax.share(params, k={args.k})` with the default"
          " selection (`qws_jax.nnx.share` for NNX). Each model runs in a fresh process:"
          " share cold = its first `share` call (compilation included), warm = a second call."
          f" Load average (1 min) {load0[0]:.1f} before, {load1[0]:.1f} after.",
          "", "| model | API | dense ms | compressed ms | compressed / dense | weights compressed"
          " | max abs diff to unshare | share cold | share warm |",
          "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    body.append(f"| {r['name']} | {r['api']} | {r['td']:.3f} | {r['tc']:.3f} |"
                f" {r['tc'] / r['td']:.2f}x | {r['frac']:.1%} | {r['err']:.1e} |"
                f" {r['cold']:.2f} s | {r['warm']:.2f} s |")
  text = "\n".join(body)
  print(text)
  if not args.no_write:
    write_section("models", "Models at batch 1 on CPU (benchmarks/models_bench.py)", text)


if __name__ == "__main__":
  main()
