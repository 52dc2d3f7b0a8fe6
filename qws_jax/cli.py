"""The ``qws-jax`` command line: ``compress``, ``inspect`` and ``demo``.

Examples::

  qws-jax compress model.safetensors out_ckpt --k 16
  qws-jax compress orbax_ckpt out_ckpt --k 32 --group-size 128 --exclude 'embed'
  qws-jax inspect out_ckpt
  qws-jax demo

Errors are printed as one line (no traceback) with a non-zero exit code; set
``QWS_JAX_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

_PROG = "qws-jax"


class CliError(Exception):
  """An error reported to the user as one line."""


def _quiet_logs() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def _du(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return f"{n:.2f} GiB"


# ----------------------------------------------------------------------------- loading


def _load_input(path: str):
  """A pytree of numpy / jax arrays from a .safetensors file or an Orbax checkpoint."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise CliError(f"input {path!r} does not exist")
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise CliError(f"input {path!r} is a file but not .safetensors; give a .safetensors"
                     " file or an Orbax checkpoint directory")
    try:
      from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
      return dict(st_numpy.load_file(path))
    except (TypeError, ValueError):  # e.g. bfloat16, which safetensors.numpy cannot map
      try:
        from safetensors import flax as st_flax  # pylint: disable=g-import-not-at-top
        return dict(st_flax.load_file(path))
      except Exception as e:  # pylint: disable=broad-except
        raise CliError(f"cannot read safetensors file {path!r}: {e}") from None
    except Exception as e:  # pylint: disable=broad-except  (SafetensorError etc.)
      raise CliError(f"cannot read safetensors file {path!r}: {e}") from None
  from qws_jax._src import checkpoint  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(path, checkpoint.META_ITEM)):
    return checkpoint.restore(path)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def pytree_at(p):
    with ocp.PyTreeCheckpointer() as ckptr:
      meta = ckptr.metadata(p)
      meta = getattr(meta, "item_metadata", meta)
      meta = getattr(meta, "tree", meta)
      import jax  # pylint: disable=g-import-not-at-top
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
      return ckptr.restore(p, args=ocp.args.PyTreeRestore(restore_args=restore_args))

  try:
    if os.path.isfile(os.path.join(path, "_METADATA")):
      return pytree_at(path)
    items = sorted(n for n in os.listdir(path)
                   if os.path.isfile(os.path.join(path, n, "_METADATA")))
    if items:  # an Orbax composite checkpoint: one pytree per item
      return {n: pytree_at(os.path.join(path, n)) for n in items}
  except CliError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CliError(f"cannot read Orbax checkpoint {path!r}: {type(e).__name__}: {e}") from None
  steps = [n for n in os.listdir(path) if n.isdigit()]
  hint = f" (a CheckpointManager directory? give a step, e.g. {os.path.join(path, max(steps, key=int))})" if steps else ""
  raise CliError(f"{path!r} is not an Orbax checkpoint or a .safetensors file{hint}")


# ----------------------------------------------------------------------------- report


