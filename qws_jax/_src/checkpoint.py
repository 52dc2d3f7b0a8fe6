"""Orbax checkpoints of compressed pytrees: `save`, `restore` and `CheckpointManager`.

On-disk format (``FORMAT_NAME`` version ``FORMAT_VERSION``), an Orbax composite
checkpoint directory with two items:

* ``arrays``: an Orbax PyTree item (OCDBT + zarr3, zstd level 3 unless
  ``compress=False``) holding a flat dict ``{"0": array, "1": array, ...}`` of every
  array in the tree. Compressed leaves contribute their children exactly as they are in
  memory (a `SharedArray` its bit-packed uint8 ``indices`` and its ``codebook``, a
  `HashedArray` its ``buckets``). Nothing is unpacked or widened on disk.
* ``qws_jax``: a JSON item with ``format``, ``format_version``, ``qws_jax_version`` and
  ``tree``, the tree structure: dict / list / tuple / namedtuple / None nodes, Python
  scalars, array references (shape, dtype, numpy or jax) and compressed leaves, whose
  static metadata is the leaf schema of `qws_jax._src.types` (``to_meta`` /
  ``from_meta``, the one description of a compressed leaf).

Untrusted files: `restore` never imports or calls anything a file names. Node types
come from a fixed table (namedtuples and custom nodes come back as plain tuples or need
``target=``), every field is type- and range-checked, array shapes are compared with
Orbax's own metadata *before* anything is read, sizes are bounded (``max_bytes``), and
every compressed leaf is fully validated (indices within the codebook, finite
codebooks) before it is returned. Every failure is a ``ValueError`` (or
``FileNotFoundError``) naming the checkpoint and the leaf.

`save(force=True)` writes the new checkpoint beside the old one and swaps the two
directories with one atomic ``rename``, so a kill at any moment leaves ``path`` holding
the old or the new checkpoint.
"""

from __future__ import annotations

import collections.abc
import ctypes
import ctypes.util
import json
import math
import os
import shutil
import sys
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import hashing
from qws_jax._src import storage
from qws_jax._src import tree as tree_lib
from qws_jax._src import types

FORMAT_NAME = "qws_jax"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
META_ITEM = "qws_jax"
ARRAYS_ITEM = "arrays"
DEFAULT_MAX_BYTES = types.DEFAULT_MAX_BYTES
MAX_DEPTH = 256  # nesting depth of the stored tree

# What Orbax and qws_jax write at the top of a checkpoint directory: `save(force=True)`
# replaces a directory only if it holds nothing else.
_CHECKPOINT_ENTRIES = frozenset({ARRAYS_ITEM, META_ITEM, "_CHECKPOINT_METADATA", "_METADATA",
                                 "commit_success.txt", "descriptor"})
# Array dtypes a checkpoint may hold (numpy names); anything else is refused.
_ARRAY_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                           "uint32", "uint64", "float16", "bfloat16", "float32", "float64",
                           "complex64", "complex128"})
_CONTAINERS = ("dict", "frozendict", "list", "tuple", "namedtuple", "node")

_PY_SCALARS = (bool, int, float, str)


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


def _qws_version() -> str:
  import qws_jax  # pylint: disable=g-import-not-at-top
  return getattr(qws_jax, "__version__", "?")


def _show(keys: tuple) -> str:
  """Display string of a key tuple (as `tree.path_str` writes it)."""
  return "/".join(tree_lib._escape(k) for k in keys)  # pylint: disable=protected-access


def _short(v, n: int = 60) -> str:
  """``repr(v)``, cut to ``n`` characters (file contents in messages stay one short line)."""
  r = repr(v)
  return r if len(r) <= n else r[:n - 3] + "..."


def _is_namedtuple(x) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_array(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic, jax.Array))


def _partitioned(x) -> bool | None:
  """For flax's ``Partitioned`` / ``LogicallyPartitioned`` boxes with plain metadata:
  whether it is logical; None for anything else (stored as a custom node)."""
  flax_meta = sys.modules.get("flax.core.meta")
  if flax_meta is None or not isinstance(x, flax_meta.Partitioned):
    return None
  logical = type(x).__name__ == "LogicallyPartitioned"
  if type(x) is not flax_meta.Partitioned and not logical:
    return None  # a user subclass: a custom node
  if x.mesh is not None or getattr(x, "rules", None) is not None or not all(
      n is None or isinstance(n, str) for n in x.names):
    return None
  return logical


def _json_key(k):
  """A key-tuple element as JSON: str and int stay themselves, anything else is refused."""
  if isinstance(k, bool) or not isinstance(k, (str, int)):
    return str(k)
  return k


# ----------------------------------------------------------------------------- encoding


