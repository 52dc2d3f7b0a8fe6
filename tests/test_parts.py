"""The optional parts of a SharedArray: building them, and the matmul around a base kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qws_jax
from qws_jax import kernels
from qws_jax._src import parts
from qws_jax._src import types


def _quantized(rng, shape=(64, 24), k=8, g=None, n_out=0):
  r, c = shape
  out = {"indices": rng.integers(0, k, shape).astype(np.int32),
         "codebook": np.sort(rng.standard_normal(k)).astype(np.float32)}
  if g:
    out["scales"] = rng.uniform(0.5, 2.0, (-(-r // g), c)).astype(np.float32)
  if n_out:
    out["outlier_positions"] = np.sort(rng.choice(r * c, n_out, replace=False)).astype(np.int32)
    out["outlier_values"] = (rng.standard_normal(n_out) * 5).astype(np.float32)
  return out


@pytest.mark.parametrize("name,g,n_out,cdt", [
    ("plain", None, 0, None), ("f16_codebook", None, 0, jnp.float16),
    ("outliers", None, 7, jnp.float16), ("scales", 16, 0, jnp.float16),
    ("scales_outliers", 16, 5, None)])
def test_matmul_with_parts_matches_the_decoded_weight(name, g, n_out, cdt):
  del name
  rng = np.random.default_rng(0)
  q = _quantized(rng, g=g, n_out=n_out)
  w = parts.from_quantized(q, shape=(64, 24), dtype=jnp.float32, scale_group_size=g,
                           codebook_dtype=cdt)
  qws_jax.validate_shared_array(w, "w")
  x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
  want = np.asarray(x) @ np.asarray(w.materialize())
  got = parts.matmul(x, w, lambda a, b: kernels.shared_matmul(a, b))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
  got_jit = jax.jit(lambda a, b: parts.matmul(a, b, kernels.shared_matmul))(x, w)
  np.testing.assert_allclose(np.asarray(got_jit), want, rtol=2e-5, atol=2e-5)
  if n_out:  # an outlier really changes the output (a lost outlier would be caught)
    without = parts.base_leaf(w)
    assert not np.allclose(np.asarray(x) @ np.asarray(without.materialize()), want, atol=1e-3)


def test_add_pruned_zero_keeps_zeros_exact():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((32, 16)).astype(np.float32)
  x[rng.random(x.shape) < 0.7] = 0.0
  nz = np.abs(x) > 0
  w = qws_jax.share({"w": jnp.asarray(x)}, k=7, weights={"w": jnp.asarray(nz, jnp.float32)},
                    predicate=lambda p, l: True)["w"]
  s = parts.add_pruned_zero(w, jnp.asarray(~nz))
  qws_jax.validate_shared_array(s, "w")
  assert s.sparse and s.k == 8 and s.bits == 3
  dense = np.asarray(s.materialize())
  assert np.all(dense[~nz] == 0.0)
  np.testing.assert_allclose(dense[nz], np.asarray(w.materialize())[nz])


def test_map_stacked_gives_one_codebook_per_slice():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 3, 16, 8)) * np.arange(1, 7).reshape(2, 3, 1, 1),
                  jnp.float32)

  def one(sl, i):
    del i
    return qws_jax.share({"w": sl}, k=4, predicate=lambda p, l: True)["w"]
  s = parts.map_stacked(x, 2, one)
  assert s.stack_shape == (2, 3) and s.shape == (16, 8) and s.codebook.shape == (2, 3, 4)
  qws_jax.validate_shared_array(s, "w")
  dense = np.asarray(s.materialize())
  for i in range(2):
    for j in range(3):
      np.testing.assert_array_equal(dense[i, j], np.asarray(one(x[i, j], 0).materialize()))


def test_layers_run_leaves_with_parts():
  """Dense, Embed (lookup and attend) and a rank-3 DenseGeneral through qws_jax.apply."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
      emb = nn.Embed(64, 32)
      h = emb(ids)
      h = nn.DenseGeneral((4, 8))(h)
      h = nn.Dense(32)(h.reshape(h.shape[:-2] + (32,)))
      return emb.attend(h)

  rng = np.random.default_rng(3)
  ids = jnp.asarray(rng.integers(0, 64, (2, 5)), jnp.int32)
  params = Net().init(jax.random.key(0), ids)["params"]

  def with_parts(path, leaf, options):
    del options
    x = np.asarray(leaf).reshape(-1, leaf.shape[-1])
    q = _quantized(rng, shape=x.shape, g=8, n_out=4)
    return parts.from_quantized(q, shape=leaf.shape, dtype=leaf.dtype, scale_group_size=8,
                                codebook_dtype=jnp.float16)
  from qws_jax._src import tree as tree_lib  # pylint: disable=g-import-not-at-top
  pc = tree_lib.map_selected(params, with_parts, defaults={}, predicate=lambda p, l: l.ndim >= 2,
                             rules=(), what="test")
  want = Net().apply({"params": qws_jax.unshare(pc)}, ids)
  got = jax.jit(qws_jax.apply(Net().apply))({"params": pc}, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opts", [
    dict(k=16, scale_group_size=32), dict(k=16, outliers=0.01),
    dict(k=8, scale_group_size=7, outliers=0.02), dict(k=8, axis=0, outliers=0.01),
    dict(k=8, axis=-1, codebook_dtype=jnp.float16, outliers=0.01)],
    ids=lambda o: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in o.items()))
def test_take_rows_with_parts_decodes_only_the_rows(opts):
  """Embedding lookups of leaves with scales / outliers: exact rows, no full table."""
  from qws_jax._src import ops
  x = jax.random.normal(jax.random.key(0), (300, 64))
  w = qws_jax.share({"w": x}, predicate=lambda *_: True, **opts)["w"]
  ids = jnp.array([[0, 5, 299, 5], [17, 300, -1, 150]])
  got = np.asarray(ops.take_rows(w, ids))
  dense = np.asarray(w.materialize())
  inside = (np.asarray(ids) >= 0) & (np.asarray(ids) < 300)
  np.testing.assert_array_equal(got[inside], dense[np.asarray(ids)[inside]])
  assert np.all(np.isnan(got[~inside]))  # out of range: NaN rows, like flax's Embed
  jaxpr = str(jax.make_jaxpr(ops.take_rows)(w, ids))
  assert "f32[300,64]" not in jaxpr and "f16[300,64]" not in jaxpr
