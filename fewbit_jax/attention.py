"""Lean softmax and dot-product attention: exact gradients, fewer residuals.

`softmax` is ``jax.nn.softmax`` (the same XLA operations, so the same output
bitwise) whose derivative needs only its output ``y``: tangent ``y * (t -
sum(t * y))``, so reverse mode keeps ``y`` alone (named ``'softmax_output'``)
and forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) works. The
matmul that usually follows keeps ``y`` anyway, so ``softmax(s) @ v`` keeps
one score-sized array.

`dot_product_attention` is a drop-in for ``flax.linen.dot_product_attention``
and ``flax.nnx.dot_product_attention`` (the same arguments, the same forward
operations) whose backward keeps at most one score-sized array, the attention
probabilities, and no dropout mask: the mask is drawn again from
``dropout_rng`` in the backward, with the same ``jax.random.bernoulli`` call.
With ``recompute_block=B`` it keeps no score-sized array at all: the backward
recomputes the scores ``B`` keys at a time from q, k and the per-row max and
sum of the softmax (flash-attention style, in pure JAX), for long sequences.

Kept arrays carry ``jax.ad_checkpoint.checkpoint_name`` names (`NAMES`) that
`fewbit_jax.checkpoint_policy` keeps.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import fewbit_jax as fb
  >>> s = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
  >>> bool(jnp.all(fb.softmax(s) == jax.nn.softmax(s)))
  True
  >>> q = k = v = jnp.ones((2, 5, 3, 4))       # [batch, length, heads, depth]
  >>> jax.jit(fb.dot_product_attention)(q, k, v).shape
  (2, 5, 3, 4)
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax import custom_derivatives
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from fewbit_jax._dropout import key_after
from fewbit_jax.norms import linearizing as _linearizing

__all__ = ["softmax", "dot_product_attention", "SOFTMAX_NAME", "PROBS_NAME", "STATS_NAME",
           "OUTPUT_NAME", "NAMES"]

# checkpoint_name names of the kept arrays.
SOFTMAX_NAME = "softmax_output"        # fb.softmax's output
PROBS_NAME = "attention_probs"         # attention probabilities (before dropout)
STATS_NAME = "attention_stats"         # per-row max and sum (recompute_block)
OUTPUT_NAME = "attention_output"       # the attention output (recompute_block)
NAMES = (SOFTMAX_NAME, PROBS_NAME, STATS_NAME, OUTPUT_NAME)

# jax.nn.softmax as jax defines it (patch_activations(softmax=True) rebinds
# the jax.nn attribute, and the lean softmax must still reach the original).
_JAX_SOFTMAX = jax.nn.softmax


# --------------------------------------------------------------------------
# softmax


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax(x, axis, where):
  return _JAX_SOFTMAX(x, axis, where)


@_softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
  (x, where), (x_dot, _) = primals, tangents
  # jax's tangent, written with the output y only: reverse mode keeps y
  # (and the mask) where autodiff of jax.nn.softmax keeps the exponentials
  # (and two masks) and the matmul that follows keeps y as well. Masked
  # positions get 0 through the where of the sum, even in a row that is NaN.
  y = checkpoint_name(_softmax(x, axis, where), SOFTMAX_NAME)
  return y, y * (x_dot - jnp.sum(y * x_dot, axis, where=where, keepdims=True))


def softmax(x, axis: int | tuple[int, ...] | None = -1, where=None):
  """``jax.nn.softmax`` whose derivative keeps only the output, named.

  The forward is ``jax.nn.softmax``'s (bitwise, masked and fully masked rows
  included: those are 0). The derivative is jax's, ``y * (t - sum(t * y,
  axis, where))``: reverse mode keeps only ``y``, named ``'softmax_output'``
  (kept by `fewbit_jax.checkpoint_policy`). Autodiff of ``jax.nn.softmax``
  keeps its exponentials, and the matmul of attention keeps ``y`` too:
  ``softmax(s) @ v`` keeps one score-sized array here, two there. The one
  program shape measured to keep more is a softmax of the step's own
  argument whose output meets that argument elementwise (``sum(softmax(s) *
  s)`` with ``s`` the argument), where XLA recomputes autodiff's
  exponentials from ``s`` and keeps nothing while this keeps ``y``
  (tests/test_attention.py lists the programs). Masked entries get a zero
  gradient, as there, even in a row that is NaN. Forward mode works.
  Non-float inputs go to ``jax.nn.softmax``.

  Args:
    x: input array.
    axis: the axis or axes to normalise over (``None``: all), as jax's.
    where: optional boolean mask broadcastable to ``x``: elements to include;
      the output is 0 elsewhere.

  Returns:
    ``jax.nn.softmax(x, axis, where)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import fewbit_jax as fb
    >>> x = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]])
    >>> m = jnp.array([True, True, False])
    >>> bool(jnp.all(fb.softmax(x, where=m) == jax.nn.softmax(x, where=m)))
    True
    >>> f = lambda s: lambda x: (s(x, where=m) * x).sum()
    >>> bool(jnp.allclose(jax.grad(f(fb.softmax))(x), jax.grad(f(jax.nn.softmax))(x)))
    True
  """
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    return _JAX_SOFTMAX(x, axis, where)
  if isinstance(axis, list):
    axis = tuple(axis)
  return _softmax(x, axis, where)


# --------------------------------------------------------------------------
# dot-product attention: flax's forward operations, one step each.


def _einsum(precision, dot_general):
  return functools.partial(jnp.einsum, precision=precision,
                           _dot_general=dot_general or lax.dot_general)


def _logits(cfg, query, key, bias, mask):
  """Scores as flax computes them: scaled q.k, + bias, masked to the dtype's min."""
  dtype = query.dtype
  query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
  w = cfg.einsum("...qhd,...khd->...hqk", query, key)
  if bias is not None:
    w = w + bias
  if mask is not None:
    w = jnp.where(mask, w, jnp.finfo(dtype).min)
  return w


