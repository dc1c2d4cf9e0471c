"""Fused linear softmax cross-entropy: the loss head without the B x L x V logits.

`linear_softmax_cross_entropy` computes the per-token loss
``optax.softmax_cross_entropy_with_integer_labels(x @ kernel, labels)`` of a
language model's last hidden state ``x`` (..., D) and its output projection
``kernel`` (D, V) (or a tied ``[V, D]`` embedding table), with exact gradients
for ``x`` and ``kernel``, but never holds the logits. The vocabulary is walked
in blocks of ``block_size`` columns (``jax.lax.scan``, the remainder as one
last smaller block, no padding): the forward keeps a running log-sum-exp
(the label's logit is one gathered column per token); the backward recomputes each block's logits, forms
``softmax - onehot`` for that block alone and accumulates ``dx`` and writes
that block of ``dkernel``. Between the two passes only the per-token
log-sum-exp and per-token loss are kept (float32, one number each per token),
beside the inputs themselves.

With ``z = x @ kernel`` (soft-capped, ``z = cap * tanh(z / cap)``, when
``soft_cap`` is given), ``lse = log sum_v exp(z_v)``, label smoothing
``a`` and z-loss weight ``c``, the loss of a token with label ``y`` is

  ``loss = w * (lse - (1 - a) z_y - (a / V) sum_v z_v + c lse^2)``,

``w`` its weight (0 for ignored tokens), and its gradient in the logits
``dz_v = w (p_v (1 + 2 c lse) - (1 - a) [v = y] - a / V)``,
``p = softmax(z)``, times ``1 - (z_v / cap)^2`` under the soft cap.
Products accumulate in float32 whatever the input dtype (bfloat16 inputs
stay bfloat16 in the matmuls).

A reduced loss (``reduction="sum"`` or ``"mean"``) has one number as its
cotangent, so by default (``gradient="forward"``) its gradients are formed
in the forward pass and kept: the tokens are walked in blocks of
``token_block_size`` against the whole (local) vocabulary; each block's
logits give its loss, its ``softmax - target`` (the log-sum-exp of a token
needs all of its row, so blocking the tokens, not the vocabulary, lets one
pass form the exact ``dz``), its rows of ``dx`` and its share of
``dkernel`` (a float32 sum over blocks). The backward only scales the two by
the cotangent. The matmuls are optax's three (the logits, ``dx``,
``dkernel``), where the recompute mode pays a fourth, and the residuals are
the two gradients (``x``'s and the kernel's sizes, named `GRAD_NAME`) and
one float32 loss per token. A block of the vocabulary cannot be finished
before the token's whole row is seen (``dz`` needs ``1 / sum exp``, which
rescales ``dx`` but not ``dkernel``'s sum over tokens), hence the token
blocks; their logits, ``token_block_size x V`` float32, are the transient.

Sharded inputs: on an ``AxisType.Explicit`` mesh the function reads how
``x``'s tokens and ``kernel``'s vocabulary are sharded from their types and
runs each device on its own shard (``jax.shard_map``): a vocabulary-sharded
kernel combines the per-shard log-sum-exps with a max and a sum over the
vocabulary axes (arrays of one number per token), and no array of logits
is ever gathered. Under an ``AxisType.Auto`` mesh (or none) the blocked
computation is plain JAX and XLA partitions it (batch-sharded inputs stay
sharded; a vocabulary-sharded kernel is gathered, kernel-sized, never the
logits); pass ``vocab_axis`` (and ``token_axis``) to run it per shard there
as well.

Forward-mode differentiation (``jax.jvp``, ``jax.hessian``) raises JAX's
TypeError for a ``custom_vjp``; a grad of a grad works (the backward is
differentiable JAX) and is exact.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> import fewbit_jax as fb
  >>> x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  >>> kernel = jax.random.normal(jax.random.key(1), (16, 100)) / 4
  >>> labels = jax.random.randint(jax.random.key(2), (2, 8), 0, 100)
  >>> loss = fb.linear_softmax_cross_entropy(x, kernel, labels, block_size=32)
  >>> ref = optax.softmax_cross_entropy_with_integer_labels(x @ kernel, labels)
  >>> bool(jnp.allclose(loss, ref, atol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec as P

from fewbit_jax import _mesh

__all__ = ["linear_softmax_cross_entropy", "LSE_NAME", "GRAD_NAME"]

# checkpoint_name of the per-token statistics kept for the backward pass
# (log-sum-exp and the unweighted loss: float32, one number per token each).
LSE_NAME = "fused_loss_lse"
# checkpoint_name of the gradients w.r.t. x and the kernel that
# ``gradient="forward"`` forms in the forward pass (x's and the kernel's sizes).
GRAD_NAME = "fused_loss_grads"

# Default vocabulary block: about this many logits (tokens x block columns)
# at once, a multiple of 128 columns, between 128 and 8192 (see
# `python -m benchmarks.bench_loss --blocks ...`: on CPU, 256 and 512 tokens at
# V = 32768, blocks of about 2**19 logits were fastest).
_BLOCK_ELEMENTS = 1 << 19
_BLOCK_MIN, _BLOCK_MAX = 128, 8192
# Gradient-in-forward mode: tokens per block, about this many logits (tokens
# x the whole local vocabulary) at once, at least 1 token.
_TOKEN_BLOCK_ELEMENTS = 1 << 20
_REDUCTIONS = ("none", "sum", "mean")
_GRADIENTS = ("forward", "recompute")
_LAYOUTS = ("dv", "vd")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one call, decided once at the entry (a custom_vjp nondiff arg)."""
  vocab: int  # columns of the kernel this core sees (a shard's, when sharded)
  vocab_total: int  # the whole vocabulary (label smoothing spreads a / V_total)
  block: int  # vocabulary block; the last block is vocab % block when it does not divide
  layout: str  # "dv": kernel (D, V); "vd": a (V, D) embedding table
  soft_cap: float | None
  label_smoothing: float
  z_loss: float
  vocab_axes: tuple  # mesh axes the vocabulary is split over (inside shard_map), or ()
  precision: Any
  out_dtype: Any
  token_block: int = 0  # tokens per block of the gradient-in-forward mode

  @property
  def blocks(self) -> tuple[int, int]:
    """(number of full blocks, size of the last partial block or 0)."""
    return self.vocab // self.block, self.vocab % self.block


