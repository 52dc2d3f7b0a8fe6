"""jit-compiled k-means: exact-quality 1-D clustering and vector k-means.

1-D algorithm (``method="dp"``, the default), all static shapes, see docs/design.md:

* **Short rows** (``n <= sort_threshold``: channels, groups, small tensors) are padded
  to a power-of-two row bucket and run in fixed-size chunks of rows (one compiled
  program per (k, bucket, chunk)). Per row: one sort; coarse atoms of equal mass under
  ``p(x)**(1/3)`` when the row is longer than ``num_atoms``; the exact DP on the atoms
  (dense min-plus up to `DENSE_MAX_ATOMS`, divide and conquer above); when atoms were
  merged, a windowed boundary DP (`_window_refine`) and a Lloyd polish; assignment.
* **Long rows** are histogrammed (top 16 / 18 bits of an order-preserving uint32 image
  of the float32 value) in fixed blocks; coarse atoms, the divide-and-conquer exact DP
  (float64) and a Lloyd polish run on the histogram (`centroids_from_hist`, compiled
  once per k); then blocked assignment and, for k >= 64, one exact Lloyd step.

The stages that see the data (`hist_stats_blocks`, `assign_refine`) take an optional
``axis_name`` and ``psum`` their statistics, so the sharded layer runs the same code
under ``shard_map``. The result is within ``1.001x`` of the optimal MSE in our
benchmarks (``benchmarks/RESULTS.md``), including heavy-tailed transformer weights,
where Lloyd from any init stalls at 1.04-1.14x.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

def fine_bits(k: int) -> int:
  """Key bits of the fine histogram: 2**16 bins (7 mantissa bits) up to k=32, 2**18
  (9 mantissa bits) above, where clusters are narrower."""
  return 16 if k <= 32 else 18

INITS = ("linear", "quantile", "kmeans++")
METHODS = ("dp", "lloyd")


class KMeansResult(NamedTuple):
  """Output of `kmeans`.

  Attributes:
    centroids: ``(k,)`` sorted ascending (1-D) or ``(k, d)`` (vector), float32.
    assignments: int32 ``(n,)``, the centroid of each point.
    inertia: float32 scalar, ``sum_i w_i * ||x_i - c_{a_i}||^2``.
  """
  centroids: jax.Array
  assignments: jax.Array
  inertia: jax.Array


# --------------------------------------------------------------------------- keys


def _float_key(x: jax.Array) -> jax.Array:
  """Order-preserving uint32 image of float32 values (``-0.0`` and ``0.0`` adjacent)."""
  u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  neg = (u >> 31) == 1
  return jnp.where(neg, ~u, u | jnp.uint32(0x80000000))


def _key_to_float(key: jax.Array) -> jax.Array:
  neg = (key >> 31) == 0
  u = jnp.where(neg, ~key, key & jnp.uint32(0x7FFFFFFF))
  return jax.lax.bitcast_convert_type(u, jnp.float32)


def _bin_low(bins: jax.Array, bits: int) -> jax.Array:
  """Smallest float32 value in each fine bin (the edge towards -inf)."""
  shift = 32 - bits
  b = bins.astype(jnp.uint32)
  lo_key = b << shift
  hi_key = lo_key | jnp.uint32((1 << shift) - 1)
  # For negative values the key order is reversed in magnitude: the low edge is hi_key.
  return jnp.minimum(_key_to_float(lo_key), _key_to_float(hi_key))


def fine_bin_low(bits: int) -> jax.Array:
  """Low edge of every fine bin (0 for the bins of non-finite values)."""
  low = _bin_low(jnp.arange(1 << bits, dtype=jnp.int32), bits)
  return jnp.where(jnp.isfinite(low), low, 0.0)


def fine_bins(x: jax.Array, bits: int) -> jax.Array:
  """Fine bin (int32) of each float32 value: the top ``bits`` bits of its ordered key."""
  return (_float_key(x) >> (32 - bits)).astype(jnp.int32)


def hist_stats(x, w, bits: int) -> jax.Array:
  """Histogram sums ``(2**bits, 2)``: per bin ``sum w`` and ``sum w * (x - bin_low)``."""
  bins = fine_bins(x, bits)
  off = x - fine_bin_low(bits)[bins]
  return jax.ops.segment_sum(jnp.stack([w, w * off], -1), bins, 1 << bits)


def _neighbour_gaps(cw, mean):
  """Half the distance to the previous plus next non-empty atom (0 for empty atoms)."""
  n = cw.shape[0]
  idx = jnp.arange(n)
  nonempty = cw > 0
  prev = jax.lax.cummax(jnp.where(nonempty, idx, -1))
  nxt = jax.lax.cummin(jnp.where(nonempty, idx, n), reverse=True)
  # previous / next *other* non-empty atom
  prev_other = jnp.concatenate([jnp.array([-1]), prev[:-1]])
  next_other = jnp.concatenate([nxt[1:], jnp.array([n])])
  m_prev = jnp.where(prev_other >= 0, mean[jnp.clip(prev_other, 0, n - 1)], mean)
  m_next = jnp.where(next_other < n, mean[jnp.clip(next_other, 0, n - 1)], mean)
  gap = 0.5 * (m_next - m_prev)
  return jnp.where(nonempty, gap, 0.0)


def _coarse_ids(cw, mean, num_atoms):
  """Coarse atom (0..num_atoms-1) of each fine atom: contiguous, non-decreasing."""
  nonempty = cw > 0
  rank = jnp.cumsum(nonempty.astype(jnp.int32)) - 1
  num_nonempty = rank[-1] + 1
  gap = _neighbour_gaps(cw, mean)
  tot_w = jnp.sum(cw)
  # empirical density cw/gap; cube-root measure (cw/gap)^(1/3) * gap
  scale = jnp.maximum(jnp.max(gap), 1e-30)
  g = gap / scale
  mass = jnp.where(nonempty & (g > 0), jnp.cbrt(cw / tot_w) * jnp.cbrt(g) ** 2, 0.0)
  # atoms with zero gap (a single distinct value) still get a little mass
  mass = jnp.where(nonempty & (g <= 0), jnp.cbrt(cw / tot_w) * 1e-6, mass)
  cum = jnp.cumsum(mass)
  total = jnp.maximum(cum[-1], 1e-30)
  centre = (cum - 0.5 * mass) / total
  by_mass = jnp.clip(jnp.floor(centre * num_atoms).astype(jnp.int32), 0, num_atoms - 1)
  by_rank = jnp.clip(rank, 0, num_atoms - 1)
  return jnp.where(num_nonempty <= num_atoms, by_rank, by_mass)


# --------------------------------------------------------------------------- exact DP


@functools.lru_cache(maxsize=None)
def _dc_schedule(m: int):
  """Rounds of the divide-and-conquer over j in [0, m], padded to equal size.

  Returns int32 arrays ``(rounds, T)``: ``mids`` (j, or the scratch ``m + 1``), ``left``
  and ``right`` (slots of the opt array bounding the search: slot 0 is opt(-1) = 0,
  slot ``j + 1`` is opt(j), slot ``m + 2`` is opt(m + 1) = m).
  """
  rounds = []
  level = [(0, m)]
  while level:
    row, nxt = [], []
    for lo, hi in level:
      mid = (lo + hi) // 2
      row.append((mid, lo, hi + 2))
      if lo <= mid - 1:
        nxt.append((lo, mid - 1))
      if mid + 1 <= hi:
        nxt.append((mid + 1, hi))
    rounds.append(row)
    level = nxt
  t = max(len(r) for r in rounds)
  sched = np.zeros((3, len(rounds), t), np.int32)
  sched[0] = m + 1  # padding: scratch j, bounds from slot 0 (opt = 0): a length-1 search
  for r, row in enumerate(rounds):
    for c, (mid, left, right) in enumerate(row):
      sched[:, r, c] = (mid, left, right)
  return sched


def _dp_layer(d_prev, cost_fn, m: int):
  """One DP layer: D[j] = min_{0<=i<=j} d_prev[i] + cost(i, j) for j = 0..m, and argmin.

  Divide and conquer on the monotone argmin, one equal-sized vectorised step per
  recursion level (a loop, so it compiles once).
  """
  sched = _dc_schedule(m)
  t_n = sched.shape[2]
  size = m + 1 + t_n
  e = jnp.arange(size, dtype=jnp.int32)

  def round_(carry, rnd):
    opt, d_new = carry
    mids, lefts, rights = rnd[0], rnd[1], rnd[2]
    lo = opt[lefts]
    hi = jnp.minimum(opt[rights], jnp.minimum(mids, m))
    length = hi - lo + 1
    ends = jnp.cumsum(length)
    starts = ends - length
    seg = jnp.zeros((size,), jnp.int32).at[starts[1:]].add(1, mode="drop")
    t = jnp.cumsum(seg)
    valid = e < ends[-1]
    t = jnp.where(valid, t, 0)
    i = jnp.clip(lo[t] + e - starts[t], 0, m)
    val = d_prev[i] + cost_fn(i, jnp.minimum(mids[t], m))
    val = jnp.where(valid, val, jnp.inf)
    best = jax.ops.segment_min(val, t, t_n, indices_are_sorted=True)
    cand = jnp.where(valid & (val <= best[t]), i, m + 1)
    arg = jax.ops.segment_min(cand, t, t_n, indices_are_sorted=True)
    slot = jnp.where(mids <= m, mids + 1, m + 3)
    opt = opt.at[slot].set(arg)
    d_new = d_new.at[mids].set(best)
    return (opt, d_new), None

  opt = jnp.zeros((m + 4,), jnp.int32).at[m + 2].set(m)
  d_new = jnp.zeros((m + 2,), d_prev.dtype)
  (opt, d_new), _ = jax.lax.scan(round_, (opt, d_new), jnp.asarray(sched).transpose(1, 0, 2))
  return d_new[:m + 1], opt[1:m + 2]


def _centred_prefix_sums(aw, am):
  """float64 prefix sums of weight, ``w (x - ref)`` and ``w (x - ref)^2`` over sorted atoms.

  ``ref`` is the weighted mean (centring keeps the squared sums accurate). Returns
  ``(ref, cw, c1, c2)``, each sum with a leading 0. Call under ``jax.enable_x64``.
  """
  w = aw.astype(jnp.float64)
  x = am.astype(jnp.float64)
  tot = jnp.sum(w)
  ref = jnp.sum(w * x) / jnp.where(tot > 0, tot, 1.0)
  xc = x - ref
  zero = jnp.zeros((1,), jnp.float64)
  return (ref, jnp.concatenate([zero, jnp.cumsum(w)]), jnp.concatenate([zero, jnp.cumsum(w * xc)]),
          jnp.concatenate([zero, jnp.cumsum(w * xc * xc)]))


def _dp_centroids(aw, am, k: int):
  """Optimal k-clustering of weighted sorted atoms (weights aw, means am): centroids (k,).

  Runs in float64. Empty clusters (fewer distinct atoms than k) are reported with
  weight 0 and filled in by the caller.
  """
  m = aw.shape[0]
  with jax.enable_x64(True):
    ref, cw, c1, c2 = _centred_prefix_sums(aw, am)

    def cost(i, j):
      dw = cw[j] - cw[i]
      d1 = c1[j] - c1[i]
      d2 = c2[j] - c2[i]
      c = d2 - d1 * d1 / jnp.where(dw > 0, dw, 1.0)
      return jnp.where(dw > 0, jnp.maximum(c, 0.0), 0.0)

    j_all = jnp.arange(m + 1, dtype=jnp.int32)
    d0 = cost(jnp.zeros_like(j_all), j_all)

    def layer(d_prev, _):
      d_new, arg = _dp_layer(d_prev, cost, m)
      return d_new, arg

    if k > 1:
      _, args = jax.lax.scan(layer, d0, None, length=k - 1)  # (k-1, m+1)

      def back(j, arg):
        i = arg[j]
        return i, i

      _, starts = jax.lax.scan(back, jnp.int32(m), args, reverse=True)
      # starts[l] is where cluster l + 1 begins
      lo_b = jnp.concatenate([jnp.zeros((1,), jnp.int32), starts])
      hi_b = jnp.concatenate([starts, jnp.array([m], jnp.int32)])
    else:
      lo_b = jnp.zeros((1,), jnp.int32)
      hi_b = jnp.array([m], jnp.int32)
    sw = cw[hi_b] - cw[lo_b]
    s1 = c1[hi_b] - c1[lo_b]
    cent = ref + s1 / jnp.where(sw > 0, sw, 1.0)
    return cent.astype(jnp.float32), (sw > 0)


# --------------------------------------------------------------------------- helpers


def _fill_empty(cent, used):
  """Canonical codebook: empty clusters copy the nearest used centroid below (or above)."""
  k = cent.shape[0]
  idx = jnp.arange(k)
  below = jax.lax.cummax(jnp.where(used, idx, -1))
  above = jax.lax.cummin(jnp.where(used, idx, k), reverse=True)
  src = jnp.clip(jnp.where(below >= 0, below, above), 0, k - 1)
  return jnp.where(jnp.any(used), cent[src], jnp.zeros_like(cent))


def _assign_sorted(cent, values):
  """Nearest centroid of each value for sorted centroids (ties go to the lower one)."""
  mid = 0.5 * (cent[1:] + cent[:-1])
  return jnp.searchsorted(mid, values, side="left").astype(jnp.int32)


def _assign_binned(cent, x):
  """Exact nearest-centroid assignment of histogrammed values in O(n) gathers.

  The cluster of each bin's low edge comes from a table over the bins; a value can only
  lie in that cluster or a later one, so it steps forward while it is past the next
  midpoint (usually zero or one step: bins are much narrower than clusters).
  Same result as `_assign_sorted` (ties go to the lower centroid).
  """
  k = cent.shape[0]
  bits = fine_bits(k)
  bins = fine_bins(x, bits)
  low = _bin_low(jnp.arange(1 << bits, dtype=jnp.int32), bits)
  table = _assign_sorted(cent, low)
  mid = jnp.concatenate([0.5 * (cent[1:] + cent[:-1]), jnp.full((1,), jnp.inf, cent.dtype)])
  c = table[bins]

  def cond(state):
    return state[1]

  def body(state):
    c, _ = state
    step = (x > mid[c]).astype(jnp.int32)
    return c + step, jnp.any(step > 0)

  c, _ = jax.lax.while_loop(cond, body, (c, jnp.bool_(True)))
  return jnp.minimum(c, k - 1)


def _lloyd_prefix(cent, fw, fm, iters: int):
  """Weighted Lloyd on sorted fine atoms in O(k log F) per iteration via prefix sums.

  Returns the centroids, whether each cluster is non-empty, and the boundaries
  ``b`` (``k - 1`` atom indices: cluster ``c`` holds atoms ``[b[c-1], b[c])``).
  """
  k = cent.shape[0]
  f = fw.shape[0]
  with jax.enable_x64(True):
    w = fw.astype(jnp.float64)
    ref = jnp.sum(w * fm.astype(jnp.float64)) / jnp.maximum(jnp.sum(w), 1e-300)
    zero = jnp.zeros((1,), jnp.float64)
    p0 = jnp.concatenate([zero, jnp.cumsum(w)])
    p1 = jnp.concatenate([zero, jnp.cumsum(w * (fm.astype(jnp.float64) - ref))])
    first = jnp.zeros((1,), jnp.int32)
    last = jnp.full((1,), f, jnp.int32)

    def stats(c):
      mid = 0.5 * (c[1:] + c[:-1])
      b = jnp.searchsorted(fm, mid.astype(fm.dtype), side="right").astype(jnp.int32)
      lo = jnp.concatenate([first, b])
      hi = jnp.concatenate([b, last])
      sw = p0[hi] - p0[lo]
      s1 = p1[hi] - p1[lo]
      return b, sw, s1

    def body(state):
      c, _, it = state
      _, sw, s1 = stats(c)
      new = jnp.where(sw > 0, ref + s1 / jnp.where(sw > 0, sw, 1.0), c.astype(jnp.float64))
      new = jnp.sort(new.astype(jnp.float32))
      return new, jnp.any(new != c), it + 1

    def cond(state):
      _, changed, it = state
      return changed & (it < iters)

    c, _, _ = jax.lax.while_loop(cond, body, (cent, jnp.bool_(True), jnp.int32(0)))
    b, sw, _ = stats(c)
    return c, sw > 0, b


def _init_1d(am, aw, k, init, key):
  """Initial centroids for Lloyd from sorted atoms."""
  nonempty = aw > 0
  big = jnp.finfo(jnp.float32).max
  lo = jnp.min(jnp.where(nonempty, am, big))
  hi = jnp.max(jnp.where(nonempty, am, -big))
  if init == "linear":
    return jnp.linspace(0.0, 1.0, k, dtype=jnp.float32) * (hi - lo) + lo
  cdf = jnp.cumsum(aw)
  cdf = cdf / jnp.maximum(cdf[-1], 1e-30)
  if init == "quantile":
    q = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
    pos = jnp.searchsorted(cdf, q)
    return jnp.sort(am[jnp.clip(pos, 0, am.shape[0] - 1)])
  # kmeans++ on the atoms
  first = am[jnp.clip(jnp.searchsorted(cdf, jax.random.uniform(key)), 0, am.shape[0] - 1)]
  cents = jnp.full((k,), first)
  d2 = aw * (am - first) ** 2

  def step(carry, sub):
    cents, d2, i = carry
    c = jnp.cumsum(d2) / jnp.maximum(jnp.sum(d2), 1e-30)
    j = jnp.clip(jnp.searchsorted(c, jax.random.uniform(sub)), 0, am.shape[0] - 1)
    new = am[j]
    cents = cents.at[i].set(new)
    d2 = jnp.minimum(d2, aw * (am - new) ** 2)
    return (cents, d2, i + 1), None

  (cents, _, _), _ = jax.lax.scan(step, (cents, d2, jnp.int32(1)),
                                  jax.random.split(key, k - 1))
  return jnp.sort(cents)


# --------------------------------------------------------------------------- 1-D

def hist_means(stats):
  """Fine-atom weights and means from histogram sums ``(2**bits, 2)`` (`hist_stats`)."""
  bits = stats.shape[0].bit_length() - 1
  cw, cs = stats[:, 0], stats[:, 1]
  return cw, fine_bin_low(bits) + jnp.where(cw > 0, cs / jnp.where(cw > 0, cw, 1.0), 0.0)


def atoms_from_fine(fw, fm, key, *, k, method, init, num_atoms):
  """Coarse atoms ``(aw, am)`` for the DP, or initial Lloyd centroids, from fine atoms.

  Returns ``(fw, fm, a, b)``: for ``method="dp"`` ``a, b`` are the coarse atoms' weights
  and means; otherwise ``a`` is the initial centroids and ``b`` is empty.
  """
  if method != "dp":
    return fw, fm, _init_1d(fm, fw, k, init, key), jnp.zeros((0,), jnp.float32)
  m = min(num_atoms, fw.shape[0])
  ids = _coarse_ids(fw, fm, m)
  aw = jax.ops.segment_sum(fw, ids, m, indices_are_sorted=True)
  lo = fm[0]
  off = jax.ops.segment_sum(fw * (fm - lo), ids, m, indices_are_sorted=True)
  am = lo + jnp.where(aw > 0, off / jnp.where(aw > 0, aw, 1.0), 0.0)
  return fw, fm, aw, am


def refine_steps(k: int, hist: bool) -> int:
  """Exact Lloyd steps on the raw values after the polish: one where bin granularity
  shows (histogrammed rows and large k)."""
  return 1 if hist and k >= 64 else 0


# --------------------------------------------------------------------------- short rows

SORT_THRESHOLD = 65536  # rows up to this length are sorted, longer rows histogrammed
DENSE_MAX_ATOMS = 256  # the dense (min-plus) DP up to this many atoms, divide and conquer above
SHORT_CHUNK_VALUES = 1 << 18  # values per compiled call of the short-row path
HIST_BLOCK = 1 << 18  # values per compiled call of the histogram path
WHOLE_ROW = 1 << 22  # longer rows are histogrammed and assigned in one call
REFINE_WIDTH = 8  # `_window_refine`: sorted values each side of a boundary
REFINE_ROUNDS = 3


def _dense_dp(aw, am, k: int):
  """Optimal k-clustering of ``M`` sorted weighted atoms: the full ``O(k M^2)`` DP.

  Written as dense min-plus products against one ``(M + 1, M + 1)`` cost matrix (built
  once in float64 from prefix sums, then float32), which vectorises far better on CPUs
  than a divide and conquer when ``M`` is small; the argmins are recovered by a backward
  pass over the stored layers (no argmin in the forward loop). Returns ``(centroids (k,)
  float32, used (k,) bool)`` as `_dp_centroids`.
  """
  m = aw.shape[0]
  with jax.enable_x64(True):
    ref, cw, c1, c2 = _centred_prefix_sums(aw, am)
    dw = cw[:, None] - cw[None, :]  # [j, i]: atoms [i, j)
    d1 = c1[:, None] - c1[None, :]
    d2 = c2[:, None] - c2[None, :]
    c = jnp.where(dw > 0, jnp.maximum(d2 - d1 * d1 / jnp.where(dw > 0, dw, 1.0), 0.0), 0.0)
    ii = jnp.arange(m + 1)
    cost = jnp.where(ii[None, :] <= ii[:, None], c, jnp.inf).astype(jnp.float32)

  def layer(d, _):
    return jnp.min(d[None, :] + cost, axis=1), d

  if k > 1:
    _, ds = jax.lax.scan(layer, cost[:, 0], None, length=k - 1)  # ds[l]: l + 1 clusters

    def back(j, d):
      i = jnp.argmin(d + cost[j]).astype(jnp.int32)
      return i, i

    _, starts = jax.lax.scan(back, jnp.int32(m), ds, reverse=True)
    lo = jnp.concatenate([jnp.zeros((1,), jnp.int32), starts])
    hi = jnp.concatenate([starts, jnp.array([m], jnp.int32)])
  else:
    lo = jnp.zeros((1,), jnp.int32)
    hi = jnp.array([m], jnp.int32)
  with jax.enable_x64(True):
    sw = cw[hi] - cw[lo]
    s1 = c1[hi] - c1[lo]
    cent = ref + s1 / jnp.where(sw > 0, sw, 1.0)
    return cent.astype(jnp.float32), sw > 0


def dp_centroids(aw, am, k: int):
  """Exact DP on sorted atoms (dense up to `DENSE_MAX_ATOMS`), empty clusters filled."""
  fn = _dense_dp if aw.shape[0] <= DENSE_MAX_ATOMS else _dp_centroids
  cent, used = fn(aw, am, k)
  return _fill_empty(cent, used)


def _first_index(mask, axis):
  """Index of the first True along ``axis`` (int32; argmin of float64 is avoided)."""
  n = mask.shape[axis]
  shape = [1] * mask.ndim
  shape[axis] = n
  idx = jnp.arange(n, dtype=jnp.int32).reshape(shape)
  return jnp.min(jnp.where(mask, idx, n), axis=axis)


def _window_refine(cent, fw, fm, *, width: int, rounds: int):
  """Moves the ``k - 1`` cluster boundaries to their best positions within ``width``
  sorted atoms of where they are, jointly (an exact DP over the windows), ``rounds``
  times. Starting from the DP on coarse atoms, whose boundaries are within a coarse
  atom of the optimum's, this recovers the optimum on most rows, at ``O(k width^2)``
  per round instead of the ``O(k F^2)`` of the full DP. It cannot reach a different
  configuration of clusters: on MiniLM channel rows at k=16, 5-8 % of rows stay up to
  1.02x above the optimum (see benchmarks/RESULTS.md).

  Returns sorted centroids ``(k,)`` float32 (empty clusters filled).
  """
  k = cent.shape[0]
  f = fw.shape[0]
  t = 2 * width + 1
  with jax.enable_x64(True):
    w = fw.astype(jnp.float64)
    x = fm.astype(jnp.float64)
    ref = jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1e-300)
    xc = x - ref
    zero = jnp.zeros((1,), jnp.float64)
    cw = jnp.concatenate([zero, jnp.cumsum(w)])
    c1 = jnp.concatenate([zero, jnp.cumsum(w * xc)])
    c2 = jnp.concatenate([zero, jnp.cumsum(w * xc * xc)])

    def cost(i, j):
      dw = cw[j] - cw[i]
      d1 = c1[j] - c1[i]
      c = jnp.maximum(c2[j] - c2[i] - d1 * d1 / jnp.where(dw > 0, dw, 1.0), 0.0)
      return jnp.where(i > j, jnp.inf, jnp.where(dw > 0, c, 0.0))

    def one_round(b, _):
      offs = jnp.arange(-width, width + 1, dtype=jnp.int32)
      cand = jnp.clip(b[:, None] + offs[None, :], 0, f)
      e0 = cost(jnp.zeros((t,), jnp.int32), cand[0])

      def step(e, pair):
        prev, cur = pair
        tot = e[:, None] + cost(prev[:, None], cur[None, :])  # (t_prev, t_cur)
        best = jnp.min(tot, axis=0)
        return best, _first_index(tot <= best[None, :], axis=0)

      e, args = jax.lax.scan(step, e0, (cand[:-1], cand[1:]))
      tot = e + cost(cand[-1], jnp.full((t,), f, jnp.int32))
      last = _first_index(tot <= jnp.min(tot), axis=0)

      def back(s, arg):  # s: choice at boundary i + 1 -> choice at boundary i
        return arg[s], arg[s]

      _, sel = jax.lax.scan(back, last, args, reverse=True)
      sel = jnp.concatenate([sel, last[None]])
      return jnp.take_along_axis(cand, sel[:, None], 1)[:, 0].astype(jnp.int32), None

    mid = 0.5 * (cent[1:] + cent[:-1])
    b = jnp.searchsorted(fm, mid.astype(fm.dtype), side="right").astype(jnp.int32)
    if k > 1:
      b, _ = jax.lax.scan(one_round, b, None, length=rounds)
    lo = jnp.concatenate([jnp.zeros((1,), jnp.int32), b])
    hi = jnp.concatenate([b, jnp.full((1,), f, jnp.int32)])
    sw = cw[hi] - cw[lo]
    s1 = c1[hi] - c1[lo]
    new = (ref + s1 / jnp.where(sw > 0, sw, 1.0)).astype(jnp.float32)
    used = sw > 0
  return jnp.sort(_fill_empty(new, used))


def _assign_small(cent, values):
  """Nearest centroid (ties to the lower one) by comparing with every midpoint (small k)."""
  k = cent.shape[0]
  if k > 64:
    return _assign_sorted(cent, values)
  mid = 0.5 * (cent[1:] + cent[:-1])
  return jnp.sum(values[:, None] > mid[None, :], axis=1, dtype=jnp.int32)


def _short_row(x, w, key, *, k, method, init, num_atoms, iters):
  """One short row: sort, coarse atoms, exact DP (or Lloyd init), polish, assign."""
  # Zero-weight values (padding, ragged groups) go last, at the largest real value, so
  # that index windows over the sorted values only ever span real values.
  _, xs, ws = jax.lax.sort(((w <= 0).astype(jnp.int32), x, w), num_keys=2)
  top = jnp.max(jnp.where(ws > 0, xs, -jnp.inf))
  xs = jnp.where((ws > 0) | ~jnp.isfinite(top), xs, top)
  if method == "dp":
    if num_atoms < x.shape[0]:
      _, _, aw, am = atoms_from_fine(ws, xs, key, k=k, method=method, init=init,
                                     num_atoms=num_atoms)
    else:
      aw, am = ws, xs
    cent = dp_centroids(aw, am, k)
  else:
    cent = _init_1d(xs, ws, k, init, key)
  if method == "dp" and num_atoms < x.shape[0]:
    cent = _window_refine(cent, ws, xs, width=REFINE_WIDTH, rounds=REFINE_ROUNDS)
  if iters:
    cent, used, _ = _lloyd_prefix(cent, ws, xs, iters)
    cent = jnp.sort(_fill_empty(cent, used))
  return cent, _assign_small(cent, x)


def _map_batch(num_atoms: int) -> int:
  """Rows per vectorised step of the short-row map: keeps the cost matrices in cache."""
  return max(1, min(64, 1 << ((1 << 17) // (num_atoms + 1) ** 2).bit_length() >> 1))


@functools.partial(jax.jit, static_argnames=("k", "method", "init", "num_atoms", "iters",
                                             "impl"))
def _short_chunk(x, w, key_data, *, k, method, init, num_atoms, iters, impl):
  fn = functools.partial(_short_row, k=k, method=method, init=init, num_atoms=num_atoms,
                         iters=iters)
  keys = jax.random.wrap_key_data(key_data, impl=impl)
  return jax.lax.map(lambda a: fn(*a), (x, w, keys), batch_size=_map_batch(num_atoms))


def row_bucket(n: int, sort_threshold: int = 65536) -> int:
  """Padded length of a short row (a power of two >= 16); long rows keep ``n``."""
  if n <= sort_threshold:
    return max(16, 1 << (n - 1).bit_length())
  return n


def _chunk_rows(g: int, size: int) -> int:
  """Rows per compiled call: ``SHORT_CHUNK_VALUES // size``, or fewer rows (a power of
  two) when there are fewer; so each (k, row bucket) compiles a handful of programs."""
  full = max(1, SHORT_CHUNK_VALUES // size)
  return full if g >= full else 1 << (g - 1).bit_length()


def _xp(*arrays):
  """numpy for concrete host-side work (no per-shape compilation), jnp under tracing."""
  return jnp if any(isinstance(a, jax.core.Tracer) for a in arrays) else np


def _short_rows(x, w, keys, *, k, method, init, num_atoms, iters):
  """Short rows ``(G, n)``: padded to a row bucket and run in fixed-size chunks."""
  xp = _xp(x, w)
  g, n = x.shape
  size = row_bucket(n)
  rows = _chunk_rows(g, size)
  gp = -(-g // rows) * rows
  x = xp.asarray(x, np.float32)
  w = xp.asarray(w, np.float32)
  impl = str(jax.random.key_impl(keys))
  kd = jax.random.key_data(keys)
  kd = kd if xp is jnp else np.asarray(kd)
  if size != n or gp != g:
    # Padding copies a real value of the row with zero weight; padded rows are dummies.
    x = xp.concatenate([x, xp.broadcast_to(x[:, :1], (g, size - n))], axis=1)
    x = xp.concatenate([x, xp.zeros((gp - g, size), np.float32)], axis=0)
    w = xp.pad(w, ((0, gp - g), (0, size - n)))
    kd = xp.concatenate([kd, xp.broadcast_to(kd[:1], (gp - g,) + kd.shape[1:])])
  cents, assigns = [], []
  for s in range(0, gp, rows):
    c, a = _short_chunk(x[s:s + rows], w[s:s + rows], kd[s:s + rows], k=k, method=method,
                        init=init, num_atoms=num_atoms, iters=iters, impl=impl)
    cents.append(c)
    assigns.append(a)
  cat = jnp.concatenate if xp is jnp else (lambda v: np.concatenate([np.asarray(a) for a in v]))
  cent = cat(cents) if len(cents) > 1 else cents[0]
  assign = cat(assigns) if len(assigns) > 1 else assigns[0]
  return cent[:g], assign[:g, :n]


# --------------------------------------------------------------------------- long rows


def hist_stats_blocks(x, w, bits: int, *, axis_name=None):
  """Fine-bin statistics of a long row, in `HIST_BLOCK`-sized compiled calls.

  With ``axis_name`` (inside ``shard_map``) the local sums are reduced over those mesh
  axes with ``psum``. Offsets are exact multiples of the bin's ulp, so the unweighted
  sums do not depend on the block or device split while a bin holds < 2**10 values.
  """
  if axis_name is not None or isinstance(x, jax.core.Tracer):
    xf = jnp.ravel(x).astype(jnp.float32)
    wf = jnp.ones_like(xf) if w is None else jnp.ravel(w).astype(jnp.float32)
    s = hist_stats(xf, wf, bits)
    return s if axis_name is None else jax.lax.psum(s, axis_name)
  xf = np.asarray(x, np.float32).reshape(-1)
  wf = np.ones_like(xf) if w is None else np.asarray(w, np.float32).reshape(-1)
  stats = None
  for xb, wb in _blocks(xf, wf):
    stats = _hist_acc(stats, xb, wb, bits=bits) if stats is not None else _hist_first(
        xb, wb, bits=bits)
  return stats


def _blocks(xf, wf):
  """Fixed `HIST_BLOCK`-sized blocks (the last one padded with zero weight); a row longer
  than `WHOLE_ROW` is one block (one compilation per such size costs less than the
  per-block dispatch and copies)."""
  n = xf.shape[0]
  if n > WHOLE_ROW:
    yield xf, wf
    return
  for s in range(0, n, HIST_BLOCK):
    xb, wb = xf[s:s + HIST_BLOCK], wf[s:s + HIST_BLOCK]
    if xb.shape[0] < HIST_BLOCK:
      pad = HIST_BLOCK - xb.shape[0]
      xb = np.concatenate([xb, np.zeros((pad,), np.float32)])
      wb = np.concatenate([wb, np.zeros((pad,), np.float32)])
    yield xb, wb


@functools.partial(jax.jit, static_argnames=("bits",))
def _hist_first(xb, wb, *, bits):
  return hist_stats(xb, wb, bits)


@functools.partial(jax.jit, static_argnames=("bits",))
def _hist_acc(acc, xb, wb, *, bits):
  return acc + hist_stats(xb, wb, bits)


@functools.partial(jax.jit, static_argnames=("k", "method", "init", "num_atoms", "iters"))
def centroids_from_hist(stats, key, *, k, method, init, num_atoms, iters):
  """Sorted centroids ``(k,)`` from a fine-bin histogram ``(2**bits, 2)``: coarse atoms,
  exact DP (or Lloyd init), Lloyd polish on the fine atoms. Compiled once per k."""
  fw, fm = hist_means(stats)
  _, _, a, b = atoms_from_fine(fw, fm, key, k=k, method=method, init=init,
                               num_atoms=num_atoms)
  cent = dp_centroids(a, b, k) if method == "dp" else a
  cent, used, _ = _lloyd_prefix(cent, fw, fm, iters)
  return jnp.sort(_fill_empty(cent, used))


def assign_refine(x, w, cent, *, refine: int, axis_name=None):
  """Nearest centroid of every value of ``x`` (any shape) and ``refine`` exact Lloyd
  steps on the raw values; the per-cluster sums are ``psum``-ed over ``axis_name``.
  Returns ``(assignments int32 like x, centroids)``."""
  k = cent.shape[0]
  xf = jnp.ravel(x).astype(jnp.float32)
  wf = jnp.ones_like(xf) if w is None else jnp.ravel(w).astype(jnp.float32)
  assign = _assign_binned(cent, xf)
  for _ in range(refine):
    stats = jax.ops.segment_sum(jnp.stack([wf, wf * (xf - cent[assign])], -1), assign, k)
    if axis_name is not None:
      stats = jax.lax.psum(stats, axis_name)
    sw, s1 = stats[:, 0], stats[:, 1]
    cent = jnp.sort(cent + jnp.where(sw > 0, s1 / jnp.where(sw > 0, sw, 1.0), 0.0))
    assign = _assign_binned(cent, xf)
  return assign.reshape(x.shape), cent


@functools.partial(jax.jit, static_argnames=("refine",))
def _assign_refine_jit(x, w, cent, *, refine):
  return assign_refine(x, w, cent, refine=refine)


def _long_row(x, w, key, *, k, method, init, num_atoms, iters):
  """One long row ``(n,)``: blocked histogram, DP on the histogram, assignment."""
  bits = fine_bits(k)
  stats = hist_stats_blocks(x, w, bits)
  cent = centroids_from_hist(stats, key, k=k, method=method, init=init, num_atoms=num_atoms,
                             iters=iters)
  refine = refine_steps(k, True)
  if isinstance(x, jax.core.Tracer) or refine:
    # Refinement needs the whole row (global per-cluster sums).
    assign, cent = _assign_refine_jit(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                      cent, refine=refine)
    return cent, assign
  xf = np.asarray(x, np.float32)
  out = [np.asarray(_assign_block(xb, cent)) for xb, _ in _blocks(xf, xf)]
  return cent, np.concatenate(out)[:xf.shape[0]]


@jax.jit
def _assign_block(xb, cent):
  return _assign_small(cent, xb) if cent.shape[0] <= 32 else _assign_binned(cent, xb)


def kmeans_1d_batch(x, w, keys, *, k, method="dp", init="linear", num_atoms=None,
                    polish_iters=1000, max_iters=300, sort_threshold=65536):
  """1-D k-means of each row of ``x`` ``(G, n)`` with weights ``w`` ``(G, n)``.

  Short rows (``n <= sort_threshold``) are padded to a row bucket (a power of two) and
  run in fixed-size chunks of rows, so a (k, bucket) pair compiles a handful of programs
  whatever the number of rows; long rows are histogrammed in fixed-size blocks and
  clustered on the histogram, compiled once per k. Concrete inputs are split on the host
  (numpy), traced inputs with jnp (the same compiled pieces).
  Returns sorted centroids ``(G, k)`` float32 and int32 assignments ``(G, n)``.
  """
  g, n = x.shape
  if _xp(x, w) is np:  # host-side slicing: no compilation per leaf shape
    x, w = np.asarray(x), np.asarray(w)
  if num_atoms is None:
    num_atoms = default_num_atoms(k, n, sort_threshold)
  if n <= sort_threshold:
    size = row_bucket(n, sort_threshold)
    m = int(min(num_atoms, size))
    if method == "dp":
      iters = 0 if size <= m else polish_iters  # every value its own atom: exact
    else:
      iters = max_iters
    return _short_rows(x, w, keys, k=k, method=method, init=init, num_atoms=m,
                       iters=int(iters))
  iters = polish_iters if method == "dp" else max_iters
  cents, assigns = [], []
  for r in range(g):
    c, a = _long_row(x[r], w[r], keys[r], k=k, method=method, init=init,
                     num_atoms=int(num_atoms), iters=int(iters))
    cents.append(c)
    assigns.append(a)
  xp = _xp(x, w, *cents, *assigns)
  return xp.stack(cents), xp.stack(assigns)


def default_num_atoms(k: int, n: int | None = None, sort_threshold: int = 65536) -> int:
  """Coarse atoms of the DP: ``min(4096, max(1024, 16k))`` for histogrammed rows and
  ``min(1024, max(128, 8k))`` for short (sorted) rows, where the DP runs once per channel
  or group and dominates the cost (dense DP up to 256 atoms, k <= 32)."""
  if n is not None and n <= sort_threshold:
    return min(1024, max(128, 8 * k))
  return min(4096, max(1024, 16 * k))


def _validate_k(k):
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f"k must be an int, got {k!r}")
  if not 2 <= k <= 256:
    raise ValueError(f"k must be in [2, 256], got {k=}")


# --------------------------------------------------------------------------- vector


def _sqdist(x, c):
  return (jnp.sum(x * x, -1, keepdims=True) - 2.0 * x @ c.T + jnp.sum(c * c, -1)[None, :])


def _vector_kmeans(x, w, key, *, k, init, max_iters, tol):
  n, d = x.shape
  del d
  cdf = jnp.cumsum(w) / jnp.maximum(jnp.sum(w), 1e-30)
  if init == "linear":  # points spread along the principal direction
    mean = jnp.sum(w[:, None] * x, 0) / jnp.maximum(jnp.sum(w), 1e-30)
    xc = x - mean[None, :]
    cov = (w[:, None] * xc).T @ xc
    _, vecs = jnp.linalg.eigh(cov)
    proj = xc @ vecs[:, -1]
    order = jnp.argsort(proj)
    q = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k
    cdf_sorted = jnp.cumsum(w[order]) / jnp.maximum(jnp.sum(w), 1e-30)
    pos = jnp.clip(jnp.searchsorted(cdf_sorted, q), 0, n - 1)
    cent = x[order[pos]]
  elif init == "quantile":
    pos = jnp.clip(jnp.searchsorted(cdf, jax.random.uniform(key, (k,))), 0, n - 1)
    cent = x[pos]
  else:  # kmeans++
    k0, key = jax.random.split(key)
    first = x[jnp.clip(jnp.searchsorted(cdf, jax.random.uniform(k0)), 0, n - 1)]
    cent = jnp.tile(first[None], (k, 1))
    d2 = w * jnp.sum((x - first[None, :]) ** 2, -1)

    def step(carry, sub):
      cent, d2, i = carry
      c = jnp.cumsum(d2) / jnp.maximum(jnp.sum(d2), 1e-30)
      j = jnp.clip(jnp.searchsorted(c, jax.random.uniform(sub)), 0, n - 1)
      cent = cent.at[i].set(x[j])
      d2 = jnp.minimum(d2, w * jnp.sum((x - x[j][None, :]) ** 2, -1))
      return (cent, d2, i + 1), None

    (cent, _, _), _ = jax.lax.scan(step, (cent, d2, jnp.int32(1)), jax.random.split(key, k - 1))

  def assign(c):
    return jnp.argmin(_sqdist(x, c), -1).astype(jnp.int32)

  def body(state):
    c, _, it, prev = state
    a = assign(c)
    sw = jax.ops.segment_sum(w, a, k)
    s = jax.ops.segment_sum(w[:, None] * x, a, k)
    new = jnp.where(sw[:, None] > 0, s / jnp.where(sw > 0, sw, 1.0)[:, None], c)
    inertia = jnp.sum(w * jnp.sum((x - c[a]) ** 2, -1))
    done = (prev - inertia) <= tol * jnp.maximum(inertia, 1e-30)
    return new, done, it + 1, inertia

  def cond(state):
    _, done, it, _ = state
    return (~done) & (it < max_iters)

  cent, _, _, _ = jax.lax.while_loop(
      cond, body, (cent, jnp.bool_(False), jnp.int32(0), jnp.float32(jnp.inf)))
  return cent, assign(cent)


@functools.partial(jax.jit, static_argnames=("k", "init", "max_iters", "tol"))
def _vector_kmeans_jit(x, w, key, *, k, init, max_iters, tol):
  return _vector_kmeans(x, w, key, k=k, init=init, max_iters=max_iters, tol=tol)


# --------------------------------------------------------------------------- public


@jax.jit
def _all_finite(x):
  return jnp.all(jnp.isfinite(x))


@jax.jit
def _inertia(x, w, cent, assign):
  d = x - cent[assign]
  d2 = d * d if x.ndim == 1 else jnp.sum(d * d, -1)
  return jnp.sum(w * d2)


def kmeans(x: jax.typing.ArrayLike, k: int, *, weights: jax.typing.ArrayLike | None = None,
           method: str = "dp", init: str = "linear", num_atoms: int | None = None,
           polish_iters: int = 1000, max_iters: int = 300, tol: float = 1e-6,
           sort_threshold: int = 65536, key: jax.Array | None = None) -> KMeansResult:
  """k-means clustering of 1-D values ``(n,)`` or vectors ``(n, d)``.

  1-D data (``x.ndim == 1``) uses the 1-D structure: a histogram (or sort, for small
  ``n``), an exact dynamic program on ``num_atoms`` adaptive atoms and a Lloyd polish
  (``method="dp"``, near-optimal, see the module docstring), or plain Lloyd from
  ``init`` (``method="lloyd"``). Vector data ``(n, d)`` uses Lloyd with ``init``
  (``"linear"``: spread along the principal axis, ``"quantile"``, ``"kmeans++"``) until
  the relative decrease of the objective is below ``tol`` or ``max_iters``.

  Pure and jit-compatible: ``jax.vmap(lambda v: qws_jax.kmeans(v, 16))(rows)`` clusters
  each row. Deterministic for a given input and ``key``.

  Args:
    x: float array ``(n,)`` or ``(n, d)``; computed in float32.
    k: number of clusters, 2..256.
    weights: optional non-negative per-point importances ``(n,)``; the objective becomes
      ``sum_i w_i * ||x_i - c_{a_i}||^2``.
    method: ``"dp"`` (1-D only; default) or ``"lloyd"``.
    init: Lloyd initialisation: ``"linear"``, ``"quantile"`` or ``"kmeans++"``.
    num_atoms: coarse atoms of the dynamic program (more: closer to exact, slower);
      default `default_num_atoms` (depends on k and n).
    polish_iters: Lloyd iterations after the dynamic program.
    max_iters: Lloyd iterations for ``method="lloyd"`` and vector k-means.
    tol: relative objective tolerance of vector k-means.
    sort_threshold: 1-D inputs up to this size are sorted instead of histogrammed.
    key: PRNG key for ``"kmeans++"`` / ``"quantile"`` vector init (keyword-only).

  Returns:
    A `KMeansResult` ``(centroids, assignments, inertia)``.

  Raises:
    ValueError: bad ``k``, ``method``, ``init``, shapes, or non-finite values.
    TypeError: non-floating ``x``.

  Example:
    >>> import jax, qws_jax
    >>> x = jax.random.normal(jax.random.key(0), (10_000,))
    >>> res = qws_jax.kmeans(x, 16)
    >>> res.centroids.shape, res.assignments.shape
    ((16,), (10000,))
  """
  _validate_k(k)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"kmeans needs floating data, got dtype {x.dtype}")
  if x.ndim not in (1, 2) or x.shape[0] == 0:
    raise ValueError(f"kmeans needs a non-empty (n,) or (n, d) array, got shape {x.shape}")
  if not isinstance(x, jax.core.Tracer) and not bool(_all_finite(x)):
    raise ValueError("kmeans input has NaN or Inf values")
  xf = x.astype(jnp.float32)
  n = x.shape[0]
  if weights is None:
    w = jnp.ones((n,), jnp.float32)
  else:
    w = jnp.asarray(weights).astype(jnp.float32)
    if w.shape != (n,):
      raise ValueError(f"weights must have shape ({n},), got {w.shape}")
  if key is None:
    key = jax.random.key(0)
  if x.ndim == 1:
    cent, assign = kmeans_1d_batch(
        xf[None], w[None], key[None], k=k, method=method, init=init, num_atoms=num_atoms,
        polish_iters=polish_iters, max_iters=max_iters, sort_threshold=sort_threshold)
    cent, assign = cent[0], assign[0]
    inertia = _inertia(xf, w, cent, assign)
  else:
    cent, assign = _vector_kmeans_jit(xf, w, key, k=k, init=init, max_iters=int(max_iters),
                                      tol=float(tol))
    inertia = _inertia(xf, w, cent, assign)
  return KMeansResult(cent, assign, inertia)