def _softmax_input(cfg, w):
  return w.astype(jnp.float32) if cfg.fp32 else w


def _probs(cfg, w):
  """flax's softmax step: ``(p, max, sum)`` with jax.nn.softmax's operations."""
  x = _softmax_input(cfg, w)
  x_max = jnp.max(x, -1, initial=-jnp.inf, keepdims=True)
  unnormalized = jnp.exp(x - x_max)
  total = jnp.sum(unnormalized, -1, keepdims=True)
  p = unnormalized / total
  return (p if cfg.fp32 else p.astype(cfg.dtype)), x_max, total


def _multiplier(cfg, rng, shape):
  """flax's dropout multiplier ``keep / keep_prob`` from `rng` (None: no dropout)."""
  if not cfg.dropout:
    return None
  keep = jax.random.bernoulli(rng, cfg.keep_prob, shape)
  return keep.astype(cfg.dtype) / jnp.asarray(cfg.keep_prob, dtype=cfg.dtype)


def _dropout_shape(cfg, scores_shape, key_ndim):
  if cfg.broadcast_dropout:
    return (1,) * (key_ndim - 2) + tuple(scores_shape[-2:])
  return tuple(scores_shape)


def _scores_shape(query, key):
  return query.shape[:-3] + (query.shape[-2], query.shape[-3], key.shape[-3])


def _combine(cfg, pd, value):
  return cfg.einsum("...hqk,...khd->...qhd", pd, value)


class _Config:
  """The static settings of one attention call (hashable by identity)."""

  def __init__(self, **kw):
    self.__dict__.update(kw)


def _softmax_vjp(cfg, p, dp, w_dtype):
  """Cotangent of the softmax input from its output `p` and output cotangent."""
  ds = p * (dp - jnp.sum(dp * p, -1, keepdims=True))
  return ds.astype(w_dtype)


