"""Compressed leaves: `SharedArray` (codebook + indices) and `HashedArray` (buckets).

Both are immutable pytree nodes: arrays are children, everything else is static
metadata, so ``jit``, ``vmap``, ``grad``, optax and Orbax see them without special cases.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import hashing
from qws_jax._src import packing

LAYOUTS = ("tensor", "channel", "group")


def bits_for(k: int) -> int:
  """Bits per index for a codebook of ``k`` entries: ``max(1, ceil(log2 k))``."""
  return max(1, math.ceil(math.log2(k)))


def _nbytes(a) -> int:
  return math.prod(int(d) for d in a.shape) * np.dtype(a.dtype).itemsize


def index_shape(shape: tuple[int, ...], vector_dim: int) -> tuple[int, ...]:
  """Logical shape of the (unpacked) index array: the last axis is split in vectors."""
  return tuple(shape[:-1]) + (shape[-1] // vector_dim,)


def matmul_view(ishape: tuple[int, ...]) -> tuple[int, int]:
  """``(R, C)``: rows = all axes but the last, columns = the last (``(n, 1)`` for 1-D)."""
  if len(ishape) == 1:
    return ishape[0], 1
  return int(np.prod(ishape[:-1], dtype=np.int64)), ishape[-1]


def grid_shape(shape: tuple[int, ...], axis: int | None, group_size: int | None,
               vector_dim: int = 1) -> tuple[int, ...]:
  """Shape of the codebook grid (codebook shape without the trailing ``k`` [, d])."""
  ishape = index_shape(shape, vector_dim)
  if group_size is not None:
    r, c = matmul_view(ishape)
    return (-(-r // group_size), c)
  if axis is not None:
    return (ishape[axis],)
  return ()


def group_ids(shape: tuple[int, ...], axis: int | None, group_size: int | None,
              vector_dim: int = 1) -> jax.Array | None:
  """int32 array broadcastable to the index shape: the codebook row of each index.

  ``None`` for a per-tensor codebook.
  """
  ishape = index_shape(shape, vector_dim)
  nd = len(ishape)
  if group_size is not None:
    r, c = matmul_view(ishape)
    rows = jnp.arange(r, dtype=jnp.int32) // group_size
    if nd == 1:
      return rows
    gid = rows[:, None] * c + jnp.arange(c, dtype=jnp.int32)[None, :]
    return gid.reshape(ishape)
  if axis is not None:
    ids = jnp.arange(ishape[axis], dtype=jnp.int32)
    return ids.reshape([ishape[axis] if a == axis else 1 for a in range(nd)])
  return None


# ----------------------------------------------------------------------------- schema
#
# Each compressed leaf type declares its fields once, with `_child` (an array child of
# the pytree node) or `_static(codec)` (static metadata and how it is written to JSON).
# The pytree registration, `children`, `to_meta` and `from_meta` are all derived from
# those declarations, so a new part of a leaf is added in one place and is then saved,
# restored and validated everywhere (checkpoints, `qws-jax inspect`, the sharded path).

LEAF_DTYPES = ("float16", "bfloat16", "float32", "float64")
MAX_NDIM = 32
DEFAULT_MAX_BYTES = 2**32  # largest leaf `from_meta` accepts unless told otherwise


def _child(default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata={"qws": "child"})


def _static(codec: str, default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata={"qws": "static", "codec": codec})


_KINDS: dict[str, type] = {}


def _register(cls, kind: str) -> None:
  fields = dataclasses.fields(cls)
  cls._qws_kind = kind
  cls._qws_children = tuple(f.name for f in fields if f.metadata.get("qws") == "child")
  cls._qws_static = tuple((f.name, f.metadata["codec"]) for f in fields
                          if f.metadata.get("qws") == "static")
  _KINDS[kind] = cls
  jax.tree_util.register_dataclass(cls, data_fields=list(cls._qws_children),
                                   meta_fields=[n for n, _ in cls._qws_static])


def _encode_static(codec: str, v):
  if codec == "shape":
    return [int(d) for d in v]
  if codec == "dtype":
    return np.dtype(v).name
  if codec == "bool":
    return bool(v)
  return None if v is None else int(v)


def _decode_static(codec: str, v, name: str, where: str):
  def bad(why):
    return ValueError(f"{name}={v!r} {why}{where}")

  def is_int(u):
    return isinstance(u, (int, np.integer)) and not isinstance(u, (bool, np.bool_))
  if codec == "shape":
    if not isinstance(v, (list, tuple)) or len(v) > MAX_NDIM:
      raise bad(f"is not a list of at most {MAX_NDIM} dimensions")
    if not all(is_int(d) and 0 <= d < 2**62 for d in v):
      raise bad("has a dimension that is not an int in [0, 2**62)")
    return tuple(int(d) for d in v)
  if codec == "dtype":
    if not isinstance(v, str) or v not in LEAF_DTYPES:
      raise bad(f"is not one of {LEAF_DTYPES}")
    return jnp.dtype(v)
  if codec == "bool":
    if not isinstance(v, bool):
      raise bad("is not a bool")
    return v
  if codec == "opt_int" and v is None:
    return None
  if not is_int(v) or not -2**62 <= v < 2**62:
    raise bad("is not an int")
  return int(v)


def leaf_kind(x) -> str:
  """``"shared"`` or ``"hashed"``: the schema name of a compressed leaf's type."""
  return type(x)._qws_kind


