"""Orbax checkpoints of compressed pytrees: `save`, `restore` and `CheckpointManager`.

On-disk format (``FORMAT_NAME`` version ``FORMAT_VERSION``), an Orbax composite
checkpoint directory with two items:

* ``arrays``: an Orbax PyTree item (OCDBT + zarr3, zstd level 3 unless
  ``compress=False``) holding a flat dict ``{"0": array, "1": array, ...}`` of every
  array in the tree. Compressed leaves contribute their children exactly as they are in
  memory: a `SharedArray` its bit-packed uint8 ``indices`` and its ``codebook``, a
  `HashedArray` its ``buckets``. Nothing is unpacked or widened on disk.
* ``qws_jax``: a JSON item with ``format``, ``format_version``, ``qws_jax_version`` and
  ``tree``, the tree structure with all static metadata (see ``docs/checkpoint.md``):
  dict / list / tuple / namedtuple / None nodes, Python scalars, arrays (shape, dtype
  incl. bfloat16, numpy or jax), `SharedArray` (shape, dtype, bits, axis, group_size,
  vector_dim) and `HashedArray` (shape, dtype, seed, signed, hash version).

So `restore` needs no template. Orbax writes into a temporary directory and renames it
when the save is complete, so a save killed mid-write never leaves a directory that
`restore` would take for a checkpoint.
"""

from __future__ import annotations

import collections.abc
import importlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import hashing
from qws_jax._src import tree as tree_lib
from qws_jax._src import types

FORMAT_NAME = "qws_jax"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
META_ITEM = "qws_jax"
ARRAYS_ITEM = "arrays"

_PY_SCALARS = (bool, int, float, str)


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


def _qws_version() -> str:
  import qws_jax  # pylint: disable=g-import-not-at-top
  return getattr(qws_jax, "__version__", "?")


def _join(path: str, key) -> str:
  key = str(key)
  if not key:  # e.g. the payload of an NNX Variable (its ``value`` is dropped from paths)
    return path
  return f"{path}/{key}" if path else key


def _is_namedtuple(x) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_array(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic, jax.Array))


# ----------------------------------------------------------------------------- encoding


class _Encoder:
  """Turns a pytree into (JSON structure, flat dict of arrays)."""

  def __init__(self):
    self.arrays: dict[str, Any] = {}

  def array(self, x, path: str) -> dict:
    if isinstance(x, jax.core.Tracer):
      raise TypeError(f"cannot save a traced value at {path!r}: call qws_jax.save outside jit")
    if isinstance(x, jax.Array):
      kind = "jax"
    elif isinstance(x, np.generic):
      kind, x = "numpy_scalar", np.asarray(x)
    else:
      kind = "numpy"
    ref = {"kind": kind, "shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name,
           "key": None}
    if x.size:  # Orbax cannot store zero-size arrays; their shape and dtype suffice.
      key = str(len(self.arrays))
      self.arrays[key] = x
      ref["key"] = key
    return ref

  def encode(self, x, path: str) -> dict:
    if x is None:
      return {"t": "none"}
    if isinstance(x, types.SharedArray):
      types.validate_shared_array(x, path, check_values=False)
      return {"t": "shared", "shape": list(x.shape), "dtype": np.dtype(x.dtype).name,
              "bits": x.bits, "axis": x.axis, "group_size": x.group_size,
              "vector_dim": x.vector_dim,
              "indices": self.array(x.indices, _join(path, "indices")),
              "codebook": self.array(x.codebook, _join(path, "codebook"))}
    if isinstance(x, types.HashedArray):
      types.validate_hashed_array(x, path)
      return {"t": "hashed", "shape": list(x.shape), "dtype": np.dtype(x.dtype).name,
              "seed": int(x.seed), "signed": bool(x.signed), "version": int(x.version),
              "buckets": self.array(x.buckets, _join(path, "buckets"))}
    if _is_array(x):
      return {"t": "array", **self.array(x, path)}
    if isinstance(x, _PY_SCALARS):
      return {"t": "py", "value": x}
    if isinstance(x, collections.abc.Mapping):
      keys, items = [], []
      for k, v in x.items():
        if isinstance(k, bool) or not isinstance(k, (str, int)):
          raise TypeError(f"cannot save dict key {k!r} at {path!r}: keys must be str or int")
        keys.append(k if isinstance(k, str) else {"int": int(k)})
        items.append(self.encode(v, _join(path, k)))
      frozen = type(x).__name__ == "FrozenDict"
      return {"t": "frozendict" if frozen else "dict", "keys": keys, "items": items}
    if _is_namedtuple(x):
      cls = type(x)
      return {"t": "namedtuple", "type": f"{cls.__module__}:{cls.__qualname__}",
              "fields": list(cls._fields),
              "items": [self.encode(v, _join(path, f)) for f, v in zip(cls._fields, x)]}
    if isinstance(x, (list, tuple)):
      return {"t": "list" if isinstance(x, list) else "tuple",
              "items": [self.encode(v, _join(path, i)) for i, v in enumerate(x)]}
    # Any other registered pytree node: stored by its children; restore needs a target.
    children, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
      raise TypeError(
          f"cannot save a {type(x).__name__} at {path!r}: qws_jax.save stores dicts, lists,"
          " tuples, namedtuples, None, Python scalars, numpy/jax arrays, SharedArray and"
          " HashedArray")
    cls = type(x)
    keys = [tree_lib.path_str(p) for p, _ in children]
    return {"t": "node", "type": f"{cls.__module__}:{cls.__qualname__}", "keys": keys,
            "items": [self.encode(v, _join(path, k)) for k, (_, v) in zip(keys, children)]}


