"""`share` / `unshare`: k-means weight sharing over parameter pytrees.

Pipeline of `share` (see docs/design.md): every selected leaf is validated into a
frozen `ShareConfig`; its codebook groups become rows ``(G, n)`` (on the host for
concrete leaves, so no program is compiled per leaf shape); rows of all leaves with the
same k-means settings and row bucket are clustered together by
`kmeans.kmeans_1d_batch` (a handful of compiled programs per (k, row bucket)); indices
are packed on the host. Traced leaves (``share`` under ``jit``) take the same steps with
``jnp``. Leaves spread over several devices go to the handler the sharded layer
registers (`register_sharded_handler`); this module never imports that layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import calibrate as calibrate_lib
from qws_jax._src import calibrated as calibrated_lib
from qws_jax._src import hashing
from qws_jax._src import kmeans as kmeans_lib
from qws_jax._src import packing
from qws_jax._src import parts
from qws_jax._src import tree as tree_lib
from qws_jax._src import types

# Set by the sharded layer (qws_jax._src.sharding) when it is imported: functions that
# handle leaves spread over several devices. They return None for other leaves.
_SHARDED: dict[str, Callable[..., Any]] = {}


def register_sharded_handler(name: str, fn: Callable[..., Any]) -> None:
  """Registers ``fn`` as the sharded handler ``name`` (``"share"`` or ``"materialize"``).

  The sharded layer sits above this module and plugs itself in, so the arrows of the
  import graph run one way.
  """
  _SHARDED[name] = fn


def unshare(tree):
  """Materialises every `SharedArray` / `HashedArray` leaf; everything else passes through.

  Args:
    tree: any pytree, possibly containing compressed leaves.

  Returns:
    The same structure with each compressed leaf replaced by its dense array (its
    logical ``shape`` and ``dtype``). Other leaves are returned as the same objects.

  Raises:
    ValueError: a hashed leaf with an unknown hash version (the message names its path).
  """
  def one(path, x):
    if not types.is_compressed(x):
      return x
    if isinstance(x, types.HashedArray) and x.version not in hashing.SUPPORTED_HASH_VERSIONS:
      raise ValueError(f"leaf {tree_lib.path_str(path)!r}: unknown hash version {x.version};"
                       f" this qws_jax knows {hashing.SUPPORTED_HASH_VERSIONS}")
    sharded = _SHARDED.get("materialize")
    dense = None if sharded is None else sharded(x)  # None unless spread over devices
    return x.materialize() if dense is None else dense
  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=types.is_compressed)


# ----------------------------------------------------------------------------- config

_VECTOR_DIMS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShareConfig:
  """The validated options of one leaf (checked once, when built).

  Attributes:
    k: codebook size, 2..256.
    axis: non-negative channel axis, or None.
    group_size: rows per group of the matmul view, or None (exclusive with ``axis``).
    vector_dim: 1, 2, 4 or 8.
    method: ``"dp"`` or ``"lloyd"``.
    init: ``"linear"``, ``"quantile"`` or ``"kmeans++"``.
    num_atoms, polish_iters, max_iters, tol: k-means settings.
  """
  k: int
  axis: int | None = None
  group_size: int | None = None
  vector_dim: int = 1
  method: str = "dp"
  init: str = "linear"
  num_atoms: int | None = None
  polish_iters: int = 1000
  max_iters: int = 300
  tol: float = 1e-6

  @classmethod
  def build(cls, where: str, shape: tuple[int, ...], **o) -> "ShareConfig":
    """Validates the options ``o`` of a leaf of ``shape``; errors start with ``where``."""
    k = o["k"]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
      raise TypeError(f"{where}: k must be an int, got {k!r}")
    if not 2 <= k <= 256:
      raise ValueError(f"{where}: k must be in [2, 256] (indices are at most 8 bits), got {k=}")
    if len(shape) == 0:
      raise ValueError(f"{where}: cannot share a scalar (shape ())")
    if int(np.prod(shape)) == 0:
      raise ValueError(f"{where}: cannot share an empty leaf of shape {shape}")
    d = o["vector_dim"]
    if d not in _VECTOR_DIMS:
      raise ValueError(f"{where}: vector_dim must be one of {_VECTOR_DIMS}, got {d!r}")
    if shape[-1] % d:
      raise ValueError(f"{where}: vector_dim={d} must divide the last axis of shape {shape}")
    axis, gs = o["axis"], o["group_size"]
    if axis is not None and gs is not None:
      raise ValueError(f"{where}: set axis (per-channel) or group_size (per-group), not both")
    if axis is not None:
      if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{where}: axis must be an int or None, got {axis!r}")
      if not -len(shape) <= axis < len(shape):
        raise ValueError(f"{where}: axis={axis} out of range for shape {shape}"
                         f" (ndim {len(shape)})")
      axis = int(axis) % len(shape)
    if gs is not None:
      if isinstance(gs, bool) or not isinstance(gs, (int, np.integer)) or gs < 1:
        raise ValueError(f"{where}: group_size must be a positive int, got {gs!r}")
      gs = int(gs)
    if o["method"] not in kmeans_lib.METHODS:
      raise ValueError(f"{where}: method must be one of {kmeans_lib.METHODS},"
                       f" got {o['method']!r}")
    if o["init"] not in kmeans_lib.INITS:
      raise ValueError(f"{where}: init must be one of {kmeans_lib.INITS}, got {o['init']!r}")
    na = o.get("num_atoms")
    if na is not None and (isinstance(na, bool) or not isinstance(na, (int, np.integer))
                           or na < 2):
      raise ValueError(f"{where}: num_atoms must be an int >= 2 or None, got {na!r}")
    return cls(k=int(k), axis=axis, group_size=gs, vector_dim=int(d), method=o["method"],
               init=o["init"], num_atoms=None if na is None else int(na),
               polish_iters=int(o.get("polish_iters", 1000)),
               max_iters=int(o.get("max_iters", 300)), tol=float(o.get("tol", 1e-6)))

  @property
  def kmeans_key(self) -> tuple:
    """Leaves whose rows may be clustered together share this key (and a row bucket)."""
    return (self.k, self.method, self.init, self.num_atoms, self.polish_iters, self.max_iters)


_CODEBOOK_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartsConfig:
  """The validated leaf-part options of one leaf (outliers, scales, codebook dtype...)."""
  OPTIONS = ("outliers", "scale_group_size", "codebook_dtype", "sparse", "stack_axes")
  outliers: float = 0.0
  scale_group_size: int | None = None
  codebook_dtype: Any = None
  sparse: bool = False
  stack_axes: int = 0

  @classmethod
  def build(cls, where: str, shape: tuple[int, ...], dtype, **o) -> "PartsConfig":
    """Validates the part options ``o`` of a leaf; errors start with ``where``."""
    f = o["outliers"]
    if isinstance(f, bool) or not isinstance(f, (int, float, np.floating, np.integer)) \
        or not 0.0 <= float(f) < 0.1:
      raise ValueError(f"{where}: outliers must be a fraction in [0, 0.1), got {f!r}")
    g = o["scale_group_size"]
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1):
      raise ValueError(f"{where}: scale_group_size must be a positive int or None, got {g!r}")
    st = o["stack_axes"]
    if isinstance(st, bool) or not isinstance(st, (int, np.integer)) or not (
        0 <= st < max(len(shape) - 1, 1)):
      raise ValueError(f"{where}: stack_axes={st!r} must be an int in [0, {len(shape) - 1})"
                       f" for shape {shape} (a stacked leaf keeps at least 2 axes per slice)")
    r = math.prod(shape[int(st):-1]) if len(shape) > 1 else shape[0]
    if g is not None and int(g) > r:
      raise ValueError(f"{where}: scale_group_size={g} does not fit the reduction axis of"
                       f" {r} rows (shape {shape})")
    cd = o["codebook_dtype"]
    if cd is not None:
      try:
        cd = np.dtype(cd)
      except TypeError:
        raise ValueError(f"{where}: codebook_dtype={cd!r} is not a dtype") from None
      if cd.name not in _CODEBOOK_DTYPES:
        raise ValueError(f"{where}: codebook_dtype must be one of {_CODEBOOK_DTYPES}, got"
                         f" {cd.name}")
    sp = o["sparse"]
    if not isinstance(sp, (bool, np.bool_)):
      raise TypeError(f"{where}: sparse must be a bool, got {sp!r}")
    if sp and (float(f) or g is not None):
      raise NotImplementedError(f"{where}: sparse=True takes plain k-means: no outliers or"
                                " scales in this version")
    return cls(outliers=float(f), scale_group_size=None if g is None else int(g),
               codebook_dtype=cd, sparse=bool(sp), stack_axes=int(st))


class _SlicePath(str):
  """``"path[i]"``: one slice of a stacked leaf, for messages (matched by no tree)."""
  keys = None

  def __new__(cls, path, i):
    return super().__new__(cls, f"{path}[{i}]")


def _calibration_map(calibration, params) -> dict:
  """``{key tuple: LeafStats}`` of a `qws_jax.calibrate` tree, checked against ``params``."""
  if calibration is None:
    return {}
  is_stats = lambda x: isinstance(x, calibrate_lib.LeafStats)  # pylint: disable=unnecessary-lambda-assignment
  found = tree_lib.leaves_by_keys(calibration, is_leaf=is_stats)
  bad = [k for k, v in found.items() if not is_stats(v)]
  if bad:
    raise TypeError(f"share: calibration must be the tree qws_jax.calibrate returns; leaf"
                    f" {'/'.join(map(str, bad[0]))!r} is a {type(found[bad[0]]).__name__}")
  leaves = tree_lib.leaves_by_keys(params, is_leaf=types.is_compressed)
  extra = [k for k in found if k not in leaves]
  if extra:
    names = ", ".join("/".join(map(str, k)) for k in extra[:5])
    raise ValueError(f"share: calibration has statistics for {len(extra)} leaf(s) that are"
                     f" not in params: {names} (statistics of another tree?)")
  for k_, st in found.items():
    leaf = leaves[k_]
    if hasattr(leaf, "shape") and tuple(st.shape) != tuple(leaf.shape):
      raise ValueError(f"share: calibration statistics of leaf {'/'.join(map(str, k_))!r} are"
                       f" for shape {tuple(st.shape)}, the leaf has {tuple(leaf.shape)}")
  return found


def _unit_stats(shape) -> calibrate_lib.LeafStats:
  """Diagonal unit statistics over the matmul view's rows (data-free parts)."""
  r = math.prod(shape[:-1]) if len(shape) > 1 else shape[0]
  axes = tuple(range(len(shape) - 1)) if len(shape) > 1 else (0,)
  return calibrate_lib.LeafStats(jnp.ones((r,), jnp.float32), jnp.float32(1.0), tuple(shape),
                                 axes, True)


