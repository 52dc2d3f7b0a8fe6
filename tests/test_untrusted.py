"""Hostile and damaged input: checkpoints are untrusted files, `force=` never loses data.

Each case here failed on qws_jax 0.1.0 (issue "Safe checkpoints and strict inputs").
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qws_jax
from qws_jax import cli
from qws_jax._src import checkpoint
from qws_jax._src import hashing
from qws_jax._src import packing
from qws_jax._src import types

save, restore = checkpoint.save, checkpoint.restore


def _meta_file(path):
  return os.path.join(path, "qws_jax", "metadata")


def _load_meta(path):
  with open(_meta_file(path)) as f:
    return json.load(f)


def _dump_meta(path, meta):
  with open(_meta_file(path), "w") as f:
    json.dump(meta, f)


def _shared(idx, cb, shape, **kw):
  cb = jnp.asarray(cb, jnp.float32)
  k = cb.shape[-1]
  return types.SharedArray(packing.pack(np.asarray(idx, np.uint8), types.bits_for(k)), cb,
                           tuple(shape), jnp.dtype(jnp.float32), types.bits_for(k), **kw)


def _small_ckpt(path):
  rng = np.random.default_rng(0)
  w = qws_jax.share({"w": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)}, k=4,
                    predicate=lambda p, x: True)["w"]
  tree = {"w": w, "b": np.arange(3, dtype=np.float32),
          "opt": optax.adam(1e-3).init({"x": jnp.ones(2)}), "n": 3}
  save(path, tree)
  return tree


# ----------------------------------------------------------------------------- no code runs


_CHILD_NO_IMPORT = textwrap.dedent("""
    import json, os, sys
    ckpt, version, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.chdir(os.path.dirname(ckpt))           # the checkpoint's folder is on sys.path ...
    sys.path.insert(0, os.path.dirname(ckpt))  # ... as in a REPL or a script beside it
    from qws_jax._src import checkpoint
    meta = json.load(open(os.path.join(ckpt, "qws_jax", "metadata")))
    meta["format_version"] = version
    adam, empty = meta["tree"]["items"][2]["items"]   # ScaleByAdamState, EmptyState
    assert adam["t"] == empty["t"] == "namedtuple" and empty["items"] == []
    if kind == "module":
      adam["type"] = adam["name"] = "evil_module:Thing"
    else:  # a callable without _fields and a file that lists none: 0.1.0 called it
      empty["type"] = empty["name"] = "os:abort"
    json.dump(meta, open(os.path.join(ckpt, "qws_jax", "metadata"), "w"))
    tree = checkpoint.restore(ckpt)
    print("RESTORED", type(tree["opt"][0]).__name__, type(tree["opt"][1]).__name__)