def _attention_core(cfg):
  """flax's attention with lean derivatives for the settings `cfg` (q, k, v, bias, mask, rng)."""

  def forward(q, k, v, bias, mask, rng):
    w = _logits(cfg, q, k, bias, mask)
    p, x_max, total = _probs(cfg, w)
    mult = _multiplier(cfg, rng, _dropout_shape(cfg, w.shape, k.ndim))
    return p, (x_max, total), _combine(cfg, p if mult is None else p * mult, v)

  def outputs(q, k, v, bias, mask, rng):
    p, _, out = forward(q, k, v, bias, mask, rng)
    return (out, p) if cfg.sow else out

  def core_fwd(q, k, v, bias, mask, rng):
    p, stats, out = forward(q, k, v, bias, mask, rng)
    bias_kept = bias
    if cfg.block is None:
      p = checkpoint_name(p, PROBS_NAME)
      stats = bias_kept = None  # only the bias's shape is needed: the add is linear
    else:
      stats = checkpoint_name(stats, STATS_NAME)
      out = checkpoint_name(out, OUTPUT_NAME)
    kept = (p if cfg.block is None else None, stats, out if cfg.block else None)
    res = (q, k, v, bias_kept, mask, rng) + kept
    return ((out, p) if cfg.sow else out), res

  def core_bwd(res, g):
    q, k, v, bias, mask, rng, p, stats, out = res
    gp = None
    if cfg.sow:
      g, gp = g
    if cfg.bias_aval is not None and bias is None:
      bias = jnp.zeros(*cfg.bias_aval)
    if cfg.block is None:
      dq, dk, dv, dbias = _bwd_probs(cfg, q, k, v, bias, mask, rng, p, g, gp)
    else:
      dq, dk, dv, dbias = _bwd_blocks(cfg, q, k, v, bias, mask, rng, stats, out, g)
    return dq, dk, dv, dbias

  @jax.custom_jvp
  def core(q, k, v, bias, mask, rng):
    return outputs(q, k, v, bias, mask, rng)

  def core_jvp(primals, tangents):
    # Forward mode: autodiff's tangent of flax's operations. Reverse mode,
    # where JAX linearizes for it: a linear_call of that tangent whose
    # transpose is the lean backward (`core_bwd`, keeping the probabilities
    # or, with blocks, none); under an outer derivative or vmap the tangent
    # checkpointed over the inputs (it recomputes the scores).
    q, k, v, bias, mask, rng = primals
    diff = (q, k, v, bias)
    zero = lambda t, p: None if p is None else (
        jnp.zeros(jnp.shape(p), jnp.result_type(p)) if isinstance(t, SymbolicZero) else t)
    if _linearizing(primals, tangents[:4]):
      live = [t is not None and not isinstance(t, SymbolicZero) for t in tangents[:4]]
      y, res = core_fwd(q, k, v, bias, mask, rng)

      def lin_tangent(res, lin):
        it = iter(lin)
        ts = [next(it) if keep else zero(t, p) for keep, t, p in zip(live, tangents[:4], diff)]
        q, k, v, bias_kept, mask, rng, p, stats, _ = res
        if bias_kept is None and cfg.bias_aval is not None:
          bias_kept = jnp.zeros(*cfg.bias_aval)  # kept p: only the bias's shape matters
        return _tangent_from(cfg, q, k, v, bias_kept, mask, rng, p, stats, *ts)

      def transpose(res, ct):
        return [g for keep, g in zip(live, core_bwd(res, ct)) if keep]

      lin = [t for keep, t in zip(live, tangents[:4]) if keep]
      return y, custom_derivatives.linear_call(lin_tangent, transpose, res, lin)
    ts = [zero(t, p) for t, p in zip(tangents[:4], diff)]
    y, res = core_fwd(q, k, v, bias, mask, rng)
    return y, jax.checkpoint(functools.partial(_tangent_from, cfg))(
        q, k, v, bias, mask, rng, res[6], res[7], *ts)

  core.defjvp(core_jvp, symbolic_zeros=True)
  return core


def _tangent_from(cfg, q, k, v, bias, mask, rng, p, stats, dq, dk, dv, dbias):
  """The attention's tangent from its kept probabilities `p` (or, with blocks, `stats`).

  Linear in (dq, dk, dv, dbias): checkpointed, reverse mode keeps what the
  lean backward keeps (named) and transposes this; the dropout mask is drawn
  again from `rng`.
  """
  w, dw = jax.jvp(lambda q, k, b: _logits(cfg, q, k, b, mask), (q, k, bias), (dq, dk, dbias))
  if p is None:  # recompute_block: the probabilities from the per-row max and sum
    x_max, total = stats
    p = jnp.exp(_softmax_input(cfg, w).astype(x_max.dtype) - x_max) / total
    p = p.astype(jnp.float32 if cfg.fp32 else cfg.dtype)
  dw = _softmax_input(cfg, dw).astype(p.dtype)
  dp = p * (dw - jnp.sum(p * dw, -1, keepdims=True))
  mult = _multiplier(cfg, rng, _dropout_shape(cfg, p.shape, k.ndim))
  pd, dpd = (p, dp) if mult is None else (p * mult, dp * mult)
  dout = _combine(cfg, dpd, v) + _combine(cfg, pd, dv)
  return (dout, dp) if cfg.sow else dout


