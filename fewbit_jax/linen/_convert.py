"""Converting existing linen models: `intercept` their dense layers, `swap_activations`.

Linen models are immutable and build their layers in ``@compact`` bodies, so
they are converted without editing them: inside `intercept` their
``nn.Dense`` (and ``nn.DenseGeneral``) calls run randomized with the same
parameters, and `swap_activations` clones a model with its activation-valued
fields few-bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import warnings
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.core import meta

from fewbit_jax import _sketch_stream
from fewbit_jax import patch as _patch
from fewbit_jax._options import SketchOptions
from fewbit_jax.dense import randomized_dense
from fewbit_jax.dense_general import randomized_dot_general

__all__ = ["intercept", "Interception", "swap_activations"]


@dataclasses.dataclass
class Interception:
  """What an `intercept` context converted: the paths of the layers it ran randomized.

  ``converted`` has one entry per converted call (a layer called twice, or
  traced twice, appears twice); ``skipped`` lists matching layers left
  plain (a custom ``dot_general``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> layer = nn.Dense(3)
    >>> v = layer.init(jax.random.key(0), jnp.ones((4, 2)))
    >>> with fb.linen.intercept(proj_dim=2) as seen:
    ...   _ = layer.apply(v, jnp.ones((4, 2)), rngs={"sketch": jax.random.key(1)})
    >>> seen
    Interception(converted=['/'], skipped=[])
  """
  converted: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)

  def __repr__(self) -> str:
    return f"Interception(converted={self.converted}, skipped={self.skipped})"


def module_path(module: nn.Module) -> str:
  """The module's path in its model: its parents' names and its own, each after a ``"/"``."""
  return "/" + "/".join(str(p) for p in module.path)


def _unboxed(module: nn.Module, name: str):
  value = module.get_variable("params", name)
  return meta.unbox(value) if value is not None else None


def _promoted(module: nn.Module, inputs):
  """`inputs` and the layer's own kernel and bias, promoted as the layer promotes them."""
  kernel = _unboxed(module, "kernel")
  bias = _unboxed(module, "bias") if module.use_bias else None
  return module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)


def _sketch_key(module: nn.Module, collection: str):
  return _sketch_stream.linen_key(
      module, collection, f"fewbit_jax.linen.intercept (at {module_path(module)})")


def _dense_call(module: nn.Dense, inputs, options: dict, collection: str):
  """nn.Dense's computation, with the weight gradient from a sketch."""
  inputs, kernel, bias = _promoted(module, inputs)
  return randomized_dense(inputs, kernel, bias, _sketch_key(module, collection),
                          precision=module.precision, **options)


def _dense_general_call(module: nn.DenseGeneral, inputs, options: dict, collection: str):
  """nn.DenseGeneral's computation (no batch_dims), with the weight gradient from a sketch."""
  features = tuple(module.features) if isinstance(module.features, Sequence) \
      else (module.features,)
  axis = tuple(module.axis) if isinstance(module.axis, Sequence) else (module.axis,)
  axis = tuple(a % inputs.ndim for a in axis)
  inputs, kernel, bias = _promoted(module, inputs)
  dims = ((axis, tuple(range(len(axis)))), ((), ()))
  out = randomized_dot_general(inputs, kernel, _sketch_key(module, collection), dims,
                               precision=module.precision, **options)
  if bias is not None:
    out += jnp.reshape(bias, (1,) * (inputs.ndim - len(axis)) + features)
  return out


def _dense_refusal(module: nn.Dense) -> str | None:
  if module.dot_general is not None or module.dot_general_cls is not None:
    return "it has a custom dot_general"
  return None


def _dense_general_refusal(module: nn.DenseGeneral) -> str | None:
  if module.batch_dims:
    return f"it has batch_dims {module.batch_dims}"
  return _dense_refusal(module)


@dataclasses.dataclass(frozen=True)
class Rule:
  """How an interception (`intercept`, `fewbit_jax.linen.lean`) runs one linen class."""
  call: Callable  # (module, next_fun, args, kwargs) -> output
  refusal: Callable  # (module, args, kwargs) -> why the call must stay plain, or None
  general: bool = False  # converted only with general=True
  ready: Callable[[nn.Module], bool] = lambda module: True  # False: run plain (initialising)


