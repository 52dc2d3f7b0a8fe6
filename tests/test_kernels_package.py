"""Layout of `qws_jax.kernels`: a small front door, one module per backend, no import cycles."""

from __future__ import annotations

import ast
import pathlib

import qws_jax
from qws_jax import kernels

PKG = pathlib.Path(kernels.__file__).parent

# Which package modules each module may import (the dependency order of docs/kernels.md).
ALLOWED = {
    "_common": set(),
    "_decode": {"_common"},
    "reference": set(),
    "xla": {"_common", "_decode"},
    "triton": {"_common", "_decode"},
    "mosaic": {"_common", "_decode"},
    "ops": {"_common", "_decode", "reference", "xla", "triton", "mosaic"},
    "__init__": {"_common", "ops", "reference"},
}


def _package_imports(path: pathlib.Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "qws_jax.kernels":
        out.update(a.name for a in node.names)
      elif node.module.startswith("qws_jax.kernels."):
        out.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      out.update(a.name.split(".")[2] for a in node.names
                 if a.name.startswith("qws_jax.kernels."))
  return out


def test_modules_and_their_imports():
  modules = {p.stem for p in PKG.glob("*.py")}
  assert modules == set(ALLOWED), modules
  for name in modules:
    got = _package_imports(PKG / f"{name}.py")
    assert got <= ALLOWED[name], (name, got - ALLOWED[name])


def test_public_api():
  assert kernels.__all__ == ["BlockSizes", "hashed_matmul", "hashed_matmul_reference",
                             "shared_matmul", "shared_matmul_reference"]
  assert qws_jax.kernels.shared_matmul is kernels.ops.shared_matmul
  assert qws_jax.kernels.hashed_matmul is kernels.ops.hashed_matmul
