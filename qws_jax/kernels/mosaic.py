"""The Pallas Mosaic backend (TPU): the shared forward kernel.

Mosaic has no gather from a VMEM ref, but it has a lane gather: ``take_along_axis``
along the 128-lane axis of a ``(rows, 128)`` tile. A per-tensor codebook (or one
codebook per row, ``axis=0``) of up to 256 entries is laid out as 1 or 2 such 128-lane
tables; each plane of indices picks its weights with one lane gather per table and a
select. The reduction over K is the innermost (``"arbitrary"``) grid axis accumulating
into a VMEM scratch, the usual TPU matmul pattern (the TPU grid runs sequentially, so
this does not race).

Not supported (`shared_unsupported`; ``impl=None`` then runs the XLA path): per-channel
``axis=1`` and per-group codebooks (a sublane gather per column), group scales, bit
widths outside ``1, 2, 4, 8``, vector codebooks. There is no hashed kernel (the bucket
table is far larger than a lane gather reaches), and the backward pass runs in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qws_jax._src.types import SharedArray
from qws_jax.kernels import _common
from qws_jax.kernels import _decode
from qws_jax.kernels._decode import SharedSpec

_LANES = 128

HASHED_UNSUPPORTED = "the TPU (Mosaic) backend has no gather from the bucket table"


def shared_unsupported(w: SharedArray) -> str | None:
  """Why the Mosaic kernel cannot run ``w`` (None when it can)."""
  if w.vector_dim != 1:
    return f"vector codebooks (vector_dim={w.vector_dim}) are materialised by the XLA path"
  if w.bits not in _decode.PLANAR_BITS:
    return f"bits={w.bits}; the kernel decodes bits in {_decode.PLANAR_BITS}"
  if _decode.gid_kind(w) not in ("tensor", "row"):
    return (f"layout={w.layout!r} (axis={w.axis}); the TPU kernel handles per-tensor and"
            " axis=0 codebooks")
  if w.scales is not None:
    return (f"group scales (scale_group_size={w.scale_group_size}); the TPU kernel does not"
            " decode them, the XLA path does")
  return None


def _kernel(x_ref, p_ref, cb_ref, o_ref, acc_ref, *, spec: SharedSpec, nk: int):
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


def shared_forward(x2, indices, codebook, spec: SharedSpec, interpret: bool):
  """``x2 (M, K) @ w`` by the Mosaic kernel (``spec.gid`` ``"tensor"`` or ``"row"``)."""
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
      functools.partial(_kernel, spec=spec, nk=nk),
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
  return _decode.interleave([out[p] for p in range(g)], spec, m)
