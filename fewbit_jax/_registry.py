"""The activation registry: one frozen record per few-bit activation.

Everything the package knows about an activation is written here once: its
forward (the ``jax.nn`` function itself, or the jnp expression of the torch
function jax lacks), its parameters with their defaults and checks, its kind
(piecewise linear with an exact 1-bit gradient, or continuous with tabled
levels), for piecewise ones the predicate and the two derivative levels, for
continuous ones the parameter sets that have shipped tables, the original
FewBit spellings (aliases) and the ``jax.nn``/flax name an inline call uses.
`fewbit_jax.activations` generates the public functions and their docstrings
from it, `fewbit_jax.tables` the forwards it differentiates and the shipped
parameter sets, `fewbit_jax.patch` the names it can patch.

Forwards are the function objects ``jax.nn`` has when the package is
imported, so a few-bit activation computes jax's forward even while
`fewbit_jax.patch.patch_activations` has swapped the ``jax.nn`` attribute.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

KIND_PIECEWISE = "piecewise"
KIND_CONTINUOUS = "continuous"


# --------------------------------------------------------------------------
# Parameter conversions: (activation, parameter, value) -> the value used.


def as_bool(name: str, what: str, v: Any) -> bool:
  del name, what
  return bool(v)


def as_float(name: str, what: str, v: Any) -> float:
  """A concrete Python float (predicates and levels are fixed before tracing)."""
  try:
    return float(v)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f"{name}: {what} must be a concrete Python float; got {v!r}") from e


def as_table_float(name: str, what: str, v: Any) -> float:
  """A concrete Python float that selects an optimal table."""
  if isinstance(v, (jax.Array, np.ndarray)) and np.ndim(v) != 0:
    raise TypeError(f"{name}: {what} must be a Python float; got an array of shape "
                    f"{np.shape(v)}")
  try:
    return float(v)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f"{name}: {what} must be a concrete Python float (its table is built "
                    f"before tracing); got {v!r}") from e


def _check_bounds(name: str, p: dict) -> None:
  if not p["min_val"] < p["max_val"]:
    raise ValueError(f"{name} needs min_val < max_val; got {p['min_val']} and {p['max_val']}")


def _check_alpha(name: str, p: dict) -> None:
  if p["alpha"] == 0:
    raise ValueError(f"{name} needs alpha != 0 (it divides x by alpha); got alpha={p['alpha']}")


def _check_lambd(name: str, p: dict) -> None:
  if p["lambd"] < 0:
    raise ValueError(f"{name} needs lambd >= 0; got {p['lambd']}")


@dataclasses.dataclass(frozen=True)
class Param:
  """A parameter of an activation, positional or keyword after ``x``.

  Attributes:
    name: its keyword (that of ``jax.nn``/torch).
    default: its default value.
    annotation: its type as the public signature shows it.
    convert: ``convert(activation, name, value)``: the checked value used.
    required: the default (None) is a placeholder; the caller must pass it.
    shipped: for continuous activations, the values besides the default whose
      tables ship in ``tables.json``.
  """
  name: str
  default: Any
  annotation: str
  convert: Callable[[str, str, Any], Any]
  required: bool = False
  shipped: tuple = ()


def _float(name: str, default: Any, **kw) -> Param:
  return Param(name, default, "float | None" if default is None else "float", as_float, **kw)


_ALPHA = Param("alpha", 1.0, "float", as_table_float)
_LAMBD = _float("lambd", 0.5)


@dataclasses.dataclass(frozen=True)
class Activation:
  """Everything about one few-bit activation.

  Attributes:
    name: the canonical name (``jax.nn``'s where it has the function).
    kind: `KIND_PIECEWISE` or `KIND_CONTINUOUS`.
    forward: ``forward(x, **params)``, bitwise the function it replaces.
    formula: the function in words, for its docstring.
    params: its parameters after ``x``, in signature order.
    predicate: piecewise: ``predicate(x, **params)``, True where the
      derivative is ``levels[1]`` (else ``levels[0]``).
    levels: piecewise: the two derivative values, or ``levels(**params)``.
    check: ``check(name, params)`` raises ValueError for inconsistent
      (converted) parameters.
    missing: the error message when a required parameter is left out.
    aliases: other spellings (the original FewBit's, jax's second names).
    jax_name: the name of the same function in ``jax.nn`` and flax, if any.
    reference: what the forward is identical to (default ``jax.nn.<jax_name>``).
    example: extra arguments of its docstring example.
  """
  name: str
  kind: str
  forward: Callable
  formula: str
  params: tuple[Param, ...] = ()
  predicate: Callable | None = None
  levels: tuple | Callable = (0.0, 1.0)
  check: Callable[[str, dict], None] | None = None
  missing: str = ""
  aliases: tuple[str, ...] = ()
  jax_name: str | None = None
  reference: str = ""
  example: str = ""

  def __post_init__(self):
    if not self.reference:
      object.__setattr__(self, "reference", f"jax.nn.{self.jax_name}")

  @property
  def defaults(self) -> dict:
    return {p.name: p.default for p in self.params}

  def parse(self, raw: dict) -> dict:
    """The checked parameter values from those the caller passed."""
    if any(p.required and raw[p.name] is None for p in self.params):
      raise TypeError(self.missing)
    vals = {p.name: p.convert(self.name, p.name, raw[p.name]) for p in self.params}
    if self.check is not None:
      self.check(self.name, vals)
    return vals

  def shipped(self) -> list[dict]:
    """Parameter sets whose tables ship with the package (continuous)."""
    values = [(p.default,) + tuple(p.shipped) for p in self.params]
    return [dict(zip(self.defaults, combo)) for combo in itertools.product(*values)]

  def levels_for(self, params: dict) -> tuple:
    """Piecewise: the two derivative levels for these parameters."""
    return self.levels(**params) if callable(self.levels) else self.levels


def _in_jax(name: str, forward: Callable, formula: str, kind: str = KIND_CONTINUOUS,
            **kw) -> Activation:
  return Activation(name, kind, forward, formula, jax_name=name, **kw)


_JAX_HARD_TANH = jax.nn.hard_tanh


def _hard_tanh(x, min_val, max_val):
  """jax.nn.hard_tanh at its default bounds; the same clip on other bounds."""
  if (min_val, max_val) == (-1.0, 1.0):
    return _JAX_HARD_TANH(x)
  return jnp.where(x > max_val, jnp.asarray(max_val, x.dtype),
                   jnp.where(x < min_val, jnp.asarray(min_val, x.dtype), x))


def _threshold(x, threshold, value):
  return jnp.where(x > threshold, x, jnp.asarray(value, x.dtype))


def _hard_shrink(x, lambd):
  return jnp.where(jnp.abs(x) > lambd, x, jnp.zeros_like(x))


def _soft_shrink(x, lambd):
  return jnp.where(x > lambd, x - lambd, jnp.where(x < -lambd, x + lambd, jnp.zeros_like(x)))


def _tanhshrink(x):
  return x - jnp.tanh(x)


_P = KIND_PIECEWISE
_RECORDS = (
    # Piecewise linear: a two-valued derivative, exact at 1 bit.
    _in_jax("relu", jax.nn.relu, "max(x, 0)", _P, predicate=lambda x: x > 0),
    _in_jax("relu6", jax.nn.relu6, "min(max(x, 0), 6)", _P,
            predicate=lambda x: (x > 0) & (x < 6)),
    _in_jax("leaky_relu", jax.nn.leaky_relu, "x if x >= 0 else negative_slope * x", _P,
            params=(_float("negative_slope", 1e-2),),
            predicate=lambda x, negative_slope: x >= 0.0,
            levels=lambda negative_slope: (negative_slope, 1.0)),
    _in_jax("hard_tanh", _hard_tanh, "clip(x, min_val, max_val)", _P,
            params=(_float("min_val", -1.0), _float("max_val", 1.0)),
            predicate=lambda x, min_val, max_val: (x >= min_val) & (x <= max_val),
            check=_check_bounds, aliases=("hardtanh",)),
    _in_jax("hard_sigmoid", jax.nn.hard_sigmoid, "relu6(x + 3) / 6", _P,
            predicate=lambda x: (x > -3) & (x < 3), levels=(0.0, 1.0 / 6.0),
            aliases=("hardsigmoid",)),
    Activation("threshold", _P, _threshold, "x if x > threshold else value",
               params=(_float("threshold", None, required=True),
                       _float("value", None, required=True)),
               predicate=lambda x, threshold, value: x > threshold,
               missing="threshold needs threshold= and value= (as "
                       "torch.nn.functional.threshold: y = x if x > threshold else value)",
               reference="torch.nn.functional.threshold, in jnp",
               example=", threshold=0.5, value=-1.0"),
    Activation("hard_shrink", _P, _hard_shrink, "x if |x| > lambd else 0", params=(_LAMBD,),
               predicate=lambda x, lambd: jnp.abs(x) > lambd, check=_check_lambd,
               aliases=("hardshrink",), reference="torch.nn.functional.hardshrink, in jnp"),
    Activation("soft_shrink", _P, _soft_shrink, "x - lambd*sign(x) if |x| > lambd else 0",
               params=(_LAMBD,), predicate=lambda x, lambd: jnp.abs(x) > lambd,
               check=_check_lambd, aliases=("softshrink",),
               reference="torch.nn.functional.softshrink, in jnp"),
    # Continuous: tabled levels, bits 1..8.
    _in_jax("celu", jax.nn.celu, "max(0, x) + min(0, alpha * (exp(x / alpha) - 1))",
            params=(_ALPHA,), check=_check_alpha),
    _in_jax("elu", jax.nn.elu, "x if x > 0 else alpha * (exp(x) - 1)", params=(_ALPHA,)),
    _in_jax("gelu", jax.nn.gelu, "x * Phi(x) (approximate=True: the tanh form)",
            params=(Param("approximate", True, "bool", as_bool, shipped=(False,)),)),
    _in_jax("hard_swish", jax.nn.hard_swish, "x * relu6(x + 3) / 6",
            aliases=("hardswish", "hard_silu")),
    _in_jax("log_sigmoid", jax.nn.log_sigmoid, "-softplus(-x)", aliases=("logsigmoid",)),
    _in_jax("mish", jax.nn.mish, "x * tanh(softplus(x))"),
    _in_jax("selu", jax.nn.selu, "scale * elu(x, alpha), the self-normalising constants"),
    _in_jax("sigmoid", jax.nn.sigmoid, "1 / (1 + exp(-x))"),
    _in_jax("silu", jax.nn.silu, "x * sigmoid(x)", aliases=("swish",)),
    _in_jax("softplus", jax.nn.softplus, "log(1 + exp(x))"),
    _in_jax("soft_sign", jax.nn.soft_sign, "x / (|x| + 1)", aliases=("softsign",)),
    _in_jax("tanh", jnp.tanh, "tanh(x)"),
    Activation("tanhshrink", KIND_CONTINUOUS, _tanhshrink, "x - tanh(x)",
               reference="x - jnp.tanh(x)"),
)

# Canonical name -> record, piecewise first, each kind in the order above.
ACTIVATIONS: types.MappingProxyType = types.MappingProxyType({r.name: r for r in _RECORDS})
# Alias -> canonical name.
ALIASES: types.MappingProxyType = types.MappingProxyType(
    {a: r.name for r in _RECORDS for a in r.aliases})


def of_kind(kind: str) -> tuple[Activation, ...]:
  """The records of one kind, in registry order."""
  return tuple(r for r in _RECORDS if r.kind == kind)


def aliases_of(kind: str) -> dict[str, str]:
  """Alias -> canonical name, for the activations of one kind."""
  return {a: r.name for r in of_kind(kind) for a in r.aliases}
