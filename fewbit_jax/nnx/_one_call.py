"""`convert`: everything the library has, applied to an unedited NNX model in one call.

The model is changed in place and keeps its ``Variable`` objects (so its
optimizer state and checkpoints): dense layers become randomized
(`convert_linear`, approximate mode only), flax's norms, dropout and
attention their lean twins (`convert_lean`), the model's own norm-like
modules are recomputed in the backward pass, the repeated blocks are
rematerialised with the library's policy, and the model's ``__call__``
patches inline activations and softmax while it is traced. The last three
are done by giving the module a subclass of its own class (same attributes,
same Variables, ``isinstance`` still true) whose ``__call__`` wraps the
original one.
"""

from __future__ import annotations

import functools
import re
import typing as tp

import jax
import numpy as np
from flax import nnx

from fewbit_jax import _one_call
from fewbit_jax import patch as _patch
from fewbit_jax.nnx._convert import convert_linear, map_module
from fewbit_jax.nnx._layers import RandomizedLinear
from fewbit_jax.nnx._lean import convert_lean

__all__ = ["convert", "conversion"]

_MARK = "__fewbit_convert__"  # the class attribute of the subclasses made here


def _is_node(x) -> bool:
  return isinstance(x, (nnx.Module, nnx.Variable, nnx.Rngs, nnx.RngStream))


def _is_dynamic(x) -> bool:
  return _is_node(x) or isinstance(x, (jax.Array, np.ndarray, np.generic))


def _only_params(module) -> bool:
  """Whether `module` holds no Variable but Params (nothing its call could mutate)."""
  return all(isinstance(v, nnx.Param) for _, v in nnx.iter_graph(module)
             if isinstance(v, nnx.Variable))


def _checkpointed(base_call, policy, pure: bool = False):
  """``__call__`` running `base_call` under ``nnx.remat(policy=policy)``.

  Arrays and NNX objects among the arguments are the checkpoint's inputs;
  everything else (flags such as ``deterministic``, None, strings) stays a
  Python value, as it would be in the model's own call. `pure`: the module
  holds only Params, so a plain ``jax.checkpoint`` of its state will do.
  """

  @functools.wraps(base_call)
  def __call__(self, *args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_node)
    dyn = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]
    static = [None if i in dyn else leaf for i, leaf in enumerate(leaves)]

    def inner(module, *values):
      full = list(static)
      for i, v in zip(dyn, values):
        full[i] = v
      a, k = jax.tree.unflatten(treedef, full)
      return base_call(module, *a, **k)

    values = [leaves[i] for i in dyn]
    if pure and not any(_is_node(v) for v in values):
      # Nothing but parameters inside, nothing mutated: a plain jax.checkpoint
      # over the module's state, which (unlike nnx.remat) also runs where the
      # Variables belong to an outer trace (a model closed over by jax.grad).
      graphdef, state = nnx.split(self)
      checkpointed = jax.checkpoint(
          lambda state, *values: inner(nnx.merge(graphdef, state), *values), policy=policy)
      return checkpointed(state, *values)
    return nnx.remat(inner, policy=policy)(self, *values)

  return __call__


def _patched(base_call, choices: dict):
  """``__call__`` running `base_call` with the activation patch active (at trace time)."""

  @functools.wraps(base_call)
  def __call__(self, *args, **kwargs):
    with _patch.patch_activations(warn_unused=False, **choices):
      return base_call(self, *args, **kwargs)

  return __call__


def _give_call(module, kind: str, make_call, extra: dict | None = None):
  """Gives `module` a subclass of its class whose ``__call__`` is ``make_call(old call)``."""
  cls = type(module)
  marks = dict(getattr(cls, _MARK, {}))
  if kind in marks:
    return
  marks[kind] = True
  namespace = {"__call__": make_call(cls.__call__), _MARK: marks,
               "__module__": cls.__module__, "__qualname__": cls.__qualname__,
               "__doc__": cls.__doc__, **(extra or {})}
  module.__class__ = type(cls.__name__, (cls,), namespace)


def _has_kernel(module) -> bool:
  """Whether `module` holds a parameter of rank >= 2 (a matmul's) anywhere inside."""
  for _, value in nnx.iter_graph(module):
    if isinstance(value, nnx.Param) and np.ndim(value.get_value()) >= 2:
      return True
  return False


def _modules(model) -> dict[tuple, nnx.Module]:
  return {tuple(path): node for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module)}


def _path_str(path: tuple) -> str:
  return "/" + "/".join(str(p) for p in path)


def _owner(path: tuple) -> tuple:
  """The path of the module that holds `path` (a list element's: the list's owner)."""
  parent = path[:-1]
  if parent and isinstance(path[-1], int):
    parent = parent[:-1]
  return parent


