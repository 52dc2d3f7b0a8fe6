"""``x @ w`` for a hashed weight ``w`` (HashedNets) reading only the bucket vector.

The virtual weight ``V`` of logical shape ``(K, N)`` is never stored:
``V[i, j] = sign(f) * buckets[bucket(f)]`` with ``f = i*N + j`` (flat C-order index) and
the library's hash, `qws_jax._src.hashing.bucket_and_sign`, seeded by ``w.seed``. Both
implementations compute ``bucket`` and ``sign`` from the coordinates of each tile with
`_tile_hash`, which calls that very function (uint32 arithmetic only, so the same code
runs inside the Pallas kernel, in the XLA path and in the backward pass and gives the
integers of hash spec v1).

* ``"xla"``: a ``lax.fori_loop`` over ``xla_block_k`` rows hashes one block of rows,
  gathers the buckets and accumulates ``x_block @ V_block`` in f32.
* ``"pallas"`` (GPU, Triton) / ``"interpret"``: one program per ``(block_m, block_n)``
  output tile (and K split) loops over ``K`` in ``block_k`` steps, hashes the tile's coordinates in
  registers and gather-loads the buckets from their ref (``buckets_ref[b]``).

Gradients (``jax.custom_vjp``): ``dx = g @ V.T`` (by a second Triton kernel with the
Triton implementation, else by the same blocked hashing in XLA) and ``d buckets`` as the
segment sum of ``sign * (x.T @ g)`` over the bucket of each weight (XLA).

There is no TPU (Mosaic) kernel: Mosaic cannot gather from a bucket table of this size;
``impl=None`` on TPU runs the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from qws_jax._src import hashing
from qws_jax._src.types import HashedArray
from qws_jax.kernels import _common
from qws_jax.kernels._common import BlockSizes


@dataclasses.dataclass(frozen=True)
class _Spec:
  K: int
  N: int
  num_buckets: int
  seed: int
  signed: bool
  impl: str
  bs: BlockSizes


def _tile_hash(row0, nrows: int, col0, ncols: int, spec: _Spec):
  """int32 bucket and int8 sign of the tile ``[row0, row0+nrows) x [col0, col0+ncols)``.

  Coordinates past the matrix (padding) wrap modulo 2**32 and still give valid buckets.
  """
  rows = (row0 + lax.broadcasted_iota(jnp.int32, (nrows, 1), 0)).astype(jnp.uint32)
  cols = (col0 + lax.broadcasted_iota(jnp.int32, (1, ncols), 1)).astype(jnp.uint32)
  f = rows * jnp.uint32(spec.N) + cols
  return hashing.bucket_and_sign(f, spec.seed, spec.num_buckets, spec.signed)


def _signed(v, s, signed: bool):
  return v * s.astype(v.dtype) if signed else v


# ----------------------------------------------------------------------------- reference


def hashed_matmul_reference(x: jax.typing.ArrayLike, w: HashedArray) -> jax.Array:
  """Pure-jnp oracle: ``x @ w.materialize()`` with the kernels' numerics.

  The virtual weight is cast to ``x.dtype``, products accumulate in f32, the result
  has ``x.dtype``.
  """
  x = jnp.asarray(x)
  wd = w.materialize().astype(x.dtype)
  return jnp.matmul(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)


# ----------------------------------------------------------------------------- XLA path


def _xla_forward(x2, buckets, spec: _Spec):
  """``K // bk`` full blocks of ``bk = xla_block_k`` rows in a ``fori_loop``, then the
  remaining ``K % bk`` rows as one static block."""
  m = x2.shape[0]
  bk = min(spec.bs.xla_block_k, spec.K)
  nfull, tail = divmod(spec.K, bk)
  bv = buckets.astype(x2.dtype)

  def block(r0, rows, acc):
    xb = lax.dynamic_slice_in_dim(x2, r0, rows, 1)
    bi, s = _tile_hash(r0, rows, 0, spec.N, spec)
    wb = _signed(jnp.take(bv, bi, axis=0), s, spec.signed)
    return acc + jnp.matmul(xb, wb, preferred_element_type=jnp.float32)

  acc = jnp.zeros((m, spec.N), jnp.float32)
  if nfull == 1:
    acc = block(0, bk, acc)
  elif nfull > 1:
    acc = lax.fori_loop(0, nfull, lambda b, a: block(b * bk, bk, a), acc)
  if tail:
    acc = block(nfull * bk, tail, acc)
  return acc.astype(x2.dtype)


def _xla_backward(x2, buckets, g, spec: _Spec, with_dx: bool = True):
  """``dx = g @ V.T`` and ``d buckets`` (segment sums), hashing ``xla_block_k`` rows at a time.

  With ``with_dx=False`` only ``d buckets`` is computed (``dx`` is None).
  """
  m = x2.shape[0]
  bk = spec.bs.xla_block_k
  kp = _common.round_up(spec.K, bk)
  xp = _common.pad_axis(x2, 1, kp)
  bv = buckets.astype(x2.dtype)

  def body(db, b):
    r0 = b * bk
    xb = lax.dynamic_slice_in_dim(xp, r0, bk, 1)
    bi, s = _tile_hash(r0, bk, 0, spec.N, spec)
    if with_dx:
      wb = _signed(jnp.take(bv, bi, axis=0), s, spec.signed)
      dxb = jnp.matmul(g, wb.T, preferred_element_type=jnp.float32)
    else:
      dxb = jnp.zeros((0, 0), jnp.float32)
    dw = _signed(jnp.matmul(xb.T, g, preferred_element_type=jnp.float32), s, spec.signed)
    # Padded rows have x == 0, so they add zeros to whatever bucket they hash to.
    return db.at[bi.reshape(-1)].add(dw.reshape(-1)), dxb

  db, dxs = lax.scan(body, jnp.zeros((spec.num_buckets,), jnp.float32), jnp.arange(kp // bk))
  if not with_dx:
    return None, db.astype(buckets.dtype)
  dx = dxs.transpose(1, 0, 2).reshape(m, kp)[:, :spec.K]
  return dx.astype(x2.dtype), db.astype(buckets.dtype)


# ----------------------------------------------------------------------------- Pallas path


def _hashed_kernel(x_ref, b_ref, o_ref, *, spec: _Spec, bk: int, nkb: int, small: bool):
  """One ``(block_m, block_n)`` output tile and one K split; hashes ``nkb`` K steps."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  _, bm, bn = o_ref.shape
  col0 = pl.program_id(1) * bn
  kstart = pl.program_id(2) * nkb

  def body(kb, acc):
    k0 = pl.multiple_of((kstart + kb) * bk, bk)
    xb = x_ref[:, pl.ds(k0, bk)]
    bi, s = _tile_hash(k0, bk, col0, bn, spec)
    wb = _signed(b_ref[bi], s, spec.signed)  # gather-load from the bucket ref
    if small:
      prod = xb.astype(jnp.float32)[:, :, None] * wb.astype(jnp.float32)[None, :, :]
      return acc + jnp.sum(prod, axis=1)
    return acc + jnp.dot(xb, wb, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, nkb, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[0] = acc.astype(o_ref.dtype)


def _pallas_forward(x2, buckets, spec: _Spec, interpret: bool):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m = x2.shape[0]
  bs = spec.bs.clamp(m, spec.K, spec.N)
  bm, bn = bs.block_m, bs.block_n
  # Only x is padded (cheap): no weight array exists, padded columns are just hashed.
  bk = min(spec.bs.block_k, max(16, _common.next_pow2(spec.K)))
  mp, kp, np_ = (_common.round_up(m, bm), _common.round_up(spec.K, bk),
                 _common.round_up(spec.N, bn))
  xp = _common.pad_axis(_common.pad_axis(x2, 0, mp), 1, kp)
  bv = buckets.astype(x2.dtype)
  ns = _common.split_k(bs, m, kp // bk)
  kernel = functools.partial(_hashed_kernel, spec=spec, bk=bk, nkb=kp // bk // ns,
                             small=bm < 16)
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, np_ // bn, ns),
      in_specs=[pl.BlockSpec((bm, kp), lambda i, j, s: (i, 0)),
                pl.BlockSpec(bv.shape, lambda i, j, s: (0,))],
      out_specs=pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j)),
      out_shape=jax.ShapeDtypeStruct((ns, mp, np_), x2.dtype if ns == 1 else jnp.float32),
      compiler_params=_common.triton_params(bs),
      interpret=interpret,
      name="hashed_matmul",
  )(xp, bv)
  out = out[0] if ns == 1 else jnp.sum(out, axis=0).astype(x2.dtype)
  return out[:m, :spec.N]