def _quantize_direct(path, x, stats, cfg: ShareConfig, pc: PartsConfig) -> types.SharedArray:
  """A leaf through the calibrated quantiser (statistics, outliers or group scales)."""
  if cfg.vector_dim != 1:
    raise NotImplementedError(f"leaf {path!r}: calibration, outliers and scales take scalar"
                              " codebooks (vector_dim=1)")
  if isinstance(x, jax.core.Tracer):
    raise NotImplementedError(f"leaf {path!r}: calibrated sharing, outliers and scales run"
                              " on concrete arrays, not under jit")
  if len(x.shape) < 2 and pc.scale_group_size is not None:
    raise NotImplementedError(f"leaf {path!r}: scales need a leaf of ndim >= 2")
  q = calibrated_lib.quantize_leaf(
      x, _unit_stats(tuple(x.shape)) if stats is None else stats, k=cfg.k, axis=cfg.axis,
      group_size=cfg.group_size, scale_group_size=pc.scale_group_size,
      outliers=pc.outliers, codebook_dtype=pc.codebook_dtype, path=str(path))
  return parts.from_quantized(q, shape=tuple(x.shape), dtype=np.dtype(x.dtype), axis=cfg.axis,
                              group_size=cfg.group_size, scale_group_size=pc.scale_group_size,
                              codebook_dtype=pc.codebook_dtype)


