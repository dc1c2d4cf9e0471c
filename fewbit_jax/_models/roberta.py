"""RoBERTa for sequence classification in Flax linen (one definition for all users).

The architecture of Hugging Face's ``RobertaForSequenceClassification``
(post-LayerNorm encoder, exact-erf GELU, learned positions offset by the
padding index, a tanh classification head on the ``<s>`` token), written
here so the benchmarks need no download and no weights: memory and time do
not depend on the values of the parameters. ``fewbit-jax bench`` (the main
job, `fewbit_jax.demo`) builds it at small sizes with no dropout;
``benchmarks/roberta.py`` adds the optax training step of the memory table.

Injection points, so one model serves every row of the memory table:

* ``activation``: the FFN activation, ``x -> y`` (default: exact GELU).
* ``dense``: the class of every dense layer, called like ``nn.Dense``
  (``features``, ``dtype``, ``kernel_init``, ``name``); pass
  ``functools.partial(fewbit_jax.linen.RandomizedDense, proj_dim_ratio=0.2)``
  to randomize all of them.
* ``head_dense``: the class of the classification head's two dense layers
  (default: ``dense``'s).
* ``layer_norm``: the LayerNorm class, called like ``nn.LayerNorm``.
* ``dropout``: the Dropout class, called like ``nn.Dropout``.
* ``attention``: the attention core, called like `attention_core`.
* ``remat`` / ``remat_policy``: ``jax.checkpoint`` around the activation,
  the attention core, each LayerNorm or each encoder layer.
* ``dtype``: the compute dtype (``jnp.bfloat16`` for mixed precision;
  parameters and optimizer state stay float32).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fewbit_jax._models import roberta
  >>> cfg = roberta.RobertaConfig.tiny()
  >>> model = roberta.RobertaClassifier(cfg)
  >>> ids = jnp.ones((2, 8), jnp.int32)
  >>> params = model.init(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
  >>> model.apply({"params": params}, ids, jnp.ones_like(ids)).shape
  (2, 2)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["RobertaConfig", "RobertaClassifier", "exact_gelu", "attention_core", "Parts",
           "REMAT_PARTS", "make_batch", "batch_shapes"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RobertaConfig:
  """Sizes of a RoBERTa encoder; the defaults are roberta-base's."""
  vocab_size: int = 50265
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 514
  type_vocab_size: int = 1
  layer_norm_eps: float = 1e-5
  dropout_rate: float = 0.1
  num_labels: int = 2
  pad_token_id: int = 1

  @classmethod
  def base(cls, **overrides) -> "RobertaConfig":
    """roberta-base (125M parameters), with optional overrides."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> "RobertaConfig":
    """A few-thousand-parameter model for tests."""
    sizes = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64, max_position_embeddings=66)
    sizes.update(overrides)
    return cls(**sizes)


def exact_gelu(x: Array) -> Array:
  """GELU with the erf form, as Hugging Face RoBERTa uses."""
  return jax.nn.gelu(x, approximate=False)


REMAT_PARTS = ("activation", "attention", "layer_norm", "block")


def _parts(ctx: nn.Module):
  """Where `ctx`'s layer classes are: its `Parts` (encoder layers) or its own fields."""
  return getattr(ctx, "parts", ctx)


def _dense(ctx: nn.Module, features: int, name: str) -> nn.Module:
  return _parts(ctx).dense(features, dtype=ctx.dtype, kernel_init=nn.initializers.normal(0.02),
                   name=name)


def _norm(ctx: nn.Module, name: str) -> nn.Module:
  layer_norm = _parts(ctx).layer_norm
  cls = nn.remat(layer_norm) if "layer_norm" in ctx.remat else layer_norm
  return cls(epsilon=ctx.cfg.layer_norm_eps, dtype=ctx.dtype, name=name)


def attention_core(q: Array, k: Array, v: Array, mask_bias: Array, key: Array | None,
                   rate: float) -> Array:
  """softmax(q k^T / sqrt(d) + mask) v, with dropout on the probabilities.

  Shapes: q, k, v ``(batch, seq, heads, head_dim)``; mask_bias broadcastable
  to ``(batch, heads, seq, seq)``; `key` None for no dropout.
  """
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  scores = scores + mask_bias.astype(scores.dtype)
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
  if key is not None and rate > 0:
    keep = jax.random.bernoulli(key, 1.0 - rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - rate), 0).astype(probs.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


@dataclasses.dataclass(frozen=True)
class Parts:
  """The replaceable parts of every encoder layer (see the module docstring)."""
  dense: Callable[..., nn.Module] = nn.Dense
  layer_norm: Callable[..., nn.Module] = nn.LayerNorm
  dropout: Callable[..., nn.Module] = nn.Dropout
  attention: Callable[..., Array] = attention_core


class SelfAttention(nn.Module):
  """Multi-head self-attention with an output projection and post-LayerNorm."""
  cfg: RobertaConfig
  parts: Parts
  dtype: Any = None
  remat: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array, deterministic: bool) -> Array:
    cfg = self.cfg
    b, s, d = x.shape
    split = lambda t: t.reshape(b, s, cfg.num_heads, d // cfg.num_heads)
    q = split(_dense(self, d, "query")(x))
    k = split(_dense(self, d, "key")(x))
    v = split(_dense(self, d, "value")(x))
    key = None if deterministic or cfg.dropout_rate == 0 else self.make_rng("dropout")
    core = functools.partial(self.parts.attention, rate=cfg.dropout_rate)
    if "attention" in self.remat:
      core = jax.checkpoint(core)
    with jax.named_scope("core"):
      ctx = core(q, k, v, mask_bias, key).reshape(b, s, d)
    out = _dense(self, d, "output")(ctx)
    out = self.parts.dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    return _norm(self, "output_norm")(out + x)


class RobertaLayer(nn.Module):
  """One encoder layer: attention, then the FFN, each with post-LayerNorm."""
  cfg: RobertaConfig
  activation: Callable[[Array], Array]
  parts: Parts
  dtype: Any = None
  remat: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array, deterministic: bool) -> Array:
    cfg = self.cfg
    x = SelfAttention(cfg, self.parts, self.dtype, self.remat,
                      name="attention")(x, mask_bias, deterministic)
    act = jax.checkpoint(self.activation) if "activation" in self.remat else self.activation
    y = _dense(self, cfg.intermediate_size, "intermediate")(x)
    with jax.named_scope("activation"):
      y = act(y)
    y = _dense(self, cfg.hidden_size, "output")(y)
    y = self.parts.dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    return _norm(self, "output_norm")(y + x)


