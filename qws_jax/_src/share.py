"""`share` / `unshare`: k-means weight sharing over parameter pytrees."""

from __future__ import annotations

import jax

from qws_jax._src import types


def unshare(tree):
  """Materialises every `SharedArray` / `HashedArray` leaf; everything else passes through.

  Args:
    tree: any pytree, possibly containing compressed leaves.

  Returns:
    The same structure with each compressed leaf replaced by its dense array (its
    logical ``shape`` and ``dtype``). Other leaves are returned as the same objects.
  """
  return jax.tree_util.tree_map(
      lambda x: x.materialize() if types.is_compressed(x) else x, tree,
      is_leaf=types.is_compressed)
