"""`convert`: everything the library has, applied to an unedited linen model, as one context.

Inside it a linen model's calls are traced with: its ``nn.Dense`` layers
randomized (`fewbit_jax.linen.intercept`, approximate mode only), flax's norms,
dropout and attention lean (`fewbit_jax.linen.lean`), inline activations and
softmax patched (`fewbit_jax.patch_activations`), its own norm-like modules
recomputed in the backward pass and its repeated blocks rematerialised
(``flax.linen.remat`` of the module's call, by interception).
"""

from __future__ import annotations

import contextlib
import re
import threading

import flax.linen as nn
import jax
import numpy as np
from flax.core.scope import LazyRng

from fewbit_jax import _dropout, _one_call
from fewbit_jax import patch as _patch
from fewbit_jax.linen._convert import module_path, intercept
from fewbit_jax.linen._lean import lean

__all__ = ["convert"]

_local = threading.local()
_TRAILING_INDEX = re.compile(r"^(.*?)_?(\d+)$")


def _params_of(module: nn.Module):
  try:
    return module.variables.get("params", {})
  except Exception:  # an unbound module: nothing to compare
    return {}


def _has_kernel(tree) -> bool:
  return any(np.ndim(leaf) >= 2 for leaf in jax.tree.leaves(tree))


def _structure(tree):
  return jax.tree.structure(tree), tuple(np.shape(x) for x in jax.tree.leaves(tree))


def _is_repeated_block(module: nn.Module) -> bool:
  """A model's own module named ``<prefix><i>`` with a sibling of the same name pattern and params."""
  if _one_call.is_library_class(type(module)) or module.parent is None:
    return False
  match = _TRAILING_INDEX.match(module.name or "")
  own = _params_of(module)
  if match is None or not _has_kernel(own):
    return False
  prefix = match.group(1)
  siblings = _params_of(module.parent)
  shape = _structure(own)
  same = [name for name, tree in siblings.items()
          if (m := _TRAILING_INDEX.match(name)) and m.group(1) == prefix
          and _structure(tree) == shape]
  return len(same) >= 2


def _is_cheap(module: nn.Module) -> bool:
  return _one_call.is_cheap_class(type(module)) and not _has_kernel(_params_of(module))


def _draw_after_inputs(module: nn.Module, values) -> None:
  """Let the random draws inside `module`'s call start only once its first float input exists.

  Its keys are those of the scope it was given (the same values, bitwise:
  every mask is unchanged). Left alone, XLA's CPU scheduler runs the random
  draws of every rematerialised block at the start of the step, since their
  keys are known there, and holds their bits (threefry's two uint32 arrays a
  draw, 8 bytes an element) until each block runs: more than the blocks'
  activations themselves. Tied to the block's input, each draw runs when its
  block does.
  """
  dep = _one_call.draw_dependency(values)
  rngs = getattr(module.scope, "rngs", None)
  if dep is None or not rngs:
    return
  for name, lazy in list(rngs.items()):
    if isinstance(lazy, LazyRng):
      rngs[name] = LazyRng(_dropout.key_after(lazy.rng, dep), lazy.suffix)
    else:
      rngs[name] = _dropout.key_after(lazy, dep)


