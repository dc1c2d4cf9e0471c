"""Dropout whose backward pass keeps its mask packed, eight elements to a byte.

`dropout` computes what ``flax.linen.Dropout`` and ``flax.nnx.Dropout``
compute, from the same random bits (``jax.random.bernoulli`` of the key, over
the input's shape with `broadcast_dims` set to 1): the output is bitwise
flax's for the same key. Autodiff of flax's layer keeps the boolean mask (one
byte per element) for the backward pass; this ``jax.custom_jvp`` keeps it
packed eight to a byte (named ``'dropout_mask'``) and unpacks it inside the
backward's select. It does not draw the mask again: on the CPU a draw holds
eight bytes an element while it runs, more than flax's kept mask, so a second
draw in the backward raised the peak of most programs. The derivative is
autodiff's, ``select(mask, t / keep_prob, 0)``, in forward mode too
(``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``). With ``out_sharding`` (an
Explicit mesh) the mask is kept as flax keeps it.

The layers are `fewbit_jax.Dropout` (linen) and `fewbit_jax.nnx.Dropout`;
`fewbit_jax.linen.lean` and `fewbit_jax.nnx.convert_lean` convert existing
models to them.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import fewbit_jax as fb
  >>> from fewbit_jax.dropout import dropout
  >>> x, key = jnp.ones((4, 64)), jax.random.key(0)
  >>> res = fb.memory.saved_residuals(lambda x: (dropout(x, 0.1, key) ** 2).sum(), x)
  >>> sorted(r.dtype for r in res.residuals)   # the square's input and the packed mask
  ['float32', 'uint8']
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax, random
from jax.ad_checkpoint import checkpoint_name

from fewbit_jax import sharded as _sharded

__all__ = ["dropout", "DROPOUT_MASK_NAME"]

# checkpoint_name of the packed mask the backward pass keeps.
DROPOUT_MASK_NAME = "dropout_mask"


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


_BITS = 8


def _pack(mask):
  """A boolean mask packed eight to a byte along its last axis (padded with False)."""
  mask = mask.reshape(mask.shape or (1,))
  pad = -mask.shape[-1] % _BITS
  mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)])
  mask = mask.reshape(mask.shape[:-1] + (mask.shape[-1] // _BITS, _BITS)).astype(jnp.uint8)
  return jnp.sum(mask << jnp.arange(_BITS, dtype=jnp.uint8), -1, dtype=jnp.uint8)


def _unpack(packed, mask_shape):
  """`_pack`'s inverse: the boolean mask of `mask_shape`."""
  bits = (packed[..., None] >> jnp.arange(_BITS, dtype=jnp.uint8)) & 1
  bits = bits.reshape(packed.shape[:-1] + (packed.shape[-1] * _BITS,))
  return bits[..., :(mask_shape[-1] if mask_shape else 1)].astype(bool).reshape(mask_shape)


def _apply(mask, x, keep_prob):
  """flax's ``select(mask, x / keep_prob, 0)``, `mask` broadcast to `x`."""
  return lax.select(jnp.broadcast_to(mask, x.shape), x / keep_prob, jnp.zeros_like(x))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _dropout(x, key, keep_prob, broadcast_dims, out_sharding):
  mask = _draw(key, keep_prob, _mask_shape(x.shape, broadcast_dims), out_sharding)
  return _apply(mask, x, keep_prob)


@_dropout.defjvp
def _dropout_jvp(keep_prob, broadcast_dims, out_sharding, primals, tangents):
  # The tangent is linear in x's, through the mask only. Reverse mode keeps
  # what the tangent reads: flax's boolean mask (one byte an element) under
  # autodiff; here the mask packed eight to a byte, unpacked again (fused
  # into the select) by the checkpointed tangent when the cotangent comes.
  # No second draw: on the CPU a draw holds 8 bytes an element while it runs.
  (x, key), (x_dot, _) = primals, tangents
  mask_shape = _mask_shape(x.shape, broadcast_dims)
  mask = _draw(key, keep_prob, mask_shape, out_sharding)
  y = _apply(mask, x, keep_prob)
  if out_sharding is not None:  # a sharded mask stays as flax keeps it
    return y, _apply(mask, x_dot, keep_prob)
  packed = checkpoint_name(_pack(mask), DROPOUT_MASK_NAME)
  tangent = jax.checkpoint(lambda packed, t: _apply(_unpack(packed, mask_shape), t, keep_prob))
  return y, tangent(packed, x_dot)


def dropout(x, rate: float, key, *, broadcast_dims: Sequence[int] = (),
            out_sharding=None) -> jax.Array:
  """Dropout as flax computes it, keeping the mask packed for the backward pass.

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
    >>> from fewbit_jax.dropout import dropout
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
