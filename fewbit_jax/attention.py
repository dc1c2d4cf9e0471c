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
For decoders it takes grouped-query key/value heads (never repeated),
``is_causal`` and ``local_window_size`` masks made from iota inside the
computation (never kept), a boolean mask kept at its own shape and a logit
``soft_cap``; with those, ``recompute_block`` also runs the forward in tiles
and skips the tiles the masks cover wholly (`tile_fraction`).

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

__all__ = ["softmax", "dot_product_attention", "tile_fraction", "SOFTMAX_NAME", "PROBS_NAME",
           "STATS_NAME", "OUTPUT_NAME", "NAMES"]

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


def _positions(cfg, t, s, q_start, k_start):
  """The causal / local-window mask of a [t, s] tile at (q_start, k_start), from iota.

  Generated inside the computation (XLA fuses it into the select), so no
  mask of the scores' size is ever kept; None without is_causal/window.
  """
  if not cfg.causal and cfg.window is None:
    return None
  qpos = lax.broadcasted_iota(jnp.int32, (t, s), 0) + q_start
  kpos = lax.broadcasted_iota(jnp.int32, (t, s), 1) + k_start
  keep = None
  if cfg.causal:
    keep = kpos <= qpos
  if cfg.window is not None:
    left, right = cfg.window
    near = jnp.logical_and(qpos <= kpos + left, qpos >= kpos - right)
    keep = near if keep is None else jnp.logical_and(keep, near)
  return keep


