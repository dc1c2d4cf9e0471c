"""Where a randomized flax layer gets a fresh sketch key on every call.

A randomized layer draws a new sketch on every call, so it needs a new key
each time. In linen the key comes from the module's rng stream
(``make_rng(collection)``; a ``'params'`` rng serves where there is no such
stream, as ``make_rng`` does). In NNX it comes, in this order, from a key,
stream or ``Rngs`` given to the call; from the innermost `step_keys` scope
the call runs in; or from the ``RngStream`` the layer forked from its
``rngs`` at construction. Where there is none, both raise the same error,
which says how to pass one and that ``deterministic=True`` needs none.

Randomness without mutation: a layer's own stream advances a counter, which
only NNX's transforms (``nnx.jit``, ``nnx.value_and_grad``, ``nnx.scan``...)
carry out of a trace. Where a model is merged inside plain ``jax.jit`` /
``jax.value_and_grad`` (flax's functional loop) the advance would be lost
and the same sketch drawn every step, so a step enters `step_keys` with a
fresh key instead, and each layer derives its key from it and a salt of its
own (its stream's key, which is state: stable across split and merge, and
stacked with the layer under ``nnx.vmap`` / ``nnx.scan``). A draw whose key
would repeat every step is never silent: `nnx_key` reports it, and
`guard_gradient` makes a gradient through it raise.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import zlib

import jax
import numpy as np
from flax import errors as flax_errors
from flax import nnx
from flax.nnx import graphlib, rnglib

__all__ = ["missing_rng_error", "linen_key", "KeyStream", "own_stream", "nnx_fork", "nnx_key",
           "nnx_source", "step_keys", "in_step_keys", "scoped_key", "stream_key", "guard_gradient"]


def missing_rng_error(owner: str, collection: str, how: str,
                      missing: str = "none was given") -> ValueError:
  """The error of a randomized layer called without an rng: what is missing and `how` to pass it.

  Example:
    >>> from fewbit_jax._sketch_stream import missing_rng_error
    >>> print(missing_rng_error("RandomizedDense", "sketch", "Pass one."))
    RandomizedDense draws a new random sketch on every call from the 'sketch' rng stream, ...
  """
  return ValueError(
      f"{owner} draws a new random sketch on every call from the {collection!r} rng "
      f"stream, and {missing}. {how} For evaluation without gradients pass "
      "deterministic=True instead: the layer is then exactly the plain dense layer "
      "and needs no rng.")


def _given_but_not_lifted(module, collection: str) -> bool:
  """Whether `collection` was given to ``apply`` but a lifted transform did not pass it in.

  A lifted transform (``nn.scan``, ``nn.vmap``) starts a new scope holding
  only the rngs of its ``split_rngs``; its scopes still count the draws of
  the collections ``apply`` was given, which is how a dropped one shows.
  """
  scope = getattr(module, "scope", None)
  while scope is not None:
    counters = getattr(scope, "rng_counters", None) or {}
    if collection in counters:
      return True
    scope = getattr(scope, "parent", None)
  return False


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
    if _given_but_not_lifted(module, collection):
      raise missing_rng_error(
          owner, collection,
          f"Add it to the split_rngs of that transform, e.g. nn.scan(..., "
          f"variable_axes={{'params': 0}}, split_rngs={{'params': True, {collection!r}: "
          "True}), so that each layer or iteration draws a key of its own.",
          missing=f"none reached it: model.apply was given a {collection!r} rng, but a lifted "
          "transform between the apply and this layer (nn.scan, nn.vmap, ...) does not "
          "pass it in: it is not in that transform's split_rngs")
    raise missing_rng_error(
        owner, collection,
        f"Pass a fresh key each step: model.apply(variables, x, "
        f"rngs={{{collection!r}: jax.random.fold_in(key, step)}}).")
  return module.make_rng(collection)


class _ScopeTolerant:
  """A stream Variable that a transform's write-back from another trace leaves alone in a scope.

  ``nnx.remat`` (and NNX's other graph transforms) write every Variable of
  their inputs back when they return, changed or not. In flax's functional
  loop the non-parameter state (``rest``, closed over by
  ``jax.value_and_grad``) lives in the jitted step's trace, so that write
  raises ``TraceContextError`` for any rng stream of the model, although
  nothing advanced it; and ``nnx.scan``/``nnx.vmap`` refuse to take such a
  Variable in at all. Inside a `step_keys` scope no layer draws from its own
  stream (keys come from the scope; a draw still raises, as ever), so the
  stream is only read: the transforms may take it in, and their write-back
  of it is skipped. Outside a scope flax's checks stand.
  """

  def _skips_write(self) -> bool:
    return not self.hijax and not self._trace_state.is_valid() and bool(_SCOPES.get())

  @property
  def _can_update(self) -> bool:
    return super()._can_update or bool(_SCOPES.get())

  def update_from_state(self, variable_state):
    if not self._skips_write():
      super().update_from_state(variable_state)

  def set_raw_value(self, value, **kwargs):
    if not self._skips_write():
      super().set_raw_value(value, **kwargs)


class _StreamKey(_ScopeTolerant, rnglib.RngKey):
  """A `KeyStream`'s key: raw ``uint32[..., 2]`` key data (it serialises as any array)."""


class _StreamCount(_ScopeTolerant, rnglib.RngCount):
  """A `KeyStream`'s count of draws."""


class KeyStream(rnglib.RngStream):
  """An ``nnx.RngStream`` that keeps its key as raw ``uint32`` data, for the layers' own streams.

  It draws the very keys an ``nnx.RngStream`` with the same key draws
  (``fold_in(key, count)``, returned as a typed key) and is one for
  ``isinstance``, ``nnx.RngState`` filters, ``nnx.jit`` and the other
  transforms. Two things differ: its key is stored as ``uint32`` key data, so
  ``nnx.state(model).to_pure_dict()`` holds only plain arrays and
  ``flax.serialization.msgpack_serialize`` takes it (orbax already does); and
  its Variables let ``nnx.remat``/``nnx.scan`` return inside a `step_keys`
  scope in flax's functional loop (`_ScopeTolerant`).

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from fewbit_jax._sketch_stream import KeyStream
    >>> ours, theirs = KeyStream(jax.random.key(3), tag="sketch"), nnx.RngStream(3, tag="sketch")
    >>> bool((jax.random.key_data(ours()) == jax.random.key_data(theirs())).all())
    True
    >>> ours.key[...].dtype
    dtype('uint32')
  """

  def __init__(self, key, *, tag: str):  # pylint: disable=super-init-not-called
    if isinstance(key, int):
      key = jax.random.key(key)
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    key = jax.numpy.asarray(key)
    if key.dtype != np.uint32 or key.shape[-1:] != (2,):
      raise ValueError(f"KeyStream needs a PRNG key (typed, or raw uint32[..., 2] data); got "
                       f"dtype {key.dtype} and shape {key.shape}.")
    self.tag = tag
    self.key = _StreamKey(key, tag=tag)
    self.count = _StreamCount(jax.numpy.zeros(key.shape[:-1], np.uint32), tag=tag)

  def __call__(self) -> jax.Array:
    self.count._check_can_update()
    key = jax.random.fold_in(jax.random.wrap_key_data(self.key[...]), self.count[...])
    self.count[...] += 1
    return key


def own_stream(source: rnglib.RngStream) -> KeyStream:
  """A layer's own stream: a `KeyStream` forked from `source` (one draw, as ``source.fork()``).

  Example:
    >>> from flax import nnx
    >>> from fewbit_jax._sketch_stream import own_stream
    >>> source = nnx.Rngs(sketch=1)["sketch"]
    >>> type(own_stream(source)).__name__, int(source.count[...])
    ('KeyStream', 1)
  """
  return KeyStream(source(), tag=source.tag)


def nnx_fork(rngs: rnglib.Rngs, collection: str):
  """The value of a layer's own sketch stream attribute: a fork of `rngs`' `collection` stream.

  ``rngs[collection]`` is the ``'default'`` stream where `rngs` has no
  `collection` one; where it has neither, the layer has no stream
  (``nnx.data(None)``) and only calls given ``rngs=`` can sketch. The fork
  is a `KeyStream` (the keys of ``stream.fork()``, stored as raw data).

  Example:
    >>> from flax import nnx
    >>> from fewbit_jax._sketch_stream import nnx_fork
    >>> class Layer(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.rngs = nnx_fork(rngs, "sketch")
    >>> type(Layer(nnx.Rngs(0, sketch=1)).rngs).__name__
    'KeyStream'
    >>> Layer(nnx.Rngs(params=0)).rngs is None
    True
  """
  try:
    stream = rngs[collection]
  except KeyError:  # no such stream and no default
    stream = None
  return own_stream(stream) if stream is not None else nnx.data(None)


# --------------------------------------------------------------------------
# The key scope: randomness for a step without mutating any state.


class _Scope:
  """One entered `step_keys`: its key and, per drawing holder, how many keys it has drawn."""

  def __init__(self, key: jax.Array):
    self.key = key
    self.draws: dict[int, tuple[object, int]] = {}  # id(holder) -> (holder, draws so far)

  def index(self, holder) -> int:
    """The number of keys `holder` drew from this scope before (its next draw's index)."""
    _, n = self.draws.get(id(holder), (holder, 0))
    self.draws[id(holder)] = (holder, n + 1)  # the holder is kept so its id is not reused
    return n


_SCOPES: contextvars.ContextVar[tuple[_Scope, ...]] = contextvars.ContextVar(
    "fewbit_jax_step_keys", default=())


def _one_key(key) -> jax.Array:
  """`key` if it is one PRNG key (typed, or a raw ``uint32[2]``); else a TypeError."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) \
      and np.shape(key) == ():
    return key
  if dtype == np.uint32 and np.shape(key) == (2,):
    return key
  raise TypeError(
      f"step_keys needs one PRNG key, e.g. jax.random.fold_in(key, step) with key = "
      f"jax.random.key(0), passed into the jitted step as an argument; got "
      f"{type(key).__name__}{'' if dtype is None else f' of dtype {dtype}'} with shape "
      f"{np.shape(key)}.")


@contextlib.contextmanager
def step_keys(key: jax.Array):
  """A scope whose calls of randomized layers take their keys from `key`, mutating nothing.

  Inside it, each randomized NNX layer (and any layer built on `scoped_key`)
  draws ``fold_in`` of `key` with a salt of its own: its rng stream's key,
  which is state, so it is the same after ``nnx.split``/``nnx.merge``,
  differs between layers, and under ``nnx.vmap``/``nnx.scan`` is stacked with
  the layers, which so get different keys too. A layer called twice in the
  scope gets a new key each time. Nothing is advanced, so this works where a
  layer may not mutate its stream: a model merged with ``nnx.merge`` inside
  ``jax.jit`` and ``jax.value_and_grad`` (flax's functional training loop).
  It works inside ``nnx.jit`` too; a key given to a call still comes first.

  Enter it inside the jitted step with a key that is an argument of the step
  and differs every step (``jax.random.fold_in(key, step)``): the sketch is
  then new every step, and the same key every step would give the same
  sketch every step (a biased weight update). A key fixed outside the
  jitted function would be compiled into it as a constant and reused by
  every later call; a layer that sees a concrete scope key while it is
  staged (jit, and also scan or remat) raises where it is differentiated.
  Scopes nest; the innermost serves.

  Args:
    key: one PRNG key (``jax.random.key``, or a raw ``uint32[2]``).

  Yields:
    None.

  Raises:
    TypeError: `key` is not one PRNG key.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> model = fb.nnx.RandomizedLinear(3, 2, rngs=nnx.Rngs(0, sketch=1))
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> @jax.jit
    ... def grads(params, rest, x, key):
    ...   def loss(params):
    ...     return nnx.merge(graphdef, params, rest)(x).sum()
    ...   with fb.nnx.step_keys(key):
    ...     return jax.grad(loss)(params)
    >>> x = jnp.ones((16, 3))
    >>> g0, g1 = (grads(params, rest, x, jax.random.fold_in(jax.random.key(0), step))
    ...           for step in range(2))
    >>> bool(jnp.all(g0['kernel'][...] == g1['kernel'][...]))  # a new sketch every step
    False
  """
  scope = _Scope(_one_key(key))
  token = _SCOPES.set(_SCOPES.get() + (scope,))
  try:
    yield
  finally:
    _SCOPES.reset(token)


def _staged() -> bool:
  """Whether this code is being staged into a jaxpr (jit, scan, remat): ops make tracers."""
  return isinstance(jax.lax.add(np.uint32(0), np.uint32(0)), jax.core.Tracer)


def _frozen_constant(owner: str) -> str:
  return (f"{owner} takes its key from a fb.nnx.step_keys scope whose key is a concrete "
          "array while the call is traced (by jax.jit or another transform that stages it): "
          "the key is compiled into the traced function as a constant, so every later call "
          "of the compiled step reuses it, the same random draw every step (for a sketch: a "
          "biased weight update). Pass the key into the jitted step as an argument "
          "(jax.random.fold_in(key, step)) and enter step_keys inside the step.")


def in_step_keys() -> bool:
  """Whether a `step_keys` scope is active (layers draw from it, advancing no stream).

  Example:
    >>> import jax
    >>> from fewbit_jax._sketch_stream import in_step_keys, step_keys
    >>> with step_keys(jax.random.key(0)):
    ...   inside = in_step_keys()
    >>> inside, in_step_keys()
    (True, False)
  """
  return bool(_SCOPES.get())


def scoped_key(salt: jax.Array, holder, collection: str,
               owner: str) -> tuple[jax.Array, str | None] | None:
  """This call's key from the innermost `step_keys` scope, or None outside any.

  The key is ``fold_in`` of the scope's key with `collection`, the words of
  `salt` and the number of keys `holder` drew from the scope before, so two
  holders with different salts, two collections, or two calls of one holder
  get different keys. For a layer built on this (a dropout, say): draw from
  it first and fall back to the layer's own stream outside a scope
  (`stream_key`, which shows the pattern).

  Args:
    salt: a PRNG key of the holder's own (for an NNX layer: its stream's key,
      ``stream.key[...]``), stable across split/merge and stacked with it.
    holder: the object drawing (its identity counts its draws in the scope).
    collection: the rng stream name, e.g. ``'sketch'`` or ``'dropout'``.
    owner: who draws, for the message.

  Returns:
    None outside a scope, else ``(key, frozen)``: `frozen` is None, or a
    message saying why `key` is the same on every call of a compiled step
    (the scope's key is a constant there); the caller raises it, or hands
    it to `guard_gradient` where only a gradient makes the repeat wrong.

  Example:
    >>> import jax
    >>> from fewbit_jax._sketch_stream import scoped_key, step_keys
    >>> salt = jax.random.key(7)
    >>> scoped_key(salt, object(), "dropout", "Dropout") is None
    True
    >>> with step_keys(jax.random.key(0)):
    ...   key, frozen = scoped_key(salt, "layer", "dropout", "Dropout")
    >>> frozen is None
    True
  """
  scopes = _SCOPES.get()
  if not scopes:
    return None
  scope = scopes[-1]
  key = jax.random.fold_in(scope.key, zlib.crc32(collection.encode()))
  words = jax.random.key_data(salt) if jax.dtypes.issubdtype(
      salt.dtype, jax.dtypes.prng_key) else salt
  for i in range(words.shape[-1]):
    key = jax.random.fold_in(key, words[..., i])
  key = jax.random.fold_in(key, scope.index(holder))
  frozen = None
  if not isinstance(scope.key, jax.core.Tracer) and _staged():
    frozen = _frozen_constant(owner)
  return key, frozen


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gradient_guard(x, message: str):
  del message
  return x


def _gradient_guard_fwd(x, message: str):
  raise ValueError(message)


def _gradient_guard_bwd(message: str, residuals, g):  # never reached: the forward raises
  raise ValueError(message)


_gradient_guard.defvjp(_gradient_guard_fwd, _gradient_guard_bwd)


def guard_gradient(x: jax.Array, message: str) -> jax.Array:
  """`x`, whose differentiation raises ``ValueError(message)``: forward use stays free.

  For a value whose forward pass is right but whose gradient would be wrong,
  e.g. the kernel of a randomized layer whose sketch key repeats every step:
  evaluating works, ``jax.grad`` through it raises while it is traced.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax._sketch_stream import guard_gradient
    >>> float(guard_gradient(jnp.float32(2.0), "no gradient here") * 3)
    6.0
    >>> jax.grad(lambda w: guard_gradient(w, "no gradient here") * 3)(2.0)
    Traceback (most recent call last):
    ValueError: no gradient here...
  """
  return _gradient_guard(x, message)


# --------------------------------------------------------------------------
# An NNX layer's key: the call's rngs, the scope, or the layer's own stream.


def _carried(variable: nnx.Variable) -> bool:
  """Whether a change to `variable` made here reaches the state the next step starts from.

  True outside any trace, for a hijax/ref Variable (JAX carries it), and for
  a Variable an NNX transform merged inside itself (it writes it back);
  False for one merged by ``nnx.merge`` inside a plain JAX transform. The
  last case is read from NNX's own bookkeeping of its graph-mode transforms
  (the update contexts of ``graphlib.GRAPH_CONTEXT``);
  tests/test_functional_loop.py fails if a flax release moves it.
  """
  raw = variable.get_raw_value() if hasattr(variable, "get_raw_value") else variable[...]
  if not isinstance(raw, jax.core.Tracer) or getattr(variable, "hijax", False) \
      or getattr(variable, "ref", False):
    return True
  stacks = getattr(graphlib, "GRAPH_CONTEXT", None)
  stacks = getattr(stacks, "update_context_stacks", None)
  if stacks is None:  # a flax without this bookkeeping: cannot tell, do not refuse
    return True
  for contexts in stacks.values():
    for context in contexts:
      inner = getattr(context, "inner_ref_outer_index", None)
      if inner is not None and variable in inner:
        return True
  return False


def _scope_advice(collection: str) -> str:
  return ("Give the step its randomness without state: pass a fresh key into the jitted "
          "step (jax.random.fold_in(key, step)) and call the model inside `with "
          "fb.nnx.step_keys(key):`, from which each layer derives a key of its own; or "
          f"pass rngs=key to the call; or train with nnx.jit and nnx.value_and_grad, which "
          f"carry the layers' {collection!r} streams.")


def _harm(what: str) -> str:
  return " (a biased weight update)" if what == "sketch" else ""


def stream_key(stream: rnglib.RngStream, collection: str, owner: str,
               what: str = "sketch") -> tuple[jax.Array, str | None]:
  """A key from a layer's own stream (advancing it), and why it would repeat, if it would.

  The stream-based draw of ``nnx.Dropout``, with its two failures in a
  functional loop made plain: where the stream cannot advance (it was
  merged outside the transform the call runs in) the error says to enter
  `step_keys`; where it advances but the advance is lost (a model merged by
  ``nnx.merge`` inside a plain JAX transform, so every step would start from
  the same state), the second value says so. For a layer of your own (a
  dropout, say), after `scoped_key`::

    drawn = scoped_key(self.rngs.key[...], self.rngs, "dropout", "Dropout")
    key, frozen = drawn or stream_key(self.rngs, "dropout", "Dropout", "dropout mask")
    if frozen is not None:
      raise ValueError(frozen)  # or guard_gradient(kernel, frozen) for a sketch

  Args:
    stream: the layer's ``RngStream``.
    collection: its name, for the messages.
    owner: the layer's class name, for the messages.
    what: what the key draws (``'sketch'``, ``'dropout mask'``).

  Returns:
    ``(key, frozen)``: `frozen` is None where NNX carries the advance out
    (no trace, ``nnx.jit``, ``nnx.value_and_grad``, ``nnx.scan``, ...), else
    the message saying the key would repeat every step and what to do.

  Raises:
    ValueError: the stream cannot advance in this trace.

  Example:
    >>> from flax import nnx
    >>> from fewbit_jax._sketch_stream import stream_key
    >>> stream = nnx.Rngs(dropout=0)["dropout"]
    >>> key, frozen = stream_key(stream, "dropout", "Dropout", "dropout mask")
    >>> frozen is None, int(stream.count[...])
    (True, 1)
  """
  try:
    key = stream()
  except flax_errors.TraceContextError as e:
    raise ValueError(
        f"{owner} draws its {what} key from its own {collection!r} rng stream, which "
        "cannot advance here: the stream's state was made outside the JAX transform this "
        "call runs in (as with nnx.merge inside jax.value_and_grad in a jax.jit step). "
        "nnx.merge(..., copy=True) does not help: the advance would be lost and the same "
        f"{what} drawn every step{_harm(what)}. "
        + _scope_advice(collection)) from e
  if _carried(stream.count):
    return key, None
  return key, (
      f"{owner} draws its {what} key from its own {collection!r} rng stream inside a JAX "
      "transform that does not carry the stream's state back out (a model merged with "
      "nnx.merge inside jax.jit or jax.value_and_grad, or NNX transforms in tree mode, "
      "graph=False): every step would start from the "
      f"same stream state and draw the same {what}{_harm(what)}. "
      + _scope_advice(collection))


def nnx_key(rngs, stream: rnglib.RngStream | None, collection: str,
            owner: str) -> tuple[jax.Array, str | None]:
  """This call's sketch key: from the call's `rngs`, else the `step_keys` scope, else `stream`.

  Args:
    rngs: the call's ``rngs=`` argument: a key, ``RngStream`` or ``Rngs``
      (its `collection` stream), or None.
    stream: the layer's own stream (None where it has none); its key salts
      the scope's key, and outside a scope it is drawn from (advanced).
    collection: the layer's rng stream name.
    owner: the layer's class name, for the errors.

  Returns:
    ``(key, frozen)``: `frozen` is None, or why `key` would be the same every
    step (drawn from a stream whose advance this trace loses, or from a
    scope key compiled in as a constant); the layer passes it to
    `guard_gradient`, so that a weight gradient from that key raises.

  Raises:
    ValueError: no rng anywhere (the error says how to give the layer one),
      a scope but no stream to salt it with, or a stream that cannot advance
      in this trace (the error says to enter `step_keys`).
    TypeError: `rngs` is none of these.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> from fewbit_jax._sketch_stream import nnx_key
    >>> key, frozen = nnx_key(nnx.Rngs(sketch=0), None, "sketch", "RandomizedLinear")
    >>> frozen is None
    True
    >>> nnx_key(key, None, "sketch", "RandomizedLinear")[0] is key
    True
  """
  if rngs is not None:
    if isinstance(rngs, rnglib.Rngs):
      return rngs[collection](), None
    if isinstance(rngs, rnglib.RngStream):
      return rngs(), None
    if isinstance(rngs, jax.Array):
      return rngs, None
    raise TypeError(f"rngs must be an nnx.Rngs, nnx.RngStream or a key array; got "
                    f"{type(rngs).__name__}.")
  if _SCOPES.get():
    if stream is None:
      raise ValueError(
          f"{owner} is called inside fb.nnx.step_keys but has no {collection!r} rng stream "
          "of its own, whose key would make its key differ from every other layer's. "
          f"Construct it with one, e.g. rngs=nnx.Rngs(params=0, {collection}=1) (or "
          "nnx.Rngs(0)), or pass a key to the call: layer(x, rngs=key).")
    return scoped_key(stream.key[...], stream, collection, owner)
  if stream is None:
    raise missing_rng_error(
        owner, collection,
        f"Construct it with a stream for it, e.g. rngs=nnx.Rngs(params=0, "
        f"{collection}=1) (or nnx.Rngs(0)), or pass one per call: layer(x, rngs=key).")
  return stream_key(stream, collection, owner)


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