# --------------------------------------------------------------------------
# One block of logits.


def _kernel_block(plan: _Plan, kernel, start, size: int):
  axis = 1 if plan.layout == "dv" else 0
  return lax.dynamic_slice_in_dim(kernel, start, size, axis=axis)


def _logits(plan: _Plan, x, w):
  """(z, s): soft-capped float32 logits of one block, and its ``1 - (z/cap)^2`` (or None)."""
  contract = ((1,), (0,)) if plan.layout == "dv" else ((1,), (1,))
  z = lax.dot_general(x, w, (contract, ((), ())), precision=plan.precision,
                      preferred_element_type=jnp.float32)
  if plan.soft_cap is None:
    return z, None
  t = jnp.tanh(z / plan.soft_cap)
  return plan.soft_cap * t, 1 - t * t


def _varying_like(a, *refs):
  """`a` marked as varying over the manual mesh axes that `refs` vary over (inside shard_map).

  A scan's carry must keep its type: zeros made inside ``jax.shard_map``
  are the same on every device, while what is added to them varies.
  """
  want = frozenset().union(*(jax.typeof(r).mat.varying for r in refs))
  want = want - jax.typeof(a).mat.varying
  return lax.pcast(a, tuple(sorted(want)), to="varying") if want else a


def _vocab_offset(plan: _Plan):
  """The first vocabulary index of this shard (0 unless the vocabulary is sharded)."""
  if not plan.vocab_axes:
    return 0
  return lax.axis_index(plan.vocab_axes) * plan.vocab


def _over_blocks(plan: _Plan, step, carry):
  """Runs ``step(carry, start, size)`` over the vocabulary blocks: a scan, then the remainder."""
  full, rest = plan.blocks
  if full:
    def body(c, i):
      return step(c, i * plan.block, plan.block), None
    carry, _ = lax.scan(body, carry, jnp.arange(full, dtype=jnp.int32))
  if rest:
    carry = step(carry, full * plan.block, rest)
  return carry


# --------------------------------------------------------------------------
# Forward and backward passes (x: (N, D), labels: (N,), weight: (N,) float32).


def _label_logits(plan: _Plan, x, kernel, local):
  """The (soft-capped) logit of each token's label, 0 where it is not in this shard."""
  inside = (local >= 0) & (local < plan.vocab)
  idx = jnp.clip(local, 0, plan.vocab - 1)
  w = jnp.take(kernel, idx, axis=1 if plan.layout == "dv" else 0)  # (D, N) or (N, D)
  if plan.layout == "dv":
    w = w.T
  zy = jnp.einsum("nd,nd->n", x, w, precision=plan.precision,
                  preferred_element_type=jnp.float32)
  if plan.soft_cap is not None:
    zy = plan.soft_cap * jnp.tanh(zy / plan.soft_cap)
  return jnp.where(inside, zy, 0)


