"""Deep Compression's trained quantization on a LeNet-300-100 MLP (digits, MNIST-1D).

Trains a 300-100 MLP per dataset, shares its three weight matrices at k = 256, 32, 16,
8, 4, 2 (per tensor and per output channel), measures test accuracy right after
`qws_jax.share` and after codebook fine-tuning (`qws_jax.codebook_optimizer`, indices
frozen), and compares at k=4 with quantization-aware re-clustering (a dense shadow copy
trained with straight-through gradients and re-shared every few steps).

Writes the "Deep Compression" section of benchmarks/RESULTS.md and
benchmarks/deep_compression.png. Runs offline on CPU in well under 3 minutes:

  python examples/deep_compression.py            # full sweep
  python examples/deep_compression.py --quick    # fewer ks, one dataset (smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qws_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KS = (256, 32, 16, 8, 4, 2)


class LeNet300100(nn.Module):
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(300)(x))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(self.classes)(x)


def load(name: str):
  """Standardised float32 train/test splits of an offline dataset."""
  if name == "digits":
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    n = int(0.75 * len(x))
    xtr, ytr, xte, yte = x[:n], y[:n], x[n:], y[n:]
  elif name == "mnist1d":
    import mnist1d.data  # pylint: disable=g-import-not-at-top
    d = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())  # generated, no download
    xtr, ytr = d["x"].astype(np.float32), d["y"].astype(np.int32)
    xte, yte = d["x_test"].astype(np.float32), d["y_test"].astype(np.int32)
  else:
    raise ValueError(f"unknown dataset {name!r}")
  mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
  return tuple(jnp.asarray(a) for a in ((xtr - mu) / sd, ytr, (xte - mu) / sd, yte))


def xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_steps(apply_fn, tx):
  @jax.jit
  def step(p, st, xb, yb):
    loss, g = jax.value_and_grad(lambda p: xent(apply_fn({"params": p}, xb), yb), allow_int=True)(p)
    u, st = tx.update(g, st, p)
    return optax.apply_updates(p, u), st, loss
  return step


def batches(key, n, bs, steps):
  out = []
  while len(out) * bs < steps * bs:
    key, sub = jax.random.split(key)
    perm = np.asarray(jax.random.permutation(sub, n))
    out.extend(perm[i:i + bs] for i in range(0, n - bs + 1, bs))
  return out[:steps]


def train_dense(model, data, steps, key):
  xtr, ytr, _, _ = data
  params = model.init(key, xtr[:1])["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=1e-4)
  st = tx.init(params)
  step = make_steps(model.apply, tx)
  for idx in batches(key, xtr.shape[0], 128, steps):
    params, st, _ = step(params, st, xtr[idx], ytr[idx])
  return params


def accuracy(apply_fn, params, x, y):
  logits = jax.jit(apply_fn)({"params": params}, x)
  return float((logits.argmax(-1) == y).mean())


def fine_tune(model, params_c, data, steps, key, lr=1e-3):
  """Codebook fine-tuning: indices frozen, codebooks + biases trained."""
  xtr, ytr, _, _ = data
  tx = qws_jax.codebook_optimizer(optax.adam(optax.cosine_decay_schedule(lr, steps)))
  st = tx.init(params_c)
  step = make_steps(qws_jax.apply(model.apply), tx)
  for idx in batches(key, xtr.shape[0], 128, steps):
    params_c, st, _ = step(params_c, st, xtr[idx], ytr[idx])
  return params_c


def recluster(model, params, data, steps, key, share_fn, every, lr=1e-3):
  """Quantization-aware re-clustering: a dense shadow trained with straight-through
  gradients (taken at the shared weights), re-shared every ``every`` steps; between
  re-shares the codebooks are fine-tuned like `fine_tune`, and the shadow moves too."""
  xtr, ytr, _, _ = data
  shadow = params
  tx_s = optax.adam(lr)
  st_s = tx_s.init(shadow)
  capply = qws_jax.apply(model.apply)

  @jax.jit
  def shadow_step(shadow, st_s, params_c, xb, yb):
    dense = qws_jax.unshare(params_c)  # straight-through: gradient at the shared weights
    g = jax.grad(lambda p: xent(model.apply({"params": p}, xb), yb))(dense)
    u, st_s = tx_s.update(g, st_s, shadow)
    return optax.apply_updates(shadow, u), st_s

  tx_c = qws_jax.codebook_optimizer(optax.adam(lr))
  cstep = make_steps(capply, tx_c)
  params_c = None
  for i, idx in enumerate(batches(key, xtr.shape[0], 128, steps)):
    if i % every == 0:
      params_c = share_fn(shadow)
      st_c = tx_c.init(params_c)
    shadow, st_s = shadow_step(shadow, st_s, params_c, xtr[idx], ytr[idx])
    params_c, st_c, _ = cstep(params_c, st_c, xtr[idx], ytr[idx])
  return params_c


def kernel_bits(params_c) -> float:
  """Storage bits per weight of the shared matrices, codebooks included."""
  leaves = [l for l in jax.tree_util.tree_leaves(params_c, is_leaf=qws_jax.SharedArray.__instancecheck__)
            if isinstance(l, qws_jax.SharedArray)]
  return 8.0 * sum(l.nbytes for l in leaves) / sum(l.size for l in leaves)


def model_bytes(params) -> int:
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda l: isinstance(l, qws_jax.SharedArray))
  return int(sum(l.nbytes for l in leaves))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="digits only, k in (32, 4): smoke test")
  ap.add_argument("--train-steps", type=int, default=1000)
  ap.add_argument("--ft-steps", type=int, default=200)
  ap.add_argument("--method", default="lloyd", help="qws_jax.share clustering method")
  ap.add_argument("--no-write", action="store_true", help="do not write RESULTS.md / the PNG")
  args = ap.parse_args(argv)
  t0 = time.time()
  datasets = ("digits",) if args.quick else ("digits", "mnist1d")
  ks = (32, 4) if args.quick else KS
  model = LeNet300100()
  rows, curves, recl = [], {}, []
  pred = lambda path, leaf: leaf.ndim == 2  # the three weight matrices (incl. 100x10)

  for ds in datasets:
    data = load(ds)
    key = jax.random.key(0)
    params = train_dense(model, data, args.train_steps, key)
    base = accuracy(model.apply, params, data[2], data[3])
    dense_bytes = model_bytes(params)
    rows.append((ds, "dense", "-", 32.0, dense_bytes, base, base))
    print(f"[{ds}] dense acc {base:.4f}, {dense_bytes} B ({time.time() - t0:.0f}s)", flush=True)
    capply = qws_jax.apply(model.apply)
    for layout, axis in (("tensor", None), ("channel", -1)):
      for k in ks:
        share_fn = lambda p, k=k, axis=axis: qws_jax.share(p, k=k, axis=axis, predicate=pred,
                                                           method=args.method)
        pc = share_fn(params)
        acc0 = accuracy(capply, pc, data[2], data[3])
        pft = fine_tune(model, pc, data, args.ft_steps, jax.random.key(1))
        acc1 = accuracy(capply, pft, data[2], data[3])
        bits = kernel_bits(pc)
        rows.append((ds, layout, k, bits, model_bytes(pc), acc0, acc1))
        curves.setdefault((ds, layout), []).append((bits, acc0, acc1))
        print(f"[{ds}] {layout:7s} k={k:3d} {bits:5.2f} b/w {model_bytes(pc):7d} B "
              f"post {acc0:.4f} ft {acc1:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if k == 4 and layout == "tensor":
          pr = recluster(model, params, data, args.ft_steps, jax.random.key(1), share_fn, every=50)
          acc_r = accuracy(capply, pr, data[2], data[3])
          recl.append((ds, base, acc0, acc1, acc_r))
          print(f"[{ds}] k=4 re-clustering {acc_r:.4f} vs fine-tune {acc1:.4f}", flush=True)

  elapsed = time.time() - t0
  body = ["LeNet-300-100 (300-100-10 MLP), all three weight matrices shared "
          f"(`qws_jax.share(method={args.method!r})`), biases dense float32. Dense training: "
          f"{args.train_steps} AdamW steps; codebook fine-tuning: {args.ft_steps} Adam steps with "
          "`qws_jax.codebook_optimizer` (indices frozen, codebooks + biases trained, sum "
          "reduction). bits/weight counts the packed indices and the codebooks of the shared "
          "matrices; model bytes is the whole parameter tree. Test accuracy on held-out data "
          "(digits: 25% of `load_digits`; MNIST-1D: `make_dataset` test split).", "",
          "| dataset | layout | k | bits/weight | model bytes | acc after share | acc after fine-tune |",
          "|---|---|---|---|---|---|---|"]
  for ds, layout, k, bits, nb, a0, a1 in rows:
    body.append(f"| {ds} | {layout} | {k} | {bits:.2f} | {nb} | {a0:.4f} | {a1:.4f} |")
  body += ["", "Quantization-aware re-clustering at k=4 per tensor (dense shadow trained with "
           "straight-through gradients, re-shared every 50 steps, codebooks fine-tuned in "
           f"between; same {args.ft_steps} steps) against plain codebook fine-tuning:", "",
           "| dataset | dense | k=4 after share | k=4 fine-tune | k=4 re-clustering |",
           "|---|---|---|---|---|"]
  for ds, base, a0, a1, ar in recl:
    body.append(f"| {ds} | {base:.4f} | {a0:.4f} | {a1:.4f} | {ar:.4f} |")
  body += ["", f"Total run time {elapsed:.0f} s. Plot: `benchmarks/deep_compression.png`."]
  text = "\n".join(body)
  print(text)
  if args.no_write:
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
  for ax, ds in zip(axes[0], datasets):
    base = next(r[5] for r in rows if r[0] == ds and r[1] == "dense")
    ax.axhline(base, color="k", ls=":", label="dense float32")
    for layout, c in (("tensor", "C0"), ("channel", "C1")):
      pts = sorted(curves[(ds, layout)])
      b = [p[0] for p in pts]
      ax.plot(b, [p[1] for p in pts], "o--", color=c, label=f"per {layout}, after share")
      ax.plot(b, [p[2] for p in pts], "s-", color=c, label=f"per {layout}, fine-tuned")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits / weight (indices + codebooks)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"LeNet-300-100 on {ds}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(ROOT, "benchmarks", "deep_compression.png"), dpi=120)
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  from _results import write_section  # pylint: disable=g-import-not-at-top
  write_section("deep_compression", "Deep Compression", text)


if __name__ == "__main__":
  main()
