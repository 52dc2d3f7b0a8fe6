"""The Pallas Triton backend (GPU; ``impl="interpret"`` runs it on CPU).

Shared (`shared_forward`): one program per ``(block_m, block_n)`` output tile and K split
(`BlockSizes.split_k`) loops over ``K`` in ``block_k`` steps inside the kernel, decodes
the planes of the packed bytes, gather-loads the codebook entries from the codebook ref
(``cb_ref[ids]``; a value-level ``jnp.take`` does not lower to Triton) and, for a leaf
with group scales, the scales from the scales ref (``s_ref[sids]``), multiplies them in
f32 and accumulates ``x_tile @ w_tile`` in f32. Bits 1, 2, 4, 8; scalar codebooks.

Hashed (`hashed_forward`): the same loop without a weight input: the tile's coordinates
are hashed in registers (`_decode.tile_hash`) and the buckets gather-loaded from their
ref.

``dx = g @ w.T`` for the custom VJPs: `shared_dx` / `hashed_dx`, one program per
``(block_m, block_k)`` tile of ``dx`` looping over ``N``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qws_jax._src.types import SharedArray
from qws_jax.kernels import _common
from qws_jax.kernels import _decode
from qws_jax.kernels._common import BlockSizes
from qws_jax.kernels._decode import HashedSpec
from qws_jax.kernels._decode import SharedSpec


def shared_unsupported(w: SharedArray) -> str | None:
  """Why the Triton kernel cannot run ``w`` (None when it can)."""
  if w.vector_dim != 1:
    return f"vector codebooks (vector_dim={w.vector_dim}) are materialised by the XLA path"
  if w.bits not in _decode.PLANAR_BITS:
    return f"bits={w.bits}; the kernel decodes bits in {_decode.PLANAR_BITS}"
  return None


def compiler_params(bs: BlockSizes):
  """Triton compiler parameters (without them a GPU ``pallas_call`` goes to Mosaic GPU)."""
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _mma(a, b, small: bool, contract: int):
  """``a @ b`` (``contract=0``) or ``a @ b.T`` (``contract=1``) in f32.

  ``small``: a broadcast-multiply-reduce instead of ``dot`` (Triton's ``dot`` needs 16
  rows).
  """
  if small:
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    if contract == 0:
      return jnp.sum(a32[:, :, None] * b32[None, :, :], axis=1)
    return jnp.sum(a32[:, None, :] * b32[None, :, :], axis=2)
  if contract == 0:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _load_planes(pb, row0, col0, cb_ref, s_ref, spec: SharedSpec, dtype):
  """The decoded planes of a packed tile, gather-loaded from the codebook (and scales) refs."""
  out = []
  for ids, sids in _decode.plane_ids(pb, row0, spec, col0, with_scale_ids=s_ref is not None):
    wb = cb_ref[ids]  # gather-load from the codebook ref (lowers to Triton)
    if s_ref is not None:
      wb = _decode.apply_scale(wb, s_ref[sids], spec, dtype)
    out.append(wb)
  return out


# ----------------------------------------------------------------------------- shared


def _shared_kernel(x_ref, p_ref, cb_ref, *refs, spec: SharedSpec, bk: int, nkb: int,
                   small: bool):
  """One ``(block_m, block_n)`` output tile and one K split; loops over ``nkb`` K steps.

  ``refs`` is ``(scales_ref, o_ref)`` for a scaled leaf, else ``(o_ref,)``.
  """
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  s_ref, o_ref = refs if spec.scaled else (None, refs[0])
  bm, bnb = x_ref.shape[0], p_ref.shape[1]
  col0 = pl.program_id(1) * bnb
  kstart = pl.program_id(2) * nkb

  def body(kb, accs):
    k0 = pl.multiple_of((kstart + kb) * bk, bk)
    xb = x_ref[:, pl.ds(k0, bk)]
    pb = p_ref[pl.ds(k0, bk), :]
    wbs = _load_planes(pb, k0, col0, cb_ref, s_ref, spec, xb.dtype)
    return tuple(acc + _mma(xb, wb, small, 0) for acc, wb in zip(accs, wbs))

  acc0 = tuple(jnp.zeros((bm, bnb), jnp.float32) for _ in range(spec.g))
  accs = lax.fori_loop(0, nkb, body, acc0)
  for p, acc in enumerate(accs):
    o_ref[0, :, :, p] = acc.astype(o_ref.dtype)


def _tiles(m: int, spec: SharedSpec):
  """Tile geometry: clamped block sizes, the block of packed byte columns ``bnb`` (a power
  of two), and the padded extents ``mp, kp, nbp``."""
  bs = spec.bs.clamp(m, spec.K, spec.N)
  bm, bk = bs.block_m, bs.block_k
  target = max(bs.block_n // spec.g, 1)
  bnb = _common.largest_pow2_divisor_at_most(spec.ncols, target)
  if bnb < min(target, 16):
    bnb = min(target, _common.next_pow2(spec.ncols))
  return (bs, bm, bk, bnb, _common.round_up(m, bm), _common.round_up(spec.K, bk),
          _common.round_up(spec.ncols, bnb))


def _tables(codebook, scales, dtype):
  """The flat codebook (in ``dtype``; f32 when scaled) and flat scales (or None) refs."""
  if scales is None:
    return codebook.reshape(-1).astype(dtype), None
  sc = scales.reshape(-1)
  if jnp.dtype(sc.dtype).itemsize > 4:
    sc = sc.astype(jnp.float32)
  return codebook.reshape(-1).astype(jnp.float32), sc


def _whole(a):
  """A BlockSpec holding the whole 1-D array ``a`` (a table for gather-loads) in every program."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  return pl.BlockSpec(a.shape, lambda *idx: (0,))