def _hashed_t_kernel(g_ref, b_ref, o_ref, *, spec: _Spec, bn: int, nnb: int, small: bool):
  """``dx`` tile ``(block_m, block_k)`` of ``g @ V.T``; hashes and loops over ``N`` in ``bn`` steps."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  bm, bk = o_ref.shape
  k0 = pl.program_id(1) * bk

  def body(nb, acc):
    c0 = pl.multiple_of(nb * bn, bn)
    bi, s = _tile_hash(k0, bk, c0, bn, spec)
    wb = _signed(b_ref[bi], s, spec.signed)  # (bk, bn)
    gb = g_ref[:, pl.ds(c0, bn)]
    if small:
      prod = gb.astype(jnp.float32)[:, None, :] * wb.astype(jnp.float32)[None, :, :]
      return acc + jnp.sum(prod, axis=2)
    return acc + lax.dot_general(gb, wb, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, nnb, body, jnp.zeros((bm, bk), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _pallas_dx(g, buckets, spec: _Spec, interpret: bool):
  """``g @ V.T`` by the Triton kernel (transposed product, hashing tiles on the fly)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m = g.shape[0]
  bs = spec.bs.clamp(m, spec.K, spec.N)
  bm, bn = bs.block_m, bs.block_n
  bk = min(spec.bs.block_k, max(16, _common.next_pow2(spec.K)))
  mp, kp, np_ = (_common.round_up(m, bm), _common.round_up(spec.K, bk),
                 _common.round_up(spec.N, bn))
  gp = _common.pad_axis(_common.pad_axis(g, 1, np_), 0, mp)  # zero columns add nothing
  bv = buckets.astype(g.dtype)
  kernel = functools.partial(_hashed_t_kernel, spec=spec, bn=bn, nnb=np_ // bn, small=bm < 16)
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, kp // bk),
      in_specs=[pl.BlockSpec((bm, np_), lambda i, kk: (i, 0)),
                pl.BlockSpec(bv.shape, lambda i, kk: (0,))],
      out_specs=pl.BlockSpec((bm, bk), lambda i, kk: (i, kk)),
      out_shape=jax.ShapeDtypeStruct((mp, kp), g.dtype),
      compiler_params=_common.triton_params(bs),
      interpret=interpret,
      name="hashed_matmul_dx",
  )(gp, bv)
  return out[:m, :spec.K]

