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
import inspect
import re
import typing as tp

import jax
import numpy as np
from flax import nnx

from fewbit_jax import _dropout, _one_call, _sketch_stream
from fewbit_jax import patch as _patch
from fewbit_jax.gated import gated as _gated
from fewbit_jax.nnx._convert import convert_linear, map_module
from fewbit_jax.nnx._layers import RandomizedLinear
from fewbit_jax.nnx._lean import convert_lean

__all__ = ["convert", "conversion", "recognise_gated"]

_MARK = "__fewbit_convert__"  # the class attribute of the subclasses made here


def _is_node(x) -> bool:
  return isinstance(x, (nnx.Module, nnx.Variable, nnx.Rngs, nnx.RngStream))


def _is_dynamic(x) -> bool:
  return _is_node(x) or isinstance(x, (jax.Array, np.ndarray, np.generic))


def _only_params(module) -> bool:
  """Whether `module` holds no Variable but Params (nothing its call could mutate)."""
  return all(isinstance(v, nnx.Param) for _, v in nnx.iter_graph(module)
             if isinstance(v, nnx.Variable))


def _draw_after_inputs(module, values) -> tp.Callable[[], None]:
  """Let the random draws inside `module`'s call start only once its first float input exists.

  Each of its key streams (``nnx.RngStream``) draws, for the call, from its
  key tied to that input (the same value, bitwise: every mask is unchanged);
  the returned function puts the keys back. Left alone, XLA's CPU scheduler
  runs the random draws of every rematerialised block at the step's start,
  where their keys are known, and holds their bits (threefry's two uint32
  arrays a draw, 8 bytes an element) until each block runs
  (tests/test_remat_draws.py).
  """
  dep = _one_call.draw_dependency(values)
  if dep is None:
    return lambda: None
  streams = [node for _, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream)]
  keys = [stream.key[...] for stream in streams]
  for stream, key in zip(streams, keys):
    stream.key[...] = _dropout.key_after(key, dep)

  def untie():
    for stream, key in zip(streams, keys):
      stream.key[...] = key
  return untie


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
      untie = _draw_after_inputs(module, values)
      try:
        return base_call(module, *a, **k)
      finally:
        untie()

    values = [leaves[i] for i in dyn]
    if any(_is_node(v) for v in values) or not (pure or _sketch_stream.in_step_keys()):
      return nnx.remat(inner, policy=policy)(self, *values)
    # A plain jax.checkpoint over the module's state, which (unlike nnx.remat)
    # also runs where the Variables belong to an outer trace: a model closed
    # over by jax.grad, or merged inside jax.value_and_grad (flax's functional
    # loop, keys from fb.nnx.step_keys), whose rng counts nnx.remat would
    # write back there, which NNX refuses. Only what the call changed is
    # written back after it.
    graphdef, state = nnx.split(self)

    def body(state, *values):
      module = nnx.merge(graphdef, state)
      out = inner(module, *values)
      before = dict(nnx.to_flat_state(state))
      changed = [(path, var) for path, var in nnx.to_flat_state(
          nnx.state(module, nnx.Not(nnx.Param))) if var.get_value() is not before[path].get_value()]
      return out, changed
    out, changed = jax.checkpoint(body, policy=policy)(state, *values)
    if changed:  # only what the call set: writing an rng count back is refused where the
      nnx.update(self, nnx.from_flat_state(changed))  # call could not have advanced it
    return out

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


# --------------------------------------------------------------------------
# The gated MLP: act(gate(x)) * up(x) -> down, recognised and verified.

_GATED_ATTR = "__fewbit_gated__"  # class attribute: (names, activation, approximate)


def _gated_names(module) -> tuple[str, str, str] | None:
  """The (gate, up, down) attribute names if `module`'s only child modules are those three."""
  children = {k for k, v in vars(module).items() if isinstance(v, nnx.Module)}
  for names in _one_call.GATED_NAMES:
    if children == set(names) and all(_has_kernel(getattr(module, n)) for n in names):
      return names
  return None