def _encode(tree) -> tuple[dict, dict[str, Any]]:
  enc = _Encoder()
  structure = enc.encode(tree, "")
  meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
          "qws_jax_version": _qws_version(), "tree": structure}
  return meta, enc.arrays


# ----------------------------------------------------------------------------- decoding


class _Corrupt(ValueError):
  pass


def _need(d, key, typ, path):
  if not isinstance(d, dict) or key not in d:
    raise _Corrupt(f"entry {path!r} lacks {key!r}")
  v = d[key]
  if typ is not None and (not isinstance(v, typ) or (typ is int and isinstance(v, bool))):
    raise _Corrupt(f"entry {path!r} has {key}={v!r}, expected {getattr(typ, '__name__', typ)}")
  return v


def _dtype(name, path):
  if not isinstance(name, str):
    raise _Corrupt(f"entry {path!r} has dtype {name!r}")
  try:
    return jnp.dtype(name)
  except TypeError:
    raise _Corrupt(f"entry {path!r} has unknown dtype {name!r}") from None


def _shape(s, path):
  if not isinstance(s, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                        and d >= 0 for d in s):
    raise _Corrupt(f"entry {path!r} has shape {s!r}")
  return tuple(s)


def _array_refs(node, path, out):
  """Collects ``(path, ref)`` of every stored array in the JSON structure."""
  t = _need(node, "t", str, path)
  if t == "array":
    out.append((path, node))
  elif t == "shared":
    out.append((_join(path, "indices"), _need(node, "indices", dict, path)))
    out.append((_join(path, "codebook"), _need(node, "codebook", dict, path)))
  elif t == "hashed":
    out.append((_join(path, "buckets"), _need(node, "buckets", dict, path)))
  elif t in ("dict", "frozendict", "list", "tuple", "namedtuple", "node"):
    items = _need(node, "items", list, path)
    for i, child in enumerate(items):
      _array_refs(child, _join(path, i), out)
  return out


