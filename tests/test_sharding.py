"""Sharded parameters (issue 7): share / hash_share / unshare / matmul / checkpoints on meshes.

The checks need 8 devices, so they run in ONE subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before jax is imported);
the rest of the suite keeps its single CPU device. The worker records one entry per
check; each test below asserts its own entries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_WORKER = textwrap.dedent(r'''
import json, os, sys, tempfile, traceback
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import re
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import flax.linen as nn
import qws_jax
from qws_jax._src import sharding as shd
from qws_jax._src import tree as tree_lib
from qws_jax._src import types as types_lib
from qws_jax.kernels import hashed_matmul, shared_matmul

out = {}
def check(name, fn):
  try:
    out[name] = fn()
  except Exception:
    out[name] = {"error": traceback.format_exc()[-2000:]}

assert len(jax.devices()) == 8
x = jax.random.normal(jax.random.key(0), (512, 256), jnp.float32)
ref = qws_jax.share({"w": x}, k=16)["w"]
ref_dense = np.asarray(ref.materialize())

def mesh_of(shape, names, auto=False):
  t = AxisType.Auto if auto else AxisType.Explicit
  return jax.make_mesh(shape, names, axis_types=(t,) * len(shape))

CASES = [((8,), ("d",), P("d")), ((8,), ("d",), P(None, "d")), ((2, 4), ("a", "b"), P("a", "b")),
         ((4, 2), ("a", "b"), P("b", "a")), ((4, 2), ("a", "b"), P(None, ("a", "b")))]

def share_tensor(auto):
  res = []
  for shape, names, spec in CASES:
    mesh = mesh_of(shape, names, auto)
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    r = qws_jax.share({"w": xs}, k=16)["w"]
    d = qws_jax.unshare({"w": r})["w"]
    res.append(dict(case=f"{shape} {spec}",
                    idx_equal=bool(np.array_equal(ref.indices, r.indices)),
                    cb_equal=bool(np.array_equal(ref.codebook, r.codebook)),
                    idx_spec=str(r.indices.sharding.spec), leaf_spec=str(spec),
                    cb_replicated=r.codebook.sharding.is_fully_replicated,
                    dense_equal=bool(np.array_equal(np.asarray(d), ref_dense)),
                    dense_spec=str(d.sharding.spec),
                    idx_shard_bytes=max(s.data.nbytes for s in r.indices.addressable_shards),
                    idx_bytes=int(r.indices.nbytes)))
  return res
check("share_tensor_explicit", lambda: share_tensor(False))

def share_dtypes_weights():
  mesh = mesh_of((2, 4), ("a", "b"))
  res = []
  wts = jax.random.uniform(jax.random.key(2), x.shape, jnp.float32)
  for name, leaf, kw in (("bfloat16", x.astype(jnp.bfloat16), {"k": 16}),
                         ("weighted", x, {"k": 16, "weights": {"w": wts}}),
                         ("k64_refined", x, {"k": 64})):  # k >= 64: a psum-ed refinement step
    r0 = qws_jax.share({"w": leaf}, **kw)["w"]
    r = qws_jax.share({"w": jax.device_put(leaf, NamedSharding(mesh, P("a", "b")))}, **kw)["w"]
    res.append(dict(case=name, idx_equal=bool(np.array_equal(r0.indices, r.indices)),
                    cb_equal=bool(np.array_equal(r0.codebook, r.codebook)),
                    dtype=str(r.codebook.dtype)))
  return res
check("share_dtypes_weights", share_dtypes_weights)
check("share_tensor_auto", lambda: share_tensor(True))

def share_layouts():
  mesh = mesh_of((2, 4), ("a", "b"))
  xl = x[:256, :128]  # small rows and k: the vmapped DP compiles quickly
  xs = jax.device_put(xl, NamedSharding(mesh, P("a", "b")))
  res = []
  for kw in (dict(axis=-1), dict(group_size=64)):
    r0 = qws_jax.share({"w": xl}, k=4, **kw)["w"]
    r = qws_jax.share({"w": xs}, k=4, **kw)["w"]
    d = qws_jax.unshare({"w": r})["w"]
    res.append(dict(kw=str(kw), idx_equal=bool(np.array_equal(r0.indices, r.indices)),
                    cb_equal=bool(np.array_equal(r0.codebook, r.codebook)),
                    idx_spec=str(r.indices.sharding.spec), cb_spec=str(r.codebook.sharding.spec),
                    dense_equal=bool(np.array_equal(np.asarray(d), np.asarray(r0.materialize()))),
                    dense_spec=str(d.sharding.spec)))
  return res
check("share_layouts", share_layouts)

def hlo_max_elems(text):
  best = 0
  for m in re.finditer(r"\b(?:f32|s32|u32|u8|pred|f64|s8)\[([0-9,]*)\]", text):
    dims = [int(v) for v in m.group(1).split(",") if v]
    best = max(best, int(np.prod(dims)) if dims else 1)
  return best

def memory():
  # A "large" leaf: the per-device programs of the sharded stages never hold it whole,
  # and their per-device memory falls with the device count.
  big_host = jax.random.normal(jax.random.key(3), (2048, 1024), jnp.float32)
  res = {"leaf_elems": int(big_host.size), "leaf_bytes": int(big_host.nbytes)}
  for name, devs in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    mesh = jax.make_mesh((len(devs),), ("d",), axis_types=(AxisType.Explicit,), devices=devs)
    big = jax.device_put(big_host, NamedSharding(mesh, P("d")))
    local = (2048 // len(devs), 1024)
    cent = jax.device_put(jnp.linspace(-2.0, 2.0, 16), NamedSharding(mesh, P()))
    stages = {"histogram": shd._hist_fn(mesh, P("d"), ("d",), False, 18).lower(big),
              "assign_refine_pack": shd._assign_fn(mesh, P("d"), ("d",), 1, 4, local, False
                                                   ).lower(big, cent)}
    for stage, lowered in stages.items():
      c = lowered.compile()
      ma = c.memory_analysis()
      text = c.as_text()
      res[f"{stage}_{name}"] = dict(
          max_elems=hlo_max_elems(text), all_gathers=text.count("all-gather"),
          per_device_bytes=int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                               + ma.temp_size_in_bytes))
    if name == "eight":
      r = qws_jax.share({"w": big}, k=16)["w"]
      res["indices_shard_bytes"] = max(s.data.nbytes for s in r.indices.addressable_shards)
      res["indices_bytes"] = int(r.indices.nbytes)
      d = qws_jax.unshare({"w": r})["w"]
      res["dense_shard_bytes"] = max(s.data.nbytes for s in d.addressable_shards)
  return res
check("memory", memory)

def hashed():
  res = []
  h0 = qws_jax.hash_share({"w": x}, buckets=4096, init="from_dense")["w"]
  for shape, names, spec in CASES[:3]:
    mesh = mesh_of(shape, names)
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    h = qws_jax.hash_share({"w": xs}, buckets=4096, init="from_dense")["w"]
    d = qws_jax.unshare({"w": h})["w"]
    # fan_in init from an abstract sharded leaf: buckets land on the leaf's mesh.
    abstract = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=xs.sharding)
    hf = qws_jax.hash_share({"w": abstract}, buckets=4096, key=jax.random.key(0))["w"]
    res.append(dict(case=f"{shape} {spec}", seed_equal=h.seed == h0.seed,
                    fan_in_on_mesh=hf.buckets.sharding.mesh == mesh
                    and hf.buckets.sharding.is_fully_replicated,
                    max_diff=float(np.max(np.abs(np.asarray(h.buckets) - np.asarray(h0.buckets)))),
                    buckets_replicated=h.buckets.sharding.is_fully_replicated,
                    dense_diff=float(np.max(np.abs(np.asarray(d) - np.asarray(h0.materialize())))),
                    dense_sharded=not d.sharding.is_fully_replicated))
  return res
check("hashed", hashed)

def matmul():
  res = []
  K, N = 256, 512
  w = jax.random.normal(jax.random.key(5), (K, N), jnp.float32)
  xin = jax.random.normal(jax.random.key(6), (8, K), jnp.float32)
  c0 = qws_jax.share({"w": w}, k=16)["w"]
  h0 = qws_jax.hash_share({"w": w}, buckets=8192, init="from_dense")["w"]
  for auto in (False, True):
    mesh = mesh_of((2, 4), ("data", "model"), auto)
    for par, wspec, xspec in (("column", P(None, "model"), P("data")),
                              ("row", P("model", None), P("data", "model"))):
      ws = jax.device_put(w, NamedSharding(mesh, wspec))
      xs = jax.device_put(xin, NamedSharding(mesh, xspec))
      c = qws_jax.share({"w": ws}, k=16)["w"]
      h = qws_jax.hash_share({"w": ws}, buckets=8192, init="from_dense")["w"]
      ref_c = np.asarray(xin) @ np.asarray(c0.materialize())
      ref_h = np.asarray(xin) @ np.asarray(h0.materialize())
      y_c = jax.jit(shared_matmul)(xs, c)
      y_h = jax.jit(hashed_matmul)(xs, h)
      y_a = jax.jit(qws_jax.apply(nn.Dense(N, use_bias=False).apply))({"params": {"kernel": c}}, xs)
      res.append(dict(case=f"{'auto' if auto else 'explicit'} {par}",
                      shared=float(np.max(np.abs(np.asarray(y_c) - ref_c))),
                      hashed=float(np.max(np.abs(np.asarray(y_h) - ref_h))),
                      apply=float(np.max(np.abs(np.asarray(y_a) - ref_c))),
                      shared_out_spec=str(y_c.sharding.spec)))
  return res
check("matmul", matmul)

def checkpoint():
  mesh = mesh_of((2, 4), ("a", "b"))
  xs = jax.device_put(x, NamedSharding(mesh, P("a", "b")))
  tree = {"w": qws_jax.share({"w": xs}, k=16)["w"],
          "h": qws_jax.hash_share({"h": xs}, buckets=1024, init="from_dense")["h"],
          "b": jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("b")))}
  path = os.path.join(tempfile.mkdtemp(), "ckpt")
  qws_jax.save(path, tree)
  # Restore onto ANOTHER mesh: a (4, 2) mesh given by abstract targets.
  mesh2 = mesh_of((4, 2), ("a", "b"))
  shardings = qws_jax.compressed_shardings(tree, {"w": NamedSharding(mesh2, P("a", "b")),
                                      "h": NamedSharding(mesh2, P("a", "b")),
                                      "b": NamedSharding(mesh2, P("b"))})
  target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  tree, shardings)
  got = qws_jax.restore(path, target=target)
  # Every stored array is handed to Orbax with its target sharding (read shard by shard).
  from qws_jax._src import checkpoint as ckpt
  meta = ckpt.read_metadata(path)
  refs = ckpt._array_refs(meta["tree"])
  by_key = ckpt._target_shardings(refs, target)
  stored = [r for _, r in refs if r.get("key") is not None]
  flat_t = jax.tree_util.tree_leaves(tree)
  flat_g = jax.tree_util.tree_leaves(got)
  flat_s = jax.tree_util.tree_leaves(shardings)
  return dict(equal=all(np.array_equal(a, b) for a, b in zip(flat_t, flat_g)),
              read_sharded=len(by_key) == len(stored) == 4,
              placed=all(g.sharding == s for g, s in zip(flat_g, flat_s)),
              idx_spec=str(got["w"].indices.sharding.spec),
              mesh_shape=str(dict(got["w"].indices.sharding.mesh.shape)))
check("checkpoint", checkpoint)

def parts_and_stacked():
  mesh = mesh_of((2, 4), ("a", "b"))
  x3 = jax.random.normal(jax.random.key(3), (4, 256, 128), jnp.float32)
  x2 = x3[0]
  cases = {
      "stacked": (qws_jax.share({"w": x3}, k=16, stack_axes=1)["w"], P("a", None, "b")),
      "scales": (qws_jax.share({"w": x2}, k=16, scale_group_size=64)["w"], P("a", "b")),
      "outliers": (qws_jax.share({"w": x2}, k=16, outliers=0.01)["w"], P("a", "b")),
      "hashed_stacked": (qws_jax.hash_share({"w": x3}, buckets=512, init="from_dense",
                                           stack_axes=1)["w"],
                         P("a", None, "b")),
  }
  x3b = jax.random.normal(jax.random.key(5), (4, 64, 128), jnp.float32)
  # 3-D leaves whose groups / scales run over the flattened rows, middle axis sharded.
  cases["group3d"] = (qws_jax.share({"w": x3b}, k=8, group_size=32)["w"], P(None, "a", "b"))
  cases["scales3d"] = (qws_jax.share({"w": x3b}, k=8, scale_group_size=32)["w"],
                       P("a", "b", None))
  res = {}
  for name, (leaf, spec) in cases.items():
    s = qws_jax.compressed_shardings({"w": leaf}, {"w": NamedSharding(mesh, spec)})["w"]
    placed = jax.device_put(leaf, s)
    specs = {k: str(v.sharding.spec) for k, v in types_lib.children(placed).items()
             if v is not None}
    if not leaf.stack_shape and len(leaf.shape) == 2 and isinstance(leaf, qws_jax.SharedArray):
      # Tensor-parallel matmul, block by block (scales decoded, outliers per block).
      xs = jax.device_put(jnp.ones((8, leaf.shape[0])), NamedSharding(mesh, P(None, spec[0])))
      y = jax.jit(shared_matmul)(xs, placed)
      res[name + "_matmul"] = float(np.max(np.abs(
          np.asarray(y) - np.ones((8, leaf.shape[0])) @ np.asarray(leaf.materialize()))))
    dense = qws_jax.unshare({"w": placed})["w"]  # decoded block by block on the mesh
    res[name] = dict(specs=specs, dense_spec=str(dense.sharding.spec),
                     equal=bool(np.array_equal(np.asarray(dense), np.asarray(leaf.materialize()))))
  return res
check("parts_and_stacked", parts_and_stacked)

print("RESULTS" + json.dumps(out, default=str))
''')


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  script = tmp_path_factory.mktemp("sharding") / "worker.py"
  script.write_text(_WORKER)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                        timeout=600, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS")]
  assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return json.loads(lines[-1][len("RESULTS"):])


def _ok(entry):
  assert not (isinstance(entry, dict) and "error" in entry), entry.get("error")
  return entry


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_share_per_tensor_bit_identical_on_meshes(results, mode):
  for r in _ok(results[f"share_tensor_{mode}"]):
    assert r["idx_equal"] and r["cb_equal"], r
    assert r["idx_spec"] == r["leaf_spec"], r  # indices laid out like the weight
    assert r["cb_replicated"], r
    assert r["dense_equal"] and r["dense_spec"] == r["leaf_spec"], r
    assert r["idx_shard_bytes"] * 8 == r["idx_bytes"], r  # 1/8 of the indices per device


def test_share_bfloat16_weighted_and_refined_bit_identical(results):
  bf16, weighted, k64 = _ok(results["share_dtypes_weights"])
  assert bf16["dtype"] == "bfloat16", bf16
  for r in (bf16, weighted, k64):
    assert r["idx_equal"] and r["cb_equal"], r


def test_share_per_channel_and_per_group(results):
  per_channel, per_group = _ok(results["share_layouts"])
  for r in (per_channel, per_group):
    assert r["idx_equal"] and r["cb_equal"] and r["dense_equal"], r
    assert r["idx_spec"] == "P('a', 'b')" == r["dense_spec"], r
  assert per_channel["cb_spec"] == "P('b',)", per_channel  # like the channel axis
  assert per_group["cb_spec"] == "P('a', 'b')", per_group  # group rows, columns


def test_no_device_holds_a_full_large_leaf(results):
  m = _ok(results["memory"])
  for stage in ("histogram", "assign_refine_pack"):
    s1, s8 = m[f"{stage}_one"], m[f"{stage}_eight"]
    assert s8["all_gathers"] == 0, s8
    assert s8["max_elems"] < m["leaf_elems"], s8  # no per-device array as large as the leaf
    assert s8["per_device_bytes"] < s1["per_device_bytes"], (s1, s8)
  # Leaf-proportional stage: per-device memory ~ 1/8 of the single-device program.
  one, eight = m["assign_refine_pack_one"], m["assign_refine_pack_eight"]
  assert eight["per_device_bytes"] * 6 < one["per_device_bytes"], (one, eight)
  assert m["indices_shard_bytes"] * 8 == m["indices_bytes"], m
  assert m["dense_shard_bytes"] * 8 == m["leaf_bytes"], m


def test_hash_share_and_unshare_sharded(results):
  for r in _ok(results["hashed"]):
    assert r["seed_equal"] and r["buckets_replicated"] and r["dense_sharded"], r
    assert r["fan_in_on_mesh"], r
    assert r["max_diff"] < 1e-5 and r["dense_diff"] < 1e-5, r


def test_tensor_parallel_matmul_and_apply(results):
  for r in _ok(results["matmul"]):
    for key in ("shared", "hashed", "apply"):
      assert r[key] < 1e-3, r
    if r["case"].endswith("column"):
      assert "model" in r["shared_out_spec"], r  # output stays sharded on N


def test_checkpoint_restores_onto_another_mesh(results):
  r = _ok(results["checkpoint"])
  assert r["equal"] and r["placed"] and r["read_sharded"], r
  assert r["mesh_shape"] == "{'a': 4, 'b': 2}", r


def test_compressed_shardings_of_parts_and_stacked_leaves(results):
  """Stacked leaves, group scales and outliers: placed on a mesh and decoded block by block."""
  r = _ok(results["parts_and_stacked"])
  for name in r:
    if name.endswith("_matmul"):
      assert r[name] < 1e-3, (name, r[name])
    else:
      assert r[name]["equal"], (name, r[name])
  assert {"scales_matmul", "outliers_matmul"} <= set(r), r
  st = r["stacked"]["specs"]
  assert st["indices"] == "P('a', None, 'b')" and st["codebook"] == "P('a',)", st
  sc = r["scales"]["specs"]
  assert sc["indices"] == "P('a', 'b')" and sc["scales"] == "P('a', 'b')", sc  # groups align
  for name in ("stacked", "scales", "outliers"):
    assert r[name]["dense_spec"] == r[name]["specs"]["indices"], r[name]
  out = r["outliers"]["specs"]
  assert out["outlier_values"] == out["outlier_positions"] == "P()", out
  assert r["hashed_stacked"]["specs"]["buckets"] == "P('a',)", r["hashed_stacked"]