def _forward(plan: _Plan, x, kernel, labels):
  """Per-token (lse, unweighted loss), float32."""
  n = x.shape[0]
  local = labels - _vocab_offset(plan)

  def step(c, start, size):
    m, l, zs = c
    z, _ = _logits(plan, x, _kernel_block(plan, kernel, start, size))
    m_new = jnp.maximum(m, z.max(axis=1))
    l = l * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(axis=1)
    if plan.label_smoothing:
      zs = zs + z.sum(axis=1)
    return m_new, l, zs

  f32 = lambda v: _varying_like(jnp.full((n,), v, jnp.float32), x, kernel, labels)
  m, l, zs = _over_blocks(plan, step, (f32(-jnp.inf), f32(0), f32(0)))
  zy = _label_logits(plan, x, kernel, local)
  if plan.vocab_axes:
    m_all = lax.pmax(m, plan.vocab_axes)
    l = lax.psum(l * jnp.exp(m - m_all), plan.vocab_axes)
    zy, zs = lax.psum((zy, zs), plan.vocab_axes)
    m = m_all
  lse = m + jnp.log(l)
  a = plan.label_smoothing
  ce = lse - (1 - a) * zy
  if a:
    ce = ce - (a / plan.vocab_total) * zs
  if plan.z_loss:
    ce = ce + plan.z_loss * lse * lse
  return lse, ce


def _backward(plan: _Plan, x, kernel, labels, lse, gw):
  """(dx, dkernel) for per-token cotangents `gw` (cotangent times weight), float32 sums."""
  local = labels - _vocab_offset(plan)
  scale = (1 + 2 * plan.z_loss * lse)[:, None] if plan.z_loss else 1
  a = plan.label_smoothing
  gw = gw[:, None]
  dkernel = _varying_like(jnp.zeros(kernel.shape, kernel.dtype), x, kernel, labels, gw)
  dx = _varying_like(jnp.zeros(x.shape, jnp.float32), x, kernel, labels, gw)

  def step(c, start, size):
    dx, dk = c
    w = _kernel_block(plan, kernel, start, size)
    z, dcap = _logits(plan, x, w)
    hit = (local - start)[:, None] == lax.broadcasted_iota(jnp.int32, z.shape, 1)
    dz = jnp.exp(z - lse[:, None]) * scale - jnp.where(hit, 1 - a, 0)
    if a:
      dz = dz - a / plan.vocab_total
    dz = dz * gw
    if dcap is not None:
      dz = dz * dcap
    dz = dz.astype(x.dtype)
    if plan.layout == "dv":
      dx_dims = (((1,), (1,)), ((), ()))  # dz (N, b) . w (D, b) -> (N, D)
      dk_dims = (((0,), (0,)), ((), ()))  # x (N, D) . dz (N, b) -> (D, b)
      dk_blk = lax.dot_general(x, dz, dk_dims, precision=plan.precision,
                               preferred_element_type=jnp.float32)
    else:
      dx_dims = (((1,), (0,)), ((), ()))  # dz (N, b) . w (b, D) -> (N, D)
      dk_dims = (((0,), (0,)), ((), ()))  # dz (N, b) . x (N, D) -> (b, D)
      dk_blk = lax.dot_general(dz, x, dk_dims, precision=plan.precision,
                               preferred_element_type=jnp.float32)
    dx = dx + lax.dot_general(dz, w, dx_dims, precision=plan.precision,
                              preferred_element_type=jnp.float32)
    axis = 1 if plan.layout == "dv" else 0
    dk = lax.dynamic_update_slice_in_dim(dk, dk_blk.astype(dk.dtype), start, axis=axis)
    return dx, dk

  return _over_blocks(plan, step, (dx, dkernel))


# --------------------------------------------------------------------------
# The custom_vjp core.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(plan: _Plan, x, kernel, labels, weight):
  lse, ce = _forward(plan, x, kernel, labels)
  del lse
  return (weight * ce).astype(plan.out_dtype)


def _core_fwd(plan, x, kernel, labels, weight):
  lse, ce = _forward(plan, x, kernel, labels)
  lse, ce = checkpoint_name((lse, ce), LSE_NAME)
  return (weight * ce).astype(plan.out_dtype), (x, kernel, labels, weight, lse, ce)


def _core_bwd(plan, res, g):
  x, kernel, labels, weight, lse, ce = res
  g = g.astype(jnp.float32)
  dx, dkernel = _backward(plan, x, kernel, labels, lse, g * weight)
  dx = _mesh.like_primal(dx.astype(x.dtype), x)
  dkernel = _mesh.like_primal(dkernel, kernel)
  dweight = _mesh.like_primal((g * ce).astype(weight.dtype), weight)
  return dx, dkernel, None, dweight


_core.defvjp(_core_fwd, _core_bwd)


# --------------------------------------------------------------------------
# Gradient in the forward pass (a reduced loss: the cotangent is one number).