def children(x) -> dict[str, Any]:
  """The array children of a compressed leaf by field name (``None`` for absent parts)."""
  return {n: getattr(x, n) for n in type(x)._qws_children}


def to_meta(x) -> dict:
  """The static metadata of a compressed leaf as a JSON-able dict (no arrays).

  ``{"kind": "shared", "shape": [...], "dtype": "float32", "bits": 4, ...}``; its
  inverse is `from_meta`. Every static field of the leaf type is written.
  """
  cls = type(x)
  out = {"kind": cls._qws_kind}
  for name, codec in cls._qws_static:
    out[name] = _encode_static(codec, getattr(x, name))
  return out


def from_meta(meta, arrays, path: str = "", *, check_values: bool = True,
              max_bytes: int | None = DEFAULT_MAX_BYTES):
  """Rebuilds a compressed leaf from `to_meta` output and its arrays, and validates it.

  Meant for untrusted input (checkpoint files): it looks up the leaf type in a fixed
  table (it never imports or calls anything the metadata names), checks every field's
  type and range, refuses unknown or missing fields, and runs the full validation of
  the leaf type (`validate_shared_array` / `validate_hashed_array`) with the value
  checks (every index ``< k``, finite codebook) and the size limit.

  Args:
    meta: the dict written by `to_meta`.
    arrays: ``{child name: array or None}`` (numpy or jax arrays).
    path: the leaf's path, for messages.
    check_values: run the value checks (they read the arrays).
    max_bytes: the largest logical size (``size * itemsize`` of the dense leaf) and
      the largest stored array accepted, in bytes; None for no limit.

  Returns:
    The `SharedArray` or `HashedArray`.

  Raises:
    ValueError: anything wrong, naming ``path`` and the field.
  """
  where = f" at {path!r}" if path else ""
  if not isinstance(meta, dict):
    raise ValueError(f"leaf metadata{where} is {type(meta).__name__}, not a dict")
  kind = meta.get("kind")
  cls = _KINDS.get(kind) if isinstance(kind, str) else None
  if cls is None:
    raise ValueError(f"unknown compressed leaf kind {kind!r}{where}; this qws_jax knows"
                     f" {sorted(_KINDS)}")
  names = {n for n, _ in cls._qws_static}
  unknown = sorted(set(meta) - names - {"kind"})
  if unknown:
    raise ValueError(f"{kind} leaf{where} has unknown field(s) {unknown}; written by a newer"
                     " qws_jax?")
  fields = {}
  defaults = {f.name: f.default for f in dataclasses.fields(cls)}
  for name, codec in cls._qws_static:
    if name not in meta:
      if defaults[name] is dataclasses.MISSING:
        raise ValueError(f"{kind} leaf{where} lacks the field {name!r}")
      continue  # a field added after the file was written: its default
    fields[name] = _decode_static(codec, meta[name], name, where)
  if not isinstance(arrays, dict) or set(arrays) != set(cls._qws_children):
    got = sorted(arrays) if isinstance(arrays, dict) else arrays
    raise ValueError(f"{kind} leaf{where} needs the arrays {list(cls._qws_children)}, got {got}")
  x = cls(**fields, **arrays)
  validate(x, path, check_values=check_values, check_sorted=False, max_bytes=max_bytes)
  return x


