"""Tests of the ``qws-jax`` console script (run as a subprocess) and its commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import numpy as st_numpy

import qws_jax
from qws_jax import cli
from qws_jax._src import checkpoint
from qws_jax._src import share as share_lib
from qws_jax._src import types

def _script() -> list[str]:
  exe = shutil.which("qws-jax") or os.path.join(os.path.dirname(sys.executable), "qws-jax")
  if os.path.exists(exe):
    return [exe]
  return [sys.executable, "-m", "qws_jax.cli"]  # not installed as a script: same entry point


def _run(*args, timeout=180):
  env = {**os.environ, "PYTHONWARNINGS": "ignore"}
  env.pop("QWS_JAX_DEBUG", None)
  return subprocess.run(_script() + [str(a) for a in args], capture_output=True, text=True,
                        timeout=timeout, env=env)


def _assert_one_line_error(proc, pattern):
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("WARNING")]
  assert len(lines) == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  assert lines[0].startswith("qws-jax: error:"), lines
  import re  # pylint: disable=g-import-not-at-top
  assert re.search(pattern, lines[0]), lines[0]


def _weights(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "encoder.layer.0.weight": rng.normal(size=(64, 48)).astype(np.float32),
      "encoder.layer.0.bias": rng.normal(size=(48,)).astype(np.float32),
      "embeddings.weight": rng.normal(size=(100, 32)).astype(np.float32),
      "position_ids": np.arange(12, dtype=np.int64)[None],
  }


def test_compress_safetensors_then_inspect(tmp_path):
  weights = _weights()
  src = tmp_path / "model.safetensors"
  st_numpy.save_file(weights, str(src))
  out = tmp_path / "ckpt"
  proc = _run("compress", src, out, "--k", "16", "--method", "lloyd")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "total: 4 leaves (2 compressed)" in proc.stdout and "rel_mse" in proc.stdout
  assert sum(l.split()[2:5] == ["shared", "16", "tensor"] for l in proc.stdout.splitlines()) == 2
  assert "checkpoint on disk" in proc.stdout
  tree = checkpoint.restore(out)
  assert isinstance(tree["encoder.layer.0.weight"], types.SharedArray)
  assert isinstance(tree["embeddings.weight"], types.SharedArray)
  np.testing.assert_array_equal(tree["encoder.layer.0.bias"], weights["encoder.layer.0.bias"])
  np.testing.assert_array_equal(tree["position_ids"], weights["position_ids"])
  assert tree["position_ids"].dtype == np.int64
  dense = share_lib.unshare(tree)
  for name in ("encoder.layer.0.weight", "embeddings.weight"):
    w = weights[name]
    err = np.linalg.norm(np.asarray(dense[name]) - w) / np.linalg.norm(w)
    assert err < 0.12, (name, err)  # 16 levels on a Gaussian: about 0.1 relative error
  proc = _run("inspect", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in weights:
    assert name in proc.stdout
  assert "qws_jax format v2" in proc.stdout and "total: 4 leaves (2 compressed)" in proc.stdout
  # A corrupt checkpoint: one-line error, non-zero exit.
  with open(out / "qws_jax" / "metadata", "w") as f:
    f.write("{not json")
  _assert_one_line_error(_run("inspect", out), r"corrupted qws_jax checkpoint metadata")


def test_cli_errors_are_one_line(tmp_path):
  _assert_one_line_error(_run("compress", tmp_path / "missing.safetensors", tmp_path / "o"),
                         r"input .*missing.safetensors.* does not exist")
  _assert_one_line_error(_run("inspect", tmp_path / "nothing"), r"no checkpoint at .*nothing")
  proc = _run("compress")  # argparse usage error
  assert proc.returncode == 2 and "usage" in proc.stderr


def test_cli_errors_in_process(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("hello")
  assert cli.main(["compress", str(tmp_path / "notes.txt"), str(tmp_path / "o")]) == 1
  assert "is a file but not .safetensors" in capsys.readouterr().err
  (tmp_path / "bad.safetensors").write_bytes(b"garbage")
  assert cli.main(["compress", str(tmp_path / "bad.safetensors"), str(tmp_path / "o")]) == 1
  assert "cannot read safetensors file" in capsys.readouterr().err
  os.mkdir(tmp_path / "empty")
  assert cli.main(["inspect", str(tmp_path / "empty")]) == 1
  assert "is not a qws_jax checkpoint" in capsys.readouterr().err
  assert cli.main(["compress", str(tmp_path / "empty"), str(tmp_path / "o")]) == 1
  assert "is not an Orbax checkpoint or a .safetensors file" in capsys.readouterr().err
  checkpoint.save(tmp_path / "exists", {"a": np.ones(2, np.float32)})
  assert cli.main(["compress", str(tmp_path / "empty"), str(tmp_path / "exists")]) == 1
  assert "already exists; pass --force" in capsys.readouterr().err
  assert cli.main(["compress", str(tmp_path / "empty"), str(tmp_path / "o"), "--include", "("]) == 1
  assert "--include '(' is not a valid regex" in capsys.readouterr().err


def test_compress_orbax_input_with_options(tmp_path, capsys):
  rng = np.random.default_rng(1)
  params = {"params": {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                                   "bias": jnp.zeros((32,), jnp.float32)},
                       "Embed_0": {"embedding": jnp.asarray(rng.normal(size=(50, 32)), jnp.float32)}}}
  with ocp.StandardCheckpointer() as c:
    c.save(tmp_path / "orbax", params)
  out = tmp_path / "c1"
  assert cli.main(["compress", str(tmp_path / "orbax"), str(out), "--k", "8", "--group-size", "16",
                   "--exclude", "Embed", "--quiet", "--method", "lloyd"]) == 0
  tree = checkpoint.restore(out)
  k = tree["params"]["Dense_0"]["kernel"]
  assert isinstance(k, types.SharedArray) and k.group_size == 16 and k.k == 8
  assert not types.is_compressed(tree["params"]["Embed_0"]["embedding"])
  out2 = tmp_path / "c2"
  assert cli.main(["compress", str(tmp_path / "orbax"), str(out2), "--k", "4", "--per-channel",
                   "--include", "kernel|embedding", "--method", "lloyd"]) == 0
  report = capsys.readouterr().out
  assert sum(l.split()[2:5] == ["shared", "4", "channel"] for l in report.splitlines()) == 2
  assert "rel_mse" in report and "total: 3 leaves (2 compressed)" in report
  tree = checkpoint.restore(out2)
  assert tree["params"]["Dense_0"]["kernel"].axis == 1
  assert tree["params"]["Embed_0"]["embedding"].axis == 1
  assert not types.is_compressed(tree["params"]["Dense_0"]["bias"])
  # A compressed checkpoint is a valid input: compressed leaves pass through.
  first = checkpoint.restore(out)
  assert cli.main(["compress", str(out), str(tmp_path / "c3"), "--k", "4", "--quiet",
                   "--method", "lloyd"]) == 0
  again = checkpoint.restore(tmp_path / "c3")
  np.testing.assert_array_equal(again["params"]["Dense_0"]["kernel"].indices,
                                first["params"]["Dense_0"]["kernel"].indices)
  assert again["params"]["Dense_0"]["kernel"].k == 8
  assert again["params"]["Embed_0"]["embedding"].k == 4


@pytest.mark.slow
def test_demo_quick(tmp_path):
  proc = _run("demo", "--quick", "--workdir", tmp_path / "demo", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  rows = {l.split()[0] + " " + l.split()[1]: l.split() for l in lines
          if l.startswith(("dense", "shared", "hashed"))}
  assert set(rows) == {"dense f32", "shared k=4", "shared k=16", "hashed 1/8"}, proc.stdout
  for name, r in rows.items():
    assert r[-1] in ("ok", "-"), r
    acc = float(r[3])
    assert acc > 0.85, (name, acc)  # 10 classes: chance is 0.1
  assert float(rows["shared k=4"][4]) < 3.0 and float(rows["dense f32"][4]) == 32.0
  for name in ("dense", "shared_k4", "shared_k16", "hashed"):
    assert os.path.isdir(tmp_path / "demo" / name)
  restored = checkpoint.restore(tmp_path / "demo" / "hashed")
  assert any(isinstance(x, types.HashedArray)
             for x in jax.tree.leaves(restored, is_leaf=types.is_compressed))


@pytest.mark.parametrize("layout", [{}, {"axis": 1}, {"group_size": 8}])
def test_canonicalize_sorts_codebook_keeps_weights(layout):
  from qws_jax._src import packing  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shape, k = (20, 6), 8
  grid = types.grid_shape(shape, layout.get("axis"), layout.get("group_size"))
  cb = jnp.asarray(rng.normal(size=grid + (k,)), jnp.float32)  # unsorted, as after fine-tuning
  idx = rng.integers(0, k, size=shape).astype(np.uint8)
  x = types.SharedArray(packing.pack(idx, 3), cb, shape, jnp.dtype(jnp.float32), 3,
                        layout.get("axis"), layout.get("group_size"))
  y = qws_jax.canonicalize({"w": x})["w"]
  types.validate_shared_array(y)  # sorted codebook, indices < k
  np.testing.assert_array_equal(np.asarray(y.materialize()), np.asarray(x.materialize()))