def _qk(cfg, query, key):
  """Scaled-query scores ``[..., heads, q, k]``; grouped-query heads grouped, not repeated."""
  if cfg.groups == 1:
    return cfg.einsum("...qhd,...khd->...hqk", query, key)
  *batch, t, n, d = query.shape
  kv = key.shape[-2]
  grouped = query.reshape(*batch, t, kv, n // kv, d)
  w = cfg.einsum("...qkgd,...skd->...kgqs", grouped, key)
  return w.reshape(*batch, n, t, key.shape[-3])


def _logits(cfg, query, key, bias, mask, q_start=0, k_start=0):
  """Scores as flax computes them: scaled q.k, + bias, masked to the dtype's min.

  With ``soft_cap`` the q.k scores become ``soft_cap * tanh(s / soft_cap)``
  first (Gemma 2); is_causal / local_window_size masks come from iota for
  the tile at (`q_start`, `k_start`).
  """
  dtype = query.dtype
  query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
  w = _qk(cfg, query, key)
  if cfg.soft_cap is not None:
    cap = jnp.asarray(cfg.soft_cap, w.dtype)
    w = jnp.tanh(w / cap) * cap
  if bias is not None:
    w = w + bias
  pos = _positions(cfg, w.shape[-2], w.shape[-1], q_start, k_start)
  if pos is not None:
    mask = pos if mask is None else jnp.logical_and(mask, pos)
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
  if cfg.groups == 1:
    return cfg.einsum("...hqk,...khd->...qhd", pd, value)
  *batch, n, t, s = pd.shape
  kv = value.shape[-2]
  out = cfg.einsum("...kgqs,...skd->...qkgd", pd.reshape(*batch, kv, n // kv, t, s), value)
  return out.reshape(*batch, t, n, value.shape[-1])


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
    if cfg.tiled:  # no score-sized array: the output and row statistics in tiles
      mult = _multiplier(cfg, rng, _dropout_shape(cfg, _scores_shape(q, k), k.ndim))
      out, x_max, total = _forward_tiles(cfg, q, k, v, bias, mask, mult)
      return None, (x_max, total), out
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


def _live_tiles(cfg, t, s):
  """The (query block, key block) tiles of a [t, s] score matrix not wholly masked.

  Static: only is_causal and local_window_size (known when tracing) rule a
  tile out; a boolean mask is data and masks inside the tiles. Returns two
  int32 numpy arrays, ordered by query block then key block.
  """
  bq, bk = cfg.q_block, cfg.block
  lo, hi = -np.inf, np.inf                    # allowed key - query offsets
  if cfg.window is not None:
    lo, hi = -cfg.window[0], cfg.window[1]
  if cfg.causal:
    hi = min(hi, 0)
  tiles = [(i, j) for i in range(t // bq) for j in range(s // bk)
           if j * bk - (i * bq + bq - 1) <= hi and (j * bk + bk - 1) - i * bq >= lo]
  return (np.array([i for i, _ in tiles], np.int32).reshape(-1),
          np.array([j for _, j in tiles], np.int32).reshape(-1))


def tile_fraction(t: int, s: int, block: int, *, is_causal: bool = False,
                  local_window_size: int | tuple[int, int] | None = None) -> float:
  """The fraction of the ``t x s`` scores' tiles that ``recompute_block=block`` computes.

  With ``is_causal`` / ``local_window_size`` the blocked attention skips
  the ``block x block`` tiles that the mask covers wholly, so its score
  flops (forward and backward) are this fraction of the full computation's.

  Example:
    >>> import fewbit_jax as fb
    >>> fb.attention.tile_fraction(1024, 1024, 128, is_causal=True)  # (8 + 1) / (2 * 8)
    0.5625
    >>> fb.attention.tile_fraction(1024, 1024, 128, local_window_size=(256, 0))
    0.328125
  """
  window = _window(local_window_size)
  cfg = _Config(causal=is_causal, window=window, block=block,
                q_block=_query_block(t, block, is_causal or window is not None))
  return len(_live_tiles(cfg, t, s)[0]) / ((t // cfg.q_block) * (s // block))


def _query_block(t, block, skips):
  """Queries per tile: `block` where masks can skip tiles and it divides `t`, else all."""
  return block if skips and t % block == 0 else t


def _tile(x, qs, bq, t, ks, bk, s):
  """`x`'s tile [qs:qs+bq, ks:ks+bk] over its last two axes where they span queries / keys."""
  if x is None or x.ndim == 0:
    return x
  if x.shape[-1] == s:
    x = lax.dynamic_slice_in_dim(x, ks, bk, axis=x.ndim - 1)
  if x.ndim >= 2 and x.shape[-2] == t:
    x = lax.dynamic_slice_in_dim(x, qs, bq, axis=x.ndim - 2)
  return x


def _tile_add(acc, x, qs, t, ks, s):
  """`acc` with `x` added at its tile (the axes `_tile` slices)."""
  start = [0] * acc.ndim
  if acc.shape[-1] == s:
    start[-1] = ks
  if acc.ndim >= 2 and acc.shape[-2] == t:
    start[-2] = qs
  old = lax.dynamic_slice(acc, start, x.shape)
  return lax.dynamic_update_slice(acc, old + x.astype(acc.dtype), start)


def _rows_add(acc, x, start, axis):
  old = lax.dynamic_slice_in_dim(acc, start, x.shape[axis], axis)
  return lax.dynamic_update_slice_in_dim(acc, old + x.astype(acc.dtype), start, axis)


def _forward_tiles(cfg, q, k, v, bias, mask, mult):
  """Output and per-row (max, sum) in tiles, online softmax (flash attention's forward).

  Holds no score-sized array: one tile of scores at a time, the tiles that
  is_causal / local_window_size mask wholly skipped.
  """
  t, s = q.shape[-3], k.shape[-3]
  bq, bk = cfg.q_block, cfg.block
  ti, tj = _live_tiles(cfg, t, s)
  sdtype = jnp.promote_types(jnp.float32 if cfg.fp32 else q.dtype, jnp.float32)
  # The carries made from q keep its sharding (an Explicit mesh's types).
  rows = jnp.zeros_like(jnp.swapaxes(q[..., :1], -2, -3), sdtype)    # [..., h, q, 1]
  init = (rows - jnp.inf, rows,
          jnp.zeros_like(q[..., :1], sdtype) + jnp.zeros((v.shape[-1],), sdtype))

  def body(n, carry):
    x_max, total, acc = carry
    qs, ks = jnp.asarray(ti)[n] * bq, jnp.asarray(tj)[n] * bk
    q_i = lax.dynamic_slice_in_dim(q, qs, bq, axis=q.ndim - 3)
    k_j = lax.dynamic_slice_in_dim(k, ks, bk, axis=k.ndim - 3)
    v_j = lax.dynamic_slice_in_dim(v, ks, bk, axis=v.ndim - 3)
    w = _logits(cfg, q_i, k_j, _tile(bias, qs, bq, t, ks, bk, s),
                _tile(mask, qs, bq, t, ks, bk, s), qs, ks)
    x = _softmax_input(cfg, w).astype(sdtype)
    m_old = lax.dynamic_slice_in_dim(x_max, qs, bq, axis=x_max.ndim - 2)
    l_old = lax.dynamic_slice_in_dim(total, qs, bq, axis=total.ndim - 2)
    m_new = jnp.maximum(m_old, jnp.max(x, -1, keepdims=True))
    scale = jnp.exp(m_old - m_new)
    e = jnp.exp(x - m_new)
    l_new = l_old * scale + jnp.sum(e, -1, keepdims=True)
    mult_ij = _tile(mult, qs, bq, t, ks, bk, s)
    pe = e.astype(jnp.float32 if cfg.fp32 else cfg.dtype)
    pv = _combine(cfg, pe if mult_ij is None else pe * mult_ij, v_j).astype(sdtype)
    acc_i = lax.dynamic_slice_in_dim(acc, qs, bq, axis=acc.ndim - 3)
    acc_i = acc_i * jnp.swapaxes(scale, -2, -3) + pv
    return (lax.dynamic_update_slice_in_dim(x_max, m_new, qs, axis=x_max.ndim - 2),
            lax.dynamic_update_slice_in_dim(total, l_new, qs, axis=total.ndim - 2),
            lax.dynamic_update_slice_in_dim(acc, acc_i, qs, axis=acc.ndim - 3))

  x_max, total, acc = lax.fori_loop(0, len(ti), body, init)
  # A row with every key masked (or no tile at all) is flax's: all scores
  # the dtype's min, so the softmax is uniform over all the keys.
  floor, dead = _dead_rows(cfg, x_max)
  x_max = jnp.where(dead, floor, x_max)
  total = jnp.where(dead, jnp.asarray(s, sdtype), total)
  odtype = jnp.float32 if cfg.fp32 else cfg.dtype          # flax's: float32 probabilities
  out = (acc / jnp.swapaxes(total, -2, -3)).astype(odtype)
  out = jnp.where(jnp.swapaxes(dead, -2, -3), _uniform_rows(cfg, q, v, mult), out)
  return out, x_max, total


def _dead_rows(cfg, x_max):
  """(the masked score, rows whose max is it: every key masked) from the row maxima."""
  floor = jnp.asarray(jnp.finfo(cfg.dtype).min, x_max.dtype)
  return floor, x_max <= floor


def _uniform_probs(cfg, q, v, mult):
  """flax's probabilities of a fully masked row, 1/S (times the dropout multiplier)."""
  s = v.shape[-3]
  pdtype = jnp.float32 if cfg.fp32 else cfg.dtype
  shape = q.shape[:-3] + (q.shape[-2], 1, s)
  p = jnp.full(shape, 1.0 / s, pdtype)
  return p if mult is None else p * mult


def _uniform_rows(cfg, q, v, mult):
  """The output of fully masked rows ``[..., q or 1, heads, v_depth]``."""
  p = _uniform_probs(cfg, q, v, mult)
  if mult is None:
    p = p.astype(jnp.promote_types(p.dtype, v.dtype))
  return _combine(cfg, p, v)


def _bwd_blocks(cfg, q, k, v, bias, mask, rng, stats, out, g):
  """The backward recomputing the scores a tile at a time (`cfg.q_block` x `cfg.block`).

  Tiles that is_causal / local_window_size mask wholly are skipped.
  """
  x_max, total = stats
  t, length = q.shape[-3], k.shape[-3]
  bq, bk = cfg.q_block, cfg.block
  ti, tj = _live_tiles(cfg, t, length)
  # The softmax backward runs in float32 (at least): delta is a difference.
  sdtype = jnp.promote_types(x_max.dtype, jnp.float32)
  x_max, total = x_max.astype(sdtype), total.astype(sdtype)
  # sum_k p * dp = g . out (per query and head), as in flash attention.
  mult = _multiplier(cfg, None if rng is None else key_after(rng, g),
                     _dropout_shape(cfg, _scores_shape(q, k), k.ndim))
  # Fully masked rows (uniform over all keys, masked tiles included) go
  # apart: their scores have no gradient, their values the cotangent / S.
  # (Only the tiled forward makes them: flax's forward has every tile.)
  if cfg.tiled:
    _, dead = _dead_rows(cfg, x_max)
    dead_rows = jnp.swapaxes(dead, -2, -3)                            # [..., q, h, 1]
    g_dead = jnp.where(dead_rows, g, jnp.zeros((), g.dtype))
    g = jnp.where(dead_rows, jnp.zeros((), g.dtype), g)
  delta = jnp.sum(g.astype(sdtype) * out.astype(sdtype), -1)        # [..., q, h]
  delta = jnp.swapaxes(delta, -1, -2)[..., None]                      # [..., h, q, 1]

  def body(n, carry):
    dq, dk, dv, dbias = carry
    qs, ks = jnp.asarray(ti)[n] * bq, jnp.asarray(tj)[n] * bk
    q_i = lax.dynamic_slice_in_dim(q, qs, bq, axis=q.ndim - 3)
    k_j = lax.dynamic_slice_in_dim(k, ks, bk, axis=k.ndim - 3)
    v_j = lax.dynamic_slice_in_dim(v, ks, bk, axis=v.ndim - 3)
    g_i = lax.dynamic_slice_in_dim(g, qs, bq, axis=g.ndim - 3)
    rows = lambda x: lax.dynamic_slice_in_dim(x, qs, bq, axis=x.ndim - 2)
    mask_ij = _tile(mask, qs, bq, t, ks, bk, length)
    w, logits_vjp = jax.vjp(lambda q, k, b: _logits(cfg, q, k, b, mask_ij, qs, ks),
                            q_i, k_j, _tile(bias, qs, bq, t, ks, bk, length))
    p32 = jnp.exp(_softmax_input(cfg, w).astype(sdtype) - rows(x_max)) / rows(total)
    p = p32.astype(jnp.float32 if cfg.fp32 else cfg.dtype)
    mult_ij = _tile(mult, qs, bq, t, ks, bk, length)
    _, combine_vjp = jax.vjp(functools.partial(_combine, cfg),
                             p if mult_ij is None else p * mult_ij, v_j)
    dpd, dv_j = combine_vjp(g_i)
    dp = (dpd if mult_ij is None else dpd * mult_ij).astype(sdtype)
    ds = (p32 * (dp - rows(delta))).astype(w.dtype)
    dq_i, dk_j, dbias_ij = logits_vjp(ds)
    dq = _rows_add(dq, dq_i, qs, q.ndim - 3)
    dk = _rows_add(dk, dk_j, ks, k.ndim - 3)
    dv = _rows_add(dv, dv_j, ks, v.ndim - 3)
    if dbias is not None:
      dbias = _tile_add(dbias, dbias_ij, qs, t, ks, length)
    return dq, dk, dv, dbias

  # Sums over tiles in float32 (a block written once is exact: 0 + x).
  acc = lambda x: None if x is None else jnp.zeros_like(
      x, dtype=jnp.promote_types(x.dtype, jnp.float32))
  init = (acc(q), acc(k), acc(v), acc(bias))
  dq, dk, dv, dbias = lax.fori_loop(0, len(ti), body, init)
  if cfg.tiled:
    p_dead = _uniform_probs(cfg, q, v, mult)
    _, combine_vjp = jax.vjp(functools.partial(_combine, cfg), p_dead, v)
    if mult is None:  # the same row of probabilities for every query: sum the cotangents
      g_dead = jnp.sum(g_dead, axis=-3, keepdims=True)
    dv = dv + combine_vjp(g_dead.astype(p_dead.dtype))[1].astype(dv.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          None if bias is None else dbias.astype(bias.dtype))


def _check_shapes(query, key, value):
  shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
  if not query.ndim == key.ndim == value.ndim or query.ndim < 3:
    raise ValueError(f"query, key and value must have the same rank, at least 3 "
                     f"([batch..., length, heads, depth]); got {shapes}.")
  if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
    raise ValueError(f"query, key and value batch dims must match; got {shapes}.")
  if key.shape[-2] != value.shape[-2]:
    raise ValueError(f"key and value must have the same number of heads; got {shapes}.")
  if key.shape[-2] == 0 or query.shape[-2] % key.shape[-2]:
    raise ValueError(
        f"the key/value heads ({key.shape[-2]}) must divide the query heads "
        f"({query.shape[-2]}): grouped-query attention gives each key/value head "
        f"query_heads / kv_heads query heads; got {shapes}.")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"query and key depths must match; got {shapes}.")
  if key.shape[-3] != value.shape[-3]:
    raise ValueError(f"key and value lengths must match; got {shapes}.")


def _check_broadcast(name, x, scores_shape):
  """`x` (bias or mask) must broadcast to the scores ``[batch..., heads, q, k]``."""
  if x is None:
    return
  shape = jnp.shape(x)
  ok = len(shape) <= len(scores_shape) and all(
      a in (1, b) for a, b in zip(shape[::-1], scores_shape[::-1]))
  if not ok:
    raise ValueError(
        f"{name} of shape {shape} does not broadcast to the scores' shape {scores_shape} "
        f"([batch..., query_heads, q_length, kv_length]); give it those axes, with 1 "
        f"where it is the same for all (e.g. [batch, 1, q_length, kv_length] or "
        f"[q_length, kv_length]).")


def _window(local_window_size):
  """``(left, right)`` from jax.nn.dot_product_attention's local_window_size, or None."""
  if local_window_size is None:
    return None
  pair = ((local_window_size, local_window_size)
          if not isinstance(local_window_size, (tuple, list)) else tuple(local_window_size))
  try:
    left, right = (operator.index(x) for x in pair)
    if len(pair) != 2 or isinstance(pair[0], bool) or isinstance(pair[1], bool):
      raise TypeError
  except (TypeError, ValueError):
    raise ValueError(f"local_window_size must be an int or a pair (left, right) of ints "
                     f"(a query at i sees keys i - left .. i + right); got "
                     f"{local_window_size!r}.") from None
  if left < 0 or right < 0:
    raise ValueError(f"local_window_size (left, right) must be >= 0 (a query sees keys "
                     f"i - left .. i + right); got {local_window_size!r}.")
  return left, right


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
    recompute_block: int | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    soft_cap: float | None = None):
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

  For decoders, the arguments ``jax.nn.dot_product_attention`` has and one
  more: key/value with fewer heads than the query (grouped-query and
  multi-query attention: ``kv_heads`` divides ``num_heads``, query head
  ``n`` uses key/value head ``n // (num_heads / kv_heads)``, as
  ``jax.nn``'s), computed on the query heads grouped, never on k and v
  repeated; ``is_causal`` and ``local_window_size``, whose masks are
  generated from iota inside the computation, never kept; a ``soft_cap``
  on the scores (Gemma 2). A boolean ``mask`` is kept at its own shape
  (``[batch, 1, q_length, kv_length]``, ``[q_length, kv_length]``, ...),
  never broadcast to the scores'. So the backward keeps the probabilities
  and no mask, or with ``recompute_block`` nothing of the scores' size.

  Args:
    query: ``[batch..., q_length, num_heads, depth]``.
    key: ``[batch..., kv_length, kv_heads, depth]``, ``kv_heads`` dividing
      ``num_heads`` (grouped-query attention; 1: multi-query).
    value: ``[batch..., kv_length, kv_heads, v_depth]``.
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
    is_causal: also mask keys after each query (key ``j > i`` for query
      ``i``), as nnx and ``jax.nn`` do.
    recompute_block: None keeps the probabilities. An int ``B`` dividing
      kv_length keeps none: the backward recomputes the scores in tiles of ``B``
      keys (by ``B`` queries with is_causal / local_window_size where ``B``
      divides q_length, else all of them) from q, k and the per-row max and sum
      of the softmax (named ``'attention_stats'``), with the output
      (``'attention_output'``), for long sequences; it draws the full dropout
      mask (booleans) once. With any of ``is_causal``, ``local_window_size``,
      ``soft_cap`` or fewer key/value heads the forward runs in those tiles too
      (online softmax, as flash attention: no score-sized array at all, equal to
      the untiled forward up to rounding), and the tiles those masks cover
      wholly are skipped in both: `tile_fraction` gives the share of the score
      flops left (causal: ``(n + 1) / 2n`` for ``n`` blocks). Otherwise the
      forward is flax's operations (bitwise), its scores not kept.
    local_window_size: ``(left, right)`` (or one int for both): query ``i``
      sees keys ``i - left`` to ``i + right`` only, as
      ``jax.nn.dot_product_attention``'s; with ``is_causal``, a sliding
      window of ``left`` keys back.
    soft_cap: a positive number: the scaled ``q.k`` scores ``s`` become
      ``soft_cap * tanh(s / soft_cap)`` before bias and mask (Gemma 2's
      ``attn_logits_soft_cap``); None: no cap.

  Returns:
    ``[batch..., q_length, num_heads, v_depth]``.

  Raises:
    ValueError: mismatched shapes (key/value heads not dividing the query
      heads, a mask or bias that does not broadcast to the scores), dropout
      without a ``dropout_rng``, a ``recompute_block`` that does not divide
      kv_length or is combined with ``module`` or ``einsum_dot_general``, a
      ``local_window_size`` or ``soft_cap`` that is not one.
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

    A decoder's attention: 4 query heads sharing 2 key/value heads, causal
    with a sliding window of 3 keys back, a padding mask ``[batch, 1, 1,
    kv_length]``, against ``jax.nn.dot_product_attention``:

    >>> q = jax.random.normal(jax.random.key(2), (2, 8, 4, 16))
    >>> k, v = jax.random.normal(jax.random.key(3), (2, 2, 8, 2, 16))
    >>> pad = (jnp.arange(8) < jnp.array([[8], [6]]))[:, None, None]
    >>> kw = dict(is_causal=True, local_window_size=(3, 0))
    >>> out = jax.jit(lambda q: fb.dot_product_attention(q, k, v, mask=pad, **kw))(q)
    >>> ref = jax.nn.dot_product_attention(q, k, v, mask=pad, implementation="xla", **kw)
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True
    >>> capped = lambda q: fb.dot_product_attention(q, k, v, is_causal=True, soft_cap=30.0,
    ...                                             recompute_block=4).sum()
    >>> jax.jit(jax.grad(capped))(q).shape  # tiles of 4 x 4, 3 of the 4 computed
    (2, 8, 4, 16)
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
  window = _window(local_window_size)
  if soft_cap is not None:
    if isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float, np.number)) or not (
        np.isfinite(soft_cap) and soft_cap > 0):
      raise ValueError(f"soft_cap must be a positive finite number (the scores become "
                       f"soft_cap * tanh(scores / soft_cap)), or None; got {soft_cap!r}.")
    soft_cap = float(soft_cap)
  scores = _scores_shape(query, key)
  _check_broadcast("mask", mask, scores)
  _check_broadcast("bias", bias, scores)
  dtype = query.dtype
  fp32 = bool(force_fp32_for_softmax) and dtype != jnp.float32
  bias = None if bias is None else jnp.asarray(bias)
  mask = None if mask is None else jnp.asarray(mask)
  cfg = _Config(
      einsum=_einsum(precision, einsum_dot_general), dtype=dtype, fp32=fp32,
      dropout=dropout, keep_prob=1.0 - dropout_rate, broadcast_dropout=broadcast_dropout,
      sow=module is not None, block=recompute_block,
      bias_aval=None if bias is None else (bias.shape, bias.dtype),
      groups=query.shape[-2] // key.shape[-2], causal=bool(is_causal), window=window,
      soft_cap=soft_cap,
      q_block=None if recompute_block is None else _query_block(
          query.shape[-3], recompute_block, bool(is_causal) or window is not None),
      tiled=recompute_block is not None and (
          bool(is_causal) or window is not None or soft_cap is not None
          or query.shape[-2] != key.shape[-2]))
  result = _attention_core(cfg)(query, key, value, bias, mask,
                                dropout_rng if dropout else None)
  if module is None:
    return result
  out, weights = result
  _sow(module, weights)
  return out
