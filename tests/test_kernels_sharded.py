"""`shared_matmul` on a scaled leaf sharded over a mesh (4 CPU devices, one subprocess).

`qws_jax._src.sharding.tensor_parallel_matmul` does not shard group scales, so
`shared_matmul` runs the kernel on a replicated copy of such a (compressed) leaf; this
checks the result on Explicit and Auto meshes, column- and row-parallel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_WORKER = textwrap.dedent(r'''
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import flax.linen as nn
import qws_jax
from qws_jax.kernels import shared_matmul

rng = np.random.default_rng(0)
w0 = jnp.asarray(rng.normal(size=(256, 128)), jnp.float32)
x = jnp.asarray(rng.normal(size=(8, 256)), jnp.float32)
c = qws_jax.share({"w": w0}, k=16, scale_group_size=64, predicate=lambda p, l: True)["w"]
ref = np.asarray(x) @ np.asarray(c.materialize())
out = []
for auto in (False, True):
  t = AxisType.Auto if auto else AxisType.Explicit
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(t, t))
  for par, wspec, xspec in (("column", P(None, "model"), P("data")),
                            ("row", P("model", None), P("data", "model"))):
    s = qws_jax.compressed_shardings({"w": c}, {"w": NamedSharding(mesh, wspec)})["w"]
    cs, xs = jax.device_put(c, s), jax.device_put(x, NamedSharding(mesh, xspec))
    y = jax.jit(shared_matmul)(xs, cs)
    ya = jax.jit(qws_jax.apply(nn.Dense(128, use_bias=False).apply))({"params": {"kernel": cs}}, xs)
    out.append(dict(case=f"{'auto' if auto else 'explicit'} {par}",
                    shared=float(np.abs(np.asarray(y) - ref).max()),
                    apply=float(np.abs(np.asarray(ya) - ref).max())))
print("RESULTS" + json.dumps(out))
''')


def test_scaled_leaf_on_meshes(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                        timeout=600, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS")]
  assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  results = json.loads(lines[-1][len("RESULTS"):])
  assert len(results) == 4
  for r in results:
    assert r["shared"] < 1e-3 and r["apply"] < 1e-3, r
