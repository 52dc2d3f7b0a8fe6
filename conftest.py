"""Doctests of the package (``--doctest-modules``, see pyproject.toml) run as a user runs
the examples: with JAX's standard dtype and rank promotion, even in a process where
``tests/conftest.py`` made them strict for the test suite."""

import jax
import pytest
from _pytest import doctest as pytest_doctest


@pytest.fixture(autouse=True)
def _doctest_default_promotion(request):
  if isinstance(request.node, pytest_doctest.DoctestItem):
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
      yield
  else:
    yield
