"""Converting existing NNX models in place: `map_module`, `convert_linear`, `convert_activations`.

A converted model keeps its ``Param`` objects, so its optimizer state and
checkpoints: `map_module` walks it, `convert_linear` swaps linear layers for
the randomized ones of `fewbit_jax.nnx` (by a table of the nnx classes it
knows), `convert_activations` swaps activation-valued attributes.
"""

from __future__ import annotations

import dataclasses
import re
import typing as tp
import warnings

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import graphlib
from jax import lax

from fewbit_jax import _sketch_stream
from fewbit_jax import patch as _patch
from fewbit_jax._options import SketchOptions
from fewbit_jax.nnx._layers import RandomizedEinsum, RandomizedLinear, RandomizedLinearGeneral

__all__ = ["map_module", "convert_linear", "convert_activations"]


def _path_str(parts) -> str:
  return "/" + "/".join(str(p) for p in parts)


def map_module(model, fn: tp.Callable[[nnx.Module, str], tp.Any], pattern: str | None = None):
  """Applies ``fn(module, path)`` to every module of `model`, replacing each in place.

  The walk is post-order (a module's children before the module), over the
  whole graph: attributes, ``nnx.List``/``nnx.Dict`` and list or dict
  containers. Paths are strings like ``'/layers/0/mlp/up'`` (the root is
  ``'/'``). Where ``fn`` returns a different object, it replaces the module
  in its parent, at every place the module is referenced (a module shared by
  two parents is converted once and stays shared). Parameters live in the
  ``Variable`` objects the modules hold, so a converter that reuses them
  (`convert_linear` does) keeps parameters, optimizer state and checkpoints
  valid.

  Args:
    model: an NNX module (or any NNX graph node holding modules).
    fn: ``(module, path) -> module``; return the module itself to keep it.
    pattern: a regular expression; only modules whose path it matches
      (``re.search``: anchor it with ``^``/``$`` for exact paths) are given
      to ``fn``. None: all of them.

  Returns:
    `model`, changed in place (or ``fn``'s result, if it replaced the root).

  Raises:
    ValueError: `pattern` matches no module path (nothing would change: most
      likely a typo; the message lists the paths), or a module to replace
      sits in a tuple (immutable: store such modules in an ``nnx.List``).
    re.error: `pattern` is not a regular expression.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> kernel = model.layers[0].kernel
    >>> convert = lambda m, path: fb.nnx.convert_linear(m, fb.nnx.RandomizedLinear,
    ...                                                 proj_dim_ratio=0.5)
    >>> model = fb.nnx.map_module(model, convert, pattern=r"^/layers/0$")
    >>> type(model.layers[0]).__name__, type(model.layers[2]).__name__
    ('RandomizedLinear', 'Linear')
    >>> model.layers[0].kernel is kernel                # the very same Param
    True
  """
  if not callable(fn):
    raise TypeError(f"map_module needs a function (module, path) -> module; got {fn!r}")
  regex = re.compile(pattern) if pattern is not None else None
  seen_paths: list[str] = []
  matched = [0]
  results: dict[int, tp.Any] = {}
  active: set[int] = set()

  def visit(node, parts):
    key = id(node)
    if key in results:
      return results[key]
    if key in active:  # a cycle back to a module being visited: leave it
      return node
    impl = graphlib.get_node_impl(node)
    if impl is None or isinstance(node, nnx.Variable):
      return node
    active.add(key)
    for k, value in list(impl.node_dict(node).items()):
      if isinstance(k, str) and k.startswith("_pytree__"):
        continue
      new = visit(value, (*parts, k))
      if new is not value:
        if impl.set_key is None:
          raise ValueError(f"map_module cannot replace {_path_str((*parts, k))}: it sits in a "
                           f"{type(node).__name__}, which cannot be changed in place. Store "
                           "modules to convert in an nnx.List (or an nnx.Dict) instead.")
        impl.set_key(node, k, new)
    active.discard(key)
    out = node
    if isinstance(node, nnx.Module):
      path = _path_str(parts)
      seen_paths.append(path)
      if regex is None or regex.search(path):
        matched[0] += 1
        out = fn(node, path)
    results[key] = out
    return out

  out = visit(model, ())
  if regex is not None and not matched[0]:
    shown = ", ".join(seen_paths[:24]) + (", ..." if len(seen_paths) > 24 else "")
    raise ValueError(f"pattern {pattern!r} matches no module path, so nothing was converted. "
                     f"The paths are: {shown}")
  return out


