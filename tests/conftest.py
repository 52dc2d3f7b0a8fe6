"""Strict settings for the whole suite (see ../shared/STYLE.md, item 14)."""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def interpret() -> bool:
  """Pallas kernels run in interpret mode off-accelerator."""
  return jax.default_backend() == "cpu"
