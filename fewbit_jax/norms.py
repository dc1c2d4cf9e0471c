"""LayerNorm and RMSNorm whose backward pass keeps only the input and per-row statistics.

`layer_norm` and `rms_norm` compute what ``flax.linen.LayerNorm`` and
``flax.linen.RMSNorm`` compute, with the same operations in the same order
(the forward output is bitwise flax's), but their ``jax.custom_vjp`` keeps one
input-sized array, the input ``x`` itself in its own dtype, plus the per-row
mean and ``1 / sqrt(var + epsilon)``. Autodiff of flax's layers keeps two or
three input-sized arrays instead (``x - mean``, its product with the inverse
standard deviation and the scaled copy), in float32 even for a bfloat16
input. The gradients are exact (equal to autodiff's up to float rounding):
the backward recomputes ``xhat = (x - mean) * rstd`` and applies the usual
formula

  ``dx = rstd * (gh - mean_R(gh) - xhat * mean_R(gh * xhat))``,
  ``gh = g * scale``, ``dscale = sum(g * xhat)``, ``dbias = sum(g)``

(RMSNorm without the ``mean_R(gh)`` term), over the reduction axes R (the
masked positions only, with a ``mask``; across devices with ``axis_name``).

The kept arrays are named with ``jax.ad_checkpoint.checkpoint_name``:
``'lean_norm_input'`` (the input) and ``'lean_norm_stats'`` (mean, rstd),
and `fewbit_jax.checkpoint_policy` keeps both. The layers are
`fewbit_jax.LayerNorm`, `fewbit_jax.RMSNorm` (linen) and
`fewbit_jax.nnx.LayerNorm`, `fewbit_jax.nnx.RMSNorm`; `fewbit_jax.linen.lean`
and `fewbit_jax.nnx.convert_lean` convert existing models to them.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import fewbit_jax as fb
  >>> x = jax.random.normal(jax.random.key(0), (4, 16))
  >>> scale, bias = jnp.ones(16), jnp.zeros(16)
  >>> v = {"params": {"scale": scale, "bias": bias}}
  >>> bool(jnp.all(fb.layer_norm(x, scale, bias) == nn.LayerNorm().apply(v, x)))
  True
  >>> res = fb.memory.saved_residuals(lambda x: fb.layer_norm(x, scale, bias).sum(), x)
  >>> sorted(res.by_source())
  ["named 'lean_norm_input'", "named 'lean_norm_stats'"]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Hashable, Iterable

import jax
import jax.numpy as jnp
from flax.linen import dtypes as _dtypes
from jax import lax
from jax import custom_derivatives
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from fewbit_jax import _mesh, _sharded

try:  # the tracer types tell a reverse-mode linearization apart (`linearizing`)
  from jax._src.interpreters import partial_eval as _pe
except ImportError:  # pragma: no cover - then the checkpointed tangent everywhere
  _pe = None



__all__ = ["layer_norm", "rms_norm", "NORM_INPUT_NAME", "NORM_STATS_NAME"]

# checkpoint_name of the input kept by the backward pass (one input-sized
# array, in the input's dtype) and of the per-row statistics (mean, rstd).
NORM_INPUT_NAME = "lean_norm_input"
NORM_STATS_NAME = "lean_norm_stats"


def canonical_axes(rank: int, axes, what: str) -> tuple[int, ...]:
  """Sorted, deduplicated, non-negative axes (flax's canonical form), checked against `rank`.

  Shared with the lean layers; not part of the API (not in ``__all__``).
  """
  if not isinstance(axes, Iterable):
    axes = (axes,)
  axes = tuple(axes)
  for a in axes:
    if not isinstance(a, int) or not -rank <= a < rank:
      raise ValueError(f"{what} {axes} do not fit an input of rank {rank}: give integers in "
                       f"[-{rank}, {rank}).")
  return tuple(sorted({a % rank for a in axes}))


def _hashable(value: Any) -> Hashable:
  """`value` with lists turned into tuples (axis_index_groups are lists of lists)."""
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class _Norm:
  """The static configuration of one normalisation (hashable: a custom_vjp nondiff argument)."""
  reduction_axes: tuple[int, ...]
  feature_axes: tuple[int, ...]
  epsilon: float
  dtype: Any  # the output dtype asked for, or None (inferred as flax infers it)
  use_mean: bool  # LayerNorm; False for RMSNorm
  use_fast_variance: bool
  force_float32_reductions: bool
  axis_name: Any
  axis_index_groups: Any
  promote_to: Any  # nnx promotes x to this dtype first; None: linen (x as it is)
  input_dtype: Any  # the dtype of x (of its cotangent)

  def feature_shape(self, shape) -> list[int]:
    out = [1] * len(shape)
    for a in self.feature_axes:
      out[a] = shape[a]
    return out

  def pmean(self, *xs):
    """Means over the devices of `axis_name`, stacked into one collective as flax does."""
    if self.axis_name is None:
      return xs
    if len(xs) == 1:
      return (lax.pmean(xs[0], self.axis_name, axis_index_groups=self.axis_index_groups),)
    out = lax.pmean(jnp.stack(xs), self.axis_name, axis_index_groups=self.axis_index_groups)
    return tuple(out[i] for i in range(len(xs)))

  def promoted(self, x):
    """`x` as flax normalises it: cast to `promote_to` first (nnx), or as it is (linen)."""
    return x if self.promote_to is None else x.astype(self.promote_to)

  def stats_dtype(self, x):
    """The dtype flax computes the statistics of (promoted) `x` in."""
    dtype = jnp.result_type(x) if self.dtype is None else self.dtype
    if self.force_float32_reductions:
      dtype = jnp.promote_types(dtype, jnp.float32)
    return jnp.dtype(dtype)


def _stats(cfg: _Norm, x, mask):
  """flax's ``_compute_stats``: (mean, var), reduced over the reduction axes (real inputs)."""
  x = x.astype(cfg.stats_dtype(x))
  axes = cfg.reduction_axes
  mean = lambda *xs: cfg.pmean(*(v.mean(axes, where=mask) for v in xs))
  if not cfg.use_mean:
    (var,) = mean(lax.square(x))
    return jnp.zeros_like(var), var
  if cfg.use_fast_variance:
    mu, mu2 = mean(x, lax.square(x))
    return mu, jnp.maximum(0.0, mu2 - lax.square(mu))
  (mu,) = mean(x)
  (var,) = mean(lax.square(x - jnp.expand_dims(mu, axes)))
  return mu, var


def _norm_forward(cfg: _Norm, x, scale, bias, mask):
  """flax's normalisation, op for op; also returns the per-row (mean, rstd) to keep."""
  x = cfg.promoted(x)
  mean, var = _stats(cfg, x, mask)
  mean = jnp.expand_dims(mean, cfg.reduction_axes)
  var = jnp.expand_dims(var, cfg.reduction_axes)
  fshape = cfg.feature_shape(x.shape)
  y = x - mean
  rstd = lax.rsqrt(var + cfg.epsilon)
  mul = rstd
  args = [x]
  if scale is not None:
    scale = scale.reshape(fshape)
    mul = mul * scale
    args.append(scale)
  y = y * mul
  if bias is not None:
    bias = bias.reshape(fshape)
    y = y + bias
    args.append(bias)
  return jnp.asarray(y, _dtypes.canonicalize_dtype(*args, dtype=cfg.dtype)), mean, rstd


def _kept_input(cfg: _Norm, x):
  """What the backward keeps of `x`: `x`, or its promoted copy where that is narrower.

  Both give the same values once promoted (the promotion is a cast), so the
  backward keeps whichever has fewer bytes: a float32 input of an nnx norm
  computing in bfloat16 keeps the bfloat16 copy its statistics came from.
  """
  if cfg.promote_to is None:
    return x
  promoted = jnp.dtype(cfg.promote_to)
  return x.astype(promoted) if promoted.itemsize < x.dtype.itemsize else x


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _norm(x, scale, bias, mask, cfg):
  return _norm_forward(cfg, x, scale, bias, mask)[0]


def linearizing(primals, tangents) -> bool:
  """Whether JAX is linearizing this call for reverse mode (jax.grad, vjp, linearize).

  There the tangents are unknown values of a partial evaluation and the
  primals plain (or staged) arrays: the tangent can be a ``linear_call``
  whose transpose is `_norm_bwd`, the backward tuned for XLA's memory.
  Under an outer derivative, vmap or forward mode (the primals or tangents
  are other tracers) it is the checkpointed `_tangent`, which JAX
  differentiates, batches and transposes itself. `fewbit_jax.attention`
  asks the same; not part of the API (not in ``__all__``).
  """
  if _pe is None:
    return False
  live = [t for t in tangents if t is not None and not isinstance(t, SymbolicZero)]
  if not live or not all(isinstance(t, _pe.JaxprTracer) and not t.pval.is_known()
                          for t in live):
    return False
  staged = (jax.core.Tracer,)
  return all(not isinstance(p, staged) or isinstance(p, _pe.DynamicJaxprTracer)
             for p in jax.tree.leaves(primals))


def _norm_jvp(cfg, primals, tangents):
  # The tangent is linear in those of x, scale and bias, and reads x (kept
  # in its own dtype, or nnx's narrower promoted copy), the per-row mean and
  # rstd, the scale and the mask. Reverse mode keeps exactly these: through
  # a linear_call whose transpose is `_norm_bwd` where JAX linearizes for
  # it, through the checkpointed tangent (recomputing xhat in the backward)
  # under other transformations. Forward mode runs the tangent itself.
  x, scale, bias, mask = primals
  y, mean, rstd = _norm_forward(cfg, x, scale, bias, mask)
  kept = checkpoint_name(_kept_input(cfg, x), NORM_INPUT_NAME)
  mean = checkpoint_name(mean, NORM_STATS_NAME) if cfg.use_mean else None
  rstd = checkpoint_name(rstd, NORM_STATS_NAME)
  zero = lambda t, p: None if p is None else (
      jnp.zeros(jnp.shape(p), jax.dtypes.result_type(p)) if isinstance(t, SymbolicZero) else t)
  if linearizing(primals, tangents[:3]):
    live = [t is not None and not isinstance(t, SymbolicZero) for t in tangents[:3]]
    res = (kept, scale, bias, mask, mean, rstd)

    def tangent(res, lin):
      kept, scale, bias, mask, mean, rstd = res
      it = iter(lin)
      ts = [next(it) if keep else zero(t, p)
            for keep, t, p in zip(live, tangents[:3], primals[:3])]
      return _tangent(cfg, y.dtype, kept, mean, rstd, scale, mask, *ts)

    def transpose(res, ct):
      grads = _norm_bwd(cfg, res, ct)
      return [g for keep, g in zip(live, grads) if keep]

    lin = [t for keep, t in zip(live, tangents[:3]) if keep]
    return y, custom_derivatives.linear_call(tangent, transpose, res, lin)
  ts = [zero(t, p) for t, p in zip(tangents[:3], primals[:3])]
  tangent = jax.checkpoint(functools.partial(_tangent, cfg, y.dtype))
  return y, tangent(kept, mean, rstd, scale, mask, *ts)


_norm.defjvp(_norm_jvp, symbolic_zeros=True)


def _normaliser(cfg, kept, mean, rstd):
  """flax's normalisation of `kept`: (x_y, statistics dtype, compute dtype, rstd in it, xhat).

  x_y is the array flax normalises (nnx's promoted copy of the input); the
  compute dtype holds both it and the statistics, at least float32;
  ``xhat(v) = (v - mean) * rstd`` in that dtype (no mean for RMSNorm).
  """
  x_y = cfg.promoted(kept)
  stats_dtype = cfg.stats_dtype(x_y)
  dtype = jnp.promote_types(jnp.promote_types(x_y.dtype, stats_dtype), jnp.float32)
  rstd = rstd.astype(dtype)

  def xhat(v):
    v = v.astype(dtype)
    if mean is not None:
      v = v - mean.astype(dtype)
    return v * rstd

  return x_y, stats_dtype, dtype, rstd, xhat


def _norm_bwd(cfg, res, g):
  """The transpose of the tangent, written out: dx, dscale, dbias from the cotangent `g`."""
  kept, scale, bias, mask, mean, rstd = res
  # Everything below waits for the cotangent (tied through the small per-row
  # and per-feature arrays): otherwise XLA computes the parts that depend only
  # on the residuals early (xhat, a broadcast scale shared with the forward)
  # and keeps them alive, input-sized, until this backward runs.
  rstd = _sharded.after(rstd, g)
  mean = None if mean is None else _sharded.after(mean, g)
  # flax normalises x_y (the input, promoted first by nnx) with statistics
  # computed from x_s, x_y cast to the statistics' dtype: in the derivative of
  # the mean and the variance, x_s appears; in the normalised output, x_y.
  # They differ where the statistics' dtype is narrower than x_y's.
  x_y, stats_dtype, dtype, rstd, xhat = _normaliser(cfg, kept, mean, rstd)

  xhat_y = xhat(x_y)
  narrower = jnp.finfo(stats_dtype).bits < jnp.finfo(x_y.dtype).bits
  xhat_s = xhat(x_y.astype(stats_dtype)) if narrower else xhat_y
  g = g.astype(dtype)
  fshape = cfg.feature_shape(x_y.shape)
  others = tuple(a for a in range(x_y.ndim) if a not in cfg.feature_axes)
  dscale = dbias = None
  gh = g
  if scale is not None:
    dscale = jnp.sum(g * xhat_y, others).reshape(scale.shape).astype(scale.dtype)
    gh = g * _sharded.after(scale, g).reshape(fshape).astype(dtype)
  if bias is not None:
    dbias = jnp.sum(g, others).reshape(bias.shape).astype(bias.dtype)
  axes = cfg.reduction_axes
  if mask is None:
    count = math.prod(x_y.shape[a] for a in axes)
  else:
    mask = jnp.broadcast_to(mask, x_y.shape)
    count = jnp.sum(mask, axes, keepdims=True, dtype=dtype)
  # The mean and the variance are (p)means over the reduction axes: their
  # derivatives spread every row's sums back over its (unmasked) positions.
  sums = [jnp.sum(gh * xhat_y, axes, keepdims=True)]
  if cfg.use_mean:
    sums.append(jnp.sum(gh, axes, keepdims=True))
  sums = cfg.pmean(*sums)
  spread = xhat_s * sums[0] + (sums[1] if cfg.use_mean else 0)
  spread = spread / count
  if mask is not None:
    spread = jnp.where(mask, spread, 0)
  # The cotangent of x_y, rounded to x_y's dtype (the cast's transpose), then
  # of the input.
  dx = (rstd * (gh - spread)).astype(x_y.dtype).astype(cfg.input_dtype)
  return dx, _mesh.like_primal(dscale, scale), _mesh.like_primal(dbias, bias)



def _tangent(cfg: _Norm, out_dtype, kept, mean, rstd, scale, mask, x_dot, scale_dot, bias_dot):
  """The derivative of flax's normalisation at `kept`, applied to the tangents.

  flax normalises x_y (the input, promoted first by nnx) with statistics of
  x_s, x_y cast to the statistics' dtype (they differ where that dtype is
  narrower): with ``xhat = (x - mean) * rstd``,

    ``dy = rstd * scale * (dx_y - mean(dx_s) - xhat_y * mean(xhat_s * dx_s))
    + xhat_y * dscale + dbias``

  (RMSNorm: no mean), the means over the reduction axes (the masked
  positions; across devices with ``axis_name``).
  """
  # Named again inside: under an outer jax.checkpoint these are the
  # checkpointed tangent's residuals.
  kept = checkpoint_name(kept, NORM_INPUT_NAME)
  mean = None if mean is None else checkpoint_name(mean, NORM_STATS_NAME)
  rstd = checkpoint_name(rstd, NORM_STATS_NAME)
  x_y, stats_dtype, dtype, rstd, xhat = _normaliser(cfg, kept, mean, rstd)
  narrower = jnp.finfo(stats_dtype).bits < jnp.finfo(x_y.dtype).bits

  def row_mean(v):
    (out,) = cfg.pmean(v.mean(cfg.reduction_axes, where=mask, keepdims=True))
    return out

  xhat_y = xhat(x_y)
  xhat_s = xhat(x_y.astype(stats_dtype)) if narrower else xhat_y
  dx_y = cfg.promoted(x_dot)
  dx_s = dx_y.astype(stats_dtype).astype(dtype) if narrower else dx_y.astype(dtype)
  dx_y = dx_y.astype(dtype)
  inner = dx_y - xhat_y * row_mean(xhat_s * dx_s)
  if cfg.use_mean:
    inner = inner - row_mean(dx_s)
  fshape = cfg.feature_shape(x_y.shape)
  mul = rstd if scale is None else rstd * scale.reshape(fshape).astype(dtype)
  out = inner * mul
  if scale is not None:
    out = out + xhat_y * scale_dot.reshape(fshape).astype(dtype)
  if bias_dot is not None:
    out = out + bias_dot.reshape(fshape).astype(dtype)
  return out.astype(out_dtype)


def normalize(x, scale, bias, *, use_mean: bool, reduction_axes, feature_axes, epsilon: float,
               dtype, use_fast_variance: bool, force_float32_reductions: bool, axis_name,
               axis_index_groups, mask, promote_to=None, name: str):
  """Checks the arguments and runs the lean normalisation (every field of flax's two layers).

  `layer_norm` (``use_mean=True``), `rms_norm` and the linen and NNX layers
  call it; not part of the API (not in ``__all__``).
  """
  x = jnp.asarray(x)
  if jnp.iscomplexobj(x) or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} takes a real floating-point input; got {x.dtype}. Use flax's "
                    f"layer for complex inputs (its backward keeps the input-sized arrays).")
  if axis_name is None and axis_index_groups is not None:
    raise ValueError(f"{name}: axis_index_groups {axis_index_groups!r} without an axis_name; "
                     "give the axis_name of the devices the groups divide.")
  cfg = _Norm(canonical_axes(x.ndim, reduction_axes, "reduction_axes"),
              canonical_axes(x.ndim, feature_axes, "feature_axes"), float(epsilon), dtype,
              use_mean,
              bool(use_fast_variance), bool(force_float32_reductions), _hashable(axis_name),
              _hashable(axis_index_groups), promote_to, x.dtype)
  want = tuple(x.shape[a] for a in cfg.feature_axes)
  for label, p in (("scale", scale), ("bias", bias)):
    if p is not None and math.prod(jnp.shape(p)) != math.prod(want):
      raise ValueError(f"{name}: {label} has shape {jnp.shape(p)}, but the input {x.shape} "
                       f"has feature axes {cfg.feature_axes} of sizes {want}: give a {label} "
                       f"of shape {want}.")
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
  with jax.named_scope(name):
    return _norm(x, scale, bias, mask, cfg)


