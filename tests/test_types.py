"""SharedArray / HashedArray: pytree behaviour, storage accounting, validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qws_jax
from qws_jax._src import packing


def _shared(shape=(6, 10), k=16, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  bits = max(1, int(np.ceil(np.log2(k))))
  idx = rng.integers(0, k, shape).astype(np.uint8)
  cb = jnp.asarray(np.sort(rng.standard_normal(k)), dtype)
  return qws_jax.SharedArray(indices=packing.pack(idx, bits), codebook=cb, shape=shape,
                             dtype=np.dtype(dtype), bits=bits), idx, cb


def test_materialize_is_codebook_gather():
  w, idx, cb = _shared()
  np.testing.assert_array_equal(np.asarray(w.materialize()), np.asarray(cb)[idx])
  assert w.materialize().dtype == jnp.float32 and w.shape == (6, 10)


def test_nbytes_counts_packed_storage():
  w, _, _ = _shared(shape=(64, 64), k=16)
  assert w.nbytes == 64 * 32 + 16 * 4
  assert w.bits_per_weight == pytest.approx(4 + 16 * 32 / 4096)


def test_pytree_children_and_static_metadata():
  w, _, _ = _shared()
  leaves, treedef = jax.tree_util.tree_flatten(w)
  assert len(leaves) == 2
  w2 = jax.tree_util.tree_unflatten(treedef, leaves)
  assert w2.shape == w.shape and w2.bits == w.bits
  # static metadata stays static under jit; a second call with new values does not retrace
  traces = []

  @jax.jit
  def f(a):
    traces.append(1)
    return a.materialize().sum()

  f(w)
  f(dataclasses.replace(w, codebook=w.codebook + 1))
  assert len(traces) == 1


def test_immutable():
  w, _, _ = _shared()
  with pytest.raises(dataclasses.FrozenInstanceError):
    w.bits = 3


def test_validate_catches_bad_nodes():
  w, _, _ = _shared()
  qws_jax.validate_shared_array(w, "p")
  with pytest.raises(ValueError, match="not sorted.*'p'"):
    qws_jax.validate_shared_array(dataclasses.replace(w, codebook=w.codebook[::-1]), "p")
  with pytest.raises(ValueError, match="bits"):
    qws_jax.validate_shared_array(dataclasses.replace(w, bits=5), "p")
  with pytest.raises(ValueError, match="indices shape"):
    qws_jax.validate_shared_array(dataclasses.replace(w, indices=w.indices[:, :2]), "p")
  # Codebooks may be stored in another floating dtype (codebook_dtype), never an int one.
  qws_jax.validate_shared_array(dataclasses.replace(w, codebook=w.codebook.astype(jnp.bfloat16)))
  with pytest.raises(TypeError, match="codebook dtype int32"):
    qws_jax.validate_shared_array(dataclasses.replace(w, codebook=w.codebook.astype(jnp.int32)))
  big = dataclasses.replace(w, codebook=w.codebook[:12])  # 4 bits, but indices reach 15
  with pytest.raises(ValueError, match=r"past the end of the codebook \(k=12\)"):
    qws_jax.validate_shared_array(big)


def test_hashed_array_protocol():
  h = qws_jax.HashedArray(buckets=jnp.arange(5, dtype=jnp.float32), shape=(4, 3),
                          dtype=np.dtype(np.float32), seed=7)
  v = np.asarray(h.materialize())
  assert v.shape == (4, 3) and h.nbytes == 20
  assert set(np.abs(v).ravel()) <= set(range(5))
  qws_jax.validate_hashed_array(h, "x")
  with pytest.raises(ValueError, match="hash version"):
    qws_jax.validate_hashed_array(dataclasses.replace(h, version=99), "x")


# ----------------------------------------------------------------------------- leaf parts


def _with_parts(seed=0, shape=(12, 10), k=4, g=4, n_out=5):
  """A leaf with f16 codebook, per-group f16 scales and outliers, and its dense oracle."""
  rng = np.random.default_rng(seed)
  bits = qws_jax._src.types.bits_for(k)  # pylint: disable=protected-access
  idx = rng.integers(0, k, shape).astype(np.uint8)
  cb = np.sort(rng.standard_normal(k)).astype(np.float16)
  r, c = shape[0], shape[1]
  scales = rng.uniform(0.5, 2.0, size=(-(-r // g), c)).astype(np.float16)
  pos = np.sort(rng.choice(r * c, n_out, replace=False)).astype(np.int32)
  vals = rng.standard_normal(n_out).astype(np.float32) * 10
  dense = cb.astype(np.float32)[idx] * scales.astype(np.float32)[np.arange(r) // g]
  dense.reshape(-1)[pos] = vals
  w = qws_jax.SharedArray(
      indices=packing.pack(idx, bits), codebook=jnp.asarray(cb), shape=shape,
      dtype=np.dtype(np.float32), bits=bits, scales=jnp.asarray(scales), scale_group_size=g,
      outlier_values=jnp.asarray(vals), outlier_positions=jnp.asarray(pos))
  return w, dense


def test_scales_outliers_and_codebook_dtype_decode_exactly():
  w, dense = _with_parts()
  qws_jax.validate_shared_array(w, "w")
  np.testing.assert_array_equal(np.asarray(w.materialize()), dense)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a.materialize())(w)), dense)
  # Every stored byte counts: packed 2-bit indices, f16 codebook and scales, outliers.
  assert w.nbytes == 12 * 3 + 4 * 2 + 3 * 10 * 2 + 5 * (4 + 4)
  assert "codebook_dtype=float16" in repr(w) and "outliers=5" in repr(w)


@pytest.mark.parametrize("how", ["scale_shape", "scales_without_size", "positions_unsorted",
                                 "positions_outside", "values_dtype", "outliers_half",
                                 "scales_nan"])
def test_validate_catches_bad_parts(how):
  w, _ = _with_parts()
  bad = {
      "scale_shape": lambda: dataclasses.replace(w, scales=w.scales[:2]),
      "scales_without_size": lambda: dataclasses.replace(w, scale_group_size=None),
      "positions_unsorted": lambda: dataclasses.replace(
          w, outlier_positions=w.outlier_positions[::-1]),
      "positions_outside": lambda: dataclasses.replace(
          w, outlier_positions=w.outlier_positions.at[-1].set(120)),
      "values_dtype": lambda: dataclasses.replace(
          w, outlier_values=w.outlier_values.astype(jnp.int32)),
      "outliers_half": lambda: dataclasses.replace(w, outlier_positions=None),
      "scales_nan": lambda: dataclasses.replace(w, scales=w.scales.at[0, 0].set(jnp.nan)),
  }[how]()
  with pytest.raises((ValueError, TypeError), match="'w'"):
    qws_jax.validate_shared_array(bad, "w")


def test_parts_round_trip_through_the_schema_and_checkpoints(tmp_path):
  from qws_jax._src import types  # pylint: disable=g-import-not-at-top
  w, dense = _with_parts()
  meta = types.to_meta(w)
  assert meta["scale_group_size"] == 4 and meta["kind"] == "shared"
  back = types.from_meta(meta, types.children(w), "w")
  np.testing.assert_array_equal(np.asarray(back.materialize()), dense)
  with pytest.raises(ValueError, match="unknown field.*'mystery'"):
    types.from_meta({**meta, "mystery": 1}, types.children(w), "w")
  with pytest.raises(ValueError, match="needs the arrays"):
    types.from_meta(meta, {"indices": w.indices, "codebook": w.codebook}, "w")
  qws_jax.save(tmp_path / "c", {"w": w})
  got = qws_jax.restore(tmp_path / "c")["w"]
  np.testing.assert_array_equal(np.asarray(got.materialize()), dense)
  assert got.nbytes == w.nbytes and got.codebook.dtype == jnp.float16


# ----------------------------------------------------------------------------- stacked


def _stacked(layers=3, shape=(8, 6), k=4):
  leaves = [_with_parts(seed=i, shape=shape, k=k, g=4, n_out=3) for i in range(layers)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[w for w, _ in leaves])
  return stacked, np.stack([d for _, d in leaves])


def test_stacked_leaf_is_sliced_by_scan_and_vmap():
  w, dense = _stacked()
  assert w.stack_shape == (3,) and w.full_shape == (3, 8, 6) and w.shape == (8, 6)
  assert w.size == 3 * 48
  qws_jax.validate_shared_array(w, "w")
  np.testing.assert_array_equal(np.asarray(w.materialize()), dense)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8)), jnp.float32)

  def body(h, layer):  # each step sees an ordinary (unstacked) leaf
    assert layer.stack_shape == () and layer.shape == (8, 6)
    return h, h @ layer.materialize()
  _, ys = jax.lax.scan(body, x, w)
  np.testing.assert_allclose(np.asarray(ys), np.einsum("bk,lkn->lbn", np.asarray(x), dense),
                             rtol=1e-5, atol=1e-5)
  per_layer = jax.vmap(lambda layer: layer.materialize())(w)
  np.testing.assert_array_equal(np.asarray(per_layer), dense)
  bad = dataclasses.replace(w, codebook=w.codebook[:2])  # 2 codebooks for 3 layers
  with pytest.raises(ValueError, match=r"codebook shape .*stack \(3,\)"):
    qws_jax.validate_shared_array(bad, "w")


def test_stacked_hashed_leaf():
  h = qws_jax.HashedArray(buckets=jnp.arange(10, dtype=jnp.float32).reshape(2, 5), shape=(4, 3),
                          dtype=np.dtype(np.float32), seed=7)
  qws_jax.validate_hashed_array(h, "h")
  assert h.stack_shape == (2,) and h.num_buckets == 5 and h.full_shape == (2, 4, 3)
  v = np.asarray(h.materialize())
  one = qws_jax.HashedArray(buckets=jnp.arange(5, 10, dtype=jnp.float32), shape=(4, 3),
                            dtype=np.dtype(np.float32), seed=7)
  np.testing.assert_array_equal(v[1], np.asarray(one.materialize()))


def test_stacked_leaves_save_and_restore(tmp_path):
  w, dense = _stacked()
  qws_jax.save(tmp_path / "c", {"layers": w})
  got = qws_jax.restore(tmp_path / "c")["layers"]
  assert got.stack_shape == (3,)
  np.testing.assert_array_equal(np.asarray(got.materialize()), dense)
  assert np.asarray(qws_jax.unshare({"layers": got})["layers"]).shape == (3, 8, 6)

