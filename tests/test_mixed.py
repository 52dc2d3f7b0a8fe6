"""`qws_jax.share_mixed`: a codebook size per leaf under a bits/weight budget."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qws_jax
from qws_jax._src import mixed


def _brute_force(costs, budget):
  best = None
  for pick in itertools.product(*[range(len(c)) for c in costs.values()]):
    used = sum(c[i][0] for c, i in zip(costs.values(), pick))
    err = sum(c[i][1] for c, i in zip(costs.values(), pick))
    if used <= budget and (best is None or err < best):
      best = err
  return best


@pytest.mark.parametrize("seed", range(40))
def test_allocate_is_the_exact_knapsack_optimum(seed):
  rng = np.random.default_rng(seed)
  n, m = int(rng.integers(2, 6)), int(rng.integers(2, 5))
  costs = {}
  for leaf in range(n):  # not convex, not sorted: any (bytes, error) pairs
    costs[f"leaf{leaf}"] = [(int(b), float(e)) for b, e in
                            zip(rng.integers(10, 200, m), rng.random(m) * 10)]
  lo = sum(min(b for b, _ in c) for c in costs.values())
  hi = sum(max(b for b, _ in c) for c in costs.values())
  budget = int(rng.integers(lo, hi + 1))
  pick = mixed.allocate(costs, budget)
  assert sum(costs[k][i][0] for k, i in pick.items()) <= budget
  err = sum(costs[k][i][1] for k, i in pick.items())
  assert err == pytest.approx(_brute_force(costs, budget))


def test_allocate_with_coarse_units_still_fits():
  costs = {i: [(1000 + 37 * i, 5.0), (3000 + 11 * i, 1.0)] for i in range(50)}
  for budget in (96_000, 120_000, 200_000):
    for resolution in (100, None):  # 100: 960- to 2000-byte units, rounded up
      pick = mixed.allocate(costs, budget, resolution=resolution)
      assert sum(costs[k][i][0] for k, i in pick.items()) <= budget
  exact = mixed.allocate(costs, 120_000)  # fine units: close to the optimum
  assert sum(exact.values()) >= 9
  with pytest.raises(ValueError, match="fits"):
    mixed.allocate(costs, 10_000)


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {"wide": {"kernel": jax.random.normal(k[0], (64, 96))},
          "narrow": {"kernel": 0.05 * jax.random.normal(k[1], (96, 64))},
          "other": {"kernel": jax.random.normal(k[2], (64, 64)),
                    "bias": jnp.zeros(64)}}


def _bits(tree):
  leaves = [l for l in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, qws_jax.SharedArray))
            if isinstance(l, qws_jax.SharedArray)]
  return 8 * sum(l.nbytes for l in leaves) / sum(l.size for l in leaves)


def test_share_mixed_spends_the_budget_on_the_large_errors():
  params = _params()
  out = qws_jax.share_mixed(params, bits=3.2, candidates=({"k": 4}, {"k": 16}))
  assert _bits(out) <= 3.2
  assert out["narrow"]["kernel"].k == 4  # small weights: small squared error at any k
  assert out["wide"]["kernel"].k == 16 or out["other"]["kernel"].k == 16
  assert out["other"]["bias"] is params["other"]["bias"]
  alone = {k: qws_jax.share(params, k=k) for k in (4, 16)}
  for name in ("wide", "narrow", "other"):  # each leaf is exactly its candidate's share
    leaf = out[name]["kernel"]
    np.testing.assert_array_equal(np.asarray(leaf.materialize()),
                                  np.asarray(alone[leaf.k][name]["kernel"].materialize()))
  # A generous budget takes the large k everywhere.
  rich = qws_jax.share_mixed(params, bits=6.0, candidates=({"k": 4}, {"k": 16}))
  assert {rich[n]["kernel"].k for n in ("wide", "narrow", "other")} == {16}
  assert mixed.default_candidates(3.0) == ({"k": 4}, {"k": 8})
  assert mixed.default_candidates(3.5) == ({"k": 8}, {"k": 16})


def test_share_mixed_uses_the_calibration_statistics():
  """Two leaves with equal weights: the one whose inputs are 100x larger gets the large k."""
  w = jax.random.normal(jax.random.key(1), (32, 32))
  params = {"a": {"kernel": w}, "b": {"kernel": w}}
  fn = lambda p, x: (x @ p["a"]["kernel"]) + (100.0 * x) @ p["b"]["kernel"]
  xs = [(jax.random.normal(jax.random.key(i), (64, 32)),) for i in range(2)]
  stats = qws_jax.calibrate(fn, params, xs)
  out = qws_jax.share_mixed(params, bits=3.5, candidates=({"k": 4}, {"k": 16}),
                            calibration=stats)
  assert (out["a"]["kernel"].k, out["b"]["kernel"].k) == (4, 16)


def test_share_mixed_errors():
  params = _params()
  with pytest.raises(ValueError, match="over the budget bits=1.5"):
    qws_jax.share_mixed(params, bits=1.5, candidates=({"k": 4}, {"k": 8}))
  with pytest.raises(ValueError, match="candidate"):
    qws_jax.share_mixed(params, bits=3.0, candidates=({"k": 4}, {"kk": 8}))
  with pytest.raises(ValueError, match="candidate"):
    qws_jax.share_mixed(params, bits=3.0, candidates=({"k": 4, "stack_axes": 1},))
  with pytest.raises(ValueError, match="empty"):
    qws_jax.share_mixed(params, bits=3.0, candidates=())
  for bad in (0, -1.0, float("nan"), "4"):
    with pytest.raises(ValueError, match="bits must be a positive number"):
      qws_jax.share_mixed(params, bits=bad)