def _bwd_probs(cfg, q, k, v, bias, mask, rng, p, g, gp):
  """The backward from the kept probabilities; the dropout mask is drawn again."""
  mult = _multiplier(cfg, None if rng is None else key_after(rng, g), _dropout_shape(cfg, p.shape, k.ndim))
  _, combine_vjp = jax.vjp(functools.partial(_combine, cfg),
                           p if mult is None else p * mult, v)
  dpd, dv = combine_vjp(g)
  dp = dpd if mult is None else dpd * mult
  if gp is not None:
    dp = dp + gp
  w, logits_vjp = jax.vjp(lambda q, k, b: _logits(cfg, q, k, b, mask), q, k, bias)
  dq, dk, dbias = logits_vjp(_softmax_vjp(cfg, p, dp.astype(p.dtype), w.dtype))
  return dq, dk, dv, dbias


def _key_slice(x, start, size, length):
  """`x`'s block of keys [start, start+size) if its last axis spans all keys."""
  if x is None or x.ndim == 0 or x.shape[-1] != length:
    return x
  return lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 1)


def _bwd_blocks(cfg, q, k, v, bias, mask, rng, stats, out, g):
  """The backward recomputing the scores `cfg.block` keys at a time."""
  x_max, total = stats
  length, size = k.shape[-3], cfg.block
  # The softmax backward runs in float32 (at least): delta is a difference.
  sdtype = jnp.promote_types(x_max.dtype, jnp.float32)
  x_max, total = x_max.astype(sdtype), total.astype(sdtype)
  # sum_k p * dp = g . out (per query and head), as in flash attention.
  delta = jnp.sum(g.astype(sdtype) * out.astype(sdtype), -1)        # [..., q, h]
  delta = jnp.swapaxes(delta, -1, -2)[..., None]                      # [..., h, q, 1]
  mult = _multiplier(cfg, None if rng is None else key_after(rng, g),
                     _dropout_shape(cfg, _scores_shape(q, k), k.ndim))
  bias_blocked = bias is not None and bias.ndim > 0 and bias.shape[-1] == length

  def body(j, carry):
    dq, dk, dv, dbias = carry
    start = j * size
    k_j = lax.dynamic_slice_in_dim(k, start, size, axis=k.ndim - 3)
    v_j = lax.dynamic_slice_in_dim(v, start, size, axis=v.ndim - 3)
    mask_j = _key_slice(mask, start, size, length)
    w, logits_vjp = jax.vjp(lambda q, k, b: _logits(cfg, q, k, b, mask_j),
                            q, k_j, _key_slice(bias, start, size, length))
    p32 = jnp.exp(_softmax_input(cfg, w).astype(sdtype) - x_max) / total
    p = p32.astype(jnp.float32 if cfg.fp32 else cfg.dtype)
    mult_j = _key_slice(mult, start, size, length)
    _, combine_vjp = jax.vjp(functools.partial(_combine, cfg),
                             p if mult_j is None else p * mult_j, v_j)
    dpd, dv_j = combine_vjp(g)
    dp = (dpd if mult_j is None else dpd * mult_j).astype(sdtype)
    ds = (p32 * (dp - delta)).astype(w.dtype)
    dq_j, dk_j, dbias_j = logits_vjp(ds)
    dk = lax.dynamic_update_slice_in_dim(dk, dk_j, start, axis=k.ndim - 3)
    dv = lax.dynamic_update_slice_in_dim(dv, dv_j, start, axis=v.ndim - 3)
    if dbias is not None:
      dbias = (lax.dynamic_update_slice_in_dim(dbias, dbias_j, start, axis=dbias.ndim - 1)
               if bias_blocked else dbias + dbias_j.astype(dbias.dtype))
    return dq + dq_j.astype(dq.dtype), dk, dv, dbias

  # dq (and a bias broadcast over the keys) sum over blocks: in float32.
  acc = lambda x, blocked=False: None if x is None else jnp.zeros_like(
      x, dtype=x.dtype if blocked else jnp.promote_types(x.dtype, jnp.float32))
  init = (acc(q), acc(k, True), acc(v, True), acc(bias, bias_blocked))
  dq, dk, dv, dbias = lax.fori_loop(0, length // size, body, init)
  return dq.astype(q.dtype), dk, dv, None if bias is None else dbias.astype(bias.dtype)


def _check_shapes(query, key, value):
  shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
  if not query.ndim == key.ndim == value.ndim or query.ndim < 3:
    raise ValueError(f"query, key and value must have the same rank, at least 3 "
                     f"([batch..., length, heads, depth]); got {shapes}.")
  if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
    raise ValueError(f"query, key and value batch dims must match; got {shapes}.")
  if not query.shape[-2] == key.shape[-2] == value.shape[-2]:
    raise ValueError(
        f"query, key and value must have the same number of heads; got {shapes}. Grouped-"
        f"query attention (fewer key/value heads) is not supported: repeat the key and value "
        f"heads, or use flax.nnx.dot_product_attention.")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"query and key depths must match; got {shapes}.")
  if key.shape[-3] != value.shape[-3]:
    raise ValueError(f"key and value lengths must match; got {shapes}.")