def layer_norm(x, scale=None, bias=None, *, reduction_axes=-1, feature_axes=-1,
               epsilon: float = 1e-6, dtype=None, use_fast_variance: bool = True,
               force_float32_reductions: bool = True, axis_name=None, axis_index_groups=None,
               mask=None) -> jax.Array:
  """Layer normalisation as ``flax.linen.LayerNorm`` computes it, keeping only `x` for backward.

  ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``, with the mean
  and variance over `reduction_axes` (computed in at least float32 unless
  ``force_float32_reductions=False``) and `scale` and `bias` along
  `feature_axes`: bitwise what flax's layer with these fields returns. The
  backward keeps `x` (in its own dtype) and the per-row mean and rstd, and
  computes exact gradients for `x`, `scale` and `bias`.

  Args:
    x: the input, real floating point.
    scale: the scale, of the sizes of `feature_axes` (flax's ``'scale'``
      parameter), or None for none.
    bias: the bias, likewise, or None.
    reduction_axes: the axes of the statistics.
    feature_axes: the axes of `scale` and `bias`.
    epsilon: added to the variance.
    dtype: the output dtype (and the least dtype of the statistics); None:
      inferred from `x`, `scale` and `bias`, as flax does.
    use_fast_variance: variance as ``E[x^2] - E[x]^2`` (flax's default), or
      as ``E[(x - E[x])^2]``.
    force_float32_reductions: compute the statistics in at least float32.
    axis_name: inside ``jax.shard_map`` (or ``pmap``), also average the
      statistics over the devices of this mesh axis, as flax does.
    axis_index_groups: groups of devices within `axis_name` (``lax.pmean``).
    mask: a boolean array broadcastable to `x`: only its True positions
      enter the statistics (all positions are normalised).

  Returns:
    The normalised `x`, of `dtype` or the dtype flax infers.

  Raises:
    TypeError: a complex or integer `x`.
    ValueError: axes that do not fit `x`, `scale` or `bias` of the wrong
      size, `axis_index_groups` without `axis_name`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import fewbit_jax as fb
    >>> x = jax.random.normal(jax.random.key(0), (2, 8), jnp.bfloat16)
    >>> y = fb.layer_norm(x, jnp.ones(8), jnp.zeros(8))
    >>> y.dtype                                 # bf16 x, float32 parameters
    dtype('float32')
    >>> g = jax.grad(lambda x: (fb.layer_norm(x, jnp.ones(8), jnp.zeros(8)) ** 3).sum())(x)
    >>> g.dtype, g.shape
    (dtype(bfloat16), (2, 8))
  """
  return normalize(x, scale, bias, use_mean=True, reduction_axes=reduction_axes,
                    feature_axes=feature_axes, epsilon=epsilon, dtype=dtype,
                    use_fast_variance=use_fast_variance,
                    force_float32_reductions=force_float32_reductions, axis_name=axis_name,
                    axis_index_groups=axis_index_groups, mask=mask, name="layer_norm")