class _Encoder:
  """Turns a pytree into (JSON structure, flat dict of arrays)."""

  def __init__(self, entropy: bool = True):
    self.arrays: dict[str, Any] = {}
    self.entropy = entropy

  def array(self, x, keys: tuple) -> dict | None:
    if x is None:
      return None
    if isinstance(x, jax.core.Tracer):
      raise TypeError(f"cannot save a traced value at {_show(keys)!r}: call qws_jax.save"
                      " outside jit")
    if isinstance(x, jax.Array):
      kind = "jax"
    elif isinstance(x, np.generic):
      kind, x = "numpy_scalar", np.asarray(x)
    else:
      kind = "numpy"
    if np.dtype(x.dtype).name not in _ARRAY_DTYPES:
      raise TypeError(f"cannot save an array of dtype {x.dtype} at {_show(keys)!r}")
    ref = {"kind": kind, "shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name,
           "key": None}
    if x.size:  # Orbax cannot store zero-size arrays; their shape and dtype suffice.
      key = str(len(self.arrays))
      self.arrays[key] = x
      ref["key"] = key
    return ref

  def coded(self, x, keys: tuple) -> dict | None:
    """Entropy-coded indices of a `SharedArray`, when smaller than the packed ones."""
    if not isinstance(x, types.SharedArray) or isinstance(x.indices, jax.core.Tracer):
      return None
    sharding = getattr(x.indices, "sharding", None)
    if sharding is not None and len(sharding.device_set) > 1:
      return None  # spread over devices: kept packed, so restore reads it shard by shard
    try:
      enc = storage.encode_indices(x)
    except ValueError as e:  # e.g. an index past the end of the codebook
      raise ValueError(f"cannot save the leaf at {_show(keys)!r}: {e}") from None
    size = len(enc["symbols"]) + len(enc["positions"] or b"")
    if size >= types._nbytes(x.indices):  # pylint: disable=protected-access
      return None

    def ref(data, name):
      return None if data is None else self.array(np.frombuffer(data, np.uint8).copy(),
                                                  keys + (name,))
    kind = "jax" if isinstance(x.indices, jax.Array) else "numpy"
    return {"codec": storage.CODEC, "kind": kind, "index_shape": enc["index_shape"],
            "count": enc["count"],
            "symbols": ref(enc["symbols"], "indices.symbols"),
            "positions": ref(enc["positions"], "indices.positions")}

  def encode(self, x, keys: tuple, depth: int = 0) -> dict:
    if depth > MAX_DEPTH:
      raise ValueError(f"the tree is nested deeper than {MAX_DEPTH} levels at {_show(keys)!r}")
    if x is None:
      return {"t": "none"}
    if types.is_compressed(x):
      where = _show(keys)
      types.validate(x, where, check_values=False)
      arrays = types.children(x)
      coded = self.coded(x, keys) if self.entropy else None
      if coded is not None:
        arrays = {**arrays, "indices": None}
      node = {"t": "leaf", "meta": types.to_meta(x),
              "arrays": {n: self.array(a, keys + (n,)) for n, a in arrays.items()}}
      if coded is not None:
        node["coded"] = coded
      return node
    if _is_array(x):
      return {"t": "array", **self.array(x, keys)}
    if isinstance(x, _PY_SCALARS):
      if isinstance(x, float) and not math.isfinite(x):
        raise TypeError(f"cannot save the float {x!r} at {_show(keys)!r} (not JSON);"
                        " store it in an array")
      return {"t": "py", "value": x}
    box = _partitioned(x)
    if box is not None:  # flax's boxed params (nn.with_partitioning / logical partitioning)
      return {"t": "partitioned", "logical": box, "names": list(x.names),
              "items": [self.encode(x.value, keys, depth + 1)]}
    if isinstance(x, collections.abc.Mapping):
      ks, items = [], []
      for k, v in x.items():
        if isinstance(k, bool) or not isinstance(k, (str, int)):
          raise TypeError(f"cannot save dict key {k!r} at {_show(keys)!r}: keys must be str"
                          " or int")
        ks.append(k if isinstance(k, str) else {"int": int(k)})
        items.append(self.encode(v, keys + (k,), depth + 1))
      frozen = type(x).__name__ == "FrozenDict"
      return {"t": "frozendict" if frozen else "dict", "keys": ks, "items": items}
    if _is_namedtuple(x):
      cls = type(x)
      return {"t": "namedtuple", "name": cls.__qualname__, "fields": list(cls._fields),
              "items": [self.encode(v, keys + (f,), depth + 1) for f, v in zip(cls._fields, x)]}
    if isinstance(x, (list, tuple)):
      return {"t": "list" if isinstance(x, list) else "tuple",
              "items": [self.encode(v, keys + (i,), depth + 1) for i, v in enumerate(x)]}
    # Any other registered pytree node: stored by its children; restore needs a target.
    children, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
      raise TypeError(
          f"cannot save a {type(x).__name__} at {_show(keys)!r}: qws_jax.save stores dicts,"
          " lists, tuples, namedtuples, None, Python scalars, numpy/jax arrays, SharedArray"
          " and HashedArray")
    sub = [tuple(_json_key(k) for k in tree_lib.path_keys(p)) for p, _ in children]
    return {"t": "node", "name": type(x).__qualname__, "keys": [list(k) for k in sub],
            "items": [self.encode(v, keys + k, depth + 1) for k, (_, v) in zip(sub, children)]}