def _chunk_grads(plan: _Plan, xs, kernel, ys, ws):
  """One block of tokens against the whole (local) vocabulary.

  Returns (lse, ce, dx, dk): the per-token log-sum-exp and unweighted loss,
  and the gradients of ``sum(ws * ce)`` w.r.t. this block's ``xs`` (float32,
  a partial sum over the vocabulary shards when sharded) and the kernel
  (float32, this block's contribution).
  """
  local = ys - _vocab_offset(plan)
  z, dcap = _logits(plan, xs, kernel)  # (T, V_local) float32
  m = z.max(axis=1)
  if plan.vocab_axes:
    m = lax.pmax(m, plan.vocab_axes)
  e = jnp.exp(z - m[:, None])
  l = e.sum(axis=1)
  hit = local[:, None] == lax.broadcasted_iota(jnp.int32, z.shape, 1)
  zy = jnp.where(hit, z, 0).sum(axis=1)
  a = plan.label_smoothing
  zs = z.sum(axis=1) if a else None
  if plan.vocab_axes:
    l, zy = lax.psum((l, zy), plan.vocab_axes)
    if a:
      zs = lax.psum(zs, plan.vocab_axes)
  lse = m + jnp.log(l)
  ce = lse - (1 - a) * zy
  if a:
    ce = ce - (a / plan.vocab_total) * zs
  if plan.z_loss:
    ce = ce + plan.z_loss * lse * lse
  # dz = w (p (1 + 2 c lse) - (1 - a) onehot - a / V), times 1 - (z/cap)^2.
  scale = ws / l
  if plan.z_loss:
    scale = scale * (1 + 2 * plan.z_loss * lse)
  dz = e * scale[:, None] - jnp.where(hit, (1 - a) * ws[:, None], 0)
  if a:
    dz = dz - (a / plan.vocab_total) * ws[:, None]
  if dcap is not None:
    dz = dz * dcap
  dz = dz.astype(xs.dtype)
  if plan.layout == "dv":
    dx = lax.dot_general(dz, kernel, (((1,), (1,)), ((), ())), precision=plan.precision,
                         preferred_element_type=jnp.float32)  # (T, V) . (D, V) -> (T, D)
    dk = lax.dot_general(xs, dz, (((0,), (0,)), ((), ())), precision=plan.precision,
                         preferred_element_type=jnp.float32)  # (T, D) . (T, V) -> (D, V)
  else:
    dx = lax.dot_general(dz, kernel, (((1,), (0,)), ((), ())), precision=plan.precision,
                         preferred_element_type=jnp.float32)  # (T, V) . (V, D) -> (T, D)
    dk = lax.dot_general(dz, xs, (((0,), (0,)), ((), ())), precision=plan.precision,
                         preferred_element_type=jnp.float32)  # (T, V) . (T, D) -> (V, D)
  return lse, ce, dx, dk


def _forward_with_grads(plan: _Plan, x, kernel, labels, weight):
  """(ce, dx, dkernel): per-token loss, and the gradients of ``sum(weight * ce)``.

  Tokens in blocks of ``plan.token_block`` (a scan, the remainder as one
  last smaller block), each against the whole (local) vocabulary: the
  block's logits are formed once and give its loss, ``dx`` and its share of
  ``dkernel`` (accumulated in float32), so the matmuls are optax's three.
  """
  n, d = x.shape
  t = min(plan.token_block, n)
  full, rest = divmod(n, t)
  dk = _varying_like(jnp.zeros(kernel.shape, jnp.float32), x, kernel, labels, weight)
  ces, dxs = [], []
  if full:
    def body(dk, blk):
      xs, ys, ws = blk
      _, ce, dx, dk_blk = _chunk_grads(plan, xs, kernel, ys, ws)
      return dk + dk_blk, (ce, dx.astype(x.dtype))
    blocks = (x[:full * t].reshape(full, t, d), labels[:full * t].reshape(full, t),
              weight[:full * t].reshape(full, t))
    dk, (ce, dx) = lax.scan(body, dk, blocks)
    ces.append(ce.reshape(-1))
    dxs.append(dx.reshape(-1, d))
  if rest:
    _, ce, dx, dk_blk = _chunk_grads(plan, x[full * t:], kernel, labels[full * t:],
                                     weight[full * t:])
    dk = dk + dk_blk
    ces.append(ce)
    dxs.append(dx.astype(x.dtype))
  ce = ces[0] if len(ces) == 1 else jnp.concatenate(ces)
  dx = dxs[0] if len(dxs) == 1 else jnp.concatenate(dxs)
  return ce, dx, dk.astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core_sum(plan: _Plan, x, kernel, labels, weight):
  """``sum(weight * ce)`` over this device's tokens, its gradients formed in the forward pass."""
  lse, ce = _forward(plan, x, kernel, labels)
  del lse
  return jnp.sum(weight * ce).astype(plan.out_dtype)