def _inputs_only(call: Callable, options: dict, collection: str, module, next_fun, args, kwargs):
  del next_fun
  if len(args) != 1 or kwargs:
    raise TypeError(f"{type(module).__name__} at {module_path(module)} was called with "
                    f"{len(args)} positional and {sorted(kwargs)} keyword arguments; it takes "
                    "inputs only.")
  return call(module, args[0], options, collection)


def _has_kernel(module: nn.Module) -> bool:
  return not module.is_initializing() and _unboxed(module, "kernel") is not None


# The exact classes converted (a subclass may compute something else).
_RULES = {
    nn.Dense: Rule(_dense_call, lambda m, a, k: _dense_refusal(m), ready=_has_kernel),
    nn.DenseGeneral: Rule(_dense_general_call, lambda m, a, k: _dense_general_refusal(m),
                           general=True, ready=_has_kernel),
}


@contextlib.contextmanager
def intercepting(rules: dict, pattern: str | None, warn_unused: bool, what: str, kinds: str,
                  classes: str):
  """Runs the calls of `rules`' classes whose path matches `pattern` by their rule while inside.

  The mechanism of `intercept` and `fewbit_jax.linen.lean` (``nn.intercept_methods``):
  yields the `Interception` record; `what`, `kinds` and `classes` name the
  context and the layers in the warning given when nothing was converted.
  """
  regex = re.compile(pattern) if pattern is not None else None
  record = Interception()
  seen: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    rule = rules.get(type(module))
    if rule is None or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = module_path(module)
    seen.append(path)
    if regex is not None and not regex.search(path):
      return next_fun(*args, **kwargs)
    if not rule.ready(module):
      return next_fun(*args, **kwargs)
    if rule.refusal(module, args, kwargs) is not None:
      record.skipped.append(path)
      return next_fun(*args, **kwargs)
    record.converted.append(path)
    return rule.call(module, next_fun, args, kwargs)

  with nn.intercept_methods(interceptor):
    yield record
  if warn_unused and not record.converted:
    layers = sorted(set(seen))
    shown = ", ".join(layers[:24]) + (", ..." if len(layers) > 24 else "")
    warnings.warn(
        f"fewbit_jax.linen.{what} converted no layer. "
        + (f"Pattern {pattern!r} matched none of the {kinds} called: {shown}."
           if layers else f"No {classes} was called while tracing in the context: a jitted "
           "step traced before it is reused from jax.jit's cache (trace it inside, or jit a "
           "function that enters the context), or the model was only initialised."),
        UserWarning, stacklevel=5)


@contextlib.contextmanager
def intercept(pattern: str | None = None, *, proj_dim_ratio: float | None = 0.2,
              proj_dim: int | None = None, proj_dim_min: int | None = None,
              proj_dim_max: int | None = None, sketch: str = "gaussian",
              rng_collection: str = "sketch", general: bool = True,
              warn_unused: bool = True, sketch_blocks=None):
  """Runs the model's ``nn.Dense`` layers as randomized dense layers while inside.

  Linen modules are immutable and usually build their layers inside a
  ``@compact`` body, so they cannot be swapped like NNX modules. Inside this
  context (built on ``flax.linen.intercept_methods``) every call of an
  ``nn.Dense`` whose path matches `pattern` computes what
  `RandomizedDense` computes, with the layer's own parameters: the same
  forward output (bitwise), the weight gradient estimated from a sketch of
  the input (`fewbit_jax.dense.randomized_dense`). With ``general=True``
  ``nn.DenseGeneral`` layers without ``batch_dims`` run as randomized
  projections too (`fewbit_jax.dense_general.randomized_dot_general`).

  Nothing about the parameters changes: ``model.init`` inside or outside the
  context gives the same tree, and existing variables and optimizer state
  apply as they are. Each converted call draws its sketch key with
  ``make_rng(rng_collection)``: pass ``rngs={'sketch': key}`` (a fresh key
  every step) to ``model.apply``; initialisation needs none.

  Like `fewbit_jax.patch_activations`, interception happens while the model
  is *traced*: a ``jax.jit``-compiled step traced outside the context stays
  plain (jit caches by function and argument types), so trace the step
  inside it, or jit a function that enters it.

  Only the exact classes ``nn.Dense`` and ``nn.DenseGeneral`` are converted
  (a subclass may compute something else); layers with a custom
  ``dot_general`` are run as they are and listed in ``skipped``.

  Args:
    pattern: a regular expression searched (``re.search``) in each layer's
      path, ``'/Block_0/Dense_1'`` style (the names linen gives, or yours).
      None: every layer. A pattern that matches no called layer is only
      known at the end: a warning then says so, with the paths seen.
    proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch,
      sketch_blocks: the sketch, as for `RandomizedDense`.
    rng_collection: the rng stream of the sketch keys.
    general: also convert ``nn.DenseGeneral``.
    warn_unused: warn on exit when no layer was converted (no matching
      layer was called, e.g. a jitted step traced before the context).

  Yields:
    An `Interception` listing the converted (and skipped) layer paths,
    one entry per converted call.

  Raises:
    ValueError: bad sketch options (at entry), or a converted call with no
      ``'sketch'`` (or ``'params'``) rng.
    re.error: `pattern` is not a regular expression.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((16, 4))
    >>> variables = model.init(jax.random.key(0), x)
    >>> with fb.linen.intercept(r"layers_0", proj_dim_ratio=0.25) as seen:
    ...   y = model.apply(variables, x, rngs={"sketch": jax.random.key(1)})
    >>> seen.converted
    ['/layers_0']
    >>> bool(jnp.all(y == model.apply(variables, x)))
    True
  """
  options = SketchOptions(proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch,
                          sketch_blocks).kwargs()
  rules = {kind: dataclasses.replace(rule, call=functools.partial(
               _inputs_only, rule.call, options, rng_collection))
           for kind, rule in _RULES.items() if general or not rule.general}
  with intercepting(rules, pattern, warn_unused, "intercept", "dense layers",
                    "nn.Dense") as record:
    yield record