def validate(x, path: str = "", *, check_values: bool = True, check_sorted: bool = True,
             max_bytes: int | None = None) -> None:
  """`validate_shared_array` or `validate_hashed_array`, by the leaf's type."""
  if isinstance(x, SharedArray):
    validate_shared_array(x, path, check_values=check_values, check_sorted=check_sorted,
                          max_bytes=max_bytes)
  elif isinstance(x, HashedArray):
    validate_hashed_array(x, path, max_bytes=max_bytes)
  else:
    where = f" at {path!r}" if path else ""
    raise TypeError(f"expected a SharedArray or HashedArray{where}, got {type(x).__name__}")


def _check_size(x, where: str, max_bytes: int | None) -> None:
  """Overflow-safe size limits: the dense leaf and each stored child."""
  if max_bytes is None:
    return
  dense = x.size * np.dtype(x.dtype).itemsize
  if dense > max_bytes:
    raise ValueError(f"leaf of shape {x.shape} would take {dense} bytes once materialised,"
                     f" over the limit max_bytes={max_bytes}{where}; raise max_bytes if"
                     " this is expected")
  for name, a in children(x).items():
    if a is not None and _nbytes(a) > max_bytes:
      raise ValueError(f"{name} array of shape {tuple(a.shape)} is over the limit"
                       f" max_bytes={max_bytes}{where}")


class _Compressed:
  """Shared protocol of compressed leaves (subclasses define shape, stack_shape, nbytes)."""

  shape: tuple[int, ...]
  stack_shape: tuple[int, ...]
  nbytes: int

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def full_shape(self) -> tuple[int, ...]:
    """``stack_shape + shape``: the shape of ``materialize()``."""
    return tuple(self.stack_shape) + tuple(self.shape)

  @property
  def size(self) -> int:
    """Logical weights, stack axes included (Python ints: never wraps)."""
    return math.prod(int(d) for d in self.full_shape)

  @property
  def bits_per_weight(self) -> float:
    """Storage bits per logical weight (codebook / bucket storage included)."""
    return 8.0 * self.nbytes / max(self.size, 1)