def _in_features(layer) -> int | None:
  n = getattr(layer, "in_features", None)
  if isinstance(n, int):
    return n
  kernel = getattr(layer, "kernel", None)
  if isinstance(kernel, nnx.Param) and np.ndim(kernel.get_value()) == 2:
    return int(np.shape(kernel.get_value())[0])
  return None


def _one_argument(call) -> bool:
  """Whether ``call(self, x)`` takes exactly one argument besides self."""
  try:
    params = list(inspect.signature(call).parameters.values())[1:]
  except (TypeError, ValueError):
    return False
  return (len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)
          and params[0].default is inspect.Parameter.empty)


def _gated_form(module, names, activation, approximate, x):
  g, u, d = (getattr(module, n) for n in names)
  return d(_gated(g(x), u(x), activation, approximate=approximate))


def _verify_gated(module, names) -> tuple[str, bool | None] | None:
  """The activation for which `module`'s call equals the gated form, or None.

  Traced once, on a copy of the module whose parameters are replaced by
  random ones (so zero-initialised layers, as in gemma, decide nothing) and
  a random probe input: the module's own call against
  ``down(gated(gate(x), up(x), act))`` for each activation of
  `fewbit_jax._one_call.GATED_ACTIVATIONS`. A call that fails, adds state
  (a ``sow``), or matches none leaves the module alone.
  """
  n_in = _in_features(getattr(module, names[0]))
  if n_in is None or not _one_argument(type(module).__call__):
    return None
  graphdef, state = nnx.split(module)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(20240607), len(leaves) + 1)
  leaves = [jax.random.normal(k, np.shape(v), v.dtype) * 0.5
            if jax.numpy.issubdtype(getattr(v, "dtype", np.int32), jax.numpy.floating) else v
            for k, v in zip(keys[1:], leaves)]
  probe_state = jax.tree.unflatten(treedef, leaves)
  x = jax.random.normal(keys[0], (2, 3, n_in), jax.numpy.float32)

  def own(state, x):
    m = nnx.merge(graphdef, state)
    y = m(x)
    return y, nnx.state(m)

  try:
    ref, after = own(probe_state, x)
  except Exception:  # noqa: BLE001 (a module the probe cannot call is simply not converted)
    return None
  if jax.tree.structure(after) != jax.tree.structure(probe_state):
    return None  # its call adds or changes state (sow...): not only the gated form
  if not isinstance(ref, jax.Array) or not jax.numpy.issubdtype(ref.dtype, jax.numpy.floating):
    return None
  ref = np.asarray(ref, np.float32)
  scale = float(np.max(np.abs(ref))) or 1.0
  for activation, approximate in _one_call.GATED_ACTIVATIONS:
    try:
      y = _gated_form(nnx.merge(graphdef, probe_state), names, activation, approximate, x)
    except Exception:  # noqa: BLE001
      return None
    y = np.asarray(y, np.float32)
    if y.shape == ref.shape and np.allclose(y, ref, rtol=1e-5, atol=1e-6 * scale):
      return activation, approximate
  return None


def _gated_call(names, activation, approximate, exact: bool, bits: int):
  """``__call__`` computing the MLP with `fewbit_jax.gated`.

  Exact mode when `exact`; otherwise `bits`-bit codes, except with a
  randomized down projection: that keeps a sketch of the product instead of
  the product, which the few-bit backward needs (``h / up``), so exact mode
  keeps less there (and is exact).
  """
  g, u, d = names

  def __call__(self, x):
    down = getattr(self, d)
    few = None if exact or isinstance(down, RandomizedLinear) else bits
    h = _gated(getattr(self, g)(x), getattr(self, u)(x), activation, approximate=approximate,
               bits=few)
    return down(h)

  return __call__


