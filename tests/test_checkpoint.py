"""Tests of qws_jax.save / restore / CheckpointManager and the standard Orbax routes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from qws_jax._src import checkpoint
from qws_jax._src import hashing
from qws_jax._src import packing
from qws_jax._src import share as share_lib
from qws_jax._src import types

save, restore = checkpoint.save, checkpoint.restore


def _shared(rng, shape, k, dtype=jnp.float32, axis=None, group_size=None, vector_dim=1):
  """A valid SharedArray with random sorted codebook(s) and random indices."""
  bits = types.bits_for(k)
  grid = types.grid_shape(shape, axis, group_size, vector_dim)
  if vector_dim == 1:
    cb = np.sort(rng.normal(size=grid + (k,)), axis=-1)
  else:
    cb = rng.normal(size=grid + (k, vector_dim))
  ishape = types.index_shape(shape, vector_dim)
  idx = rng.integers(0, k, size=ishape).astype(np.uint8)
  x = types.SharedArray(packing.pack(idx, bits), jnp.asarray(cb, dtype), tuple(shape),
                        jnp.dtype(dtype), bits, axis, group_size, vector_dim)
  types.validate_shared_array(x)
  return x


def _hashed(rng, shape, buckets, path, dtype=jnp.float32, signed=True):
  return types.HashedArray(jnp.asarray(rng.normal(size=(buckets,)), dtype), tuple(shape),
                           jnp.dtype(dtype), hashing.leaf_seed(path, 0), signed)


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  opt_state = optax.adam(1e-3).init({"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)})
  return {
      "params": {
          "Dense_0": {"kernel": _shared(rng, (64, 48), 16), "bias": jnp.asarray(rng.normal(size=(48,)), jnp.float32)},
          "Dense_1": {"kernel": _shared(rng, (48, 10), 5, jnp.bfloat16, axis=1)},
          "grouped": _shared(rng, (40, 6), 4, group_size=16),
          "vector": _shared(rng, (8, 12), 8, vector_dim=2),
          "hashed": _hashed(rng, (30, 20), 37, "params/hashed"),
          "hashed_bf16": _hashed(rng, (7,), 3, "params/hashed_bf16", jnp.bfloat16, signed=False),
      },
      "extra": [np.arange(5, dtype=np.int32), None, (3, 2.5, "name", True), np.float32(1.5),
                np.zeros((0, 4), np.float32)],
      "int_keys": {3: jnp.ones((2,), jnp.bfloat16)},
      "opt_state": opt_state,
  }


def _assert_same(a, b):
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb
  for (pa, x), (_, y) in zip(la, lb):
    assert type(x) is type(y), (jax.tree_util.keystr(pa), type(x), type(y))
    if hasattr(x, "dtype"):
      assert np.dtype(x.dtype) == np.dtype(y.dtype), jax.tree_util.keystr(pa)
      np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))
    else:
      assert x == y


def _plain(x):
  """``x`` with namedtuples as plain tuples: what restore gives back without a target."""
  if types.is_compressed(x) or x is None:
    return x
  if isinstance(x, tuple):
    return tuple(_plain(v) for v in x)
  if isinstance(x, list):
    return [_plain(v) for v in x]
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  return x


def _du(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


_CHILD_RESTORE = textwrap.dedent("""
    import sys, numpy as np, jax
    import qws_jax
    from qws_jax._src import checkpoint, types
    tree = checkpoint.restore(sys.argv[1])
    kinds = {}
    def visit(p, x):
      kinds[jax.tree_util.keystr(p)] = type(x).__name__
      return x
    jax.tree_util.tree_map_with_path(visit, tree, is_leaf=types.is_compressed)
    dense = qws_jax.unshare(tree)
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(dense)[0]:
      if hasattr(x, "dtype"):
        a = np.asarray(x)
        out[jax.tree_util.keystr(p) + "|" + a.dtype.name + "|" + repr(a.shape)] = a.reshape(-1).view(np.uint8)
    np.savez(sys.argv[2], **out)
    print(repr(kinds))
