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
  with pytest.raises(TypeError, match="dtype"):
    qws_jax.validate_shared_array(dataclasses.replace(w, codebook=w.codebook.astype(jnp.bfloat16)))
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