def recognise_gated(module, path: str, *, exact: bool = True, bits: int = 3):
  """Gives a gated MLP module the call ``down(fb.gated(gate(x), up(x), act))``.

  A module is a candidate when its only child modules are three
  projections named as in `fewbit_jax._one_call.GATED_NAMES`
  (``gate_proj/up_proj/down_proj``, Llama's ``w1/w3/w2``...) and its call
  takes one argument; it is converted only if, traced once on random
  parameters and a random input, its output equals the gated form for one
  of GELU (tanh or erf), SiLU or ReLU. The module keeps its Variables (and
  its class, as a subclass); anything else is returned unchanged.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from fewbit_jax.nnx._one_call import recognise_gated
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.w1, self.w3 = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(4, 8, rngs=rngs)
    ...     self.w2 = nnx.Linear(8, 4, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.w2(nnx.silu(self.w1(x)) * self.w3(x))
    >>> mlp = MLP(nnx.Rngs(0))
    >>> y = mlp(jnp.ones((2, 4)))
    >>> mlp = recognise_gated(mlp, "/mlp")
    >>> type(mlp).__fewbit_gated__[1]
    'silu'
    >>> bool(jnp.all(mlp(jnp.ones((2, 4))) == y))
    True
  """
  if not isinstance(module, nnx.Module) or _one_call.is_library_class(type(module)):
    return module
  if _GATED_ATTR in vars(type(module)):
    return module
  names = _gated_names(module)
  if names is None:
    return module
  found = _verify_gated(module, names)
  if found is None:
    return module
  activation, approximate = found
  _give_call(module, "gated",
             lambda call: _gated_call(names, activation, approximate, exact, bits),
             {_GATED_ATTR: (names, activation, approximate)})
  return module


_one_call.RECOGNISERS.setdefault("gated_mlp", recognise_gated)


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


