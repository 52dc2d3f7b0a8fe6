"""`report`: per-leaf sizes, bits per weight and reconstruction error."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qws_jax._src import storage
from qws_jax._src import tree as tree_lib
from qws_jax._src import types


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """One row of a `Report` (plain Python values)."""
  path: str
  shape: tuple[int, ...]
  kind: str            # "shared", "hashed" or "dense"
  k: int | None        # codebook size or bucket count
  layout: str          # "tensor", "channel", "group", "hashed" or "-"
  bits_per_weight: float
  bytes_before: int
  bytes_after: int
  rel_mse: float | None   # MSE / variance of the original
  sqnr_db: float | None
  bytes_coded: int | None = None  # with entropy-coded indices (report(coded=True))

  @property
  def coded_bits_per_weight(self) -> float | None:
    if self.bytes_coded is None:
      return None
    return 8.0 * self.bytes_coded / max(math.prod(self.shape), 1)


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-leaf table and totals; ``str(report)`` is a printable table."""
  leaves: tuple[LeafReport, ...]

  @property
  def bytes_before(self) -> int:
    return sum(r.bytes_before for r in self.leaves)

  @property
  def bytes_after(self) -> int:
    return sum(r.bytes_after for r in self.leaves)

  @property
  def ratio(self) -> float:
    return self.bytes_before / max(self.bytes_after, 1)

  @property
  def bytes_coded(self) -> int | None:
    """Total bytes with entropy-coded indices (None unless ``report(coded=True)``)."""
    if any(r.bytes_coded is None for r in self.leaves):
      return None
    return sum(r.bytes_coded for r in self.leaves)

  def to_dict(self) -> dict:
    """Machine-readable form (JSON-serialisable)."""
    return {"leaves": [{**dataclasses.asdict(r), "coded_bits_per_weight": r.coded_bits_per_weight}
                       for r in self.leaves],
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "bytes_coded": self.bytes_coded, "ratio": self.ratio}

  def __str__(self) -> str:
    coded = self.bytes_coded is not None
    head = ("path", "shape", "kind", "k", "layout", "bits/w", "before", "after", "rel_mse",
            "sqnr_dB") + (("coded bits/w", "coded") if coded else ())
    rows = [head]
    for r in self.leaves:
      rows.append((r.path, "x".join(map(str, r.shape)) or "()", r.kind,
                   "-" if r.k is None else str(r.k), r.layout, f"{r.bits_per_weight:.3f}",
                   _fmt_bytes(r.bytes_before), _fmt_bytes(r.bytes_after),
                   "-" if r.rel_mse is None else f"{r.rel_mse:.2e}",
                   "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}")
                  + ((f"{r.coded_bits_per_weight:.3f}", _fmt_bytes(r.bytes_coded))
                     if coded else ()))
    rows.append(("TOTAL", "", "", "", "", "", _fmt_bytes(self.bytes_before),
                 _fmt_bytes(self.bytes_after), f"{self.ratio:.2f}x", "")
                + (("", _fmt_bytes(self.bytes_coded)) if coded else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _fmt_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return str(n)


def _shape(x) -> tuple[int, ...]:
  """The logical shape (a stacked compressed leaf's ``full_shape``)."""
  return tuple(getattr(x, "full_shape", x.shape))


def _dense_bytes(x) -> int:
  return math.prod(_shape(x)) * np.dtype(x.dtype).itemsize


def report(params, params_c, *, error: bool = True, coded: bool = False) -> Report:
  """Compares a dense tree with its compressed version, leaf by leaf.

  Args:
    params: the original pytree (or ``None`` to report storage only; errors are then
      not computed).
    params_c: the compressed pytree (same structure, some leaves `SharedArray` /
      `HashedArray`).
    error: compute the reconstruction error of compressed leaves (materialises them
      one at a time).
    coded: also report the size with entropy-coded indices, what ``qws_jax.save``
      stores (Huffman; a sparse leaf's non-zeros and their positions only). It codes
      every leaf on the host: seconds on a large model.

  Returns:
    A `Report`: ``print(report)`` shows the table, ``report.to_dict()`` the data.

  Raises:
    ValueError: when the two trees do not have the same structure.
  """
  is_c = types.is_compressed
  comp = jax.tree_util.tree_leaves_with_path(params_c, is_leaf=is_c)
  if params is not None:
    dense = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_c)
    if len(dense) != len(comp):
      raise ValueError(f"params has {len(dense)} leaves but params_c has {len(comp)}:"
                       " the trees do not match")
  else:
    dense = [(p, None) for p, _ in comp]
  rows = []
  for (p1, x), (p2, c) in zip(dense, comp):
    path = tree_lib.path_str(p2)
    if params is not None and tree_lib.path_str(p1) != path:
      raise ValueError(f"tree mismatch: {tree_lib.path_str(p1)!r} vs {path!r}")
    if not (is_c(c) or tree_lib.is_array_like(c)):
      continue
    before = _dense_bytes(c if x is None else x)
    rel = sq = None
    if is_c(c):
      if error and x is not None:
        ref = jnp.asarray(x, jnp.float32)
        diff = c.materialize().astype(jnp.float32) - ref
        mse = float(jnp.mean(diff * diff))
        var = float(jnp.var(ref))
        rel = mse / var if var > 0 else (0.0 if mse == 0 else math.inf)
        sq = math.inf if rel == 0 else -10 * math.log10(rel)
      if isinstance(c, types.SharedArray):
        kind, k, layout = "shared", c.k, c.layout
      else:
        kind, k, layout = "hashed", c.num_buckets, "hashed"
      after = c.nbytes
      rows.append(LeafReport(path, _shape(c), kind, k, layout, 8.0 * after / max(c.size, 1),
                             before, after, rel, sq,
                             storage.coded_nbytes(c) if coded else None))
    else:
      after = _dense_bytes(c)
      size = math.prod(_shape(c))
      rows.append(LeafReport(path, _shape(c), "dense", None, "-",
                             8.0 * after / max(size, 1), before, after, None, None,
                             after if coded else None))
  return Report(tuple(rows))