def with_params(old, build: tp.Callable[[], nnx.Module], stream: nnx.RngStream | None,
                 names: tuple[str, ...] = ("kernel", "bias")):
  """``build()`` holding `old`'s very objects named `names` (its Params), initialising nothing.

  The new module is built abstractly (``nnx.eval_shape``): its attributes
  `names` (by default kernel and bias) are replaced by `old`'s, and any other
  rng stream it made by a fork of `stream`.
  """
  new = nnx.eval_shape(build)
  for name in names:
    if hasattr(old, name) or hasattr(new, name):
      setattr(new, name, getattr(old, name))
  for name, value in list(vars(new).items()):
    if isinstance(value, nnx.RngStream) and name not in names and stream is not None:
      setattr(new, name, _sketch_stream.own_stream(stream))
  abstract = [jax.tree_util.keystr(p) for p, v in
              jax.tree_util.tree_leaves_with_path(nnx.state(new))
              if isinstance(v, jax.ShapeDtypeStruct)]
  if abstract:
    raise ValueError(f"converting {type(old).__name__} to {type(new).__name__}: the new module "
                     f"has state that is neither the old module's {' and '.join(names)} nor an "
                     f"rng stream ({', '.join(abstract)}), so it cannot be converted without "
                     f"initialising it. Give the converter a class with "
                     f"{type(old).__name__}'s state.")
  return new


# --------------------------------------------------------------------------
# The table of convert_linear: what each nnx class becomes, and from what.

# The configuration every converted layer keeps (besides its shape).
_NUMERICS = ("dtype", "param_dtype", "precision", "promote_dtype", "preferred_element_type")


def read(module, *names: str) -> dict:
  """{name: module.name} for `names`: the constructor arguments a twin copies."""
  return {name: getattr(module, name) for name in names}


def _linear_refusal(module: nnx.Linear) -> str | None:
  if module.dot_general is not lax.dot_general:
    return (f"convert_linear leaves an nnx.Linear with a custom dot_general "
            f"({module.dot_general!r}) as it is: a randomized layer computes its "
            "gradients with its own matmuls.")
  return None


def _linear_general_refusal(module: nnx.LinearGeneral) -> str | None:
  reason = None
  if module.batch_axis:
    reason = f"it has batch axes {dict(module.batch_axis)}"
  elif module.dot_general is not None or module.dot_general_cls is not None:
    reason = "it has a custom dot_general"
  if reason:
    return (f"convert_linear leaves an nnx.LinearGeneral as it is: {reason}, which a "
            "randomized projection cannot serve.")
  return None


def _einsum_refusal(module: nnx.Einsum) -> str | None:
  reason = None
  if module.einsum_op is not jnp.einsum:
    reason = "it has a custom einsum_op"
  elif module.einsum_str is None:
    reason = "its einsum string is given per call"
  else:
    try:
      xs, ks, out = module.einsum_str.replace(" ", "").replace("->", ",").split(",")
      shared = set(xs) & set(ks) & set(out)
      if shared:
        reason = f"indices {''.join(sorted(shared))} are in x, kernel and output (batched kernels)"
    except ValueError:
      reason = f"its einsum string {module.einsum_str!r} is not 'x,kernel->out'"
  return f"convert_linear leaves an nnx.Einsum as it is: {reason}." if reason else None


@dataclasses.dataclass(frozen=True)
class _Rule:
  """How `convert_linear` turns one nnx class into a randomized one."""
  randomized: type  # the class it becomes
  config: tp.Callable[[nnx.Module], tuple[tuple, dict]]  # its constructor's (args, kwargs)
  refusal: tp.Callable[[nnx.Module], str | None]  # the warning where it must stay, or None
  general: bool  # converted only with general=True
  takes_ctor: bool = False  # convert_linear's `ctor` replaces `randomized`


# The exact classes converted (a subclass may compute something else).
_RULES = {
    nnx.Linear: _Rule(
        RandomizedLinear,
        lambda m: ((m.in_features, m.out_features), read(m, "use_bias", *_NUMERICS)),
        _linear_refusal, general=False, takes_ctor=True),
    nnx.LinearGeneral: _Rule(
        RandomizedLinearGeneral,
        lambda m: ((m.in_features, m.out_features), read(m, "axis", "use_bias", *_NUMERICS)),
        _linear_general_refusal, general=True),
    nnx.Einsum: _Rule(
        RandomizedEinsum,
        lambda m: ((m.einsum_str, tuple(m.kernel.shape),
                    None if m.bias is None else tuple(m.bias.shape)), read(m, *_NUMERICS)),
        _einsum_refusal, general=True),
}
_OURS = tuple(rule.randomized for rule in _RULES.values())