class RobertaClassifier(nn.Module):
  """RoBERTa encoder with Hugging Face's sequence-classification head.

  Attributes:
    cfg: the sizes.
    activation: the FFN activation (default exact GELU).
    dense: class of every dense layer (default ``nn.Dense``).
    layer_norm: LayerNorm class (default ``nn.LayerNorm``).
    dropout: Dropout class (default ``nn.Dropout``).
    attention: the attention core (default `attention_core`).
    dtype: compute dtype; ``None`` for float32.
    remat: the parts to wrap in ``jax.checkpoint``, any of ``"activation"``,
      ``"attention"`` (scores, softmax, dropout, weighted sum), ``"layer_norm"``
      and ``"block"`` (each encoder layer, with `remat_policy`).
    remat_policy: the ``jax.checkpoint`` policy of ``"block"`` (``None``:
      save nothing but each layer's inputs).
    head_dense: class of the classification head's two dense layers
      (``None``: `dense`).
  """
  cfg: RobertaConfig
  activation: Callable[[Array], Array] = exact_gelu
  dense: Callable[..., nn.Module] = nn.Dense
  layer_norm: Callable[..., nn.Module] = nn.LayerNorm
  dropout: Callable[..., nn.Module] = nn.Dropout
  attention: Callable[..., Array] = attention_core
  dtype: Any = None
  remat: tuple[str, ...] = ()
  remat_policy: Callable | None = None
  head_dense: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array,
               deterministic: bool = True) -> Array:
    cfg = self.cfg
    unknown = set(self.remat) - set(REMAT_PARTS)
    if unknown:
      raise ValueError(f"remat parts must be among {REMAT_PARTS}; got {sorted(unknown)}.")
    init = nn.initializers.normal(0.02)
    # Positions count non-padding tokens from pad_token_id + 1, as in HF.
    not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
    positions = jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
    embed = functools.partial(nn.Embed, features=cfg.hidden_size, embedding_init=init,
                              dtype=self.dtype)
    x = (embed(cfg.vocab_size, name="word_embeddings")(input_ids)
         + embed(cfg.max_position_embeddings, name="position_embeddings")(positions)
         + embed(cfg.type_vocab_size, name="token_type_embeddings")(
             jnp.zeros_like(input_ids)))
    x = _norm(self, "embeddings_norm")(x)
    x = self.dropout(cfg.dropout_rate)(x, deterministic=deterministic)

    dtype = self.dtype or jnp.float32
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                          jnp.finfo(dtype).min).astype(dtype)
    layer_cls = RobertaLayer
    if "block" in self.remat:
      layer_cls = nn.remat(RobertaLayer, static_argnums=(3,), policy=self.remat_policy)
    parts = Parts(self.dense, self.layer_norm, self.dropout, self.attention)
    for i in range(cfg.num_layers):
      x = layer_cls(cfg, self.activation, parts, self.dtype, self.remat,
                    name=f"layer_{i}")(x, mask_bias, deterministic)

    # Classification head on <s>: dropout, dense, tanh, dropout, projection.
    head_dense = self.dense if self.head_dense is None else self.head_dense
    h = self.dropout(cfg.dropout_rate)(x[:, 0], deterministic=deterministic)
    h = jnp.tanh(head_dense(cfg.hidden_size, dtype=self.dtype, kernel_init=init,
                            name="classifier_dense")(h))
    h = self.dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    logits = head_dense(cfg.num_labels, dtype=self.dtype, kernel_init=init,
                        name="classifier_out")(h)
    return logits.astype(jnp.float32)


def make_batch(cfg: RobertaConfig, batch: int, seq: int, key: Array | None = None) -> dict:
  """An MRPC-shaped batch of random tokens: ids, attention mask and labels.

  Each row has a random length in [seq // 2, seq] and is padded after it,
  as a padded GLUE batch is.
  """
  key = jax.random.key(0) if key is None else key
  k1, k2, k3 = jax.random.split(key, 3)
  ids = jax.random.randint(k1, (batch, seq), 3, cfg.vocab_size, jnp.int32)
  lengths = jax.random.randint(k2, (batch, 1), seq // 2, seq + 1)
  mask = (jnp.arange(seq)[None, :] < lengths).astype(jnp.int32)
  ids = jnp.where(mask > 0, ids, cfg.pad_token_id).at[:, 0].set(0)
  labels = jax.random.randint(k3, (batch,), 0, cfg.num_labels, jnp.int32)
  return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_shapes(batch: int, seq: int) -> dict:
  """Abstract shapes of `make_batch`'s output, for lowering without data."""
  s = jax.ShapeDtypeStruct
  return {"input_ids": s((batch, seq), jnp.int32),
          "attention_mask": s((batch, seq), jnp.int32),
          "labels": s((batch,), jnp.int32)}