def _encode(tree, entropy: bool = True) -> tuple[dict, dict[str, Any]]:
  enc = _Encoder(entropy)
  structure = enc.encode(tree, ())
  meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
          "qws_jax_version": _qws_version(), "tree": structure}
  return meta, enc.arrays


# ----------------------------------------------------------------------------- decoding


class _Corrupt(ValueError):
  pass


def _need(d, key, typ, where):
  if not isinstance(d, dict) or key not in d:
    raise _Corrupt(f"entry {where!r} lacks {key!r}")
  v = d[key]
  if typ is not None and (not isinstance(v, typ) or (typ is int and isinstance(v, bool))):
    raise _Corrupt(f"entry {where!r} has {key}={v!r}, expected {getattr(typ, '__name__', typ)}")
  return v


def _v1_leaf(node, t):
  """A format-1 ``shared``/``hashed`` node in the format-2 ``leaf`` form."""
  cls = types.SharedArray if t == "shared" else types.HashedArray
  meta = {"kind": t}
  for name, _ in cls._qws_static:  # pylint: disable=protected-access
    if name in node:
      meta[name] = node[name]
  return {"t": "leaf", "meta": meta,
          "arrays": {n: node.get(n) for n in cls._qws_children}}  # pylint: disable=protected-access


def _children(node, t, where):
  """``[(key, child node)]`` of a container node, keys as in jax key tuples."""
  items = _need(node, "items", list, where)
  if t in ("list", "tuple"):
    return list(enumerate(items))
  if t in ("dict", "frozendict"):
    keys = _need(node, "keys", list, where)
    out = []
    for k in keys:
      if isinstance(k, dict):
        k = _need(k, "int", int, where)
      elif not isinstance(k, str):
        raise _Corrupt(f"entry {where!r} has key {k!r}")
      out.append(k)
  elif t == "namedtuple":
    out = _need(node, "fields", list, where)
    if not all(isinstance(f, str) for f in out):
      raise _Corrupt(f"entry {where!r} has fields {out!r}")
  else:  # node: each key is a key tuple (v1: a path string)
    out = []
    for k in _need(node, "keys", list, where):
      if isinstance(k, str):
        k = tuple(k.split("/"))
      elif isinstance(k, list) and all(isinstance(e, (str, int)) and not isinstance(e, bool)
                                       for e in k):
        k = tuple(k)
      else:
        raise _Corrupt(f"entry {where!r} has key {k!r}")
      out.append(k)
  if len(out) != len(items):
    raise _Corrupt(f"entry {where!r} has {len(out)} keys and {len(items)} items")
  if t in ("dict", "frozendict", "namedtuple") and len(set(out)) != len(out):
    raise _Corrupt(f"entry {where!r} has duplicate keys")
  return list(zip(out, items))


def _walk(node, keys: tuple, visit, depth: int = 0):
  """Calls ``visit(keys, node, t)`` on every node of the stored structure, depth first."""
  where = _show(keys)
  if depth > MAX_DEPTH:
    raise _Corrupt(f"the stored tree is nested deeper than {MAX_DEPTH} levels at {where!r}")
  t = _need(node, "t", str, where)
  if t in ("shared", "hashed"):
    node, t = _v1_leaf(node, t), "leaf"
  visit(keys, node, t)
  if t == "partitioned":
    items = _need(node, "items", list, where)
    if len(items) != 1:
      raise _Corrupt(f"entry {where!r} is a damaged partitioned box")
    _walk(items[0], keys, visit, depth + 1)
  if t in _CONTAINERS:
    for k, child in _children(node, t, where):
      _walk(child, keys + (k if t == "node" else (k,)), visit, depth + 1)


def _array_refs(structure) -> list[tuple[tuple, dict]]:
  """``[(keys, ref)]`` of every stored array reference in the structure."""
  out = []

  def visit(keys, node, t):
    if t == "array":
      out.append((keys, node))
    elif t == "leaf":
      arrays = _need(node, "arrays", dict, _show(keys))
      coded = node.get("coded")
      if coded is not None:
        coded = _need(node, "coded", dict, _show(keys))
        arrays = {**arrays, "indices.symbols": coded.get("symbols"),
                  "indices.positions": coded.get("positions")}
      for name, ref in arrays.items():
        if ref is not None:
          out.append((keys + (name,), ref))
  _walk(structure, (), visit)
  return out


