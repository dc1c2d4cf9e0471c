"""What the one-call conversions (`fewbit_jax.nnx.convert`, `fewbit_jax.linen.convert`) apply.

The choices shared by the NNX and linen conversions, written once: which
activations are patched and how (`activation_choices`), which ``jax.checkpoint``
policy a ``policy=`` option names (`resolve_policy`), which modules count as
cheap elementwise blocks that are recomputed rather than kept (`is_cheap_class`),
which module classes are the library's or flax's own layers (never blocks),
and the hook where recognisers of whole sub-blocks (the gated MLP) plug in
(`RECOGNISERS`).
"""

from __future__ import annotations

import dataclasses
import re
import typing as tp

import jax
import jax.numpy as jnp

from fewbit_jax import _registry
from fewbit_jax import patch as _patch
from fewbit_jax import remat as _remat

__all__ = ["activation_choices", "resolve_policy", "is_cheap_class", "is_library_class",
           "is_attention_class", "check_elementwise", "keep_dots", "Conversion", "RECOGNISERS"]

# Module class names that are cheap elementwise/normalisation blocks by default.
CHEAP_NAME = re.compile(r"norm", re.IGNORECASE)

# Module class names that ``elementwise=True`` takes for attention.
ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)

# Recognisers of whole sub-blocks that the library has a lean op for, applied
# by the NNX conversion before anything else: ``(module, path, *, exact, bits)
# -> module`` returning a replacement holding the same Variables, or the
# module itself (``fewbit_jax.nnx._one_call`` registers the gated MLP's,
# ``act(gate_proj(x)) * up_proj(x)`` -> `fewbit_jax.gated`).
RECOGNISERS: dict[str, tp.Callable[..., tp.Any]] = {}

# The attribute names of a gated MLP's three projections (gate, up, down):
# Gemma/Hugging Face, Llama's w1/w3/w2, T5's wi_0/wi_1/wo, and plain ones.
GATED_NAMES: tuple[tuple[str, str, str], ...] = (
    ("gate_proj", "up_proj", "down_proj"),
    ("w1", "w3", "w2"),
    ("wi_0", "wi_1", "wo"),
    ("w_gate", "w_up", "w_down"),
    ("gate", "up", "down"),
)

# The activations a gated MLP is tried with, in order: (name for fb.gated,
# approximate). GELU's tanh and erf forms differ by ~1e-3, far above rounding.
GATED_ACTIVATIONS: tuple[tuple[str, bool | None], ...] = (
    ("gelu", True), ("gelu", False), ("silu", None), ("relu", None))


def activation_choices(exact: bool, bits: int) -> dict[str, int | str]:
  """``patch_activations`` keywords: every patchable activation, and softmax.

  Exact: continuous activations in exact mode (keep x, exact derivative) and
  piecewise-linear ones at 1 bit (their 1-bit gradient is exact). Otherwise
  continuous ones at `bits` bits.

  Example:
    >>> from fewbit_jax._one_call import activation_choices
    >>> c = activation_choices(True, 3)
    >>> c["gelu"], c["relu"], c["softmax"]
    ('exact', 1, True)
    >>> activation_choices(False, 2)["silu"]
    2
  """
  out: dict[str, int | str] = {}
  for name in _patch.PATCHABLE:
    if _registry.ACTIVATIONS[name].kind == _registry.KIND_PIECEWISE:
      out[name] = 1
    else:
      out[name] = _patch.EXACT if exact else bits
  out["softmax"] = True
  return out


def resolve_policy(policy) -> tp.Callable[..., bool]:
  """The ``jax.checkpoint`` policy that a conversion's ``policy=`` option names.

  None is the library's default (`fewbit_jax.remat.frontier_policy`'s
  ``'lean'``); a string is one of `fewbit_jax.remat.FRONTIER` (the
  library's counterpart of JAX's policy of that name); a callable is used
  as it is.

  Example:
    >>> import jax
    >>> from fewbit_jax._one_call import resolve_policy
    >>> p = jax.checkpoint_policies.nothing_saveable
    >>> resolve_policy(p) is p
    True
    >>> callable(resolve_policy("dots_with_no_batch_dims_saveable"))
    True
  """
  if policy is None:
    return _remat.frontier_policy()
  if isinstance(policy, str):
    return _remat.frontier_policy(policy)
  if callable(policy):
    return policy
  raise TypeError(f"policy must be None (the library's default), one of "
                  f"{sorted(_remat.FRONTIER)} or a jax.checkpoint policy (a callable); got "
                  f"{policy!r}")


def is_library_class(cls: type) -> bool:
  """Whether `cls` is defined by flax or fewbit_jax (a layer, never a block to remat).

  Example:
    >>> from flax import nnx
    >>> from fewbit_jax._one_call import is_library_class
    >>> is_library_class(nnx.Linear), is_library_class(dict)
    (True, False)
  """
  module = getattr(cls, "__module__", "") or ""
  top = module.split(".")[0]
  # The models of the demo and benchmarks (fewbit_jax._models) and the
  # conversions' examples (defined in the _one_call modules) are users' models.
  return top == "flax" or (top == "fewbit_jax" and not module.endswith("_one_call")
                           and not module.startswith("fewbit_jax._models"))


