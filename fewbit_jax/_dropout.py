"""Dropout as flax computes it, with forward-mode derivatives, keeping no mask.

`dropout` computes what ``flax.linen.Dropout`` and ``flax.nnx.Dropout``
compute, from the same random bits (``jax.random.bernoulli`` of the key, over
the input's shape with `broadcast_dims` set to 1): the output is bitwise
flax's for the same key, and so is the derivative, ``select(mask, t /
keep_prob, 0)``, in forward mode too (``jax.jvp``, ``jax.jacfwd``,
``jax.linearize``). Where JAX differentiates it for reverse mode, the
backward keeps only the key, not flax's boolean mask (one byte an element),
and draws the mask again when the cotangent arrives. On the CPU, whose
threefry lowering holds two ``uint32`` arrays of the mask's size while a
draw runs (8 bytes an element, more than the mask it replaces), the backward
draws the same bits a block of rows at a time (`REDRAW_BLOCK` elements);
other platforms fuse the draw and run it whole. Bitwise the same mask: a
test compares it with ``jax.random.bernoulli``'s for every shape tried.

The layers are `fewbit_jax.Dropout` (linen) and `fewbit_jax.nnx.Dropout`;
`fewbit_jax.linen.lean` and `fewbit_jax.nnx.convert_lean` convert existing
models to them.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import fewbit_jax as fb
  >>> from fewbit_jax import dropout
  >>> x, key = jnp.ones((256, 512)), jax.random.key(0)     # more than REDRAW_BLOCK elements
  >>> flax_drop = lambda x: nn.Dropout(0.1, deterministic=False).apply({}, x, rng=key)
  >>> kept = [fb.memory.saved_residuals(lambda x: (f(x) ** 2).sum(), x).by_dtype()
  ...         for f in (lambda x: dropout(x, 0.1, key), flax_drop)]
  >>> "bool" in kept[0], "bool" in kept[1]       # flax keeps its mask, dropout the key
  (False, True)
  >>> t = jnp.arange(512.0).reshape(1, 512)
  >>> bool(jnp.allclose(jax.jvp(lambda x: dropout(x, 0.1, key), (x[:1],), (t,))[1], flax_drop(t)))
  True
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_derivatives, lax, random
from jax.extend.random import threefry2x32_p

from fewbit_jax import _sharded
from fewbit_jax.norms import linearizing as _linearizing

__all__ = ["dropout", "REDRAW_BLOCK"]

# Mask elements the CPU backward draws at once (a block of whole rows of the
# mask, at least one): two uint32 arrays of this size are what the draw holds.
REDRAW_BLOCK = 1 << 16


def key_after(key, dep):
  """`key` unchanged, but usable only once `dep` is computed (typed or raw uint32 keys).

  A backward pass that draws a mask again from the forward's key would, left
  alone, have its random bits merged by XLA with the forward's identical ones
  (common-subexpression elimination), which then stay alive from the forward
  to the backward: four bytes per element where flax keeps a one-byte mask.
  Tying the key to the cotangent makes the backward's draw a computation of
  its own, run when the cotangent arrives.
  """
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return _sharded.after(key, dep)
  data = _sharded.after(random.key_data(key), dep)
  return random.wrap_key_data(data, impl=random.key_impl(key))


def _mask_shape(shape, broadcast_dims):
  mask_shape = list(shape)
  for dim in broadcast_dims:
    mask_shape[dim] = 1
  return tuple(mask_shape)


def _draw(key, keep_prob: float, mask_shape, out_sharding):
  """flax's mask: bernoulli(keep_prob) over `mask_shape` (broadcast dims of size 1)."""
  kw = {} if out_sharding is None else {"out_sharding": out_sharding}
  return random.bernoulli(key, p=keep_prob, shape=mask_shape, **kw)


def _apply(mask, x, keep_prob):
  """flax's ``select(mask, x / keep_prob, 0)``, `mask` broadcast to `x`."""
  return lax.select(jnp.broadcast_to(mask, x.shape), x / keep_prob, jnp.zeros_like(x))


