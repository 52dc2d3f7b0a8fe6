"""Compressing, materialising and placing parameter trees sharded with ``NamedSharding``.

JAX's own SPMD machinery is the distributed engine: every sharded step here is a
``jax.shard_map`` over the leaf's own mesh, so each device only ever works on its block
of the leaf, and the statistics that must be global are reduced with ``jax.lax.psum``.

Per-tensor k-means (`share_leaf`, the 1-D histogram path of `qws_jax.kmeans`):

1. **Histogram** (``shard_map``): each device bins its block into the 2**16 (k <= 32) or 2**18 fine bins
   of `qws_jax._src.kmeans` and ``psum`` s the ``(weight, weighted offset)`` sums. Every
   offset is an exact multiple of its bin's ulp, so for unweighted k-means these sums
   are exact (order-independent) while a bin holds fewer than 2**10 values -- the
   result is then bit-identical to the single-device histogram.
2. **Coarse atoms, exact DP, Lloyd polish** on the replicated fine-bin histogram
   (no leaf-sized data), with the very jitted stages of the single-device path.
3. **Assignment and refinement** (``shard_map``): each device assigns its block to the
   nearest centroid; the two refinement steps ``psum`` their per-cluster sums; each
   device packs its block of indices.

Per-channel and per-group codebooks: each device needs whole groups, so the leaf is first
resharded (an all-to-all; no device holds more than its share) to a layout that shards
only the channel axis (per channel) or the rows / columns of the matmul view in
multiples of ``group_size`` (per group); each device then clusters its own groups with
the single-device code and the indices are resharded to the leaf's layout.

Layout of the result (`compressed_sharding`): indices keep the leaf's
``PartitionSpec``; the packed last axis stays sharded only where shard boundaries fall
on packing-group boundaries (else that axis is replicated). Codebooks are replicated
(per tensor) or sharded like the channel axis (per channel) / the rows and columns of
the matmul view (per group). `HashedArray` buckets are replicated (every device reads
any bucket).

What gathers (documented in docs/sharding.md): leaves with at most ``sort_threshold``
(65536) elements (the exact small path sorts), per-tensor vector codebooks
(``vector_dim > 1``), and dims that do not divide evenly over their mesh axes are
clustered on a replicated copy of the leaf.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qws_jax._src import hashing
from qws_jax._src import kmeans as kmeans_lib
from qws_jax._src import packing
from qws_jax._src import parts
from qws_jax._src import share as share_lib
from qws_jax._src import types

SORT_THRESHOLD = kmeans_lib.SORT_THRESHOLD  # larger rows use the histogram


def named_sharding(x) -> NamedSharding | None:
  """The ``NamedSharding`` of a concrete array spread over more than one device, else None."""
  if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
    return None
  s = getattr(x, "sharding", None)
  if not isinstance(s, NamedSharding) or len(s.device_set) <= 1:
    return None
  return s


def _entries(spec, ndim: int) -> list:
  e = list(spec)
  if len(e) > ndim:
    raise ValueError(f"PartitionSpec {spec} has more entries than the leaf has axes ({ndim})")
  return e + [None] * (ndim - len(e))


def _names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, (tuple, list)):
    return tuple(entry)
  return (entry,)


def _count(mesh, entry) -> int:
  return math.prod(mesh.shape[a] for a in _names(entry))


def _even(shape, entries, mesh) -> bool:
  return all(d % _count(mesh, e) == 0 for d, e in zip(shape, entries))


def _spec(entries) -> P:
  while entries and entries[-1] is None:
    entries = entries[:-1]
  return P(*entries)


def _packed_ok(n: int, bits: int, mesh, entry) -> bool:
  """Can ``n`` indices along the last axis be packed shard by shard (``entry`` shards)?"""
  c = _count(mesh, entry)
  return n % c == 0 and (n // c) % packing.group_values(bits) == 0


def _index_entries(shape, vector_dim, bits, entries, mesh) -> list:
  """Spec entries of the packed index array of a leaf laid out with ``entries``."""
  ishape = types.index_shape(tuple(shape), vector_dim)
  out = list(entries)
  if out[-1] is not None and not _packed_ok(ishape[-1], bits, mesh, out[-1]):
    out[-1] = None
  for i, d in enumerate(ishape[:-1]):
    if d % _count(mesh, out[i]):
      out[i] = None
  return out


def _group_rows_entry(shape, group_size, entries, mesh):
  """Mesh axes of the row axis of the per-group grid, when groups align with shards."""
  if any(e is not None for e in entries[1:-1]) or len(shape) < 2:
    return None
  n0 = _count(mesh, entries[0])
  rows_per_shard, rem = divmod(math.prod(shape[:-1]), n0)
  if entries[0] is None or shape[0] % n0 or rem or rows_per_shard % group_size:
    return None
  return entries[0]


def _codebook_entries(x: types.SharedArray, idx_entries) -> list:
  """Codebook spec entries (per tensor / per channel) consistent with ``idx_entries``."""
  tail = [None] if x.vector_dim == 1 else [None, None]
  if x.axis is not None:
    return [idx_entries[x.axis]] + tail
  return tail


def compressed_sharding(x, sharding: NamedSharding):
  """The shardings of a compressed leaf that came from a leaf with ``sharding``.

  Args:
    x: a `SharedArray` / `HashedArray` (or a dense array, which gets ``sharding``).
    sharding: the ``NamedSharding`` of the original (dense) leaf.

  Returns:
    For a `SharedArray`, a `SharedArray` whose children are ``NamedSharding`` s: the
    indices keep the leaf's spec (the packed last axis only where shard boundaries
    fall on packing groups), the codebook is replicated (per tensor) or sharded like the
    channel axis / the matmul view's rows and columns (per channel / per group). For a
    `HashedArray`, replicated buckets. Use it with ``jax.device_put`` or as the
    ``sharding`` of ``jax.ShapeDtypeStruct`` targets for `qws_jax.restore`.
  """
  if not isinstance(sharding, NamedSharding):
    raise TypeError(f"sharding must be a NamedSharding, got {type(sharding).__name__}")
  mesh = sharding.mesh
  if not types.is_compressed(x):
    return sharding
  # Stacked leaves: the stack axes keep their entries (where they divide), every child
  # carries them in front of the slice's own layout.
  ns = len(x.stack_shape)
  entries = _entries(sharding.spec, ns + len(x.shape))
  lead = [e if d % _count(mesh, e) == 0 else None
          for d, e in zip(x.stack_shape, entries[:ns])]
  entries = entries[ns:]

  def named(child_entries, child):
    full = lead + list(child_entries)
    full = [e if d % _count(mesh, e) == 0 else None for d, e in zip(child.shape, full)]
    return NamedSharding(mesh, _spec(full))

  if isinstance(x, types.HashedArray):
    return dataclasses.replace(x, buckets=named([None], x.buckets))
  ie = _index_entries(x.shape, x.vector_dim, x.bits, entries, mesh)
  if x.group_size is not None:
    ie_rows = _group_rows_entry(types.index_shape(x.shape, x.vector_dim), x.group_size, ie, mesh)
    ce = [ie_rows, ie[-1]] + ([None] if x.vector_dim == 1 else [None, None])
    if len(x.shape) == 1:
      ce = [None, None, None]
  else:
    ce = _codebook_entries(x, ie)
  out = dict(indices=named(ie, x.indices), codebook=named(ce, x.codebook))
  if x.scales is not None:  # (groups along the matmul rows, columns) like the indices
    srows = _group_rows_entry(types.index_shape(x.shape, x.vector_dim), x.scale_group_size,
                              ie, mesh)
    out["scales"] = named([srows, ie[-1] if len(x.shape) > 1 else None], x.scales)
  if x.outlier_values is not None:  # a short list of flat positions: replicated per slice
    out["outlier_values"] = named([None], x.outlier_values)
    out["outlier_positions"] = named([None], x.outlier_positions)
  return dataclasses.replace(x, **out)


def compressed_shardings(tree, reference):
  """The shardings a compressed tree takes when its dense leaves are laid out as ``reference``.

  Compressed leaves laid out like their dense leaf: the indices keep the leaf's
  ``PartitionSpec`` (the packed last axis only where shard boundaries fall on packing
  groups), codebooks are replicated (per tensor) or sharded like the channel axis / the
  rows and columns of the matmul view (per channel / per group), hashed buckets are
  replicated. Use the result with ``jax.device_put`` to move a compressed tree to a
  mesh, or to build ``jax.ShapeDtypeStruct`` targets for `qws_jax.restore` onto a mesh.

  Args:
    tree: a pytree with `SharedArray` / `HashedArray` leaves (e.g. from `qws_jax.share`).
    reference: the dense tree's layout: a tree of the same structure (compressed leaves
      replaced by their dense counterparts) whose leaves are ``NamedSharding`` s or
      arrays (their ``.sharding`` is used).

  Returns:
    A tree like ``tree``: each `SharedArray` / `HashedArray` holds ``NamedSharding`` s
    as its children, each dense leaf the reference's sharding (None where the
    reference leaf has none).

  Example:
    >>> import jax, qws_jax                                          # doctest: +SKIP
    >>> mesh = jax.make_mesh((4, 2), ("data", "model"))              # doctest: +SKIP
    >>> layout = {"w": jax.NamedSharding(mesh, jax.P(None, "model"))}  # doctest: +SKIP
    >>> s = qws_jax.compressed_shardings(params_c, layout)           # doctest: +SKIP
    >>> target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype,
    ...                       sharding=sh), params_c, s)             # doctest: +SKIP
    >>> qws_jax.restore(path, target=target)                        # doctest: +SKIP
  """
  def one(x, ref):
    s = ref if isinstance(ref, NamedSharding) else getattr(ref, "sharding", None)
    if s is None:
      return None
    return compressed_sharding(x, s)
  return jax.tree_util.tree_map(one, tree, reference, is_leaf=types.is_compressed)


# --------------------------------------------------------------------------- per tensor


def _hist_local(x, w=None, *, axes, bits):
  """Fine-bin statistics of a block, ``psum``-ed over the mesh ``axes`` (kmeans' stage)."""
  return kmeans_lib.hist_stats_blocks(x, w, bits, axis_name=axes)


def _centroids_from_hist(stats, key, *, k, method, init, num_atoms, iters):
  """The per-tensor centroids on the replicated histogram: kmeans' own stage."""
  return kmeans_lib.centroids_from_hist(stats, key, k=k, method=method, init=init,
                                        num_atoms=num_atoms, iters=iters)


def _assign_local(x, w, cent, *, axes, refine, bits, ishape_local):
  """Assignment and ``refine`` global Lloyd steps on a block (kmeans' stage), then pack."""
  assign, cent = kmeans_lib.assign_refine(x, w, cent, refine=refine, axis_name=axes)
  return packing.pack(assign.reshape(ishape_local), bits), cent


def _all_axes(mesh, entries) -> tuple[str, ...]:
  return tuple(a for e in entries for a in _names(e))


def _replicated_fallback(x, w, sharding, run):
  """Runs the single-device path on a replicated copy (gathers the leaf)."""
  rep = NamedSharding(sharding.mesh, P())
  x = jax.device_put(x, rep)
  w = None if w is None else jax.device_put(w, rep)
  return run(x, w)


def _work_entries_tensor(shape, bits, entries, mesh):
  """Layout in which each device packs its own block: the leaf's, unless the last axis
  splits packing groups; then its mesh axes move to axis 0 when that divides."""
  if entries[-1] is None or _packed_ok(shape[-1], bits, mesh, entries[-1]):
    return entries
  out = list(entries)
  moved = _names(out[-1])
  out[-1] = None
  if len(shape) >= 2:
    first = _names(out[0]) + moved
    if shape[0] % math.prod(mesh.shape[a] for a in first) == 0:
      out[0] = first if len(first) > 1 else first[0]
  return out


def share_leaf(x: jax.Array, w, leaf_key, *, k: int, axis, group_size, vector_dim: int,
               method: str, init: str, num_atoms: int, polish_iters: int, max_iters: int,
               tol: float, single_device):
  """`qws_jax.share` of one leaf held as a ``NamedSharding`` array over several devices.

  ``single_device(x, w)`` is the unsharded `_share_leaf` (used on the replicated
  fallback); returns ``(indices, codebook)`` placed as `compressed_sharding` says.
  """
  sharding = named_sharding(x)
  mesh = sharding.mesh
  shape = tuple(x.shape)
  entries = _entries(sharding.spec, len(shape))
  bits = types.bits_for(k)
  if w is not None:
    w = jax.device_put(w, sharding)
  proto = types.SharedArray(
      indices=jax.ShapeDtypeStruct(
          types.index_shape(shape, vector_dim)[:-1] + (packing.packed_length(
              types.index_shape(shape, vector_dim)[-1], bits),), jnp.uint8),
      codebook=jax.ShapeDtypeStruct(types.grid_shape(shape, axis, group_size, vector_dim)
                                    + (k,) + ((vector_dim,) if vector_dim > 1 else ()),
                                    x.dtype),
      shape=shape, dtype=np.dtype(x.dtype), bits=bits, axis=axis, group_size=group_size,
      vector_dim=vector_dim)
  final = compressed_sharding(proto, sharding)

  def place(out):
    idx, cb = out
    return jax.device_put(idx, final.indices), jax.device_put(cb, final.codebook)

  size = int(np.prod(shape))
  if axis is None and group_size is None:
    if vector_dim != 1 or size <= SORT_THRESHOLD or not _even(shape, entries, mesh):
      return place(_replicated_fallback(x, w, sharding, single_device))
    work = _work_entries_tensor(shape, bits, entries, mesh)
    return place(_share_tensor(x, w, leaf_key, mesh=mesh, entries=work, k=k, method=method,
                               init=init, num_atoms=num_atoms,
                               iters=polish_iters if method == "dp" else max_iters))
  work = _work_entries_groups(shape, axis, group_size, vector_dim, bits, entries, mesh)
  if work is None:
    return place(_replicated_fallback(x, w, sharding, single_device))
  return place(_share_groups(x, w, leaf_key, mesh=mesh, entries=work, k=k, axis=axis,
                             group_size=group_size, vector_dim=vector_dim, method=method,
                             init=init, num_atoms=num_atoms, polish_iters=polish_iters,
                             max_iters=max_iters, tol=tol))


def _share_tensor(x, w, key, *, mesh, entries, k, method, init, num_atoms, iters):
  shape = tuple(x.shape)
  spec = _spec(entries)
  axes = tuple(mesh.axis_names)
  size = int(np.prod(shape))
  if num_atoms is None:  # as kmeans_1d_batch resolves it for this row length
    num_atoms = kmeans_lib.default_num_atoms(k, size, SORT_THRESHOLD)
  num_atoms = int(num_atoms)
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  # Unweighted: the unit weights are made block by block inside the stages.
  ws = () if w is None else (jax.device_put(w, NamedSharding(mesh, spec)),)
  stats = _hist_fn(mesh, spec, axes, bool(ws), kmeans_lib.fine_bits(k))(xs, *ws)
  # The histogram is replicated: stage 2 runs on one local copy (no leaf-sized data).
  stats0 = stats.addressable_shards[0].data
  # The single-device path splits one key per row; the same key here.
  key = jax.random.split(key, 1)[0]
  cent = _centroids_from_hist(stats0, jax.device_put(key, stats0.sharding), k=k,
                              method=method, init=init, num_atoms=num_atoms, iters=int(iters))
  cent = jax.device_put(cent, NamedSharding(mesh, P()))
  bits = types.bits_for(k)
  local = [d // _count(mesh, e) for d, e in zip(shape, entries)]
  refine = kmeans_lib.refine_steps(k, size > SORT_THRESHOLD)
  idx, cb = _assign_fn(mesh, spec, axes, refine, bits, tuple(local), bool(ws))(xs, *ws, cent)
  return idx, cb.astype(x.dtype)


@functools.lru_cache(maxsize=None)
def _hist_fn(mesh, spec, axes, weighted, bits):
  """Jitted stage 1 for one (mesh, layout): ``(x[, w]) -> (2**bits, 2)`` replicated sums."""
  return jax.jit(jax.shard_map(functools.partial(_hist_local, axes=axes, bits=bits), mesh=mesh,
                               in_specs=(spec, spec) if weighted else (spec,), out_specs=P(),
                               check_vma=False))


@functools.lru_cache(maxsize=None)
def _assign_fn(mesh, spec, axes, refine, bits, local, weighted):
  """Jitted stage 3 for one (mesh, layout): ``(x[, w], cent) -> (packed indices, cent)``."""
  fn = functools.partial(_assign_local, axes=axes, refine=refine, bits=bits,
                         ishape_local=local)
  if not weighted:
    fn = functools.partial(lambda f, x, c: f(x, None, c), fn)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P()) if weighted else
                               (spec, P()), out_specs=(spec, P()), check_vma=False))