@dataclasses.dataclass(frozen=True)
class SharedArray(_Compressed):
  """A weight tensor stored as codebook indices plus a codebook (weight sharing).

  Children (arrays; ``S`` is the stack shape, ``()`` unless the leaf is stacked):
    indices: uint8, the packed indices: ``S + shape[:-1] + (packed,)`` where the last
      axis holds ``shape[-1] // vector_dim`` indices of ``bits`` bits packed as in
      `qws_jax._src.packing` (little-endian bit stream along the last axis).
    codebook: ``S + grid + (k,)`` for scalar codebooks or ``S + grid + (k, vector_dim)``
      for vector codebooks, in any floating dtype (the leaf's by default; f16/bf16
      halve its storage), decoded into ``dtype``. ``grid`` is ``()`` per tensor,
      ``(shape[axis],)`` per channel, ``(ceil(R / group_size), C)`` per group, where
      ``(R, C)`` is the matmul view (all leading axes flattened, last axis).
    scales: None, or ``S + (ceil(R / scale_group_size), C)`` per-group scales (a
      floating dtype, usually f16): the decoded value of weight ``(r, c)`` of the
      matmul view is multiplied by ``scales[r // scale_group_size, c]`` (the learned
      LUT with group scales format: FLUTE / NF4 with a learned table).
    outlier_values, outlier_positions: None, or ``S + (n,)`` arrays: weights kept
      apart (in a floating dtype: ``dtype`` keeps them exact, f16 halves their cost) at
      strictly increasing flat row-major positions (int32) of one slice; they replace
      the decoded value there (dense-and-sparse, SqueezeLLM).

  Static metadata: ``shape`` (the logical shape of one slice), ``dtype``, ``bits``,
  ``axis`` (channel axis, non-negative or None), ``group_size`` (or None),
  ``vector_dim`` (1 for scalar codebooks), ``scale_group_size`` (or None), ``sparse``.

  Sparse leaves (``sparse=True``, pruned weights): index 0 of every codebook is the
  pruned zero, exactly ``0.0`` (never clustered, never trained); the other ``k - 1``
  entries hold the clusters of the non-zero weights. In memory the indices keep their
  dense layout, so every kernel and ``scan`` works unchanged and decodes pruned
  weights to exactly 0; on disk `qws_jax.save` stores only the non-zeros' indices and
  their positions, entropy-coded.

  Stacked leaves: every child may carry the same leading stack axes ``S`` (one
  codebook, scales and outliers per slice, e.g. per layer of a scanned model). ``S`` is
  read off the children, never stored as metadata, so ``jax.lax.scan``, ``vmap``,
  ``nnx.scan`` and ``nn.scan`` slice a stacked leaf like an array and each slice is an
  ordinary leaf. `full_shape` is ``S + shape``; ``materialize()`` returns it.

  Invariants (checked by `validate_shared_array`): every index is ``< k``;
  ``bits == max(1, ceil(log2 k))``; a scalar codebook is sorted ascending along its
  last axis; at most one of ``axis`` and ``group_size`` is set; finite codebooks,
  scales and outliers; outlier positions strictly increasing and inside a slice.
  """

  indices: jax.Array = _child()
  codebook: jax.Array = _child()
  shape: tuple[int, ...] = _static("shape")
  dtype: Any = _static("dtype")
  bits: int = _static("int")
  axis: int | None = _static("opt_int", None)
  group_size: int | None = _static("opt_int", None)
  vector_dim: int = _static("int", 1)
  scales: jax.Array | None = _child(None)
  scale_group_size: int | None = _static("opt_int", None)
  outlier_values: jax.Array | None = _child(None)
  outlier_positions: jax.Array | None = _child(None)
  sparse: bool = _static("bool", False)

  @property
  def k(self) -> int:
    return self.codebook.shape[-1] if self.vector_dim == 1 else self.codebook.shape[-2]

  @property
  def layout(self) -> str:
    if self.group_size is not None:
      return "group"
    return "channel" if self.axis is not None else "tensor"

  @property
  def stack_shape(self) -> tuple[int, ...]:
    """The leading stack axes of the children (``()`` for an ordinary leaf)."""
    n = self.indices.ndim - len(self.shape)
    return tuple(int(d) for d in self.indices.shape[:max(n, 0)])

  @property
  def num_outliers(self) -> int:
    """Outliers per slice."""
    return 0 if self.outlier_values is None else int(self.outlier_values.shape[-1])

  @property
  def nbytes(self) -> int:
    """Bytes really stored: every child (packed indices, codebook, scales, outliers)."""
    return sum(_nbytes(a) for a in children(self).values() if a is not None)

  def unpacked_indices(self) -> jax.Array:
    """uint8 indices in the index shape ``S + shape[:-1] + (shape[-1] // vector_dim,)``."""
    ishape = index_shape(self.shape, self.vector_dim)
    return packing.unpack(self.indices, self.bits, ishape[-1])

  def decode_dtype(self):
    """The dtype decoding computes in: the leaf's, at least float32."""
    return jnp.dtype(jnp.float64 if np.dtype(self.dtype) == np.float64 else jnp.float32)

  def materialize(self) -> jax.Array:
    """The dense weight, ``full_shape`` and ``dtype``."""
    f = SharedArray._materialize_slice
    for _ in self.stack_shape:
      f = jax.vmap(f)
    return f(self)

  def _materialize_slice(self) -> jax.Array:
    idx = self.unpacked_indices().astype(jnp.int32)
    k, d = self.k, self.vector_dim
    gid = group_ids(self.shape, self.axis, self.group_size, d)
    flat = idx if gid is None else gid * k + idx
    table = self.codebook.reshape(-1) if d == 1 else self.codebook.reshape(-1, d)
    ct = self.decode_dtype()
    w = jnp.take(table, flat, axis=0).astype(ct)
    if self.scales is not None:
      r, c = matmul_view(self.shape)
      rows = jnp.arange(r, dtype=jnp.int32) // self.scale_group_size
      w = (w.reshape(r, c) * self.scales.astype(ct)[rows, :]).reshape(self.shape)
    w = w.reshape(-1)
    if self.outlier_values is not None:
      w = w.at[self.outlier_positions].set(self.outlier_values.astype(ct))
    return w.reshape(self.shape).astype(self.dtype)

  def __repr__(self):
    return (f"SharedArray(shape={self.shape}, dtype={np.dtype(self.dtype).name}, k={self.k},"
            f" bits={self.bits}, layout={self.layout!r}"
            + (f", axis={self.axis}" if self.axis is not None else "")
            + (f", group_size={self.group_size}" if self.group_size is not None else "")
            + (f", vector_dim={self.vector_dim}" if self.vector_dim != 1 else "")
            + (f", codebook_dtype={np.dtype(self.codebook.dtype).name}"
               if np.dtype(self.codebook.dtype) != np.dtype(self.dtype) else "")
            + (f", scale_group_size={self.scale_group_size}" if self.scales is not None else "")
            + (f", outliers={self.num_outliers}" if self.outlier_values is not None else "")
            + (", sparse=True" if self.sparse else "")
            + (f", stack={self.stack_shape}" if self.stack_shape else "") + ")")


