"""Entropy codec: bit-exact round trips, code optimality, damaged or crafted data refused."""

from __future__ import annotations

import struct
import zlib

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from qws_jax._src import entropy


def _roundtrip(sym, alphabet):
  data = entropy.encode_symbols(sym, alphabet)
  out = entropy.decode_symbols(data, sym.size, alphabet)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, sym.reshape(-1))
  return data


def _skewed(rng, n, alphabet, scale):
  """Discretised Gaussian: the shape of k-means index histograms on weights."""
  return np.clip(np.round(rng.normal(alphabet / 2, scale, n)), 0, alphabet - 1).astype(np.uint8)


@pytest.mark.parametrize("n", [0, 1, 7, entropy.BLOCK - 1, entropy.BLOCK, entropy.BLOCK + 1,
                               3 * entropy.BLOCK + 17])
@pytest.mark.parametrize("alphabet", [1, 2, 16, 256])
def test_roundtrip_sizes(n, alphabet):
  rng = np.random.default_rng(n * 1000 + alphabet)
  _roundtrip(rng.integers(0, alphabet, n).astype(np.uint8), alphabet)


def test_single_symbol_has_no_payload_and_all_256_symbols():
  data = _roundtrip(np.full(100_000, 5, np.uint8), 16)
  assert len(data) < 36 + 8 + 2 * 25 + 4 + 1  # header + lengths + block table + CRC
  sym = np.random.default_rng(0).permutation(np.repeat(np.arange(256), 40)).astype(np.uint8)
  _roundtrip(sym, 256)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 256), st.integers(0, 20_000), st.floats(0.05, 3.0), st.integers(0, 2**31))