def _finish(sa: types.SharedArray, *, pc: PartsConfig, zero) -> types.SharedArray:
  """The plain path's leaf with its parts: the pruned zero, the codebook dtype."""
  if zero is not None:
    sa = parts.add_pruned_zero(sa, zero)
  if pc.codebook_dtype is not None:
    sa = dataclasses.replace(sa, codebook=sa.codebook.astype(pc.codebook_dtype))
  return sa


# ----------------------------------------------------------------------------- layout


def _to_groups(x, shape, axis, group_size, d, xp=jnp):
  """(G, n, d) view of the index-shaped data, its validity mask (or None), and the
  inverse for (G, n) assignments. ``xp`` is numpy (host) or jax.numpy (traced)."""
  ishape = types.index_shape(shape, d)
  xv = x.reshape(ishape + (d,))
  if group_size is not None:
    r, c = types.matmul_view(ishape)
    ng = -(-r // group_size)
    xm = xv.reshape(r, c, d)
    pad = ng * group_size - r
    valid = xp.ones((r, c), np.float32)
    if pad:
      xm = xp.pad(xm, ((0, pad), (0, 0), (0, 0)))
      valid = xp.pad(valid, ((0, pad), (0, 0)))
    # (ng, gs, c, d) -> (ng, c, gs, d) -> (ng * c, gs, d)
    g = xm.reshape(ng, group_size, c, d).transpose(0, 2, 1, 3).reshape(ng * c, group_size, d)
    vmask = valid.reshape(ng, group_size, c).transpose(0, 2, 1).reshape(ng * c, group_size)

    def back(a):
      a = a.reshape(ng, c, group_size).transpose(0, 2, 1).reshape(ng * group_size, c)[:r]
      return a.reshape(ishape)
    return g, vmask, back
  if axis is not None:
    moved = xp.moveaxis(xv, axis, 0)
    g = moved.reshape(ishape[axis], -1, d)
    moved_shape = moved.shape[:-1]

    def back(a):
      return xp.moveaxis(a.reshape(moved_shape), 0, axis)
    return g, None, back
  g = xv.reshape(1, -1, d)

  def back(a):
    return a.reshape(ishape)
  return g, None, back


def _row_weights(wg, vmask, xp):
  """Per-row weights: padding masked out; a row whose importances are all zero falls
  back to unweighted k-means (every real value weight 1)."""
  ones = xp.ones(wg.shape, np.float32) if vmask is None else vmask
  wg = wg if vmask is None else wg * vmask
  empty = xp.sum(wg, axis=1, keepdims=True) <= 0
  return xp.where(empty, ones, wg)


def _groups_xp(x, w, *, shape, axis, group_size, vector_dim, xp):
  g, vmask, _ = _to_groups(x.astype(np.float32), shape, axis, group_size, vector_dim, xp)
  if w is None:
    wg = xp.ones(g.shape[:2], np.float32) if vmask is None else vmask
    return g, wg
  wg, _, _ = _to_groups(w.astype(np.float32), shape, axis, group_size, vector_dim, xp)
  wg = xp.sum(wg, axis=-1)  # a vector's importance: the sum over its elements
  return g, _row_weights(wg, vmask, xp)


@functools.partial(jax.jit, static_argnames=("shape", "axis", "group_size", "vector_dim"))
def _groups(x, w, *, shape, axis, group_size, vector_dim):
  """Jitted `_groups_xp` with jax.numpy (the sharded path and traced leaves)."""
  return _groups_xp(x, w, shape=shape, axis=axis, group_size=group_size,
                    vector_dim=vector_dim, xp=jnp)


def _pack_np(idx: np.ndarray, bits: int) -> np.ndarray:
  """`packing.pack` on the host (same format): indices ``(..., n)`` -> uint8 bytes."""
  if bits == 8:
    return idx.astype(np.uint8)
  g = packing.group_values(bits)
  nbytes = g * bits // 8
  v = idx.astype(np.uint64)
  pad = (-v.shape[-1]) % g
  if pad:
    v = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
  v = v.reshape(*v.shape[:-1], -1, g)
  acc = np.zeros(v.shape[:-1], np.uint64)
  for i in range(g):
    acc |= v[..., i] << np.uint64(i * bits)
  out = np.stack([(acc >> np.uint64(8 * j)) & np.uint64(0xFF) for j in range(nbytes)], -1)
  return out.astype(np.uint8).reshape(*out.shape[:-2], -1)


def _pack_xp(cent, assign, *, shape, axis, group_size, vector_dim, dtype, xp):
  _, _, back = _to_groups(xp.zeros(shape, np.float32), shape, axis, group_size, vector_dim,
                          xp)
  k = cent.shape[1]
  grid = types.grid_shape(shape, axis, group_size, vector_dim)
  if xp is np:
    # device_put, not jnp.asarray: no compiled staging program per leaf shape
    indices = jax.device_put(_pack_np(back(np.asarray(assign)), types.bits_for(k)))
    cb = np.asarray(cent).reshape(grid + cent.shape[1:]).astype(dtype)
    with jax.enable_x64(np.dtype(dtype).itemsize == 8):
      return indices, jax.device_put(cb)
  indices = packing.pack(back(assign), types.bits_for(k))
  return indices, cent.reshape(grid + cent.shape[1:]).astype(dtype)


@functools.partial(jax.jit, static_argnames=("shape", "axis", "group_size", "vector_dim",
                                             "dtype"))
def _pack_leaf(cent, assign, *, shape, axis, group_size, vector_dim, dtype):
  """Jitted `_pack_xp` with jax.numpy (the sharded path)."""
  return _pack_xp(cent, assign, shape=shape, axis=axis, group_size=group_size,
                  vector_dim=vector_dim, dtype=dtype, xp=jnp)


@functools.partial(jax.jit, static_argnames=("k", "init", "max_iters", "tol"))
def _vector_batch(g, wg, keys, *, k, init, max_iters, tol):
  fn = functools.partial(kmeans_lib._vector_kmeans, k=k, init=init,  # pylint: disable=protected-access
                         max_iters=max_iters, tol=tol)
  return jax.vmap(fn)(g, wg, keys)


def _layout(cfg: ShareConfig, shape) -> dict:
  return dict(shape=tuple(shape), axis=cfg.axis, group_size=cfg.group_size,
              vector_dim=cfg.vector_dim)


# Per-tensor codebooks of leaves longer than this use the histogram path, which compiles
# once per k whatever the leaf size (sorted rows compile once per row bucket). Measured
# against the exact optimum (kmeans1d) on normal, truncated-normal, uniform, Student-t,
# log-normal and two-mode mixture values: within 1.0005x from 1025 values at k <= 16,
# and within 1.0007x from 4097 values on normal and Student-t values at k 4..256. A leaf
# of at most TENSOR_SORT_THRESHOLD values with at most k distinct values stays sorted
# (reproduced exactly; the histogram's means can be an ulp off).
TENSOR_SORT_THRESHOLD = 4096
TENSOR_SORT_THRESHOLD_SMALL_K = 1024  # k <= 16


def sort_threshold(cfg: ShareConfig, rows=None) -> int:
  """Rows up to this length are sorted, longer rows histogrammed (`kmeans_1d_batch`).
  ``rows``: the leaf's concrete rows, when known (few distinct values stay sorted)."""
  if cfg.axis is not None or cfg.group_size is not None:
    return kmeans_lib.SORT_THRESHOLD
  if cfg.k > 16 or (rows is not None and rows.size <= TENSOR_SORT_THRESHOLD
                    and np.unique(rows).size <= cfg.k):
    return TENSOR_SORT_THRESHOLD
  return TENSOR_SORT_THRESHOLD_SMALL_K


def cluster_rows(g, wg, keys, cfg: ShareConfig):
  """Centroids ``(G, k[, d])`` and assignments ``(G, n)`` of rows ``g`` ``(G, n, d)``."""
  if cfg.vector_dim == 1:
    return kmeans_lib.kmeans_1d_batch(
        g[..., 0], wg, keys, k=cfg.k, method=cfg.method, init=cfg.init,
        num_atoms=cfg.num_atoms, polish_iters=cfg.polish_iters, max_iters=cfg.max_iters,
        sort_threshold=sort_threshold(cfg, g[..., 0] if isinstance(g, np.ndarray) else None))
  return _vector_batch(jnp.asarray(g), jnp.asarray(wg), keys, k=cfg.k, init=cfg.init,
                       max_iters=cfg.max_iters, tol=cfg.tol)


def _share_leaf(x, w, key, *, shape, cfg: ShareConfig):
  """Shares one leaf by itself (traced leaves, the sharded layer's fallback)."""
  xp = kmeans_lib._xp(x, w)  # pylint: disable=protected-access
  if xp is np:
    x = np.asarray(x)
    w = None if w is None else np.asarray(w)
  st = _layout(cfg, shape)
  g, wg = _groups_xp(x, w, xp=xp, **st)
  keys = jax.random.split(key, g.shape[0])
  cent, assign = cluster_rows(g, wg, keys, cfg)
  return _pack_xp(cent, assign, dtype=np.dtype(x.dtype), xp=xp, **st)


def share(params, k: int = 32, *, axis: int | None = None, group_size: int | None = None,
          vector_dim: int = 1, method: str = "dp", init: str = "linear", weights=None,
          rules=(), predicate=None, num_atoms: int | None = None, polish_iters: int = 1000,
          max_iters: int = 300, tol: float = 1e-6, key: jax.Array | None = None,
          progress: bool = False, calibration=None, outliers: float = 0.0,
          scale_group_size: int | None = None, codebook_dtype=None, sparse: bool = False,
          stack_axes: int = 0):
  """Compresses a parameter pytree by k-means weight sharing (Deep Compression).

  Each selected leaf becomes a `SharedArray`: a codebook of ``k`` values (per tensor,
  per channel along ``axis``, or per group of ``group_size`` consecutive weights along
  the reduction axis of the matmul view ``(prod(shape[:-1]), shape[-1])``, one codebook
  per group and output column; a ragged last group is allowed) and, per weight, the
  index of its nearest centroid in ``bits = ceil(log2 k)`` bits, bit-packed. Other
  leaves pass through untouched (the same objects).

  Selection: by default the matmul weights (``kernel``, ``embedding``, Einsum ``w``, flat
  ``*.weight``): floating leaves with ``ndim >= 2`` and at least 1024 elements whose name
  is not a bias, norm parameter or position embedding (see ``tree.default_predicate``).
  ``predicate(path, leaf) -> bool`` replaces that rule; ``rules`` (`qws_jax.Rule`) match
  path strings such as ``"params/Dense_0/kernel"`` and select (or skip) leaves with
  their own options (``k``, ``axis``, ``group_size``, ``vector_dim``, ``method``,
  ``init``). The first matching rule wins.

  Clustering: 1-D k-means with `qws_jax.kmeans` (``method="dp"``: near-exact optimum;
  ``"lloyd"``: Lloyd from ``init``), or vector k-means on ``vector_dim`` consecutive
  weights along the last axis. ``weights`` (a pytree with the structure of ``params``,
  or with ``None`` where not needed) gives per-weight importances: the objective becomes
  ``sum_i w_i (x_i - c)^2`` (sensitivity-weighted k-means, as in SqueezeLLM). Weights
  are matched to leaves by their key tuples; a codebook group (tensor, channel or group)
  whose importances are all zero falls back to unweighted k-means.

  Speed: the rows of all leaves with the same k-means settings and row bucket are
  clustered together in fixed-size compiled chunks, so a model compiles a handful of
  programs per (k, layout), not one per leaf shape; enable JAX's persistent compilation
  cache (``jax.config.update("jax_compilation_cache_dir", path)``) to start warm in a
  new process.

  Deterministic: the same input and key give bit-identical output, jitted or not. The
  codebook is sorted ascending (scalar codebooks) and has the leaf's dtype (float64
  leaves, e.g. NumPy arrays, keep float64 codebooks) unless ``codebook_dtype`` is set.

  Calibrated sharing: with ``calibration`` (the statistics of `qws_jax.calibrate`),
  each leaf that has statistics is quantised to minimise its layer-output error
  ``tr((W - Q)^T H (W - Q))``: sensitivity-weighted initial codebooks, error-feedback
  (OPTQ-order) assignment along the reduction axis recorded by the statistics, and a
  least-squares codebook refit (see ``docs/calibration.md``). ``outliers`` keeps that
  fraction of each leaf's weights apart, exact, in a sparse part of the leaf
  (dense-and-sparse, SqueezeLLM), and ``scale_group_size`` stores an f16 absmax scale
  per group of that many weights along the reduction axis and fits the codebook to the
  normalised weights (a learned LUT with group scales, FLUTE / NF4 format); both work
  with and without calibration (without it, with unit statistics). A leaf without
  statistics takes the plain k-means path.

  Pruned weights: ``sparse=True`` keeps the exact zeros of a pruned leaf (see
  `qws_jax.prune`) out of the clustering; entry 0 of each codebook is the pruned zero
  (``k`` counts it: ``k - 1`` clusters for the non-zeros), so they decode to exactly 0,
  stay 0 under `qws_jax.codebook_optimizer`, and `qws_jax.save` stores only the
  non-zeros' indices and their positions, entropy-coded.

  Scanned layers: ``stack_axes=s`` treats the leading ``s`` axes of a leaf as stacked
  layers (``nn.scan`` / ``nnx.vmap`` params of shape ``(layers, ...)``): each slice gets
  its own codebook, and the result is a stacked `SharedArray` that ``scan`` slices like
  an array. Usually set per leaf: ``Rule(r"layers/.*/kernel$", stack_axes=1)`` (a rule
  selects what it matches, so keep stacked biases out of its pattern).

  Args:
    params: any pytree of arrays (linen ``{'params': ...}``, nested containers,
      ``flax.nnx.State``).
    k: codebook size, 2..256.
    axis: per-channel codebooks along this axis (e.g. ``-1`` for a Dense kernel).
    group_size: per-group codebooks (see above); exclusive with ``axis``.
    vector_dim: 1 (scalar codebook) or 2, 4, 8 (vector codebook).
    method: ``"dp"`` or ``"lloyd"``.
    init: Lloyd / vector k-means initialisation: ``"linear"``, ``"quantile"``,
      ``"kmeans++"``.
    weights: optional pytree of non-negative per-weight importances.
    rules: sequence of `qws_jax.Rule`.
    predicate: ``(path, leaf) -> bool`` selecting leaves not matched by a rule.
    num_atoms, polish_iters, max_iters, tol: k-means settings (see `qws_jax.kmeans`).
    key: PRNG key for random inits (keyword-only).
    progress: show a progress bar over the selected leaves (tqdm, on stderr).
    calibration: optional tree from `qws_jax.calibrate` (its leaves are matched to
      ``params`` by key tuples; leaves without statistics take the plain path).
    outliers: fraction of each leaf's weights kept apart exactly, in ``[0, 0.1)``.
    scale_group_size: f16 absmax scales per this many weights along the reduction axis
      (the rows of the matmul view), or None.
    codebook_dtype: dtype the codebooks (and outlier values) are stored in
      (``jnp.float16``, ``jnp.bfloat16``, ``jnp.float32``; default: the leaf's dtype).
      Per channel, f16 codebooks halve the codebook's share of the storage.
    sparse: keep the exact zeros of pruned leaves (see above).
    stack_axes: leading axes that stack independent layers (see above).

  Returns:
    A pytree of the same structure with `SharedArray` leaves where selected.

  Raises:
    ValueError: bad ``k``/``axis``/``group_size``/``vector_dim``, empty or scalar
      leaves, NaN/Inf values, mismatched ``weights`` or a ``weights`` entry that matches
      no selected leaf, ``outliers`` outside [0, 0.1), a ``scale_group_size`` that does
      not fit the reduction axis, statistics for leaves not in ``params`` or of another
      shape -- the message names the leaf path.
    NotImplementedError: a combination this version does not build (``sparse`` with
      calibration, outliers or scales; vector codebooks with those; ``group_size`` or
      scales on a weight whose reduction axis is not the matmul view's rows).
    TypeError: a rule or predicate selected a non-floating leaf.

  Example:
    >>> import jax, jax.numpy as jnp, qws_jax
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 32)),
    ...                     "bias": jnp.zeros(32)}}
    >>> shared = qws_jax.share(params, k=16)
    >>> shared["dense"]["kernel"]
    SharedArray(shape=(64, 32), dtype=float32, k=16, bits=4, layout='tensor')
    >>> shared["dense"]["bias"] is params["dense"]["bias"]
    True
  """
  if key is None:
    key = jax.random.key(0)
  weight_map = {} if weights is None else tree_lib.leaves_by_keys(weights)
  used_weights = set()
  calib_map = _calibration_map(calibration, params)
  defaults = dict(k=k, axis=axis, group_size=group_size, vector_dim=vector_dim, method=method,
                  init=init, outliers=outliers, scale_group_size=scale_group_size,
                  codebook_dtype=codebook_dtype, sparse=sparse, stack_axes=stack_axes)
  extra = dict(num_atoms=num_atoms, polish_iters=polish_iters, max_iters=max_iters, tol=tol)
  jobs = []
  post = {}  # job index -> function applied to its SharedArray (sparse zero, codebook dtype)

  def collect(path, leaf, options):
    options = dict(options)
    pc = PartsConfig.build(f"leaf {path!r}", tuple(leaf.shape), np.dtype(leaf.dtype),
                           **{n: options.pop(n) for n in PartsConfig.OPTIONS})
    keys = getattr(path, "keys", None)
    stats = calib_map.get(keys) if keys is not None else None
    if not pc.stack_axes:
      return collect_one(path, leaf, options, pc, stats, None)
    if stats is not None and stats.stack_axes != pc.stack_axes:
      raise ValueError(f"leaf {path!r}: stack_axes={pc.stack_axes} but its calibration"
                       f" statistics have stack_axes={stats.stack_axes} (the leaf was"
                       f" {'sliced by' if stats.stack_axes else 'not sliced by'} a scan"
                       " when calibrated)")
    w_full = weight_map.get(keys) if keys is not None else None
    if w_full is not None:
      used_weights.add(keys)
    lead = tuple(int(d) for d in leaf.shape[:pc.stack_axes])
    n = math.prod(lead)
    flat = jnp.asarray(leaf).reshape((n,) + tuple(leaf.shape[pc.stack_axes:]))
    wf = None if w_full is None else jnp.asarray(w_full).reshape(flat.shape)
    one = dataclasses.replace(pc, stack_axes=0)
    items = tuple(collect_one(_SlicePath(path, i), flat[i], options, one,
                              None if stats is None else stats.slice(i),
                              None if wf is None else wf[i]) for i in range(n))
    return _Stacked(items, lead)

  def collect_one(path, leaf, options, pc, stats, w_slice):
    options = dict(options)
    if stats is not None and stats.stack_axes:
      raise ValueError(f"leaf {path!r}: its calibration statistics are stacked"
                       f" (stack_axes={stats.stack_axes}, the leaf was sliced by a scan);"
                       f" share it with stack_axes={stats.stack_axes}")
    kk = options["k"]
    if pc.sparse and isinstance(kk, (int, np.integer)) and not isinstance(kk, bool):
      if kk < 3:
        raise ValueError(f"leaf {path!r}: sparse=True needs k >= 3 (the pruned zero takes"
                         f" one entry), got k={kk}")
      options["k"] = int(kk) - 1
    cfg = ShareConfig.build(f"leaf {path!r}", tuple(leaf.shape), **options, **extra)
    concrete = not isinstance(leaf, jax.core.Tracer)
    x = leaf if (concrete and isinstance(leaf, (np.ndarray, jax.Array))) else jnp.asarray(leaf)
    if concrete and not kmeans_lib.all_finite(x):
      raise ValueError(f"leaf {path!r}: has NaN or Inf values; cannot share it")
    keys = getattr(path, "keys", None)
    w = weight_map.get(keys) if keys is not None else None
    if w is not None:
      used_weights.add(keys)
    if w_slice is not None:
      w = w_slice
      if tuple(w.shape) != tuple(x.shape):
        raise ValueError(f"leaf {path!r}: weights shape {tuple(w.shape)} != leaf shape"
                         f" {tuple(x.shape)}")
      if not isinstance(w, jax.core.Tracer) and bool(
          np.any(np.asarray(w) < 0) | ~np.all(np.isfinite(np.asarray(w)))):
        raise ValueError(f"leaf {path!r}: weights must be finite and non-negative")
    if stats is not None or pc.outliers or pc.scale_group_size is not None:
      return _quantize_direct(path, x, stats, cfg, pc)
    zero = None
    if pc.sparse:  # the pruned zeros get no weight in the k-means, then entry 0
      zero = x == 0
      nz = (~zero).astype(jnp.float32)
      w = nz if w is None else jnp.asarray(w, jnp.float32) * nz
    leaf_key = jax.random.fold_in(key, hashing.fnv1a32(str(path).encode()))
    jobs.append(_Job(path=str(path), x=x, w=w, key=leaf_key, cfg=cfg))
    post[len(jobs) - 1] = functools.partial(_finish, pc=pc, zero=zero)
    return _Pending(len(jobs) - 1)

  pending = tree_lib.map_selected(params, collect, defaults=defaults, predicate=predicate,
                                  rules=rules, what="share")
  unused = [k_ for k_, v in weight_map.items() if v is not None and k_ not in used_weights]
  if unused:
    names = ", ".join("/".join(map(str, k_)) for k_ in unused[:5])
    raise ValueError(f"share: weights given for {len(unused)} leaf(s) that are not selected"
                     f" for sharing or not in params: {names}")
  results = [post[i](r) for i, r in enumerate(_run_jobs(jobs, progress))]

  def assemble(v):
    if isinstance(v, _Pending):
      return results[v.index]
    if isinstance(v, _Stacked):
      return parts.stack([assemble(u) for u in v.items], v.lead)
    return v
  return jax.tree_util.tree_map(
      assemble, pending,
      is_leaf=lambda v: isinstance(v, (_Pending, _Stacked)) or types.is_compressed(v))


@dataclasses.dataclass(frozen=True)
class _Stacked:
  """Placeholder for a stacked leaf: its slices (pending or done) and stack shape."""
  items: tuple
  lead: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Pending:
  """Placeholder for a selected leaf until its batch has been clustered."""
  index: int


@dataclasses.dataclass
class _Job:
  path: str
  x: Any
  w: Any
  key: Any
  cfg: ShareConfig


def _result(job: _Job, indices, codebook) -> types.SharedArray:
  cfg = job.cfg
  return types.SharedArray(
      indices=indices, codebook=codebook, shape=tuple(job.x.shape),
      dtype=np.dtype(job.x.dtype), bits=types.bits_for(cfg.k), axis=cfg.axis,
      group_size=cfg.group_size, vector_dim=cfg.vector_dim)


def _run_jobs(jobs, progress: bool):
  """Clusters every job; host-side jobs with the same settings and row bucket together."""
  bar = None
  if progress and jobs:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(jobs), desc="share", unit="leaf", file=sys.stderr)
  out = [None] * len(jobs)
  batches = {}
  for i, job in enumerate(jobs):
    handler = _SHARDED.get("share")
    sharded = None if handler is None else handler(job, _share_leaf)
    if sharded is not None:
      out[i] = _result(job, *sharded)
    elif isinstance(job.x, jax.core.Tracer) or (
        job.w is not None and isinstance(job.w, jax.core.Tracer)) or job.cfg.vector_dim != 1:
      out[i] = _result(job, *_share_leaf(job.x, job.w, job.key, shape=tuple(job.x.shape),
                                         cfg=job.cfg))
    else:
      g, wg = _groups_xp(np.asarray(job.x), None if job.w is None else np.asarray(job.w),
                         xp=np, **_layout(job.cfg, job.x.shape))
      n = g.shape[1]
      st = sort_threshold(job.cfg, g)
      size = kmeans_lib.row_bucket(n, st)
      batches.setdefault((job.cfg.kmeans_key, size, st), []).append((i, g[..., 0], wg))
      continue
    if bar is not None:
      bar.update(1)
  for (_, size, st), items in batches.items():
    rows, weights, keys = [], [], []
    for i, g, wg in items:
      n = g.shape[1]
      if n != size and n <= st:  # pad to the bucket as kmeans does
        g = np.concatenate([g, np.broadcast_to(g[:, :1], (g.shape[0], size - n))], axis=1)
        wg = np.pad(wg, ((0, 0), (0, size - n)))
      rows.append(g)
      weights.append(wg)
      keys.append(jax.random.split(jobs[i].key, g.shape[0]))
    cfg0 = jobs[items[0][0]].cfg
    cent, assign = kmeans_lib.kmeans_1d_batch(
        np.concatenate(rows) if len(rows) > 1 else rows[0],
        np.concatenate(weights) if len(weights) > 1 else weights[0],
        jnp.concatenate(keys) if len(keys) > 1 else keys[0], k=cfg0.k, method=cfg0.method,
        init=cfg0.init, num_atoms=cfg0.num_atoms, polish_iters=cfg0.polish_iters,
        max_iters=cfg0.max_iters, sort_threshold=st)
    cent, assign = np.asarray(cent), np.asarray(assign)
    start = 0
    for i, g, _ in items:
      job = jobs[i]
      stop = start + g.shape[0]
      n = g.shape[1]
      out[i] = _result(job, *_pack_xp(cent[start:stop], assign[start:stop, :n],
                                       dtype=np.dtype(job.x.dtype), xp=np,
                                       **_layout(job.cfg, job.x.shape)))
      start = stop
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  return out