""")


def test_restore_in_new_process_is_bit_exact(tmp_path):
  tree = _tree()
  ckpt = save(tmp_path / "ckpt", tree)
  tree = _plain(tree)  # restored without a target: namedtuples as tuples
  proc = subprocess.run([sys.executable, "-c", _CHILD_RESTORE, ckpt, str(tmp_path / "out.npz")],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  kinds = eval(proc.stdout.strip().splitlines()[-1])  # pylint: disable=eval-used
  want_kinds = {}
  jax.tree_util.tree_map_with_path(
      lambda p, x: want_kinds.__setitem__(jax.tree_util.keystr(p), type(x).__name__),
      tree, is_leaf=types.is_compressed)
  assert kinds == want_kinds
  assert kinds["['params']['Dense_1']['kernel']"] == "SharedArray"
  assert kinds["['params']['hashed']"] == "HashedArray"
  got = np.load(tmp_path / "out.npz")
  dense = share_lib.unshare(tree)
  want = {}
  for p, x in jax.tree_util.tree_flatten_with_path(dense)[0]:
    if hasattr(x, "dtype"):
      a = np.asarray(x)
      want[jax.tree_util.keystr(p) + "|" + a.dtype.name + "|" + repr(a.shape)] = a.reshape(-1).view(np.uint8)
  assert sorted(got.files) == sorted(want)
  for key, a in want.items():
    np.testing.assert_array_equal(got[key], a, err_msg=key)


def test_roundtrip_same_types_and_metadata(tmp_path):
  tree = _tree(1)
  save(tmp_path / "c", tree)
  got = restore(tmp_path / "c")
  _assert_same(_plain(tree), got)
  for name in ("Dense_1", "grouped", "vector"):
    a = tree["params"][name] if name != "Dense_1" else tree["params"][name]["kernel"]
    b = got["params"][name] if name != "Dense_1" else got["params"][name]["kernel"]
    assert (a.shape, a.dtype, a.bits, a.axis, a.group_size, a.vector_dim) == (
        b.shape, b.dtype, b.bits, b.axis, b.group_size, b.vector_dim)
  h, g = tree["params"]["hashed_bf16"], got["params"]["hashed_bf16"]
  assert (h.seed, h.signed, h.version, h.dtype) == (g.seed, g.signed, g.version, g.dtype)
  assert isinstance(got["extra"][3], np.float32)
  assert isinstance(got["extra"][0], np.ndarray) and isinstance(got["params"]["Dense_0"]["bias"], jax.Array)
  # Namedtuples come back as plain tuples (restore imports nothing the file names) ...
  assert type(got["opt_state"][0]) is tuple
  # ... and as themselves with a target.
  again = restore(tmp_path / "c", target=tree)
  assert type(again["opt_state"][0]).__name__ == "ScaleByAdamState"
  _assert_same(tree, again)


def test_restore_with_target_and_eval_shape(tmp_path):
  tree = {"w": _shared(np.random.default_rng(2), (32, 16), 8), "b": jnp.zeros((16,), jnp.float32)}
  save(tmp_path / "c", tree)
  got = restore(tmp_path / "c", target=jax.eval_shape(lambda: tree))
  _assert_same(tree, got)
  with pytest.raises(ValueError, match=r"does not match.*'b'.*float32\[8\]"):
    restore(tmp_path / "c", target={**tree, "b": jax.ShapeDtypeStruct((8,), jnp.float32)})
  with pytest.raises(ValueError, match=r"does not match.*not in the checkpoint: \['c'\]"):
    restore(tmp_path / "c", target={**tree, "c": jnp.zeros(3)})
  other_k = _shared(np.random.default_rng(2), (32, 16), 4)
  with pytest.raises(ValueError, match=r"does not match.*'w'"):
    restore(tmp_path / "c", target={**tree, "w": other_k})


def test_checkpoint_size_is_packed(tmp_path):
  rng = np.random.default_rng(3)
  tree = {f"w{i}": _shared(rng, (256, 256), k) for i, k in enumerate((16, 4, 32))}
  payload = sum(x.nbytes for x in tree.values())
  for compress in (True, False):
    path = save(tmp_path / f"c{compress}", tree, compress=compress)
    size = _du(path)
    # Random indices do not compress; the constant covers Orbax's per-item files.
    assert size <= 1.1 * payload + 32 * 1024, (compress, size, payload)
    assert size >= payload * (0.95 if compress else 1.0)


@pytest.mark.parametrize("how", ["missing", "file", "empty_dir", "plain_orbax", "bad_json",
                                 "format_version", "hash_version", "no_tree", "bad_shape",
                                 "wrong_format", "arrays_missing"])
def test_restore_errors(tmp_path, how):
  tree = {"w": _shared(np.random.default_rng(4), (16, 8), 4),
          "h": _hashed(np.random.default_rng(4), (4, 5), 3, "h")}
  path = str(tmp_path / "ckpt")
  if how == "missing":
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*ckpt"):
      restore(path)
    return
  if how == "file":
    open(path, "w").write("x")
    with pytest.raises(ValueError, match="is a file, not a qws_jax checkpoint"):
      restore(path)
    return
  if how == "empty_dir":
    os.mkdir(path)
    with pytest.raises(ValueError, match="ckpt.* is not a qws_jax checkpoint"):
      restore(path)
    return
  if how == "plain_orbax":
    with ocp.StandardCheckpointer() as c:
      c.save(path, {"a": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="is not a qws_jax checkpoint.*StandardCheckpointer"):
      restore(path)
    return
  save(path, tree)
  meta_file = os.path.join(path, "qws_jax", "metadata")
  meta = json.load(open(meta_file))
  if how == "bad_json":
    open(meta_file, "w").write('{"format": "qws_jax", "tree": ')
    pattern = "corrupted qws_jax checkpoint metadata in .*ckpt"
  elif how == "format_version":
    meta["format_version"] = 99
    pattern = "ckpt.* format version 99"
  elif how == "wrong_format":
    meta["format"] = "something_else"
    pattern = "ckpt.* has format 'something_else'"
  elif how == "hash_version":
    meta["tree"]["items"][1]["meta"]["version"] = 7
    pattern = "ckpt.*leaf 'h' uses hash version 7"
  elif how == "no_tree":
    del meta["tree"]
    pattern = "corrupted qws_jax checkpoint metadata in .*ckpt"
  elif how == "bad_shape":
    meta["tree"]["items"][0]["meta"]["shape"] = [16, 9]
    pattern = "corrupted qws_jax checkpoint .*ckpt.*'w'"
  else:
    shutil.rmtree(os.path.join(path, "arrays"))
    pattern = "corrupted qws_jax checkpoint .*ckpt.*'arrays' item is missing"
  if how != "bad_json":
    json.dump(meta, open(meta_file, "w"))
  with pytest.raises(ValueError, match=pattern):
    restore(path)


def test_save_errors(tmp_path):
  save(tmp_path / "c", {"a": np.ones(2, np.float32)})
  with pytest.raises(FileExistsError, match="already exists; pass force=True"):
    save(tmp_path / "c", {"a": np.ones(2, np.float32)})
  save(tmp_path / "c", {"a": np.zeros(3, np.float32)}, force=True)
  np.testing.assert_array_equal(restore(tmp_path / "c")["a"], np.zeros(3, np.float32))
  with pytest.raises(TypeError, match="cannot save a object at 'x/y'"):
    save(tmp_path / "d", {"x": {"y": object()}})
  bad = types.SharedArray(jnp.zeros((4, 1), jnp.uint8), jnp.zeros((4,), jnp.float32), (4, 2),
                          jnp.dtype(jnp.float32), 1)
  with pytest.raises(ValueError, match="'w'"):
    save(tmp_path / "e", {"w": bad})
  assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "e")


def test_standard_orbax_routes(tmp_path):
  """Compressed trees are ordinary pytrees for Orbax: StandardCheckpointer and
  CheckpointManager restore them given an abstract target from jax.eval_shape."""
  tree = {"params": {"w": _shared(np.random.default_rng(5), (32, 8), 16, axis=1),
                     "h": _hashed(np.random.default_rng(5), (8, 8), 9, "params/h")},
          "step": jnp.asarray(3, jnp.int32)}
  abstract = jax.eval_shape(lambda: tree)
  with ocp.StandardCheckpointer() as c:
    c.save(tmp_path / "std", tree)
  with ocp.StandardCheckpointer() as c:
    _assert_same(tree, c.restore(tmp_path / "std", abstract))
  opts = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(tmp_path / "mngr", options=opts) as m:
    for step in range(3):
      m.save(step, args=ocp.args.StandardSave(tree))
    m.wait_until_finished()
    assert m.all_steps() == [1, 2]
  with ocp.CheckpointManager(tmp_path / "mngr", options=opts) as m:
    got = m.restore(m.latest_step(), args=ocp.args.StandardRestore(abstract))
  _assert_same(tree, got)


def test_checkpoint_manager_interval_keep_resume(tmp_path):
  rng = np.random.default_rng(6)
  params = {"w": _shared(rng, (16, 8), 4)}
  opt = optax.adam(1e-2)
  state = {"params": params, "opt_state": opt.init(params), "step": 0}
  with checkpoint.CheckpointManager(tmp_path / "run", save_interval_steps=2, max_to_keep=2) as m:
    saved = []
    for step in range(7):  # a stand-in for training: move the codebook
      w = state["params"]["w"]
      w = types.SharedArray(w.indices, w.codebook + 0.01, w.shape, w.dtype, w.bits)
      state = {**state, "params": {"w": w}, "step": step}
      saved.append(m.save(step, state))
    m.wait_until_finished()
    assert saved == [True, False, True, False, True, False, True]
    assert m.all_steps() == [4, 6]
  with pytest.raises(ValueError, match="holds steps .*CheckpointManager"):
    restore(tmp_path / "run")
  with checkpoint.CheckpointManager(tmp_path / "run") as m:  # a fresh manager resumes
    assert m.latest_step() == 6
    got = m.restore()
    with pytest.raises(FileNotFoundError, match="no checkpoint step 5"):
      m.restore(5)
  _assert_same(_plain(state), got)
  assert got["step"] == 6


_CHILD_KILLED_SAVE = textwrap.dedent("""
    import os, sys, time, asyncio
    import numpy as np, jax.numpy as jnp, optax
    from orbax.checkpoint._src.path import atomicity
    from qws_jax._src import checkpoint, packing, types
    run, marker, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    rng = np.random.default_rng(0)
    def tree(n, value):
      idx = packing.pack(rng.integers(0, 16, size=(n, 256)).astype(np.uint8), 4)
      cb = jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32) * value
      w = types.SharedArray(idx, cb, (n, 256), jnp.dtype(jnp.float32), 4)
      return {"params": {"w": w}, "opt_state": optax.sgd(0.1, momentum=0.9).init({"w": cb})}
    if mode == "manager":
      m = checkpoint.CheckpointManager(run, max_to_keep=5)
      m.save(0, tree(64, 1.0)); m.wait_until_finished()
    else:
      checkpoint.save(run + "/first", tree(64, 1.0))
    if mode != "timing":
      # Block the commit of the next save: its data is written, it is not renamed yet.
      async def blocked(self, *a, **k):
        open(marker, "w").write("in save")
        while True:
          time.sleep(1)
      atomicity.AtomicRenameTemporaryPath.finalize = blocked
    else:
      open(marker, "w").write("in save")
    if mode == "manager":
      m.save(1, tree(4096, 2.0)); m.wait_until_finished()
    else:
      checkpoint.save(run + "/second", tree(8192, 2.0))
    open(marker + ".done", "w").write("done")