def test_roundtrip_random_distributions(alphabet, n, concentration, seed):
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(alphabet, concentration))
  sym = rng.choice(alphabet, size=n, p=p).astype(np.uint8)
  data = _roundtrip(sym, alphabet)
  if n:  # A Huffman code is never worse than entropy + 1 bit/symbol (+ container).
    payload_bits = 8 * (len(data) - 36 - (alphabet + 1) // 2 - 2 * (-(-n // 4096)) - 4)
    assert payload_bits <= entropy.empirical_entropy_bits(sym, alphabet) + n + 8


def test_code_lengths_length_limited_and_optimal():
  # Fibonacci counts give a 39-deep Huffman tree; the limit is 15.
  fib = [1, 1]
  while len(fib) < 40:
    fib.append(fib[-1] + fib[-2])
  lengths = entropy.code_lengths(np.array(fib))
  assert lengths.max() == entropy.MAX_CODE_BITS
  assert sum(2.0 ** -lengths) == 1.0
  # Unconstrained case equals Huffman's cost (dyadic probabilities: lengths -log2 p).
  lengths = entropy.code_lengths(np.array([8, 4, 2, 1, 1]))
  np.testing.assert_array_equal(lengths, [1, 2, 3, 4, 4])


@pytest.mark.parametrize("alphabet,scale", [(256, 24.0), (64, 8.0)])
def test_coded_size_within_one_percent_of_entropy(alphabet, scale):
  rng = np.random.default_rng(1)
  sym = _skewed(rng, 400_000, alphabet, scale)
  data = _roundtrip(sym, alphabet)
  bound = entropy.empirical_entropy_bits(sym, alphabet)
  assert 8 * len(data) <= 1.01 * bound, (8 * len(data) / bound)


def test_gallager_bound_on_skewed_16_symbols():
  # Huffman redundancy <= p_max + 0.086 bits/symbol (Gallager 1978).
  rng = np.random.default_rng(2)
  sym = _skewed(rng, 200_000, 16, 2.5)
  data = _roundtrip(sym, 16)
  p_max = np.bincount(sym).max() / sym.size
  bound = entropy.empirical_entropy_bits(sym, 16) + (p_max + 0.086) * sym.size
  assert 8 * len(data) <= bound + 8 * 600


@pytest.mark.parametrize("density", [0.0, 0.001, 0.08, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("size", [1, 300, 50_000])
def test_positions_roundtrip(density, size):
  rng = np.random.default_rng(int(density * 1000) + size)
  pos = np.flatnonzero(rng.random(size) < density)
  data = entropy.encode_positions(pos, size)
  out = entropy.decode_positions(data, pos.size, size)
  assert out.dtype == np.int64
  np.testing.assert_array_equal(out, pos)


def test_positions_long_gaps_use_fillers():
  pos = np.array([0, 254, 255 + 254 + 1, 10**6 - 1])
  data = entropy.encode_positions(pos, 10**6)
  np.testing.assert_array_equal(entropy.decode_positions(data, 4, 10**6), pos)
  # 8% density (Deep Compression's LeNet-300-100): gaps cost about their entropy.
  rng = np.random.default_rng(0)
  pos = np.flatnonzero(rng.random(200_000) < 0.08)
  bits = 8 * len(entropy.encode_positions(pos, 200_000)) / pos.size
  assert bits < 5.6  # geometric(0.08) gap entropy is 5.04 bits; Huffman + header


@pytest.mark.parametrize("bad,match", [
    (np.array([3, 3]), "strictly increasing"), (np.array([5, 2]), "strictly increasing"),
    (np.array([-1, 2]), r"\[0, size=10\)"), (np.array([2, 10]), r"\[0, size=10\)"),
    (np.zeros((2, 2), np.int64), "1-D")])
def test_encode_positions_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    entropy.encode_positions(bad, 10)
  with pytest.raises(TypeError, match="integer array"):
    entropy.encode_positions(np.array([0.5]), 10)


def test_encode_symbols_errors():
  with pytest.raises(ValueError, match=r"\[0, alphabet=4\)"):
    entropy.encode_symbols(np.array([0, 4]), 4)
  with pytest.raises(ValueError, match="alphabet=300"):
    entropy.encode_symbols(np.array([0]), 300)
  with pytest.raises(TypeError, match="integer array"):
    entropy.encode_symbols(np.array([0.0]), 4)


def _sample():
  rng = np.random.default_rng(5)
  sym = _skewed(rng, 3 * entropy.BLOCK + 100, 16, 2.5)
  return sym, entropy.encode_symbols(sym, 16)


def test_every_bit_flip_and_truncation_refused():
  sym, data = _sample()
  rng = np.random.default_rng(0)
  spots = list(range(0, 300)) + list(rng.integers(0, len(data), 200))
  for i in spots:
    bad = bytearray(data)
    bad[i] ^= 1 << int(rng.integers(8))
    with pytest.raises(ValueError):
      entropy.decode_symbols(bytes(bad), sym.size, 16)
  for cut in (0, 10, 39, len(data) // 2, len(data) - 1):
    with pytest.raises(ValueError, match="too short|CRC"):
      entropy.decode_symbols(data[:cut], sym.size, 16)
  with pytest.raises(ValueError, match="CRC"):
    entropy.decode_symbols(data + b"\0", sym.size, 16)


def _recrc(body: bytes) -> bytes:
  return body + struct.pack("<I", zlib.crc32(body))


def _patched(data: bytes, offset: int, new: bytes) -> bytes:
  body = bytearray(data[:-4])
  body[offset:offset + len(new)] = new
  return _recrc(bytes(body))


def test_crafted_headers_with_valid_crc_refused():
  sym, data = _sample()
  n = sym.size
  cases = [
      (_patched(data, 0, b"XXXX"), "bad magic"),
      (_patched(data, 4, b"\x02"), "version 2"),
      (_patched(data, 5, b"\x02"), "kind 2"),
      (_patched(data, 6, struct.pack("<H", 17)), "alphabet 17"),
      (_patched(data, 8, struct.pack("<Q", n + 1)), "expects n="),
      (_patched(data, 24, b"\x0b"), "block_log2=11"),
      (_patched(data, 25, b"\x0f"), "table_bits=15"),
      (_patched(data, 28, struct.pack("<Q", 1)), "header says"),
  ]
  # A code length table that breaks Kraft's equality (the shortest code made longer).
  tb = bytearray(data[36:44])
  lens = [(tb[i // 2] >> (4 * (i % 2))) & 0xF for i in range(16)]
  shortest = min((ln, i) for i, ln in enumerate(lens) if ln)[1]
  tb[shortest // 2] += 1 << (4 * (shortest % 2))
  cases.append((_patched(data, 36, bytes(tb)), "Kraft"))
  # Move one bit between two blocks: every count is plausible, decoding is not.
  bb = np.frombuffer(data[44:52], "<u2").copy()
  bb[0] += 1
  bb[1] -= 1
  cases.append((_patched(data, 44, bb.tobytes()), "block 0 does not decode"))
  for bad, match in cases:
    with pytest.raises(ValueError, match=match):
      entropy.decode_symbols(bad, n, 16)
  with pytest.raises(ValueError, match="alphabet 16 != expected 8"):
    entropy.decode_symbols(data, n, 8)


def test_nonzero_padding_bits_refused():
  sym = np.array([0, 1, 1, 2, 0, 1, 3], np.uint8)
  data = entropy.encode_symbols(sym, 4)
  total = int(np.frombuffer(data[38:40], "<u2")[0])
  assert total % 8, "the sample must leave padding bits"
  bad = bytearray(data[:-4])
  bad[-1] |= 0x80
  with pytest.raises(ValueError, match="padding bits"):
    entropy.decode_symbols(_recrc(bytes(bad)), sym.size, 4)


def test_crafted_positions_refused():
  pos = np.array([1, 5, 600, 999])
  data = entropy.encode_positions(pos, 1000)
  with pytest.raises(ValueError, match="caller expects size=2000"):
    entropy.decode_positions(data, 4, 2000)
  with pytest.raises(ValueError, match="impossible for count=3|expects count=3"):
    entropy.decode_positions(data, 3, 1000)
  with pytest.raises(ValueError, match="kind 2 where 1"):
    entropy.decode_symbols(data, 6, 256)
  # A stream whose last position falls outside the index space: crafted with size 600.
  crafted = entropy.encode_positions(np.array([1, 5, 599]), 600)
  body = bytearray(crafted[:-4])
  body[16:24] = struct.pack("<Q", 599)
  with pytest.raises(ValueError, match="outside"):
    entropy.decode_positions(_recrc(bytes(body)), 3, 599)
  with pytest.raises(TypeError, match="bytes"):
    entropy.decode_positions("abc", 3, 599)