class _Decoder:
  """Rebuilds a pytree from the JSON structure and the restored arrays."""

  def __init__(self, arrays: dict[str, np.ndarray], *, allow_nodes: bool):
    self.arrays = arrays
    self.allow_nodes = allow_nodes
    self.flat: list[tuple[str, Any]] = []  # (path, leaf) in save order

  def array(self, ref, path):
    kind = _need(ref, "kind", str, path)
    shape = _shape(_need(ref, "shape", list, path), path)
    dtype = _dtype(_need(ref, "dtype", str, path), path)
    key = ref.get("key")
    if key is None:
      if int(np.prod(shape, dtype=np.int64)) != 0:
        raise _Corrupt(f"entry {path!r} of shape {shape} has no stored array")
      a = np.zeros(shape, dtype)
    else:
      if key not in self.arrays:
        raise _Corrupt(f"array {key!r} of entry {path!r} is missing from the arrays item")
      a = self.arrays[key]
      if tuple(a.shape) != shape or np.dtype(a.dtype) != dtype:
        raise _Corrupt(f"entry {path!r}: stored array is {a.dtype}{list(a.shape)}, metadata"
                       f" says {np.dtype(dtype).name}{list(shape)}")
    if kind == "jax":
      return jnp.asarray(a)
    if kind == "numpy":
      return a
    if kind == "numpy_scalar":
      return a[()]
    raise _Corrupt(f"entry {path!r} has unknown array kind {kind!r}")

  def leaf(self, path, x):
    self.flat.append((path, x))
    return x

  def decode(self, node, path):
    t = _need(node, "t", str, path)
    if t == "none":
      return None
    if t == "array":
      return self.leaf(path, self.array(node, path))
    if t == "py":
      v = _need(node, "value", None, path)
      if not isinstance(v, _PY_SCALARS):
        raise _Corrupt(f"entry {path!r} has value {v!r}")
      return self.leaf(path, v)
    if t == "shared":
      x = types.SharedArray(
          indices=self.array(_need(node, "indices", dict, path), _join(path, "indices")),
          codebook=self.array(_need(node, "codebook", dict, path), _join(path, "codebook")),
          shape=_shape(_need(node, "shape", list, path), path),
          dtype=_dtype(_need(node, "dtype", str, path), path),
          bits=_need(node, "bits", int, path),
          axis=_need(node, "axis", (int, type(None)), path),
          group_size=_need(node, "group_size", (int, type(None)), path),
          vector_dim=_need(node, "vector_dim", int, path))
      try:
        types.validate_shared_array(x, path, check_values=False)
      except (TypeError, ValueError) as e:
        raise _Corrupt(str(e)) from None
      return self.leaf(path, x)
    if t == "hashed":
      version = _need(node, "version", int, path)
      if version not in hashing.SUPPORTED_HASH_VERSIONS:
        raise ValueError(f"leaf {path!r} uses hash version {version}, this qws_jax knows"
                         f" {hashing.SUPPORTED_HASH_VERSIONS}; upgrade qws_jax")
      x = types.HashedArray(
          buckets=self.array(_need(node, "buckets", dict, path), _join(path, "buckets")),
          shape=_shape(_need(node, "shape", list, path), path),
          dtype=_dtype(_need(node, "dtype", str, path), path),
          seed=_need(node, "seed", int, path), signed=_need(node, "signed", bool, path),
          version=version)
      try:
        types.validate_hashed_array(x, path)
      except (TypeError, ValueError) as e:
        raise _Corrupt(str(e)) from None
      return self.leaf(path, x)
    items = _need(node, "items", list, path)
    if t in ("dict", "frozendict"):
      keys = _need(node, "keys", list, path)
      if len(keys) != len(items):
        raise _Corrupt(f"entry {path!r} has {len(keys)} keys and {len(items)} items")
      out = {}
      for k, v in zip(keys, items):
        if isinstance(k, dict):
          k = _need(k, "int", int, path)
        elif not isinstance(k, str):
          raise _Corrupt(f"entry {path!r} has key {k!r}")
        out[k] = self.decode(v, _join(path, k))
      if t == "frozendict":
        from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top
        return frozen_dict.FrozenDict(out)
      return out
    if t in ("list", "tuple"):
      out = [self.decode(v, _join(path, i)) for i, v in enumerate(items)]
      return out if t == "list" else tuple(out)
    if t == "namedtuple":
      fields = _need(node, "fields", list, path)
      if len(fields) != len(items):
        raise _Corrupt(f"entry {path!r} has {len(fields)} fields and {len(items)} items")
      vals = [self.decode(v, _join(path, f)) for f, v in zip(fields, items)]
      cls = self._import(_need(node, "type", str, path), path)
      if tuple(getattr(cls, "_fields", ())) != tuple(fields):
        raise ValueError(f"namedtuple {node['type']} at {path!r} now has fields"
                         f" {getattr(cls, '_fields', None)}, the checkpoint has {fields};"
                         " pass target= to restore into the new structure")
      return cls(*vals)
    if t == "node":
      keys = _need(node, "keys", list, path)
      if len(keys) != len(items):
        raise _Corrupt(f"entry {path!r} has {len(keys)} keys and {len(items)} items")
      for k, v in zip(keys, items):
        self.decode(v, _join(path, k))
      if not self.allow_nodes:
        raise ValueError(
            f"the checkpoint holds a custom pytree node {node.get('type')!r} at {path!r};"
            " qws_jax.restore rebuilds it only with target= (a tree or abstract tree of the"
            " same structure)")
      return None
    raise _Corrupt(f"entry {path!r} has unknown node type {t!r}")

  def _import(self, spec, path):
    mod, _, qual = spec.partition(":")
    try:
      obj = importlib.import_module(mod)
      for part in qual.split("."):
        obj = getattr(obj, part)
    except (ImportError, AttributeError):
      raise ValueError(f"cannot import {spec!r}, the namedtuple type of {path!r}; pass"
                       " target= to restore into another structure") from None
    return obj


