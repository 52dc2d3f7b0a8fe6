"""Entropy coding of codebook indices and sparse positions (Deep Compression's third stage).

A self-contained codec on NumPy arrays (host side; no JAX). Two kinds of stream:

* **symbols**: a flat array of small integers ``< alphabet <= 256`` (codebook indices,
  one per weight), coded with a canonical, length-limited Huffman code fitted to the
  array's own histogram (Han et al. 2016 Huffman-code the indices and the positions);
* **positions**: a sorted array of distinct flat positions in ``[0, size)`` (the
  non-zeros of a pruned leaf), stored as *gaps* ``g_0 = p_0``, ``g_i = p_i - p_{i-1} - 1``
  and coded as symbols over an alphabet of 256: a gap ``g`` is written as ``g // 255``
  filler symbols 255 (each means "skip 255 more") followed by the symbol ``g % 255``.
  This is Deep Compression's relative index with filler entries, with the fixed 4/8-bit
  width replaced by the Huffman code of the gaps (so a filler costs what its frequency
  says; a dense mask costs about 1 bit per stored position).

Why Huffman and not rANS: a canonical Huffman code is what the paper uses, it decodes
with one table lookup per symbol, and on codebook indices it is within a few tenths of a
percent of the empirical entropy (measured on all-MiniLM-L6-v2 in ``docs/pruning.md``);
rANS would close that small gap at the cost of a second coder to keep bit-exact.

Format (version 1, all integers little-endian)::

  offset size  field
  0      4     magic b"QWEC"
  4      1     version (1)
  5      1     kind: 1 symbols, 2 positions
  6      2     alphabet (1..256)
  8      8     n: number of coded symbols (positions: count + fillers)
  16     8     size: positions: the size of the index space; symbols: 0
  24     1     block_log2 (12: blocks of 4096 symbols)
  25     1     table_bits T: the longest code length (0 if at most one symbol is used)
  26     2     reserved (0)
  28     8     payload_bytes
  36     A     code lengths, one nibble per symbol (low nibble first), A = ceil(alphabet/2)
  36+A   2*nb  bits of each block of 4096 symbols (uint16), nb = ceil(n / 4096)
  ...    P     payload: the codes, LSB-first bit stream (code bits in code order), the
               last byte padded with zero bits
  end-4  4     CRC-32 (zlib) of everything before it

The code lengths (1..15, 0 = unused) define the canonical code (symbols sorted by
(length, value) get consecutive codes). With two or more used symbols the lengths must
satisfy Kraft's equality (a complete prefix code); with exactly one used symbol its
length is 1 and the payload is empty (n copies of it). The per-block bit counts let the
decoder run all blocks in parallel (one vectorised table lookup per symbol position in a
block, over all blocks at once); they cost 16 bits per 4096 symbols.

Every decode checks the header fields, the Kraft equality, the caller's expected counts,
that each block decodes to exactly its declared number of bits, that padding bits are 0,
and the CRC; any failure raises ``ValueError`` (never a wrong array).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC = b"QWEC"
VERSION = 1
KIND_SYMBOLS = 1
KIND_POSITIONS = 2
MAX_CODE_BITS = 15
BLOCK_LOG2 = 12
BLOCK = 1 << BLOCK_LOG2
POSITION_ALPHABET = 256
FILLER = POSITION_ALPHABET - 1
_HEADER = struct.Struct("<4sBBHQQBBHQ")  # 36 bytes
_CRC = 4
_CHUNK = 1 << 22  # symbols encoded per pass (bounds the encoder's temporary memory)


# ---------------------------------------------------------------------------- codes


def _package_merge(weights: np.ndarray, max_len: int) -> np.ndarray:
  """Optimal code lengths <= ``max_len`` for positive ``weights`` (package-merge)."""
  m = len(weights)
  order = np.argsort(weights, kind="stable")
  leaf_w = weights[order].astype(np.float64)
  leaf_v = np.eye(m, dtype=np.int32)
  cur_w, cur_v = leaf_w, leaf_v
  for _ in range(max_len - 1):
    h = len(cur_w) // 2
    pkg_w = cur_w[0:2 * h:2] + cur_w[1:2 * h:2]
    pkg_v = cur_v[0:2 * h:2] + cur_v[1:2 * h:2]
    all_w = np.concatenate([leaf_w, pkg_w])
    all_v = np.concatenate([leaf_v, pkg_v])
    sel = np.argsort(all_w, kind="stable")  # leaves first on ties
    cur_w, cur_v = all_w[sel], all_v[sel]
  lengths_sorted = cur_v[:2 * m - 2].sum(axis=0)
  lengths = np.empty(m, np.int64)
  lengths[order] = lengths_sorted
  return lengths


def code_lengths(counts: np.ndarray, max_len: int = MAX_CODE_BITS) -> np.ndarray:
  """Length-limited Huffman code lengths (0 for unused symbols) from symbol counts."""
  counts = np.asarray(counts, np.int64)
  lengths = np.zeros(counts.shape, np.int64)
  used = np.flatnonzero(counts)
  if len(used) == 1:
    lengths[used] = 1
  elif len(used) > 1:
    lengths[used] = _package_merge(counts[used], max_len)
  return lengths


def _canonical_reversed_codes(lengths: np.ndarray) -> np.ndarray:
  """Canonical codes, bit-reversed within their length (the LSB-first stream order)."""
  codes = np.zeros(len(lengths), np.int64)
  code, prev = 0, 0
  for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
    code <<= int(lengths[s]) - prev
    prev = int(lengths[s])
    codes[s] = code
    code += 1
  rev = np.zeros_like(codes)
  for b in range(MAX_CODE_BITS):
    bit = (codes >> b) & 1
    shift = np.maximum(lengths - 1 - b, 0)
    rev |= np.where(lengths > b, bit << shift, 0)
  return rev


def empirical_entropy_bits(symbols, alphabet: int) -> float:
  """``n * H(p)`` in bits, p the histogram of ``symbols``: the bound for a static code."""
  counts = np.bincount(np.asarray(symbols).reshape(-1), minlength=alphabet).astype(np.float64)
  n = counts.sum()
  nz = counts[counts > 0]
  return float(-(nz * np.log2(nz / n)).sum()) if n else 0.0


# ------------------------------------------------------------------------- encoding


def _check_alphabet(alphabet) -> int:
  if isinstance(alphabet, bool) or not isinstance(alphabet, (int, np.integer)):
    raise TypeError(f"alphabet must be an int in [1, 256], got {type(alphabet).__name__}")
  if not 1 <= int(alphabet) <= 256:
    raise ValueError(f"alphabet={alphabet} must be in [1, 256]")
  return int(alphabet)


def _encode(sym: np.ndarray, alphabet: int, kind: int, size: int) -> bytes:
  n = int(sym.size)
  counts = np.bincount(sym, minlength=alphabet)
  lengths = code_lengths(counts)
  single = int((counts > 0).sum()) <= 1
  table_bits = 0 if single else int(lengths.max())
  nb = -(-n // BLOCK)
  block_bits = np.zeros(nb, np.int64)
  chunks = []
  if not single:
    rev = _canonical_reversed_codes(lengths)
    total = 0  # bits written so far
    carry = np.zeros(0, np.uint8)  # the partial last byte of the previous chunk
    for c0 in range(0, n, _CHUNK):  # _CHUNK is a multiple of BLOCK
      s = sym[c0:c0 + _CHUNK]
      ln = lengths[s]
      pos = np.cumsum(ln)
      cb = int(pos[-1])
      pos -= ln
      pos += total & 7  # bit offset inside the first byte of this chunk
      bidx = np.add.reduceat(ln, np.arange(0, len(s), BLOCK))
      block_bits[c0 // BLOCK:c0 // BLOCK + len(bidx)] = bidx
      v = rev[s] << (pos & 7)
      byte = pos >> 3
      nbytes = ((total & 7) + cb + 7) // 8
      acc = np.zeros(nbytes + 3, np.float64)
      for k in range(3):  # a code (<= 15 bits) shifted by <= 7 spans <= 3 bytes
        acc += np.bincount(byte + k, weights=(v >> (8 * k)) & 0xFF, minlength=nbytes + 3)
      out = acc[:nbytes].astype(np.uint8)
      if carry.size:
        out[0] |= carry[0]
      total += cb
      if total & 7:
        chunks.append(out[:-1])
        carry = out[-1:]
      else:
        chunks.append(out)
        carry = np.zeros(0, np.uint8)
    chunks.append(carry)
  payload = b"".join(c.tobytes() for c in chunks)
  nib = np.zeros(2 * ((alphabet + 1) // 2), np.uint8)
  nib[:alphabet] = lengths
  table = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
  head = _HEADER.pack(MAGIC, VERSION, kind, alphabet, n, size, BLOCK_LOG2, table_bits, 0,
                      len(payload))
  body = head + table + block_bits.astype("<u2").tobytes() + payload
  return body + struct.pack("<I", zlib.crc32(body))


def encode_symbols(symbols, alphabet: int) -> bytes:
  """Huffman-codes an array of symbols ``< alphabet`` (e.g. unpacked codebook indices).

  Args:
    symbols: integer array of any shape (flattened in C order), values in
      ``[0, alphabet)``.
    alphabet: 1..256 (``k`` for codebook indices).

  Returns:
    The coded bytes (format in the module docstring); decode with `decode_symbols`.

  Raises:
    TypeError: non-integer ``symbols`` or ``alphabet``.
    ValueError: ``alphabet`` outside [1, 256] or a symbol outside ``[0, alphabet)``.

  Example:
    >>> import numpy as np
    >>> s = np.array([0, 1, 1, 3, 1, 0], np.uint8)
    >>> bool((decode_symbols(encode_symbols(s, 4), 6, 4) == s).all())
    True
  """
  alphabet = _check_alphabet(alphabet)
  s = np.asarray(symbols)
  if not np.issubdtype(s.dtype, np.integer):
    raise TypeError(f"symbols must be an integer array, got dtype {s.dtype}")
  s = s.reshape(-1)
  if s.size and (int(s.min()) < 0 or int(s.max()) >= alphabet):
    raise ValueError(f"symbols must be in [0, {alphabet=}), got values in"
                     f" [{int(s.min())}, {int(s.max())}]")
  return _encode(s.astype(np.int64), alphabet, KIND_SYMBOLS, 0)


def _check_size(size) -> int:
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
    raise TypeError(f"size must be an int, got {type(size).__name__}")
  if int(size) < 0:
    raise ValueError(f"size={size} must be >= 0")
  return int(size)


def encode_positions(positions, size: int) -> bytes:
  """Codes sorted, distinct flat positions in ``[0, size)`` as Huffman-coded gaps.

  Args:
    positions: 1-D integer array, strictly increasing, values in ``[0, size)`` (e.g. the
      flat indices of the non-zeros of a pruned leaf).
    size: the number of possible positions (the leaf's element count).

  Returns:
    The coded bytes; decode with `decode_positions`.

  Raises:
    TypeError: non-integer ``positions`` or ``size``.
    ValueError: positions not 1-D, not strictly increasing or out of ``[0, size)``.

  Example:
    >>> import numpy as np
    >>> p = np.array([3, 4, 700, 1023])
    >>> decode_positions(encode_positions(p, 1024), 4, 1024).tolist()
    [3, 4, 700, 1023]
  """
  size = _check_size(size)
  p = np.asarray(positions)
  if not np.issubdtype(p.dtype, np.integer):
    raise TypeError(f"positions must be an integer array, got dtype {p.dtype}")
  if p.ndim != 1:
    raise ValueError(f"positions must be 1-D, got shape {p.shape}")
  p = p.astype(np.int64)
  if p.size:
    if int(p[0]) < 0 or int(p[-1]) >= size:
      raise ValueError(f"positions must be in [0, {size=}), got first {int(p[0])},"
                       f" last {int(p[-1])}")
    if p.size > 1 and not bool((np.diff(p) > 0).all()):
      raise ValueError("positions must be strictly increasing")
  gaps = np.diff(p, prepend=-1) - 1
  runs = gaps // FILLER + 1
  sym = np.full(int(runs.sum()), FILLER, np.int64)
  sym[np.cumsum(runs) - 1] = gaps % FILLER
  return _encode(sym, POSITION_ALPHABET, KIND_POSITIONS, size)


# ------------------------------------------------------------------------- decoding


def _parse(data, kind: int, alphabet: int, what: str):
  """Checks the container (length, CRC, header, code table); returns its fields."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"{what}: data must be bytes, got {type(data).__name__}")
  data = bytes(data)
  if len(data) < _HEADER.size + _CRC:
    raise ValueError(f"{what}: {len(data)} bytes is too short for an entropy-coded stream"
                     f" (header {_HEADER.size} + CRC {_CRC}); truncated data?")
  body, (crc,) = data[:-_CRC], struct.unpack("<I", data[-_CRC:])
  if zlib.crc32(body) != crc:
    raise ValueError(f"{what}: CRC-32 mismatch (stored {crc:#010x}, computed"
                     f" {zlib.crc32(body):#010x}): the data is damaged")
  magic, version, k, alpha, n, size, blog2, table_bits, reserved, pbytes = (
      _HEADER.unpack_from(body))
  if magic != MAGIC:
    raise ValueError(f"{what}: bad magic {magic!r} (expected {MAGIC!r}): not an entropy-coded"
                     " stream")
  if version != VERSION:
    raise ValueError(f"{what}: format version {version} is not supported (this build"
                     f" reads version {VERSION})")
  if k != kind:
    raise ValueError(f"{what}: stream kind {k} where {kind} was expected (symbols=1,"
                     " positions=2)")
  if alpha != alphabet:
    raise ValueError(f"{what}: stream alphabet {alpha} != expected {alphabet}")
  if blog2 != BLOCK_LOG2 or reserved != 0 or table_bits > MAX_CODE_BITS:
    raise ValueError(f"{what}: bad header fields (block_log2={blog2}, reserved={reserved},"
                     f" table_bits={table_bits})")
  a_bytes = (alphabet + 1) // 2
  nb = -(-n // BLOCK)
  expect = _HEADER.size + a_bytes + 2 * nb + pbytes
  if len(body) != expect:
    raise ValueError(f"{what}: stream is {len(body)} bytes before its CRC, header says"
                     f" {expect} (n={n}, payload {pbytes} bytes)")
  off = _HEADER.size
  tb = np.frombuffer(body, np.uint8, a_bytes, off)
  lengths = np.empty(2 * a_bytes, np.int64)
  lengths[0::2], lengths[1::2] = tb & 0xF, tb >> 4
  if alphabet % 2 and lengths[alphabet]:
    raise ValueError(f"{what}: code length table has a non-zero padding nibble")
  lengths = lengths[:alphabet]
  off += a_bytes
  block_bits = np.frombuffer(body, "<u2", nb, off).astype(np.int64)
  off += 2 * nb
  payload = np.frombuffer(body, np.uint8, pbytes, off)
  used = np.flatnonzero(lengths)
  if len(used) <= 1:
    if len(used) == 1 and lengths[used[0]] != 1:
      raise ValueError(f"{what}: a single used symbol must have code length 1")
    if len(used) == 0 and n:
      raise ValueError(f"{what}: {n} symbols but no symbol has a code")
    if table_bits != 0 or pbytes or block_bits.any():
      raise ValueError(f"{what}: a stream of one repeated symbol must have no payload")
  else:
    if table_bits != int(lengths.max()):
      raise ValueError(f"{what}: table_bits={table_bits} != longest code"
                       f" {int(lengths.max())}")
    kraft = int((1 << (table_bits - lengths[used])).sum())
    if kraft != 1 << table_bits:
      raise ValueError(f"{what}: code lengths are not a complete prefix code (Kraft sum"
                       f" {kraft}/{1 << table_bits} != 1)")
  total_bits = int(block_bits.sum())
  if (total_bits + 7) // 8 != pbytes:
    raise ValueError(f"{what}: blocks hold {total_bits} bits but the payload is {pbytes}"
                     " bytes")
  if total_bits & 7 and int(payload[-1]) >> (total_bits & 7):
    raise ValueError(f"{what}: non-zero padding bits after the last code")
  return n, size, lengths, table_bits, block_bits, payload


def _decode(n, lengths, table_bits, block_bits, payload, what: str) -> np.ndarray:
  used = np.flatnonzero(lengths)
  if n == 0 or len(used) == 0:
    return np.zeros(0, np.uint8)
  if len(used) == 1:
    return np.full(n, used[0], np.uint8)
  rev = _canonical_reversed_codes(lengths)
  # Table entry: symbol | length << 8, indexed by the next table_bits bits of the stream.
  table = np.zeros(1 << table_bits, np.uint16)
  for s in used:
    ln = int(lengths[s])
    table[int(rev[s]) + (np.arange(1 << (table_bits - ln)) << ln)] = s | (ln << 8)
  nb = len(block_bits)
  tail = n - (nb - 1) * BLOCK  # symbols in the last block
  pad = BLOCK * MAX_CODE_BITS // 8 + 8  # garbage reads past the end stay in bounds
  buf = np.concatenate([payload, np.zeros(pad, np.uint8)]).astype(np.int64)
  window = buf[:-2] | (buf[1:-1] << 8) | (buf[2:] << 16)  # 24 bits from every byte
  starts = np.concatenate([[0], np.cumsum(block_bits)[:-1]]).astype(np.int64)
  pos = starts.copy()
  mask = (1 << table_bits) - 1
  out = np.empty((BLOCK, nb), np.uint8)
  last_end = None
  steps = BLOCK if nb > 1 else tail
  for j in range(steps):
    e = table[(window[pos >> 3] >> (pos & 7)) & mask]
    out[j] = e
    pos += e >> 8
    if j == tail - 1:
      last_end = int(pos[-1])
  ends = starts + block_bits
  ok = pos[:-1] == ends[:-1]
  if not ok.all() or last_end != int(ends[-1]):
    bad = int(np.flatnonzero(np.append(ok, last_end == int(ends[-1])) == 0)[0])
    raise ValueError(f"{what}: block {bad} does not decode to its declared"
                     f" {int(block_bits[bad])} bits: the data is damaged or crafted")
  return out.T.reshape(-1)[:n]


def _check_count(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(value).__name__}")
  if int(value) < 0:
    raise ValueError(f"{name}={value} must be >= 0")
  return int(value)


def decode_symbols(data: bytes, n: int, alphabet: int) -> np.ndarray:
  """Decodes `encode_symbols` output; the inverse, bit-exact.

  Args:
    data: the coded bytes.
    n: the number of symbols the caller expects (e.g. the leaf's element count).
    alphabet: the alphabet the caller expects (1..256).

  Returns:
    A flat ``uint8`` array of ``n`` symbols, each ``< alphabet``.

  Raises:
    ValueError: the data is damaged, truncated, crafted or does not match ``n`` /
      ``alphabet`` (the message says which check failed).
    TypeError: ``data`` is not bytes.
  """
  what = "decode_symbols"
  alphabet = _check_alphabet(alphabet)
  n = _check_count(n, "n")
  got, _, lengths, tbits, block_bits, payload = _parse(data, KIND_SYMBOLS, alphabet, what)
  if got != n:
    raise ValueError(f"{what}: stream holds {got} symbols, the caller expects {n=}")
  return _decode(n, lengths, tbits, block_bits, payload, what)


def decode_positions(data: bytes, count: int, size: int) -> np.ndarray:
  """Decodes `encode_positions` output; the inverse, bit-exact.

  Args:
    data: the coded bytes.
    count: the number of positions the caller expects (e.g. stored non-zeros).
    size: the size of the index space the caller expects (the leaf's element count).

  Returns:
    A strictly increasing ``int64`` array of ``count`` positions in ``[0, size)``.

  Raises:
    ValueError: the data is damaged, truncated, crafted or does not match ``count`` /
      ``size``.
    TypeError: ``data`` is not bytes.
  """
  what = "decode_positions"
  count = _check_count(count, "count")
  size = _check_size(size)
  n, got_size, lengths, tbits, block_bits, payload = _parse(
      data, KIND_POSITIONS, POSITION_ALPHABET, what)
  if got_size != size:
    raise ValueError(f"{what}: stream is for size {got_size}, the caller expects {size=}")
  if count > size or not count <= n <= count + size // FILLER + 1:
    raise ValueError(f"{what}: stream holds {n} gap symbols, impossible for {count=}"
                     f" positions in {size=}")
  sym = _decode(n, lengths, tbits, block_bits, payload, what).astype(np.int64)
  is_gap = sym != FILLER
  if int(is_gap.sum()) != count or (n and not is_gap[-1]):
    raise ValueError(f"{what}: stream decodes to {int(is_gap.sum())} positions"
                     f"{' ending in a filler' if n and not is_gap[-1] else ''},"
                     f" the caller expects {count=}")
  steps = np.cumsum(sym + is_gap)  # a filler skips 255, a gap g skips g + 1
  pos = steps[is_gap] - 1
  if count and int(pos[-1]) >= size:
    raise ValueError(f"{what}: last position {int(pos[-1])} is outside [0, {size=})")
  return pos