def _print_report(params, compressed, *, disk_bytes=None, out=None) -> None:
  """`qws_jax.report`'s per-leaf table, then totals and the size on disk."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from qws_jax._src import report as report_lib  # pylint: disable=g-import-not-at-top
  out = out or sys.stdout
  rep = report_lib.report(params, compressed)
  print(rep, file=out)
  leaves = rep.leaves
  n_params = sum(int(np.prod(r.shape, dtype=np.int64)) for r in leaves)
  n_comp = sum(r.kind != "dense" for r in leaves)
  dense, stored = rep.bytes_before, rep.bytes_after
  print(f"total: {len(leaves)} leaves ({n_comp} compressed), {n_params:,} params"
        f" ({n_params / 1e6:.1f}M); dense {_fmt_bytes(dense)} -> stored {_fmt_bytes(stored)}"
        f" ({dense / max(stored, 1):.2f}x smaller, {8.0 * stored / max(n_params, 1):.2f}"
        " bits/weight)", file=out)
  if disk_bytes is not None:
    print(f"checkpoint on disk: {_fmt_bytes(disk_bytes)} ({dense / max(disk_bytes, 1):.2f}x"
          " smaller than the dense arrays)", file=out)


# ----------------------------------------------------------------------------- commands


def _enable_compilation_cache() -> None:
  """Turns on JAX's persistent compilation cache, so a second run starts warm.

  The directory is ``$QWS_JAX_CACHE_DIR`` (default ``~/.cache/qws_jax/jax``); set it to
  an empty string to turn the cache off.
  """
  import jax  # pylint: disable=g-import-not-at-top
  path = os.environ.get("QWS_JAX_CACHE_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "qws_jax", "jax"))
  if path and jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _cmd_compress(args) -> int:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from qws_jax._src import checkpoint  # pylint: disable=g-import-not-at-top
  from qws_jax._src import tree as tree_lib  # pylint: disable=g-import-not-at-top
  if os.path.lexists(args.out):
    if not args.force:
      raise CliError(f"output {args.out!r} already exists; pass --force to replace it")
    out_real, in_real = os.path.realpath(args.out), os.path.realpath(args.input)
    if in_real == out_real or in_real.startswith(out_real.rstrip(os.sep) + os.sep):
      raise CliError(f"output {args.out!r} holds the input {args.input!r}; --force never"
                     " replaces the input: write to another directory")
    checkpoint.check_replaceable(os.path.abspath(args.out))  # before the long work
  if not 2 <= args.k <= 256:
    raise CliError(f"--k must be in [2, 256], got {args.k}")
  for flag in ("include", "exclude"):
    pattern = getattr(args, flag)
    if pattern is not None:
      try:
        re.compile(pattern)
      except re.error as e:
        raise CliError(f"--{flag} {pattern!r} is not a valid regex: {e}") from None
  t0 = time.perf_counter()
  params = _load_input(args.input)

  def predicate(path, leaf):
    if args.exclude and re.search(args.exclude, path):
      return False
    if args.include:
      return (re.search(args.include, path) is not None and tree_lib.is_floating(leaf)
              and int(np.prod(leaf.shape)) >= args.k)
    return tree_lib.default_predicate(path, leaf)

  options = {"k": args.k, "method": args.method}
  if args.per_channel:
    options["axis"] = args.axis
  if args.group_size is not None:
    options["group_size"] = args.group_size
  selected = []
  tree_lib.map_selected(params, lambda p, x, o: selected.append(p) or x, defaults=options,
                        predicate=predicate, rules=(), what="qws-jax compress")
  if not selected:
    raise CliError("no leaf selected for compression (check --include/--exclude; by default"
                   " the matmul weights: floating, ndim >= 2, >= 1024 elements, not a bias, norm or"
                   " position embedding by name)")
  _enable_compilation_cache()
  import qws_jax  # pylint: disable=g-import-not-at-top
  try:  # one call: leaves of the same row bucket are clustered together
    compressed = qws_jax.share(params, predicate=predicate, progress=not args.quiet, **options)
  except (ValueError, TypeError) as e:
    raise CliError(f"cannot share: {e}") from None
  t1 = time.perf_counter()
  checkpoint.save(args.out, compressed, force=args.force, compress=not args.no_zstd)
  t2 = time.perf_counter()
  if not args.quiet:
    _print_report(params, compressed, disk_bytes=_du(args.out))
    print(f"input {args.input} ({_fmt_bytes(_du(args.input))} on disk); shared in"
          f" {t1 - t0:.1f} s, saved {args.out} in {t2 - t1:.1f} s")
  return 0


def _cmd_inspect(args) -> int:
  from qws_jax._src import checkpoint  # pylint: disable=g-import-not-at-top
  tree = checkpoint.restore(args.ckpt)
  meta = checkpoint.read_metadata(args.ckpt)
  print(f"{args.ckpt}: qws_jax format v{meta['format_version']} (written by qws_jax"
        f" {meta.get('qws_jax_version', '?')})")
  _print_report(None, tree, disk_bytes=_du(args.ckpt))
  return 0


def _cmd_demo(args) -> int:
  from qws_jax._src import demo  # pylint: disable=g-import-not-at-top
  return demo.run(quick=args.quick, workdir=args.workdir, seed=args.seed)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=_PROG, description="Quantized weight sharing for JAX.")
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("compress", help="k-means share the weights of a checkpoint")
  c.add_argument("input", help="a .safetensors file or an Orbax checkpoint directory")
  c.add_argument("out", help="the compressed qws_jax checkpoint directory to write")
  c.add_argument("--k", type=int, default=32, help="codebook size (default 32)")
  g = c.add_mutually_exclusive_group()
  g.add_argument("--per-channel", action="store_true", help="one codebook per channel")
  g.add_argument("--group-size", type=int, help="one codebook per group of N rows")
  c.add_argument("--axis", type=int, default=-1,
                 help="channel axis for --per-channel (default -1, the last axis)")
  c.add_argument("--include", metavar="REGEX",
                 help="share the floating leaves whose path matches (default: ndim >= 2 and"
                      " >= 1024 elements)")
  c.add_argument("--exclude", metavar="REGEX", help="never share leaves whose path matches")
  c.add_argument("--method", choices=("dp", "lloyd"), default="dp",
                 help="1-D k-means: 'dp' (near-optimal, the default; compiles once per"
                      " leaf shape) or 'lloyd' (Deep Compression's linear-init Lloyd)")
  c.add_argument("--no-zstd", action="store_true", help="store the array chunks uncompressed")
  c.add_argument("--force", action="store_true", help="replace OUT if it is a qws_jax checkpoint")
  c.add_argument("--quiet", action="store_true", help="no progress bar, no report")
  c.set_defaults(fn=_cmd_compress)
  i = sub.add_parser("inspect", help="per-leaf report of a compressed checkpoint")
  i.add_argument("ckpt", help="a qws_jax checkpoint directory")
  i.set_defaults(fn=_cmd_inspect)
  d = sub.add_parser("demo", help="train, share, fine-tune, hash, save and restore (offline)")
  d.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
  d.add_argument("--workdir", help="where to write the demo checkpoints (default: a temp dir)")
  d.add_argument("--seed", type=int, default=0)
  d.set_defaults(fn=_cmd_demo)
  return p


def main(argv=None) -> int:
  """Runs the ``qws-jax`` command line; returns the exit code."""
  args = _parser().parse_args(argv)
  _quiet_logs()
  try:
    return int(args.fn(args) or 0)
  except KeyboardInterrupt:
    print(f"{_PROG}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except  (one line, never a traceback)
    if os.environ.get("QWS_JAX_DEBUG"):
      raise
    msg = " ".join(str(e).split())
    if not isinstance(e, (CliError, FileNotFoundError, FileExistsError, ValueError, TypeError,
                          NotImplementedError, OSError)):
      msg = f"{type(e).__name__}: {msg} (set QWS_JAX_DEBUG=1 for the traceback)"
    print(f"{_PROG}: error: {msg[:2000]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