# ----------------------------------------------------------------------------- targets


def _describe(x) -> str:
  if isinstance(x, (types.SharedArray, types.HashedArray)):
    return repr(x)
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"array {np.dtype(x.dtype).name}{list(x.shape)}"
  return f"{type(x).__name__} {x!r}"


def _matches(want, got) -> bool:
  if isinstance(want, types.SharedArray):
    return isinstance(got, types.SharedArray) and all(
        getattr(want, f) == getattr(got, f)
        for f in ("shape", "bits", "axis", "group_size", "vector_dim")) and (
            np.dtype(want.dtype) == np.dtype(got.dtype)
            and tuple(want.codebook.shape) == tuple(got.codebook.shape))
  if isinstance(want, types.HashedArray):
    return isinstance(got, types.HashedArray) and all(
        getattr(want, f) == getattr(got, f) for f in ("shape", "seed", "signed", "version")
    ) and (np.dtype(want.dtype) == np.dtype(got.dtype)
           and want.num_buckets == got.num_buckets)
  if hasattr(want, "shape") and hasattr(want, "dtype"):
    return (not types.is_compressed(got) and hasattr(got, "shape")
            and tuple(got.shape) == tuple(want.shape)
            and np.dtype(got.dtype) == np.dtype(want.dtype))
  return not types.is_compressed(got) and not hasattr(got, "shape")


def _place(want, got):
  """Puts a restored array on the sharding of the target leaf, when it has one."""
  if isinstance(want, types.SharedArray) and isinstance(got, types.SharedArray):
    # Compressed leaves: each child goes to the sharding of the target's child.
    return types.SharedArray(_place(want.indices, got.indices), _place(want.codebook, got.codebook),
                             got.shape, got.dtype, got.bits, got.axis, got.group_size,
                             got.vector_dim)
  if isinstance(want, types.HashedArray) and isinstance(got, types.HashedArray):
    return types.HashedArray(_place(want.buckets, got.buckets), got.shape, got.dtype, got.seed,
                             got.signed, got.version)
  sharding = getattr(want, "sharding", None)
  if sharding is not None and not types.is_compressed(got) and hasattr(got, "shape"):
    return jax.device_put(got, sharding)
  if isinstance(want, jax.Array) and isinstance(got, np.ndarray):
    return jnp.asarray(got)
  return got


def _into_target(flat: list[tuple[str, Any]], target, where: str):
  got = dict(flat)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=types.is_compressed)
  want = [(tree_lib.path_str(p), leaf) for p, leaf in leaves]
  want_paths = {p for p, _ in want}
  problems = []
  missing = [p for p, _ in want if p not in got]
  extra = [p for p in got if p not in want_paths]
  if missing:
    problems.append(f"target leaves not in the checkpoint: {missing[:5]}"
                    + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
  if extra:
    problems.append(f"checkpoint leaves not in the target: {extra[:5]}"
                    + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""))
  for p, w in want:
    if p in got and not _matches(w, got[p]):
      problems.append(f"leaf {p!r}: target is {_describe(w)}, checkpoint has {_describe(got[p])}")
  if problems:
    raise ValueError(f"checkpoint {where} does not match the requested structure: "
                     + "; ".join(problems[:6]))
  return jax.tree_util.tree_unflatten(treedef, [_place(w, got[p]) for p, w in want])


# ----------------------------------------------------------------------------- Orbax glue


def _handler(compress: bool = True):
  ocp = _ocp()
  return ocp.CompositeCheckpointHandler(**{
      ARRAYS_ITEM: ocp.PyTreeCheckpointHandler(use_compression=compress),
      META_ITEM: ocp.JsonCheckpointHandler()})