def _threefry_words(key):
  """The two uint32 words of a threefry2x32 key (typed or raw), or None for other generators."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(random.key_impl(key)) != "threefry2x32":
      return None
    return random.key_data(key)
  if jax.config.jax_default_prng_impl != "threefry2x32" or key.shape != (2,):
    return None
  return key


def _bernoulli_flat(words, keep_prob: float, start, size: int):
  """``jax.random.bernoulli(key, keep_prob, shape)`` at flat positions start, ..., start + size - 1.

  jax's partitionable threefry draws element i from the counter (0, i):
  bits = threefry2x32(key, (0, i)) xored, uniform = bits >> 9 as the mantissa
  of [1, 2) minus 1, and the mask uniform < keep_prob (in float32).
  """
  lo = lax.iota(jnp.uint32, size) + start.astype(jnp.uint32)
  b1, b2 = threefry2x32_p.bind(words[0], words[1], jnp.zeros_like(lo), lo)
  mantissa = ((b1 ^ b2) >> np.uint32(9)) | np.uint32(0x3F800000)
  uniform = lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
  return uniform < np.float32(keep_prob)


def _in_blocks(words, x, keep_prob, mask_shape):
  """`_apply` of flax's mask drawn a block of rows at a time (the CPU's draw).

  The rows are those of the mask's first axis that is not broadcast (the
  mask is 1 before it, so its flat position is row * inner).
  """
  axis = next(a for a, n in enumerate(mask_shape) if n > 1)
  rows = mask_shape[axis]
  inner = math.prod(mask_shape[axis + 1:])
  per = max(1, min(rows, REDRAW_BLOCK // inner))
  full, tail = divmod(rows, per)  # full blocks in a loop, the last rows after it

  def block(x, start, size):  # in place: rows start..start+size of x become their output
    shape = mask_shape[:axis] + (size,) + mask_shape[axis + 1:]
    mask = _bernoulli_flat(words, keep_prob, start * inner, size * inner).reshape(shape)
    xs = lax.dynamic_slice_in_dim(x, start, size, axis)
    return lax.dynamic_update_slice_in_dim(x, _apply(mask, xs, keep_prob), start, axis)

  x = lax.fori_loop(0, full, lambda i, x: block(x, i * per, per), x)
  return block(x, jnp.int32(full * per), tail) if tail else x


def _trivially_placed(out_sharding) -> bool:
  """No sharding given, or one on a mesh of one device (nothing to keep in step)."""
  if out_sharding is None:
    return True
  mesh = getattr(out_sharding, "mesh", None)
  return mesh is not None and (mesh.empty or mesh.size == 1)


def _redraws(key, mask_shape, out_sharding) -> bool:
  """Whether the backward draws the mask again (keeping the key) rather than keep flax's.

  It does for masks of more than `REDRAW_BLOCK` elements from threefry keys
  on one device; smaller masks, other generators, 64-bit mode and sharded
  masks keep flax's boolean mask.
  """
  size = math.prod(mask_shape)
  return (REDRAW_BLOCK < size < 2 ** 32 and _threefry_words(key) is not None
          and not jax.config.jax_enable_x64 and _trivially_placed(out_sharding))


def _masked(key, x, keep_prob, mask_shape, out_sharding, after=None):
  """``_apply(flax's mask, x, keep_prob)``, the mask drawn from `key` (once `after` is computed).

  On the CPU a block of rows at a time: XLA would otherwise hold the draw's
  two uint32 arrays (8 bytes an element) and, in a backward pass, fuse the
  forward's select into its consumers, keeping those bits alive instead of
  the output. Elsewhere the draw is one fused computation.
  """
  def whole(key, x):
    if after is not None:
      key = key_after(key, after)
    return _apply(_draw(key, keep_prob, mask_shape, out_sharding), x, keep_prob)

  words = _threefry_words(key)
  return lax.platform_dependent(
      key, x, cpu=lambda key, x: _in_blocks(words, x, keep_prob, mask_shape), default=whole)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _dropout(x, key, keep_prob, broadcast_dims, out_sharding):
  mask_shape = _mask_shape(x.shape, broadcast_dims)
  if _redraws(key, mask_shape, out_sharding):
    return _masked(key, x, keep_prob, mask_shape, out_sharding)
  return _apply(_draw(key, keep_prob, mask_shape, out_sharding), x, keep_prob)


@_dropout.defjvp
def _dropout_jvp(keep_prob, broadcast_dims, out_sharding, primals, tangents):
  # The tangent is select(mask, t / keep_prob, 0). Where JAX linearizes for
  # reverse mode it is a linear_call whose transpose draws the mask again
  # from the key (kept instead of the mask) when the cotangent arrives;
  # under forward mode, vmap or an outer derivative, autodiff of flax's select.
  (x, key), (x_dot, _) = primals, tangents
  mask_shape = _mask_shape(x.shape, broadcast_dims)
  if _redraws(key, mask_shape, out_sharding) and _linearizing((x,), (x_dot,)):
    y = _masked(key, x, keep_prob, mask_shape, out_sharding)
    tangent = lambda key, t: _masked(key, t, keep_prob, mask_shape, out_sharding)
    transpose = lambda key, ct: _masked(key, ct, keep_prob, mask_shape, out_sharding, after=ct)
    return y, custom_derivatives.linear_call(tangent, transpose, key, x_dot)
  mask = _draw(key, keep_prob, mask_shape, out_sharding)
  return jax.jvp(lambda x: _apply(mask, x, keep_prob), (x,), (x_dot,))


def dropout(x, rate: float, key, *, broadcast_dims: Sequence[int] = (),
            out_sharding=None) -> jax.Array:
  """Dropout as flax computes it (the same mask, output and derivatives), forward mode too.

  Zeroes each element of `x` with probability `rate` and scales the others
  by ``1 / (1 - rate)``: the same mask as ``flax.linen.Dropout`` and
  ``flax.nnx.Dropout`` draw from `key`, so the same output, bitwise.
  ``rate == 0`` returns `x`; ``rate == 1`` zeros (flax's edge cases).

  Args:
    x: the input.
    rate: the probability of dropping an element (not the keep rate), a
      Python number in [0, 1].
    key: a ``jax.random`` key (typed or raw uint32).
    broadcast_dims: axes along which the mask is shared.
    out_sharding: the sharding of the mask, as ``jax.random.bernoulli``
      takes it (``flax.nnx.Dropout`` passes ``jax.typeof(x).sharding``;
      the values do not depend on it).

  Returns:
    The masked, rescaled `x`.

  Raises:
    ValueError: `rate` outside [0, 1] or a traced `rate`, or
      `broadcast_dims` that do not fit `x`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from fewbit_jax import dropout
    >>> x, key = jnp.arange(1.0, 9.0), jax.random.key(1)
    >>> y = nn.Dropout(0.5, deterministic=False).apply({}, x, rng=key)
    >>> bool(jnp.all(dropout(x, 0.5, key) == y))
    True
  """
  try:
    rate = float(rate)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"dropout needs a Python number for rate (as flax's Dropout); got "
                     f"{rate!r}") from None
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"dropout rate must be in [0, 1] (the probability of dropping an "
                     f"element); got {rate}")
  x = jnp.asarray(x)
  dims = tuple(broadcast_dims)
  if any(not isinstance(d, int) or not -x.ndim <= d < x.ndim for d in dims):
    raise ValueError(f"dropout broadcast_dims {dims} do not fit an input of rank {x.ndim}")
  if rate == 0.0:
    return x
  if rate == 1.0:  # flax's edge case: no division by zero, no NaN gradients
    return jnp.zeros_like(x)
  with jax.named_scope("dropout"):
    return _dropout(x, key, 1.0 - rate, dims, out_sharding)
