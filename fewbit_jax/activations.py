"""Few-bit activations: drop-in replacements for ``jax.nn`` activations.

Each activation computes exactly the output of the ``jax.nn`` function of the
same name (bitwise: the same XLA operations), but its ``jax.custom_vjp`` saves
for the backward pass only a b-bit code per element, packed into bit planes
(`fewbit_jax.codes`): the index of the interval of x in a piecewise-constant
approximation of f' with ``2**bits`` levels. The backward is
``grad_x = levels[code] * grad_y``, computed in the cotangent's dtype.

Piecewise-linear activations (relu, relu6, leaky_relu, hard_tanh,
hard_sigmoid, threshold, hard_shrink, soft_shrink) have a two-valued
derivative, so their 1-bit gradient is exact (including at the kinks, where
it follows ``jax.grad`` of the ``jax.nn`` function). Continuous ones take
``bits=1..8`` (default 3) and use the optimal tables of `fewbit_jax.tables`.

Calling forms, for every activation::

  fb.gelu(x)                          # compute, 3 bits
  fb.gelu(x, approximate=False, bits=4)
  fb.gelu(bits=2)                     # no x: a callable x -> y, e.g. for
                                      # nn.Dense(..., activation=...) fields
  fb.gelu(x, borders=b, levels=l)     # your own table (2**k levels)

NaN and infinite inputs: the forward is that of ``jax.nn``. Codes compare x
against the borders in float32; +inf gets the last interval, -inf the first,
and NaN the first (code 0), so the backward is always defined and finite for
finite cotangents: ``levels[0] * g`` at NaN (``jax.grad`` gives NaN there).

Example:
  >>> import jax, jax.numpy as jnp
  >>> import fewbit_jax as fb
  >>> x = jnp.linspace(-3, 3, 7)
  >>> bool(jnp.all(fb.gelu(x) == jax.nn.gelu(x)))
  True
  >>> g = jax.grad(lambda x: fb.relu(x).sum())(x)  # exact for relu
  >>> bool(jnp.all(g == jax.grad(lambda x: jax.nn.relu(x).sum())(x)))
  True
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fewbit_jax import ext
from fewbit_jax import tables as _tables
from fewbit_jax.codes import check_bits

__all__ = [
    "fewbit", "CODES_NAME",
    # piecewise (exact, 1 bit)
    "relu", "relu6", "leaky_relu", "hard_tanh", "hard_sigmoid", "threshold",
    "hard_shrink", "soft_shrink",
    # continuous (bits 1..8)
    "celu", "elu", "gelu", "hard_swish", "log_sigmoid", "mish", "selu", "sigmoid",
    "silu", "softplus", "soft_sign", "tanh", "tanhshrink",
    # aliases
    "hardtanh", "hardsigmoid", "hardshrink", "softshrink", "hardswish", "logsigmoid",
    "softsign", "swish", "hard_silu",
    "PIECEWISE", "CONTINUOUS", "ALIASES",
]

# Name given (with jax.ad_checkpoint.checkpoint_name) to every packed-code
# residual, so that jax.checkpoint policies can single them out.
CODES_NAME = "fewbit_codes"

_DEFAULT_BITS = 3
_NO_X = object()


def _check_input(x: Any, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"fewbit {name} needs a floating-point input (float32, bfloat16, float16, "
                    f"float64); got {x.dtype}. Cast it first, e.g. x.astype(jnp.float32).")
  return x


# --------------------------------------------------------------------------
# The two custom_vjp cores.


@functools.lru_cache(maxsize=None)
def _table_vjp(fn: Callable, borders: tuple, levels: tuple, bits: int) -> Callable:
  """custom_vjp of `fn` saving codes against a (borders, levels) table."""
  b = np.asarray(borders, np.float32)
  l = np.asarray(levels, np.float32)

  @jax.custom_vjp
  def f(x):
    return fn(x)

  def f_fwd(x):
    packed = checkpoint_name(ext.quantize_pack(x, b, bits), CODES_NAME)
    return fn(x), packed

  def f_bwd(packed, g):
    return (ext.unpack_scale(packed, jnp.asarray(l), g, bits),)

  f.defvjp(f_fwd, f_bwd)
  return f


@functools.lru_cache(maxsize=None)
def _predicate_vjp(fn: Callable, predicate: Callable, levels: tuple) -> Callable:
  """custom_vjp of a piecewise-linear `fn` with a 1-bit exact derivative.

  ``predicate(x)`` (boolean) selects ``levels[1]``; elsewhere ``levels[0]``.
  """
  l = np.asarray(levels, np.float32)

  @jax.custom_vjp
  def f(x):
    return fn(x)

  def f_fwd(x):
    code = predicate(x).astype(jnp.uint8)
    packed = checkpoint_name(ext.pack(code, 1), CODES_NAME)
    return fn(x), packed

  def f_bwd(packed, g):
    return (ext.unpack_scale(packed, jnp.asarray(l), g, 1),)

  f.defvjp(f_fwd, f_bwd)
  return f


def _user_table(borders, levels, bits) -> tuple[tuple, tuple, int]:
  if borders is None or levels is None:
    raise ValueError("pass both borders= and levels= for a user table "
                     f"(got borders={'None' if borders is None else '...'}, "
                     f"levels={'None' if levels is None else '...'})")
  if bits is not None:
    raise ValueError("pass either bits= or a user table (borders=, levels=), not both: "
                     "the table's size fixes the bit width")
  b = np.asarray(borders, np.float64).reshape(-1)
  l = np.asarray(levels, np.float64).reshape(-1)
  nbits = _tables.validate_table(b, l)
  return tuple(b.tolist()), tuple(l.tolist()), nbits


def _apply_or_partial(public: Callable, x: Any, kwargs: dict) -> Any:
  if x is _NO_X:
    p = functools.partial(public, **kwargs)
    desc = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in ("borders", "levels"))
    p.__name__ = f"fewbit.{public.__name__}({desc})"  # type: ignore[attr-defined]
    p.__doc__ = public.__doc__
    return p
  return None


def _continuous(name: str, x, bits, borders, levels, fn: Callable, **params):
  """Shared body of the continuous activations."""
  if borders is not None or levels is not None:
    bs, ls, nbits = _user_table(borders, levels, bits)
  else:
    nbits = check_bits(_DEFAULT_BITS if bits is None else bits)
    t = _tables.table(name, nbits, **params)
    bs, ls = tuple(t.borders.tolist()), tuple(t.levels.tolist())
  x = _check_input(x, name)
  return _table_vjp(fn, bs, ls, nbits)(x)


def _check_piecewise_bits(name: str, bits) -> None:
  if bits is not None and bits != 1:
    raise ValueError(f"{name} is piecewise linear: its 1-bit gradient is exact, so bits must be "
                     f"1 (or left out); got bits={bits!r}")


# --------------------------------------------------------------------------
# Forward functions, cached per parameter value so the custom_vjp cache hits.


@functools.lru_cache(maxsize=None)
def _fn(name: str, params: tuple) -> Callable:
  p = dict(params)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=p["approximate"])
  if name in ("elu", "celu"):
    f = getattr(jax.nn, name)
    return lambda x: f(x, p["alpha"])
  if name == "tanhshrink":
    return lambda x: x - jnp.tanh(x)
  if name == "tanh":
    return jnp.tanh
  if name == "leaky_relu":
    return lambda x: jax.nn.leaky_relu(x, p["negative_slope"])
  if name == "hard_tanh":
    if (p["min_val"], p["max_val"]) == (-1.0, 1.0):
      return jax.nn.hard_tanh
    lo, hi = p["min_val"], p["max_val"]
    return lambda x: jnp.where(x > hi, jnp.asarray(hi, x.dtype),
                               jnp.where(x < lo, jnp.asarray(lo, x.dtype), x))
  if name == "threshold":
    th, val = p["threshold"], p["value"]
    return lambda x: jnp.where(x > th, x, jnp.asarray(val, x.dtype))
  if name == "hard_shrink":
    lam = p["lambd"]
    return lambda x: jnp.where(jnp.abs(x) > lam, x, jnp.zeros_like(x))
  if name == "soft_shrink":
    lam = p["lambd"]
    return lambda x: jnp.where(x > lam, x - lam, jnp.where(x < -lam, x + lam, jnp.zeros_like(x)))
  return getattr(jax.nn, name)


# --------------------------------------------------------------------------
# Continuous activations.


def _continuous_doc(name: str, formula: str) -> str:
  return f"""Few-bit {name}: ``{formula}``, saving ``bits`` bits per element for backward.

  Forward is identical to ``jax.nn.{name}``; the backward multiplies the
  cotangent by the optimal ``2**bits``-level table of the derivative
  (`fewbit_jax.table("{name}", bits)`).

  Args:
    x: float array of any shape. Leave it out to get a callable ``x -> y``
      with the other arguments bound (e.g. ``activation=fb.{name}(bits=2)``).
    bits: 1..8, default 3.
    borders, levels: a user table instead (``2**k - 1`` ascending borders and
      ``2**k`` levels); excludes ``bits``.

  Example:
    >>> import jax, jax.numpy as jnp, fewbit_jax as fb
    >>> x = jnp.linspace(-2.0, 2.0, 5)
    >>> bool(jnp.all(fb.{name}(x) == fb.{name}(bits=4)(x)))
    True
  """


def gelu(x=_NO_X, approximate: bool = True, *, bits: int | None = None, borders=None,
         levels=None):
  part = _apply_or_partial(gelu, x, dict(approximate=approximate, bits=bits, borders=borders,
                                         levels=levels))
  if part is not None:
    return part
  approximate = bool(approximate)
  return _continuous("gelu", x, bits, borders, levels,
                     _fn("gelu", (("approximate", approximate),)), approximate=approximate)


gelu.__doc__ = _continuous_doc("gelu", "x * Phi(x) (approximate=True: the tanh form)")


def _alpha_activation(name: str, formula: str):
  def act(x=_NO_X, alpha: float = 1.0, *, bits: int | None = None, borders=None, levels=None):
    part = _apply_or_partial(act, x, dict(alpha=alpha, bits=bits, borders=borders, levels=levels))
    if part is not None:
      return part
    if isinstance(alpha, (jax.Array, np.ndarray)) and np.ndim(alpha) != 0:
      raise TypeError(f"{name}: alpha must be a Python float; got an array of shape "
                      f"{np.shape(alpha)}")
    try:
      alpha_f = float(alpha)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
      raise TypeError(f"{name}: alpha must be a concrete Python float (its table is built "
                      f"before tracing); got {alpha!r}") from e
    return _continuous(name, x, bits, borders, levels, _fn(name, (("alpha", alpha_f),)),
                       alpha=alpha_f)
  act.__name__ = act.__qualname__ = name
  act.__doc__ = _continuous_doc(name, formula) + (
      "\n  Non-default ``alpha`` gets its optimal table computed on first use and cached.\n")
  return act


elu = _alpha_activation("elu", "x if x > 0 else alpha * (exp(x) - 1)")
celu = _alpha_activation("celu", "max(0, x) + min(0, alpha * (exp(x / alpha) - 1))")


def _plain_activation(name: str, formula: str):
  def act(x=_NO_X, *, bits: int | None = None, borders=None, levels=None):
    part = _apply_or_partial(act, x, dict(bits=bits, borders=borders, levels=levels))
    if part is not None:
      return part
    return _continuous(name, x, bits, borders, levels, _fn(name, ()))
  act.__name__ = act.__qualname__ = name
  act.__doc__ = _continuous_doc(name, formula)
  return act


hard_swish = _plain_activation("hard_swish", "x * relu6(x + 3) / 6")
log_sigmoid = _plain_activation("log_sigmoid", "-softplus(-x)")
mish = _plain_activation("mish", "x * tanh(softplus(x))")
selu = _plain_activation("selu", "scale * elu(x, alpha), the self-normalising constants")
sigmoid = _plain_activation("sigmoid", "1 / (1 + exp(-x))")
silu = _plain_activation("silu", "x * sigmoid(x)")
softplus = _plain_activation("softplus", "log(1 + exp(x))")
soft_sign = _plain_activation("soft_sign", "x / (|x| + 1)")
tanh = _plain_activation("tanh", "tanh(x)")
tanhshrink = _plain_activation("tanhshrink", "x - tanh(x)")
tanhshrink.__doc__ = tanhshrink.__doc__.replace("identical to ``jax.nn.tanhshrink``",
                                                "identical to ``x - jnp.tanh(x)``")


# --------------------------------------------------------------------------
# Piecewise-linear activations (exact 1-bit gradient).


def _piecewise_doc(name: str, formula: str, ref: str, call: str = "") -> str:
  return f"""Few-bit {name}: ``{formula}`` with an exact 1-bit gradient.

  Forward is identical to ``{ref}``; the backward is exactly its gradient
  (at the kinks too), computed from 1 bit per element.

  Args:
    x: float array. Leave it out to get a callable ``x -> y``.
    bits: must be 1 if given (the gradient is exact at 1 bit).

  Example:
    >>> import jax, jax.numpy as jnp, fewbit_jax as fb
    >>> x = jnp.linspace(-4.0, 4.0, 9)
    >>> g = jax.grad(lambda x: fb.{name}(x{call}).sum())(x)
    >>> bool(g.dtype == x.dtype)
    True
  """


def _piecewise(name: str, x, bits, params: tuple, predicate: Callable, levels: tuple):
  _check_piecewise_bits(name, bits)
  x = _check_input(x, name)
  return _predicate_vjp(_fn(name, params), predicate, levels)(x)


def _pred_relu(x):
  return x > 0


def _pred_relu6(x):
  return (x > 0) & (x < 6)


def _pred_hard_tanh_default(x):
  return (x >= -1) & (x <= 1)


def _pred_hard_sigmoid(x):
  return (x > -3) & (x < 3)


def relu(x=_NO_X, *, bits: int | None = None):
  part = _apply_or_partial(relu, x, dict(bits=bits))
  if part is not None:
    return part
  return _piecewise("relu", x, bits, (), _pred_relu, (0.0, 1.0))


relu.__doc__ = _piecewise_doc("relu", "max(x, 0)", "jax.nn.relu")


def relu6(x=_NO_X, *, bits: int | None = None):
  part = _apply_or_partial(relu6, x, dict(bits=bits))
  if part is not None:
    return part
  return _piecewise("relu6", x, bits, (), _pred_relu6, (0.0, 1.0))


relu6.__doc__ = _piecewise_doc("relu6", "min(max(x, 0), 6)", "jax.nn.relu6")


def hard_sigmoid(x=_NO_X, *, bits: int | None = None):
  part = _apply_or_partial(hard_sigmoid, x, dict(bits=bits))
  if part is not None:
    return part
  return _piecewise("hard_sigmoid", x, bits, (), _pred_hard_sigmoid, (0.0, 1.0 / 6.0))


hard_sigmoid.__doc__ = _piecewise_doc("hard_sigmoid", "relu6(x + 3) / 6", "jax.nn.hard_sigmoid")


@functools.lru_cache(maxsize=None)
def _pred_ge(t: float) -> Callable:
  return lambda x: x >= t


@functools.lru_cache(maxsize=None)
def _pred_gt(t: float) -> Callable:
  return lambda x: x > t


@functools.lru_cache(maxsize=None)
def _pred_closed(lo: float, hi: float) -> Callable:
  return lambda x: (x >= lo) & (x <= hi)


@functools.lru_cache(maxsize=None)
def _pred_abs_gt(t: float) -> Callable:
  return lambda x: jnp.abs(x) > t


def _concrete_float(name: str, what: str, v) -> float:
  try:
    return float(v)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f"{name}: {what} must be a concrete Python float; got {v!r}") from e


def leaky_relu(x=_NO_X, negative_slope: float = 1e-2, *, bits: int | None = None):
  part = _apply_or_partial(leaky_relu, x, dict(negative_slope=negative_slope, bits=bits))
  if part is not None:
    return part
  s = _concrete_float("leaky_relu", "negative_slope", negative_slope)
  return _piecewise("leaky_relu", x, bits, (("negative_slope", s),), _pred_ge(0.0),
                    (float(np.float32(s)), 1.0))


leaky_relu.__doc__ = _piecewise_doc("leaky_relu", "x if x >= 0 else negative_slope * x",
                                    "jax.nn.leaky_relu")


def hard_tanh(x=_NO_X, min_val: float = -1.0, max_val: float = 1.0, *, bits: int | None = None):
  part = _apply_or_partial(hard_tanh, x, dict(min_val=min_val, max_val=max_val, bits=bits))
  if part is not None:
    return part
  lo = _concrete_float("hard_tanh", "min_val", min_val)
  hi = _concrete_float("hard_tanh", "max_val", max_val)
  if not lo < hi:
    raise ValueError(f"hard_tanh needs min_val < max_val; got {lo} and {hi}")
  pred = _pred_hard_tanh_default if (lo, hi) == (-1.0, 1.0) else _pred_closed(lo, hi)
  return _piecewise("hard_tanh", x, bits, (("max_val", hi), ("min_val", lo)), pred, (0.0, 1.0))


hard_tanh.__doc__ = _piecewise_doc("hard_tanh", "clip(x, min_val, max_val)", "jax.nn.hard_tanh")


def threshold(x=_NO_X, threshold: float | None = None, value: float | None = None, *,
              bits: int | None = None):
  part = _apply_or_partial(fb_threshold, x, dict(threshold=threshold, value=value, bits=bits))
  if part is not None:
    return part
  if threshold is None or value is None:
    raise TypeError("threshold needs threshold= and value= (as torch.nn.functional.threshold: "
                    "y = x if x > threshold else value)")
  th = _concrete_float("threshold", "threshold", threshold)
  val = _concrete_float("threshold", "value", value)
  return _piecewise("threshold", x, bits, (("threshold", th), ("value", val)), _pred_gt(th),
                    (0.0, 1.0))


fb_threshold = threshold
threshold.__doc__ = _piecewise_doc("threshold", "x if x > threshold else value",
                                   "torch.nn.functional.threshold, in jnp",
                                   call=", threshold=0.5, value=-1.0")


def hard_shrink(x=_NO_X, lambd: float = 0.5, *, bits: int | None = None):
  part = _apply_or_partial(hard_shrink, x, dict(lambd=lambd, bits=bits))
  if part is not None:
    return part
  lam = _concrete_float("hard_shrink", "lambd", lambd)
  if lam < 0:
    raise ValueError(f"hard_shrink needs lambd >= 0; got {lam}")
  return _piecewise("hard_shrink", x, bits, (("lambd", lam),), _pred_abs_gt(lam), (0.0, 1.0))


hard_shrink.__doc__ = _piecewise_doc("hard_shrink", "x if |x| > lambd else 0",
                                     "torch.nn.functional.hardshrink, in jnp")


def soft_shrink(x=_NO_X, lambd: float = 0.5, *, bits: int | None = None):
  part = _apply_or_partial(soft_shrink, x, dict(lambd=lambd, bits=bits))
  if part is not None:
    return part
  lam = _concrete_float("soft_shrink", "lambd", lambd)
  if lam < 0:
    raise ValueError(f"soft_shrink needs lambd >= 0; got {lam}")
  return _piecewise("soft_shrink", x, bits, (("lambd", lam),), _pred_abs_gt(lam), (0.0, 1.0))


soft_shrink.__doc__ = _piecewise_doc("soft_shrink", "x - lambd*sign(x) if |x| > lambd else 0",
                                     "torch.nn.functional.softshrink, in jnp")


# --------------------------------------------------------------------------
# Any elementwise function.


_fewbit_tables: dict[tuple, _tables.Table] = {}


def fewbit(fn: Callable, bits: int = _DEFAULT_BITS, *, weight: Callable | None = None,
           borders=None, levels=None, name: str | None = None) -> Callable:
  """Few-bit version of any elementwise function ``fn: float -> float``.

  The optimal table of ``jax.grad(fn)`` is computed on first use (under the
  default input weight of `fewbit_jax.tables`, or `weight`) and cached per
  function object; or pass your own ``borders``/``levels``.

  Args:
    fn: elementwise, differentiable jnp function (it is not checked that it
      is elementwise: a non-elementwise fn gets a wrong gradient).
    bits: 1..8 (ignored, and must be left at its default, with a user table).
    weight: input density for the table (numpy function of x).
    borders, levels: a user table instead.
    name: used in error messages and the table's name.

  Returns:
    ``x -> fn(x)`` whose backward keeps only the packed codes.

  Example:
    >>> import jax, jax.numpy as jnp, fewbit_jax as fb
    >>> sq = fb.fewbit(lambda x: x * jax.nn.sigmoid(1.702 * x), bits=3)
    >>> x = jnp.linspace(-3.0, 3.0, 64)
    >>> bool(jnp.allclose(sq(x), x * jax.nn.sigmoid(1.702 * x)))
    True
  """
  if not callable(fn):
    raise TypeError(f"fewbit needs a callable elementwise function; got {fn!r}")
  label = name or getattr(fn, "__name__", "fn")
  if borders is not None or levels is not None:
    if bits != _DEFAULT_BITS:
      raise ValueError("pass either bits= or a user table (borders=, levels=), not both")
    bs, ls, nbits = _user_table(borders, levels, None)
  else:
    nbits = check_bits(bits)
    key = (fn, nbits, weight)
    if key not in _fewbit_tables:
      deriv = jax.vmap(jax.grad(lambda x: jnp.asarray(fn(x), jnp.float32).reshape(())))
      _fewbit_tables[key] = _tables.optimal_table(deriv, nbits, weight=weight, name=label)
    t = _fewbit_tables[key]
    bs, ls = tuple(t.borders.tolist()), tuple(t.levels.tolist())

  core = _table_vjp(fn, bs, ls, nbits)

  def wrapped(x):
    return core(_check_input(x, label))

  wrapped.__name__ = f"fewbit({label}, bits={nbits})"
  wrapped.__doc__ = fn.__doc__
  return wrapped


# --------------------------------------------------------------------------
# Registries and the original library's spellings.

PIECEWISE = {"relu": relu, "relu6": relu6, "leaky_relu": leaky_relu, "hard_tanh": hard_tanh,
             "hard_sigmoid": hard_sigmoid, "threshold": threshold, "hard_shrink": hard_shrink,
             "soft_shrink": soft_shrink}
CONTINUOUS = {"celu": celu, "elu": elu, "gelu": gelu, "hard_swish": hard_swish,
              "log_sigmoid": log_sigmoid, "mish": mish, "selu": selu, "sigmoid": sigmoid,
              "silu": silu, "softplus": softplus, "soft_sign": soft_sign, "tanh": tanh,
              "tanhshrink": tanhshrink}

hardtanh = hard_tanh
hardsigmoid = hard_sigmoid
hardshrink = hard_shrink
softshrink = soft_shrink
hardswish = hard_swish
hard_silu = hard_swish
logsigmoid = log_sigmoid
softsign = soft_sign
swish = silu

ALIASES = {"hardtanh": "hard_tanh", "hardsigmoid": "hard_sigmoid", "hardshrink": "hard_shrink",
           "softshrink": "soft_shrink", "hardswish": "hard_swish", "hard_silu": "hard_swish",
           "logsigmoid": "log_sigmoid", "softsign": "soft_sign", "swish": "silu"}