def save_args(tree):
  """Orbax ``Composite`` args that save ``tree`` in the qws_jax format (for managers)."""
  ocp = _ocp()
  meta, arrays = _encode(tree)
  items = {META_ITEM: ocp.args.JsonSave(meta)}
  if arrays:
    items[ARRAYS_ITEM] = ocp.args.PyTreeSave(arrays)
  return ocp.args.Composite(**items)


def _target_shardings(node, path: str, want: dict, out: dict) -> dict:
  """``{array key: sharding}`` of stored jax arrays whose target leaf has a sharding.

  Walks the JSON structure with the decoder's path names, so that Orbax restores those
  arrays straight onto the target's sharding (each process reads only its own shards;
  no device ever holds a whole sharded leaf). Anything unexpected is skipped: the
  decoder reports it.
  """
  if not isinstance(node, dict):
    return out

  def put(ref, child):
    s = getattr(child, "sharding", None)
    if (isinstance(ref, dict) and ref.get("kind") == "jax" and ref.get("key") is not None
        and isinstance(s, jax.sharding.Sharding) and hasattr(child, "shape")
        and list(child.shape) == ref.get("shape")
        and np.dtype(child.dtype).name == ref.get("dtype")):
      out[str(ref["key"])] = s

  t = node.get("t")
  w = want.get(path)
  if t == "array":
    put(node, w)
  elif t == "shared" and isinstance(w, types.SharedArray):
    put(node.get("indices"), w.indices)
    put(node.get("codebook"), w.codebook)
  elif t == "hashed" and isinstance(w, types.HashedArray):
    put(node.get("buckets"), w.buckets)
  elif t in ("dict", "frozendict", "list", "tuple", "namedtuple", "node"):
    items = node.get("items") or []
    if t in ("list", "tuple"):
      names = list(range(len(items)))
    else:
      names = node.get("fields" if t == "namedtuple" else "keys") or []
    for k, v in zip(names, items):
      if isinstance(k, dict):
        k = k.get("int")
      _target_shardings(v, _join(path, k), want, out)
  return out


