"""Entropy-coded storage of codebook indices (Deep Compression's third stage).

`encode_indices` turns a `SharedArray`'s indices into Huffman-coded bytes
(`qws_jax._src.entropy`): all indices for an ordinary leaf; for a sparse (pruned) leaf
only the positions of the non-zeros (coded gaps) and their indices, so the pruned zeros
cost only their share of the position stream. `decode_indices` is the exact inverse and
returns the packed indices, ready for the leaf. Checkpoints use both (``save(...,
entropy=True)``); `qws_jax.report(..., coded=True)` uses `coded_nbytes`.
"""

from __future__ import annotations

import math

import numpy as np

from qws_jax._src import entropy
from qws_jax._src import packing
from qws_jax._src import types

CODEC = "huffman-1"


def _unpacked(x: types.SharedArray) -> np.ndarray:
  return np.asarray(x.unpacked_indices())


def encode_indices(x: types.SharedArray) -> dict:
  """``{"index_shape", "symbols": bytes, "positions": bytes | None, "count"}`` of a leaf.

  ``index_shape`` is the full unpacked index shape (stack axes included); for a sparse
  leaf ``count`` is the number of non-zero indices, ``positions`` their flat positions
  and ``symbols`` their indices minus one (index 0 is the pruned zero).
  """
  idx = _unpacked(x)
  out = {"index_shape": [int(d) for d in idx.shape], "positions": None, "count": int(idx.size)}
  if x.sparse:
    flat = idx.reshape(-1)
    pos = np.flatnonzero(flat)
    out["positions"] = entropy.encode_positions(pos, flat.size)
    out["symbols"] = entropy.encode_symbols(flat[pos].astype(np.int64) - 1, x.k - 1)
    out["count"] = int(pos.size)
  else:
    out["symbols"] = entropy.encode_symbols(idx, x.k)
  return out


def coded_nbytes(x) -> int:
  """Bytes of a compressed leaf with its indices entropy-coded (other parts as stored)."""
  if not isinstance(x, types.SharedArray):
    return x.nbytes
  enc = encode_indices(x)
  other = sum(types._nbytes(a) for n, a in types.children(x).items()  # pylint: disable=protected-access
              if a is not None and n != "indices")
  return other + len(enc["symbols"]) + len(enc["positions"] or b"")


def decode_indices(meta: dict, symbols: bytes, positions: bytes | None, index_shape,
                   count: int, *, max_bytes: int | None) -> np.ndarray:
  """The packed uint8 indices of a leaf from `encode_indices` output.

  ``meta`` is the leaf's `types.to_meta` dict (already checked by the caller's schema
  for types: ``bits``, ``sparse`` and the codebook size come from the stored codebook
  through ``k``). Raises ValueError on anything inconsistent or damaged.
  """
  if not isinstance(index_shape, list) or len(index_shape) > types.MAX_NDIM or not all(
      isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in index_shape):
    raise ValueError(f"coded indices have index_shape {index_shape!r}")
  n = math.prod(index_shape)
  if max_bytes is not None and n > max_bytes:
    raise ValueError(f"coded indices of shape {index_shape} are over the limit"
                     f" max_bytes={max_bytes}")
  if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= n:
    raise ValueError(f"coded indices have count {count!r} for {n} indices")
  bits, k, sparse = meta["bits"], meta["k"], meta["sparse"]
  if sparse:
    if positions is None:
      raise ValueError("a sparse leaf's coded indices lack their positions")
    pos = entropy.decode_positions(positions, count, n)
    vals = entropy.decode_symbols(symbols, count, k - 1).astype(np.int64) + 1
    idx = np.zeros(n, np.uint8)
    idx[pos] = vals
  else:
    if positions is not None or count != n:
      raise ValueError("a dense leaf's coded indices have positions or a partial count")
    idx = entropy.decode_symbols(symbols, n, k).astype(np.uint8)
  if not index_shape:
    raise ValueError("coded indices have an empty index_shape")
  idx = idx.reshape(index_shape)
  return np.asarray(packing.pack(idx, bits))