def convert_linear(module, ctor: tp.Callable[..., nnx.Module] | None = None, *,
                   general: bool = True, rngs=None, **options):
  """Turns an ``nnx.Linear`` into ``ctor(...)`` that holds the same ``Param`` objects.

  The original fewbit's ``convert_linear``, for NNX. The new layer is built
  with the linear layer's configuration (features, use_bias, dtype,
  param_dtype, precision, promote_dtype, preferred_element_type) and
  `options`, without initialising anything: its ``kernel`` and ``bias`` are
  the *very same* ``nnx.Param`` objects, so an optimizer state or checkpoint
  made for the model before the conversion still fits it. Other modules
  come back unchanged, so it can be given to `map_module` for a whole
  model. Only the exact classes are converted (a subclass of
  ``nnx.Linear`` may compute something else), and layers with a custom
  ``dot_general`` are left alone with a warning.

  With ``general=True`` (the default) ``nnx.LinearGeneral`` becomes
  `RandomizedLinearGeneral` and ``nnx.Einsum`` `RandomizedEinsum`, with the
  same options, where their shape allows (no batch axes; an einsum that is a
  projection); others are left alone with a warning.

  Args:
    module: any module; only ``nnx.Linear`` (and with `general`,
      ``nnx.LinearGeneral`` and ``nnx.Einsum``) are converted.
    ctor: the class for ``nnx.Linear``, default `RandomizedLinear`; it
      takes ``nnx.Linear``'s arguments and `options`.
    general: also convert ``LinearGeneral`` and ``Einsum`` layers.
    rngs: where the converted layers' sketch keys come from: an
      ``nnx.Rngs`` (its ``'sketch'`` stream, or the one named by
      ``rng_collection``), an ``RngStream``, or a seed. Pass one object to
      every conversion of a model: each layer forks its own stream from it.
      None: each conversion seeds a fresh stream from a process-wide
      counter (distinct per layer; reproducible only if the conversions
      happen in the same order).
    **options: for the new layer, e.g. ``proj_dim_ratio=0.1``,
      ``sketch='countsketch'``.

  Returns:
    The new layer, or `module` itself.

  Raises:
    ValueError: bad `options` (an unknown sketch, a ratio outside (0, 1]).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> new = fb.nnx.convert_linear(lin, fb.nnx.RandomizedLinear, proj_dim_ratio=0.1,
    ...                             rngs=nnx.Rngs(sketch=0))
    >>> new.kernel is lin.kernel and new.bias is lin.bias
    True
    >>> x = jnp.ones((8, 3))
    >>> bool(jnp.all(new(x) == lin(x)))
    True
    >>> fb.nnx.convert_linear(nnx.relu) is nnx.relu     # anything else passes through
    True
  """
  rule = _RULES.get(type(module))
  if rule is None or (rule.general and not general):
    return module
  refusal = rule.refusal(module)
  if refusal is not None:
    warnings.warn(refusal, UserWarning, stacklevel=2)
    return module
  ctor = ctor if ctor is not None and rule.takes_ctor else rule.randomized
  args, kwargs = rule.config(module)
  kwargs.update(options)
  if ctor in _OURS:  # bad options raise here, not from inside eval_shape
    SketchOptions.among(kwargs)
  build = lambda: ctor(*args, rngs=nnx.Rngs(0), **kwargs)
  stream = _sketch_stream.nnx_source(rngs, options.get("rng_collection", "sketch"))
  return with_params(module, build, stream)


def convert_activations(module, **bits):
  """Makes `module`'s activation-valued attributes few-bit, in place.

  An attribute (or an element of an ``nnx.List``/list/tuple attribute, as in
  ``nnx.Sequential``) that is a ``jax.nn``/``flax.nnx`` activation named in
  `bits` (the function object itself, or a ``functools.partial`` of it) is
  replaced by the few-bit function with those bits and the partial's
  arguments. Only `module`'s own attributes change: use `map_module` for a
  whole model, and `fewbit_jax.patch_activations` for activations called
  inline in a ``__call__``.

  Args:
    module: an NNX module.
    **bits: activation name -> bits, as in `fewbit_jax.patch_activations`
      (``gelu=3``, ``relu=1``, ``silu=True`` for the default).

  Returns:
    `module`.

  Raises:
    ValueError, TypeError: as `fewbit_jax.patch_activations` for unknown
      names or bad bits.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.gelu)
    >>> model = fb.nnx.map_module(model, lambda m, _: fb.nnx.convert_activations(m, gelu=2))
    >>> model.layers[1].__name__
    'fewbit.gelu(approximate=True, bits=2)'
  """
  chosen = _patch.parse_bits(bits)
  impl = graphlib.get_node_impl(module)
  if impl is None:
    raise TypeError(f"convert_activations needs an NNX module; got {type(module).__name__}")
  for k, value in list(impl.node_dict(module).items()):
    if isinstance(k, str) and k.startswith("_pytree__"):
      continue
    new = _patch.swap_activation(value, chosen)
    if new is None and isinstance(value, (list, tuple)) and not isinstance(value, nnx.Module):
      items = [_patch.swap_activation(v, chosen) for v in value]
      if any(i is not None for i in items):
        swapped = [v if i is None else i for v, i in zip(value, items)]
        new = type(value)(swapped) if isinstance(value, tuple) else swapped
    if new is not None:
      impl.set_key(module, k, new)
  return module
