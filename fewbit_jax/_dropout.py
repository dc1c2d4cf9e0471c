"""Dropout as flax computes it, with forward-mode derivatives, keeping flax's mask.

`dropout` computes what ``flax.linen.Dropout`` and ``flax.nnx.Dropout``
compute, from the same random bits (``jax.random.bernoulli`` of the key, over
the input's shape with `broadcast_dims` set to 1): the output is bitwise
flax's for the same key, and so is the derivative, ``select(mask, t /
keep_prob, 0)``, in forward mode too (``jax.jvp``, ``jax.jacfwd``,
``jax.linearize``). The backward keeps what flax's keeps, the boolean mask
(one byte per element), and no more: drawing the mask again in the backward
from the key holds, on the CPU, two uint32 arrays of the input's size while
the draw runs (8 bytes an element), which raised the peak of programs whose
peak is in the backward above flax's (``tanh(dropout(sin x))``: 8.00
against 6.00 MiB at 256 x 2048), and a mask packed eight to a byte measured
a few bytes more than flax's in every program tried.

The layers are `fewbit_jax.Dropout` (linen) and `fewbit_jax.nnx.Dropout`;
`fewbit_jax.linen.lean` and `fewbit_jax.nnx.convert_lean` convert existing
models to them.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import fewbit_jax as fb
  >>> from fewbit_jax import dropout
  >>> x, key = jnp.ones((4, 64)), jax.random.key(0)
  >>> flax_drop = lambda x: nn.Dropout(0.1, deterministic=False).apply({}, x, rng=key)
  >>> kept = [fb.memory.saved_residuals(lambda x: (f(x) ** 2).sum(), x).by_dtype()
  ...         for f in (lambda x: dropout(x, 0.1, key), flax_drop)]
  >>> kept[0] == kept[1]
  True
  >>> t = jnp.arange(64.0).reshape(1, 64)
  >>> bool(jnp.allclose(jax.jvp(lambda x: dropout(x, 0.1, key), (x[:1],), (t,))[1], flax_drop(t)))
  True
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax, random

from fewbit_jax import _sharded

__all__ = ["dropout"]


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


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _dropout(x, key, keep_prob, broadcast_dims, out_sharding):
  mask = _draw(key, keep_prob, _mask_shape(x.shape, broadcast_dims), out_sharding)
  return _apply(mask, x, keep_prob)


@_dropout.defjvp
def _dropout_jvp(keep_prob, broadcast_dims, out_sharding, primals, tangents):
  # autodiff's derivative of flax's select: reverse mode keeps flax's boolean
  # mask, one byte an element. Drawing it again in the backward (keeping
  # only the key) held two uint32 arrays of the input's size while the draw
  # ran on the CPU, and a mask packed eight to a byte added its own small
  # buffers: both kept more than flax in programs whose peak is in the
  # backward (issue 17), so the mask is kept as flax keeps it.
  (x, key), (x_dot, _) = primals, tangents
  mask = _draw(key, keep_prob, _mask_shape(x.shape, broadcast_dims), out_sharding)
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