def _name(prefix: str, spec: SharedSpec) -> str:
  return f"{prefix}_{spec.bits}bit_{spec.gid}" + ("_scaled" if spec.scaled else "")


def shared_forward(x2, indices, codebook, scales, spec: SharedSpec, interpret: bool):
  """``x2 (M, K) @ w`` by the Triton kernel."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m = x2.shape[0]
  g = spec.g
  bs, bm, bk, bnb, mp, kp, nbp = _tiles(m, spec)
  xp = _common.pad_axis(_common.pad_axis(x2, 0, mp), 1, kp)
  ip = _common.pad_axis(_common.pad_axis(indices, 0, kp), 1, nbp)
  cb, sc = _tables(codebook, scales, x2.dtype)
  tables = [cb] + ([sc] if sc is not None else [])
  ns = _common.split_k(bs, m, kp // bk)
  kernel = functools.partial(_shared_kernel, spec=spec, bk=bk, nkb=kp // bk // ns,
                             small=bm < 16)
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, nbp // bnb, ns),
      in_specs=[
          pl.BlockSpec((bm, kp), lambda i, j, s: (i, 0)),
          pl.BlockSpec((kp, bnb), lambda i, j, s: (0, j)),
      ] + [_whole(t) for t in tables],
      out_specs=pl.BlockSpec((1, bm, bnb, g), lambda i, j, s: (s, i, j, 0)),
      out_shape=jax.ShapeDtypeStruct((ns, mp, nbp, g), x2.dtype if ns == 1 else jnp.float32),
      compiler_params=compiler_params(bs),
      interpret=interpret,
      name=_name("shared_matmul", spec),
  )(xp, ip, *tables)
  out = out[0] if ns == 1 else jnp.sum(out, axis=0).astype(x2.dtype)
  return out.reshape(mp, nbp * g)[:m, :spec.N]


def _shared_t_kernel(g_ref, p_ref, cb_ref, *refs, spec: SharedSpec, bnb: int, nnb: int,
                     small: bool):
  """``dx`` tile ``(block_m, block_k)`` of ``g @ w.T``; loops over ``N`` in ``bnb`` byte columns."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  s_ref, o_ref = refs if spec.scaled else (None, refs[0])
  bm, bk = o_ref.shape
  k0 = pl.program_id(1) * bk

  def body(nb, acc):
    c0 = pl.multiple_of(nb * bnb, bnb)
    pb = p_ref[:, pl.ds(c0, bnb)]
    for p, wb in enumerate(_load_planes(pb, k0, c0, cb_ref, s_ref, spec, g_ref.dtype)):
      gb = g_ref[:, pl.ds(c0, bnb), p]  # (bm, bnb): output columns p, p+g, ... of the tile
      acc = acc + _mma(gb, wb, small, 1)
    return acc

  acc = lax.fori_loop(0, nnb, body, jnp.zeros((bm, bk), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def shared_dx(g, indices, codebook, scales, spec: SharedSpec, interpret: bool):
  """``g @ w.T`` by the Triton kernel (transposed product; the weight is decoded in tiles)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m, G = g.shape[0], spec.g
  bs, bm, bk, bnb, mp, kp, nbp = _tiles(m, spec)
  gp = _common.pad_axis(_common.pad_axis(g, 1, nbp * G), 0, mp).reshape(mp, nbp, G)
  ip = _common.pad_axis(_common.pad_axis(indices, 0, kp), 1, nbp)
  cb, sc = _tables(codebook, scales, g.dtype)
  tables = [cb] + ([sc] if sc is not None else [])
  kernel = functools.partial(_shared_t_kernel, spec=spec, bnb=bnb, nnb=nbp // bnb,
                             small=bm < 16 or bnb < 16)
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, kp // bk),
      in_specs=[
          pl.BlockSpec((bm, nbp, G), lambda i, kk: (i, 0, 0)),
          pl.BlockSpec((bk, nbp), lambda i, kk: (kk, 0)),
      ] + [_whole(t) for t in tables],
      out_specs=pl.BlockSpec((bm, bk), lambda i, kk: (i, kk)),
      out_shape=jax.ShapeDtypeStruct((mp, kp), g.dtype),
      compiler_params=compiler_params(bs),
      interpret=interpret,
      name=_name("shared_matmul_dx", spec),
  )(gp, ip, *tables)
  return out[:m, :spec.K]


# ----------------------------------------------------------------------------- hashed


def _hashed_kernel(x_ref, b_ref, o_ref, *, spec: HashedSpec, bk: int, nkb: int, small: bool):
  """One ``(block_m, block_n)`` output tile and one K split; hashes ``nkb`` K steps."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  _, bm, bn = o_ref.shape
  col0 = pl.program_id(1) * bn
  kstart = pl.program_id(2) * nkb

  def body(kb, acc):
    k0 = pl.multiple_of((kstart + kb) * bk, bk)
    xb = x_ref[:, pl.ds(k0, bk)]
    bi, s = _decode.tile_hash(k0, bk, col0, bn, spec)
    wb = _decode.signed(b_ref[bi], s, spec.signed)  # gather-load from the bucket ref
    return acc + _mma(xb, wb, small, 0)

  acc = lax.fori_loop(0, nkb, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[0] = acc.astype(o_ref.dtype)


def _hashed_tiles(m: int, spec: HashedSpec):
  bs = spec.bs.clamp(m, spec.K, spec.N)
  # Only x / g are padded (cheap): no weight array exists, padded columns are just hashed.
  bk = min(spec.bs.block_k, max(16, _common.next_pow2(spec.K)))
  return (bs, bs.block_m, bk, bs.block_n, _common.round_up(m, bs.block_m),
          _common.round_up(spec.K, bk), _common.round_up(spec.N, bs.block_n))


def hashed_forward(x2, buckets, spec: HashedSpec, interpret: bool):
  """``x2 (M, K) @ V`` by the Triton kernel."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m = x2.shape[0]
  bs, bm, bk, bn, mp, kp, np_ = _hashed_tiles(m, spec)
  xp = _common.pad_axis(_common.pad_axis(x2, 0, mp), 1, kp)
  bv = buckets.astype(x2.dtype)
  ns = _common.split_k(bs, m, kp // bk)
  kernel = functools.partial(_hashed_kernel, spec=spec, bk=bk, nkb=kp // bk // ns,
                             small=bm < 16)
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, np_ // bn, ns),
      in_specs=[pl.BlockSpec((bm, kp), lambda i, j, s: (i, 0)), _whole(bv)],
      out_specs=pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j)),
      out_shape=jax.ShapeDtypeStruct((ns, mp, np_), x2.dtype if ns == 1 else jnp.float32),
      compiler_params=compiler_params(bs),
      interpret=interpret,
      name="hashed_matmul",
  )(xp, bv)
  out = out[0] if ns == 1 else jnp.sum(out, axis=0).astype(x2.dtype)
  return out[:m, :spec.N]


def _hashed_t_kernel(g_ref, b_ref, o_ref, *, spec: HashedSpec, bn: int, nnb: int,
                     small: bool):
  """``dx`` tile ``(block_m, block_k)`` of ``g @ V.T``; hashes and loops over ``N`` in ``bn`` steps."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  bm, bk = o_ref.shape
  k0 = pl.program_id(1) * bk

  def body(nb, acc):
    c0 = pl.multiple_of(nb * bn, bn)
    bi, s = _decode.tile_hash(k0, bk, c0, bn, spec)
    wb = _decode.signed(b_ref[bi], s, spec.signed)  # (bk, bn)
    return acc + _mma(g_ref[:, pl.ds(c0, bn)], wb, small, 1)

  acc = lax.fori_loop(0, nnb, body, jnp.zeros((bm, bk), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def hashed_dx(g, buckets, spec: HashedSpec, interpret: bool):
  """``g @ V.T`` by the Triton kernel (transposed product, hashing tiles on the fly)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m = g.shape[0]
  bs, bm, bk, bn, mp, kp, np_ = _hashed_tiles(m, spec)
  gp = _common.pad_axis(_common.pad_axis(g, 1, np_), 0, mp)  # zero columns add nothing
  bv = buckets.astype(g.dtype)
  kernel = functools.partial(_hashed_t_kernel, spec=spec, bn=bn, nnb=np_ // bn, small=bm < 16)
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, kp // bk),
      in_specs=[pl.BlockSpec((bm, np_), lambda i, kk: (i, 0)), _whole(bv)],
      out_specs=pl.BlockSpec((bm, bk), lambda i, kk: (i, kk)),
      out_shape=jax.ShapeDtypeStruct((mp, kp), g.dtype),
      compiler_params=compiler_params(bs),
      interpret=interpret,
      name="hashed_matmul_dx",
  )(gp, bv)
  return out[:m, :spec.K]