""")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("kind", ["module", "abort"])
def test_restore_imports_and_calls_nothing_the_file_names(tmp_path, version, kind):
  ckpt = str(tmp_path / "ckpt")
  _small_ckpt(ckpt)
  marker = tmp_path / "imported"
  (tmp_path / "evil_module.py").write_text(
      f"open({str(marker)!r}, 'w').write('ran')\nclass Thing(tuple):\n  _fields = ()\n")
  proc = subprocess.run([sys.executable, "-c", _CHILD_NO_IMPORT, ckpt, str(version), kind],
                        capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]  # os.abort would kill the child
  assert "RESTORED tuple tuple" in proc.stdout
  assert not marker.exists(), "restore imported a module named by the checkpoint"


def test_namedtuples_and_custom_nodes_need_a_target(tmp_path):
  ckpt = str(tmp_path / "c")
  tree = _small_ckpt(ckpt)
  plain = restore(ckpt)
  assert type(plain["opt"][0]) is tuple and plain["n"] == 3
  typed = restore(ckpt, target=tree)
  assert type(typed["opt"][0]) is type(tree["opt"][0])
  np.testing.assert_array_equal(typed["opt"][0].mu["x"], tree["opt"][0].mu["x"])


# ----------------------------------------------------------------------------- force=


def test_force_never_replaces_what_is_not_a_checkpoint(tmp_path):
  user_dir = tmp_path / "mine"
  user_dir.mkdir()
  (user_dir / "notes.txt").write_text("precious")
  with pytest.raises(FileExistsError, match="not a qws_jax checkpoint.*notes.txt"):
    save(user_dir, {"a": np.ones(2, np.float32)}, force=True)
  assert (user_dir / "notes.txt").read_text() == "precious"
  user_file = tmp_path / "file.bin"
  user_file.write_bytes(b"123")
  with pytest.raises(FileExistsError, match="not a qws_jax checkpoint"):
    save(user_file, {"a": np.ones(2, np.float32)}, force=True)
  assert user_file.read_bytes() == b"123"
  # A checkpoint with a user's file dropped inside is not replaced either.
  ckpt = tmp_path / "ckpt"
  save(ckpt, {"a": np.ones(2, np.float32)})
  (ckpt / "README").write_text("mine")
  with pytest.raises(FileExistsError, match="README"):
    save(ckpt, {"a": np.zeros(2, np.float32)}, force=True)
  (ckpt / "README").unlink()
  save(ckpt, {"a": np.zeros(2, np.float32)}, force=True)
  np.testing.assert_array_equal(restore(ckpt)["a"], np.zeros(2, np.float32))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "file.bin", "mine"]


def test_force_save_that_fails_keeps_the_old_checkpoint(tmp_path):
  ckpt = tmp_path / "ckpt"
  save(ckpt, {"a": np.ones(2, np.float32)})
  with pytest.raises(TypeError, match="cannot save"):
    save(ckpt, {"a": object()}, force=True)
  np.testing.assert_array_equal(restore(ckpt)["a"], np.ones(2, np.float32))


def test_cli_compress_force_never_deletes_its_input(tmp_path, capsys):
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  d = tmp_path / "dir"
  d.mkdir()
  src = d / "model.safetensors"
  st_numpy.save_file({"w": np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)},
                     str(src))
  before = src.read_bytes()
  assert cli.main(["compress", str(src), str(d), "--force", "--quiet", "--k", "4"]) == 1
  err = capsys.readouterr().err
  assert "holds the input" in err and "Traceback" not in err
  assert src.read_bytes() == before
  out = tmp_path / "out"
  assert cli.main(["compress", str(src), str(out), "--quiet", "--k", "4"]) == 0
  assert cli.main(["compress", str(out), str(out), "--force", "--quiet", "--k", "4"]) == 1
  assert "holds the input" in capsys.readouterr().err
  assert isinstance(restore(out)["w"], types.SharedArray)


_CHILD_KILLED_FORCE = textwrap.dedent("""
    import os, shutil, sys, time
    import numpy as np
    from qws_jax._src import checkpoint
    path, marker, where = sys.argv[1], sys.argv[2], sys.argv[3]
    def block(*a, **k):
      open(marker, "w").write(where)
      while True:
        time.sleep(1)
    if where == "before_swap":
      checkpoint._swap_in = block
    elif where == "after_exchange":
      checkpoint.shutil.rmtree = block        # the old checkpoint is being deleted
    elif where == "fallback_between_renames":
      checkpoint._exchange = lambda a, b: False
      real = os.rename
      def rename(a, b):
        real(a, b)
        if ".qws-old-" in b:
          block()
      checkpoint.os.rename = rename
    elif where == "in_orbax":
      from orbax.checkpoint._src.path import atomicity
      async def blocked(self, *a, **k):
        block()
      atomicity.AtomicRenameTemporaryPath.finalize = blocked
    checkpoint.save(path, {"v": np.full(1000, 2.0, np.float32)}, force=True)
    open(marker, "w").write("done")