# ----------------------------------------------------------------------------- custom_vjp


def _forward(x2, buckets, spec: _Spec):
  if spec.impl == "xla":
    return _xla_forward(x2, buckets, spec)
  return _pallas_forward(x2, buckets, spec, interpret=spec.impl == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _hashed_mm(x2, buckets, spec: _Spec):
  return _forward(x2, buckets, spec)


def _hashed_mm_fwd(x2, buckets, spec: _Spec):
  return _forward(x2, buckets, spec), (x2, buckets)


def _hashed_mm_bwd(spec: _Spec, res, g):
  x2, buckets = res
  if spec.impl in ("pallas", "interpret"):
    # dx by the transposed Triton kernel; d buckets (a scatter-add) by XLA.
    _, db = _xla_backward(x2, buckets, g, spec, with_dx=False)
    return _pallas_dx(g, buckets, spec, interpret=spec.impl == "interpret"), db
  return _xla_backward(x2, buckets, g, spec)


_hashed_mm.defvjp(_hashed_mm_fwd, _hashed_mm_bwd)


# ----------------------------------------------------------------------------- entry point


def hashed_matmul(x: jax.typing.ArrayLike, w: HashedArray, *, impl: str | None = None,
                  block_sizes: BlockSizes | None = None) -> jax.Array:
  """``x @ w.materialize()`` hashing the coordinates on the fly, reading only the buckets.

  Args:
    x: activations ``(..., K)``, f32 or bf16 (any floating dtype); leading axes are
      batch axes.
    w: a 2-D `qws_jax.HashedArray` of logical shape ``(K, N)``.
    impl: ``None`` picks by backend (Pallas/Triton on GPU, XLA on CPU and TPU);
      ``"pallas"``, ``"xla"`` or ``"interpret"`` (the Pallas kernel in interpret mode)
      force one.
    block_sizes: tile sizes (default `BlockSizes()`), clamped to the problem.

  Returns:
    ``(..., N)`` in ``x.dtype``; products are accumulated in f32. Differentiable in
    ``x`` and ``w.buckets`` (custom VJP).

  Raises:
    TypeError: ``w`` is not a HashedArray, or ``x`` is not floating.
    ValueError: ``w`` is not 2-D, has an unknown hash version, ``x``'s last axis is not
      ``K``, or ``impl`` is unknown.
    NotImplementedError: ``impl="pallas"`` on a TPU backend (no Mosaic kernel).

  Example:
    >>> import jax.numpy as jnp
    >>> from qws_jax import HashedArray
    >>> w = HashedArray(jnp.array([0.5, -1.0, 2.0]), (4, 3), jnp.float32, seed=7)
    >>> x = jnp.ones((2, 4))
    >>> bool(jnp.allclose(hashed_matmul(x, w), x @ w.materialize()))
    True
  """
  if not isinstance(w, HashedArray):
    raise TypeError(f"w must be a qws_jax.HashedArray, got {type(w).__name__}")
  if w.ndim != 2:
    raise ValueError(f"hashed_matmul needs a 2-D weight (K, N), got w.shape={w.shape}")
  if w.version not in hashing.SUPPORTED_HASH_VERSIONS:
    raise ValueError(f"unknown hash version {w.version}; this qws_jax knows"
                     f" {hashing.SUPPORTED_HASH_VERSIONS}")
  if w.size >= 2**32:
    raise ValueError(f"virtual size {w.size} of w.shape={w.shape} does not fit the uint32 hash")
  block_sizes = _common.block_sizes_or_default(block_sizes)
  K, N = w.shape
  x = _common.check_x(x, K, f"w.shape={w.shape}")
  no_tpu = ("the TPU (Mosaic) backend has no gather from the bucket table; use impl='xla'"
            if _common.pallas_kernel() == "mosaic" and impl != "interpret" else None)
  impl = _common.resolve_impl(impl, no_tpu)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, K)
  if x2.shape[0] == 0:
    return jnp.zeros(lead + (N,), x.dtype)
  spec = _Spec(K=K, N=N, num_buckets=w.num_buckets, seed=hashing.check_seed(w.seed),
               signed=bool(w.signed), impl=impl, bs=block_sizes.clamp(x2.shape[0], K, N))
  y = _hashed_mm(x2, w.buckets, spec)
  return y.reshape(lead + (N,))
