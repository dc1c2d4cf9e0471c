"""A Gemma/Llama-style decoder in Flax NNX, written the plain way, and its training step.

In the style of flax's ``examples/gemma``: pre-RMSNorm written by hand (as
gemma's ``layers.RMSNorm``: ``x * rsqrt(mean(x^2) + eps) * (1 + scale)``),
grouped-query attention with rotary position embeddings, an optional logit
soft-cap (Gemma 2's ``tanh(logits / cap) * cap``) and a causal mask applied
with ``jnp.where``, a gated GELU MLP written inline
(``nnx.gelu(gate_proj(x)) * up_proj(x)``), the layers in an ``nnx.List``,
an embedding table tied to the output logits. Nothing in it knows
fewbit_jax: the benchmarks convert it with `fewbit_jax.nnx.convert`. The
one change for the fused loss head: ``model(tokens, return_hidden=True)``
returns the last hidden state instead of the logits (`fused_loss_fn`).

``remat_policy`` wraps each layer's call in ``nnx.remat`` with that policy
(a user's one line of ``jax.checkpoint``), for the rows of JAX's policies.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from fewbit_jax._models import decoder
  >>> cfg = decoder.DecoderConfig.tiny()
  >>> model = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
  >>> model(jnp.ones((2, 8), jnp.int32)).shape
  (2, 8, 128)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["DecoderConfig", "RMSNorm", "Attention", "FeedForward", "Block", "Decoder",
           "apply_rope", "loss_fn", "fused_loss_fn", "make_tokens"]

K_MASK = -2.3819763e38  # gemma's large negative for masked logits


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Sizes of the decoder; the defaults are the benchmark's small size."""
  vocab_size: int = 32768
  embed_dim: int = 256
  hidden_dim: int = 1024
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 1
  head_dim: int = 64
  rope_base: float = 10000.0
  attn_logits_soft_cap: float | None = None  # Gemma 2's 50.0: tanh(logits / cap) * cap

  @classmethod
  def full(cls, **overrides) -> "DecoderConfig":
    """A Gemma-2B-like width at 8 layers: d 2048, FFN 16384, 8 heads, 1 kv head."""
    sizes = dict(embed_dim=2048, hidden_dim=16384, num_layers=8, num_heads=8, num_kv_heads=1,
                 head_dim=256)
    sizes.update(overrides)
    return cls(**sizes)

  @classmethod
  def tiny(cls, **overrides) -> "DecoderConfig":
    """A model for tests: vocabulary 128, d 32, 2 layers."""
    sizes = dict(vocab_size=128, embed_dim=32, hidden_dim=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8)
    sizes.update(overrides)
    return cls(**sizes)