def swap_activations(module: nn.Module, **bits) -> nn.Module:
  """A clone of `module` whose activation-valued fields are few-bit.

  A field holding a ``jax.nn``/``flax.linen`` activation named in `bits`
  (the function itself or a ``functools.partial`` of it, e.g. an
  ``activation: Callable = nn.gelu`` field) gets the few-bit function;
  fields holding modules (and lists, tuples and dicts of them) are swapped
  recursively. Unbound definitions are what this is for; the clone has the
  same fields otherwise, so it takes the same variables. Activations called
  inline in a body need `fewbit_jax.patch_activations`.

  Args:
    module: a linen module (definition).
    **bits: activation name -> bits, as in `fewbit_jax.patch_activations`.

  Returns:
    The clone, or `module` itself if no field changed.

  Raises:
    ValueError, TypeError: as `fewbit_jax.patch_activations` for unknown
      names or bad bits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> class MLP(nn.Module):
    ...   activation: object = nn.gelu
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2)(self.activation(nn.Dense(8)(x)))
    >>> model = fb.linen.swap_activations(MLP(), gelu=3)
    >>> model.activation.__name__
    'fewbit.gelu(approximate=True, bits=3)'
    >>> x = jnp.ones((4, 3))
    >>> v = MLP().init(jax.random.key(0), x)
    >>> bool(jnp.all(model.apply(v, x) == MLP().apply(v, x)))
    True
  """
  return _swap_fields(module, _patch.parse_bits(bits))


def _swap_value(value, chosen):
  """The swapped value, or None where nothing in it changes."""
  new = _patch.swap_activation(value, chosen)
  if new is not None:
    return new
  if isinstance(value, nn.Module):
    out = _swap_fields(value, chosen)
    return None if out is value else out
  if isinstance(value, (list, tuple)):
    items = [_swap_value(v, chosen) for v in value]
    if all(i is None for i in items):
      return None
    swapped = [v if i is None else i for v, i in zip(value, items)]
    return type(value)(swapped) if isinstance(value, tuple) else swapped
  if isinstance(value, dict):
    items = {k: _swap_value(v, chosen) for k, v in value.items()}
    if all(i is None for i in items.values()):
      return None
    return type(value)({k: v if items[k] is None else items[k] for k, v in value.items()})
  return None


def _swap_fields(module: nn.Module, chosen) -> nn.Module:
  if not isinstance(module, nn.Module):
    raise TypeError(f"swap_activations needs a linen module; got {type(module).__name__}")
  updates = {}
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name") or not f.init:
      continue
    new = _swap_value(getattr(module, f.name), chosen)
    if new is not None:
      updates[f.name] = new
  return module.clone(**updates) if updates else module
