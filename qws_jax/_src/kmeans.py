"""jit-compiled k-means: exact-quality 1-D clustering and vector k-means.

1-D algorithm (``method="dp"``, the default), all static shapes, see docs/design.md:

* **Short rows** (``n <= sort_threshold``: channels, groups, small tensors) are padded
  to a row bucket (`row_bucket`: powers of two and 1.5 times them), sorted (on the
  host for concrete inputs, `lax.sort` under tracing: the same order) and run in
  fixed-size chunks of rows (one compiled program per (k, bucket, chunk)). Per row:
  atoms (every value when the row has at most ``num_atoms`` values, else contiguous
  atoms of equal mass under ``p(x)**(1/3)``);
  the exact DP on the atoms (`band_dp`: a banded min-plus DP whose band is certified
  per row, see below); when atoms were merged, a windowed boundary DP on the values
  (`_window_refine`); nearest-centroid assignment.
* **Long rows** are histogrammed (top 16 / 18 bits of an order-preserving uint32 image
  of the float32 value) in fixed blocks; coarse atoms, the same banded exact DP and a
  Lloyd polish run on the histogram (`centroids_from_hist`, compiled once per k); then
  assignment (a per-bin table and one comparison per value) and, for k >= 64, one
  exact Lloyd step on the raw values.

**The banded DP.** ``D_m[j] = min_i D_{m-1}[i] + C(i, j)`` over sorted atoms, but only
for clusters of at most ``band`` atoms, as dense min-plus products over one float32 cost
table per row (from float64 prefix sums) reused by the ``k - 1`` layers: stored by
cluster length for narrow bands (one elementwise minimum per layer), by blocks of
`BLOCK` cluster ends otherwise (`band_layers`). The band is a certificate, not a
heuristic: a cluster longer than ``band`` atoms costs at least the cheapest run of
``band + 1`` atoms (adding points never lowers a cluster's SSE), so when that is at
least the banded optimum no better clustering can contain one and the banded result is
the exact optimum (`band_dp` has a slightly sharper form). Rows that fail the check are
re-run with a four times wider band (a per-row `lax.cond`, skipped when every row of a
chunk passes).

The stages that see the data (`hist_stats_blocks`, `assign_refine`) take an optional
``axis_name`` and ``psum`` their statistics, so the sharded layer runs the same code
under ``shard_map``. Rows of up to ``num_atoms`` values get the exact optimum (float32
rounding aside); longer rows are within ``1.001x`` of it in our benchmarks
(``benchmarks/RESULTS.md``), including heavy-tailed transformer weights, where Lloyd
from any init stalls at 1.04-1.14x.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def fine_bits(k: int) -> int:
  """Key bits of the fine histogram: 2**16 bins (7 mantissa bits) up to k=32, 2**18
  (9 mantissa bits) above, where clusters are narrower. (2**18 at k=32 would take a
  spike-plus-broad mixture from 1.002x to 1.0002x of the optimal MSE, at twice the fixed
  cost per row: docs/design.md, k-means.)"""
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


def _segment_sum(v, ids, num: int):
  """``segment_sum`` of a vector into ``num`` segments whose ids are in range."""
  return jax.ops.segment_sum(v, ids, num, mode="promise_in_bounds")


def hist_stats(x, w, bits: int) -> jax.Array:
  """Histogram sums ``(2**bits, 2)``: per bin ``sum w`` and ``sum w * (x - bin_low)``
  (``w=None``: unit weights, not materialised)."""
  bins = fine_bins(x, bits)
  off = x - fine_bin_low(bits)[bins]
  num = 1 << bits
  if w is None:
    return jnp.stack([_segment_sum(jnp.ones_like(x), bins, num), _segment_sum(off, bins, num)],
                     -1)
  return jnp.stack([_segment_sum(w, bins, num), _segment_sum(w * off, bins, num)], -1)


# --------------------------------------------------------------------------- atoms


def _gap_mass(w, gap, valid):
  """Mass of each sorted point under the cube-root law (``p**(1/3) dx``), with the
  empirical density ``w / gap`` (``gap``: half the distance between its neighbours).

  Atoms of equal mass are spaced like the levels of an optimal high-resolution
  quantizer, so every cluster of the optimum spans about the same number of atoms.
  Zero for invalid points; a point with no gap (duplicates) gets a tiny mass.
  """
  gap = jnp.where(valid, jnp.maximum(gap, 0.0), 0.0)
  g = gap / jnp.maximum(jnp.max(gap), 1e-30)
  w = jnp.where(valid, w, 0.0)
  wn = jnp.cbrt(w / jnp.maximum(jnp.sum(w), 1e-30))
  return jnp.where(valid, jnp.where(g > 0, wn * jnp.cbrt(g * g), wn * 1e-6), 0.0)


def _cbrt_mass(w, x, nonempty):
  """`_gap_mass` of sorted points some of which are empty (histogram bins): the gaps are
  to the previous and next non-empty points (one-sided at the ends)."""
  n = w.shape[0]
  idx = jnp.arange(n, dtype=jnp.int32)
  prev = jax.lax.cummax(jnp.where(nonempty, idx, -1))
  nxt = jax.lax.cummin(jnp.where(nonempty, idx, n), reverse=True)
  prev_other = jnp.concatenate([jnp.full((1,), -1, jnp.int32), prev[:-1]])
  next_other = jnp.concatenate([nxt[1:], jnp.full((1,), n, jnp.int32)])
  x_prev = jnp.where(prev_other >= 0, x[jnp.clip(prev_other, 0, n - 1)], x)
  x_next = jnp.where(next_other < n, x[jnp.clip(next_other, 0, n - 1)], x)
  gap = jnp.where((prev_other >= 0) & (next_other < n), 0.5 * (x_next - x_prev),
                  (x_next - x) + (x - x_prev))
  return _gap_mass(w, gap, nonempty)


def _atom_ids(mass, m: int):
  """Atom (0..m-1, non-decreasing) of each point: contiguous atoms of equal mass.

  No point holds more than one atom's worth of mass (the mass of isolated points,
  whose gaps are large, is capped), so no atom is left empty by a heavy point.
  """
  for _ in range(3):
    mass = jnp.minimum(mass, jnp.sum(mass) / m)
  cum = jnp.cumsum(mass)
  total = jnp.maximum(cum[-1], 1e-30)
  return jnp.clip(jnp.floor((cum - 0.5 * mass) / total * m).astype(jnp.int32), 0, m - 1)


def _edges_from_ids(ids, valid, m: int):
  """``(m + 1,)`` edges: atom ``a`` holds the points ``[e[a], e[a + 1])``; the invalid
  points (at the end) are after the last edge."""
  ids = jnp.where(valid, ids, m)
  counts = _segment_sum(jnp.ones(ids.shape, jnp.int32), ids, m + 1)[:m]
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])


def row_atoms(ws, xs, m: int):
  """Atom edges ``(m + 1,)`` of a sorted row whose zero-weight points are at the end:
  every point its own atom when there are at most ``m``, else ``m`` cube-root atoms.
  ``e[m]`` is the number of points with weight."""
  n = xs.shape[0]
  real = ws > 0
  nreal = jnp.sum(real, dtype=jnp.int32)
  if n <= m:
    return jnp.minimum(jnp.arange(m + 1, dtype=jnp.int32), nreal)
  # The points with weight are the first nreal: their neighbours are adjacent.
  idx = jnp.arange(n, dtype=jnp.int32)
  x_prev = jnp.concatenate([xs[:1], xs[:-1]])
  x_next = jnp.concatenate([xs[1:], xs[-1:]])
  gap = jnp.where(idx == 0, x_next - xs,
                  jnp.where(idx == nreal - 1, xs - x_prev, 0.5 * (x_next - x_prev)))
  by_mass = _atom_ids(_gap_mass(ws, gap, real), m)
  ids = jnp.where(nreal <= m, jnp.minimum(idx, m - 1), by_mass)
  return _edges_from_ids(ids, real, m)


# --------------------------------------------------------------------------- exact DP

BLOCK = 16  # columns per block of the banded DP
BAND_SPANS_ATOMS = 1.5  # `band_width`: mean cluster spans per k**(1/3), cube-root atoms
BAND_SPANS_VALUES = 1.75  # ... every value an atom (or nearly: rows up to twice num_atoms)
BAND_SPANS_HIST = 2.0  # ... atoms of a histogram (one DP per leaf: a wider band is cheap)


def band_width(k: int, m: int, value_atoms: bool = False, hist: bool = False) -> int:
  """Longest cluster, in atoms, that the banded DP considers (a multiple of `BLOCK`).

  About ``c * k**(1/3)`` mean cluster spans (``m / k`` atoms), where a run that long
  costs several times the whole optimum (a run of ``c`` mean spans costs about ``c**3``
  times a typical cluster, and the optimum about ``k`` times one), so the certificate
  in `band_dp` passes on almost every row. Every value an atom (short rows): the dense
  centre of a row holds longer clusters, hence the larger ``c``; histogram atoms of
  flat (uniform or truncated-normal initialised) weights need ``c = 2`` (at 1.5 the
  certificate failed on most kernels of a freshly initialised LM1B model).
  """
  c = BAND_SPANS_HIST if hist else BAND_SPANS_VALUES if value_atoms else BAND_SPANS_ATOMS
  band = math.ceil(c * k ** (1.0 / 3.0) * m / k / BLOCK) * BLOCK
  return int(min(max(band, BLOCK), m))


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


def _cost(p, i, j):
  """SSE of the points ``[i, j)`` from prefix sums ``p = (cw, c1, c2)`` (float64)."""
  cw, c1, c2 = p
  dw = cw[j] - cw[i]
  d1 = c1[j] - c1[i]
  c = c2[j] - c2[i] - d1 * d1 / jnp.where(dw > 0, dw, 1.0)
  return jnp.where(dw > 0, jnp.maximum(c, 0.0), 0.0)


def _band_costs(p, band: int):
  """float32 costs ``(nb, BLOCK + band, BLOCK)`` of the banded DP.

  Block ``c`` holds the cluster ends ``j = c*BLOCK + 1 + s`` and the starts
  ``i = c*BLOCK + 1 - band + t``; entries outside ``0 <= j - i <= band``, ``i >= 0`` are
  ``inf``. Computed in float64 from the prefix sums; the prefix values of every block
  are gathered first (a static gather, so XLA materialises them once instead of
  recomputing them per entry).
  """
  m = p[0].shape[0] - 1
  nb, width = m // BLOCK, BLOCK + band
  starts = np.arange(nb)[:, None] * BLOCK + 1 - band + np.arange(width)[None, :]
  ends = np.arange(nb)[:, None] * BLOCK + 1 + np.arange(BLOCK)[None, :]
  arr = jnp.stack(p)
  # reversed index order: not an identity gather, which XLA would fold into the consumer
  pi = jnp.take(arr, np.clip(starts, 0, m)[:, ::-1], axis=1)[:, :, ::-1]
  pj = jnp.take(arr, ends, axis=1)
  dw = pj[0][:, None, :] - pi[0][:, :, None]
  d1 = pj[1][:, None, :] - pi[1][:, :, None]
  d2 = pj[2][:, None, :] - pi[2][:, :, None]
  c = jnp.where(dw > 0, jnp.maximum(d2 - d1 * d1 / jnp.where(dw > 0, dw, 1.0), 0.0), 0.0)
  t = np.arange(width)[:, None]
  s = np.arange(BLOCK)[None, :]
  valid = ((t >= s) & (t <= band + s))[None] & (starts >= 0)[:, :, None]
  return jnp.where(valid, c.astype(jnp.float32), jnp.inf)


def _windows(q, nb: int, width: int):
  """``(nb, width)`` overlapping windows ``q[c*BLOCK : c*BLOCK + width]`` (one static
  gather: compiles about 0.2 s faster than concatenated slices; as fast on short rows,
  15 % slower on 4,096 atoms at k=256)."""
  return jnp.take(q, np.arange(nb)[:, None] * BLOCK + np.arange(width)[None, :])


def _tree_min(terms):
  """Elementwise minimum of equal-shape arrays as a balanced tree (one loop fusion)."""
  while len(terms) > 1:
    terms = [jnp.minimum(*terms[a:a + 2]) if a + 1 < len(terms) else terms[a]
             for a in range(0, len(terms), 2)]
  return terms[0]


def _diagonal_costs(p, band: int):
  """float32 costs ``(band + 1, m + 1)`` by cluster length: entry ``(o, j)`` is the cost
  of the cluster ``[j - o, j)`` (``inf`` where ``j < o``), computed in float64 with the
  arithmetic of `_band_costs`. The shifted prefix sums ``p[j - o]`` are a static
  tile-and-reshape of ``p`` (row ``r`` of a tiled vector reshaped to one less than its
  period is the vector shifted by ``r``), which XLA fuses without a gather."""
  arr = jnp.stack(p)
  m = arr.shape[1] - 1
  q = jnp.concatenate([jnp.zeros((3, band), arr.dtype), arr, jnp.zeros((3, 1), arr.dtype)], 1)
  period = q.shape[1]
  pi = jnp.tile(q, (1, band + 1))[:, :(band + 1) * (period - 1)]
  pi = pi.reshape(3, band + 1, period - 1)[:, :, band:band + m + 1]  # pi[:, o, j] = p[j - o]
  pj = arr[:, None, :]
  dw, d1, d2 = pj[0] - pi[0], pj[1] - pi[1], pj[2] - pi[2]
  c = jnp.where(dw > 0, jnp.maximum(d2 - d1 * d1 / jnp.where(dw > 0, dw, 1.0), 0.0), 0.0)
  o, j = np.arange(band + 1)[:, None], np.arange(m + 1)[None, :]
  return jnp.where(j >= o, c.astype(jnp.float32), jnp.inf)


DIAGONAL_MAX_BAND = 128  # `band_dp`: diagonal layout up to this band (faster there), else blocks
DIAGONAL_MAX_ATOMS = 1024


def band_dp(p, k: int, band: int):
  """Optimal clustering of ``m`` sorted atoms into ``k`` contiguous clusters of at most
  ``band`` atoms each, from float64 prefix sums ``p = (cw, c1, c2)`` (``m + 1`` each;
  ``m`` and ``band`` multiples of `BLOCK`).

  Returns ``(starts, cost, exact)``: ``starts`` ``(k - 1,)`` int32, where cluster
  ``l + 1`` begins (clusters may be empty); the float32 cost; and whether the band is
  certified (no clustering with a longer cluster can cost less), in which case this is
  the unrestricted optimum. Costs about ``(k - 1) * m * band`` additions
  (`band_layers`), then `band_finish`. Call under ``jax.enable_x64``.
  """
  return band_finish(p, band_layers(p, k, band), k, band)


def band_layers(p, k: int, band: int):
  """The layers ``D_1 .. D_{k-1}`` ``(k - 1, m + 1)`` float32 of the banded DP: ``D_l[j]``
  is the least cost of the first ``j`` atoms in at most ``l`` clusters of at most
  ``band`` atoms (``(1, m + 1)`` for ``k = 1``).

  Two layouts of the same computation (identical results): for narrow bands on few
  atoms (short rows) the costs are stored by cluster length and each layer is one
  elementwise minimum over the ``band + 1`` shifted rows; otherwise they are stored in
  blocks of `BLOCK` cluster ends (`_band_costs`), whose layers stay cache-sized.
  """
  m = p[0].shape[0] - 1
  if m % BLOCK or band % BLOCK or not 0 < band <= m:
    raise ValueError(f"band_dp needs m ({m}) and band ({band}) multiples of {BLOCK}, "
                     "0 < band <= m")
  j = np.arange(m + 1)
  first = jnp.where(j <= band, _cost(p, np.zeros_like(j), j).astype(jnp.float32), jnp.inf)
  if k <= 2:
    return first[None]
  if band <= DIAGONAL_MAX_BAND and m <= DIAGONAL_MAX_ATOMS:
    table = _diagonal_costs(p, band)
    pad = jnp.full((band,), jnp.inf, jnp.float32)

    def layer(d):  # D_l[j] = min_o D_{l-1}[j - o] + C(j - o, j)
      q = jnp.concatenate([pad, d])
      return _tree_min([q[band - o:band - o + m + 1] + table[o] for o in range(band + 1)])
  else:
    nb, width = m // BLOCK, BLOCK + band
    table = _band_costs(p, band)
    pad = jnp.full((band - 1,), jnp.inf, jnp.float32)
    zero = jnp.zeros((1,), jnp.float32)

    def layer(d):
      q = jnp.concatenate([pad, d])
      new = jnp.min(_windows(q, nb, width)[:, :, None] + table, axis=1).reshape(-1)
      return jnp.concatenate([zero, new])

  d, ds = jax.lax.scan(lambda d, _: (layer(d), d), first, None, length=k - 2)
  return jnp.concatenate([ds, d[None]])  # D_1 .. D_{k-1}


def band_finish(p, ds, k: int, band: int):
  """`band_dp` from its layers ``ds`` (`band_layers`): the backtracking (costs of the
  ``band + 1`` candidate starts of each boundary, from the prefix sums) and the band
  certificate. Cheap: run it on many rows at once, outside the batched layers."""
  m = p[0].shape[0] - 1
  pad = jnp.full((band,), jnp.inf, jnp.float32)
  t = jnp.arange(band + 1, dtype=jnp.int32)

  def best_start(end, d):
    """argmin_i D[i] + C(i, end) over the band (first index), and the minimum."""
    i = end - band + t
    c = _cost(p, jnp.clip(i, 0, m), end).astype(jnp.float32)
    vals = jax.lax.dynamic_slice(jnp.concatenate([pad, d]), (end,), (band + 1,))
    vals = vals + jnp.where(i >= 0, c, jnp.inf)
    low = jnp.min(vals)
    return jnp.where(end > 0, end - band + _first_index(vals <= low, axis=0), 0), low

  if k == 1:
    cost, starts = ds[0][m], jnp.zeros((0,), jnp.int32)
  else:
    cost = best_start(jnp.int32(m), ds[-1])[1]

    def back(end, d):
      start = best_start(end, d)[0].astype(jnp.int32)
      return start, start

    _, starts = jax.lax.scan(back, jnp.int32(m), ds, reverse=True)
  if band >= m:
    return starts, cost, jnp.bool_(True)
  # The certificate: no clustering with a cluster longer than `band` costs less than
  # ub = cost (1 + 1e-5). Such a clustering has a long cluster [a, b), b > a + band; it
  # costs at least E[a] + C(a, b) >= E[a] + run[a], with run[a] = C(a, a + band + 1) and
  # E[a] the optimum of [0, a) in at most k - 1 clusters. E[a] >= min(D[a], R[a]), where
  # D = D_{k-1} of the banded DP and R[a] the cheapest run inside [0, a) (if that optimum
  # is not banded, it holds a long cluster, which costs at least its run); and E is
  # non-decreasing in a, so its running maximum L is a bound too. Certified when
  # min_a L[a] + run[a] >= ub.
  ub = cost.astype(jnp.float64) * (1 + 1e-5)
  i = np.arange(m - band)
  runs = _cost(p, i, i + band + 1)
  inside = jnp.concatenate([jnp.full((band + 1,), jnp.inf, jnp.float64),
                            jax.lax.cummin(runs)])[:m + 1]
  low = jax.lax.cummax(jnp.minimum(ds[-1].astype(jnp.float64), inside))
  ok = jnp.min(low[:m - band] + runs) >= ub
  return starts, cost, ok


def _cluster_means(p, ref, lo, hi):
  """float32 means of the clusters ``[lo, hi)`` and whether each is non-empty."""
  cw, c1, _ = p
  sw = cw[hi] - cw[lo]
  s1 = c1[hi] - c1[lo]
  return (ref + s1 / jnp.where(sw > 0, sw, 1.0)).astype(jnp.float32), sw > 0


def _bounds(b, n):
  """``(lo, hi)`` of the clusters whose interior boundaries are ``b``, over ``[0, n)``."""
  lo = jnp.concatenate([jnp.zeros((1,), jnp.int32), b])
  hi = jnp.concatenate([b, jnp.reshape(n, (1,)).astype(jnp.int32)])
  return lo, hi


def dp_centroids(aw, am, k: int, wide: bool = False):
  """Exact DP on ``m`` sorted weighted atoms (weights ``aw``, means ``am``) with the band
  of `band_width` (four times it when ``wide``). Returns sorted centroids ``(k,)``
  float32 (empty clusters filled) and whether the band is certified."""
  m0 = aw.shape[0]
  m = -(-m0 // BLOCK) * BLOCK
  aw = jnp.pad(aw, (0, m - m0))
  am = jnp.pad(am, (0, m - m0), mode="edge")
  band = band_width(k, m, hist=True)
  band = min(m, 4 * band) if wide else band
  with jax.enable_x64(True):
    ref, cw, c1, c2 = _centred_prefix_sums(aw, am)
    p = (cw, c1, c2)
    starts, _, ok = band_dp(p, k, band)
    cent, used = _cluster_means(p, ref, *_bounds(starts, m))
  return jnp.sort(_fill_empty(cent, used)), ok


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
  lie in that cluster or a later one. When no bin holds two midpoints (clusters wider
  than bins, the usual case) one comparison with the bin's midpoint (if any) settles it,
  a single pass; otherwise values step forward while they are past the next midpoint.
  Same result as `_assign_sorted` (ties go to the lower centroid).
  """
  k = cent.shape[0]
  bits = fine_bits(k)
  bins = fine_bins(x, bits)
  low = _bin_low(jnp.arange(1 << bits, dtype=jnp.int32), bits)
  table = _assign_sorted(cent, low)
  mid = jnp.concatenate([0.5 * (cent[1:] + cent[:-1]), jnp.full((1,), jnp.inf, cent.dtype)])
  # midpoints inside each bin: between its low edge and the next bin's
  inside = jnp.concatenate([table[1:], jnp.full((1,), k - 1, jnp.int32)]) - table
  thr = jnp.where(inside > 0, mid[table], jnp.inf)

  def one_step():
    return table[bins] + (x > thr[bins]).astype(jnp.int32)

  def stepping():
    def cond(state):
      return state[1]

    def body(state):
      c, _ = state
      step = (x > mid[c]).astype(jnp.int32)
      return c + step, jnp.any(step > 0)

    c, _ = jax.lax.while_loop(cond, body, (table[bins], jnp.bool_(True)))
    return jnp.minimum(c, k - 1)

  return jax.lax.cond(jnp.max(inside) <= 1, one_step, stepping)