def _recompute_alone(model, option: str, value, rule, done: list[str], by_default, policy,
                     skip=()) -> None:
  """Gives the modules `rule` chooses a call rematerialised alone with `policy`.

  `rule` is False (none), True (those `by_default` accepts) or a regular
  expression on module paths (which must match one); their paths go to
  `done`; paths in `skip` are left as they are.
  """
  if rule is False:
    return
  for path, m in _modules(model).items():
    if not path or _path_str(path) in skip:
      continue
    chosen = rule.search(_path_str(path)) if isinstance(rule, re.Pattern) else by_default(m)
    if chosen:
      pure = _only_params(m)
      _give_call(m, option, lambda call: _checkpointed(call, policy, pure))
      done.append(_path_str(path))
  if isinstance(rule, re.Pattern) and not done:
    raise ValueError(f"{option}={value!r} matches no module path; the paths are: "
                     + ", ".join(_path_str(p) for p in list(_modules(model))[1:25]))


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
            cheap=True, elementwise=False, bits: int = 3, proj_dim_ratio: float = 0.2,
            rngs=None, activations: bool = True, gated: bool = True, **linear_options):
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
     ``elementwise=``: the chosen modules (True: the model's own attention,
     class name matching ``/attention|attn/i``, holding matmul parameters)
     keep their matmuls' outputs only (``jax.checkpoint`` of that module
     alone with ``dots_saveable``): what an inline soft-cap
     (``tanh(logits / cap) * cap``), RoPE, mask or softmax would keep is
     recomputed from them. For models without block remat; it pays where
     the module's elementwise chain keeps more than its matmuls' outputs
     (a soft-capped attention: one score-sized array per layer less).
  4. ``remat=True``: the repeated blocks (modules of one class held twice or
     more by one owner, e.g. the elements of an ``nnx.List`` of layers; the
     outermost such) are rematerialised with ``policy``.
  5. The model's ``__call__`` patches the inline activations
     (``nnx.gelu(x)``, ``jax.nn.relu(x)``...) and ``jax.nn.softmax`` while it
     is traced (`fewbit_jax.patch_activations`): in exact mode with an exact
     gradient, otherwise few-bit with `bits` bits.

  0. ``gated=True``: gated MLPs, modules holding just three projections
     named ``gate_proj/up_proj/down_proj`` (or Llama's ``w1/w3/w2``, see
     `fewbit_jax._one_call.GATED_NAMES`) whose call is
     ``down(act(gate(x)) * up(x))``, compute the product with
     `fewbit_jax.gated` (exact mode; ``exact=False``: `bits`-bit codes,
     except where the down projection is randomized, which makes exact mode
     the leaner one). The pattern is verified by tracing the module once on
     random parameters and a random input against the gated form with GELU
     (tanh or erf), SiLU and ReLU: a module that only looks gated is left
     alone.

  Steps 0 and 3 to 5 give the module a subclass of its own class with the
  same attributes, so ``isinstance`` and ``nnx.split``/``nnx.merge`` keep
  working; just call ``model(x)`` inside the jitted step.

  The loss is the model's own: no conversion changes it. For a tied or
  large-vocabulary output layer, return the last hidden state and compute
  the loss with `fewbit_jax.linear_softmax_cross_entropy` (no logits kept).

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
    elementwise: False (default), True (the model's own attention modules), or
      a regular expression on module paths: modules whose elementwise work is
      recomputed, their matmuls' outputs kept (step 3). Not with ``remat=True``.
    bits: the few-bit activations' bits (``exact=False``).
    proj_dim_ratio: the randomized layers' sketch ratio (``exact=False``).
    rngs: where the randomized layers' sketch streams come from (as for
      `convert_linear`).
    activations: patch inline activations and softmax (default True).
    gated: recognise gated MLPs (step 0; default True).
    **linear_options: more options of the randomized layers (``sketch=``...).

  Returns:
    `model`, converted; `conversion` tells what was done.

  Raises:
    ValueError: a model converted already, ``remat=True`` with no block
      found (pass ``blocks=``), a `blocks`, `cheap` or `elementwise` pattern
      matching no module, `elementwise` with ``remat=True``, options given
      that the mode does not use.
    TypeError: bad `policy`, `blocks`, `cheap` or `elementwise`.

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
  elementwise_rule = _one_call.check_elementwise(elementwise, remat, "fb.nnx.convert")
  remat_policy = _one_call.resolve_policy(policy) if remat else None
  record = _one_call.Conversion(policy=None if not remat else
                                (policy if isinstance(policy, str) else
                                 "lean" if policy is None else getattr(policy, "__name__",
                                                                       repr(policy))))

  # 0. recognisers of whole sub-blocks (the gated MLP), verified on the
  # original layers; the calls they give look their layers up when called, so
  # the randomized layers of step 1 are used.
  for name, recognise in _one_call.RECOGNISERS.items():
    if name == "gated_mlp" and not gated:
      continue
    model = map_module(model, lambda m, path: recognise(m, path, exact=exact, bits=bits))
  for path, m in _modules(model).items():
    found = getattr(type(m), _GATED_ATTR, None)
    if found is not None:
      _, act, approx = found
      record.gated.append(f"{_path_str(path)}: {act}"
                          + ("" if approx is None else f" (approximate={approx})"))

  # 1. dense layers (approximate mode).
  if not exact:
    def to_randomized(m, path):
      new = convert_linear(m, RandomizedLinear, proj_dim_ratio=proj_dim_ratio, rngs=rngs,
                           **linear_options)
      if new is not m:
        record.linear.append(path)
      return new
    model = map_module(model, to_randomized)

  # 2. flax's norms, dropout and attention.
  def to_lean(m, path):
    fn = getattr(m, "attention_fn", None)
    new = convert_lean(m)
    if new is not m or getattr(new, "attention_fn", None) is not fn:
      record.lean.append(path)
    return new
  model = map_module(model, to_lean)

  # 3. the model's own cheap modules, and those whose elementwise work is recomputed.
  _recompute_alone(model, "cheap", cheap, cheap_rule, record.cheap,
                   lambda m: _one_call.is_cheap_class(type(m)) and not _has_kernel(m),
                   _one_call.nothing_saveable())
  _recompute_alone(model, "elementwise", elementwise, elementwise_rule, record.elementwise,
                   lambda m: _one_call.is_attention_class(type(m)) and _has_kernel(m),
                   _one_call.keep_dots(), skip=record.cheap)

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