""")


@pytest.mark.parametrize("where", ["in_orbax", "before_swap", "after_exchange",
                                   "fallback_between_renames"])
def test_kill_during_force_save_leaves_old_or_new(tmp_path, where):
  path, marker = str(tmp_path / "ckpt"), str(tmp_path / "marker")
  save(path, {"v": np.full(1000, 1.0, np.float32)})
  proc = subprocess.Popen([sys.executable, "-c", _CHILD_KILLED_FORCE, path, marker, where],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 150
  while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert os.path.exists(marker), proc.communicate()[1][-3000:]
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  if where == "fallback_between_renames":
    # Without an atomic exchange there is a moment with nothing at `path`: restore names
    # the complete old checkpoint that the interrupted save left beside it.
    with pytest.raises(FileNotFoundError, match=r"interrupted save\(force=True\) left the complete checkpoint.*qws-old"):
      restore(path)
    old = [n for n in os.listdir(tmp_path) if ".qws-old-" in n]
    got = restore(os.path.join(tmp_path, old[0]))
    np.testing.assert_array_equal(got["v"], np.full(1000, 1.0, np.float32))
    return
  got = restore(path)["v"]
  want = 2.0 if where == "after_exchange" else 1.0
  np.testing.assert_array_equal(got, np.full(1000, want, np.float32))


# ----------------------------------------------------------------------------- values


def test_restore_refuses_indices_past_the_codebook(tmp_path):
  idx = np.zeros((4, 8), np.uint8)
  idx[2, 5] = 3  # k=3 with 2-bit indices: index 3 is past the end
  w = _shared(idx, [-1.0, 0.0, 1.0], (4, 8))
  with pytest.raises(ValueError, match=r"cannot save the leaf at 'w'.*\[0, alphabet=3\)"):
    save(tmp_path / "c", {"w": w})  # the entropy coder refuses it ...
  save(tmp_path / "c", {"w": w}, entropy=False)  # ... a crafted file has packed indices
  with pytest.raises(ValueError, match=r"index 3 at \(2, 5\) is past the end of the codebook"
                                       r" \(k=3\) at 'w'"):
    restore(tmp_path / "c")
  # Per channel: index 3 of channel 0 must not silently read channel 1's codebook.
  cb = np.sort(np.random.default_rng(0).normal(size=(8, 3)), axis=-1)
  wc = _shared(idx, cb, (4, 8), axis=1)
  save(tmp_path / "d", {"p": {"w": wc}}, entropy=False)
  with pytest.raises(ValueError, match="past the end.* at 'p/w'"):
    restore(tmp_path / "d")
  with pytest.raises(ValueError, match="past the end"):
    qws_jax.validate_shared_array(wc)


def test_restore_refuses_nonfinite_codebooks(tmp_path):
  w = _shared(np.zeros((4, 8), np.uint8), [-1.0, np.nan, 1.0, 2.0], (4, 8))
  save(tmp_path / "c", {"w": w})
  with pytest.raises(ValueError, match="NaN.*'w'"):
    restore(tmp_path / "c")


def test_restore_keeps_fine_tuned_unsorted_codebooks(tmp_path):
  w = _shared(np.arange(32).reshape(4, 8) % 4, [1.0, -1.0, 0.5, 0.0], (4, 8))
  save(tmp_path / "c", {"w": w})
  got = restore(tmp_path / "c")["w"]
  np.testing.assert_array_equal(got.materialize(), w.materialize())


def test_absurd_sizes_are_refused(tmp_path):
  h = types.HashedArray(jnp.ones((1,), jnp.float32), (8, 8), jnp.dtype(jnp.float32), seed=1)
  save(tmp_path / "c", {"h": h})
  meta = _load_meta(tmp_path / "c")
  meta["tree"]["items"][0]["meta"]["shape"] = [65535, 65535]
  _dump_meta(tmp_path / "c", meta)
  with pytest.raises(ValueError, match=r"17179344900 bytes.*max_bytes=4294967296 at 'h'"):
    restore(tmp_path / "c")
  got = restore(tmp_path / "c", max_bytes=None)["h"]  # the caller can lift the limit
  assert got.shape == (65535, 65535) and got.num_buckets == 1
  # (2**32, 2**32) has 2**64 elements: an int64 product wraps to 0; Python ints do not.
  meta["tree"]["items"][0]["meta"]["shape"] = [2**32, 2**32]
  _dump_meta(tmp_path / "c", meta)
  with pytest.raises(ValueError, match="'h'"):
    restore(tmp_path / "c", max_bytes=None)
  w = _shared(np.zeros((4, 8), np.uint8), [-1.0, 0.0, 1.0, 2.0], (4, 8))
  save(tmp_path / "d", {"w": w})
  meta = _load_meta(tmp_path / "d")
  meta["tree"]["items"][0]["meta"]["shape"] = [2**32, 2**32, 4, 8]
  _dump_meta(tmp_path / "d", meta)
  with pytest.raises(ValueError, match="'w'"):
    restore(tmp_path / "d", max_bytes=None)


def test_stored_array_must_match_orbax_metadata_before_reading(tmp_path):
  save(tmp_path / "c", {"a": np.arange(6, dtype=np.float32)})
  meta = _load_meta(tmp_path / "c")
  meta["tree"]["items"][0]["shape"] = [600000000]
  _dump_meta(tmp_path / "c", meta)
  with pytest.raises(ValueError, match=r"'a' is stored as float32\[6\].*says float32\[600000000\]"):
    restore(tmp_path / "c")


# ----------------------------------------------------------------------------- key paths


def test_restore_target_matches_key_tuples_not_joined_strings(tmp_path):
  tree = {"a/b": np.full(3, 1.0, np.float32), "a": {"b": np.full(3, 2.0, np.float32)}}
  save(tmp_path / "c", tree)
  for got in (restore(tmp_path / "c"), restore(tmp_path / "c", target=tree)):
    np.testing.assert_array_equal(got["a/b"], tree["a/b"])
    np.testing.assert_array_equal(got["a"]["b"], tree["a"]["b"])
  with pytest.raises(ValueError, match=r"not in the target: \['a\\\\/b'\]"):
    restore(tmp_path / "c", target={"a": {"b": tree["a"]["b"]}})


def test_rules_see_distinct_paths_for_colliding_keys():
  tree = {"a/b": jnp.ones((64, 32)), "a": {"b": jnp.ones((64, 32))}}
  out = qws_jax.share(tree, k=4, rules=[qws_jax.Rule(r"^a/b$", k=8)],
                      predicate=lambda p, x: False)
  assert isinstance(out["a"]["b"], types.SharedArray) and out["a"]["b"].k == 8
  assert not isinstance(out["a/b"], types.SharedArray)


# ----------------------------------------------------------------------------- contract


def _mutations(meta, rng, n):
  """Damaged copies of a checkpoint's JSON metadata: deleted keys, wrong types, odd values."""
  weird = [None, -1, 2**70, 1.5, "x", [], {}, [1, "a"], True, {"t": "dict"}, "../../etc",
           "os:system", [2**40, 2**40], {"int": "z"}]

  def nodes(x, out):
    if isinstance(x, dict):
      out.append(x)
      for v in x.values():
        nodes(v, out)
    elif isinstance(x, list):
      out.append(x)
      for v in x:
        nodes(v, out)
    return out

  for _ in range(n):
    m = copy.deepcopy(meta)
    for _ in range(rng.integers(1, 4)):
      targets = nodes(m["tree"], [])
      node = targets[rng.integers(len(targets))]
      if isinstance(node, dict) and node:
        key = list(node)[rng.integers(len(node))]
        if rng.random() < 0.3:
          del node[key]
        else:
          node[key] = weird[rng.integers(len(weird))]
      elif isinstance(node, list) and node:
        i = rng.integers(len(node))
        if rng.random() < 0.3:
          del node[i]
        else:
          node[i] = weird[rng.integers(len(weird))]
    yield m