def _sow(module, weights) -> None:
  from flax import nnx
  if isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, "attention_weights", weights)
  else:
    module.sow("intermediates", "attention_weights", weights)


def dot_product_attention(
    query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
    dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False, dtype=None,
    precision=None, module=None, force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., Any] | None = None,
    qk_attn_weights_einsum: Callable[..., Any] | None = None,
    attn_weights_value_einsum: Callable[..., Any] | None = None, *,
    promote_dtype: Callable[..., Any] | None = None, is_causal: bool = False,
    recompute_block: int | None = None):
  """``flax.linen.dot_product_attention`` keeping one score-sized array, or none.

  The arguments of ``flax.linen.dot_product_attention``, then those that
  ``flax.nnx.dot_product_attention`` adds (``promote_dtype``, ``is_causal``),
  so it serves as the ``attention_fn`` of ``nn.MultiHeadDotProductAttention``
  and of ``nnx.MultiHeadAttention``. The forward runs flax's operations
  (scaled ``q.k`` einsum, bias, mask to the dtype's min, ``jax.nn.softmax``,
  dropout with ``jax.random.bernoulli(dropout_rng, 1 - dropout_rate, ...)``,
  einsum with v), so its output is linen's bitwise, and nnx's when dropout or
  ``module`` is on (with neither, nnx calls ``jax.nn.dot_product_attention``,
  which scales the scores instead of q: equal up to rounding). Gradients
  equal flax's up to rounding; the backward keeps the attention
  probabilities (named ``'attention_probs'``) and draws the dropout mask
  again from ``dropout_rng``. Forward mode (``jax.jvp``, ``jax.jacfwd``,
  ``jax.linearize``) and derivatives of derivatives work, as flax's.

  Args:
    query: ``[batch..., q_length, num_heads, depth]``.
    key: ``[batch..., kv_length, num_heads, depth]``.
    value: ``[batch..., kv_length, num_heads, v_depth]``.
    bias: added to the scores, broadcastable to ``[batch..., num_heads,
      q_length, kv_length]``; differentiable.
    mask: scores where it is False (0) are masked; broadcastable as bias.
    broadcast_dropout: one dropout mask for all batch dims and heads.
    dropout_rng: the dropout key (needed when dropout is on).
    dropout_rate: the probability of dropping an attention weight.
    deterministic: no dropout when True.
    dtype: the computation dtype (default: promoted from the inputs).
    precision: ``jax.lax.Precision`` of the einsums.
    module: a linen or nnx module to sow the attention weights into
      (``'intermediates'`` / ``nnx.Intermediate``, ``'attention_weights'``).
    force_fp32_for_softmax: compute the softmax in float32 (and the rest of
      the attention with those weights, as linen does).
    einsum_dot_general: the ``dot_general`` of the einsums.
    qk_attn_weights_einsum, attn_weights_value_einsum: not supported (a
      module-made einsum cannot be differentiated by hand); must be None.
    promote_dtype: nnx's ``promote_dtype((q, k, v), dtype=)`` (default:
      flax's promotion).
    is_causal: also mask keys after each query, as nnx does.
    recompute_block: None keeps the probabilities. An int ``B`` dividing
      kv_length keeps none: the backward recomputes the scores ``B`` keys at
      a time from q, k and the per-row max and sum of the softmax (named
      ``'attention_stats'``), with the output (``'attention_output'``), for
      long sequences; it draws the full dropout mask (booleans) once.

  Returns:
    ``[batch..., q_length, num_heads, v_depth]``.

  Raises:
    ValueError: mismatched shapes, grouped-query attention, dropout without
      a ``dropout_rng``, a ``recompute_block`` that does not divide
      kv_length or is combined with ``module`` or ``einsum_dot_general``.
    NotImplementedError: ``qk_attn_weights_einsum``/``attn_weights_value_einsum``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 10, 4, 8))
    >>> kw = dict(mask=jnp.arange(10) < 7, dropout_rng=jax.random.key(1), dropout_rate=0.1)
    >>> lean = jax.jit(lambda q: fb.dot_product_attention(q, k, v, **kw).sum())
    >>> vanilla = jax.jit(lambda q: nn.dot_product_attention(q, k, v, **kw).sum())
    >>> bool(lean(q) == vanilla(q))
    True
    >>> blocks = lambda q: fb.dot_product_attention(q, k, v, **kw, recompute_block=5).sum()
    >>> g = jax.jit(jax.grad(blocks))(q)       # keeps no [.., 10, 10] array
    >>> bool(jnp.allclose(g, jax.jit(jax.grad(vanilla))(q), atol=1e-5))
    True
    >>> layer = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=fb.dot_product_attention)
  """
  if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
    raise NotImplementedError(
        "fb.dot_product_attention does not take qk_attn_weights_einsum / "
        "attn_weights_value_einsum (its backward is written for jnp.einsum): pass "
        "einsum_dot_general instead, or use flax.linen.dot_product_attention.")
  if promote_dtype is None:
    from flax.linen.dtypes import promote_dtype as linen_promote
    query, key, value = linen_promote(query, key, value, dtype=dtype)
  else:
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
  _check_shapes(query, key, value)
  dropout = not deterministic and dropout_rate > 0.0
  if dropout and dropout_rng is None:
    raise ValueError(f"dropout_rate={dropout_rate} with deterministic=False needs a "
                     "dropout_rng (a jax.random key); pass one, or deterministic=True.")
  if recompute_block is not None:
    length = key.shape[-3]
    block = None
    if not isinstance(recompute_block, (bool, np.bool_)):
      try:  # any integer: Python's, numpy's (np.int64), a 0-d integer array
        block = operator.index(recompute_block)
      except TypeError:
        pass
    if block is None or block <= 0 or length % block:
      raise ValueError(f"recompute_block must be a positive integer dividing kv_length "
                       f"{length}; got {recompute_block!r}.")
    recompute_block = block
    if module is not None or einsum_dot_general is not None:
      raise ValueError(
          "recompute_block keeps no attention weights, but module= sows them (all of them) "
          "and einsum_dot_general may not be the plain product the blocked backward assumes: "
          "use recompute_block=None with these.")
  if is_causal:
    t, s = query.shape[-3], key.shape[-3]
    causal = jnp.tril(jnp.ones((t, s), bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  dtype = query.dtype
  fp32 = bool(force_fp32_for_softmax) and dtype != jnp.float32
  bias = None if bias is None else jnp.asarray(bias)
  mask = None if mask is None else jnp.asarray(mask)
  cfg = _Config(
      einsum=_einsum(precision, einsum_dot_general), dtype=dtype, fp32=fp32,
      dropout=dropout, keep_prob=1.0 - dropout_rate, broadcast_dropout=broadcast_dropout,
      sow=module is not None, block=recompute_block,
      bias_aval=None if bias is None else (bias.shape, bias.dtype))
  result = _attention_core(cfg)(query, key, value, bias, mask,
                                dropout_rng if dropout else None)
  if module is None:
    return result
  out, weights = result
  _sow(module, weights)
  return out
