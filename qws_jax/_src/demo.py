"""``qws-jax demo``: the whole pipeline on data that ships offline, in about a minute.

1. Trains a small MLP on scikit-learn's 8x8 digits (1797 images, bundled with sklearn).
2. Shares its weights with k-means at several ``k`` (`qws_jax.share`), then fine-tunes
   the codebooks with `qws_jax.codebook_optimizer` (the gradient of a centroid is the
   sum of the gradients of the weights that point at it, Deep Compression), then
   restores the canonical sorted codebook (`qws_jax.canonicalize`).
3. Trains a HashedNets MLP from scratch (`qws_jax.linen.HashedDense`).
4. Saves every compressed model with `qws_jax.save`, restores it with
   `qws_jax.restore` and checks that the restored model gives the same predictions.
5. Prints a table: test accuracy, bits per weight, stored bytes, checkpoint bytes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qws_jax._src import checkpoint
from qws_jax._src import share as share_lib
from qws_jax._src import train
from qws_jax._src import types


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
  """Sizes of a demo run."""

  hidden: tuple[int, ...] = (256, 256)
  epochs: int = 40
  batch_size: int = 64
  learning_rate: float = 2e-3
  ks: tuple[int, ...] = (2, 4, 16, 32)
  finetune_steps: int = 300
  finetune_learning_rate: float = 1e-3
  hash_compression: float = 1 / 8
  hash_epochs: int = 60

  def __post_init__(self):
    if self.epochs < 1 or self.hash_epochs < 1 or self.finetune_steps < 0:
      raise ValueError(f"epochs, hash_epochs must be >= 1 and finetune_steps >= 0: {self}")
    if not self.ks or any(not 2 <= k <= 256 for k in self.ks):
      raise ValueError(f"ks must be non-empty values in [2, 256], got {self.ks}")


QUICK = DemoConfig(epochs=15, ks=(4, 16), finetune_steps=100, hash_epochs=25)


class MLP(nn.Module):
  hidden: tuple[int, ...]
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.classes)(x)


class HashedMLP(nn.Module):
  hidden: tuple[int, ...]
  compression: float
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    from qws_jax._src.layers import HashedDense  # pylint: disable=g-import-not-at-top
    for h in self.hidden:
      x = nn.relu(HashedDense(h, compression=self.compression)(x))
    return HashedDense(self.classes, compression=self.compression)(x)


def load_digits(seed: int):
  """Standardised sklearn digits, a fixed 80/20 split: (x_train, y_train, x_test, y_test)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  x, y = x[perm], y[perm]
  n = int(0.8 * len(x))
  mean, std = x[:n].mean(0), x[:n].std(0) + 1e-3
  x = ((x - mean) / std).astype(np.float32)
  return x[:n], y[:n], x[n:], y[n:]


def _progress(total, desc):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None)