def test_damaged_metadata_gives_value_error_only(tmp_path):
  ckpt = str(tmp_path / "c")
  _small_ckpt(ckpt)
  meta = _load_meta(ckpt)
  rng = np.random.default_rng(0)
  outcomes = {"refused": 0, "restored": 0}
  for m in _mutations(meta, rng, 60):
    _dump_meta(ckpt, m)
    try:
      tree = restore(ckpt)
    except ValueError as e:
      assert "\n" not in str(e) and len(str(e)) < 3000
      outcomes["refused"] += 1
      continue
    outcomes["restored"] += 1  # a mutation that keeps the file valid restores valid leaves
    for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=types.is_compressed):
      if types.is_compressed(x):
        types.validate(x, jax.tree_util.keystr(p), check_sorted=False)
  assert outcomes["refused"] > 30, outcomes
  # Deep nesting (json's own RecursionError, then ours), and wrong top-level values.
  deep = ('{"format": "qws_jax", "format_version": 2, "tree": '
          + '{"t": "list", "items": [' * 100_000 + "]}" * 100_000 + "}")
  nested = ('{"format": "qws_jax", "format_version": 2, "tree": '
            + '{"t": "list", "items": [' * 400 + "]}" * 400 + "}")
  for text in (deep, nested, "[1, 2]", '{"format": "qws_jax", "format_version": true}'):
    with open(_meta_file(ckpt), "w") as f:
      f.write(text)
    with pytest.raises(ValueError):
      restore(ckpt)


def test_cli_inspect_damaged_files_prints_one_line(tmp_path, capsys):
  ckpt = str(tmp_path / "c")
  _small_ckpt(ckpt)
  meta = _load_meta(ckpt)
  for m in list(_mutations(meta, np.random.default_rng(1), 10)) + [["not", "a", "dict"]]:
    _dump_meta(ckpt, m)
    code = cli.main(["inspect", ckpt])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code:
      assert code == 1 and err.count("\n") == 1 and err.startswith("qws-jax: error: ")


def test_checkpoint_manager_never_overwrites_a_step(tmp_path):
  with checkpoint.CheckpointManager(tmp_path / "run", async_save=False) as m:
    assert m.save(0, {"a": np.ones(2, np.float32)})
    with pytest.raises(FileExistsError, match="step 0 already exists"):
      m.save(0, {"a": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(m.restore(0)["a"], np.ones(2, np.float32))


def test_format_1_checkpoints_still_restore(tmp_path):
  ckpt = str(tmp_path / "c")
  rng = np.random.default_rng(0)
  w = qws_jax.share({"w": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)}, k=4,
                    predicate=lambda p, x: True)["w"]
  h = types.HashedArray(jnp.ones((5,), jnp.float32), (4, 4), jnp.dtype(jnp.float32),
                        seed=hashing.leaf_seed("h", 0))
  save(ckpt, {"w": w, "h": h})
  meta = _load_meta(ckpt)
  meta["format_version"] = 1
  for node in meta["tree"]["items"]:  # format 1 wrote the fields on the node itself
    leaf_meta = node.pop("meta")
    node.update(t=leaf_meta.pop("kind"), **leaf_meta, **node.pop("arrays"))
  _dump_meta(ckpt, meta)
  got = restore(ckpt)
  np.testing.assert_array_equal(got["w"].materialize(), w.materialize())
  np.testing.assert_array_equal(got["h"].materialize(), h.materialize())