def find_blocks(model) -> list[tuple]:
  """The paths of the repeated blocks: modules of one class held twice or more by one owner.

  Only the model's own classes holding a matmul's parameters count, and of
  nested candidates only the outermost.
  """
  groups: dict[tuple, list[tuple]] = {}
  for path, node in _modules(model).items():
    if not path or _one_call.is_library_class(type(node)) or isinstance(node, nnx.List):
      continue
    groups.setdefault((type(node), _owner(path)), []).append(path)
  found = [p for (cls, _), paths in groups.items() if len(paths) >= 2
           for p in paths if _has_kernel(_modules(model)[p])]
  found.sort(key=len)
  outer: list[tuple] = []
  for p in found:
    if not any(p[:len(q)] == q for q in outer):
      outer.append(p)
  return sorted(outer, key=lambda p: tuple(str(x) for x in p))


def conversion(model) -> _one_call.Conversion | None:
  """What `convert` did to `model` (paths converted, blocks, policy), or None.

  Example:
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> fb.nnx.conversion(nnx.Linear(2, 2, rngs=nnx.Rngs(0))) is None
    True
  """
  return getattr(type(model), "__fewbit_conversion__", None)


def convert(model, *, exact: bool = True, remat: bool = False, policy=None, blocks=None,
            cheap=True, bits: int = 3, proj_dim_ratio: float = 0.2, rngs=None,
            activations: bool = True, **linear_options):
  """Applies every technique of the library to an NNX model written without it.

  In place, keeping the model's ``Variable`` objects (parameters, rng
  streams: optimizer states and checkpoints made before still fit):

  1. ``exact=False`` only: ``nnx.Linear`` (and ``LinearGeneral``,
     ``Einsum`` where they are projections) become randomized layers
     (`convert_linear`, ``proj_dim_ratio``).
  2. flax's ``LayerNorm``, ``RMSNorm``, ``Dropout`` and the attention
     function of ``MultiHeadAttention`` become lean (`convert_lean`).
  3. The model's own norm-like modules (class name matching ``/norm/i``,
     no matmul parameters inside, e.g. gemma's hand-written ``RMSNorm``)
     keep only their input: their forward is recomputed in the backward pass
     (``jax.checkpoint`` of that module alone, saving nothing).
  4. ``remat=True``: the repeated blocks (modules of one class held twice or
     more by one owner, e.g. the elements of an ``nnx.List`` of layers; the
     outermost such) are rematerialised with ``policy``.
  5. The model's ``__call__`` patches the inline activations
     (``nnx.gelu(x)``, ``jax.nn.relu(x)``...) and ``jax.nn.softmax`` while it
     is traced (`fewbit_jax.patch_activations`): in exact mode with an exact
     gradient, otherwise few-bit with `bits` bits.

  Steps 3 to 5 give the module a subclass of its own class with the same
  attributes, so ``isinstance`` and ``nnx.split``/``nnx.merge`` keep
  working; just call ``model(x)`` inside the jitted step. A gated MLP
  written inline is reached by step 5 (the activation) and step 1 (its
  projections); a recogniser of the whole pattern plugs into
  ``fewbit_jax._one_call.RECOGNISERS``.

  Args:
    model: an NNX module.
    exact: True (default): no gradient changes beyond float rounding. False:
      few-bit activations and randomized dense layers at their defaults.
    remat: rematerialise the repeated blocks (default False).
    policy: the blocks' ``jax.checkpoint`` policy: None (the library's,
      `fewbit_jax.remat.frontier_policy`), a name of
      `fewbit_jax.remat.FRONTIER`, or any policy.
    blocks: which modules are the blocks: None (found as above), a regular
      expression searched in module paths (``r'^/layers/\\d+$'``), or a class
      or tuple of classes.
    cheap: True (the ``/norm/i`` rule of step 3), False (none), or a regular
      expression on module paths naming the modules to recompute.
    bits: the few-bit activations' bits (``exact=False``).
    proj_dim_ratio: the randomized layers' sketch ratio (``exact=False``).
    rngs: where the randomized layers' sketch streams come from (as for
      `convert_linear`).
    activations: patch inline activations and softmax (default True).
    **linear_options: more options of the randomized layers (``sketch=``...).

  Returns:
    `model`, converted; `conversion` tells what was done.

  Raises:
    ValueError: a model converted already, ``remat=True`` with no block
      found (pass ``blocks=``), a `blocks` pattern or class matching no
      module, options given that the mode does not use.
    TypeError: bad `policy`, `blocks` or `cheap`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> class Block(nnx.Module):
    ...   def __init__(self, d, rngs):
    ...     self.norm = nnx.LayerNorm(d, rngs=rngs)
    ...     self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)
    ...   def __call__(self, x):
    ...     return x + self.down(nnx.gelu(self.up(self.norm(x))))
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.layers = nnx.List([Block(8, rngs) for _ in range(2)])
    ...   def __call__(self, x):
    ...     for layer in self.layers:
    ...       x = layer(x)
    ...     return x
    >>> model = Model(nnx.Rngs(0))
    >>> x = jnp.ones((2, 8))
    >>> y = model(x)
    >>> model = fb.nnx.convert(model, remat=True)
    >>> fb.nnx.conversion(model).blocks
    ['/layers/0', '/layers/1']
    >>> bool(jnp.allclose(model(x), y))
    True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"fb.nnx.convert needs an NNX module; got {type(model).__name__}")
  if conversion(model) is not None or any(_MARK in vars(type(m)) for m in _modules(model).values()):
    raise ValueError("this model is converted already (fb.nnx.convert was applied to it or to "
                     "a module inside it); convert the original model once.")
  if exact and linear_options:
    raise ValueError(f"options {sorted(linear_options)} are for the randomized layers, which "
                     "exact=True does not use; pass exact=False or drop them.")
  if activations:
    _patch.parse_bits(_one_call.activation_choices(exact, bits))  # bad bits raise here
  block_regex, block_classes = _one_call.check_blocks(blocks, "fb.nnx.convert")
  cheap_rule = _one_call.check_cheap(cheap, "fb.nnx.convert")
  remat_policy = _one_call.resolve_policy(policy) if remat else None
  record = _one_call.Conversion(policy=None if not remat else
                                (policy if isinstance(policy, str) else
                                 "lean" if policy is None else getattr(policy, "__name__",
                                                                       repr(policy))))

  # 1. dense layers (approximate mode).
  if not exact:
    def to_randomized(m, path):
      new = convert_linear(m, RandomizedLinear, proj_dim_ratio=proj_dim_ratio, rngs=rngs,
                           **linear_options)
      if new is not m:
        record.linear.append(path)
      return new
    model = map_module(model, to_randomized)

  # Recognisers of whole sub-blocks (the gated MLP's plugs in here).
  for recognise in _one_call.RECOGNISERS.values():
    model = map_module(model, lambda m, path: recognise(m, path, exact=exact, bits=bits))

  # 2. flax's norms, dropout and attention.
  def to_lean(m, path):
    fn = getattr(m, "attention_fn", None)
    new = convert_lean(m)
    if new is not m or getattr(new, "attention_fn", None) is not fn:
      record.lean.append(path)
    return new
  model = map_module(model, to_lean)

  # 3. the model's own cheap modules.
  if cheap_rule is not False:
    recompute = jax.checkpoint_policies.nothing_saveable
    for path, m in _modules(model).items():
      if not path:
        continue
      chosen = (cheap_rule.search(_path_str(path)) if isinstance(cheap_rule, re.Pattern)
                else _one_call.is_cheap_class(type(m)) and not _has_kernel(m))
      if chosen:
        pure = _only_params(m)
        _give_call(m, "cheap", lambda call: _checkpointed(call, recompute, pure))
        record.cheap.append(_path_str(path))
    if isinstance(cheap_rule, re.Pattern) and not record.cheap:
      raise ValueError(f"cheap={cheap!r} matches no module path; the paths are: "
                       + ", ".join(_path_str(p) for p in list(_modules(model))[1:25]))

  # 4. the blocks.
  if remat:
    mods = _modules(model)
    if block_regex is not None:
      chosen = [p for p in mods if p and block_regex.search(_path_str(p))]
    elif block_classes:
      chosen = [p for p, m in mods.items() if p and isinstance(m, block_classes)]
    else:
      chosen = find_blocks(model)
    if not chosen:
      shown = ", ".join(_path_str(p) for p in list(mods)[1:25])
      raise ValueError("fb.nnx.convert(remat=True) found no block to rematerialise"
                       + (f" matching blocks={blocks!r}" if blocks is not None else
                          " (no class of the model's own, holding matmul parameters, is held "
                          "twice or more by one module)")
                       + f". Pass blocks= (a regular expression on these paths: {shown}).")
    for p in chosen:
      _give_call(mods[p], "remat", lambda call: _checkpointed(call, remat_policy))
      record.blocks.append(_path_str(p))

  # 5. inline activations, at trace time.
  if activations:
    record.activations = _one_call.activation_choices(exact, bits)
  choices = record.activations
  if choices:
    _give_call(model, "patch", lambda call: _patched(call, choices),
               {"__fewbit_conversion__": record})
  else:
    _give_call(model, "record", lambda call: call, {"__fewbit_conversion__": record})
  return model