class RMSNorm(nnx.Module):
  """RMSNorm as gemma writes it: the scale is stored minus one."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.scale = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (dim,)))

  def __call__(self, x):
    x = jnp.asarray(x, jnp.float32)
    mean2 = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(mean2 + 1e-6) * (1.0 + self.scale[...])


def apply_rope(x, positions, base: float):
  """Rotary position embedding of ``x`` ``[B, L, H, D]`` at ``positions`` ``[B, L]``."""
  half = x.shape[-1] // 2
  freq = base ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
  angle = positions[..., None].astype(jnp.float32) * freq  # [B, L, D/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  first, second = x[..., :half], x[..., half:]
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and a causal mask."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nnx.initializers.normal(d ** -0.5)
    self.q_proj = nnx.Linear(d, h * hd, use_bias=False, kernel_init=init, rngs=rngs)
    self.k_proj = nnx.Linear(d, kv * hd, use_bias=False, kernel_init=init, rngs=rngs)
    self.v_proj = nnx.Linear(d, kv * hd, use_bias=False, kernel_init=init, rngs=rngs)
    self.o_proj = nnx.Linear(h * hd, d, use_bias=False, kernel_init=init, rngs=rngs)

  def __call__(self, x, positions, mask):
    cfg = self.cfg
    b, l, _ = x.shape
    q = self.q_proj(x).reshape(b, l, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
    q = apply_rope(q, positions, cfg.rope_base) * cfg.head_dim ** -0.5
    k = apply_rope(k, positions, cfg.rope_base)
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, l, cfg.num_kv_heads, groups, cfg.head_dim)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k)
    if cfg.attn_logits_soft_cap is not None:  # inline, as gemma writes it
      logits = jnp.tanh(logits / cfg.attn_logits_soft_cap) * cfg.attn_logits_soft_cap
    logits = jnp.where(mask[:, None, None], logits, K_MASK)
    probs = jax.nn.softmax(logits, axis=-1)
    ctx = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, l, -1)
    return self.o_proj(ctx)


class FeedForward(nnx.Module):
  """The gated GELU MLP, written inline as gemma's."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    d, f = cfg.embed_dim, cfg.hidden_dim
    self.gate_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(f, d, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(nnx.gelu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder layer: attention and MLP, each with a residual."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.pre_attention_norm = RMSNorm(cfg.embed_dim, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.pre_ffw_norm = RMSNorm(cfg.embed_dim, rngs=rngs)
    self.mlp = FeedForward(cfg, rngs=rngs)

  def __call__(self, x, positions, mask):
    x = x + self.attn(self.pre_attention_norm(x), positions, mask)
    return x + self.mlp(self.pre_ffw_norm(x))


class Decoder(nnx.Module):
  """Embedding (scaled by sqrt(d)), the layers, a final norm, tied logits."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs,
               remat_policy: Callable | None = None, remat: bool = False):
    self.cfg = cfg
    self.embedder = nnx.Embed(cfg.vocab_size, cfg.embed_dim,
                              embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, rngs=rngs)
    self.remat = remat or remat_policy is not None
    self.remat_policy = remat_policy

  def __call__(self, tokens, *, return_hidden: bool = False):
    """The logits ``[B, L, V]``; with ``return_hidden=True`` the last hidden state ``[B, L, D]``.

    The hidden state is what a fused loss head takes
    (``fb.linear_softmax_cross_entropy(h, model.embedder.embedding, labels,
    kernel_layout="vd")``, `fused_loss_fn`): the one change a model that
    returns logits needs.
    """
    b, l = tokens.shape
    x = self.embedder(tokens) * jnp.sqrt(float(self.cfg.embed_dim))
    positions = jnp.broadcast_to(jnp.arange(l), (b, l))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((l, l), bool)), (b, l, l))
    for layer in self.layers:
      if self.remat:
        x = nnx.remat(lambda m, x: m(x, positions, mask), policy=self.remat_policy)(layer, x)
      else:
        x = layer(x, positions, mask)
    x = self.final_norm(x)
    if return_hidden:
      return x
    return self.embedder.attend(x)


def loss_fn(model: Decoder, tokens):
  """Next-token cross-entropy from the logits, mean over the batch.

  ``optax.softmax_cross_entropy_with_integer_labels``'s operations written
  out (log-sum-exp minus the label's logit; the same compiled memory and
  flops), so that the package needs no optax.
  """
  logits = model(tokens[:, :-1])
  labels = tokens[:, 1:]
  label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return (jax.nn.logsumexp(logits, axis=-1) - label_logits).mean()


def fused_loss_fn(model: Decoder, tokens, block_size: int | None = None,
                  gradient: str = "recompute", token_block_size: int | None = None):
  """`loss_fn` with the fused loss head: no logits, no transposed embedding table.

  The model returns its last hidden state and
  `fewbit_jax.linear_softmax_cross_entropy` computes the loss from it and
  the tied ``[V, D]`` embedding table (``kernel_layout="vd"``). With
  ``gradient="recompute"`` the per-token loss is averaged here and the
  backward recomputes the logits, ``block_size`` vocabulary columns at a
  time; with ``gradient="forward"`` the op returns the mean itself
  (``reduction="mean"``) and forms its gradients in the forward pass,
  ``token_block_size`` tokens at a time (None: the op's defaults).
  Equal to `loss_fn` up to float rounding.
  """
  import fewbit_jax as fb  # the benchmark's converted rows only; the model knows nothing of it
  hidden = model(tokens[:, :-1], return_hidden=True)
  table = model.embedder.embedding[...]
  if gradient == "forward":
    return fb.linear_softmax_cross_entropy(hidden, table, tokens[:, 1:], kernel_layout="vd",
                                           reduction="mean", gradient="forward",
                                           token_block_size=token_block_size)
  return fb.linear_softmax_cross_entropy(hidden, table, tokens[:, 1:],
                                         kernel_layout="vd", block_size=block_size).mean()


def make_tokens(cfg: DecoderConfig, batch: int, seq: int, seed: int = 0):
  """Random tokens ``[batch, seq + 1]`` (inputs and shifted targets)."""
  return jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, cfg.vocab_size)