def _check_ref(ref, where, max_bytes):
  """Validates an array reference; returns ``(kind, shape, dtype, key)``."""
  kind = _need(ref, "kind", str, where)
  if kind not in ("jax", "numpy", "numpy_scalar"):
    raise _Corrupt(f"entry {where!r} has unknown array kind {kind!r}")
  shape = _need(ref, "shape", list, where)
  if len(shape) > types.MAX_NDIM or not all(
      isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape):
    raise _Corrupt(f"entry {where!r} has shape {shape!r}")
  shape = tuple(shape)
  name = _need(ref, "dtype", str, where)
  if name not in _ARRAY_DTYPES:
    raise _Corrupt(f"entry {where!r} has dtype {name!r}")
  dtype = jnp.dtype(name)
  nbytes = math.prod(shape) * dtype.itemsize
  if max_bytes is not None and nbytes > max_bytes:
    raise ValueError(f"entry {where!r} is an array of shape {list(shape)} ({nbytes} bytes), over"
                     f" the limit max_bytes={max_bytes}; pass a larger max_bytes= to restore it")
  key = ref.get("key")
  if key is None:
    if math.prod(shape) != 0:
      raise _Corrupt(f"entry {where!r} of shape {list(shape)} has no stored array")
  elif not isinstance(key, str):
    raise _Corrupt(f"entry {where!r} has key {key!r}")
  return kind, shape, dtype, key


class _Decoder:
  """Rebuilds a pytree from the JSON structure and the restored arrays."""

  def __init__(self, arrays: dict[str, np.ndarray], *, allow_nodes: bool, max_bytes):
    self.arrays = arrays
    self.allow_nodes = allow_nodes
    self.max_bytes = max_bytes
    self.flat: list[tuple[tuple, Any]] = []  # (key tuple, leaf) in save order

  def array(self, ref, keys):
    where = _show(keys)
    kind, shape, dtype, key = _check_ref(ref, where, self.max_bytes)
    if key is None:
      a = np.zeros(shape, dtype)
    else:
      if key not in self.arrays:
        raise _Corrupt(f"array {key!r} of entry {where!r} is missing from the arrays item")
      a = self.arrays[key]
      if tuple(a.shape) != shape or np.dtype(a.dtype) != dtype:
        raise _Corrupt(f"entry {where!r}: stored array is {a.dtype}{list(a.shape)}, metadata"
                       f" says {np.dtype(dtype).name}{list(shape)}")
    if kind == "jax":
      return jnp.asarray(a)
    if kind == "numpy":
      return a
    return a[()]

  def coded_indices(self, node, meta, arrays, keys):
    """Decodes entropy-coded indices (``storage.decode_indices``) to packed indices."""
    where = _show(keys)
    coded = _need(node, "coded", dict, where)
    if coded.get("codec") != storage.CODEC:
      raise _Corrupt(f"entry {where!r} has indices coded with {_short(coded.get('codec'))};"
                     f" this qws_jax reads {storage.CODEC!r}")
    if arrays.get("indices") is not None:
      raise _Corrupt(f"entry {where!r} has both coded and packed indices")
    bits, sparse = meta.get("bits"), meta.get("sparse", False)
    cb = arrays.get("codebook")
    vector = meta.get("vector_dim", 1) != 1
    if (not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8
        or not isinstance(sparse, bool) or cb is None or cb.ndim < (2 if vector else 1)):
      raise _Corrupt(f"entry {where!r} has coded indices with bits={_short(bits)},"
                     f" sparse={_short(sparse)}")
    k = int(cb.shape[-2] if vector else cb.shape[-1])
    if not 2 <= k <= 2**bits:
      raise _Corrupt(f"entry {where!r} has coded indices with k={k} and bits={bits}")

    def data(name):
      ref = coded.get(name)
      if ref is None:
        return None
      a = np.asarray(self.array(ref, keys + (f"indices.{name}",)))
      if a.dtype != np.uint8 or a.ndim != 1:
        raise _Corrupt(f"entry {where!r}: coded {name} must be 1-D uint8")
      return a.tobytes()
    kind = coded.get("kind")
    if kind not in ("jax", "numpy"):
      raise _Corrupt(f"entry {where!r} has coded indices of kind {_short(kind)}")
    try:
      packed = storage.decode_indices({"bits": bits, "k": k, "sparse": sparse}, data("symbols"),
                                      data("positions"), coded.get("index_shape"),
                                      coded.get("count"), max_bytes=self.max_bytes)
    except (ValueError, TypeError) as e:
      raise _Corrupt(f"entry {where!r}: damaged entropy-coded indices: {e}") from None
    return jnp.asarray(packed) if kind == "jax" else packed

  def leaf(self, keys, x):
    self.flat.append((keys, x))
    return x

  def decode(self, node, keys: tuple, depth: int = 0):
    where = _show(keys)
    if depth > MAX_DEPTH:
      raise _Corrupt(f"the stored tree is nested deeper than {MAX_DEPTH} levels at {where!r}")
    t = _need(node, "t", str, where)
    if t in ("shared", "hashed"):  # format 1
      node, t = _v1_leaf(node, t), "leaf"
    if t == "none":
      return None
    if t == "array":
      return self.leaf(keys, self.array(node, keys))
    if t == "py":
      v = _need(node, "value", None, where)
      if not isinstance(v, _PY_SCALARS):
        raise _Corrupt(f"entry {where!r} has value {v!r}")
      return self.leaf(keys, v)
    if t == "leaf":
      meta = _need(node, "meta", dict, where)
      if meta.get("kind") == "hashed" and meta.get("version") not in (
          hashing.SUPPORTED_HASH_VERSIONS):
        raise ValueError(f"leaf {where!r} uses hash version {_short(meta.get('version'))}, this"
                         f" qws_jax knows {hashing.SUPPORTED_HASH_VERSIONS}; upgrade qws_jax")
      refs = _need(node, "arrays", dict, where)
      arrays = {n: None if r is None else self.array(r, keys + (n,)) for n, r in refs.items()}
      if "coded" in node:
        arrays["indices"] = self.coded_indices(node, meta, arrays, keys)
      try:
        x = types.from_meta(meta, arrays, where, max_bytes=self.max_bytes)
      except (TypeError, ValueError) as e:
        raise _Corrupt(str(e)) from None
      return self.leaf(keys, x)
    if t == "partitioned":
      names = _need(node, "names", list, where)
      logical = _need(node, "logical", bool, where)
      items = _need(node, "items", list, where)
      if len(items) != 1 or not all(n is None or isinstance(n, str) for n in names):
        raise _Corrupt(f"entry {where!r} is a damaged partitioned box")
      value = self.decode(items[0], keys, depth + 1)
      import flax.linen as nn  # pylint: disable=g-import-not-at-top
      box = nn.LogicallyPartitioned if logical else nn.Partitioned
      return box(value, tuple(names))
    if t not in _CONTAINERS:
      raise _Corrupt(f"entry {where!r} has unknown node type {_short(t)}")
    kids = _children(node, t, where)
    if t == "node":
      for k, v in kids:
        self.decode(v, keys + k, depth + 1)
      if not self.allow_nodes:
        name = node.get("name", node.get("type"))
        raise ValueError(
            f"the checkpoint holds a custom pytree node {_short(name)} at {where!r};"
            " qws_jax.restore rebuilds it only with target= (a tree or abstract tree of the"
            " same structure)")
      return None
    vals = [(k, self.decode(v, keys + (k,), depth + 1)) for k, v in kids]
    if t == "dict":
      return dict(vals)
    if t == "frozendict":
      from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top
      return frozen_dict.FrozenDict(dict(vals))
    if t == "list":
      return [v for _, v in vals]
    return tuple(v for _, v in vals)  # tuple, and namedtuple in its plain form


