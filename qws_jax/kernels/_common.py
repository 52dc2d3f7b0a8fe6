"""Shared plumbing of the matmul kernels: block sizes, the ``impl`` vocabulary, shapes.

Every module of the package may import this one; it imports none of them.

The ``impl`` vocabulary (None, ``"pallas"``, ``"xla"``, ``"interpret"``, the same for
`shared_matmul` and `hashed_matmul`) is documented in `qws_jax.kernels`.

`resolve_impl` turns one of these into a *backend*, the name the kernels dispatch on:
``"xla"``, ``"triton"``, ``"interpret"`` (Triton in interpret mode), ``"mosaic"`` or
``"mosaic_interpret"`` (the last only for tests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

IMPLS = ("pallas", "xla", "interpret")  # the public values besides None
BACKENDS = ("xla", "triton", "interpret", "mosaic", "mosaic_interpret")


def _is_pow2(v: int) -> bool:
  return v >= 1 and (v & (v - 1)) == 0


def next_pow2(v: int) -> int:
  """Smallest power of two ``>= v`` (``1`` for ``v <= 1``)."""
  return 1 << max(0, math.ceil(math.log2(max(v, 1))))


def largest_pow2_divisor_at_most(n: int, cap: int) -> int:
  """Largest power of two ``<= cap`` that divides ``n`` (``n >= 1``)."""
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Tile sizes of the matmul kernels (data, not literals in the kernels).

  The Pallas kernels tile the output ``(M, N)`` in ``block_m x block_n`` tiles and loop
  over the reduction axis ``K`` in steps of ``block_k`` inside the kernel (f32
  accumulator). The XLA path decodes ``xla_block_k`` rows of the weight at a time.
  `clamp` fits them to a problem; all must be powers of two (Triton's rule).

  Attributes:
    block_m: rows of ``x`` per tile. Tiles with fewer than 16 rows (``M <= 8``) use a
      broadcast-multiply-reduce instead of ``dot`` (Triton's ``dot`` needs 16 rows).
    block_n: output columns per tile (logical columns, before index packing).
    block_k: reduction step inside the kernel.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
    xla_block_k: rows of the weight decoded per step by the XLA path (for a leaf with
      group scales, a multiple or divisor of ``scale_group_size`` of at least half this,
      when there is one, so that blocks align with the scale groups).
    split_k: Triton kernels only: the K loop is split over this many programs per
      output tile (a third grid axis), whose f32 partial sums go to separate buffers
      and are added by XLA afterwards (no race). More programs for small ``M``, where
      the output grid alone is too small to fill a GPU. ``None``: 8 when ``M <= 16``,
      else 1; always reduced to a power of two dividing the number of K steps.
  """

  block_m: int = 64
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2
  xla_block_k: int = 512
  split_k: int | None = None

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k", "xla_block_k"):
      v = getattr(self, name)
      if not isinstance(v, int) or not _is_pow2(v):
        raise ValueError(f"BlockSizes.{name} must be a power of two, got {name}={v!r}")
    if self.block_k < 16:
      raise ValueError(f"BlockSizes.block_k must be >= 16, got {self.block_k}")
    if self.split_k is not None and (not isinstance(self.split_k, int) or not _is_pow2(self.split_k)):
      raise ValueError(f"BlockSizes.split_k must be None or a power of two, got {self.split_k!r}")
    for name in ("num_warps", "num_stages"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {name}={v!r}")

  def clamp(self, m: int, k: int, n: int) -> BlockSizes:
    """The block sizes fitted to an ``(m, k) @ (k, n)`` problem.

    ``block_m`` shrinks to ``next_pow2(m)`` (at least 16 unless ``m <= 8``), ``block_n``
    to ``next_pow2(n)``; ``block_k`` becomes the largest power of two ``<= block_k``
    dividing ``k`` (so the weight need not be padded), at least 16; ``xla_block_k``
    becomes at most ``next_pow2(k)`` (the XLA path handles a last, shorter block).
    """
    bm = min(self.block_m, next_pow2(m))
    if m > 8:
      bm = max(bm, 16)
    bn = min(self.block_n, max(next_pow2(n), 16))
    bk = largest_pow2_divisor_at_most(k, self.block_k)
    if bk < 16:
      bk = min(self.block_k, max(next_pow2(k), 16))
    # The XLA forward runs K // xla_block_k full blocks and one static tail block, so
    # the block need not divide K (a divisor of K = 784 or 3136 would be 16 or 64 rows).
    xk = min(self.xla_block_k, max(next_pow2(k), 16))
    return dataclasses.replace(self, block_m=bm, block_n=bn, block_k=bk, xla_block_k=xk)


def split_k(bs: BlockSizes, m: int, k_steps: int) -> int:
  """Number of K splits for ``k_steps`` K steps (a power of two dividing it)."""
  want = bs.split_k if bs.split_k is not None else (8 if m <= 16 else 1)
  return largest_pow2_divisor_at_most(k_steps, want)


def check_impl(impl: str | None) -> None:
  if impl is not None and impl not in IMPLS:
    raise ValueError(f"impl must be None or one of {IMPLS}, got impl={impl!r}")


def default_impl() -> str:
  """``"pallas"`` on GPU and TPU backends, ``"xla"`` elsewhere (CPU)."""
  return "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "xla"


def pallas_kernel() -> str:
  """Which Pallas kernel ``impl="pallas"`` means here: ``"mosaic"`` on TPU, else ``"triton"``.

  Off-accelerator ``"triton"`` is still traced, so ``lower(lowering_platforms=("cuda",))``
  checks the GPU kernel on a CPU host.
  """
  return "mosaic" if jax.default_backend() == "tpu" else "triton"


def resolve_impl(impl: str | None, unsupported: Callable[[str], str | None]) -> str:
  """The backend that runs a public ``impl`` (the vocabulary of `qws_jax.kernels`).

  Args:
    impl: the user's choice: None, ``"pallas"``, ``"xla"`` or ``"interpret"``.
    unsupported: ``unsupported(kernel)`` says why the Pallas ``kernel`` (``"triton"`` or
      ``"mosaic"``) cannot run this weight, or returns None when it can.

  Returns:
    One of `BACKENDS` (never a ``*_interpret`` Mosaic backend).

  Raises:
    ValueError: ``impl`` is not in the vocabulary.
    NotImplementedError: ``impl`` names a Pallas kernel that does not support the weight.
  """
  check_impl(impl)
  if impl == "xla":
    return "xla"
  kernel = "triton" if impl == "interpret" else pallas_kernel()
  why = unsupported(kernel)
  if impl is None:
    return "xla" if default_impl() == "xla" or why else kernel
  if why:
    raise NotImplementedError(f"impl={impl!r}: the Pallas {kernel} kernel does not support"
                              f" this weight ({why}); use impl='xla' or None")
  return "interpret" if impl == "interpret" else kernel


def block_sizes_or_default(block_sizes) -> BlockSizes:
  """``BlockSizes()`` for None; a TypeError for anything but a `BlockSizes`."""
  if block_sizes is None:
    return BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  return block_sizes


def check_x(x, k: int, what: str):
  """Validates activations ``x (..., K)``; returns it as a floating jax.Array."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"x.shape={tuple(x.shape)} does not match {what}: the last axis of x"
                     f" must equal K={k}")
  return x


def pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads ``a`` along ``axis`` up to ``size`` (no-op when already that size)."""
  extra = size - a.shape[axis]
  if extra == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, extra)
  return jnp.pad(a, widths)


def round_up(v: int, m: int) -> int:
  return -(-v // m) * m
