"""Benchmark of qws_jax.kernels against dense and dequantize-then-matmul baselines.

For each ``M`` (rows of ``x``), weight shape ``(K, N)`` and codebook size ``k`` it times

* ``dense f32`` / ``dense bf16``: ``x @ w`` on a dense weight,
* ``dequant``: ``x @ codebook[unpack(indices)]`` (materialise, then matmul: the naive path),
* ``shared/<impl>``: `qws_jax.kernels.shared_matmul` for each implementation that runs
  on this backend (``pallas`` on GPU, ``xla`` everywhere),
* ``hashed/<impl>`` and ``hashed dequant``: `qws_jax.kernels.hashed_matmul` and
  ``x @ w.materialize()`` for a HashedArray with ``K*N / hash_ratio`` buckets,
* with ``--scale-group-size G``, also ``dequant`` and ``shared/<impl>`` for the same
  shared leaf with f16 group scales (``+scales/G``: one scale per ``G`` rows and column,
  decoded inside the kernels),

checks each result against the dense product, and reports the time, the ratio to dense
bf16 and to dense f32 (> 1: faster), and the achieved bandwidth (bytes the operation
must read: weight storage + x + output) against this device's measured copy bandwidth.
The table goes to benchmarks/RESULTS.md (section ``matmul``).

Usage::

  python benchmarks/matmul_bench.py            # reduced sweep on CPU, full sweep on GPU/TPU
  python benchmarks/matmul_bench.py --full     # the full sweep everywhere
  python benchmarks/matmul_bench.py --no-write # print only
  python benchmarks/matmul_bench.py --m 1 --k 16 --xla-block-k 512 --scale-group-size 128 \
      --no-hashed --no-write                    # quick: 4-bit, with and without scales
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _results import write_section  # pylint: disable=g-import-not-at-top,wrong-import-position

from qws_jax import HashedArray  # pylint: disable=wrong-import-position
from qws_jax import SharedArray  # pylint: disable=wrong-import-position
from qws_jax._src import packing  # pylint: disable=wrong-import-position
from qws_jax._src import types  # pylint: disable=wrong-import-position
from qws_jax.kernels import BlockSizes  # pylint: disable=wrong-import-position
from qws_jax.kernels import hashed_matmul  # pylint: disable=wrong-import-position
from qws_jax.kernels import shared_matmul  # pylint: disable=wrong-import-position

FULL_M = (1, 16, 128)
FULL_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
FULL_K = (16, 256)


def bench(f, *args, reps: int, min_time: float = 0.0) -> float:
  """Median wall time in ms of ``f(*args)`` after one warm-up call (compilation)."""
  jax.block_until_ready(f(*args))
  ts = []
  t_start = time.perf_counter()
  while len(ts) < reps or time.perf_counter() - t_start < min_time:
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts)) * 1e3


def copy_bandwidth(reps: int) -> float:
  """GB/s of ``a + 1`` over a large f32 array (read + write) on the default device."""
  n = (256 if jax.default_backend() != "cpu" else 64) * 2**20 // 4
  a = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda a: a + jnp.float32(1))
  ms = bench(f, a, reps=reps)
  return 2 * a.nbytes / (ms * 1e-3) / 1e9


def nbytes(*arrays) -> int:
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays)


def make_shared(rng, K, N, k, dtype) -> SharedArray:
  bits = types.bits_for(k)
  cb = jnp.sort(jnp.asarray(rng.normal(size=(k,)) * 0.02, dtype))
  idx = rng.integers(0, k, (K, N))
  return SharedArray(packing.pack(idx, bits), cb, (K, N), dtype, bits)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--full", action="store_true", help="full sweep (default on GPU/TPU)")
  ap.add_argument("--m", type=int, nargs="+", default=None, help="override the M values")
  ap.add_argument("--reps", type=int, default=None, help="timed calls per case (median)")
  ap.add_argument("--dtype", choices=("bf16", "f32"), default=None,
                  help="activation/codebook dtype of the compressed kernels (default: bf16 on"
                       " accelerators, f32 on CPU where bf16 dots are slow)")
  ap.add_argument("--hash-ratio", type=int, default=64,
                  help="virtual weights per hashed bucket (B = K*N / ratio)")
  ap.add_argument("--xla-block-k", type=int, nargs="+", default=None,
                  help="xla_block_k values to time for the XLA path (default: 128 256 512 on"
                       " CPU, where the choice of the CPU fallback is documented, else 256)")
  ap.add_argument("--k", type=int, nargs="+", default=None,
                  help=f"codebook sizes of the shared leaves (default {list(FULL_K)})")
  ap.add_argument("--scale-group-size", type=int, default=None,
                  help="also time each shared leaf with f16 group scales of this many rows")
  ap.add_argument("--no-hashed", action="store_true", help="skip the hashed matmul")
  ap.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
  args = ap.parse_args(argv)

  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  full = args.full or not on_cpu
  ms_list = tuple(args.m) if args.m else (FULL_M if full else (1, 16))
  shapes = FULL_SHAPES if full else ((4096, 4096),)
  reps = args.reps or (10 if on_cpu else 50)
  dname = args.dtype or ("f32" if on_cpu else "bf16")
  dt = jnp.float32 if dname == "f32" else jnp.bfloat16
  impls = ["xla"] + (["pallas"] if backend in ("gpu", "cuda", "rocm") else [])
  xla_bks = tuple(args.xla_block_k or ((128, 256, 512) if on_cpu else (256,)))
  ks = tuple(args.k or FULL_K)
  sgs = args.scale_group_size
  rng = np.random.default_rng(0)
  bw = copy_bandwidth(reps)
  dev = jax.devices()[0]
  print(f"device {dev.platform}:{getattr(dev, 'device_kind', '?')}; copy bandwidth {bw:.1f} GB/s;"
        f" kernel dtype {dname}", flush=True)

  dense = jax.jit(lambda x, w: x @ w)
  dequant = jax.jit(lambda x, w: x @ w.materialize().astype(x.dtype))
  rows = []

  def row(case, what, ms, moved, t_bf16, t_f32, err=""):
    gbs = moved / (ms * 1e-3) / 1e9
    r = (case, what, f"{ms:.3f}", f"{t_bf16 / ms:.2f}x", f"{t_f32 / ms:.2f}x", f"{gbs:.1f}",
         f"{100 * gbs / bw:.0f}%", err)
    rows.append(r)
    print(" | ".join(r), flush=True)

  for K, N in shapes:
    wf = jnp.asarray(rng.normal(size=(K, N)) * 0.02, jnp.float32)
    wb = wf.astype(jnp.bfloat16)
    for m in ms_list:
      xf = jnp.asarray(rng.normal(size=(m, K)), jnp.float32)
      xb = xf.astype(jnp.bfloat16)
      x = xf.astype(dt)
      out_bytes = m * N * np.dtype(dt).itemsize
      t_f32 = bench(dense, xf, wf, reps=reps)
      t_bf16 = bench(dense, xb, wb, reps=reps)
      case = f"M={m} {K}x{N}"
      row(case, "dense f32", t_f32, nbytes(xf, wf) + m * N * 4, t_bf16, t_f32)
      row(case, "dense bf16", t_bf16, nbytes(xb, wb) + m * N * 2, t_bf16, t_f32)
      for k in ks:
        w0 = make_shared(rng, K, N, k, dt)
        leaves = [("", w0)]
        if sgs:
          sc = jnp.asarray(rng.uniform(0.5, 2.0, (-(-K // sgs), N)), jnp.float16)
          leaves.append((f" +scales/{sgs}", dataclasses.replace(w0, scales=sc, scale_group_size=sgs)))
        for suffix, w in leaves:
          want = np.asarray(dequant(x, w), np.float32)
          scale = float(np.abs(want).max())
          moved = nbytes(*(a for a in (w.indices, w.codebook, w.scales) if a is not None), x) + out_bytes
          tag = f"k={k} ({w.bits}-bit){suffix}"
          row(case, f"{tag} dequant", bench(dequant, x, w, reps=reps), moved, t_bf16, t_f32)
          variants = [("xla", bk) for bk in xla_bks] + [(i, None) for i in impls if i != "xla"]
          for impl, bk in variants:
            bs = BlockSizes(xla_block_k=bk) if bk else BlockSizes()
            f = jax.jit(lambda x, w, impl=impl, bs=bs: shared_matmul(x, w, impl=impl, block_sizes=bs))
            got = np.asarray(f(x, w), np.float32)
            err = f"{np.abs(got - want).max() / scale:.1e}"
            name = f"{tag} shared/{impl}" + (f" (xla_block_k={bk})" if bk else "")
            row(case, name, bench(f, x, w, reps=reps), moved, t_bf16, t_f32, err)
      if args.no_hashed:
        continue
      B = max(1, K * N // args.hash_ratio)
      h = HashedArray(jnp.asarray(rng.normal(size=(B,)) * 0.02, dt), (K, N), dt, seed=12345)
      want = np.asarray(dequant(x, h), np.float32)
      scale = float(np.abs(want).max())
      moved = nbytes(h.buckets, x) + out_bytes
      tag = f"hashed B=KN/{args.hash_ratio}"
      row(case, f"{tag} dequant", bench(dequant, x, h, reps=reps), moved, t_bf16, t_f32)
      for impl in impls:
        f = jax.jit(lambda x, w, impl=impl: hashed_matmul(x, w, impl=impl))
        got = np.asarray(f(x, h), np.float32)
        err = f"{np.abs(got - want).max() / scale:.1e}"
        row(case, f"{tag} hashed/{impl}", bench(f, x, h, reps=reps), moved, t_bf16, t_f32, err)

  head = ("| case | op | ms (median) | vs dense bf16 | vs dense f32 | GB/s | of copy BW |"
          " max rel err |\n|---|---|---:|---:|---:|---:|---:|---:|\n")
  table = head + "\n".join("| " + " | ".join(r) + " |" for r in rows)
  load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
  body = (f"Load average during the run (1/5/15 min): {load} on {os.cpu_count()} cores (other"
          f" jobs share this machine, so CPU times are noisy). "
          f"Copy bandwidth (`a + 1`, f32, read + write): {bw:.1f} GB/s. Compressed kernels run"
          f" with {dname} activations and codebooks; ratios > 1 mean faster than the dense"
          f" matmul. GB/s counts the bytes each op must read (weight storage, x) and write"
          f" (output). Sweep: M in {list(ms_list)}, (K, N) in {[tuple(s) for s in shapes]},"
          f" k in {list(ks)}, {reps} timed calls per case (median)."
          + (f" Scaled leaves: f16 scales per {sgs} rows." if sgs else "") +
          f" max rel err: max |ours - dequant| / max |dequant|.\n\n{table}\n")
  if not args.no_write:
    write_section("matmul", "Compressed matmul kernels (benchmarks/matmul_bench.py)", body)


if __name__ == "__main__":
  main()