def _restore_items(read, where: str, target, has_item):
  """Shared restore logic. ``read(name, args)`` restores one Orbax item."""
  ocp = _ocp()
  if not has_item(META_ITEM):
    raise ValueError(f"{where} is not a qws_jax checkpoint (it has no {META_ITEM!r} item);"
                     " a plain Orbax checkpoint restores with ocp.StandardCheckpointer")
  try:
    meta = read(META_ITEM, ocp.args.JsonRestore())
  except (ValueError, TypeError, KeyError, OSError) as e:  # json.JSONDecodeError is a ValueError
    raise ValueError(f"corrupted qws_jax checkpoint metadata in {where}: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
    fmt = meta.get("format") if isinstance(meta, dict) else None
    raise ValueError(f"{where} has format {fmt!r}, not a {FORMAT_NAME!r} checkpoint")
  version = meta.get("format_version")
  if version not in SUPPORTED_FORMAT_VERSIONS:
    raise ValueError(f"{where} has qws_jax format version {version!r}; this qws_jax"
                     f" ({_qws_version()}) reads {SUPPORTED_FORMAT_VERSIONS}; upgrade qws_jax")
  try:
    structure = meta["tree"]
    refs = _array_refs(structure, "", [])
    keys = {}
    for p, ref in refs:
      key = ref.get("key") if isinstance(ref, dict) else None
      if key is not None:
        keys[str(key)] = p
  except (_Corrupt, KeyError, AttributeError, TypeError) as e:
    raise ValueError(f"corrupted qws_jax checkpoint metadata in {where}: {e}") from None
  arrays = {}
  if keys:
    if not has_item(ARRAYS_ITEM):
      raise ValueError(f"corrupted qws_jax checkpoint {where}: the {ARRAYS_ITEM!r} item is missing")
    sharded = {}
    if target is not None:  # arrays with a target sharding are read shard by shard
      leaves = jax.tree_util.tree_flatten_with_path(target, is_leaf=types.is_compressed)[0]
      sharded = _target_shardings(structure, "", {tree_lib.path_str(p): leaf
                                                  for p, leaf in leaves}, {})
    restore_args = {k: ocp.ArrayRestoreArgs(sharding=sharded[k]) if k in sharded
                    else ocp.RestoreArgs(restore_type=np.ndarray) for k in keys}
    try:
      arrays = read(ARRAYS_ITEM, ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # pylint: disable=broad-except  (tensorstore/Orbax raise many types)
      raise ValueError(f"corrupted qws_jax checkpoint {where}: cannot read the arrays:"
                       f" {type(e).__name__}: {str(e)[:300]}") from None
  try:
    dec = _Decoder(dict(arrays), allow_nodes=target is not None)
    tree = dec.decode(structure, "")
  except _Corrupt as e:
    raise ValueError(f"corrupted qws_jax checkpoint {where}: {e}") from None
  except ValueError as e:
    raise ValueError(f"cannot restore {where}: {e}") from None
  if target is None:
    return tree
  return _into_target(dec.flat, target, where)


def _check_dir(path: str) -> None:
  if not os.path.exists(path):
    parent = os.path.dirname(path) or "."
    base = os.path.basename(path)
    partial = [n for n in os.listdir(parent) if n.startswith(base + ".orbax-checkpoint-tmp")] \
        if os.path.isdir(parent) else []
    hint = f" (an unfinished save left {partial[0]!r})" if partial else ""
    raise FileNotFoundError(f"no checkpoint at {path!r}{hint}")
  if not os.path.isdir(path):
    raise ValueError(f"{path!r} is a file, not a qws_jax checkpoint directory")


# ----------------------------------------------------------------------------- public API


def save(path: str | os.PathLike, tree, *, force: bool = False, compress: bool = True) -> str:
  """Saves a pytree that may contain `SharedArray` / `HashedArray` leaves.

  The checkpoint is an Orbax composite directory: the arrays (packed indices, codebooks,
  buckets and plain arrays, stored as they are) and a JSON item with the tree structure
  and the static metadata, so `restore` needs no template. The write is atomic: Orbax
  writes into a temporary directory and renames it when complete.

  Args:
    path: the checkpoint directory to create.
    tree: nested dicts (str or int keys; flax ``FrozenDict``), lists, tuples,
      namedtuples (optax states), None, Python scalars, numpy / jax arrays (any dtype
      including bfloat16), `SharedArray`, `HashedArray`. Other registered pytree nodes
      are stored by their children and need ``target=`` at restore.
    force: replace an existing checkpoint at ``path`` (it is deleted before writing).
    compress: zstd-compress the array chunks (Orbax's default).

  Returns:
    The absolute path written.

  Raises:
    FileExistsError: ``path`` exists and ``force`` is False.
    TypeError: a leaf cannot be saved (its path is named).
    ValueError: a compressed leaf breaks its invariants (its path is named).

  Example:
    >>> import tempfile, os, numpy as np, qws_jax
    >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = qws_jax.save(d, {"w": np.arange(4.0, dtype=np.float32), "n": 3})
    >>> qws_jax.restore(d)["n"]
    3
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not force:
    raise FileExistsError(f"{path!r} already exists; pass force=True to replace it")
  args = save_args(tree)
  ocp = _ocp()
  with ocp.Checkpointer(_handler(compress)) as ckptr:
    ckptr.save(path, args, force=force)
  return path


def restore(path: str | os.PathLike, target=None):
  """Restores a checkpoint written by `save` (or a step of `CheckpointManager`).

  Args:
    path: the checkpoint directory.
    target: optional tree (concrete or abstract, e.g. from ``jax.eval_shape``) of the
      expected structure. When given, the checkpoint's leaves are matched to it by path;
      any missing, extra or different leaf (shape, dtype, compressed metadata) raises,
      the result takes the target's containers, and arrays go to the target leaf's
      ``sharding`` when it has one.

  Returns:
    The tree with the same node types as saved, bit-exact: `SharedArray` /
    `HashedArray` leaves, jax arrays as jax arrays, numpy arrays as numpy arrays.

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: ``path`` is not a qws_jax checkpoint, has an unknown format or hash
      version, corrupted metadata or arrays, or does not match ``target``. Nothing is
      returned half-restored.
  """
  path = os.path.abspath(os.fspath(path))
  _check_dir(path)
  ocp = _ocp()

  def has_item(name):
    found = os.path.isdir(os.path.join(path, name))
    if not found and name == META_ITEM:
      steps = sorted((n for n in os.listdir(path) if n.isdigit()), key=int)
      if steps:
        raise ValueError(f"{path!r} is not a qws_jax checkpoint but holds steps {steps[-3:]}"
                         " of a checkpoint manager: use qws_jax.CheckpointManager(dir).restore()"
                         f" or restore a step directory such as {os.path.join(path, steps[-1])!r}")
    return found

  with ocp.Checkpointer(_handler()) as ckptr:
    def read(name, args):
      return ckptr.restore(path, ocp.args.Composite(**{name: args}))[name]
    return _restore_items(read, repr(path), target, has_item)


class CheckpointManager:
  """Training checkpoints in the qws_jax format on top of ``ocp.CheckpointManager``.

  Saves any tree `save` accepts (compressed params, optax state, step counters) every
  ``save_interval_steps`` steps, keeps the ``max_to_keep`` latest, and restores the
  latest step without a template. Saves are asynchronous by default (Orbax's
  background commit); a save killed mid-write leaves the earlier steps restorable.

  Example::

    mngr = qws_jax.CheckpointManager("/tmp/run", save_interval_steps=100, max_to_keep=3)
    start = 0
    if mngr.latest_step() is not None:  # resume
      state = mngr.restore()
      start = mngr.latest_step() + 1
    for step in range(start, num_steps):
      state = train_step(state, batch)
      mngr.save(step, state)          # a no-op except every 100 steps
    mngr.close()

  Args:
    directory: the run directory (created if missing); one sub-directory per step.
    save_interval_steps: `save` writes only steps divisible by this.
    max_to_keep: number of most recent steps kept (None keeps all).
    async_save: commit in a background thread (call `wait_until_finished` before
      reading a step back in the same process).
    compress: zstd-compress the array chunks.
  """

  def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int = 1,
               max_to_keep: int | None = 3, async_save: bool = True, compress: bool = True):
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be a positive int, got {save_interval_steps!r}")
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
    ocp = _ocp()
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={ARRAYS_ITEM: ocp.PyTreeCheckpointHandler(use_compression=compress),
                       META_ITEM: ocp.JsonCheckpointHandler()})

  @property
  def orbax_manager(self):
    """The underlying ``ocp.CheckpointManager``."""
    return self._mngr

  def save(self, step: int, tree, *, force: bool = False) -> bool:
    """Saves ``tree`` as ``step`` if the interval says so (or ``force``); True if saved."""
    return bool(self._mngr.save(step, args=save_args(tree), force=force))

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def restore(self, step: int | None = None, target=None):
    """Restores ``step`` (default: the latest); see `restore` for ``target``."""
    self._mngr.wait_until_finished()
    if step is None:
      step = self._mngr.latest_step()
      if step is None:
        raise FileNotFoundError(f"no finished checkpoint step in {self.directory!r}")
    if step not in self._mngr.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory!r};"
                              f" steps: {self.all_steps()}")
    step_dir = os.path.join(self.directory, str(step))
    ocp = _ocp()

    def read(name, args):
      return self._mngr.restore(step, args=ocp.args.Composite(**{name: args}))[name]

    def has_item(name):
      return os.path.isdir(os.path.join(step_dir, name)) if os.path.isdir(step_dir) else True

    return _restore_items(read, f"{self.directory!r} step {step}", target, has_item)

  def wait_until_finished(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metadata(path: str | os.PathLike) -> dict:
  """The JSON metadata of a qws_jax checkpoint (structure, shapes, dtypes), no arrays."""
  path = os.path.abspath(os.fspath(path))
  _check_dir(path)
  meta_file = os.path.join(path, META_ITEM, "metadata")
  if not os.path.isfile(meta_file):
    raise ValueError(f"{path!r} is not a qws_jax checkpoint (it has no {META_ITEM!r} item)")
  try:
    with open(meta_file) as f:
      meta = json.load(f)
  except (ValueError, OSError) as e:
    raise ValueError(f"corrupted qws_jax checkpoint metadata in {path!r}: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
    raise ValueError(f"{path!r} is not a {FORMAT_NAME!r} checkpoint")
  if meta.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
    raise ValueError(f"{path!r} has qws_jax format version {meta.get('format_version')!r};"
                     f" this qws_jax reads {SUPPORTED_FORMAT_VERSIONS}")
  return meta
