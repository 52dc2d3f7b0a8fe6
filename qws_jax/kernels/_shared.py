"""``x @ w`` for a codebook-shared weight ``w`` without materialising ``w``.

Layout (see `qws_jax._src.types.SharedArray`): ``w`` has logical shape ``(K, N)``; its
indices are uint8 packed along ``N`` as a little-endian bit stream, so for ``bits`` in
``{1, 2, 4, 8}`` byte ``c`` of a row holds the ``g = 8 // bits`` indices of columns
``c*g .. c*g + g-1``, index ``p`` in bits ``[p*bits, (p+1)*bits)``. Both implementations
work on these *planes*: plane ``p`` is the ``(K, ceil(N/g))`` matrix of the ``p``-th index
of every byte, decoded with one shift and mask, and gives output columns ``p, p+g, ...``.
So the packed bytes are never interleaved; only the small ``(M, N)`` output is.

The codebook entry of index ``idx`` at ``(row, col)`` is ``codebook.flat[gid * k + idx]``
with ``gid`` = 0 (per tensor), ``col`` (per channel, ``axis=1``), ``row`` (``axis=0``) or
``(row // group_size) * N + col`` (per group along ``K``), as in
`qws_jax._src.types.group_ids`.

Implementations:

* ``"xla"``: blocked decode. A ``lax.fori_loop`` over ``xla_block_k`` rows of the weight
  decodes the planes of that block (shift, mask, gather from the codebook) and
  accumulates ``x_block @ plane`` in f32. Other bit widths unpack the block with
  `qws_jax._src.packing.unpack`. Vector codebooks (``vector_dim > 1``) materialise.
* ``"pallas"`` on GPU (Triton) / ``"interpret"``: one program per ``(block_m, block_n)``
  output tile (and K split, ``BlockSizes.split_k``) loops over ``K`` in ``block_k`` steps
  inside the kernel, gather-loads the codebook from its ref (``cb_ref[ids]``; a
  value-level ``jnp.take`` does not lower to Triton) and accumulates in f32. Bits 1, 2,
  4, 8; scalar codebooks.
* ``"pallas"`` on TPU (Mosaic): lane-gather decode from 128-entry codebook tables, K as
  the innermost grid axis into a VMEM accumulator. Per-tensor and ``axis=0`` codebooks.

Numerics: the output has ``x.dtype``; the decoded weight is cast to ``x.dtype`` and the
products are accumulated in f32, exactly what `shared_matmul_reference` computes.

Gradients (``jax.custom_vjp``): ``dx = g @ w.T`` (the transposed product; by a second
Triton kernel with the Triton implementation, else by the blocked XLA decode; the weight
is never materialised) and ``d codebook`` as a segment sum of ``x.T @ g`` over the
codebook entry of each weight, block by block in XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from qws_jax._src import packing
from qws_jax._src import sharding as sharding_lib
from qws_jax._src.types import SharedArray
from qws_jax.kernels import _common
from qws_jax.kernels._common import BlockSizes

PALLAS_BITS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static description of one shared matmul (hashable: custom_vjp nondiff arg)."""

  K: int
  N: int
  bits: int
  k: int
  gid: str  # "tensor" | "col" | "row" | "group"
  group_size: int | None
  impl: str
  bs: BlockSizes

  @property
  def g(self) -> int:
    """Planes per packed byte (1 when the bit width does not divide 8: unpack mode)."""
    return 8 // self.bits if self.bits in PALLAS_BITS else 1

  @property
  def planar(self) -> bool:
    return self.bits in PALLAS_BITS

  @property
  def ncols(self) -> int:
    """Columns of one plane."""
    return packing.packed_length(self.N, self.bits) if self.planar else self.N


def _gid_kind(w: SharedArray) -> str:
  if w.group_size is not None:
    return "group"
  if w.axis is None:
    return "tensor"
  return "col" if w.axis == 1 else "row"