# ----------------------------------------------------------------------------- targets


def _describe(x) -> str:
  if types.is_compressed(x):
    return repr(x)
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"array {np.dtype(x.dtype).name}{list(x.shape)}"
  return f"{type(x).__name__} {x!r}"


def _matches(want, got) -> bool:
  if types.is_compressed(want):
    if type(got) is not type(want):
      return False
    if types.to_meta(want) != types.to_meta(got):
      return False
    wc, gc = types.children(want), types.children(got)
    return all((wc[n] is None) == (gc[n] is None)
               and (wc[n] is None or tuple(wc[n].shape) == tuple(gc[n].shape)) for n in wc)
  if hasattr(want, "shape") and hasattr(want, "dtype"):
    return (not types.is_compressed(got) and hasattr(got, "shape")
            and tuple(got.shape) == tuple(want.shape)
            and np.dtype(got.dtype) == np.dtype(want.dtype))
  return not types.is_compressed(got) and not hasattr(got, "shape")


def _place(want, got):
  """Puts a restored array on the sharding of the target leaf, when it has one."""
  if types.is_compressed(want) and types.is_compressed(got):
    # Compressed leaves: each child goes to the sharding of the target's child.
    wc = types.children(want)
    placed = {n: None if a is None else _place(wc[n], a) for n, a in types.children(got).items()}
    return type(got)(**{**{f.name: getattr(got, f.name)
                           for f in type(got).__dataclass_fields__.values()}, **placed})
  sharding = getattr(want, "sharding", None)
  if sharding is not None and not types.is_compressed(got) and hasattr(got, "shape"):
    return jax.device_put(got, sharding)
  if isinstance(want, jax.Array) and isinstance(got, np.ndarray):
    return jnp.asarray(got)
  return got


def _target_leaves(target):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=types.is_compressed)
  return [(tree_lib.path_keys(p), leaf) for p, leaf in leaves], treedef


def _into_target(flat: list[tuple[tuple, Any]], target, where: str):
  got = dict(flat)
  want, treedef = _target_leaves(target)
  want_keys = {k for k, _ in want}
  problems = []
  missing = [_show(k) for k, _ in want if k not in got]
  extra = [_show(k) for k in got if k not in want_keys]
  if missing:
    problems.append(f"target leaves not in the checkpoint: {missing[:5]}"
                    + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
  if extra:
    problems.append(f"checkpoint leaves not in the target: {extra[:5]}"
                    + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""))
  for k, w in want:
    if k in got and not _matches(w, got[k]):
      problems.append(f"leaf {_show(k)!r}: target is {_describe(w)}, checkpoint has"
                      f" {_describe(got[k])}")
  if problems:
    raise ValueError(f"checkpoint {where} does not match the requested structure: "
                     + "; ".join(problems[:6]))
  return jax.tree_util.tree_unflatten(treedef, [_place(w, got[k]) for k, w in want])


