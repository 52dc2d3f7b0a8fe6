"""Bit-packing of indices: exact round trip, byte layout, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qws_jax._src import packing


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 37), rows=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip(bits, n, rows, seed):
  idx = np.random.default_rng(seed).integers(0, 2**bits, (rows, n)).astype(np.uint8)
  packed = packing.pack(idx, bits)
  assert packed.dtype == jnp.uint8
  assert packed.shape == (rows, packing.packed_length(n, bits))
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, n)), idx)


@pytest.mark.parametrize("bits,n,expected", [(4, 8, 4), (4, 7, 4), (3, 8, 3), (3, 9, 6),
                                             (2, 5, 2), (1, 9, 2), (8, 5, 5), (6, 4, 3)])
def test_packed_length_is_bits_per_index(bits, n, expected):
  assert packing.packed_length(n, bits) == expected


def test_byte_layout_is_little_endian():
  # 4-bit: element 2j in the low nibble, 2j+1 in the high nibble of byte j.
  packed = np.asarray(packing.pack(np.array([1, 2, 15, 0], np.uint8), 4))
  np.testing.assert_array_equal(packed, [0x21, 0x0F])
  # 3-bit: 8 values in 3 bytes as one little-endian 24-bit integer.
  vals = np.array([1, 2, 3, 4, 5, 6, 7, 0], np.uint8)
  word = sum(int(v) << (3 * i) for i, v in enumerate(vals))
  np.testing.assert_array_equal(np.asarray(packing.pack(vals, 3)),
                                [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF])


def test_jit_round_trip():
  idx = jnp.asarray(np.random.default_rng(0).integers(0, 32, (4, 19)), jnp.uint8)
  f = jax.jit(lambda i: packing.unpack(packing.pack(i, 5), 5, 19))
  np.testing.assert_array_equal(np.asarray(f(idx)), np.asarray(idx))


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_bits(bits):
  with pytest.raises(ValueError, match="bits"):
    packing.pack(np.zeros(4, np.uint8), bits)


def test_unpack_checks_length():
  with pytest.raises(ValueError, match="expected"):
    packing.unpack(np.zeros(3, np.uint8), 4, 8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 5, 13, 64])
def test_take_reads_single_indices(bits, n):
  idx = np.random.default_rng(bits * 100 + n).integers(0, 2**bits, (7, n))
  rows, cols = np.meshgrid(np.arange(7), np.arange(n), indexing="ij")
  order = np.random.default_rng(1).permutation(rows.size)  # any order, any repeats
  r, c = rows.reshape(-1)[order], cols.reshape(-1)[order]
  got = packing.take(packing.pack(idx, bits), bits, jnp.asarray(r), jnp.asarray(c))
  np.testing.assert_array_equal(np.asarray(got), idx[r, c])