# --------------------------------------------------------------------------- groups


def _work_entries_groups(shape, axis, group_size, vector_dim, bits, entries, mesh):
  """A layout in which every device holds whole groups (None: no such sharded layout)."""
  nd = len(shape)
  ishape = types.index_shape(shape, vector_dim)
  used = _all_axes(mesh, entries)
  if axis is not None:
    cands = []
    if used:
      cands.append(used if len(used) > 1 else used[0])
    if entries[axis] is not None:
      cands.append(entries[axis])
    for c in cands:
      n = _count(mesh, c)
      if ishape[axis] % n:
        continue
      out = [None] * nd
      out[axis] = c
      if axis == nd - 1 and not _packed_ok(ishape[-1], bits, mesh, c):
        continue
      return out
    return None
  # per group: rows = axis 0 (whole groups of rows), columns = last axis.
  if nd < 2:
    return None
  out = [None] * nd
  r = math.prod(ishape[:-1])
  if entries[0] is not None and all(e is None for e in entries[1:-1]):
    n0 = _count(mesh, entries[0])
    if shape[0] % n0 == 0 and (r // n0) % group_size == 0:
      out[0] = entries[0]
  last = entries[-1]
  if last is not None and _packed_ok(ishape[-1], bits, mesh, last):
    out[-1] = last
  if out[0] is None and out[-1] is None:
    return None
  return out


def _share_groups(x, w, key, *, mesh, entries, k, axis, group_size, vector_dim, method, init,
                  num_atoms, polish_iters, max_iters, tol):
  shape = tuple(x.shape)
  spec = _spec(entries)
  local = tuple(d // _count(mesh, e) for d, e in zip(shape, entries))
  grid = types.grid_shape(shape, axis, group_size, vector_dim)
  ng = int(np.prod(grid))
  keys = jax.random.key_data(jax.random.split(key, ng)).reshape(grid + (-1,))
  if group_size is not None:
    kspec = P(entries[0], entries[-1], None)
    cspec = P(entries[0], entries[-1], *([None] if vector_dim == 1 else [None, None]))
  else:
    kspec = P(entries[axis], None)
    cspec = P(entries[axis], *([None] if vector_dim == 1 else [None, None]))
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  ws = (jnp.ones(shape, jnp.float32, device=NamedSharding(mesh, spec)) if w is None
        else jax.device_put(w, NamedSharding(mesh, spec)))
  keys = jax.device_put(keys, NamedSharding(mesh, kspec))
  impl = jax.random.key_impl(key)
  na = num_atoms

  def local_fn(xl, wl, kl):
    st = dict(shape=local, axis=axis, group_size=group_size, vector_dim=vector_dim)
    g, wg = share_lib._groups(xl, wl, **st)  # pylint: disable=protected-access
    lk = jax.random.wrap_key_data(kl.reshape(-1, kl.shape[-1]), impl=impl)
    if vector_dim == 1:
      cent, assign = kmeans_lib.kmeans_1d_batch(
          g[..., 0], wg, lk, k=k, method=method, init=init, num_atoms=na,
          polish_iters=polish_iters, max_iters=max_iters)
    else:
      cent, assign = share_lib._vector_batch(g, wg, lk, k=k, init=init,  # pylint: disable=protected-access
                                             max_iters=max_iters, tol=tol)
    return share_lib._pack_leaf(cent, assign, dtype=np.dtype(x.dtype), **st)  # pylint: disable=protected-access

  fn = jax.jit(jax.shard_map(local_fn, mesh=mesh, in_specs=(spec, spec, kspec),
                             out_specs=(spec, cspec),
                             check_vma=False))
  return fn(xs, ws, keys)


def _share_handler(job, single_device):
  """`share`'s hook for a leaf spread over several devices (None for other leaves)."""
  x = job.x
  if named_sharding(x) is None:
    return None
  cfg = job.cfg
  shape = tuple(x.shape)
  return share_leaf(
      x, job.w, job.key, k=cfg.k, axis=cfg.axis, group_size=cfg.group_size,
      vector_dim=cfg.vector_dim, method=cfg.method, init=cfg.init, num_atoms=cfg.num_atoms,
      polish_iters=cfg.polish_iters, max_iters=cfg.max_iters, tol=cfg.tol,
      single_device=lambda xr, wr: single_device(xr, wr, job.key, shape=shape, cfg=cfg))


# --------------------------------------------------------------------------- unshare


def _shard_offsets(mesh, entries, local):
  """Inside ``shard_map``: the global start of this device's block along each axis."""
  offs = []
  for e, n in zip(entries, local):
    i = jnp.int32(0)
    for a in _names(e):
      i = i * jnp.int32(mesh.shape[a]) + jax.lax.axis_index(a).astype(jnp.int32)
    offs.append(i * jnp.int32(n))
  return offs


def _global_flat_index(mesh, entries, local, strides):
  """uint32 flat C-order index (in the whole leaf) of every element of this device's block."""
  offs = _shard_offsets(mesh, entries, local)
  f = jnp.zeros(local, jnp.uint32)
  for i, (o, n) in enumerate(zip(offs, local)):
    shp = [1] * len(local)
    shp[i] = n
    c = (o + jnp.arange(n, dtype=jnp.int32)).astype(jnp.uint32).reshape(shp)
    f = f + c * jnp.uint32(strides[i])
  return f


def _block_layout(x: types.SharedArray, mesh, ie: list):
  """The layout ``want`` (a leaf of shardings) under which each device decodes its own
  block of ``x``, starting from index entries ``ie`` (stack axes first): axes whose
  shards do not line up with the codebook rows, per-group codebooks or scale groups are
  replicated until they do."""
  ns = len(x.stack_shape)
  for _ in range(3):
    want = compressed_sharding(x, NamedSharding(mesh, _spec(list(ie))))
    got = _entries(want.indices.spec, len(ie))
    sl = got[ns:]
    cb = _entries(want.codebook.spec, x.codebook.ndim)[ns:]
    if x.axis is not None and cb[0] != sl[x.axis]:
      sl[x.axis] = None
    # Per-group codebooks and scales index the matmul view's rows: a block must hold
    # whole groups of consecutive rows (only axis 0 of the rows sharded, aligned).
    row_groups = []
    if x.group_size is not None:
      row_groups.append(cb[0])
    if x.scales is not None:
      row_groups.append(_entries(want.scales.spec, x.scales.ndim)[ns])
    if row_groups and len(sl) > 1:
      for a in range(1, len(sl) - 1):
        sl[a] = None
      if any(e != sl[0] for e in row_groups):
        sl[0] = None
    if got[ns:] == sl:
      return want, got
    ie = got[:ns] + sl
  raise AssertionError("no consistent block layout")  # pragma: no cover


def _local_outliers(block: jax.Array, pos, vals, shape, offsets):
  """Sets the outliers (global flat ``pos`` in a slice of ``shape``) that fall in this
  device's ``block`` (which starts at ``offsets``); the others are dropped."""
  local = block.shape
  inside = jnp.ones(pos.shape, bool)
  flat = jnp.zeros(pos.shape, jnp.int32)
  rest = pos
  coords = []
  for d in reversed(shape):
    coords.append(rest % d)
    rest = rest // d
  for c, o, n in zip(reversed(coords), offsets, local):
    lc = c - o
    inside = inside & (lc >= 0) & (lc < n)
    flat = flat * n + jnp.clip(lc, 0, n - 1)
  flat = jnp.where(inside, flat, block.size)  # out of range: dropped
  return block.reshape(-1).at[flat].set(vals.astype(block.dtype), mode="drop").reshape(local)


def _materialize_shared(x: types.SharedArray, s: NamedSharding):
  mesh = s.mesh
  ns = len(x.stack_shape)
  want, ie = _block_layout(x, mesh, _entries(s.spec, ns + len(x.shape)))
  spec = want.indices.spec
  local_full = tuple(d // _count(mesh, e) for d, e in zip(x.full_shape, ie))
  local = local_full[ns:]
  names = [n for n in ("indices", "codebook", "scales") if getattr(x, n) is not None]
  arrays = [jax.device_put(getattr(x, n), getattr(want, n)) for n in names]
  specs = [getattr(want, n).spec for n in names]
  outl = x.outlier_values is not None
  if outl:  # replicated per slice; each device sets the ones inside its block
    for n in ("outlier_values", "outlier_positions"):
      arrays.append(jax.device_put(getattr(x, n), getattr(want, n)))
      specs.append(getattr(want, n).spec)

  def local_fn(*arrs):
    blocks = dict(zip(names, arrs))
    leaf = dataclasses.replace(x, shape=local, outlier_values=None, outlier_positions=None,
                               **blocks)
    out = leaf.materialize()
    if outl:
      vals, pos = arrs[len(names):]
      offs = _shard_offsets(mesh, ie, local_full)[ns:]
      fn = lambda b, p, v: _local_outliers(b, p, v, x.shape, offs)
      for _ in range(ns):
        fn = jax.vmap(fn)
      out = fn(out, pos, vals)
    return out

  fn = jax.jit(jax.shard_map(local_fn, mesh=mesh, in_specs=tuple(specs), out_specs=spec,
                             check_vma=False))
  # Back to the layout of the indices as they came (dense last axis: as the indices').
  return jax.device_put(fn(*arrays), NamedSharding(mesh, s.spec))


def materialize(x, sharding: NamedSharding | None = None):
  """Dense value of a compressed leaf whose arrays live on several devices, block by block.

  A `SharedArray` is decoded where its indices are: each device materialises its own
  block (its indices and its part of the codebook) and the result has the indices'
  layout. A `HashedArray` hashes the global coordinates of each device's block; its
  layout is ``sharding`` (default: axis 0 over every mesh axis when that divides, else
  replicated). Returns None when ``x`` is not spread over several devices.
  """
  if isinstance(x, types.SharedArray):
    s = named_sharding(x.indices)
    if s is None:
      return None
    return _materialize_shared(x, s)
  if isinstance(x, types.HashedArray):
    s = named_sharding(x.buckets)
    if s is None and sharding is None:
      return None
    mesh = (sharding or s).mesh
    ns = len(x.stack_shape)
    if sharding is None:  # stack axes as the buckets', the slice's axis 0 over the mesh
      names = tuple(mesh.axis_names)
      lead = _entries(s.spec, ns + 1)[:ns] if s is not None else [None] * ns
      used = {a for e in lead for a in _names(e)}
      free = tuple(a for a in names if a not in used)
      n = math.prod(mesh.shape[a] for a in free)
      first = (free if len(free) > 1 else free[0]) if free and x.shape[0] % n == 0 else None
      entries = list(lead) + [first] + [None] * (len(x.shape) - 1)
    else:
      entries = _entries(sharding.spec, ns + len(x.shape))
    if not _even(x.full_shape, entries, mesh):
      entries = [None] * len(x.full_shape)
    spec = _spec(list(entries))
    sl = entries[ns:]
    local = tuple(d // _count(mesh, e) for d, e in zip(x.shape, sl))
    strides = [int(np.prod(x.shape[i + 1:], dtype=np.int64)) for i in range(len(x.shape))]
    bspec = _spec(list(entries[:ns]) + [None])

    def local_fn(buckets):
      f = _global_flat_index(mesh, sl, local, strides)
      b, sg = hashing.bucket_and_sign(f, x.seed, x.num_buckets, x.signed)
      one = lambda bk: (jnp.take(bk, b, axis=0) * sg.astype(bk.dtype)).astype(x.dtype)
      for _ in range(ns):
        one = jax.vmap(one)
      return one(buckets)

    buckets = jax.device_put(x.buckets, NamedSharding(mesh, bspec))
    fn = jax.jit(jax.shard_map(local_fn, mesh=mesh, in_specs=(bspec,), out_specs=spec,
                               check_vma=False))
    return fn(buckets)
  return None


# --------------------------------------------------------------------------- hash_share


def from_dense_buckets(w: jax.Array, seed: int, num_buckets: int, signed: bool):
  """Sharded `qws_jax._src.hash_share.from_dense_buckets`: per-shard sums, ``psum``.

  Each device hashes the global coordinates of its block and sums ``sign * w`` and the
  member counts per bucket; the sums are reduced over the mesh. Equal to the
  single-device buckets up to float reassociation; returned replicated. None when ``w``
  is not spread over several devices or its dims do not divide over the mesh.
  """
  s = named_sharding(w)
  if s is None:
    return None
  mesh = s.mesh
  entries = _entries(s.spec, w.ndim)
  if not _even(w.shape, entries, mesh):
    return None
  spec = _spec(list(entries))
  local = tuple(d // _count(mesh, e) for d, e in zip(w.shape, entries))
  strides = [int(np.prod(w.shape[i + 1:], dtype=np.int64)) for i in range(w.ndim)]
  axes = tuple(mesh.axis_names)

  def local_fn(wl):
    f = _global_flat_index(mesh, entries, local, strides)
    b, sg = hashing.bucket_and_sign(f.reshape(-1), seed, num_buckets, signed)
    vals = wl.reshape(-1).astype(jnp.float32) * sg.astype(jnp.float32)
    total = jax.ops.segment_sum(vals, b, num_segments=num_buckets)
    count = jax.ops.segment_sum(jnp.ones(vals.shape, jnp.float32), b, num_segments=num_buckets)
    total = jax.lax.psum(total, axes)
    count = jax.lax.psum(count, axes)
    return (total / jnp.maximum(count, jnp.float32(1.0))).astype(wl.dtype)

  fn = jax.jit(jax.shard_map(local_fn, mesh=mesh, in_specs=(spec,), out_specs=P(),
                             check_vma=False))
  return fn(w)


def replicate_like(value, leaf):
  """``value`` replicated over the mesh of ``leaf`` when ``leaf`` is sharded (else as is)."""
  s = named_sharding(leaf)
  if s is None and isinstance(leaf, jax.ShapeDtypeStruct):  # abstract sharded leaf
    s = leaf.sharding if isinstance(leaf.sharding, NamedSharding) else None
  if s is None:
    return value
  return jax.device_put(value, NamedSharding(s.mesh, P()))


# --------------------------------------------------------------------------- matmul


def _explicit_spec(a):
  """``(mesh, entries)`` of an array sharded over Explicit mesh axes (in or out of jit)."""
  try:
    s = jax.typeof(a).sharding
  except Exception:  # pylint: disable=broad-except
    return None
  mesh = getattr(s, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True) or not any(e is not None for e in s.spec):
    return None
  return mesh, _entries(s.spec, a.ndim)


def tensor_parallel_matmul(x, w: types.SharedArray, matmul):
  """``x @ w`` for a 2-D `SharedArray` sharded over Explicit mesh axes, shard by shard.

  Column parallel (``N`` sharded): each device multiplies ``x`` by its columns; the
  output is sharded on ``N``. Row parallel (``K`` sharded): ``x`` is sharded on its last
  axis like ``K``, each device computes a partial product and the partials are summed
  with ``psum``. Both at once work too. ``matmul(x_local, w_local)`` is the
  single-device kernel. Returns None when ``w`` is not sharded over Explicit axes (Auto
  meshes are partitioned by XLA itself, see docs/sharding.md).
  """
  got = _explicit_spec(w.indices)
  if got is None:
    return None
  mesh, ie = got
  K, N = w.shape
  # The layout the blocks need: codebook and scales consistent with the indices.
  want, ie = _block_layout(w, mesh, list(ie))
  if not _even((K, N), ie, mesh):
    return None
  lead = x.shape[:-1]
  # Batch rows keep their (data-parallel) sharding when it uses other mesh axes.
  xs = _explicit_spec(x)
  b = xs[1][0] if xs is not None and x.ndim == 2 else None
  if set(_names(b)) & set(_names(ie[0]) + _names(ie[1])) or (
      b is not None and x.shape[0] % _count(mesh, b)):
    b = None
  def reshard(a, spec):
    return jax.sharding.reshard(a, NamedSharding(mesh, spec))

  if x.ndim != 2:
    x = reshard(x, P())
  x2 = x.reshape(-1, K)
  xspec = P(b, ie[0])
  ospec = P(b, ie[1])
  x2 = reshard(x2, xspec)
  names = [n for n in types.children(w) if getattr(w, n) is not None]
  specs = [getattr(want, n).spec for n in names]
  arrays = [reshard(getattr(w, n), sp) for n, sp in zip(names, specs)]
  k_axes = _names(ie[0])
  local = (K // _count(mesh, ie[0]), N // _count(mesh, ie[1]))

  def local_fn(xl, *arrs):
    blocks = dict(zip(names, arrs))
    wl = dataclasses.replace(w, shape=local, **blocks)
    if w.outlier_values is not None:  # keep the outliers inside this block
      r0, c0 = _shard_offsets(mesh, ie, local)
      pos = blocks["outlier_positions"]
      r, c = pos // N - r0, pos % N - c0
      inside = (r >= 0) & (r < local[0]) & (c >= 0) & (c < local[1])
      base = dataclasses.replace(wl, outlier_values=None, outlier_positions=None)
      # Outliers of other blocks become entry 0 holding its own decoded value: no-ops.
      wl = dataclasses.replace(
          wl, outlier_positions=jnp.where(inside, r * local[1] + c, 0),
          outlier_values=jnp.where(inside, blocks["outlier_values"],
                                   parts.decoded_at(base, jnp.zeros((1,), jnp.int32))[0].astype(
                                       blocks["outlier_values"].dtype)))
    y = matmul(xl, wl)
    if k_axes:
      y = jax.lax.psum(y.astype(jnp.float32), k_axes).astype(y.dtype)
    return y

  y = jax.shard_map(local_fn, mesh=mesh, in_specs=(xspec, *specs), out_specs=ospec,
                    check_vma=False)(x2, *arrays)
  return y.reshape(lead + (N,))


share_lib.register_sharded_handler("share", _share_handler)
share_lib.register_sharded_handler("materialize", materialize)