def _flat_ids(idx, rows, cols, spec: _Spec):
  """Flat codebook position of ``idx`` at ``rows (bk, 1)``, ``cols (1, nc)`` (int32)."""
  rows = jnp.minimum(rows, spec.K - 1)  # padded rows / columns read a valid entry
  cols = jnp.minimum(cols, spec.N - 1)
  if spec.gid == "tensor":
    return idx
  if spec.gid == "col":
    gid = cols
  elif spec.gid == "row":
    gid = rows
  else:
    gid = (rows // spec.group_size) * spec.N + cols
  return gid * spec.k + idx


def _plane_ids(pb, row0, spec: _Spec, col0=0):
  """Flat codebook ids of each plane of a packed block ``pb (bk, nb)`` starting at ``row0``.

  Returns a list of ``g`` int32 arrays of shape ``(bk, nb)`` (``(bk, N)`` in unpack mode).
  """
  bk = pb.shape[0]
  rows = row0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
  if not spec.planar:
    idx = packing.unpack(pb, spec.bits, spec.N).astype(jnp.int32)
    cols = lax.broadcasted_iota(jnp.int32, (1, spec.N), 1)
    return [_flat_ids(idx, rows, cols, spec)]
  g, mask = spec.g, (1 << spec.bits) - 1
  byte = pb.astype(jnp.int32)
  bcols = col0 + lax.broadcasted_iota(jnp.int32, (1, pb.shape[1]), 1)
  out = []
  for p in range(g):
    idx = (byte >> (p * spec.bits)) & mask if g > 1 else byte
    out.append(_flat_ids(idx, rows, bcols * g + p, spec))
  return out


def _interleave(planes, spec: _Spec, m: int):
  """``g`` plane outputs ``(m, ncols)`` -> ``(m, N)``."""
  if len(planes) == 1:
    return planes[0][:, :spec.N]
  return jnp.stack(planes, axis=-1).reshape(m, -1)[:, :spec.N]


# ----------------------------------------------------------------------------- reference


def shared_matmul_reference(x: jax.typing.ArrayLike, w: SharedArray) -> jax.Array:
  """Pure-jnp oracle: ``x @ w.materialize()`` with the kernels' numerics.

  The weight is cast to ``x.dtype``, products accumulate in f32, the result has
  ``x.dtype``.
  """
  x = jnp.asarray(x)
  wd = w.materialize().astype(x.dtype)
  return jnp.matmul(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)


# ----------------------------------------------------------------------------- XLA path


def _xla_forward(x2, indices, codebook, spec: _Spec):
  """``K // bk`` full blocks of ``bk = xla_block_k`` rows in a ``fori_loop``, then the
  remaining ``K % bk`` rows as one static block (nothing is padded)."""
  m = x2.shape[0]
  bk = min(spec.bs.xla_block_k, spec.K)
  nfull, tail = divmod(spec.K, bk)
  cb = codebook.reshape(-1).astype(x2.dtype)
  ng = spec.g if spec.planar else 1

  def block(r0, rows, accs):
    pb = lax.dynamic_slice_in_dim(indices, r0, rows, 0)
    xb = lax.dynamic_slice_in_dim(x2, r0, rows, 1)
    ids = _plane_ids(pb, r0, spec)
    return tuple(a + jnp.matmul(xb, jnp.take(cb, i, axis=0), preferred_element_type=jnp.float32)
                 for a, i in zip(accs, ids))

  accs = tuple(jnp.zeros((m, spec.ncols), jnp.float32) for _ in range(ng))
  if nfull == 1:
    accs = block(0, bk, accs)
  elif nfull > 1:
    accs = lax.fori_loop(0, nfull, lambda b, a: block(b * bk, bk, a), accs)
  if tail:
    accs = block(nfull * bk, tail, accs)
  return _interleave(list(accs), spec, m).astype(x2.dtype)


def _xla_backward(x2, indices, codebook, g, spec: _Spec, with_dx: bool = True):
  """``dx = g @ w.T`` and ``d codebook`` (segment sums), decoding ``xla_block_k`` rows at a time.

  With ``with_dx=False`` only ``d codebook`` is computed (``dx`` is None).
  """
  m = x2.shape[0]
  bk = spec.bs.xla_block_k
  kp = _common.round_up(spec.K, bk)
  nblk = kp // bk
  xp = _common.pad_axis(x2, 1, kp)
  ip = _common.pad_axis(indices, 0, kp)
  cb = codebook.reshape(-1).astype(x2.dtype)
  if spec.planar:
    gp = _common.pad_axis(g, 1, spec.ncols * spec.g).reshape(m, spec.ncols, spec.g)
    gplanes = [gp[:, :, p] for p in range(spec.g)]
  else:
    gplanes = [g]

  def body(dcb, b):
    r0 = b * bk
    pb = lax.dynamic_slice_in_dim(ip, r0, bk, 0)
    xb = lax.dynamic_slice_in_dim(xp, r0, bk, 1)
    ids = _plane_ids(pb, r0, spec)
    dxb = jnp.zeros((m, bk) if with_dx else (0, 0), jnp.float32)
    for i, gpl in zip(ids, gplanes):
      if with_dx:
        wpl = jnp.take(cb, i, axis=0)
        dxb = dxb + jnp.matmul(gpl, wpl.T, preferred_element_type=jnp.float32)
      dw = jnp.matmul(xb.T, gpl, preferred_element_type=jnp.float32)
      dcb = dcb.at[i.reshape(-1)].add(dw.reshape(-1))
    return dcb, dxb

  dcb, dxs = lax.scan(body, jnp.zeros((codebook.size,), jnp.float32), jnp.arange(nblk))
  dcb = dcb.reshape(codebook.shape).astype(codebook.dtype)
  if not with_dx:
    return None, dcb
  dx = dxs.transpose(1, 0, 2).reshape(m, kp)[:, :spec.K]
  return dx.astype(x2.dtype), dcb


# ----------------------------------------------------------------------------- Pallas path


def _shared_kernel(x_ref, p_ref, cb_ref, o_ref, *, spec: _Spec, bk: int, nkb: int, small: bool):
  """One ``(block_m, block_n)`` output tile and one K split; loops over ``nkb`` K steps."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  bm, bnb = x_ref.shape[0], p_ref.shape[1]
  col0 = pl.program_id(1) * bnb
  kstart = pl.program_id(2) * nkb

  def body(kb, accs):
    k0 = pl.multiple_of((kstart + kb) * bk, bk)
    xb = x_ref[:, pl.ds(k0, bk)]
    pb = p_ref[pl.ds(k0, bk), :]
    out = []
    for acc, ids in zip(accs, _plane_ids(pb, k0, spec, col0)):
      wb = cb_ref[ids]  # gather-load from the codebook ref (lowers to Triton)
      if small:
        prod = xb.astype(jnp.float32)[:, :, None] * wb.astype(jnp.float32)[None, :, :]
        acc = acc + jnp.sum(prod, axis=1)
      else:
        acc = acc + jnp.dot(xb, wb, preferred_element_type=jnp.float32)
      out.append(acc)
    return tuple(out)

  acc0 = tuple(jnp.zeros((bm, bnb), jnp.float32) for _ in range(spec.g))
  accs = lax.fori_loop(0, nkb, body, acc0)
  for p, acc in enumerate(accs):
    o_ref[0, :, :, p] = acc.astype(o_ref.dtype)


def _tiles(m: int, spec: _Spec):
  """Tile geometry of the Triton kernels: clamped block sizes, the block of packed byte
  columns ``bnb`` (a power of two), and the padded extents ``mp, kp, nbp``."""
  bs = spec.bs.clamp(m, spec.K, spec.N)
  bm, bk = bs.block_m, bs.block_k
  target = max(bs.block_n // spec.g, 1)
  bnb = _common.largest_pow2_divisor_at_most(spec.ncols, target)
  if bnb < min(target, 16):
    bnb = min(target, _common.next_pow2(spec.ncols))
  return (bs, bm, bk, bnb, _common.round_up(m, bm), _common.round_up(spec.K, bk),
          _common.round_up(spec.ncols, bnb))


def _pallas_forward(x2, indices, codebook, spec: _Spec, interpret: bool):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m = x2.shape[0]
  g = spec.g
  bs, bm, bk, bnb, mp, kp, nbp = _tiles(m, spec)
  xp = _common.pad_axis(_common.pad_axis(x2, 0, mp), 1, kp)
  ip = _common.pad_axis(_common.pad_axis(indices, 0, kp), 1, nbp)
  cb = codebook.reshape(-1).astype(x2.dtype)
  ns = _common.split_k(bs, m, kp // bk)
  kernel = functools.partial(_shared_kernel, spec=spec, bk=bk, nkb=kp // bk // ns,
                             small=bm < 16)
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, nbp // bnb, ns),
      in_specs=[
          pl.BlockSpec((bm, kp), lambda i, j, s: (i, 0)),
          pl.BlockSpec((kp, bnb), lambda i, j, s: (0, j)),
          pl.BlockSpec(cb.shape, lambda i, j, s: (0,)),
      ],
      out_specs=pl.BlockSpec((1, bm, bnb, g), lambda i, j, s: (s, i, j, 0)),
      out_shape=jax.ShapeDtypeStruct((ns, mp, nbp, g), x2.dtype if ns == 1 else jnp.float32),
      compiler_params=_common.triton_params(bs),
      interpret=interpret,
      name=f"shared_matmul_{spec.bits}bit_{spec.gid}",
  )(xp, ip, cb)
  out = out[0] if ns == 1 else jnp.sum(out, axis=0).astype(x2.dtype)
  return out.reshape(mp, nbp * g)[:m, :spec.N]



def _shared_t_kernel(g_ref, p_ref, cb_ref, o_ref, *, spec: _Spec, bnb: int, nnb: int,
                     small: bool):
  """``dx`` tile ``(block_m, block_k)`` of ``g @ w.T``; loops over ``N`` in ``bnb`` byte columns."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  bm, bk = o_ref.shape
  k0 = pl.program_id(1) * bk

  def body(nb, acc):
    c0 = pl.multiple_of(nb * bnb, bnb)
    pb = p_ref[:, pl.ds(c0, bnb)]
    for p, ids in enumerate(_plane_ids(pb, k0, spec, c0)):
      wb = cb_ref[ids]  # (bk, bnb)
      gb = g_ref[:, pl.ds(c0, bnb), p]  # (bm, bnb): output columns p, p+g, ... of the tile
      if small:
        prod = gb.astype(jnp.float32)[:, None, :] * wb.astype(jnp.float32)[None, :, :]
        acc = acc + jnp.sum(prod, axis=2)
      else:
        acc = acc + lax.dot_general(gb, wb, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
    return acc

  acc = lax.fori_loop(0, nnb, body, jnp.zeros((bm, bk), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _pallas_dx(g, indices, codebook, spec: _Spec, interpret: bool):
  """``g @ w.T`` by the Triton kernel (transposed product; the weight is decoded in tiles)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m, G = g.shape[0], spec.g
  bs, bm, bk, bnb, mp, kp, nbp = _tiles(m, spec)
  gp = _common.pad_axis(_common.pad_axis(g, 1, nbp * G), 0, mp).reshape(mp, nbp, G)
  ip = _common.pad_axis(_common.pad_axis(indices, 0, kp), 1, nbp)
  cb = codebook.reshape(-1).astype(g.dtype)
  kernel = functools.partial(_shared_t_kernel, spec=spec, bnb=bnb, nnb=nbp // bnb,
                             small=bm < 16 or bnb < 16)
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, kp // bk),
      in_specs=[
          pl.BlockSpec((bm, nbp, G), lambda i, kk: (i, 0, 0)),
          pl.BlockSpec((bk, nbp), lambda i, kk: (kk, 0)),
          pl.BlockSpec(cb.shape, lambda i, kk: (0,)),
      ],
      out_specs=pl.BlockSpec((bm, bk), lambda i, kk: (i, kk)),
      out_shape=jax.ShapeDtypeStruct((mp, kp), g.dtype),
      compiler_params=_common.triton_params(bs),
      interpret=interpret,
      name=f"shared_matmul_dx_{spec.bits}bit_{spec.gid}",
  )(gp, ip, cb)
  return out[:m, :spec.K]

# ----------------------------------------------------------------------------- Pallas TPU path
#
# Mosaic has no gather from a VMEM ref, but it has a lane gather: `take_along_axis` along
# the 128-lane axis of a (rows, 128) tile. A per-tensor codebook (or one codebook per row,
# axis=0) of up to 256 entries is laid out as 1 or 2 such 128-lane tables; each plane of
# indices picks its weights with one lane gather per table and a select. The reduction
# over K is the innermost ("arbitrary") grid axis accumulating into a VMEM scratch, the
# usual TPU matmul pattern (the TPU grid runs sequentially, so this does not race).

_LANES = 128


def _mosaic_kernel(x_ref, p_ref, cb_ref, o_ref, acc_ref, *, spec: _Spec, nk: int):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  kb = pl.program_id(2)

  @pl.when(kb == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  xb = x_ref[...]
  byte = p_ref[...].astype(jnp.int32)
  bk = byte.shape[0]
  mask = (1 << spec.bits) - 1
  for p in range(spec.g):
    idx = (byte >> (p * spec.bits)) & mask if spec.g > 1 else byte
    wb = None
    for c in range(cb_ref.shape[1] // _LANES):
      tab = cb_ref[:, c * _LANES:(c + 1) * _LANES]
      tab = jnp.broadcast_to(tab, (bk, _LANES))
      v = jnp.take_along_axis(tab, idx & (_LANES - 1), axis=1, mode="promise_in_bounds")
      wb = v if wb is None else jnp.where(idx >= c * _LANES, v, wb)
    acc_ref[p] += jnp.dot(xb, wb.astype(xb.dtype), preferred_element_type=jnp.float32)

  @pl.when(kb == nk - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _mosaic_forward(x2, indices, codebook, spec: _Spec, interpret: bool):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  m, g = x2.shape[0], spec.g
  bm = min(_common.round_up(max(spec.bs.block_m, 16), 16), _common.round_up(m, 16))
  # K steps: a multiple of 128 (x's lane axis) dividing K when possible.
  bk = _LANES * _common.largest_pow2_divisor_at_most(
      spec.K // _LANES if spec.K % _LANES == 0 else 1, max(spec.bs.block_k // _LANES, 1))
  if spec.K % bk:
    bk = _LANES
  mp, kp = _common.round_up(m, bm), _common.round_up(spec.K, bk)
  nbp = _common.round_up(spec.ncols, _LANES)
  xp = _common.pad_axis(_common.pad_axis(x2, 0, mp), 1, kp)
  ip = _common.pad_axis(_common.pad_axis(indices, 0, kp), 1, nbp)
  kpad = _common.round_up(spec.k, _LANES)
  if spec.gid == "tensor":
    cb = _common.pad_axis(codebook.reshape(1, spec.k).astype(jnp.float32), 1, kpad)
    cb_spec = pl.BlockSpec((1, kpad), lambda i, j, kk: (0, 0))
  else:  # "row": one table per row of the weight, blocked with the K steps
    cb = _common.pad_axis(_common.pad_axis(codebook.astype(jnp.float32), 1, kpad), 0, kp)
    cb_spec = pl.BlockSpec((bk, kpad), lambda i, j, kk: (kk, 0))
  nk = kp // bk
  out = pl.pallas_call(
      functools.partial(_mosaic_kernel, spec=spec, nk=nk),
      grid=(mp // bm, nbp // _LANES, nk),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
          pl.BlockSpec((bk, _LANES), lambda i, j, kk: (kk, j)),
          cb_spec,
      ],
      out_specs=pl.BlockSpec((g, bm, _LANES), lambda i, j, kk: (0, i, j)),
      out_shape=jax.ShapeDtypeStruct((g, mp, nbp), x2.dtype),
      scratch_shapes=[pltpu.VMEM((g, bm, _LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name=f"shared_matmul_tpu_{spec.bits}bit_{spec.gid}",
  )(xp, ip, cb)
  out = out[:, :m, :spec.ncols]
  return _interleave([out[p] for p in range(g)], spec, m)


# ----------------------------------------------------------------------------- custom_vjp


def _forward(x2, indices, codebook, spec: _Spec):
  if spec.impl == "xla":
    return _xla_forward(x2, indices, codebook, spec)
  if spec.impl in ("mosaic", "mosaic_interpret"):
    return _mosaic_forward(x2, indices, codebook, spec, interpret=spec.impl == "mosaic_interpret")
  return _pallas_forward(x2, indices, codebook, spec, interpret=spec.impl == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _shared_mm(x2, indices, codebook, spec: _Spec):
  return _forward(x2, indices, codebook, spec)


def _shared_mm_fwd(x2, indices, codebook, spec: _Spec):
  return _forward(x2, indices, codebook, spec), (x2, indices, codebook)


def _shared_mm_bwd(spec: _Spec, res, g):
  x2, indices, codebook = res
  if spec.impl in ("triton", "interpret"):
    # dx by the transposed Triton kernel; d codebook (a scatter-add) by XLA.
    _, dcb = _xla_backward(x2, indices, codebook, g, spec, with_dx=False)
    dx = _pallas_dx(g, indices, codebook, spec, interpret=spec.impl == "interpret")
  else:
    dx, dcb = _xla_backward(x2, indices, codebook, g, spec)
  return dx, None, dcb


_shared_mm.defvjp(_shared_mm_fwd, _shared_mm_bwd)


# ----------------------------------------------------------------------------- entry point


def pallas_unsupported(w: SharedArray, kernel: str) -> str | None:
  """Why the Pallas ``kernel`` ("triton" or "mosaic") cannot run ``w`` (None when it can)."""
  if w.vector_dim != 1:
    return f"vector codebooks (vector_dim={w.vector_dim}) are materialised by the XLA path"
  if w.bits not in PALLAS_BITS:
    return f"bits={w.bits}; the kernel decodes bits in {PALLAS_BITS}"
  if kernel == "mosaic" and _gid_kind(w) not in ("tensor", "row"):
    return (f"layout={w.layout!r} (axis={w.axis}); the TPU kernel handles per-tensor and"
            " axis=0 codebooks")
  return None


def _run(x, w: SharedArray, impl: str, block_sizes: BlockSizes) -> jax.Array:
  """Runs a resolved implementation: "xla", "triton", "interpret", "mosaic", "mosaic_interpret"."""
  K, N = w.shape
  if w.vector_dim != 1:
    return shared_matmul_reference(x, w)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, K)
  if x2.shape[0] == 0:
    return jnp.zeros(lead + (N,), x.dtype)
  spec = _Spec(K=K, N=N, bits=w.bits, k=w.k, gid=_gid_kind(w), group_size=w.group_size,
               impl=impl, bs=block_sizes.clamp(x2.shape[0], K, N))
  y = _shared_mm(x2, w.indices, w.codebook, spec)
  return y.reshape(lead + (N,))


def shared_matmul(x: jax.typing.ArrayLike, w: SharedArray, *, impl: str | None = None,
                  block_sizes: BlockSizes | None = None) -> jax.Array:
  """``x @ w.materialize()`` reading only the packed indices and the codebook.

  Args:
    x: activations ``(..., K)``, f32 or bf16 (any floating dtype); leading axes are
      batch axes.
    w: a 2-D `qws_jax.SharedArray` of logical shape ``(K, N)``: per-tensor, per-channel
      (``axis`` 0 or 1) or per-group codebook, any bit width, scalar or vector codebook.
    impl: ``None`` picks by backend: Pallas on GPU (Triton) and TPU (Mosaic), XLA on
      CPU and for weights the backend's kernel does not support. ``"pallas"``, ``"xla"``
      or ``"interpret"`` (the GPU kernel in Pallas interpret mode, for tests on CPU)
      force one.
    block_sizes: tile sizes (default `BlockSizes()`), clamped to the problem.

  Returns:
    ``(..., N)`` in ``x.dtype``: the weight is cast to ``x.dtype`` and products are
    accumulated in f32. Differentiable in ``x`` and ``w.codebook`` (custom VJP).

  Raises:
    TypeError: ``w`` is not a SharedArray, or ``x`` is not floating.
    ValueError: ``w`` is not 2-D, ``x``'s last axis is not ``K``, or ``impl`` is unknown.
    NotImplementedError: ``impl="pallas"``/``"interpret"`` for a weight the kernel does
      not handle (vector codebooks, bit widths other than 1, 2, 4, 8; on TPU also
      per-channel ``axis=1`` and per-group codebooks).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from qws_jax import SharedArray
    >>> from qws_jax._src import packing
    >>> idx = np.arange(12).reshape(3, 4) % 4
    >>> w = SharedArray(packing.pack(idx, 2), jnp.array([-1., 0., 1., 2.]), (3, 4),
    ...                 jnp.float32, 2)
    >>> shared_matmul(jnp.ones((1, 3)), w)
    Array([[-3.,  0.,  3.,  6.]], dtype=float32)
  """
  if not isinstance(w, SharedArray):
    raise TypeError(f"w must be a qws_jax.SharedArray, got {type(w).__name__}")
  if w.ndim != 2:
    raise ValueError(f"shared_matmul needs a 2-D weight (K, N), got w.shape={w.shape}")
  block_sizes = _common.block_sizes_or_default(block_sizes)
  K, N = w.shape
  x = _common.check_x(x, K, f"w.shape={w.shape}")
  kernel = _common.pallas_kernel()
  impl = _common.resolve_impl(impl, pallas_unsupported(w, kernel if impl != "interpret" else "triton"))
  if impl == "pallas":
    impl = kernel
  # Weights sharded over Explicit mesh axes: block by block under shard_map.
  y = sharding_lib.tensor_parallel_matmul(x, w, lambda xl, wl: _run(xl, wl, impl, block_sizes))
  if y is not None:
    return y
  return _run(x, w, impl, block_sizes)
