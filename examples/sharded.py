"""Compress, run and checkpoint a model whose parameters only exist sharded.

Runs on 8 simulated CPU devices (it sets ``XLA_FLAGS`` itself, before jax is imported):

    python examples/sharded.py [--hidden 2048] [--k 16]

1. The parameters of a 2-layer MLP are created *sharded*: ``jax.jit(model.init,
   out_shardings=...)`` puts each kernel on a (2, 4) ``("data", "model")`` mesh in the
   Megatron layout (first kernel column-parallel, second row-parallel), so no device ever
   holds a whole kernel.
2. ``qws_jax.share`` clusters each kernel shard by shard (per-tensor histogram reduced
   with ``psum``); the indices keep the kernel's layout, the codebook is replicated.
3. ``qws_jax.apply`` runs the compressed model with tensor-parallel matmuls.
4. ``qws_jax.save`` / ``qws_jax.restore`` write the compressed tree and restore it onto
   another (4, 2) mesh.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

import qws_jax  # pylint: disable=g-import-not-at-top,wrong-import-position


class MLP(nn.Module):
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="up")(x))
    return nn.Dense(self.out, name="down")(x)


def max_shard_bytes(tree) -> int:
  """Largest number of bytes any single device holds for one leaf of ``tree``."""
  return max(max(s.data.nbytes for s in a.addressable_shards)
             for a in jax.tree_util.tree_leaves(tree))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--hidden", type=int, default=2048)
  ap.add_argument("--features", type=int, default=512)
  ap.add_argument("--k", type=int, default=16)
  args = ap.parse_args()
  assert len(jax.devices()) == 8, jax.devices()

  # Auto axes: XLA partitions the dense reference model too (flax's Dense on Explicit
  # axes needs out_sharding for row-parallel layers; qws_jax handles both kinds).
  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
  model = MLP(hidden=args.hidden, out=args.features)
  x = jax.random.normal(jax.random.key(1), (16, args.features), jnp.float32)
  layout = {"up": {"kernel": P(None, "model"), "bias": P("model")},   # column parallel
            "down": {"kernel": P("model", None), "bias": P()}}         # row parallel
  shardings = {"params": jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), layout)}
  init = jax.jit(model.init, out_shardings=shardings)
  params = init(jax.random.key(0), x)["params"]
  kernel_bytes = params["up"]["kernel"].nbytes
  print(f"mesh {dict(mesh.shape)}; up/kernel {params['up']['kernel'].shape} "
        f"({kernel_bytes / 2**20:.1f} MiB), spec {params['up']['kernel'].sharding.spec}; "
        f"largest per-device shard of any dense leaf: {max_shard_bytes(params) / 2**20:.2f} MiB")

  t = time.perf_counter()
  params_c = qws_jax.share(params, k=args.k)
  jax.block_until_ready(params_c)
  up = params_c["up"]["kernel"]
  print(f"share(k={args.k}): {time.perf_counter() - t:.1f} s; up/kernel indices spec "
        f"{up.indices.sharding.spec}, codebook replicated: {up.codebook.sharding.is_fully_replicated}; "
        f"largest per-device shard: {max_shard_bytes(params_c) / 2**20:.3f} MiB")

  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  y_c = jax.jit(qws_jax.apply(model.apply))({"params": params_c}, xs)
  y_ref = model.apply({"params": qws_jax.unshare(params_c)}, xs)
  y_dense = model.apply({"params": params}, xs)
  err = float(jnp.max(jnp.abs(y_c - y_ref)))
  rel = float(jnp.linalg.norm(y_c - y_dense) / jnp.linalg.norm(y_dense))
  print(f"apply on sharded compressed params: output spec {y_c.sharding.spec}; "
        f"max |apply - dense(unshare)| = {err:.2e}; relative error vs the uncompressed model "
        f"{rel:.3f}")

  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "mlp")
    qws_jax.save(path, params_c)
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=auto)
    dense2 = jax.tree_util.tree_map(lambda s: NamedSharding(mesh2, s), layout)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        params_c, qws_jax.compressed_shardings(params_c, dense2))
    restored = qws_jax.restore(path, target=target)
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(
        jax.tree_util.tree_leaves(params_c), jax.tree_util.tree_leaves(restored)))
    print(f"save/restore onto mesh {dict(mesh2.shape)}: bit-exact {same}; up/kernel indices now "
          f"on {dict(restored['up']['kernel'].indices.sharding.mesh.shape)} "
          f"spec {restored['up']['kernel'].indices.sharding.spec}")
  assert err < 1e-3 and same
  np.testing.assert_allclose(np.asarray(y_c), np.asarray(y_ref), atol=1e-3)


if __name__ == "__main__":
  main()
