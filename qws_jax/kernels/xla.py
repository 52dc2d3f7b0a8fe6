"""The XLA backend: blocked decode in plain XLA (every backend, every weight).

A ``lax.fori_loop`` over blocks of ``xla_block_k`` weight rows decodes one block at a
time and accumulates ``x[:, block] @ block`` in f32, so no more than
``xla_block_k x N`` decoded weights exist at once.

* Shared (`shared_forward`): per block, the planes of the packed indices (shift, mask,
  ``jnp.take`` from the flat codebook; `qws_jax._src.packing.unpack` for bit widths
  outside ``1, 2, 4, 8``) and, for a leaf with group scales, the scales of the block's
  rows and plane columns, multiplied in f32 (`_blocking`: blocks aligned with the scale
  groups read their few scale rows with a slice and broadcast them, which XLA fuses
  into the decode).
* Hashed (`hashed_forward`): per block, the tile hash of the block's coordinates and a
  gather of the bucket values.

The backward passes (`shared_backward`, `hashed_backward`) loop the same blocks: ``dx =
g @ w.T`` block by block, and the codebook / bucket gradient as a segment sum (scatter-
add) of ``dw = x_block.T @ g`` over the entry each weight reads, times the weight's
scale (shared) or sign (hashed). The kernels' custom VJPs use them for the codebook /
bucket gradient on every backend.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from qws_jax.kernels import _common
from qws_jax.kernels import _decode
from qws_jax.kernels._decode import HashedSpec
from qws_jax.kernels._decode import SharedSpec


def _blocks(k: int, bk: int, block, acc):
  """``block(r0, rows, acc)`` over ``k // bk`` full blocks in a ``fori_loop``, then the
  remaining ``k % bk`` rows as one static block (nothing is padded)."""
  nfull, tail = divmod(k, bk)
  if nfull == 1:
    acc = block(0, bk, acc)
  elif nfull > 1:
    acc = lax.fori_loop(0, nfull, lambda b, a: block(b * bk, bk, a), acc)
  if tail:
    acc = block(nfull * bk, tail, acc)
  return acc


def _shared_table(codebook, scales, dtype):
  """The flat codebook the decode gathers from: in ``dtype``, or f32 when it is scaled."""
  return codebook.reshape(-1).astype(dtype if scales is None else jnp.float32)


def _blocking(spec: SharedSpec) -> tuple[int, str]:
  """Weight rows per block, and how a block reads its group scales.

  ``"none"``: no scales. ``"slice"``: every block starts on a scale group boundary (the
  block is a multiple of ``scale_group_size``, or there is one block) or lies inside one
  group (the block divides ``scale_group_size``); it reads its few scale rows with one
  dynamic slice and broadcasts them over the rows of each group, so the multiply fuses
  with the decode. The block is shortened to a multiple / divisor of the group when that
  keeps at least half of ``xla_block_k``. ``"gather"``: otherwise, one row gather of the
  scales per block (about twice the decode cost on CPU).
  """
  bk = spec.bs.xla_block_k
  if not spec.scaled:
    return bk, "none"
  sgs = spec.scale_group_size
  if spec.K <= bk or bk % sgs == 0 or sgs % bk == 0:
    return bk, "slice"
  if sgs < bk:
    return bk // sgs * sgs, "slice"
  d = max(v for v in range(1, bk + 1) if sgs % v == 0)
  return (d, "slice") if 2 * d >= bk else (bk, "gather")


def _scale_source(scales, spec: SharedSpec, bk: int, mode: str):
  """What the blocks read their scales from: the f32 scales split into ``g`` planes
  ``(groups, ncols)`` (padded with groups for padded rows) for ``"slice"``."""
  if mode != "slice":
    return scales
  s = scales.astype(jnp.float32)
  groups = -(-_common.round_up(spec.K, bk) // spec.scale_group_size)
  s = _common.pad_axis(s, 0, max(groups, s.shape[0]))
  if spec.g == 1:
    return [s]
  s = _common.pad_axis(s, 1, spec.ncols * spec.g).reshape(s.shape[0], spec.ncols, spec.g)
  return [s[:, :, p] for p in range(spec.g)]


def _block_scales(src, r0, rows: int, spec: SharedSpec, bk: int, mode: str):
  """The f32 scales of the weight rows ``[r0, r0 + rows)``: ``g`` planes broadcastable to
  ``(rows, ncols)``, or None without scales."""
  if mode == "none":
    return None
  if mode == "gather":
    return _decode.scale_planes(src, r0, rows, spec)
  sgs = spec.scale_group_size
  if bk % sgs and spec.K > bk:  # the block lies inside group r0 // sgs
    return [lax.dynamic_slice_in_dim(sp, r0 // sgs, 1, 0) for sp in src]
  ng = -(-rows // sgs)  # r0 is a multiple of sgs
  out = []
  for sp in src:
    s = lax.dynamic_slice_in_dim(sp, r0 // sgs, ng, 0)
    if ng > 1:
      s = jnp.broadcast_to(s[:, None, :], (ng, sgs, s.shape[1])).reshape(ng * sgs, -1)[:rows]
    out.append(s)
  return out


def _values(cb, ids, sp, spec: SharedSpec, dtype):
  """The decoded planes in ``dtype``: codebook gather, times the scales if any."""
  vals = [jnp.take(cb, i, axis=0) for i in ids]
  if sp is None:
    return vals
  return [_decode.apply_scale(v, s, spec, dtype) for v, s in zip(vals, sp)]


def _ids(pb, r0, spec: SharedSpec):
  return [i for i, _ in _decode.plane_ids(pb, r0, spec)]


def shared_forward(x2, indices, codebook, scales, spec: SharedSpec):
  """``x2 (M, K) @ w`` for packed ``indices``, ``codebook`` and ``scales`` (or None)."""
  m = x2.shape[0]
  cb = _shared_table(codebook, scales, x2.dtype)
  bk, mode = _blocking(spec)
  bk = min(bk, spec.K)
  src = _scale_source(scales, spec, bk, mode)

  def block(r0, rows, accs):
    pb = lax.dynamic_slice_in_dim(indices, r0, rows, 0)
    xb = lax.dynamic_slice_in_dim(x2, r0, rows, 1)
    sp = _block_scales(src, r0, rows, spec, bk, mode)
    ws = _values(cb, _ids(pb, r0, spec), sp, spec, x2.dtype)
    return tuple(a + jnp.matmul(xb, w, preferred_element_type=jnp.float32)
                 for a, w in zip(accs, ws))

  accs = tuple(jnp.zeros((m, spec.ncols), jnp.float32) for _ in range(spec.g))
  accs = _blocks(spec.K, bk, block, accs)
  return _decode.interleave(list(accs), spec, m).astype(x2.dtype)


def shared_backward(x2, indices, codebook, scales, g, spec: SharedSpec, with_dx: bool = True):
  """``dx = g @ w.T`` and ``d codebook``, decoding a block of rows at a time.

  ``d codebook[j]`` is the sum of ``(x.T @ g) * scale`` over the weights reading entry
  ``j`` (``scale = 1`` without scales). With ``with_dx=False`` only ``d codebook`` is
  computed (``dx`` is None).
  """
  m = x2.shape[0]
  bk, mode = _blocking(spec)
  kp = _common.round_up(spec.K, bk)
  xp = _common.pad_axis(x2, 1, kp)  # padded rows: x == 0 adds nothing to d codebook
  ip = _common.pad_axis(indices, 0, kp)
  cb = _shared_table(codebook, scales, x2.dtype)
  src = _scale_source(scales, spec, bk, mode)
  if spec.planar:
    gp = _common.pad_axis(g, 1, spec.ncols * spec.g).reshape(m, spec.ncols, spec.g)
    gplanes = [gp[:, :, p] for p in range(spec.g)]
  else:
    gplanes = [g]

  def body(dcb, b):
    r0 = b * bk
    pb = lax.dynamic_slice_in_dim(ip, r0, bk, 0)
    xb = lax.dynamic_slice_in_dim(xp, r0, bk, 1)
    ids = _ids(pb, r0, spec)
    sp = _block_scales(src, r0, bk, spec, bk, mode)
    ws = _values(cb, ids, sp, spec, x2.dtype) if with_dx else None
    dxb = jnp.zeros((m, bk) if with_dx else (0, 0), jnp.float32)
    for p, (i, gpl) in enumerate(zip(ids, gplanes)):
      if with_dx:
        dxb = dxb + jnp.matmul(gpl, ws[p].T, preferred_element_type=jnp.float32)
      dw = jnp.matmul(xb.T, gpl, preferred_element_type=jnp.float32)
      if sp is not None:
        dw = dw * sp[p]
      dcb = dcb.at[i.reshape(-1)].add(dw.reshape(-1))
    return dcb, dxb

  dcb, dxs = lax.scan(body, jnp.zeros((codebook.size,), jnp.float32), jnp.arange(kp // bk))
  dcb = dcb.reshape(codebook.shape).astype(codebook.dtype)
  if not with_dx:
    return None, dcb
  dx = dxs.transpose(1, 0, 2).reshape(m, kp)[:, :spec.K]
  return dx.astype(x2.dtype), dcb


# ----------------------------------------------------------------------------- hashed


def hashed_forward(x2, buckets, spec: HashedSpec):
  """``x2 (M, K) @ V`` for the virtual weight ``V`` of ``buckets``."""
  m = x2.shape[0]
  bv = buckets.astype(x2.dtype)

  def block(r0, rows, acc):
    xb = lax.dynamic_slice_in_dim(x2, r0, rows, 1)
    bi, s = _decode.tile_hash(r0, rows, 0, spec.N, spec)
    wb = _decode.signed(jnp.take(bv, bi, axis=0), s, spec.signed)
    return acc + jnp.matmul(xb, wb, preferred_element_type=jnp.float32)

  acc = _blocks(spec.K, min(spec.bs.xla_block_k, spec.K), block,
                jnp.zeros((m, spec.N), jnp.float32))
  return acc.astype(x2.dtype)


def hashed_backward(x2, buckets, g, spec: HashedSpec, with_dx: bool = True):
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
    bi, s = _decode.tile_hash(r0, bk, 0, spec.N, spec)
    if with_dx:
      wb = _decode.signed(jnp.take(bv, bi, axis=0), s, spec.signed)
      dxb = jnp.matmul(g, wb.T, preferred_element_type=jnp.float32)
    else:
      dxb = jnp.zeros((0, 0), jnp.float32)
    dw = _decode.signed(jnp.matmul(xb.T, g, preferred_element_type=jnp.float32), s, spec.signed)
    # Padded rows have x == 0, so they add zeros to whatever bucket they hash to.
    return db.at[bi.reshape(-1)].add(dw.reshape(-1)), dxb

  db, dxs = lax.scan(body, jnp.zeros((spec.num_buckets,), jnp.float32), jnp.arange(kp // bk))
  if not with_dx:
    return None, db.astype(buckets.dtype)
  dx = dxs.transpose(1, 0, 2).reshape(m, kp)[:, :spec.K]
  return dx.astype(x2.dtype), db.astype(buckets.dtype)
