"""Calibrated quantisation of one weight leaf: k-means codebooks (sensitivity-weighted
where it pays), error-feedback (OPTQ order) assignment and a least-squares codebook refit.

Notation: the statistics (`qws_jax._src.calibrate.LeafStats`) give ``H = X^T X / n``
over the weight's contracted axes. The weight is viewed as ``W`` ``(K, N)``: rows are
the contracted coordinates (the reduction axis, in the row-major order of the Gram),
columns everything else. The loss is the layer-output error
``L(Q) = tr((W - Q)^T H (W - Q))`` (``E ||x (W - Q)||^2`` per token, up to ``n``).

0. **Outliers** (optional): a fraction of the weights (largest magnitude by default) is
   kept exactly, outside the codebooks and the scales (SqueezeLLM's dense-and-sparse).
1. **Initial codebooks**: 1-D k-means (`kmeans.kmeans_1d_batch`) per codebook, weighted
   by ``H_ii`` (the SqueezeLLM / OWQ sensitivity) for diagonal statistics or when no
   outliers are set aside, unweighted otherwise (see ``sensitivity_init``), times the
   squared scale when group scales are used. Optionally re-fitted to the
   error-compensated weights (``recluster_iters``).
2. **Error-feedback assignment** (OPTQ/GPTQ): rows are visited by decreasing ``H_ii``;
   each row is rounded to the nearest entry of its element's codebook (after scaling),
   and the rounding error, divided by the diagonal of the upper Cholesky factor ``U`` of
   the damped ``H^-1``, is pushed onto the later rows through ``U``. Blocked (lazy
   batch updates), jitted, float32.
3. **Codebook refit** with the assignments fixed: ``L`` is quadratic in the codebook
   values ``c``; the normal equations ``(sum_n A_n^T H A_n) c = sum_n A_n^T H w_n``
   (GPTVQ) are solved by Jacobi-preconditioned conjugate gradients started from the
   current codebook (each step minimises ``L`` exactly along its direction, so ``L``
   never increases; per-column codebooks get independent step sizes, so each column's
   small system converges in at most its number of unknowns). Refit and re-assignment
   alternate ``refit_iters`` times; the best state is kept.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from qws_jax._src import calibrate as calibrate_lib
from qws_jax._src import kmeans as kmeans_lib
from qws_jax._src import types

_HIGHEST = jax.lax.Precision.HIGHEST
_OUTLIER_CRITERIA = ("magnitude", "error", "sensitivity")


# ----------------------------------------------------------------------------- layout


def _check_int(name, v, lo=1):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
    raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
  return int(v)


def _rows_are_reduction(shape, contract_axes) -> bool:
  """True when the contracted axes are the rows of the matmul view (all but the last)."""
  nd = len(shape)
  if nd == 1:
    return tuple(contract_axes) == (0,)
  ca = set(contract_axes)
  if nd - 1 in ca:
    return False
  return all(a in ca or shape[a] == 1 for a in range(nd - 1))


def _broadcast_ids(shape, axis, group_size) -> np.ndarray:
  gid = types.group_ids(shape, axis, group_size)
  if gid is None:
    return np.zeros(shape, np.int32)
  return np.broadcast_to(np.asarray(gid), shape).astype(np.int32)


def scale_ids(shape, scale_group_size: int) -> np.ndarray:
  """int32 ``shape``: the flat index into the ``(ceil(R/g), C)`` scales of each weight."""
  r, c = types.matmul_view(tuple(shape))
  rows = np.arange(r, dtype=np.int32) // scale_group_size
  return (rows[:, None] * c + np.arange(c, dtype=np.int32)[None, :]).reshape(shape)


def dequantize(parts: dict, shape, *, axis: int | None = None, group_size: int | None = None,
               scale_group_size: int | None = None, dtype=jnp.float32) -> jax.Array:
  """The dense weight encoded by the output of `quantize_leaf` (reference decoder).

  ``codebook[group_ids][indices] * scales[scale group] `` with the outliers written
  back at their flat positions.
  """
  shape = tuple(shape)
  if axis is not None:
    axis = axis % len(shape)
  idx = jnp.asarray(parts["indices"], jnp.int32)
  cb = jnp.asarray(parts["codebook"]).astype(jnp.float32)
  k = cb.shape[-1]
  gid = jnp.asarray(_broadcast_ids(shape, axis, group_size))
  w = jnp.take(cb.reshape(-1), gid * k + idx)
  if scale_group_size is not None:
    s = jnp.asarray(parts["scales"]).astype(jnp.float32).reshape(-1)
    w = w * jnp.take(s, jnp.asarray(scale_ids(shape, scale_group_size)))
  if "outlier_positions" in parts and parts["outlier_positions"].size:
    w = w.reshape(-1).at[jnp.asarray(parts["outlier_positions"])].set(
        jnp.asarray(parts["outlier_values"]).astype(jnp.float32)).reshape(shape)
  return w.astype(dtype)


def output_error(w, q, stats: calibrate_lib.LeafStats) -> float:
  """``tr((W - Q)^T H (W - Q))`` with ``H = gram / count`` over the contracted axes."""
  k = stats.size
  perm = list(stats.contract_axes) + list(stats.output_axes)
  e = np.transpose(np.asarray(w, np.float64) - np.asarray(q, np.float64), perm).reshape(k, -1)
  if stats.diagonal:
    h = np.asarray(stats.gram, np.float64) / float(stats.count)
    return float(np.sum(h[:, None] * e * e))
  h = np.asarray(stats.gram, np.float64) / float(stats.count)
  return float(np.sum(e * (h @ e)))


# ----------------------------------------------------------------------------- kernels


@functools.partial(jax.jit, static_argnames=("block",))
def _gptq(w, u, s, gid, table, exact, exact_val, *, block):
  """OPTQ assignment of ``w`` ``(Kp, N)`` (rows in visiting order, ``Kp % block == 0``).

  ``u``: ``(Kp, Kp)`` upper Cholesky factor of ``H^-1``; ``s``: per-element scales;
  ``gid``: per-element codebook row of ``table`` ``(G, k)``; ``exact``/``exact_val``:
  entries stored exactly. Returns int32 indices, the dequantized values and the values
  just before rounding (the weights with the earlier rows' error feedback applied).
  """
  kp, n = w.shape
  cols = jnp.arange(kp, dtype=jnp.int32)

  def block_step(b, carry):
    w, idx_all, q_all, p_all = carry
    r0 = b * block
    wb = jax.lax.dynamic_slice_in_dim(w, r0, block, 0)
    sb = jax.lax.dynamic_slice_in_dim(s, r0, block, 0)
    gb = jax.lax.dynamic_slice_in_dim(gid, r0, block, 0)
    eb = jax.lax.dynamic_slice_in_dim(exact, r0, block, 0)
    vb = jax.lax.dynamic_slice_in_dim(exact_val, r0, block, 0)
    urows = jax.lax.dynamic_slice_in_dim(u, r0, block, 0)          # (block, Kp)
    ub = jax.lax.dynamic_slice_in_dim(urows, r0, block, 1)         # (block, block)

    def row_step(i, c):
      wb, idx, qb, err, pb = c
      wi = wb[i]
      cand = jnp.take(table, gb[i], axis=0) * sb[i][:, None]      # (N, k)
      j = jnp.argmin(jnp.abs(wi[:, None] - cand), axis=-1).astype(jnp.int32)
      q = jnp.take_along_axis(cand, j[:, None], axis=1)[:, 0]
      q = jnp.where(eb[i], vb[i], q)
      e = (wi - q) / ub[i, i]
      wb = wb - ub[i][:, None] * e[None, :]
      return wb, idx.at[i].set(j), qb.at[i].set(q), err.at[i].set(e), pb.at[i].set(wi)

    zeros = jnp.zeros((block, n), jnp.float32)
    init = (wb, jnp.zeros((block, n), jnp.int32), zeros, zeros, zeros)
    _, idx, qb, err, pb = jax.lax.fori_loop(0, block, row_step, init)
    # Lazy batch update of the rows after this block (U is upper triangular).
    later = jnp.where((cols >= r0 + block)[None, :], urows, 0.0)
    w = w - jax.lax.dot_general(later, err, (((0,), (0,)), ((), ())), precision=_HIGHEST,
                                preferred_element_type=jnp.float32)
    idx_all = jax.lax.dynamic_update_slice_in_dim(idx_all, idx, r0, 0)
    q_all = jax.lax.dynamic_update_slice_in_dim(q_all, qb, r0, 0)
    p_all = jax.lax.dynamic_update_slice_in_dim(p_all, pb, r0, 0)
    return w, idx_all, q_all, p_all

  zeros = jnp.zeros((kp, n), jnp.float32)
  init = (w, jnp.zeros((kp, n), jnp.int32), zeros, zeros)
  _, idx, q, pre = jax.lax.fori_loop(0, kp // block, block_step, init)
  return idx, q, pre


@jax.jit
def _nearest(w, s, gid, table, exact, exact_val):
  """Plain nearest-entry assignment (no error feedback)."""
  cand = jnp.take(table, gid, axis=0) * s[..., None]
  j = jnp.argmin(jnp.abs(w[..., None] - cand), axis=-1).astype(jnp.int32)
  q = jnp.take_along_axis(cand, j[..., None], axis=-1)[..., 0]
  return j, jnp.where(exact, exact_val, q)


def _hmul(h, m):
  if h.ndim == 1:
    return h[:, None] * m
  return jax.lax.dot_general(h, m, (((1,), (0,)), ((), ())), precision=_HIGHEST,
                             preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("nslots", "nblocks", "iters"))
def _refit(target, h, coef, slot, c0, slot_block, *, nslots, nblocks, iters):
  """Jacobi-preconditioned CG on ``min_c tr(E^T H E)``, ``E = target - coef * c[slot]``.

  ``coef`` is the per-element scale (0 for exact entries, whose error is zero);
  ``slot_block`` groups the unknowns into independent systems (one step size each).
  Returns the refitted flat codebook and the loss before and after.
  """
  flat_slot = slot.reshape(-1)

  def y(c):
    return coef * jnp.take(c, slot)

  def yt(m):
    return jax.ops.segment_sum((coef * m).reshape(-1), flat_slot, nslots)

  def bdot(a, b):
    return jnp.take(jax.ops.segment_sum(a * b, slot_block, nblocks), slot_block)

  def loss(c):
    e = target - y(c)
    return jnp.sum(e * _hmul(h, e))

  hd = h if h.ndim == 1 else jnp.diagonal(h)
  m = yt(coef * hd[:, None])
  minv = jnp.where(m > 0, 1.0 / jnp.where(m > 0, m, 1.0), 0.0)
  r = yt(_hmul(h, target - y(c0)))          # = b - A c0 (up to the factor 2)
  z = minv * r
  p = z
  rz = bdot(r, z)

  def body(_, st):
    c, r, p, rz = st
    ap = yt(_hmul(h, y(p)))
    pap = bdot(p, ap)
    alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
    c = c + alpha * p
    r = r - alpha * ap
    z = minv * r
    rz_new = bdot(r, z)
    beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
    return c, r, z + beta * p, rz_new

  c, _, _, _ = jax.lax.fori_loop(0, iters, body, (c0, r, p, rz))
  l0, l1 = loss(c0), loss(c)
  return jnp.where(l1 <= l0, c, c0), l0, jnp.minimum(l0, l1)


@jax.jit
def _loss_of(target_full, q, h):
  e = target_full - q
  return jnp.sum(e * _hmul(h, e))


# ----------------------------------------------------------------------------- main


_FACTOR_CACHE: collections.OrderedDict = collections.OrderedDict()
_FACTOR_CACHE_SIZE = 4


def _cached_factor(h: np.ndarray, damp: float) -> np.ndarray:
  """`_hessian_factor`, memoised on the bytes of ``h`` (layers that share an input,
  e.g. attention query/key/value, have identical statistics)."""
  key = (hashlib.blake2b(np.ascontiguousarray(h).tobytes(), digest_size=16).digest(),
         h.shape, float(damp))
  if key in _FACTOR_CACHE:
    _FACTOR_CACHE.move_to_end(key)
    return _FACTOR_CACHE[key]
  u = _hessian_factor(h, damp)
  _FACTOR_CACHE[key] = u
  while len(_FACTOR_CACHE) > _FACTOR_CACHE_SIZE:
    _FACTOR_CACHE.popitem(last=False)
  return u


def _hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
  """Upper Cholesky factor ``U`` of the damped ``H^-1`` (``H^-1 = U^T U``), float32.

  With ``J`` the reversal permutation and ``J H J = L L^T``, ``H = R R^T`` for the upper
  triangular ``R = J L J``, so ``U = R^-1 = J L^-1 J``: one Cholesky factorisation and
  one triangular inverse (float64, LAPACK).
  """
  hh = np.array(h, np.float64)
  dead = np.diag(hh) <= 0
  hh[dead, dead] = 1.0
  hh[np.diag_indices_from(hh)] += damp * np.mean(np.diag(hh))
  l = scipy.linalg.cholesky(hh[::-1, ::-1], lower=True, check_finite=False)
  linv = scipy.linalg.solve_triangular(l, np.eye(len(hh)), lower=True, check_finite=False)
  return np.ascontiguousarray(linv[::-1, ::-1], np.float32)


def quantize_leaf(w: jax.typing.ArrayLike, stats: calibrate_lib.LeafStats, *, k: int,
                  axis: int | None = None, group_size: int | None = None,
                  scale_group_size: int | None = None, outliers: float = 0.0,
                  refit_iters: int = 2, block_size: int = 128, codebook_dtype: Any = None,
                  damp: float = 0.03, cg_iters: int = 16, outlier_criterion: str = "magnitude",
                  sensitivity_init: bool | None = None, recluster_iters: int = 0,
                  path: str = "") -> dict[str, jax.Array]:
  """Quantises one weight leaf to ``k`` shared values using calibration statistics.

  Minimises the layer-output error ``tr((W - Q)^T H (W - Q))`` (``H`` from ``stats``,
  over the weight's contracted axes) with k-means initial codebooks (weighted by
  ``H_ii`` where that measured better, see ``sensitivity_init``), error-feedback (OPTQ
  order) assignment and a least-squares codebook refit (see the module docstring).
  Codebook layouts follow `SharedArray`: one codebook per tensor, per index along
  ``axis``, or per ``group_size`` consecutive rows of one column of the matmul view
  ``(R, C) = (prod(shape[:-1]), shape[-1])``. With ``scale_group_size`` the weights are
  divided by a float16 absmax per ``scale_group_size`` rows of each column before
  clustering (a learned lookup table with group scales, as FLUTE / NF4).

  Args:
    w: float weight, any shape; the layout of ``stats.shape``.
    stats: the leaf's `LeafStats` from `qws_jax.calibrate` (full or diagonal; diagonal
      statistics give sensitivity weights and a refit but no error feedback).
    k: codebook size, 2..256.
    axis: per-channel codebooks along this axis of ``w``.
    group_size: per-group codebooks of this many rows of the matmul view (the rows must
      be the reduction axis).
    scale_group_size: float16 absmax scales per this many rows of the matmul view
      (must be the reduction axis); ragged last group allowed.
    outliers: fraction in ``[0, 0.1)`` of weights kept exactly, chosen by
      ``outlier_criterion``; they are excluded from clustering and from the scales.
    refit_iters: rounds of codebook refit and re-assignment (0: no refit).
    block_size: rows per block of the error-feedback loop (lazy batch updates).
    codebook_dtype: dtype of the returned codebook and outlier values (default: the
      dtype of ``w``).
    damp: damping of ``H`` (fraction of its mean diagonal) before inversion; 0.03
      measured best on MiniLM among 0.001 / 0.01 / 0.03 / 0.1.
    cg_iters: conjugate-gradient steps per refit.
    outlier_criterion: ``"magnitude"`` (largest ``|w - mean(w)|``, the default: it
      gave the lowest output error with error feedback on MiniLM), ``"error"`` (largest
      ``H_ii (w - q)^2`` under the initial codebooks) or ``"sensitivity"``
      (largest ``H_ii w^2``).
    sensitivity_init: weight the initial k-means by ``H_ii``. Default (None): yes for
      diagonal statistics or without outliers, no otherwise (measured: with error
      feedback and the outliers set aside, unweighted codebooks do better; without
      outliers the weighting is what keeps a codebook entry for rare, very sensitive
      large weights).
    recluster_iters: after the first assignment, re-run k-means on the error-compensated
      weights (the values just before rounding) and re-assign, this many times while
      the output error decreases (about 1% lower error per pass, one more pass cost).
    path: the leaf's path, used in error messages.

  Returns:
    A dict: ``indices`` int32 ``w.shape``; ``codebook`` ``grid + (k,)`` (sorted along the
    last axis) in ``codebook_dtype``; with ``scale_group_size``: ``scales`` float16
    ``(ceil(R / scale_group_size), C)``; with ``outliers > 0``: ``outlier_values``
    ``(m,)`` and ``outlier_positions`` int32 ``(m,)`` (ascending flat row-major indices
    into ``w``). `dequantize` decodes it.

  Raises:
    ValueError: ``stats`` of another shape, bad ``k``/``outliers``/``block_size``/
      ``scale_group_size``/``group_size``/``axis``.
    TypeError: ``stats`` is not a `LeafStats`, non-floating ``w``.
    NotImplementedError: ``group_size`` or ``scale_group_size`` on a weight whose
      reduction axis is not the rows of the matmul view (e.g. a torch ``(out, in)``
      weight).

  Example:
    >>> import jax, jax.numpy as jnp, qws_jax
    >>> from qws_jax._src.calibrated import quantize_leaf, dequantize
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> x = jax.random.normal(jax.random.key(1), (256, 64))
    >>> stats = qws_jax.calibrate(lambda p, x: x @ p, w, [(x,)])
    >>> out = quantize_leaf(w, stats, k=8)
    >>> out["indices"].shape, out["codebook"].shape
    ((64, 32), (8,))
    >>> dequantize(out, w.shape).shape
    (64, 32)

  References:
    Frantar et al., "GPTQ", ICLR 2023; van Baalen et al., "GPTVQ", 2024; Kim et al.,
    "SqueezeLLM", ICML 2024; Guo et al., "FLUTE", 2024.
  """
  where = f" at {path!r}" if path else ""
  if not isinstance(stats, calibrate_lib.LeafStats):
    raise TypeError(f"stats must be a LeafStats (from qws_jax.calibrate), got"
                    f" {type(stats).__name__}{where}")
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"w must be floating, got dtype {w.dtype}{where}")
  shape = tuple(w.shape)
  if tuple(stats.shape) != shape:
    raise ValueError(f"stats are for a weight of shape {tuple(stats.shape)}, but w has"
                     f" shape {shape}{where}")
  stats.validate(path)
  kmeans_lib._validate_k(k)  # pylint: disable=protected-access
  if axis is not None and group_size is not None:
    raise ValueError(f"set axis (per-channel) or group_size (per-group), not both{where}")
  if axis is not None:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not (
        -len(shape) <= axis < len(shape)):
      raise ValueError(f"axis={axis!r} out of range for shape {shape}{where}")
    axis = int(axis) % len(shape)
  if not isinstance(outliers, (float, int)) or not 0.0 <= outliers < 0.1:
    raise ValueError(f"outliers must be a fraction in [0, 0.1), got {outliers!r}{where}")
  if outlier_criterion not in _OUTLIER_CRITERIA:
    raise ValueError(f"outlier_criterion must be one of {_OUTLIER_CRITERIA}, got"
                     f" {outlier_criterion!r}{where}")
  recluster_iters = _check_int(f"recluster_iters{where}", recluster_iters, lo=0)
  cg_iters = _check_int(f"cg_iters{where}", cg_iters)
  if not isinstance(damp, (float, int)) or not damp > 0:
    raise ValueError(f"damp must be a positive float, got {damp!r}{where}")
  block_size = _check_int(f"block_size{where}", block_size)
  refit_iters = _check_int(f"refit_iters{where}", refit_iters, lo=0)
  standard = _rows_are_reduction(shape, stats.contract_axes)
  r_view, c_view = types.matmul_view(shape)
  for name, g in (("group_size", group_size), ("scale_group_size", scale_group_size)):
    if g is None:
      continue
    _check_int(f"{name}{where}", g)
    if not standard:
      raise NotImplementedError(
          f"{name}={g} groups rows of the matmul view (all axes but the last), but this"
          f" weight of shape {shape} contracts axes {stats.contract_axes}{where}: its"
          " reduction axis is not the rows, so the groups would not lie along it. Use a"
          " per-tensor or per-channel codebook, or store the weight as (in, out).")
    if g > r_view:
      raise ValueError(f"{name}={g} does not fit the reduction axis of length {r_view}"
                       f" (rows of the matmul view of shape {shape}){where}")
  out_dtype = jnp.dtype(w.dtype if codebook_dtype is None else codebook_dtype)

  # ---- the (K, N) reduction view
  kdim = stats.size
  perm_axes = list(stats.contract_axes) + list(stats.output_axes)
  wr = np.transpose(np.asarray(w, np.float32), perm_axes).reshape(kdim, -1)
  n = wr.shape[1]
  pos = np.transpose(np.arange(w.size, dtype=np.int64).reshape(shape), perm_axes).reshape(kdim, n)
  gid_full = _broadcast_ids(shape, axis, group_size)
  gid = np.transpose(gid_full, perm_axes).reshape(kdim, n)
  ngroups = math.prod(types.grid_shape(shape, axis, group_size)) if (
      axis is not None or group_size is not None) else 1
  if scale_group_size is not None:
    sid = np.transpose(scale_ids(shape, scale_group_size), perm_axes).reshape(kdim, n)
    nscales = (-(-r_view // scale_group_size)) * c_view
  h = np.asarray(stats.gram, np.float32) / max(float(stats.count), 1.0)
  hdiag = h if stats.diagonal else np.diag(h).copy()
  hdiag = np.maximum(hdiag, 0.0)
  sens = hdiag + 1e-6 * max(float(hdiag.mean()), 1e-30)
  exact = np.zeros((kdim, n), bool)
  if sensitivity_init is None:
    # Measured on MiniLM: with error feedback and magnitude outliers set aside, plain
    # k-means codebooks give a lower output error; without outliers the H_ii weights
    # are what gives rare, very sensitive large weights a codebook entry.
    sensitivity_init = bool(stats.diagonal) or outliers == 0

  def make_scales(mask):
    if scale_group_size is None:
      return np.ones((kdim, n), np.float32), None
    a = np.where(mask, 0.0, np.abs(wr)).reshape(-1)
    amax = np.zeros(nscales, np.float32)
    np.maximum.at(amax, sid.reshape(-1), a)
    amax = np.where(amax > 0, amax, 1.0).astype(np.float16)
    return amax.astype(np.float32)[sid], amax

  def init_codebooks(s, mask, values=None):
    v = ((wr if values is None else values) / s).reshape(-1)
    sw = sens if sensitivity_init else np.ones_like(sens)
    wt = (sw[:, None] * s * s * (~mask)).reshape(-1)
    g = gid.reshape(-1)
    order = np.argsort(g, kind="stable")
    counts = np.bincount(g, minlength=ngroups)
    m = int(counts.max())
    xs = np.zeros((ngroups, m), np.float32)
    ws = np.zeros((ngroups, m), np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    col = np.arange(g.size) - np.repeat(starts, counts)
    xs[g[order], col] = v[order]
    ws[g[order], col] = wt[order]
    # Padding copies a real value of the row (zero weight), as kmeans_1d_batch does.
    pad = np.arange(m)[None, :] >= counts[:, None]
    xs = np.where(pad, xs[:, :1], xs)
    keys = jax.random.split(jax.random.key(0), ngroups)
    cent, _ = kmeans_lib.kmeans_1d_batch(jnp.asarray(xs), jnp.asarray(ws), keys, k=k)
    return np.asarray(cent, np.float32)

  nnz = int(round(outliers * w.size))
  if nnz > 0:
    if outlier_criterion == "error":
      s, _ = make_scales(exact)
      _, q0 = _nearest(jnp.asarray(wr), jnp.asarray(s), jnp.asarray(gid),
                       jnp.asarray(init_codebooks(s, exact)), jnp.asarray(exact),
                       jnp.asarray(wr))
      score = sens[:, None] * np.square(wr - np.asarray(q0))
    elif outlier_criterion == "sensitivity":
      score = sens[:, None] * np.square(wr)
    else:
      score = np.abs(wr - wr.mean())
    score = score.reshape(-1)
    top = np.argpartition(score, score.size - nnz)[score.size - nnz:]
    exact.reshape(-1)[top] = True
  s, scales = make_scales(exact)
  table = init_codebooks(s, exact)
  exact_val = np.asarray(jnp.asarray(wr).astype(out_dtype).astype(jnp.float32))

  # ---- visiting order and Hessian factor (full statistics only)
  if stats.diagonal:
    order = np.arange(kdim)
  else:
    order = np.argsort(-hdiag, kind="stable")
  inv_order = np.argsort(order)
  kp = -(-kdim // block_size) * block_size
  pad_rows = kp - kdim

  def padded(a, fill):
    a = a[order]
    if pad_rows:
      a = np.concatenate([a, np.full((pad_rows,) + a.shape[1:], fill, a.dtype)])
    return jnp.asarray(a)

  wp, sp, gp = padded(wr, 0.0), padded(s, 1.0), padded(gid, 0)
  ep, vp = padded(exact, True), padded(exact_val, 0.0)
  if stats.diagonal:
    hj = jnp.asarray(hdiag, jnp.float32)
  else:
    hj = jnp.asarray(h, jnp.float32)
    up = np.eye(kp, dtype=np.float32)
    up[:kdim, :kdim] = _cached_factor(h[np.ix_(order, order)], damp)
    up = jnp.asarray(up)

  def assign(tab):
    tj = jnp.asarray(tab, jnp.float32)
    if stats.diagonal:
      idx, q = _nearest(wp, sp, gp, tj, ep, vp)
      pre = wp
    else:
      idx, q, pre = _gptq(wp, up, sp, gp, tj, ep, vp, block=block_size)
    back = lambda a: np.asarray(a)[:kdim][inv_order]  # noqa: E731
    return back(idx), back(q), back(pre)

  wr_j = jnp.asarray(wr)
  coef = jnp.asarray(np.where(exact, 0.0, s).astype(np.float32))
  target = jnp.asarray(np.where(exact, 0.0, wr).astype(np.float32))
  # Codebooks coupled only through their own column get their own CG step sizes.
  col_of = np.full(ngroups, -1, np.int64)
  np.maximum.at(col_of, gid.reshape(-1), np.broadcast_to(np.arange(n), (kdim, n)).reshape(-1))
  col_min = np.full(ngroups, n, np.int64)
  np.minimum.at(col_min, gid.reshape(-1), np.broadcast_to(np.arange(n), (kdim, n)).reshape(-1))
  per_column = bool(np.all(col_of == col_min))
  slot_block = np.repeat(col_of if per_column else np.zeros(ngroups, np.int64), k)
  nblocks = n if per_column else 1

  idx, q, pre = assign(table)
  loss = float(_loss_of(wr_j, jnp.asarray(q), hj))
  for _ in range(0 if stats.diagonal else recluster_iters):
    # k-means on the error-compensated weights, which the codebook really has to cover.
    table2 = init_codebooks(s, exact, values=np.where(exact, wr, pre))
    idx2, q2, pre2 = assign(table2)
    loss2 = float(_loss_of(wr_j, jnp.asarray(q2), hj))
    if loss2 >= loss:
      break
    table, idx, pre, loss = table2, idx2, pre2, loss2
  for it in range(refit_iters):
    slot = jnp.asarray((gid * k + idx).astype(np.int32))
    c, _, l1 = _refit(target, hj, coef, slot, jnp.asarray(table.reshape(-1)),
                      jnp.asarray(slot_block.astype(np.int32)), nslots=ngroups * k,
                      nblocks=nblocks, iters=int(cg_iters))
    table = np.asarray(c).reshape(ngroups, k)
    loss = min(loss, float(l1))
    if it == refit_iters - 1:
      break
    idx2, q2, _ = assign(table)
    loss2 = float(_loss_of(wr_j, jnp.asarray(q2), hj))
    if loss2 >= loss:
      break
    idx, loss = idx2, loss2

  # ---- canonical form: codebook in its dtype, sorted, indices re-mapped
  table = np.asarray(jnp.asarray(table).astype(out_dtype))
  srt = np.argsort(table.astype(np.float32), axis=-1, kind="stable")
  rank = np.argsort(srt, axis=-1)
  table = np.take_along_axis(table, srt, axis=-1)
  idx = rank[gid, idx].astype(np.int32)
  idx_w = np.empty(w.size, np.int32)
  idx_w[pos.reshape(-1)] = idx.reshape(-1)
  grid = types.grid_shape(shape, axis, group_size)
  out = {"indices": jnp.asarray(idx_w.reshape(shape)),
         "codebook": jnp.asarray(table.reshape(grid + (k,)))}
  if scale_group_size is not None:
    out["scales"] = jnp.asarray(scales.reshape(-(-r_view // scale_group_size), c_view))
  if outliers > 0:
    flat = np.sort(pos[exact]).astype(np.int32)
    out["outlier_positions"] = jnp.asarray(flat)
    out["outlier_values"] = jnp.asarray(np.asarray(w).reshape(-1)[flat]).astype(out_dtype)
  return out