""")


@pytest.mark.parametrize("mode", ["manager", "save", "timing"])
def test_save_killed_mid_write_leaves_previous_checkpoint(tmp_path, mode):
  run, marker = str(tmp_path / "run"), str(tmp_path / "marker")
  os.makedirs(run, exist_ok=True)
  proc = subprocess.Popen([sys.executable, "-c", _CHILD_KILLED_SAVE, run, marker, mode],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert os.path.exists(marker), proc.communicate()[1][-3000:]
  if mode != "timing":
    # The blocked commit: wait until the temporary directory of the save has data in it.
    while time.time() < deadline and not any(
        ".orbax-checkpoint-tmp" in n and _du(os.path.join(root, n)) > 100_000
        for root, dirs, _ in os.walk(run) for n in dirs):
      time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  if mode == "manager":
    with checkpoint.CheckpointManager(run) as m:
      steps = m.all_steps()
      assert 0 in steps and (mode == "timing" or steps == [0])
      got = m.restore(0)
    np.testing.assert_array_equal(got["params"]["w"].codebook,
                                  np.asarray(jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32)))
    return
  got = restore(os.path.join(run, "first"))
  assert got["params"]["w"].shape == (64, 256)
  second = os.path.join(run, "second")
  if os.path.exists(second):  # timing mode: the save may have completed before the kill
    assert mode == "timing" and os.path.exists(marker + ".done")
    assert restore(second)["params"]["w"].shape == (8192, 256)
  else:
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*second"):
      restore(second)


def test_custom_nodes_restore_with_target(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flax import struct  # pylint: disable=g-import-not-at-top

  @struct.dataclass
  class Box:
    a: jax.Array
    w: types.SharedArray
    n: int = struct.field(pytree_node=False, default=3)

  tree = {"box": Box(jnp.arange(3.0), _shared(np.random.default_rng(7), (8, 4), 4))}
  save(tmp_path / "box", tree)
  with pytest.raises(ValueError, match=r"custom pytree node .*Box.* at 'box'.*target="):
    restore(tmp_path / "box")
  _assert_same(tree, restore(tmp_path / "box", target=tree))
  state = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
  save(tmp_path / "nnx", state)
  abstract = nnx.state(nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(1))))
  _assert_same(state, restore(tmp_path / "nnx", target=abstract))


def test_boxed_params_restore_without_target(tmp_path):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  tree = {"Dense_0": {"kernel": nn.LogicallyPartitioned(
      _shared(np.random.default_rng(8), (32, 16), 4), ("embed", "mlp")),
                      "bias": nn.Partitioned(jnp.zeros((16,), jnp.float32), ("mlp",))}}
  save(tmp_path / "c", tree)
  got = restore(tmp_path / "c")
  _assert_same(tree, got)
  assert type(got["Dense_0"]["kernel"]) is nn.LogicallyPartitioned
  assert got["Dense_0"]["kernel"].names == ("embed", "mlp")
  assert type(got["Dense_0"]["bias"]) is nn.Partitioned
  _assert_same(tree, restore(tmp_path / "c", target=tree))