def _assign_small(cent, values):
  """Nearest centroid (ties to the lower one) by comparing with every midpoint (small k)."""
  k = cent.shape[0]
  if k > 64:
    return _assign_sorted(cent, values)
  mid = 0.5 * (cent[1:] + cent[:-1])
  return jnp.sum(values[:, None] > mid[None, :], axis=1, dtype=jnp.int32)


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
  and means (cube-root atoms, or every non-empty fine atom when there are at most
  ``num_atoms``); otherwise ``a`` is the initial centroids and ``b`` is empty.
  """
  if method != "dp":
    return fw, fm, _init_1d(fm, fw, k, init, key), jnp.zeros((0,), jnp.float32)
  m = min(num_atoms, fw.shape[0])
  nonempty = fw > 0
  rank = jnp.cumsum(nonempty.astype(jnp.int32)) - 1
  by_rank = jnp.clip(rank, 0, m - 1)
  by_mass = _atom_ids(_cbrt_mass(fw, fm, nonempty), m)
  ids = jnp.where(rank[-1] + 1 <= m, by_rank, by_mass)
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
SHORT_CHUNK_VALUES = 1 << 18  # values per compiled call of the short-row path
HIST_BLOCK = 1 << 18  # values per compiled call of the histogram path
WHOLE_ROW = 1 << 22  # longer rows are histogrammed and assigned in one call
REFINE_WIDTH = 8  # `_window_refine`: sorted values each side of a boundary
REFINE_WIDTH_VALUES = 4  # ... when nearly every value is an atom (rows up to 2 num_atoms)
REFINE_ROUNDS = 1
MAP_BYTES = 1 << 22  # working set of one vectorised step of the short-row map
SHORT_MIN_ATOMS = 320  # default atoms of a short row: max(320, 20k), at most 4096
SHORT_ATOMS_PER_CLUSTER = 20


def _first_index(mask, axis):
  """Index of the first True along ``axis`` (int32; argmin of float64 is avoided)."""
  n = mask.shape[axis]
  shape = [1] * mask.ndim
  shape[axis] = n
  idx = jnp.arange(n, dtype=jnp.int32).reshape(shape)
  return jnp.min(jnp.where(mask, idx, n), axis=axis)


def _window_refine(b, p, n, *, width: int, rounds: int):
  """Moves the ``k - 1`` cluster boundaries ``b`` (positions in the sorted values, whose
  float64 prefix sums are ``p``; ``n`` values) to their best positions within ``width``
  values of where they are, jointly (an exact DP over the windows), ``rounds`` times.

  After the exact DP on merged atoms, each boundary of the atoms' optimum is within an
  atom of a boundary of a near-optimal clustering of the values; this finds it.
  """
  k1 = b.shape[0]
  if k1 == 0:
    return b
  t = 2 * width + 1
  offs = jnp.arange(-width, width + 1, dtype=jnp.int32)
  arr = jnp.stack(p)

  def one_round(b, _):
    cand = jnp.clip(b[:, None] + offs[None, :], 0, n)  # (k - 1, t), sorted along t
    pc = jnp.take(arr, cand, axis=1)  # (3, k - 1, t): prefix sums at the candidates

    def cost(pi, pj, i, j):  # pi, pj: (3, a), (3, b) -> (a, b)
      dw = pj[0][None, :] - pi[0][:, None]
      d1 = pj[1][None, :] - pi[1][:, None]
      c = pj[2][None, :] - pi[2][:, None] - d1 * d1 / jnp.where(dw > 0, dw, 1.0)
      c = jnp.where(dw > 0, jnp.maximum(c, 0.0), 0.0)
      return jnp.where(i[:, None] > j[None, :], jnp.inf, c)

    zero = jnp.zeros((1,), jnp.int32)
    e0 = cost(jnp.take(arr, zero, axis=1), pc[:, 0], zero, cand[0])[0]

    def step(e, s):
      pi, pj, ci, cj = s
      tot = e[:, None] + cost(pi, pj, ci, cj)
      best = jnp.min(tot, axis=0)
      return best, _first_index(tot <= best[None, :], axis=0)

    pcs = jnp.moveaxis(pc, 1, 0)  # (k - 1, 3, t)
    e, args = jax.lax.scan(step, e0, (pcs[:-1], pcs[1:], cand[:-1], cand[1:]))
    end = jnp.reshape(n, (1,)).astype(jnp.int32)
    tot = e + cost(pc[:, -1], jnp.take(arr, end, axis=1), cand[-1], end)[:, 0]
    last = _first_index(tot <= jnp.min(tot), axis=0)

    def back(s, arg):  # s: choice at boundary i + 1 -> choice at boundary i
      return arg[s], arg[s]

    _, sel = jax.lax.scan(back, last, args, reverse=True)
    sel = jnp.concatenate([sel, last[None]])
    return jnp.take_along_axis(cand, sel[:, None], 1)[:, 0].astype(jnp.int32), None

  b, _ = jax.lax.scan(one_round, b, None, length=rounds)
  return b


def _top_fill(xs, ws):
  """Zero-weight points (padding, ragged groups) sit last: move them to the largest real
  value, so that index windows over the sorted values only ever span real values."""
  real = ws > 0
  top = jnp.max(jnp.where(real, xs, -jnp.inf))
  return jnp.where(real | ~jnp.isfinite(top), xs, top)


def _short_lloyd(xs, ws, x, key, *, k, init, iters):
  """One short row with ``method="lloyd"``: init, Lloyd on the sorted values, assign."""
  xs = _top_fill(xs, ws)
  cent = _init_1d(xs, ws, k, init, key)
  cent, used, _ = _lloyd_prefix(cent, ws, xs, iters)
  cent = jnp.sort(_fill_empty(cent, used))
  return cent, _assign_small(cent, x)


def _short_atoms(xs, ws, *, m):
  """Atoms of one sorted short row: their float64 prefix sums ``(3, m + 1)``, their edges
  and the prefix sums of the values ``(ref, cw, c1, c2)`` (for `_short_finish`)."""
  xs = _top_fill(xs, ws)
  pref = _centred_prefix_sums(ws, xs)
  _, cw, c1, c2 = pref
  e = row_atoms(ws, xs, m)
  return jnp.stack([cw[e], c1[e], c2[e]]), e, pref


def _short_finish(x, e, starts, pref, *, m):
  """Boundaries of the atoms' optimum (``starts``) to centroids and assignments: when
  atoms were merged, first the best boundaries among the values near them (within
  `REFINE_WIDTH`, or `REFINE_WIDTH_VALUES` when atoms hold one or two values: still
  within 1.00058x of the optimum on every 384-value MiniLM channel row at k = 4, 8, 16)."""
  ref, cw, c1, c2 = pref
  p = (cw, c1, c2)
  n = cw.shape[0] - 1
  b = e[starts]
  if n > m:
    width = REFINE_WIDTH_VALUES if n <= 2 * m else REFINE_WIDTH
    b = _window_refine(b, p, e[m], width=width, rounds=REFINE_ROUNDS)
  cent, used = _cluster_means(p, ref, *_bounds(b, e[m]))
  cent = _fill_empty(cent, used)  # sorted: means of consecutive runs
  return cent, _assign_small(cent, x)


def _map_batch(k: int, m: int, band: int) -> int:
  """Rows per vectorised step of the DP map: keeps the DP tables in cache."""
  per_row = 4 * m * (band + BLOCK) + 4 * k * (m + 1)
  return max(1, min(256, 1 << (max(1, MAP_BYTES // per_row).bit_length() - 1)))


@functools.partial(jax.jit, static_argnames=("k", "method", "init", "num_atoms", "iters",
                                             "impl"))
def _short_chunk(xs, ws, x, key_data, *, k, method, init, num_atoms, iters, impl):
  """A chunk of short rows, sorted (`_sort_rows`; ``x``: the values in their original
  order): centroids ``(rows, k)`` and assignments.

  ``method="dp"``: atoms and the finishing steps are vectorised over the whole chunk, the
  banded DP runs in small batches (its tables stay in cache); rows whose band is not
  certified are re-run one by one with a four times wider band (skipped when every row
  of the chunk passes).
  """
  if method != "dp":
    keys = jax.random.wrap_key_data(key_data, impl=impl)
    return jax.vmap(functools.partial(_short_lloyd, k=k, init=init, iters=iters))(
        xs, ws, x, keys)
  m = num_atoms
  band = band_width(k, m, value_atoms=xs.shape[1] <= 2 * m)
  with jax.enable_x64(True):
    pa, e, pref = jax.vmap(functools.partial(_short_atoms, m=m))(xs, ws)

    # the layers in small batches (their tables stay in cache), the rest on every row
    ds = jax.lax.map(lambda a: band_layers((a[0], a[1], a[2]), k, band), pa,
                     batch_size=_map_batch(k, m, band))
    starts, _, ok = jax.vmap(lambda a, d: band_finish((a[0], a[1], a[2]), d, k, band))(pa, ds)
    if band < m:
      wide = min(m, 4 * band)

      def redo(starts):
        def one(args):
          a, row_ok, st = args
          return jax.lax.cond(row_ok, lambda: st, lambda: band_dp((a[0], a[1], a[2]), k, wide)[0])
        return jax.lax.map(one, (pa, ok, starts))

      starts = jax.lax.cond(jnp.all(ok), lambda st: st, redo, starts)
    return jax.vmap(functools.partial(_short_finish, m=m))(x, e, starts, pref)


def row_bucket(n: int, sort_threshold: int = 65536) -> int:
  """Padded length of a short row: the least of 16, 32, 48, 64, 96, 128, 192, ... (powers
  of two and 1.5 times them, multiples of 16) that holds ``n``; long rows keep ``n``."""
  if n > sort_threshold:
    return n
  size = max(16, 1 << (n - 1).bit_length())
  return size * 3 // 4 if size >= 64 and n <= size * 3 // 4 else size


def _chunk_rows(g: int, size: int) -> int:
  """Rows per compiled call: a power of two, at most ``SHORT_CHUNK_VALUES // size`` (fewer
  when there are fewer rows); so each (k, row bucket) compiles a handful of programs."""
  full = 1 << (max(1, SHORT_CHUNK_VALUES // size).bit_length() - 1)
  return full if g >= full else 1 << (g - 1).bit_length()


def _xp(*arrays):
  """numpy for concrete host-side work (no per-shape compilation), jnp under tracing."""
  return jnp if any(isinstance(a, jax.core.Tracer) for a in arrays) else np


def _sort_rows(x, w, xp):
  """Each row sorted by (zero weight last, value, position), with its weights.

  The order is total, so the host and `lax.sort` (under tracing) give the same arrays;
  ``-0.0`` is folded into ``0.0`` first so that the two zeros tie. Rows whose weights
  are all 0 or 1 (no importances: the common case) are sorted by value alone on the
  host (ties are then indistinguishable).
  """
  if xp is np and bool(np.all((w == 0) | (w == 1))):
    xs = np.sort(np.where(w > 0, np.where(x == 0, np.float32(0), x), np.float32(np.inf)), axis=1)
    return xs, np.isfinite(xs).astype(np.float32)
  xs, ws = _sort_rows_jnp(jnp.asarray(x), jnp.asarray(w))
  return (np.asarray(xs), np.asarray(ws)) if xp is np else (xs, ws)


@jax.jit
def _sort_rows_jnp(x, w):
  g, n = x.shape
  x = jnp.where(x == 0, jnp.float32(0), x)
  pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (g, n))
  _, xs, idx = jax.lax.sort(((w <= 0).astype(jnp.int32), x, pos), dimension=1, num_keys=3)
  return xs, jnp.take_along_axis(w, idx, 1)


def _short_rows(x, w, keys, *, k, method, init, num_atoms, iters):
  """Short rows ``(G, n)``: padded to a row bucket, sorted, run in fixed-size chunks."""
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
  xs, ws = _sort_rows(x, w, xp)
  cents, assigns = [], []
  for s in range(0, gp, rows):
    c, a = _short_chunk(xs[s:s + rows], ws[s:s + rows], x[s:s + rows], kd[s:s + rows], k=k,
                        method=method, init=init, num_atoms=num_atoms, iters=iters, impl=impl)
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
    wf = None if w is None else jnp.ravel(w).astype(jnp.float32)
    s = hist_stats(xf, wf, bits)
    return s if axis_name is None else jax.lax.psum(s, axis_name)
  if x.size > WHOLE_ROW:  # one call on the array as it is (a device array stays there)
    return _hist_first(jnp.ravel(x), None if w is None else jnp.ravel(w), bits=bits)
  xf = np.asarray(x, np.float32).reshape(-1)
  wf = None if w is None else np.asarray(w, np.float32).reshape(-1)
  stats = None
  for xb, wb in _blocks(xf, wf):
    stats = _hist_acc(stats, xb, wb, bits=bits) if stats is not None else _hist_first(
        xb, wb, bits=bits)
  return stats


def _blocks(xf, wf):
  """Fixed `HIST_BLOCK`-sized blocks (the last one padded with zero weight; ``wf=None``:
  unit weights); a row longer than `WHOLE_ROW` is one block
  (one compilation per such size costs less than the per-block dispatch and copies)."""
  n = xf.shape[0]
  if n > WHOLE_ROW:
    yield xf, wf
    return
  ones = None
  for s in range(0, n, HIST_BLOCK):
    xb = xf[s:s + HIST_BLOCK]
    if wf is None:  # explicit unit weights: one compiled program for full and last blocks
      ones = np.ones((HIST_BLOCK,), np.float32) if ones is None else ones
      wb = ones[:xb.shape[0]]
    else:
      wb = wf[s:s + HIST_BLOCK]
    if xb.shape[0] < HIST_BLOCK:
      pad = HIST_BLOCK - xb.shape[0]
      xb = np.concatenate([xb, np.zeros((pad,), np.float32)])
      wb = np.concatenate([wb, np.zeros((pad,), np.float32)])
    yield xb, wb


@functools.partial(jax.jit, static_argnames=("bits",))
def _hist_first(xb, wb, *, bits):
  xb = xb.astype(jnp.float32)
  return hist_stats(xb, None if wb is None else wb.astype(jnp.float32), bits)


@functools.partial(jax.jit, static_argnames=("bits",))
def _hist_acc(acc, xb, wb, *, bits):
  return acc + _hist_first(xb, wb, bits=bits)


def centroids_from_hist(stats, key, *, k, method, init, num_atoms, iters):
  """Sorted centroids ``(k,)`` from a fine-bin histogram ``(2**bits, 2)``: coarse atoms,
  exact DP (or Lloyd init), Lloyd polish on the fine atoms. Compiled once per k; a
  histogram whose band is not certified is redone with a four times wider band (a
  second program, compiled only then; a `lax.cond` under tracing)."""
  kw = dict(k=k, method=method, init=init, num_atoms=num_atoms, iters=iters)
  cent, ok = _hist_centroids(stats, key, wide=False, **kw)
  if method != "dp":
    return cent
  if isinstance(ok, jax.core.Tracer):
    return jax.lax.cond(ok, lambda: cent, lambda: _hist_centroids(stats, key, wide=True, **kw)[0])
  return cent if bool(ok) else _hist_centroids(stats, key, wide=True, **kw)[0]


@functools.partial(jax.jit, static_argnames=("k", "method", "init", "num_atoms", "iters",
                                             "wide"))
def _hist_centroids(stats, key, *, k, method, init, num_atoms, iters, wide):
  fw, fm = hist_means(stats)
  _, _, a, b = atoms_from_fine(fw, fm, key, k=k, method=method, init=init,
                               num_atoms=num_atoms)
  ok = jnp.bool_(True)
  if method == "dp":
    a, ok = dp_centroids(a, b, k, wide=wide)
  cent, used, _ = _lloyd_prefix(a, fw, fm, iters)
  return jnp.sort(_fill_empty(cent, used)), ok


def assign_refine(x, w, cent, *, refine: int, axis_name=None):
  """Nearest centroid of every value of ``x`` (any shape) and ``refine`` exact Lloyd
  steps on the raw values (``w=None``: unit weights); the per-cluster sums are
  ``psum``-ed over ``axis_name``. Returns ``(assignments int32 like x, centroids)``."""
  k = cent.shape[0]
  xf = jnp.ravel(x).astype(jnp.float32)
  wf = None if w is None else jnp.ravel(w).astype(jnp.float32)
  assign = _assign_binned(cent, xf)
  for _ in range(refine):
    dev = xf - cent[assign]
    sw = _segment_sum(jnp.ones_like(xf) if wf is None else wf, assign, k)
    s1 = _segment_sum(dev if wf is None else wf * dev, assign, k)
    stats = jnp.stack([sw, s1], -1)
    if axis_name is not None:
      stats = jax.lax.psum(stats, axis_name)
    sw, s1 = stats[:, 0], stats[:, 1]
    cent = jnp.sort(cent + jnp.where(sw > 0, s1 / jnp.where(sw > 0, sw, 1.0), 0.0))
    assign = _assign_binned(cent, xf)
  return assign.reshape(x.shape), cent


@functools.partial(jax.jit, static_argnames=("refine",))
def _assign_refine_jit(x, w, cent, *, refine):
  return assign_refine(x.astype(jnp.float32), None if w is None else w.astype(jnp.float32),
                       cent, refine=refine)


def _unit_weights(w) -> bool:
  """Concrete weights that are all 1 (share passes them for unweighted leaves): the
  histogram and refinement then skip them (the same sums)."""
  if w is None:
    return True
  if isinstance(w, jax.core.Tracer):
    return False
  return bool(_all_ones(w)) if isinstance(w, jax.Array) else bool(np.all(np.asarray(w) == 1))


@jax.jit
def _all_ones(w):
  return jnp.all(w == 1)


def _long_row(x, w, key, *, k, method, init, num_atoms, iters):
  """One long row ``(n,)``: blocked histogram, DP on the histogram, assignment."""
  bits = fine_bits(k)
  w = None if _unit_weights(w) else w
  stats = hist_stats_blocks(x, w, bits)
  cent = centroids_from_hist(stats, key, k=k, method=method, init=init, num_atoms=num_atoms,
                             iters=iters)
  refine = refine_steps(k, True)
  if isinstance(x, jax.core.Tracer) or refine or isinstance(x, jax.Array):
    # Refinement needs the whole row (global per-cluster sums).
    assign, cent = _assign_refine_jit(x, w, cent, refine=refine)
    return cent, assign
  xf = np.asarray(x, np.float32)
  out = [np.asarray(_assign_block(xb, cent)) for xb, _ in _blocks(xf, xf)]
  return cent, np.concatenate(out)[:xf.shape[0]]


@jax.jit
def _assign_block(xb, cent):
  return _assign_small(cent, xb) if cent.shape[0] <= 32 else _assign_binned(cent, xb)


def kmeans_1d_batch(x, w, keys, *, k, method="dp", init="linear", num_atoms=None,
                    polish_iters=1000, max_iters=300, sort_threshold=65536):
  """1-D k-means of each row of ``x`` ``(G, n)`` with weights ``w`` ``(G, n)`` (or None).

  Short rows (``n <= sort_threshold``) are padded to a row bucket (`row_bucket`) and
  run in fixed-size chunks of rows, so a (k, bucket) pair compiles a handful of programs
  whatever the number of rows; long rows are histogrammed in fixed-size blocks and
  clustered on the histogram, compiled once per k. Concrete inputs are split on the host
  (numpy), traced inputs with jnp (the same compiled pieces).
  Returns sorted centroids ``(G, k)`` float32 and int32 assignments ``(G, n)``.
  """
  g, n = x.shape
  if n <= sort_threshold:
    if w is None:
      w = jnp.ones(x.shape, jnp.float32) if isinstance(x, jax.core.Tracer) else np.ones(
          x.shape, np.float32)
    if _xp(x, w) is np:  # host-side slicing: no compilation per leaf shape
      x, w = np.asarray(x), np.asarray(w)
    size = row_bucket(n, sort_threshold)
    m = short_num_atoms(k, size, num_atoms)
    # dp: the windowed boundary DP replaces the Lloyd polish (polish_iters is for
    # histogrammed rows)
    iters = 0 if method == "dp" else max_iters
    return _short_rows(x, w, keys, k=k, method=method, init=init, num_atoms=m,
                       iters=int(iters))
  if num_atoms is None:
    num_atoms = default_num_atoms(k, n, sort_threshold)
  iters = polish_iters if method == "dp" else max_iters
  cents, assigns = [], []
  for r in range(g):
    c, a = _long_row(x[r], None if w is None else w[r], keys[r], k=k, method=method,
                     init=init, num_atoms=int(num_atoms), iters=int(iters))
    cents.append(c)
    assigns.append(a)
  if any(isinstance(a, jax.core.Tracer) for a in [*cents, *assigns]):
    return jnp.stack(cents), jnp.stack(assigns)
  # concrete: stacked on the host (no compilation per leaf shape)
  return np.stack([np.asarray(c) for c in cents]), np.stack([np.asarray(a) for a in assigns])


def default_num_atoms(k: int, n: int | None = None, sort_threshold: int = 65536) -> int:
  """Atoms of the exact DP: ``min(4096, max(1024, 16k))`` for histogrammed rows and
  ``min(4096, max(320, 20k))`` (256 for k <= 4) for short (sorted) rows, which get every
  value as an atom when they are no longer (so groups and short channels are solved
  exactly). Fewer atoms leave some MiniLM channel rows above 1.001x of the optimum
  (worst 1.0027x with 256 atoms at k=16; 1.0007x with 320)."""
  if n is not None and n <= sort_threshold:
    return min(4096, max(256 if k <= 4 else SHORT_MIN_ATOMS, SHORT_ATOMS_PER_CLUSTER * k))
  return min(4096, max(1024, 16 * k))


def short_num_atoms(k: int, size: int, num_atoms: int | None = None) -> int:
  """Atoms of a short row of bucket ``size``: ``num_atoms`` (default `default_num_atoms`)
  capped at ``size`` and rounded up to a multiple of `BLOCK`."""
  m = default_num_atoms(k, size, size) if num_atoms is None else int(num_atoms)
  m = max(1, min(m, size))
  return -(-m // BLOCK) * BLOCK


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
def _all_finite_jit(x):
  return jnp.all(jnp.isfinite(x))


def all_finite(x) -> bool:
  """Whether a concrete array has no NaN/Inf: on the host for NumPy arrays and arrays on
  the CPU (no compilation per leaf shape), one compiled reduction on other devices."""
  if isinstance(x, np.ndarray) or not isinstance(x, jax.Array) or (
      x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices())):
    a = np.asarray(x)
    return bool(np.isfinite(a).all()) if np.issubdtype(a.dtype, np.inexact) else True
  return bool(_all_finite_jit(x))


@functools.partial(jax.jit, static_argnames=("refine",))
def _assign_inertia(x, w, cent, *, refine):
  """`assign_refine` of one row and the inertia of the result (one jitted call)."""
  assign, cent = assign_refine(x, w, cent, refine=refine)
  d = x - cent[assign]
  return assign, cent, jnp.sum(d * d if w is None else w * d * d)


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
  if not isinstance(x, jax.core.Tracer) and not all_finite(x):
    raise ValueError("kmeans input has NaN or Inf values")
  xf = x.astype(jnp.float32)
  n = x.shape[0]
  if weights is None:
    w = None
  else:
    w = jnp.asarray(weights).astype(jnp.float32)
    if w.shape != (n,):
      raise ValueError(f"weights must have shape ({n},), got {w.shape}")
  if key is None:
    key = jax.random.key(0)
  if x.ndim == 1 and n > sort_threshold and not isinstance(xf, jax.core.Tracer) and (
      w is None or not isinstance(w, jax.core.Tracer)):
    # One long row: histogram, DP, then assignment, refinement and inertia in one pass.
    if num_atoms is None:
      num_atoms = default_num_atoms(k, n, sort_threshold)
    w = None if _unit_weights(w) else w
    bits = fine_bits(k)
    stats = hist_stats_blocks(xf, w, bits)
    cent = centroids_from_hist(stats, key, k=k, method=method, init=init,
                               num_atoms=int(num_atoms),
                               iters=int(polish_iters if method == "dp" else max_iters))
    assign, cent, inertia = _assign_inertia(xf, w, cent, refine=refine_steps(k, True))
    return KMeansResult(cent, assign, inertia)
  if w is None:
    w = jnp.ones((n,), jnp.float32)
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
