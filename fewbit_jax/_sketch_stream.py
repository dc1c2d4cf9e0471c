"""Where a randomized flax layer gets a fresh sketch key on every call.

A randomized layer draws a new sketch on every call, so it needs a new key
each time. In linen the key comes from the module's rng stream
(``make_rng(collection)``; a ``'params'`` rng serves where there is no such
stream, as ``make_rng`` does). In NNX it comes from the ``RngStream`` the
layer forked from its ``rngs`` at construction, or from a key, stream or
``Rngs`` given to the call. Where there is none, both raise the same error,
which says how to pass one and that ``deterministic=True`` needs none.
"""

from __future__ import annotations

import itertools

import jax
from flax import nnx
from flax.nnx import rnglib

__all__ = ["missing_rng_error", "linen_key", "nnx_fork", "nnx_key", "nnx_source"]


def missing_rng_error(owner: str, collection: str, how: str) -> ValueError:
  """The error of a randomized layer called without an rng: what is missing and `how` to pass it.

  Example:
    >>> from fewbit_jax._sketch_stream import missing_rng_error
    >>> print(missing_rng_error("RandomizedDense", "sketch", "Pass one."))
    RandomizedDense draws a new random sketch on every call from the 'sketch' rng stream, ...
  """
  return ValueError(
      f"{owner} draws a new random sketch on every call from the {collection!r} rng "
      f"stream, and none was given. {how} For evaluation without gradients pass "
      "deterministic=True instead: the layer is then exactly the plain dense layer "
      "and needs no rng.")


def linen_key(module, collection: str, owner: str) -> jax.Array:
  """``module.make_rng(collection)``, or the error that says how to pass that rng.

  Args:
    module: the bound linen module drawing the key.
    collection: its rng stream, e.g. ``'sketch'``.
    owner: who draws, for the error (a class name or a converter and a path).

  Raises:
    ValueError: `module` has neither a `collection` nor a ``'params'`` rng.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from fewbit_jax._sketch_stream import linen_key
    >>> class Draw(nn.Module):
    ...   def __call__(self):
    ...     return linen_key(self, "sketch", "Draw")
    >>> key = Draw().apply({}, rngs={"sketch": jax.random.key(0)})
    >>> Draw().apply({})
    Traceback (most recent call last):
    ValueError: Draw draws a new random sketch on every call from the 'sketch' rng stream, ...
  """
  if not (module.has_rng(collection) or module.has_rng("params")):
    raise missing_rng_error(
        owner, collection,
        f"Pass a fresh key each step: model.apply(variables, x, "
        f"rngs={{{collection!r}: jax.random.fold_in(key, step)}}).")
  return module.make_rng(collection)


def nnx_fork(rngs: rnglib.Rngs, collection: str):
  """The value of a layer's own sketch stream attribute: a fork of `rngs`' `collection` stream.

  ``rngs[collection]`` is the ``'default'`` stream where `rngs` has no
  `collection` one; where it has neither, the layer has no stream
  (``nnx.data(None)``) and only calls given ``rngs=`` can sketch.

  Example:
    >>> from flax import nnx
    >>> from fewbit_jax._sketch_stream import nnx_fork
    >>> class Layer(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.rngs = nnx_fork(rngs, "sketch")
    >>> type(Layer(nnx.Rngs(0, sketch=1)).rngs).__name__
    'RngStream'
    >>> Layer(nnx.Rngs(params=0)).rngs is None
    True
  """
  try:
    stream = rngs[collection]
  except KeyError:  # no such stream and no default
    stream = None
  return stream.fork() if stream is not None else nnx.data(None)


def nnx_key(rngs, collection: str, owner: str) -> jax.Array:
  """This call's sketch key, from a key, an ``RngStream`` or an ``Rngs``' `collection` stream.

  Args:
    rngs: the call's ``rngs=`` argument, else the layer's own stream (None
      where it has none).
    collection: the layer's rng stream name.
    owner: the layer's class name, for the error.

  Raises:
    ValueError: `rngs` is None (the error says how to give the layer a stream).
    TypeError: `rngs` is none of these.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from fewbit_jax._sketch_stream import nnx_key
    >>> key = nnx_key(nnx.Rngs(sketch=0), "sketch", "RandomizedLinear")
    >>> nnx_key(key, "sketch", "RandomizedLinear") is key
    True
  """
  if isinstance(rngs, rnglib.Rngs):
    return rngs[collection]()
  if isinstance(rngs, rnglib.RngStream):
    return rngs()
  if isinstance(rngs, jax.Array):
    return rngs
  if rngs is None:
    raise missing_rng_error(
        owner, collection,
        f"Construct it with a stream for it, e.g. rngs=nnx.Rngs(params=0, "
        f"{collection}=1) (or nnx.Rngs(0)), or pass one per call: layer(x, rngs=key).")
  raise TypeError(f"rngs must be an nnx.Rngs, nnx.RngStream or a key array; got "
                  f"{type(rngs).__name__}.")


_default_seeds = itertools.count()


def nnx_source(rngs, collection: str) -> rnglib.RngStream:
  """The stream a converted layer forks its own sketch stream from.

  Args:
    rngs: an ``nnx.Rngs`` (its `collection` stream), an ``RngStream``, a seed
      or a key; None: a fresh stream seeded from a process-wide counter
      (distinct per conversion).
    collection: the converted layer's rng stream name.

  Raises:
    TypeError: `rngs` is none of these.

  Example:
    >>> from flax import nnx
    >>> from fewbit_jax._sketch_stream import nnx_source
    >>> type(nnx_source(7, "sketch")).__name__
    'RngStream'
  """
  if rngs is None:
    return nnx.Rngs(**{collection: next(_default_seeds)})[collection]
  if isinstance(rngs, rnglib.Rngs):
    return rngs[collection]
  if isinstance(rngs, rnglib.RngStream):
    return rngs
  if isinstance(rngs, (int, jax.Array)):
    return nnx.Rngs(**{collection: rngs})[collection]
  raise TypeError(f"rngs must be an nnx.Rngs, an nnx.RngStream, a seed or a key; got "
                  f"{type(rngs).__name__}")