def is_cheap_class(cls: type) -> bool:
  """Whether `cls`'s name says it is a norm (``/norm/i``) and it is the model's own.

  flax's norms are converted by the lean twins instead (exact, smaller).

  Example:
    >>> from fewbit_jax._one_call import is_cheap_class
    >>> RMSNorm = type("RMSNorm", (), {"__module__": "my_model"})
    >>> is_cheap_class(RMSNorm)
    True
  """
  return bool(CHEAP_NAME.search(cls.__name__)) and not is_library_class(cls)


def is_attention_class(cls: type) -> bool:
  """Whether `cls`'s name says it is attention (``/attention|attn/i``) and it is the model's own.

  Example:
    >>> from fewbit_jax._one_call import is_attention_class
    >>> is_attention_class(type("SelfAttention", (), {"__module__": "my_model"}))
    True
  """
  return bool(ATTENTION_NAME.search(cls.__name__)) and not is_library_class(cls)


def check_elementwise(elementwise, remat: bool, what: str):
  """`elementwise` as False, True (the attention rule) or a regex; or a clear error.

  Example:
    >>> from fewbit_jax._one_call import check_elementwise
    >>> check_elementwise(r"/attn$", remat=False, what="convert").pattern
    '/attn$'
  """
  rule = _module_rule(elementwise, False, what, "elementwise",
                      "the model's own attention modules, class name matching /attention|attn/i")
  if rule is not False and remat:
    raise ValueError(f"{what}: elementwise= recomputes the elementwise work of single modules "
                     "of a model whose blocks are not rematerialised; with remat=True the "
                     "blocks' policy already decides what is recomputed. Pass one of the two.")
  return rule


def keep_dots() -> tp.Callable[..., bool]:
  """The policy of `elementwise` modules: keep every matmul's output, recompute the rest.

  Example:
    >>> import jax
    >>> from fewbit_jax._one_call import keep_dots
    >>> keep_dots() is jax.checkpoint_policies.dots_saveable
    True
  """
  return jax.checkpoint_policies.dots_saveable


def check_blocks(blocks, what: str):
  """`blocks` as (regex or None, classes tuple), or a clear error."""
  if blocks is None:
    return None, ()
  if isinstance(blocks, str):
    return re.compile(blocks), ()
  if isinstance(blocks, type):
    return None, (blocks,)
  if isinstance(blocks, (tuple, list)) and blocks and all(isinstance(b, type) for b in blocks):
    return None, tuple(blocks)
  raise TypeError(f"{what}: blocks must be None (find the repeated blocks), a regular "
                  f"expression on module paths, or a class (or tuple of classes); got "
                  f"{blocks!r}")


def check_cheap(cheap, what: str):
  """`cheap` as a regex, True (the default rule) or False; or a clear error."""
  return _module_rule(cheap, True, what, "cheap", "modules whose class name matches /norm/i")


def _module_rule(value, if_none: bool, what: str, option: str, rule_true: str):
  """An option choosing modules: True (its default rule), False, or a regex on module paths."""
  if value is None:
    return if_none
  if value is True or value is False:
    return value
  if isinstance(value, str):
    return re.compile(value)
  raise TypeError(f"{what}: {option} must be True ({rule_true}), False, or a regular "
                  f"expression on module paths; got {value!r}")


def draw_dependency(values):
  """The block input its random draws wait for: the first non-empty float array, or None.

  Both converters tie the keys of a rematerialised block to it, so that XLA's
  CPU scheduler cannot start the block's draws at the step's start (where
  their keys are known) and hold their bits until the block runs.

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax._one_call import draw_dependency
    >>> draw_dependency([jnp.arange(3), jnp.ones(2)]).dtype
    dtype('float32')
  """
  return next((v for v in values if isinstance(v, jax.Array)
               and jnp.issubdtype(v.dtype, jnp.floating) and v.size), None)


def nothing_saveable() -> tp.Callable[..., bool]:
  """The policy of cheap modules: keep their inputs only, recompute their forward."""
  return jax.checkpoint_policies.nothing_saveable


@dataclasses.dataclass
class Conversion:
  """What a one-call conversion did, by module path.

  ``linear``: layers made randomized; ``lean``: flax norms, dropout and
  attention made lean; ``cheap``: the model's own cheap modules recomputed
  in the backward pass; ``elementwise``: modules whose elementwise work is
  recomputed (their matmuls' outputs kept); ``blocks``: the blocks rematerialised with
  ``policy``; ``gated``: gated MLPs whose call became `fewbit_jax.gated`
  (path: activation); ``activations``: the activation patch applied while
  the model is traced.

  Example:
    >>> from fewbit_jax._one_call import Conversion
    >>> Conversion().blocks
    []
  """
  linear: list[str] = dataclasses.field(default_factory=list)
  lean: list[str] = dataclasses.field(default_factory=list)
  cheap: list[str] = dataclasses.field(default_factory=list)
  elementwise: list[str] = dataclasses.field(default_factory=list)
  blocks: list[str] = dataclasses.field(default_factory=list)
  gated: list[str] = dataclasses.field(default_factory=list)
  activations: dict = dataclasses.field(default_factory=dict)
  policy: str | None = None

  def __repr__(self) -> str:
    def short(xs):
      return xs if len(xs) <= 6 else xs[:3] + [f"... {len(xs) - 3} more"]
    return (f"Conversion(linear={short(self.linear)}, lean={short(self.lean)}, "
            f"cheap={short(self.cheap)}, elementwise={short(self.elementwise)}, "
            f"gated={short(self.gated)}, blocks={short(self.blocks)}, "
            f"policy={self.policy})")