_register(SharedArray, "shared")


@dataclasses.dataclass(frozen=True)
class HashedArray(_Compressed):
  """A virtual weight tensor whose values live in ``B`` hashed buckets (HashedNets).

  ``V.flat[f] = sign(f) * buckets[bucket(f)]`` with the coordinate hash of
  `qws_jax._src.hashing` (version ``version``) seeded by ``seed`` (the per-leaf seed).

  Children: ``buckets`` ``S + (B,)`` in ``dtype`` (``S``, the stack shape, is ``()``
  unless the leaf is stacked: one set of buckets per slice, the same hash pattern).
  Static metadata: ``shape`` (one slice), ``dtype``, ``seed`` (uint32 int), ``signed``,
  ``version``.
  """

  buckets: jax.Array = _child()
  shape: tuple[int, ...] = _static("shape")
  dtype: Any = _static("dtype")
  seed: int = _static("int")
  signed: bool = _static("bool", True)
  version: int = _static("int", hashing.HASH_VERSION)

  @property
  def num_buckets(self) -> int:
    return self.buckets.shape[-1]

  @property
  def stack_shape(self) -> tuple[int, ...]:
    """The leading stack axes of ``buckets`` (``()`` for an ordinary leaf)."""
    return tuple(int(d) for d in self.buckets.shape[:-1])

  @property
  def nbytes(self) -> int:
    return _nbytes(self.buckets)

  def bucket_and_sign(self) -> tuple[jax.Array, jax.Array]:
    """int32 bucket index and int8 sign of every element of one slice, in ``shape``."""
    if self.version not in hashing.SUPPORTED_HASH_VERSIONS:
      raise ValueError(f"unknown hash version {self.version}; this qws_jax knows"
                       f" {hashing.SUPPORTED_HASH_VERSIONS}")
    f = jnp.arange(math.prod(self.shape), dtype=jnp.uint32).reshape(self.shape)
    return hashing.bucket_and_sign(f, self.seed, self.num_buckets, self.signed)

  def materialize(self) -> jax.Array:
    """The dense weight, ``full_shape`` and ``dtype``."""
    b, s = self.bucket_and_sign()

    def one(buckets):
      return (jnp.take(buckets, b, axis=0) * s.astype(buckets.dtype)).astype(self.dtype)
    for _ in self.stack_shape:
      one = jax.vmap(one)
    return one(self.buckets)

  def __repr__(self):
    return (f"HashedArray(shape={self.shape}, dtype={np.dtype(self.dtype).name},"
            f" buckets={self.num_buckets}, seed={self.seed}, signed={self.signed},"
            f" version={self.version}"
            + (f", stack={self.stack_shape}" if self.stack_shape else "") + ")")


_register(HashedArray, "hashed")


def is_compressed(x) -> bool:
  return isinstance(x, (SharedArray, HashedArray))


def _concrete(x) -> bool:
  return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_shape_field(x, where: str) -> None:
  if not isinstance(x.shape, tuple) or not all(_is_int(d) and d >= 0 for d in x.shape) \
      or not x.shape:
    raise ValueError(f"shape={x.shape!r} must be a non-empty tuple of non-negative ints{where}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"dtype={x.dtype} must be a floating dtype{where}")


def _check_child(x, name: str, want: tuple, where: str, *, dtypes=None, dtype=None) -> None:
  """``S + want`` shape (``S`` the leaf's stack shape) and the dtype of one child."""
  a = getattr(x, name)
  if not hasattr(a, "shape") or not hasattr(a, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(a).__name__}{where}")
  got = tuple(a.shape)
  if got != x.stack_shape + tuple(want):
    raise ValueError(f"{name} shape {got} != expected {x.stack_shape + tuple(want)}"
                     f" (stack {x.stack_shape} + {tuple(want)}){where}")
  if dtype is not None and np.dtype(a.dtype) != np.dtype(dtype):
    raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}{where}")
  if dtypes is not None and np.dtype(a.dtype).name not in dtypes:
    raise TypeError(f"{name} dtype {a.dtype} must be one of {dtypes}{where}")


