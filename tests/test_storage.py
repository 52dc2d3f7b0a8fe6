"""Entropy-coded indices in checkpoints: sparse (pruned) leaves, bit-exact round trips."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import qws_jax
from qws_jax._src import checkpoint
from qws_jax._src import packing
from qws_jax._src import storage
from qws_jax._src import types


def _du(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _leaf(rng, shape=(300, 100), k=16, density=None, stack=()):
  """A SharedArray with skewed indices; sparse (index 0 = pruned zero) when density is set."""
  probs = 0.5 ** np.arange(1, k + 1)
  probs /= probs.sum()
  idx = rng.choice(k, size=stack + shape, p=probs).astype(np.uint8)
  cb = np.sort(rng.standard_normal(stack + (k,)), axis=-1).astype(np.float32)
  if density is not None:
    keep = rng.random(stack + shape) < density
    idx = np.where(keep, np.maximum(idx, 1), 0).astype(np.uint8)
    cb[..., 0] = 0.0
    cb[..., 1:] = np.sort(cb[..., 1:], axis=-1)
  bits = types.bits_for(k)
  return types.SharedArray(jnp.asarray(packing.pack(idx, bits)), jnp.asarray(cb), shape,
                           jnp.dtype(jnp.float32), bits, sparse=density is not None)


def _assert_same_leaf(a, b):
  assert type(a) is type(b) and types.to_meta(a) == types.to_meta(b)
  for n, x in types.children(a).items():
    y = types.children(b)[n]
    assert (x is None) == (y is None), n
    if x is not None:
      assert type(x) is type(y), n
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("case", ["dense", "sparse", "stacked_sparse"])
def test_coded_round_trip_is_bit_exact_and_smaller(tmp_path, case):
  rng = np.random.default_rng(0)
  if case == "dense":
    w = _leaf(rng)
  elif case == "sparse":
    w = _leaf(rng, density=0.08)
  else:
    w = _leaf(rng, shape=(40, 30), density=0.1, stack=(3,))
  qws_jax.validate_shared_array(w, "w")
  coded = checkpoint.save(tmp_path / "coded", {"w": w})
  plain = checkpoint.save(tmp_path / "plain", {"w": w}, entropy=False, compress=False)
  meta = checkpoint.read_metadata(coded)["tree"]["items"][0]
  assert meta["coded"]["codec"] == storage.CODEC and meta["arrays"]["indices"] is None
  got = checkpoint.restore(coded)["w"]
  _assert_same_leaf(w, got)
  np.testing.assert_array_equal(np.asarray(got.materialize()), np.asarray(w.materialize()))
  coded_size = storage.coded_nbytes(w)
  assert coded_size < w.nbytes
  if case != "dense":
    # Only the non-zeros and their positions are stored: far below the packed indices.
    assert coded_size < 0.5 * w.nbytes, (coded_size, w.nbytes)
  if case == "sparse":  # on disk too (Orbax adds ~250 bytes per stored array)
    assert _du(coded) < _du(plain) - w.indices.nbytes // 2, (_du(coded), _du(plain))


def test_sparse_leaf_decodes_pruned_weights_to_exact_zero():
  w = _leaf(np.random.default_rng(1), density=0.2)
  dense = np.asarray(w.materialize())
  idx = np.asarray(w.unpacked_indices())
  assert np.all(dense[idx == 0] == 0.0) and np.all(dense[idx != 0] != 0.0)
  bad = dataclasses.replace(w, codebook=w.codebook.at[0].set(0.5))
  with pytest.raises(ValueError, match="entry 0 .*must be exactly 0"):
    qws_jax.validate_shared_array(bad, "w")


def test_report_shows_bits_before_and_after_coding():
  w = _leaf(np.random.default_rng(2), density=0.08)
  r = qws_jax.report(None, {"w": w}, coded=True)
  row = r.leaves[0]
  assert row.bytes_coded == storage.coded_nbytes(w) and row.bytes_coded < row.bytes_after
  assert row.coded_bits_per_weight < 1.0 < row.bits_per_weight
  assert "coded bits/w" in str(r) and r.to_dict()["bytes_coded"] == row.bytes_coded
  assert qws_jax.report(None, {"w": w}).bytes_coded is None


def _write(path, meta, arrays):
  handler = checkpoint._handler()  # pylint: disable=protected-access
  with ocp.Checkpointer(handler) as c:
    c.save(path, ocp.args.Composite(qws_jax=ocp.args.JsonSave(meta),
                                    arrays=ocp.args.PyTreeSave(arrays)))


@pytest.mark.parametrize("how", ["flip_symbols", "flip_positions", "truncate", "count",
                                 "codec", "index_shape", "both"])
def test_damaged_coded_indices_are_refused(tmp_path, how):
  w = _leaf(np.random.default_rng(3), density=0.1)
  meta, arrays = checkpoint._encode({"w": w})  # pylint: disable=protected-access
  coded = meta["tree"]["items"][0]["coded"]
  sym, pos = coded["symbols"]["key"], coded["positions"]["key"]
  if how == "flip_symbols":
    arrays[sym] = arrays[sym].copy()
    arrays[sym][len(arrays[sym]) // 2] ^= 0x10
  elif how == "flip_positions":
    arrays[pos] = arrays[pos].copy()
    arrays[pos][len(arrays[pos]) // 2] ^= 0x01
  elif how == "truncate":
    arrays[sym] = arrays[sym][:-7].copy()
    coded["symbols"]["shape"] = [len(arrays[sym])]
  elif how == "count":
    coded["count"] += 1
  elif how == "codec":
    coded["codec"] = "zip-bomb-9"
  elif how == "index_shape":
    coded["index_shape"] = [300, 101]
  else:
    meta["tree"]["items"][0]["arrays"]["indices"] = coded["symbols"]
  _write(str(tmp_path / "c"), meta, arrays)
  with pytest.raises(ValueError, match="'w[/']"):
    checkpoint.restore(tmp_path / "c")
