"""`calibrate`: input statistics of every weight leaf of any JAX function.

`calibrate(fn, params, batches)` traces ``fn(params, *batch)`` to a jaxpr, follows each
parameter leaf through cheap layout ops (``convert_element_type``, ``reshape``,
``transpose``, ``squeeze``, size-preserving ``broadcast_in_dim``, ``copy``) and through
the sub-jaxprs of ``pjit``/``jit``, ``remat``, ``custom_jvp_call``, ``custom_vjp_call``,
``scan``, ``while`` and ``cond``, and finds where it enters a ``dot_general`` or a
``conv_general_dilated`` as the weight operand. At each such site it accumulates the Gram
matrix ``X^T X`` of the other operand over the contracted dimensions (for a convolution:
of the im2col patches), with the axes mapped back to the leaf's own layout.

The statistics program is built once from the jaxpr by re-evaluating it with an
interpreter that records the activations, and compiled once per batch shape
(``jax.jit``); all batches of one shape reuse the same executable.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import time
from typing import Any, Callable, Iterable

import jax
from jax import lax
from jax.extend import core as jex
import jax.numpy as jnp
import numpy as np

from qws_jax._src import tree as tree_lib

_LOG = logging.getLogger("qws_jax")

# Primitives that only change the layout (or the precision) of the weight.
_IDENTITY_PRIMS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                             "optimization_barrier"})
_LAYOUT_PRIMS = _IDENTITY_PRIMS | {"reshape", "transpose", "squeeze", "expand_dims",
                                   "broadcast_in_dim"}
# Call-like primitives whose sub-jaxpr takes the equation's operands unchanged.
_CALL_PRIMS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2",
                         "checkpoint", "custom_jvp_call", "custom_vjp_call",
                         "custom_vjp_call_jaxpr"})
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- stats node


@dataclasses.dataclass(frozen=True)
class LeafStats:
  """Calibration statistics of one weight leaf: the Gram matrix of its matmul inputs.

  For a weight ``w`` used as ``y = x . w`` (``dot_general`` or convolution), ``gram`` is
  ``sum over tokens of x_c x_c^T``, where ``x_c`` is the part of the input that meets the
  contracted axes of ``w``; ``gram / count`` is the Hessian of the layer-output error
  ``E ||x . (w - q)||^2`` with respect to each output column of ``w``.

  Children (arrays):
    gram: float32 ``(K, K)``, or ``(K,)`` (its diagonal) when ``diagonal``. ``K`` is the
      product of ``shape[a]`` over ``contract_axes``; index ``i`` is the row-major
      flattening of the contracted axes in ascending axis order (for a Flax ``(in, out)``
      kernel: the input; for a torch ``(out, in)`` weight: axis 1; for an ``(h, w, in,
      out)`` conv kernel: the flattened im2col row ``(h, w, in)``, i.e. the matmul view).
    count: float32 scalar, the number of rows (tokens, patches) summed into ``gram``.

  Static metadata: ``shape`` (the weight's shape), ``contract_axes`` (ascending tuple of
  the weight's axes contracted with the input), ``diagonal``, ``stack_axes``.

  Stacked (scanned) weights: a leaf of shape ``(L, ...)`` that ``lax.scan`` (``nn.scan``,
  ``nnx.scan``) slices layer by layer has ``stack_axes = 1`` (one per nested scan):
  ``gram`` is ``(L, K, K)`` and ``count`` ``(L,)``, one set of statistics per layer,
  and ``contract_axes`` are axes of the whole leaf (never a stack axis). `slice` gives
  one layer's statistics; ``qws_jax.share(..., stack_axes=1, calibration=stats)`` uses
  them layer by layer.

  Invariants (`validate`): ``gram`` has the shape above and is finite, ``count > 0``.

  Example:
    >>> import jax, jax.numpy as jnp, qws_jax
    >>> params = {"w": jnp.ones((3, 2))}
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> stats = qws_jax.calibrate(lambda p, x: x @ p["w"], params, [(x,)])
    >>> s = stats["w"]
    >>> s.contract_axes, s.gram.shape, float(s.count)
    ((0,), (3, 3), 4.0)
    >>> bool(jnp.allclose(s.gram, x.T @ x))
    True
  """

  gram: jax.Array
  count: jax.Array
  shape: tuple[int, ...]
  contract_axes: tuple[int, ...]
  diagonal: bool = False
  stack_axes: int = 0

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[:self.stack_axes])

  def slice(self, i: int) -> "LeafStats":
    """The statistics of slice ``i`` (flat over the stack axes) of a stacked leaf."""
    if not self.stack_axes:
      raise ValueError("slice() needs stacked statistics (stack_axes > 0)")
    n = math.prod(self.stack_shape)
    tail = self.gram.shape[self.stack_axes:]
    s = self.stack_axes
    return LeafStats(self.gram.reshape((n,) + tail)[i], self.count.reshape(n)[i],
                     tuple(self.shape[s:]), tuple(a - s for a in self.contract_axes),
                     self.diagonal)

  @property
  def size(self) -> int:
    """``K``: the number of contracted weight coordinates (rows of the Gram)."""
    return math.prod(self.shape[a] for a in self.contract_axes)

  @property
  def output_axes(self) -> tuple[int, ...]:
    """The weight's axes that are not contracted (ascending)."""
    return tuple(a for a in range(self.stack_axes, len(self.shape))
                 if a not in self.contract_axes)

  def hessian_diagonal(self) -> jax.Array:
    """``(K,)`` float32: ``diag(gram) / count``, the mean squared input per row."""
    d = self.gram if self.diagonal else jnp.diagonal(self.gram, axis1=-2, axis2=-1)
    return d / jnp.maximum(self.count, 1.0)[..., None]

  def hessian(self) -> jax.Array:
    """``(K, K)`` float32 ``gram / count`` (needs full statistics)."""
    if self.diagonal:
      raise ValueError("hessian() needs full statistics; these were collected with"
                       " diagonal=True (use hessian_diagonal())")
    return self.gram / jnp.maximum(self.count, 1.0)[..., None, None]

  def validate(self, path: str = "") -> None:
    """Checks the invariants; raises ValueError/TypeError naming ``path``."""
    where = f" at {path!r}" if path else ""
    nd = len(self.shape)
    axes = tuple(self.contract_axes)
    st = self.stack_axes
    if not isinstance(st, int) or isinstance(st, bool) or not 0 <= st < nd:
      raise ValueError(f"stack_axes={st!r} must be an int in [0, {nd}){where}")
    if not axes or list(axes) != sorted(set(axes)) or not all(st <= a < nd for a in axes):
      raise ValueError(f"contract_axes={axes} must be a non-empty ascending tuple of axes of"
                       f" shape={self.shape} after its {st} stack axes{where}")
    k = self.size
    want = self.stack_shape + ((k,) if self.diagonal else (k, k))
    if tuple(self.gram.shape) != want:
      raise ValueError(f"gram shape {tuple(self.gram.shape)} != expected {want} for weight"
                       f" shape={self.shape}, contract_axes={axes}, diagonal={self.diagonal}"
                       f"{where}")
    if np.dtype(self.gram.dtype) != np.float32:
      raise TypeError(f"gram must be float32, got {self.gram.dtype}{where}")
    if tuple(np.shape(self.count)) != self.stack_shape:
      raise ValueError(f"count must have shape {self.stack_shape} (one per stacked slice),"
                       f" got shape {np.shape(self.count)}{where}")
    if not isinstance(self.gram, jax.core.Tracer):
      if not bool(jnp.all(jnp.isfinite(self.gram))):
        raise ValueError(f"gram has NaN/Inf values{where}")
      if not float(jnp.min(self.count)) > 0:
        raise ValueError(f"count must be > 0, got {float(jnp.min(self.count))}{where}")

  def __repr__(self):
    return (f"LeafStats(shape={self.shape}, contract_axes={self.contract_axes},"
            f" K={self.size}, diagonal={self.diagonal}"
            + (f", stack_axes={self.stack_axes})" if self.stack_axes else ")"))


jax.tree_util.register_dataclass(
    LeafStats, data_fields=["gram", "count"],
    meta_fields=["shape", "contract_axes", "diagonal", "stack_axes"])


@dataclasses.dataclass(frozen=True)
class CalibrationSummary:
  """What `calibrate` saw (returned with ``return_summary=True``).

  Attributes:
    used: paths of the leaves that have statistics.
    skipped: ``{path: reason}`` for the floating leaves without statistics (biases,
      norms, embeddings looked up by index, unsupported uses).
    batches: number of batches run.
    rows: total rows (tokens) per used leaf, ``{path: count}``.
    seconds: wall time of the whole call.
  """
  used: tuple[str, ...]
  skipped: dict[str, str]
  batches: int
  rows: dict[str, float]
  seconds: float

  def __str__(self):
    lines = [f"calibrate: {len(self.used)} leaves with statistics, {len(self.skipped)} skipped,"
             f" {self.batches} batches, {self.seconds:.1f} s"]
    lines += [f"  skipped {p}: {r}" for p, r in self.skipped.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tracing


class _Unsupported(Exception):
  """A weight use that calibrate cannot map back to the leaf (reason in the message)."""


@dataclasses.dataclass(frozen=True)
class _Tag:
  """A traced value derived from parameter leaf ``leaf`` by layout ops ``chain``."""
  leaf: int
  shape: tuple[int, ...]  # the leaf's shape (one slice of it inside a scan over it)
  chain: tuple = ()       # ((primitive name, params), ...)
  stack: int = 0          # scans that slice the leaf on the way here (its stack axes)


class _Recorder:
  """Trace-time bookkeeping shared by all traces of one `calibrate` call."""

  def __init__(self, diagonal: bool):
    self.diagonal = diagonal
    self.axes: dict[int, tuple[int, ...]] = {}
    self.stack: dict[int, int] = {}
    self.notes: dict[int, str] = {}
    self.bad: set[int] = set()

  def note(self, leaf: int, reason: str) -> None:
    self.notes.setdefault(leaf, reason)


def _is_layout(eqn) -> bool:
  name = eqn.primitive.name
  if name not in _LAYOUT_PRIMS:
    return False
  if name == "broadcast_in_dim":  # only a size-preserving one (adds unit axes)
    return math.prod(eqn.outvars[0].aval.shape) == math.prod(eqn.invars[0].aval.shape)
  return True


def _replay(chain, idx: np.ndarray) -> np.ndarray:
  """Applies the layout ops of ``chain`` to a host integer array."""
  for name, params in chain:
    if name in _IDENTITY_PRIMS:
      continue
    if name == "transpose":
      idx = np.transpose(idx, params["permutation"])
    elif name == "reshape":
      if params.get("dimensions") is not None:
        idx = np.transpose(idx, params["dimensions"])
      idx = idx.reshape(params["new_sizes"])
    elif name == "squeeze":
      idx = np.squeeze(idx, axis=tuple(params["dimensions"]))
    elif name == "expand_dims":
      idx = np.expand_dims(idx, axis=tuple(params["dimensions"]))
    elif name == "broadcast_in_dim":
      idx = idx.reshape(params["shape"])
    else:  # pragma: no cover - guarded by _is_layout
      raise _Unsupported(f"layout op {name}")
  return idx


def _map_axes(tag: _Tag, wp_axes: tuple[int, ...]):
  """Maps the contracted axes of the value at the matmul back to the leaf.

  ``wp_axes`` are the contracted axes of the weight operand in the order of the
  activation's contracted dims (so the activation's flattened contraction index ``i`` is
  row-major over ``wp_axes``). Returns ``(contract_axes, q)``: the leaf's contracted axes
  (ascending) and ``q`` such that column ``k`` of the canonical Gram is activation column
  ``q[k]`` (``None`` for the identity).
  """
  shape = tag.shape
  names = [n for n, _ in tag.chain if n not in _IDENTITY_PRIMS]
  if all(n == "transpose" for n in names):
    ax = list(range(len(shape)))
    for name, params in tag.chain:
      if name == "transpose":
        ax = [ax[p] for p in params["permutation"]]
    pair = [ax[b] for b in wp_axes]
    canon = sorted(pair)
    if pair == canon:
      return tuple(canon), None
    iota = np.arange(math.prod(shape[a] for a in canon)).reshape([shape[a] for a in canon])
    p = iota.transpose([canon.index(a) for a in pair]).reshape(-1)
    return tuple(canon), np.argsort(p).astype(np.int32)
  # General path: replay the layout ops on the flat index of every element.
  idx = _replay(tag.chain, np.arange(math.prod(shape), dtype=np.int64).reshape(shape))
  coords = np.unravel_index(idx, shape)
  rc = set(wp_axes)
  others = [b for b in range(idx.ndim) if b not in rc]

  def varies(c, axes):
    return any(c.shape[b] > 1 and bool(np.any(np.diff(c, axis=b) != 0)) for b in axes)

  contract = []
  for a in range(len(shape)):
    v_rc, v_other = varies(coords[a], wp_axes), varies(coords[a], others)
    if v_rc and v_other:
      raise _Unsupported(f"a layout op mixes contracted and output axes of the weight (axis {a})")
    if v_rc:
      contract.append(a)
  if not contract:
    raise _Unsupported("no axis of the weight is contracted")
  sub = np.moveaxis(idx, list(wp_axes), list(range(len(wp_axes))))
  sub = sub[(Ellipsis,) + (0,) * len(others)] if others else sub
  flat = sub.reshape(-1)
  ksize = math.prod(shape[a] for a in contract)
  cc = np.unravel_index(flat, shape)
  p = np.ravel_multi_index([cc[a] for a in contract], [shape[a] for a in contract])
  if flat.size != ksize or not np.array_equal(np.sort(p), np.arange(ksize)):
    raise _Unsupported("the matmul sees only part of the weight's contracted axes")
  q = None if np.array_equal(p, np.arange(ksize)) else np.argsort(p).astype(np.int32)
  return tuple(contract), q


def _record(tag: _Tag, x, x_dims, wp_axes, rec: _Recorder, stats: dict) -> None:
  """Adds the Gram of ``x`` over ``x_dims`` (paired with ``wp_axes``) to ``stats``."""
  try:
    axes, q = _map_axes(tag, tuple(wp_axes))
  except _Unsupported as e:
    rec.note(tag.leaf, str(e))
    return
  prev = rec.axes.setdefault(tag.leaf, axes)
  if prev != axes:
    rec.note(tag.leaf, f"used with different contracted axes {prev} and {axes}")
    rec.bad.add(tag.leaf)
    return
  if rec.stack.setdefault(tag.leaf, tag.stack) != tag.stack:
    rec.note(tag.leaf, "used both as a whole and sliced by lax.scan")
    rec.bad.add(tag.leaf)
    return
  keep = [d for d in range(x.ndim) if d not in x_dims]
  kk = math.prod(x.shape[d] for d in x_dims)
  x2 = jnp.transpose(x, keep + list(x_dims)).reshape(-1, kk).astype(jnp.float32)
  if q is not None:
    x2 = jnp.take(x2, jnp.asarray(q), axis=1)
  if rec.diagonal:
    g = jnp.sum(x2 * x2, axis=0)
  else:
    g = lax.dot_general(x2, x2, (((0,), (0,)), ((), ())), precision=_HIGHEST,
                        preferred_element_type=jnp.float32)
  n = jnp.float32(x2.shape[0])
  if tag.leaf in stats:
    g0, n0 = stats[tag.leaf]
    stats[tag.leaf] = (g0 + g, n0 + n)
  else:
    stats[tag.leaf] = (g, n)


def _dot_site(eqn, invals, intags, rec, stats) -> None:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  tl, tr = intags
  if tl is not None and tr is not None:
    for t in (tl, tr):
      rec.note(t.leaf, "multiplied by another parameter (no activation to calibrate on)")
    return
  if tr is not None:
    tag, x, x_dims, w_axes, w_batch = tr, invals[0], lc, rc, rb
  else:
    tag, x, x_dims, w_axes, w_batch = tl, invals[1], rc, lc, lb
  if len(w_batch):
    rec.note(tag.leaf, "used in a dot_general with batch dimensions on the weight")
    return
  if not len(w_axes):
    rec.note(tag.leaf, "used in an outer product (no contracted axis)")
    return
  _record(tag, x, tuple(x_dims), tuple(w_axes), rec, stats)


def _conv_site(eqn, invals, intags, rec, stats) -> None:
  tag = intags[1]
  if tag is None:
    if intags[0] is not None:
      rec.note(intags[0].leaf, "used as the input (not the kernel) of a convolution")
    return
  p = eqn.params
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    rec.note(tag.leaf, "grouped/depthwise convolutions (feature_group_count or"
             " batch_group_count > 1) are not supported")
    return
  dn = p["dimension_numbers"]
  rhs_shape = eqn.invars[1].aval.shape
  filt = [rhs_shape[a] for a in dn.rhs_spec[2:]]
  patches = lax.conv_general_dilated_patches(
      invals[0], filt, p["window_strides"], p["padding"], p["lhs_dilation"],
      p["rhs_dilation"], dn, precision=_HIGHEST)
  feat = dn.out_spec[1]
  # Patch features are ordered (in-channel, *spatial in kernel-spec order).
  _record(tag, patches, (feat,), (dn.rhs_spec[1], *dn.rhs_spec[2:]), rec, stats)


def _sub_jaxpr(params):
  for name in _CALL_PARAMS:
    j = params.get(name)
    if isinstance(j, jex.ClosedJaxpr):
      return j.jaxpr, list(j.consts)
    if isinstance(j, jex.Jaxpr):
      return j, []
  return None


def _add(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, (g, n) in b.items():
    out[k] = (out[k][0] + g, out[k][1] + n) if k in out else (g, n)
  return out


def _zeros_like_stats(shapes: dict) -> dict:
  return {k: (jnp.zeros(g.shape, jnp.float32), jnp.zeros(n.shape, jnp.float32))
          for k, (g, n) in shapes.items()}


def _bind(eqn, invals):
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **bind_params)
  return out if eqn.primitive.multiple_results else [out]


def _scan(eqn, invals, intags, rec):
  p = eqn.params
  nc, ncar = p["num_consts"], p["num_carry"]
  body = p["jaxpr"]
  consts, carry, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
  for t in intags[nc:nc + ncar]:
    if t is not None:
      rec.note(t.leaf, "carried by lax.scan")
  # A leaf scanned over (stacked layers: nn.scan, nnx.scan) is sliced: each step sees
  # one layer, whose statistics are stacked along the scan like the leaf.
  sliced = []
  xtags = []
  for t in intags[nc + ncar:]:
    if t is not None and t.chain:
      rec.note(t.leaf, "scanned over by lax.scan after a layout change")
      t = None
    if t is not None:
      sliced.append(t.leaf)
      t = _Tag(t.leaf, t.shape[1:], (), t.stack + 1)
    xtags.append(t)
  tags = list(intags[:nc]) + [None] * ncar + xtags

  def run(c, x):
    return _interp(body.jaxpr, body.consts, list(consts) + list(c) + list(x), tags, rec)

  x_avals = [jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in xs]
  _, shapes = jax.eval_shape(run, list(carry), x_avals)
  summed = {k: v for k, v in shapes.items() if k not in sliced}

  def f(c, x):
    car, acc = c
    outs, st = run(car, x)
    per_step = {k: v for k, v in st.items() if k in sliced}
    return (outs[:ncar], _add(acc, {k: v for k, v in st.items() if k not in sliced})), (
        outs[ncar:], per_step)

  (car, acc), (ys, stacked) = lax.scan(
      f, (list(carry), _zeros_like_stats(summed)), list(xs), length=p["length"],
      reverse=p["reverse"], unroll=p["unroll"])
  return list(car) + list(ys), {**acc, **stacked}


def _while(eqn, invals, intags, rec):
  p = eqn.params
  cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, carry = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  for t in list(intags[:cn]) + list(intags[cn + bn:]):
    if t is not None:
      rec.note(t.leaf, "used in a while_loop condition or carry")
  tags = list(intags[cn:cn + bn]) + [None] * len(carry)

  def run(c):
    return _interp(bj.jaxpr, bj.consts, list(bconsts) + list(c), tags, rec)

  _, shapes = jax.eval_shape(run, list(carry))

  def cond(c):
    return jex.jaxpr_as_fun(cj)(*cconsts, *c[0])[0]

  def body(c):
    outs, st = run(c[0])
    return list(outs), _add(c[1], st)

  car, acc = lax.while_loop(cond, body, (list(carry), _zeros_like_stats(shapes)))
  return list(car), acc


def _cond(eqn, invals, intags, rec):
  branches = eqn.params["branches"]
  index, ops, tags = invals[0], invals[1:], list(intags[1:])

  def runner(br):
    return lambda *o: _interp(br.jaxpr, br.consts, list(o), tags, rec)

  shapes = {}
  for br in branches:
    shapes.update(jax.eval_shape(runner(br), *ops)[1])

  def full(br):
    def f(*o):
      outs, st = runner(br)(*o)
      return list(outs), _add(_zeros_like_stats(shapes), st)
    return f

  outs, acc = lax.switch(index, [full(br) for br in branches], *ops)
  return list(outs), acc


def _interp(jaxpr, consts, args, tags, rec: _Recorder):
  """Evaluates ``jaxpr`` and returns ``(outputs, {leaf: (gram, count)})``."""
  env, tagmap, stats = {}, {}, {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a, t in zip(jaxpr.invars, args, tags):
    env[v] = a
    if t is not None:
      tagmap[v] = t
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    intags = [None if isinstance(v, jex.Literal) else tagmap.get(v) for v in eqn.invars]
    name = eqn.primitive.name
    outs, out_tag = None, None
    if any(t is not None for t in intags):
      if name == "dot_general":
        _dot_site(eqn, invals, intags, rec, stats)
      elif name == "conv_general_dilated":
        _conv_site(eqn, invals, intags, rec, stats)
      elif intags[0] is not None and _is_layout(eqn):
        t = intags[0]
        out_tag = _Tag(t.leaf, t.shape, t.chain + ((name, dict(eqn.params)),))
      elif name == "scan":
        outs, st = _scan(eqn, invals, intags, rec)
        stats = _add(stats, st)
      elif name == "while":
        outs, st = _while(eqn, invals, intags, rec)
        stats = _add(stats, st)
      elif name == "cond":
        outs, st = _cond(eqn, invals, intags, rec)
        stats = _add(stats, st)
      elif name in _CALL_PRIMS and _sub_jaxpr(eqn.params) is not None:
        sub, sub_consts = _sub_jaxpr(eqn.params)  # operands map 1:1 onto its invars
        outs, st = _interp(sub, sub_consts, invals, intags, rec)
        stats = _add(stats, st)
      elif _sub_jaxpr(eqn.params) is not None:
        for t in intags:
          if t is not None:
            rec.note(t.leaf, f"used inside {name!r}, which calibrate does not follow")
    if outs is None:
      outs = _bind(eqn, invals)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
    if out_tag is not None:
      tagmap[eqn.outvars[0]] = out_tag
  return [read(v) for v in jaxpr.outvars], stats


# ----------------------------------------------------------------------------- calibrate


def _is_candidate(x) -> bool:
  return (hasattr(x, "shape") and hasattr(x, "dtype") and len(x.shape) >= 1
          and jnp.issubdtype(x.dtype, jnp.floating))


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def calibrate(fn: Callable[..., Any], params: Any, batches: Iterable[Any], *,
              diagonal: bool = False, progress: bool = False,
              return_summary: bool = False):
  """Collects ``X^T X`` of the matmul inputs of every weight leaf of ``fn``.

  ``fn(params, *batch)`` may be any JAX function of a parameter pytree: a linen
  ``model.apply`` (``lambda v, x: model.apply(v, x)`` with ``params`` the variables), an
  NNX model (``lambda s, x: nnx.merge(graphdef, s)(x)`` with ``params`` the state from
  ``nnx.split``), or a pure function. It is traced to a jaxpr; every floating parameter
  leaf that enters a ``dot_general`` or ``conv_general_dilated`` as the weight operand
  (possibly after ``convert_element_type``, ``reshape``, ``transpose``, ``squeeze``, and
  inside ``jit``/``remat``/``custom_jvp``/``custom_vjp``/``scan``/``while``/``cond``) gets
  the Gram matrix of the other operand over the contracted dimensions, summed over all
  rows (tokens) and batches. A leaf used at several sites sums their statistics. For a
  convolution the rows are the im2col patches, so the Gram matches the flattened kernel.
  Weights may be stored in any layout (``(in, out)``, torch ``(out, in)``, ``Einsum``
  kernels, conv kernels); `LeafStats.contract_axes` records which axes are contracted.

  The statistics function is built from the jaxpr once per batch shape and jitted:
  every batch of a given shape runs the same compiled program.

  Args:
    fn: ``fn(params, *batch) -> anything``; JAX-traceable.
    params: pytree of arrays (the first argument of ``fn``).
    batches: iterable of batches; a tuple or list is unpacked into ``fn``'s positional
      arguments, anything else is passed as the single argument. Every leaf of a batch
      becomes a traced array: close over static flags (``train=False``) in ``fn``.
    diagonal: keep only ``diag(X^T X)`` (``(K,)``), for very wide inputs.
    progress: show a tqdm progress bar over batches (on stderr).
    return_summary: also return a `CalibrationSummary` (which leaves were used, which
      were skipped and why).

  Returns:
    A pytree with the structure of ``params``: a `LeafStats` for each leaf used as a
    matmul weight, ``None`` for the others. With ``return_summary``:
    ``(stats, summary)``.

  Raises:
    ValueError: ``batches`` is empty, or a batch fails to run (the message names the
      batch index and the error), or batches of different shapes use different leaves.
    TypeError: ``fn`` is not callable.

  Example:
    >>> import jax, jax.numpy as jnp, qws_jax
    >>> params = {"w1": jnp.ones((4, 8)), "b1": jnp.zeros(8), "w2": jnp.ones((2, 8))}
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"].T
    >>> xs = [(jax.random.normal(jax.random.key(i), (16, 4)),) for i in range(3)]
    >>> stats, summary = qws_jax.calibrate(fn, params, xs, return_summary=True)
    >>> stats["w1"].gram.shape, stats["w2"].contract_axes, stats["b1"]
    ((4, 4), (1,), None)
    >>> summary.skipped
    {'b1': 'not used as the weight operand of a dot_general or convolution'}
  """
  if not callable(fn):
    raise TypeError(f"fn must be callable, got {type(fn).__name__}")
  t0 = time.perf_counter()
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tree_lib.path_str(p) for p, _ in with_path]
  arrays = [x for _, x in with_path]
  n = len(arrays)
  cand = [_is_candidate(x) for x in arrays]
  rec = _Recorder(bool(diagonal))

  def batch_stats(arrs, flat_batch, btree):
    def f(*xs):
      return fn(jax.tree_util.tree_unflatten(treedef, xs[:n]),
                *jax.tree_util.tree_unflatten(btree, list(xs[n:])))
    closed = jax.make_jaxpr(f)(*arrs, *flat_batch)
    tags = [_Tag(i, tuple(a.shape)) if cand[i] else None for i, a in enumerate(arrs)]
    _, st = _interp(closed.jaxpr, closed.consts, list(arrs) + list(flat_batch),
                    tags + [None] * len(flat_batch), rec)
    return st

  def step(acc, arrs, flat_batch, btree):
    return _add(acc, batch_stats(arrs, flat_batch, btree))

  step_jit = jax.jit(step, static_argnums=3, donate_argnums=0)
  it = iter(batches)
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = tqdm(total=total, desc="calibrate", unit="batch", file=sys.stderr)
  acc, keys, count, seen = None, None, 0, set()
  try:
    for i, batch in enumerate(it):
      args = _as_args(batch)
      flat, btree = jax.tree_util.tree_flatten(args)
      flat = [jnp.asarray(a) for a in flat]
      try:
        sig = (btree, tuple((a.shape, a.dtype, a.weak_type) for a in flat))
        if sig not in seen:  # a new batch shape: trace it once to check its leaves
          shapes = jax.eval_shape(functools.partial(batch_stats, btree=btree), arrays, flat)
          seen.add(sig)
          if acc is None:
            acc = _zeros_like_stats(shapes)
            keys = set(shapes)
          elif set(shapes) != keys:
            raise ValueError(
                f"leaves with statistics {sorted(paths[k] for k in shapes)} differ from"
                f" those of the first batch {sorted(paths[k] for k in keys)}")
        acc = step_jit(acc, arrays, flat, btree)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"calibration batch {i} (argument shapes"
                         f" {[tuple(np.shape(a)) for a in flat]}) failed:"
                         f" {type(e).__name__}: {e}") from e
      count += 1
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  if acc is None:
    raise ValueError("batches is empty: calibrate needs at least one batch")
  out, skipped, rows = [], {}, {}
  for i in range(n):
    if i in acc and i not in rec.bad:
      g, c = acc[i]
      st = rec.stack.get(i, 0)
      out.append(LeafStats(g, c, tuple(arrays[i].shape),
                           tuple(a + st for a in rec.axes[i]), bool(diagonal), st))
      rows[paths[i]] = float(jnp.min(c))
    else:
      out.append(None)
      if cand[i]:
        skipped[paths[i]] = rec.notes.get(
            i, "not used as the weight operand of a dot_general or convolution")
  summary = CalibrationSummary(tuple(rows), skipped, count, rows, time.perf_counter() - t0)
  _LOG.info("%s", summary)
  stats = jax.tree_util.tree_unflatten(treedef, out)
  return (stats, summary) if return_summary else stats