def validate_shared_array(x: SharedArray, path: str = "", *, check_values: bool = True,
                          check_sorted: bool = True, max_bytes: int | None = None) -> None:
  """Checks the invariants of a `SharedArray`; raises ValueError/TypeError naming ``path``.

  Structure (always): field types, ``bits == max(1, ceil(log2 k))`` with k in
  [2, 256], the shapes of every child implied by ``shape``, the layout and the stack
  shape, dtypes, and (when ``max_bytes`` is set) the overflow-safe size limit.
  Values (concrete arrays, when ``check_values``): every index ``< k`` (read only when
  ``k`` is not a power of two, since ``bits`` bits cannot hold more otherwise); finite
  codebooks, scales and outlier values; outlier positions strictly increasing inside
  one slice; and, when ``check_sorted``, scalar codebooks sorted ascending (the
  canonical form `share` and `qws_jax.canonicalize` produce; fine-tuned codebooks may
  leave it, which is why checkpoints do not require it).
  """
  where = f" at {path!r}" if path else ""
  if not isinstance(x, SharedArray):
    raise TypeError(f"expected a SharedArray{where}, got {type(x).__name__}")
  for name in ("indices", "codebook"):
    if not hasattr(getattr(x, name), "shape") or not hasattr(getattr(x, name), "dtype"):
      raise TypeError(f"{name} must be an array, got {type(getattr(x, name)).__name__}{where}")
  _check_shape_field(x, where)
  if not _is_int(x.vector_dim) or x.vector_dim < 1 or x.shape[-1] % x.vector_dim:
    raise ValueError(f"vector_dim={x.vector_dim} must divide the last axis of shape={x.shape}{where}")
  if x.axis is not None and x.group_size is not None:
    raise ValueError(f"at most one of axis and group_size may be set{where}")
  if x.axis is not None and not 0 <= x.axis < len(x.shape):
    raise ValueError(f"axis={x.axis} out of range for shape={x.shape}{where}")
  for name in ("group_size", "scale_group_size"):
    v = getattr(x, name)
    if v is not None and (not _is_int(v) or v < 1):
      raise ValueError(f"{name}={v!r} must be a positive int{where}")
  if x.indices.ndim < len(x.shape):
    raise ValueError(f"indices of shape {tuple(x.indices.shape)} have fewer axes than"
                     f" shape={x.shape}{where}")
  if x.codebook.ndim < len(x.stack_shape) + (1 if x.vector_dim == 1 else 2):
    raise ValueError(f"codebook of shape {tuple(x.codebook.shape)} has too few axes{where}")
  k = x.k
  if not 2 <= k <= 256 or x.bits != bits_for(k):
    raise ValueError(f"codebook size k={k} needs bits={bits_for(k)} (k in [2, 256]), got bits={x.bits}{where}")
  _check_size(x, where, max_bytes)
  ishape = index_shape(x.shape, x.vector_dim)
  _check_child(x, "indices", ishape[:-1] + (packing.packed_length(ishape[-1], x.bits),),
               where, dtype=np.uint8)
  want_cb = grid_shape(x.shape, x.axis, x.group_size, x.vector_dim) + (k,) + (
      (x.vector_dim,) if x.vector_dim > 1 else ())
  _check_child(x, "codebook", want_cb, where, dtypes=LEAF_DTYPES)
  r, c = matmul_view(x.shape)
  if (x.scales is None) != (x.scale_group_size is None):
    raise ValueError(f"scales and scale_group_size must be set together{where}")
  if x.scales is not None:
    _check_child(x, "scales", (-(-r // x.scale_group_size), c), where, dtypes=LEAF_DTYPES)
  if (x.outlier_values is None) != (x.outlier_positions is None):
    raise ValueError(f"outlier_values and outlier_positions must be set together{where}")
  if not isinstance(x.sparse, bool):
    raise TypeError(f"sparse must be a bool, got {x.sparse!r}{where}")
  if x.sparse and (x.vector_dim != 1 or x.scales is not None):
    raise NotImplementedError(f"sparse leaves take scalar codebooks without scales{where}")
  if x.outlier_values is not None:
    n = x.outlier_values.shape[-1] if x.outlier_values.ndim else -1
    _check_child(x, "outlier_values", (n,), where, dtypes=LEAF_DTYPES)
    _check_child(x, "outlier_positions", (n,), where, dtype=np.int32)
  if check_values and all(_concrete(a) for a in children(x).values() if a is not None):
    if k < 2**x.bits and x.indices.size:
      idx = np.asarray(x.unpacked_indices())
      if int(idx.max()) >= k:
        bad = np.unravel_index(int(np.argmax(idx >= k)), idx.shape)
        raise ValueError(f"index {int(idx[bad])} at {tuple(int(i) for i in bad)} is past the"
                         f" end of the codebook (k={k}){where}")
    cb = np.asarray(x.codebook.astype(jnp.float32))
    if not np.all(np.isfinite(cb)):
      raise ValueError(f"codebook has NaN/Inf values{where}")
    if x.sparse and np.any(cb[..., 0] != 0):
      raise ValueError(f"sparse leaf: codebook entry 0 (the pruned zero) must be exactly 0{where}")
    sorted_part = cb[..., 1:] if x.sparse else cb
    if check_sorted and x.vector_dim == 1 and np.any(np.diff(sorted_part, axis=-1) < 0):
      raise ValueError(f"codebook is not sorted ascending{where}")
    if x.scales is not None and not np.all(np.isfinite(np.asarray(x.scales.astype(jnp.float32)))):
      raise ValueError(f"scales have NaN/Inf values{where}")
    if x.outlier_values is not None and x.num_outliers:
      pos = np.asarray(x.outlier_positions).astype(np.int64)
      size = math.prod(x.shape)
      if pos.min() < 0 or pos.max() >= size or np.any(np.diff(pos, axis=-1) <= 0):
        raise ValueError(f"outlier positions must be strictly increasing in [0, {size}){where}")
      if not np.all(np.isfinite(np.asarray(x.outlier_values.astype(jnp.float32)))):
        raise ValueError(f"outlier values have NaN/Inf values{where}")


def validate_hashed_array(x: HashedArray, path: str = "", *,
                          max_bytes: int | None = None) -> None:
  """Checks the invariants of a `HashedArray`; raises ValueError/TypeError naming ``path``.

  Hash version known, seed a uint32, ``1 <= B <= size`` buckets (1-D, leaf dtype),
  virtual size below ``2**32``, and (when ``max_bytes`` is set) the overflow-safe size
  limit of the materialised leaf.
  """
  where = f" at {path!r}" if path else ""
  if not isinstance(x, HashedArray):
    raise TypeError(f"expected a HashedArray{where}, got {type(x).__name__}")
  if not hasattr(x.buckets, "shape") or not hasattr(x.buckets, "dtype"):
    raise TypeError(f"buckets must be an array, got {type(x.buckets).__name__}{where}")
  if not isinstance(x.shape, tuple) or not all(_is_int(d) and d >= 0 for d in x.shape):
    raise ValueError(f"shape={x.shape!r} must be a tuple of non-negative ints{where}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"dtype={x.dtype} must be a floating dtype{where}")
  if x.version not in hashing.SUPPORTED_HASH_VERSIONS:
    raise ValueError(f"unknown hash version {x.version}{where}; supported:"
                     f" {hashing.SUPPORTED_HASH_VERSIONS}")
  hashing.check_seed(x.seed, f"seed{where}")
  slice_size = math.prod(x.shape)
  if slice_size >= 2**32:
    raise ValueError(f"virtual size {slice_size} does not fit the uint32 hash{where}")
  if x.buckets.ndim < 1 or not 1 <= x.buckets.shape[-1] <= max(slice_size, 1):
    raise ValueError(f"buckets must be (stack axes +) (B,) with 1 <= B <= {slice_size} (the"
                     f" virtual size), got shape {tuple(x.buckets.shape)}{where}")
  if np.dtype(x.buckets.dtype) != np.dtype(x.dtype):
    raise TypeError(f"buckets dtype {x.buckets.dtype} != leaf dtype {x.dtype}{where}")
  _check_size(x, where, max_bytes)