# ----------------------------------------------------------------------------- Orbax glue


def _handler(compress: bool = True):
  ocp = _ocp()
  return ocp.CompositeCheckpointHandler(**{
      ARRAYS_ITEM: ocp.PyTreeCheckpointHandler(use_compression=compress),
      META_ITEM: ocp.JsonCheckpointHandler()})


def save_args(tree, *, entropy: bool = True):
  """Orbax ``Composite`` args that save ``tree`` in the qws_jax format (for managers)."""
  ocp = _ocp()
  meta, arrays = _encode(tree, entropy)
  items = {META_ITEM: ocp.args.JsonSave(meta)}
  if arrays:
    items[ARRAYS_ITEM] = ocp.args.PyTreeSave(arrays)
  return ocp.args.Composite(**items)


def _target_shardings(refs, target) -> dict:
  """``{array key: sharding}`` of stored jax arrays whose target leaf has a sharding.

  So that Orbax restores those arrays straight onto the target's sharding (each process
  reads only its own shards; no device ever holds a whole sharded leaf). Anything
  unexpected is skipped: the decoder reports it.
  """
  want = {}
  for keys, leaf in _target_leaves(target)[0]:
    if types.is_compressed(leaf):
      for n, a in types.children(leaf).items():
        want[keys + (n,)] = a
    else:
      want[keys] = leaf
  out = {}
  for keys, ref in refs:
    child = want.get(keys)
    s = getattr(child, "sharding", None)
    if (isinstance(ref, dict) and ref.get("kind") == "jax" and ref.get("key") is not None
        and isinstance(s, jax.sharding.Sharding) and hasattr(child, "shape")
        and list(child.shape) == ref.get("shape")
        and np.dtype(child.dtype).name == ref.get("dtype")):
      out[str(ref["key"])] = s
  return out


def _check_meta(meta, where: str) -> dict:
  if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
    fmt = meta.get("format") if isinstance(meta, dict) else None
    raise ValueError(f"{where} has format {_short(fmt)}, not a {FORMAT_NAME!r} checkpoint")
  version = meta.get("format_version")
  if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
    raise ValueError(f"{where} has qws_jax format version {_short(version)}; this qws_jax"
                     f" ({_qws_version()}) reads {SUPPORTED_FORMAT_VERSIONS}; upgrade qws_jax")
  return meta


