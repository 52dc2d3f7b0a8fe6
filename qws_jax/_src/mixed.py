"""Weight sharing under a storage budget: a codebook size per leaf (mixed precision).

`share_mixed` runs `share` once per candidate setting (by default the two codebook sizes
around the budget: k = 4 and 8 for 3 bits, 8 and 16 for 4 bits; the other options
shared), measures each leaf's error under each candidate (the
layer-output error ``tr((W - Q)^T H (W - Q))`` where calibration statistics exist, the
squared error otherwise) and its stored bytes (``SharedArray.nbytes``: indices,
codebooks, scales, outliers), and picks one candidate per leaf so that the total error
is smallest with the average bits/weight within the budget: a multiple-choice knapsack,
solved exactly by dynamic programming over the budget (`allocate`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from qws_jax._src import calibrate as calibrate_lib
from qws_jax._src import calibrated
from qws_jax._src import share as share_lib
from qws_jax._src import tree as tree_lib
from qws_jax._src import types



def default_candidates(bits: float) -> tuple[dict, ...]:
  """``k = 2**ceil(bits)`` and half of it (the sizes around a budget of ``bits``)."""
  hi = 2 ** min(max(math.ceil(bits), 1), 8)
  return tuple({"k": k} for k in (hi // 2, hi) if k >= 2)

_ALLOWED = ("k", "axis", "group_size", "outliers", "scale_group_size", "codebook_dtype",
            "method")


def _leaf_error(w, q: types.SharedArray, stats) -> float:
  """Layer-output error of ``q`` against ``w`` (squared error without statistics)."""
  dense = np.asarray(q.materialize(), np.float64)
  if stats is None:
    return float(np.sum((np.asarray(w, np.float64) - dense) ** 2))
  return calibrated.output_error(w, dense, stats)


def allocate(costs: Mapping[Any, Sequence[tuple[int, float]]], budget_bytes: int, *,
             resolution: int | None = None) -> dict:
  """One candidate per leaf minimising the summed error within ``budget_bytes``.

  A multiple-choice knapsack solved by dynamic programming over the budget in
  ``ceil(budget / resolution)``-byte units, each candidate's bytes rounded up to whole
  units, so the result always fits (exact when the budget is at most ``resolution``
  bytes; otherwise the rounding gives up at most ``leaves / resolution`` of the budget).
  When the rounding leaves no solution, every leaf takes its smallest candidate.

  Args:
    costs: ``{leaf: [(bytes, error) per candidate]}``.
    budget_bytes: the most bytes all leaves together may take.
    resolution: budget units of the dynamic programme (default ``max(20000, 200 *
      leaves)``: at most 0.5 % of the budget lost to rounding).

  Returns:
    ``{leaf: candidate index}``.

  Raises:
    ValueError: no choice fits the budget.
  """
  leaves = list(costs)
  if resolution is None:
    resolution = max(20000, 200 * len(leaves))
  unit = max(1, -(-int(budget_bytes) // resolution))
  cap = int(budget_bytes) // unit
  inf = np.inf
  best = np.zeros(cap + 1)  # best[c]: least error of the leaves so far within c units
  picks = []
  for leaf in leaves:
    new = np.full(cap + 1, inf)
    arg = np.full(cap + 1, -1, np.int32)
    for i, (b, e) in enumerate(costs[leaf]):
      u = -(-int(b) // unit)
      if u > cap:
        continue
      cand = np.full(cap + 1, inf)
      cand[u:] = best[:cap + 1 - u] + float(e)
      better = cand < new
      new[better], arg[better] = cand[better], i
    best = new
    picks.append(arg)
  if not np.isfinite(best[cap]):
    cheapest = {leaf: min(range(len(costs[leaf])), key=lambda i, l=leaf: costs[l][i])
                for leaf in leaves}
    if sum(costs[leaf][i][0] for leaf, i in cheapest.items()) <= budget_bytes:
      return cheapest
    raise ValueError(f"share_mixed: no choice of candidates fits {budget_bytes} bytes")
  out, c = {}, cap
  for leaf, arg in zip(reversed(leaves), reversed(picks)):
    i = int(arg[c])
    out[leaf] = i
    c -= -(-int(costs[leaf][i][0]) // unit)
  return out


def share_mixed(params, bits: float, *,
                candidates: Sequence[Mapping[str, Any]] | None = None,
                calibration=None, **options):
  """`qws_jax.share` with a codebook size per leaf, chosen to fit a bits/weight budget.

  Each candidate setting (a dict of `qws_jax.share` options: ``k`` and optionally
  ``axis``, ``group_size``, ``outliers``, ``scale_group_size``, ``codebook_dtype``,
  ``method``) is applied to every selected leaf, once per candidate. Each leaf then takes
  the candidate that, over the whole tree, gives the smallest total error with at most
  ``bits`` stored bits per weight on average over the compressed leaves (bytes as
  `SharedArray.nbytes`: indices, codebooks, scales and outliers). The error of a leaf is
  its layer-output error ``tr((W - Q)^T H (W - Q))`` when ``calibration`` has statistics
  for it (the quantity calibrated sharing minimises), its squared error otherwise.
  Sensitive layers get larger codebooks and robust ones smaller (mixed-bit
  palettization). Its main use is to spend a budget exactly: with sparse outliers,
  which cost a little over the index bits, a few robust layers at the smaller ``k`` pay
  for the outliers of all the others (on all-MiniLM-L6-v2 at 3 bits: see
  docs/calibration.md). Candidates far apart (``k`` = 4 and 32 together) rank layers by
  their own output error, which does not measure how the error reaches the model's
  output; on MiniLM that lost to a single ``k``, so keep them close.

  Args:
    params: any pytree of arrays, as for `qws_jax.share`.
    bits: the budget, average stored bits per compressed weight (e.g. ``4.0``).
    candidates: the settings to choose from (default `default_candidates`: ``k`` =
      ``2**ceil(bits)`` and half of it).
    calibration: optional `qws_jax.calibrate` tree, used by every candidate's `share`
      and to measure errors.
    **options: other `qws_jax.share` options common to all candidates (``rules``,
      ``predicate``, ``weights``, ``outliers``, ``codebook_dtype``, ``progress``, ...).

  Returns:
    The compressed pytree, each leaf from its chosen candidate.

  Raises:
    ValueError: an empty or unknown candidate, a non-positive budget, or a budget below
      what the smallest candidates take (the message gives their bits/weight).

  Example:
    >>> import jax, qws_jax
    >>> params = {"big": jax.random.normal(jax.random.key(0), (64, 64)),
    ...           "small": 0.01 * jax.random.normal(jax.random.key(1), (64, 64))}
    >>> out = qws_jax.share_mixed(params, bits=3.1, candidates=({"k": 4}, {"k": 16}))
    >>> {name: leaf.k for name, leaf in out.items()}  # the error is larger on "big"
    {'big': 16, 'small': 4}
  """
  if not (isinstance(bits, (int, float)) and math.isfinite(bits) and bits > 0):
    raise ValueError(f"share_mixed: bits must be a positive number, got {bits!r}")
  candidates = list(default_candidates(bits) if candidates is None else candidates)
  if not candidates:
    raise ValueError("share_mixed: candidates must not be empty")
  for c in candidates:
    if not isinstance(c, Mapping) or "k" not in c or set(c) - set(_ALLOWED):
      raise ValueError(f"share_mixed: each candidate is a dict of share options with 'k'"
                       f" (allowed: {', '.join(_ALLOWED)}); got {c!r}")
  trees = [share_lib.share(params, calibration=calibration, **{**options, **c})
           for c in candidates]
  stats = share_lib._calibration_map(calibration, params)  # pylint: disable=protected-access
  dense = tree_lib.leaves_by_keys(params)
  per_tree = [tree_lib.leaves_by_keys(t, is_leaf=types.is_compressed) for t in trees]
  keys = [k for k, v in per_tree[0].items() if isinstance(v, types.SharedArray)]
  for t in per_tree[1:]:
    if [k for k, v in t.items() if isinstance(v, types.SharedArray)] != keys:
      raise ValueError("share_mixed: the candidates selected different leaves (a rule"
                       " or predicate depends on the candidate options)")
  if not keys:
    return trees[0]
  costs = {}
  for key in keys:
    st = stats.get(key)
    if st is not None and not isinstance(st, calibrate_lib.LeafStats):
      st = None
    costs[key] = [(int(t[key].nbytes), _leaf_error(dense[key], t[key], st)) for t in per_tree]
  weights = sum(per_tree[0][key].size for key in keys)
  smallest = sum(min(b for b, _ in costs[key]) for key in keys) * 8 / weights
  if smallest > bits:
    raise ValueError(f"share_mixed: the smallest candidates take {smallest:.3f} bits/weight,"
                     f" over the budget bits={bits}; add a smaller k or raise bits")
  picked = allocate(costs, int(math.floor(bits * weights / 8)))

  def pick(path, leaf):
    key = tree_lib.path_keys(path)
    if key in picked:
      return per_tree[picked[key]][key]
    return leaf
  return jax.tree_util.tree_map_with_path(pick, trees[0], is_leaf=types.is_compressed)