def _loss(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _train(apply_fn, params, tx, data, *, epochs, batch_size, seed, desc):
  """Minibatch training of ``params`` with the optax transformation ``tx``.

  Gradients are taken with ``allow_int=True`` so compressed trees (uint8 indices) go
  through as they are; `qws_jax.codebook_optimizer` then trains only the float leaves.
  """
  x, y = data
  state = tx.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    loss, g = jax.value_and_grad(lambda p: _loss(apply_fn(p, xb), yb), allow_int=True)(params)
    upd, state = tx.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss

  rng = np.random.default_rng(seed)
  n = len(x) // batch_size
  bar = _progress(epochs, desc)
  for _ in range(epochs):
    perm = rng.permutation(len(x))
    for i in range(n):
      b = perm[i * batch_size:(i + 1) * batch_size]
      params, state, loss = step(params, state, x[b], y[b])
    bar.update(1)
    bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
  bar.close()
  return params


def _steps_as_epochs(steps, n, batch_size):
  return max(1, -(-steps // max(1, n // batch_size)))


def _accuracy(apply_fn, params, x, y) -> float:
  return float(np.mean(np.argmax(np.asarray(apply_fn(params, x)), -1) == y))


def _stored(params) -> tuple[int, int]:
  """(stored bytes, number of logical weights) of a parameter tree."""
  nbytes = n = 0
  for leaf in jax.tree.leaves(params, is_leaf=types.is_compressed):
    if types.is_compressed(leaf):
      nbytes += leaf.nbytes
      n += leaf.size
    else:
      nbytes += leaf.size * leaf.dtype.itemsize
      n += leaf.size
  return nbytes, n


def _du(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run(*, quick: bool = False, workdir: str | None = None, seed: int = 0,
        config: DemoConfig | None = None, out=None) -> int:
  """Runs the demo and prints its table; returns 0 (the CLI exit code)."""
  import qws_jax  # pylint: disable=g-import-not-at-top
  out = out or sys.stdout
  cfg = config or (QUICK if quick else DemoConfig())
  share = getattr(qws_jax, "share", None)
  if share is None:
    raise NotImplementedError("the demo needs qws_jax.share, which this build lacks")
  t_start = time.perf_counter()
  x_tr, y_tr, x_te, y_te = load_digits(seed)
  print(f"digits: {len(x_tr)} train / {len(x_te)} test images of 8x8 pixels, 10 classes;"
        f" MLP 64-{'-'.join(map(str, cfg.hidden))}-10", file=out)
  tmp = None
  if workdir is None:
    tmp = tempfile.TemporaryDirectory(prefix="qws_jax_demo_")
    workdir = tmp.name
  os.makedirs(workdir, exist_ok=True)
  rows: list[dict[str, Any]] = []

  model = MLP(cfg.hidden)
  params = model.init(jax.random.key(seed), x_tr[:1])["params"]
  apply_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
  params = _train(apply_fn, params, optax.adam(cfg.learning_rate), (x_tr, y_tr),
                  epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed, desc="dense MLP")
  nbytes, nweights = _stored(params)
  path = checkpoint.save(os.path.join(workdir, "dense"), params, force=True)
  rows.append(dict(model="dense f32", acc=_accuracy(apply_fn, params, x_te, y_te),
                   bpw=8 * nbytes / nweights, stored=nbytes, disk=_du(path), restored="-"))

  dense_apply = jax.jit(lambda p, x: model.apply({"params": share_lib.unshare(p)}, x))
  ft_epochs = _steps_as_epochs(cfg.finetune_steps, len(x_tr), cfg.batch_size)
  bar = _progress(len(cfg.ks), "sharing")
  for k in cfg.ks:
    params_c = share(params, k=k, method="lloyd")  # Deep Compression: linear-init Lloyd
    acc0 = _accuracy(dense_apply, params_c, x_te, y_te)
    if cfg.finetune_steps:
      tx = qws_jax.codebook_optimizer(optax.adam(cfg.finetune_learning_rate))
      params_c = _train(dense_apply, params_c, tx, (x_tr, y_tr), epochs=ft_epochs,
                        batch_size=cfg.batch_size, seed=seed + k, desc=f"fine-tune k={k}")
      params_c = train.canonicalize(params_c)
    acc = _accuracy(dense_apply, params_c, x_te, y_te)
    path = checkpoint.save(os.path.join(workdir, f"shared_k{k}"), params_c, force=True)
    back = checkpoint.restore(path)
    same = bool(np.array_equal(np.asarray(dense_apply(back, x_te)),
                               np.asarray(dense_apply(params_c, x_te))))
    nbytes, nweights = _stored(params_c)
    rows.append(dict(model=f"shared k={k}", acc0=acc0, acc=acc, bpw=8 * nbytes / nweights,
                     stored=nbytes, disk=_du(path), restored="ok" if same else "MISMATCH"))
    bar.update(1)
  bar.close()

  hmodel = HashedMLP(cfg.hidden, cfg.hash_compression)
  hparams = hmodel.init(jax.random.key(seed + 1), x_tr[:1])["params"]
  happly = jax.jit(lambda p, x: hmodel.apply({"params": p}, x))
  hparams = _train(happly, hparams, optax.adam(cfg.learning_rate), (x_tr, y_tr),
                   epochs=cfg.hash_epochs, batch_size=cfg.batch_size, seed=seed + 1,
                   desc="hashed MLP")
  path = checkpoint.save(os.path.join(workdir, "hashed"), hparams, force=True)
  back = checkpoint.restore(path)
  same = bool(np.array_equal(np.asarray(happly(back, x_te)), np.asarray(happly(hparams, x_te))))
  nbytes, nweights = _stored(hparams)
  rows.append(dict(model=f"hashed 1/{round(1 / cfg.hash_compression)}",
                   acc=_accuracy(happly, hparams, x_te, y_te), bpw=8 * nbytes / nweights,
                   stored=nbytes, disk=_du(path), restored="ok" if same else "MISMATCH"))

  head = (f"{'model':<14} {'acc (shared)':>12} {'acc':>7} {'bits/weight':>11} {'stored':>9}"
          f" {'ckpt on disk':>12} {'restore':>8}")
  print(head, file=out)
  print("-" * len(head), file=out)
  for r in rows:
    acc0 = f"{r['acc0']:.3f}" if "acc0" in r else "-"
    print(f"{r['model']:<14} {acc0:>12} {r['acc']:>7.3f} {r['bpw']:>11.2f}"
          f" {r['stored']:>9,} {r['disk']:>12,} {r['restored']:>8}", file=out)
  print(f"acc (shared): right after k-means sharing; acc: after {cfg.finetune_steps} steps of"
        f" codebook fine-tuning (the hashed net is trained from scratch, {cfg.hash_epochs}"
        f" epochs). bits/weight and stored count every parameter (biases included);"
        f" ckpt on disk is the qws_jax.save directory. {len(x_te)} test images;"
        f" {time.perf_counter() - t_start:.1f} s.", file=out)
  if tmp is not None:
    tmp.cleanup()
  else:
    print(f"checkpoints in {workdir}", file=out)
  return 0 if all(r["restored"] in ("ok", "-") for r in rows) else 1