def _core_sum_fwd(plan, x, kernel, labels, weight):
  ce, dx, dk = _forward_with_grads(plan, x, kernel, labels, weight)
  dx, dk = checkpoint_name((dx, dk), GRAD_NAME)
  ce = checkpoint_name(ce, LSE_NAME)
  # Empty slices: no bytes, but the manual-axes types the cotangents must take.
  types = (x[:0, :0], kernel[:0, :0], weight[:0])
  return jnp.sum(weight * ce).astype(plan.out_dtype), (dx, dk, ce, types)


def _core_sum_bwd(plan, res, g):
  dx, dk, ce, (x, kernel, weight) = res
  g = g.astype(jnp.float32)
  dx = _mesh.like_primal((g * dx.astype(jnp.float32)).astype(x.dtype), x)
  dk = _mesh.like_primal((g * dk.astype(jnp.float32)).astype(kernel.dtype), kernel)
  dweight = _mesh.like_primal((g * ce).astype(weight.dtype), weight)
  return dx, dk, None, dweight


_core_sum.defvjp(_core_sum_fwd, _core_sum_bwd)


# --------------------------------------------------------------------------
# The public function: checks and the plan, once.


def _default_block(tokens: int, vocab: int) -> int:
  b = _BLOCK_ELEMENTS // max(tokens, 1)
  b = max(_BLOCK_MIN, min(_BLOCK_MAX, b // 128 * 128))
  return min(b, vocab)


def _check(x, kernel, labels, kernel_layout):
  if kernel_layout not in _LAYOUTS:
    raise ValueError(f"kernel_layout must be 'dv' (a (D, V) output projection, as nn.Dense's "
                     f"kernel) or 'vd' (a (V, D) embedding table, for tied embeddings); got "
                     f"{kernel_layout!r}.")
  for name, a in (("x", x), ("kernel", kernel)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"linear_softmax_cross_entropy: {name} must be floating point (float32, "
                      f"bfloat16, ...); got {a.dtype}. Cast it, e.g. {name}.astype(jnp.float32).")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"linear_softmax_cross_entropy: labels must be integer class indices "
                    f"(int32), one per token; got dtype {labels.dtype}. For one-hot or soft "
                    f"targets take the argmax, or use label_smoothing= for smoothed targets.")
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2-D, (D, V) (or (V, D) with kernel_layout='vd'); got "
                     f"shape {kernel.shape}.")
  if kernel.shape[1 if kernel_layout == "dv" else 0] == 0:
    raise ValueError(f"the kernel {kernel.shape} has an empty vocabulary axis (kernel_layout="
                     f"{kernel_layout!r}); a softmax over no classes is undefined.")
  if x.ndim < 1:
    raise ValueError("x must have a last axis of D features (..., D); got a scalar.")
  d_axis = 0 if kernel_layout == "dv" else 1
  d = kernel.shape[d_axis]
  if x.shape[-1] != d:
    other = "vd" if kernel_layout == "dv" else "dv"
    hint = (f" The kernel's other axis has {kernel.shape[1 - d_axis]} = D: for a "
            f"{'(V, D) embedding table' if other == 'vd' else '(D, V) kernel'} pass "
            f"kernel_layout={other!r}.") if kernel.shape[1 - d_axis] == x.shape[-1] else ""
    raise ValueError(f"x's last axis ({x.shape[-1]}) must equal the kernel's D axis (axis "
                     f"{d_axis} of shape {kernel.shape} with kernel_layout={kernel_layout!r}): "
                     f"x is (..., D), the kernel (D, V) or (V, D).{hint}")
  if labels.shape != x.shape[:-1]:
    raise ValueError(f"labels must have x's leading shape {x.shape[:-1]} (one class index per "
                     f"token); got {labels.shape}.")