def _restore_items(read, read_array_metadata, where: str, target, has_item, max_bytes):
  """Shared restore logic. ``read(name, args)`` restores one Orbax item."""
  ocp = _ocp()
  if not has_item(META_ITEM):
    raise ValueError(f"{where} is not a qws_jax checkpoint (it has no {META_ITEM!r} item);"
                     " a plain Orbax checkpoint restores with ocp.StandardCheckpointer")
  try:
    meta = read(META_ITEM, ocp.args.JsonRestore())
  except (ValueError, TypeError, KeyError, OSError, RecursionError) as e:
    raise ValueError(f"corrupted qws_jax checkpoint metadata in {where}: {str(e)[:300]}") from None
  _check_meta(meta, where)
  try:
    structure = meta["tree"]
    refs = _array_refs(structure)
    keys = {}
    for p, ref in refs:
      _, shape, dtype, key = _check_ref(ref, _show(p), max_bytes)
      if key is not None:
        if key in keys:
          raise _Corrupt(f"array {key!r} is referenced twice ({_show(keys[key][0])!r},"
                         f" {_show(p)!r})")
        keys[key] = (p, shape, dtype)
  except (_Corrupt, KeyError, AttributeError, TypeError) as e:
    raise ValueError(f"corrupted qws_jax checkpoint metadata in {where}: {e}") from None
  arrays = {}
  if keys:
    if not has_item(ARRAYS_ITEM):
      raise ValueError(f"corrupted qws_jax checkpoint {where}: the {ARRAYS_ITEM!r} item is missing")
    # Orbax's own record of what is stored must agree before anything is read: a file
    # cannot make restore allocate more than its metadata declares (and max_bytes allows).
    try:
      stored = dict(read_array_metadata())
    except Exception as e:  # pylint: disable=broad-except  (tensorstore/Orbax raise many types)
      raise ValueError(f"corrupted qws_jax checkpoint {where}: cannot read the arrays'"
                       f" metadata: {type(e).__name__}: {str(e)[:300]}") from None
    if set(stored) != set(keys):
      raise ValueError(f"corrupted qws_jax checkpoint {where}: the arrays item holds"
                       f" {len(stored)} arrays, the metadata references {len(keys)}")
    for key, (p, shape, dtype) in keys.items():
      m = stored[key]
      if tuple(getattr(m, "shape", ())) != shape or np.dtype(getattr(m, "dtype", None)) != dtype:
        raise ValueError(f"corrupted qws_jax checkpoint {where}: entry {_show(p)!r} is stored as"
                         f" {getattr(m, 'dtype', '?')}{list(getattr(m, 'shape', ()))}, the"
                         f" metadata says {np.dtype(dtype).name}{list(shape)}")
    sharded = _target_shardings(refs, target) if target is not None else {}
    restore_args = {k: ocp.ArrayRestoreArgs(sharding=sharded[k]) if k in sharded
                    else ocp.RestoreArgs(restore_type=np.ndarray) for k in keys}
    try:
      arrays = read(ARRAYS_ITEM, ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # pylint: disable=broad-except  (tensorstore/Orbax raise many types)
      raise ValueError(f"corrupted qws_jax checkpoint {where}: cannot read the arrays:"
                       f" {type(e).__name__}: {str(e)[:300]}") from None
  try:
    dec = _Decoder(dict(arrays), allow_nodes=target is not None, max_bytes=max_bytes)
    tree = dec.decode(structure, ())
  except _Corrupt as e:
    raise ValueError(f"corrupted qws_jax checkpoint {where}: {e}") from None
  except ValueError as e:
    raise ValueError(f"cannot restore {where}: {e}") from None
  except (TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
          RecursionError) as e:
    raise ValueError(f"corrupted qws_jax checkpoint {where}: {type(e).__name__}:"
                     f" {str(e)[:300]}") from None
  if target is None:
    return tree
  return _into_target(dec.flat, target, where)


def _check_dir(path: str) -> None:
  if not os.path.exists(path):
    parent = os.path.dirname(path) or "."
    base = os.path.basename(path)
    left = sorted(n for n in os.listdir(parent) if n.startswith(base + ".")) \
        if os.path.isdir(parent) else []
    # save(force=True) without an atomic exchange: old (and new) complete checkpoints.
    whole = [n for n in left if (".qws-old-" in n or ".qws-new-" in n)
             and os.path.isdir(os.path.join(parent, n, META_ITEM))]
    partial = [n for n in left if ".orbax-checkpoint-tmp" in n or ".qws-" in n]
    if whole:
      hint = (f" (an interrupted save(force=True) left the complete checkpoint(s) {whole}"
              " beside it: restore one, or rename it to this path)")
    else:
      hint = f" (an unfinished save left {partial[0]!r})" if partial else ""
    raise FileNotFoundError(f"no checkpoint at {path!r}{hint}")
  if not os.path.isdir(path):
    raise ValueError(f"{path!r} is a file, not a qws_jax checkpoint directory")


def _read_json(path: str, where: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (ValueError, OSError, RecursionError) as e:
    raise ValueError(f"corrupted qws_jax checkpoint metadata in {where}: {str(e)[:300]}") from None


def check_replaceable(path: str) -> None:
  """Raises unless ``path`` is a qws_jax checkpoint that `save(force=True)` may replace."""
  if not os.path.isdir(path) or os.path.islink(path):
    raise FileExistsError(f"{path!r} exists and is not a qws_jax checkpoint directory;"
                          " save(force=True) replaces only qws_jax checkpoints")
  entries = set(os.listdir(path))
  others = sorted(entries - _CHECKPOINT_ENTRIES)
  meta_file = os.path.join(path, META_ITEM, "metadata")
  if others or not os.path.isfile(meta_file):
    what = f"it holds {others[:5]}" if others else f"it has no {META_ITEM!r} item"
    raise FileExistsError(f"{path!r} exists and is not a qws_jax checkpoint ({what});"
                          " save(force=True) replaces only qws_jax checkpoints")
  try:
    _check_meta(_read_json(meta_file, repr(path)), repr(path))
  except ValueError as e:
    raise FileExistsError(f"{path!r} exists and is not a readable qws_jax checkpoint ({e});"
                          " save(force=True) replaces only qws_jax checkpoints") from None


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  at_fdcwd = -100
  if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no exchange on this file system
    return False
  raise OSError(err, f"cannot swap {a!r} and {b!r}: {os.strerror(err)}")


def _swap_in(new: str, path: str) -> None:
  """Moves the finished checkpoint ``new`` to ``path``, replacing what is there."""
  if not os.path.exists(path):
    os.rename(new, path)
    return
  if _exchange(new, path):  # one atomic step: path is the old, then the new checkpoint
    shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old checkpoint
    return
  old = f"{path}.qws-old-{uuid.uuid4().hex[:8]}"
  os.rename(path, old)  # a kill here leaves the old checkpoint at `old` (named by restore)
  os.rename(new, path)
  shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- public API


def save(path: str | os.PathLike, tree, *, force: bool = False, compress: bool = True,
         entropy: bool = True) -> str:
  """Saves a pytree that may contain `SharedArray` / `HashedArray` leaves.

  The checkpoint is an Orbax composite directory: the arrays (packed indices, codebooks,
  buckets and plain arrays, stored as they are) and a JSON item with the tree structure
  and the static metadata, so `restore` needs no template.

  The write is atomic. The checkpoint is written to a temporary directory beside
  ``path`` and renamed to ``path`` once complete; with ``force=True`` an existing
  checkpoint is swapped out by one atomic rename (Linux ``renameat2``; elsewhere two
  renames) and deleted afterwards, so a kill at any moment leaves ``path`` holding
  either the old or the new checkpoint.

  Args:
    path: the checkpoint directory to create.
    tree: nested dicts (str or int keys; flax ``FrozenDict``), lists, tuples,
      namedtuples (optax states; restored as plain tuples unless ``target=`` is given),
      None, Python scalars, numpy / jax arrays (any numeric dtype including bfloat16),
      `SharedArray`, `HashedArray`. Other registered pytree nodes are stored by their
      children and need ``target=`` at restore.
    force: replace an existing qws_jax checkpoint at ``path``. Anything else at
      ``path`` (a file, a directory holding other files) is never replaced.
    compress: zstd-compress the array chunks (Orbax's default).
    entropy: store each `SharedArray`'s indices Huffman-coded (`qws_jax._src.entropy`)
      when that is smaller than the packed indices; a sparse (pruned) leaf then stores
      only its non-zeros' indices and their coded positions. `restore` decodes them
      bit-exactly. Indices spread over several devices stay packed (so that restoring
      onto a mesh reads them shard by shard).

  Returns:
    The absolute path written.

  Raises:
    FileExistsError: ``path`` exists and ``force`` is False, or it is not a qws_jax
      checkpoint.
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
  if os.path.lexists(path):
    if not force:
      raise FileExistsError(f"{path!r} already exists; pass force=True to replace it")
    check_replaceable(path)
  args = save_args(tree, entropy=entropy)  # every leaf is checked before anything is written
  ocp = _ocp()
  new = f"{path}.qws-new-{uuid.uuid4().hex[:8]}"
  try:
    with ocp.Checkpointer(_handler(compress)) as ckptr:
      ckptr.save(new, args)
    _swap_in(new, path)
  finally:
    if os.path.exists(new):
      shutil.rmtree(new, ignore_errors=True)
  return path


def _orbax_array_metadata(directory: str) -> dict:
  from etils import epath  # pylint: disable=g-import-not-at-top
  ocp = _ocp()
  m = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory))
  m = getattr(m, "tree", m)
  if not isinstance(m, collections.abc.Mapping):
    raise ValueError(f"unexpected arrays metadata {type(m).__name__}")
  return dict(m)


def restore(path: str | os.PathLike, target=None, *, max_bytes: int | None = DEFAULT_MAX_BYTES):
  """Restores a checkpoint written by `save` (or a step of `CheckpointManager`).

  Safe on untrusted files: restore never imports or calls anything the checkpoint
  names (namedtuples come back as plain tuples, custom nodes need ``target=``), and it
  returns only fully validated leaves (see ``docs/checkpoint.md``).

  Args:
    path: the checkpoint directory.
    target: optional tree (concrete or abstract, e.g. from ``jax.eval_shape``) of the
      expected structure. When given, the checkpoint's leaves are matched to it by key
      path (key tuples, never joined strings); any missing, extra or different leaf
      (shape, dtype, compressed metadata) raises, the result takes the target's
      containers, and arrays go to the target leaf's ``sharding`` when it has one.
    max_bytes: the largest array the checkpoint may ask for, stored or materialised
      (a compressed leaf's dense size), in bytes; default 4 GiB; None for no limit.

  Returns:
    The tree with the node types saved (namedtuples as tuples), bit-exact:
    `SharedArray` / `HashedArray` leaves, jax arrays as jax arrays, numpy arrays as numpy
    arrays.

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: ``path`` is not a qws_jax checkpoint, has an unknown format or hash
      version, damaged or inconsistent metadata or arrays, a leaf over ``max_bytes``, or
      does not match ``target``. Nothing is returned half-restored.
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
    return _restore_items(read, lambda: _orbax_array_metadata(os.path.join(path, ARRAYS_ITEM)),
                          repr(path), target, has_item, max_bytes)


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
    entropy: entropy-code the indices (see `save`).
  """

  def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int = 1,
               max_to_keep: int | None = 3, async_save: bool = True, compress: bool = True,
               entropy: bool = True):
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be a positive int, got {save_interval_steps!r}")
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
    ocp = _ocp()
    self.entropy = bool(entropy)
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
    """Saves ``tree`` as ``step`` if the interval says so (or ``force``); True if saved.

    Raises:
      FileExistsError: ``step`` is already saved (steps are never overwritten).
    """
    if step in self._mngr.all_steps():
      raise FileExistsError(f"step {step} already exists in {self.directory!r}; checkpoint"
                            " steps are never overwritten")
    return bool(self._mngr.save(step, args=save_args(tree, entropy=self.entropy), force=force))

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def restore(self, step: int | None = None, target=None, *,
              max_bytes: int | None = DEFAULT_MAX_BYTES):
    """Restores ``step`` (default: the latest); see `restore` for ``target``/``max_bytes``."""
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

    return _restore_items(
        read, lambda: _orbax_array_metadata(os.path.join(step_dir, ARRAYS_ITEM)),
        f"{self.directory!r} step {step}", target, has_item, max_bytes)

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
  return _check_meta(_read_json(meta_file, repr(path)), repr(path))