def _checkpointed_call(module: nn.Module, args, kwargs, policy):
  """``module(*args, **kwargs)`` under ``nn.remat(policy=policy)``; Python values stay static."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  dyn = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]
  static = [None if i in dyn else leaf for i, leaf in enumerate(leaves)]

  def _fewbit_checkpointed(mdl, *values):
    full = list(static)
    for i, v in zip(dyn, values):
      full[i] = v
    a, k = jax.tree.unflatten(treedef, full)
    _draw_after_inputs(mdl, values)
    _local.enter = mdl  # its own call passes through the interceptor
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
      return mdl(*a, **k)
    finally:
      _local.depth = depth

  return nn.remat(_fewbit_checkpointed, policy=policy)(module, *(leaves[i] for i in dyn))


@contextlib.contextmanager
def convert(*, exact: bool = True, remat: bool = False, policy=None, blocks=None, cheap=True,
            elementwise=False, bits: int = 3, proj_dim_ratio: float = 0.2,
            activations: bool = True, warn_unused: bool = True, **dense_options):
  """Applies every technique of the library to the linen models traced inside.

  Linen's counterpart of `fewbit_jax.nnx.convert`; the variables, their
  tree and ``init`` are unchanged. While inside:

  1. ``exact=False`` only: ``nn.Dense``/``nn.DenseGeneral`` run randomized
     (`fewbit_jax.linen.intercept` with ``proj_dim_ratio``; pass
     ``rngs={'sketch': key}`` to ``apply``, a fresh key every step).
  2. flax's ``LayerNorm``, ``RMSNorm``, ``Dropout`` and attention run lean
     (`fewbit_jax.linen.lean`).
  3. The model's own norm-like modules (class name matching ``/norm/i``,
     no matmul parameters) are recomputed in the backward pass
     (``nn.remat`` of that module alone, saving nothing but its inputs).
     ``elementwise=``: the chosen modules (True: the model's own attention,
     class name matching ``/attention|attn/i``, holding matmul parameters)
     keep only their matmuls' outputs (``nn.remat`` with ``dots_saveable``):
     an inline soft-cap, RoPE, mask or softmax is recomputed from them.
  4. ``remat=True``: the repeated blocks (the model's own modules named
     ``<prefix><i>``, e.g. ``layer_3`` or ``Block_3``, with siblings of the
     same prefix and the same parameter shapes; the outermost) run under
     ``nn.remat`` with ``policy``. Blocks are recognised from the
     parameters, so only in ``apply``, not in ``init``.
  5. Inline activations and ``jax.nn.softmax`` are patched
     (`fewbit_jax.patch_activations`): exact mode with ``exact=True``,
     few-bit with `bits` bits otherwise.

  As every interception, it acts while the model is *traced*: trace (jit)
  the step inside the context.

  Unlike the NNX conversion it does not recognise gated MLPs (a compact
  module's layers exist only while it runs): their activation is patched
  (step 5); `fewbit_jax.linen.GatedMLP` is the drop-in. The loss is the
  model's own: for a large vocabulary, return the last hidden state and
  compute the loss with `fewbit_jax.linear_softmax_cross_entropy`.

  Args:
    exact: True (default): no gradient changes beyond float rounding. False:
      few-bit activations and randomized dense layers at their defaults.
    remat: rematerialise the repeated blocks (default False).
    policy: their ``jax.checkpoint`` policy: None (the library's,
      `fewbit_jax.remat.frontier_policy`), a name of
      `fewbit_jax.remat.FRONTIER`, or any policy.
    blocks: None (found as above), a regular expression searched in module
      paths (``'^/layer_\\d+$'``), or a class or tuple of classes.
    cheap: True (the ``/norm/i`` rule of step 3), False, or a regular
      expression on module paths.
    elementwise: False (default), True (the model's own attention modules), or
      a regular expression on module paths (step 3). Not with ``remat=True``.
    bits: the few-bit activations' bits (``exact=False``).
    proj_dim_ratio: the randomized layers' sketch ratio (``exact=False``).
    activations: patch inline activations and softmax (default True).
    warn_unused: warn on exit when nothing was converted.
    **dense_options: more options of `fewbit_jax.linen.intercept`.

  Yields:
    A `fewbit_jax._one_call.Conversion` filled while the model is traced.

  Raises:
    ValueError: options that the mode does not use, bad bits or sketch options.
    TypeError: bad `policy`, `blocks` or `cheap`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return x + nn.Dense(8)(nn.gelu(nn.Dense(32)(nn.LayerNorm()(x))))
    >>> class Model(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for i in range(2):
    ...       x = Block(name=f"layer_{i}")(x)
    ...     return x
    >>> x = jnp.ones((2, 8))
    >>> v = Model().init(jax.random.key(0), x)
    >>> with fb.linen.convert(remat=True) as done:
    ...   g = jax.grad(lambda v: Model().apply(v, x).sum())(v)
    >>> done.blocks
    ['/layer_0', '/layer_1']
    >>> ref = jax.grad(lambda v: Model().apply(v, x).sum())(v)
    >>> bool(jax.tree.all(jax.tree.map(lambda a, b: jnp.allclose(a, b, atol=1e-5), g, ref)))
    True
  """
  if exact and dense_options:
    raise ValueError(f"options {sorted(dense_options)} are for the randomized layers, which "
                     "exact=True does not use; pass exact=False or drop them.")
  block_regex, block_classes = _one_call.check_blocks(blocks, "fb.linen.convert")
  cheap_rule = _one_call.check_cheap(cheap, "fb.linen.convert")
  elementwise_rule = _one_call.check_elementwise(elementwise, remat, "fb.linen.convert")
  remat_policy = _one_call.resolve_policy(policy) if remat else None
  choices = _one_call.activation_choices(exact, bits) if activations else {}
  if choices:
    _patch.parse_bits(choices)
  record = _one_call.Conversion(
      activations=choices,
      policy=None if not remat else (policy if isinstance(policy, str) else "lean"
                                     if policy is None else getattr(policy, "__name__",
                                                                    repr(policy))))
  recompute = _one_call.nothing_saveable()
  keep_dots = _one_call.keep_dots()

  def kind_of(module: nn.Module) -> str | None:
    if module.is_initializing():
      return None
    path = module_path(module)
    if remat and not getattr(_local, "depth", 0):
      if block_regex is not None:
        if block_regex.search(path):
          return "block"
      elif block_classes:
        if isinstance(module, block_classes):
          return "block"
      elif _is_repeated_block(module):
        return "block"

    def chosen(rule, by_default) -> bool:  # rule: False, True (by_default) or a path regex
      if rule is False:
        return False
      return bool(rule.search(path)) if isinstance(rule, re.Pattern) else by_default()
    if chosen(cheap_rule, lambda: _is_cheap(module)):
      return "cheap"
    if chosen(elementwise_rule, lambda: _one_call.is_attention_class(type(module))
              and _has_kernel(_params_of(module))):
      return "elementwise"
    return None

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if getattr(_local, "enter", None) is module:
      _local.enter = None
      return next_fun(*args, **kwargs)
    kind = kind_of(module)
    if kind is None:
      return next_fun(*args, **kwargs)
    path = module_path(module)
    seen = {"block": record.blocks, "cheap": record.cheap,
            "elementwise": record.elementwise}[kind]
    if path not in seen:
      seen.append(path)
    return _checkpointed_call(module, args, kwargs, {"block": remat_policy, "cheap": recompute,
                                                     "elementwise": keep_dots}[kind])

  with contextlib.ExitStack() as stack:
    if not exact:
      dense = stack.enter_context(intercept(proj_dim_ratio=proj_dim_ratio, warn_unused=False,
                                            **dense_options))
      record.linear = dense.converted
    record.lean = stack.enter_context(lean(warn_unused=False)).converted
    stack.enter_context(nn.intercept_methods(interceptor))
    if choices:
      stack.enter_context(_patch.patch_activations(warn_unused=False, **choices))
    yield record
  if warn_unused and not (record.linear or record.lean or record.cheap or record.elementwise
                          or record.blocks):
    import warnings
    warnings.warn("fewbit_jax.linen.convert converted no layer: no linen model was traced in "
                  "the context (a jitted step traced before it is reused from jax.jit's cache: "
                  "trace it inside), or the model has nothing the library knows.",
                  UserWarning, stacklevel=3)