def _default_token_block(tokens: int, vocab: int) -> int:
  return max(1, min(tokens, _TOKEN_BLOCK_ELEMENTS // max(vocab, 1)))


def _check_mode(reduction, gradient, block_size, token_block_size):
  """The gradient mode (``"forward"`` or ``"recompute"``) for these options, or a clear error."""
  if reduction not in _REDUCTIONS:
    raise ValueError(f"reduction must be 'none' (the per-token loss), 'sum' or 'mean' (one "
                     f"number: the weighted sum, or it divided by the sum of the weights); got "
                     f"{reduction!r}.")
  if gradient is not None and gradient not in _GRADIENTS:
    raise ValueError(f"gradient must be 'forward' (the gradients formed in the forward pass, "
                     f"needs reduction='sum' or 'mean'), 'recompute' (the backward recomputes "
                     f"the logits) or None (the default for the reduction); got {gradient!r}.")
  if gradient is None:
    gradient = "recompute" if reduction == "none" else "forward"
  if gradient == "forward" and reduction == "none":
    raise ValueError("gradient='forward' forms the gradients in the forward pass, which needs "
                     "one cotangent for the whole loss: pass reduction='sum' or 'mean' (and "
                     "reduce nothing after it), or gradient='recompute' for the per-token loss.")
  if token_block_size is not None:
    if (not isinstance(token_block_size, (int, np.integer)) or isinstance(token_block_size, bool)
        or token_block_size < 1):
      raise ValueError(f"token_block_size must be a positive int (tokens per block) or None for "
                       f"the default; got {token_block_size!r}.")
    if gradient != "forward":
      raise ValueError("token_block_size is the token block of gradient='forward'; the "
                       "recompute mode blocks the vocabulary: pass block_size= instead.")
  if block_size is not None and gradient == "forward":
    raise ValueError("block_size is the vocabulary block of gradient='recompute'; "
                     "gradient='forward' takes blocks of tokens against the whole vocabulary: "
                     "pass token_block_size= instead.")
  return gradient


def _check_options(soft_cap, label_smoothing, z_loss, block_size):
  if soft_cap is not None and not (isinstance(soft_cap, (int, float)) and soft_cap > 0):
    raise ValueError(f"soft_cap must be a positive number (Gemma 2 uses 30.0) or None; got "
                     f"{soft_cap!r}.")
  if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing < 1):
    raise ValueError(f"label_smoothing must be a number in [0, 1); got {label_smoothing!r}.")
  if not (isinstance(z_loss, (int, float)) and z_loss >= 0):
    raise ValueError(f"z_loss must be a number >= 0 (e.g. 1e-4); got {z_loss!r}.")
  if block_size is not None and (not isinstance(block_size, (int, np.integer))
                                 or isinstance(block_size, bool) or block_size < 1):
    raise ValueError(f"block_size must be a positive int (vocabulary columns per block) or "
                     f"None for the default; got {block_size!r}.")


def _axes_tuple(a) -> tuple:
  return () if a is None else tuple(a) if isinstance(a, (tuple, list)) else (a,)


def linear_softmax_cross_entropy(x, kernel, labels, *, kernel_layout: str = "dv",
                                 soft_cap: float | None = None, label_smoothing: float = 0.0,
                                 z_loss: float = 0.0, weights=None, where=None,
                                 ignore_index: int | None = None,
                                 reduction: str = "none", gradient: str | None = None,
                                 block_size: int | None = None,
                                 token_block_size: int | None = None, precision=None,
                                 token_axis=None, vocab_axis=None):
  r"""Per-token softmax cross-entropy of ``x @ kernel`` without materialising the logits.

  Equal (up to float rounding) to
  ``optax.softmax_cross_entropy_with_integer_labels(x @ kernel, labels)``,
  with exact gradients for ``x`` and ``kernel``; the logits are computed
  ``block_size`` vocabulary columns at a time in the forward and again in the
  backward, which keeps only the per-token log-sum-exp and loss (float32)
  besides the inputs. With ``z = x @ kernel`` (``cap * tanh(z / cap)`` under a
  soft cap), ``lse = logsumexp(z)``:

  ``loss = w * (lse - (1 - a) z_y - (a / V) sum_v z_v + c * lse^2)``

  (``a`` = label_smoothing, as optax's ``smooth_labels``; ``c`` = z_loss;
  ``w`` the token's weight, 0 where ignored).

  Two ways to the gradients: ``gradient="recompute"`` (the default for the
  per-token loss) keeps the per-token log-sum-exp and recomputes the logits
  in the backward, a block of ``block_size`` vocabulary columns at a time
  (four matmuls of ``2 N D V`` flops where optax has three; the least
  memory: the gradients are written straight into their outputs).
  ``gradient="forward"`` (the default for ``reduction="sum"``/``"mean"``,
  and only for those: it needs one cotangent for the whole loss) forms the
  gradients in the forward pass, ``token_block_size`` tokens at a time
  against the whole vocabulary, and keeps them until the backward scales
  them by the cotangent: optax's three matmuls, and ``x``'s and the
  kernel's sizes kept in float32 for the kernel (`GRAD_NAME`), no logits.
  For a reduced loss, reduce here rather than after: ``reduction="mean"``
  rather than ``.mean()`` of the per-token loss.

  Args:
    x: the last hidden state, (..., D), floating point (bfloat16 stays
      bfloat16 in the matmuls; sums are float32).
    kernel: the output projection, (D, V) (``nn.Dense``'s kernel), or with
      ``kernel_layout="vd"`` a (V, D) embedding table (tied embeddings,
      ``embed.embedding``: no transpose is made).
    labels: integer class indices, x's leading shape (...). Labels outside
      [0, V) give no label logit: mask them (``ignore_index``/``where``).
    kernel_layout: ``"dv"`` (default) or ``"vd"``, the kernel's axes.
    soft_cap: if given, logits ``cap * tanh(logits / cap)`` (Gemma 2's final
      logit soft-cap).
    label_smoothing: ``a`` in [0, 1): the target is ``(1 - a) onehot + a / V``.
    z_loss: ``c`` >= 0: adds ``c * lse^2`` per token (PaLM's auxiliary loss).
    weights: optional per-token weights (...), multiplying each token's loss
      (differentiable).
    where: optional boolean mask (...): False tokens have loss 0 and give no
      gradient.
    ignore_index: tokens whose label equals it have loss 0 and no gradient
      (e.g. -100, or the padding id).
    reduction: ``"none"`` (default): the per-token loss, x's leading shape;
      ``"sum"``: the weighted sum over tokens, one float32 number;
      ``"mean"``: that sum divided by the sum of the weights (the number of
      tokens not ignored when no weights are given; 0 when every token is
      ignored).
    gradient: ``"recompute"`` or ``"forward"`` (see above); None: ``"forward"``
      for a reduced loss, ``"recompute"`` for the per-token loss.
    block_size: vocabulary columns per block of the recompute mode (default:
      about 2**19 logits per block, 128 to 8192 columns). It need not divide
      V: the remainder is one last, smaller block.
    token_block_size: tokens per block of the forward mode (default: about
      2**20 logits per block, at least one token). It need not divide the
      tokens.
    precision: ``lax.dot_general`` precision of the matmuls.
    token_axis, vocab_axis: under an ``AxisType.Auto`` mesh (``jax.set_mesh``),
      the mesh axis name(s) over which x's first axis and the kernel's
      vocabulary are sharded, to run each device on its own shard (with no
      names XLA partitions the blocked computation itself). On an
      ``AxisType.Explicit`` mesh both are read from the arrays' types.

  Returns:
    The per-token loss, shape (...), float32 (float64 for float64 inputs);
    with ``reduction="sum"``/``"mean"`` one number of that dtype.

  Raises:
    TypeError: for non-float x or kernel, or non-integer labels.
    ValueError: for shapes that do not fit together or bad options.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import fewbit_jax as fb
    >>> x = jax.random.normal(jax.random.key(0), (4, 16))
    >>> table = jax.random.normal(jax.random.key(1), (50, 16)) / 4   # tied (V, D)
    >>> labels = jnp.array([3, 7, -100, 49])
    >>> loss = fb.linear_softmax_cross_entropy(x, table, labels, kernel_layout="vd",
    ...                                        ignore_index=-100, block_size=16)
    >>> ref = optax.softmax_cross_entropy_with_integer_labels(x @ table.T, labels)
    >>> keep = jnp.array([0, 1, 3])
    >>> bool(jnp.allclose(loss[keep], ref[keep], atol=1e-5)), float(loss[2])
    (True, 0.0)
    >>> dx, dt = jax.grad(lambda x, t: fb.linear_softmax_cross_entropy(
    ...     x, t, labels, kernel_layout="vd", ignore_index=-100).mean(), (0, 1))(x, table)
    >>> dt.shape
    (50, 16)
    >>> mean = lambda x, t: fb.linear_softmax_cross_entropy(  # gradients in the forward pass
    ...     x, t, labels, kernel_layout="vd", ignore_index=-100, reduction="mean")
    >>> bool(jnp.allclose(mean(x, table), ref[keep].mean(), atol=1e-5))
    True
    >>> dx2, dt2 = jax.grad(mean, (0, 1))(x, table)
    >>> bool(jnp.allclose(dt2, dt * 4 / 3, atol=1e-6))   # .mean() above counted the ignored token
    True
  """
  x, kernel, labels = jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(labels)
  _check(x, kernel, labels, kernel_layout)
  _check_options(soft_cap, label_smoothing, z_loss, block_size)
  gradient = _check_mode(reduction, gradient, block_size, token_block_size)
  lead = x.shape[:-1]
  out_dtype = jnp.promote_types(jnp.result_type(x, kernel), jnp.float32)
  weight = jnp.ones(lead, jnp.float32) if weights is None else jnp.asarray(weights)
  if weight.shape != lead:
    raise ValueError(f"weights must have x's leading shape {lead} (one per token); got "
                     f"{weight.shape}.")
  if not jnp.issubdtype(weight.dtype, jnp.floating):
    weight = weight.astype(jnp.float32)
  mask = None
  if where is not None:
    where = jnp.asarray(where)
    if where.shape != lead or where.dtype != jnp.bool_:
      raise ValueError(f"where must be a boolean mask of x's leading shape {lead}; got "
                       f"{where.dtype}{list(where.shape)}.")
    mask = where
  if ignore_index is not None:
    keep = labels != ignore_index
    mask = keep if mask is None else mask & keep
  if mask is not None:
    weight = jnp.where(mask, weight, jnp.zeros((), weight.dtype))
  labels = labels.astype(jnp.int32)
  weight = weight.astype(jnp.promote_types(weight.dtype, jnp.float32))

  vocab = kernel.shape[1 if kernel_layout == "dv" else 0]
  v_axis = 1 if kernel_layout == "dv" else 0
  tokens = math.prod(lead)
  # Sharding: read from the types on an Explicit mesh, or as named under an Auto one.
  x_spec = _mesh.explicit_spec(x)
  k_spec = _mesh.explicit_spec(kernel)
  mesh = None
  if x_spec is not None or k_spec is not None:
    mesh = _mesh.type_mesh(x, kernel)
    x_spec = x_spec or (None,) * x.ndim
    k_spec = k_spec or (None, None)
    if token_axis is not None or vocab_axis is not None:
      raise ValueError("token_axis/vocab_axis are for AxisType.Auto meshes; on an Explicit "
                       "mesh the shardings are read from x's and kernel's types: leave them out.")
  elif token_axis is not None or vocab_axis is not None:
    mesh = _mesh.context_mesh()
    if mesh is None:
      raise ValueError("token_axis/vocab_axis name mesh axes: call inside jax.set_mesh(mesh).")
    x_spec = (_mesh.entry(_axes_tuple(token_axis)),) + (None,) * (x.ndim - 1)
    k_spec = [None, None]
    k_spec[v_axis] = _mesh.entry(_axes_tuple(vocab_axis))
    k_spec = tuple(k_spec)
  if mesh is not None:
    if x_spec[-1] is not None or k_spec[1 - v_axis] is not None:
      raise ValueError(f"linear_softmax_cross_entropy: the feature axis D is sharded (x: "
                       f"{x_spec}, kernel: {k_spec}); shard x's tokens and the kernel's "
                       f"vocabulary only: reshard D to replicated first "
                       f"(jax.sharding.reshard(a, P(..., None))).")
    sizes = _mesh.sizes(mesh)
    v_shards = _mesh.shards(sizes, k_spec[v_axis])
    if vocab % v_shards:
      raise ValueError(f"the vocabulary ({vocab}) must divide evenly over its {v_shards} "
                       f"shards ({k_spec[v_axis]}); pad the kernel's vocabulary to a multiple.")
    vocab_axes = _mesh.axes(k_spec[v_axis])
    local_tokens = tokens // max(1, math.prod(_mesh.shards(sizes, e) for e in x_spec[:-1]))
    local_vocab = vocab // v_shards
  else:
    vocab_axes, local_tokens, local_vocab = (), tokens, vocab
  block = _default_block(local_tokens, local_vocab) if block_size is None else \
      min(int(block_size), local_vocab)
  token_block = _default_token_block(local_tokens, local_vocab) if token_block_size is None \
      else int(token_block_size)
  plan = _Plan(vocab=local_vocab, vocab_total=vocab, block=max(block, 1),
               layout=kernel_layout, soft_cap=None if soft_cap is None else float(soft_cap),
               label_smoothing=float(label_smoothing), z_loss=float(z_loss),
               vocab_axes=vocab_axes, precision=precision, out_dtype=out_dtype,
               token_block=token_block)

  def run(x, kernel, labels, weight):
    lead = x.shape[:-1]
    d = x.shape[-1]
    args = (x.reshape(-1, d), kernel, labels.reshape(-1), weight.reshape(-1))
    if gradient == "recompute":
      out = _core(plan, *args).reshape(lead)
      if reduction == "none":
        return out
      total = out.sum()
    else:
      total = _core_sum(plan, *args)
    # This device's tokens: summed over the token shards.
    varying = tuple(sorted(jax.typeof(total).mat.varying))
    return lax.psum(total, varying) if varying else total

  def finish(total):
    if reduction != "mean":
      return total
    count = weight.sum(dtype=jnp.float32)  # every token ignored: 0 / 1, no NaN
    return (total / jnp.where(count == 0, 1, count).astype(total.dtype))

  t_spec = P(*x_spec[:-1]) if mesh is not None else None
  if mesh is None:
    with jax.named_scope("linear_softmax_cross_entropy"):
      return finish(run(x, kernel, labels, weight))
  specs = (P(*x_spec), P(*k_spec), t_spec, t_spec)
  if _mesh.explicit_axes(mesh):
    x, kernel, labels, weight = (jax.sharding.reshard(a, NamedSharding(mesh, s))
                                 for a, s in zip((x, kernel, labels, weight), specs))
  with jax.named_scope("linear_softmax_cross_entropy"):
    out = jax.shard_map(run, mesh=mesh, in_specs=specs,
                        out_specs=t_spec if reduction == "none" else P())(
        x, kernel, labels, weight)
    return finish(out)