def rms_norm(x, scale=None, *, reduction_axes=-1, feature_axes=-1, epsilon: float = 1e-6,
             dtype=None, use_fast_variance: bool = True, force_float32_reductions: bool = True,
             axis_name=None, axis_index_groups=None, mask=None) -> jax.Array:
  """RMS normalisation as ``flax.linen.RMSNorm`` computes it, keeping only `x` for backward.

  ``y = x * rsqrt(mean(x^2) + epsilon) * scale``, the mean over
  `reduction_axes`: bitwise what flax's layer returns; the backward keeps `x`
  and the per-row rstd. The arguments are `layer_norm`'s (no bias;
  `use_fast_variance` is accepted as flax accepts it and changes nothing).

  Args:
    x: the input, real floating point.
    scale: the scale, of the sizes of `feature_axes`, or None.
    reduction_axes, feature_axes, epsilon, dtype, use_fast_variance,
      force_float32_reductions, axis_name, axis_index_groups, mask: as for
      `layer_norm`.

  Returns:
    The normalised `x`.

  Raises:
    TypeError, ValueError: as `layer_norm`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> x = jax.random.normal(jax.random.key(0), (3, 8))
    >>> y = nn.RMSNorm().apply({"params": {"scale": jnp.ones(8)}}, x)
    >>> bool(jnp.all(fb.rms_norm(x, jnp.ones(8)) == y))
    True
  """
  return normalize(x, scale, None, use_mean=False, reduction_axes=reduction_axes,
                    feature_axes=feature_axes, epsilon=epsilon, dtype=dtype,
                    use_fast_variance=use_fast_variance,
                    force_float32_reductions=force_float32_reductions, axis_name=axis_name,
                    axis_index_groups=axis_index_groups, mask=mask, name="rms_norm")
