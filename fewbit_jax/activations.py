"""Few-bit activations: drop-in replacements for ``jax.nn`` activations.

Each activation computes exactly the output of the ``jax.nn`` function of the
same name (bitwise: the same XLA operations), but its ``jax.custom_vjp`` keeps
for the backward pass only a b-bit code per element, packed into bit planes
(`fewbit_jax.codes`): the index of the interval of x in a piecewise-constant
approximation of f' with ``2**bits`` levels. The backward is
``grad_x = levels[code] * grad_y``, computed in the cotangent's dtype.
Forward mode (``jax.jvp``, ``jax.linearize``) of a few-bit activation raises
JAX's TypeError for a ``custom_vjp``; exact mode supports it.

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

Each function is generated from its record in the activation registry
(`fewbit_jax._registry`: forward, parameters, kind, predicate and levels or
table, aliases), with one ``jax.custom_vjp`` core for all of them.

Second derivatives: the codes have no derivative in x, so a second
derivative of a continuous few-bit activation (``jax.hessian``, a grad of a
grad, a jvp of a grad) raises a TypeError that says to use exact mode
(``exact=True``), which keeps x and recomputes ``f'`` with jax's own
derivative, differentiable again (4 bytes per float32 element, against 12 for
``jax.nn.gelu(approximate=False)`` and 20 for its tanh form). Piecewise-linear
ones have a truly zero second derivative away from their kinks, and give it.
Derivatives with respect to the cotangent (the backward is linear in it) work.

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

import __future__
import dataclasses
import functools
import linecache
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fewbit_jax import _registry
from fewbit_jax import tables as _tables
from fewbit_jax._ffi import _codes_op
from fewbit_jax.codes import check_bits

_RECORDS = _registry.ACTIVATIONS

# Name -> public function, per kind (generated below from the registry).
PIECEWISE: dict[str, Callable] = {}
CONTINUOUS: dict[str, Callable] = {}
# The original library's spellings (and jax's second names) -> canonical name.
ALIASES: dict[str, str] = dict(_registry.ALIASES)

__all__ = (["fewbit", "CODES_NAME", "EXACT_NAME"] + [r.name for r in _RECORDS.values()] + list(ALIASES)
           + ["PIECEWISE", "CONTINUOUS", "ALIASES"])

# Name given (with jax.ad_checkpoint.checkpoint_name) to every packed-code
# residual, so that jax.checkpoint policies can single them out.
CODES_NAME = "fewbit_codes"
# Name of the input that exact mode (``exact=True``) keeps for its backward.
EXACT_NAME = "fewbit_exact_input"

_DEFAULT_BITS = 3
_NO_X = object()


def _check_input(x: Any, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"fewbit {name} needs a floating-point input (float32, bfloat16, float16, "
                    f"float64); got {x.dtype}. Cast it first, e.g. x.astype(jnp.float32).")
  return x


# --------------------------------------------------------------------------
# Second derivatives: the codes cannot give them.


def _second_order_message(name: str) -> str:
  return (f"fewbit {name}: a second derivative (jax.hessian, a grad of a grad, jvp of a grad) "
          f"differentiates the backward pass with respect to x, but the backward of a few-bit "
          f"activation keeps only b-bit codes of x, not x, so it has no derivative in x. Use "
          f"exact mode, which keeps x and recomputes the derivative differentiably "
          f"(fb.{name}(x, exact=True), fb.fewbit(fn, exact=True)), or the jax.nn function. "
          f"Derivatives with respect to the cotangent (the backward is linear in it) work.")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _codes_input(x: jax.Array, name: str) -> jax.Array:
  """x, for the codes; differentiating it (second order) raises a clear error."""
  del name
  return x


@_codes_input.defjvp
def _codes_input_jvp(name, primals, tangents):
  del primals, tangents
  raise TypeError(_second_order_message(name))


# --------------------------------------------------------------------------
# The plan of one call, and the one custom_vjp core that reads it.


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one few-bit call, decided once at the entry.

  The core's static (nondiff) argument: its forward, backward and the code
  kernels' calls read it and decide nothing.
  """
  name: str  # for error messages
  fn: Callable  # the forward, x -> y
  levels: tuple  # the 2**bits float64 levels of f'
  borders: tuple | None  # continuous: the 2**bits - 1 ascending borders (float32 codes)
  predicate: Callable | None  # piecewise-linear: x -> the bit of f' (then borders is None)
  codes: _codes_op.CodesPlan  # bits, kernel or pure path for x's platform, word layout


def _plan(name: str, fn: Callable, x: jax.Array, bits: int, levels: tuple,
          borders: tuple | None = None, predicate: Callable | None = None) -> _Plan:
  """The `_Plan` of ``fn(x)`` keeping `bits`-bit codes (`bits` already validated)."""
  y = jax.eval_shape(fn, x)  # the cotangent's type: its dtype picks unpack_scale's path
  return _Plan(name, fn, levels, borders, predicate, _codes_op.plan(x, bits, g=y))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _few_bit(plan: _Plan, x: jax.Array) -> jax.Array:
  """``plan.fn(x)``, keeping for its backward only the packed b-bit codes of x.

  Codes against borders (continuous activations) refuse a second derivative
  (`_codes_input`). A predicate's bit (piecewise-linear ones) has a zero
  derivative, which is their true second derivative away from the kinks, so
  there a second derivative is 0, as ``jax.hessian`` of the ``jax.nn``
  function gives.
  """
  return plan.fn(x)


def _few_bit_fwd(plan: _Plan, x: jax.Array):
  if plan.predicate is not None:
    packed = _codes_op.pack_planned(plan.predicate(x).astype(jnp.uint8), plan.codes)
  else:
    borders = jnp.asarray(np.asarray(plan.borders, np.float32))
    packed = _codes_op.quantize_pack_planned(_codes_input(x, plan.name), borders, plan.codes)
  return plan.fn(x), checkpoint_name(packed, CODES_NAME)


def _few_bit_bwd(plan: _Plan, packed: jax.Array, g: jax.Array):
  """``levels[code] * g``, in g's dtype (0 where the level is 0, whatever g).

  The float64 levels are rounded to g's dtype here, once, as jax rounds a
  Python float constant (``negative_slope * x``): float64 cotangents get
  float64 levels.
  """
  levels = jnp.asarray(np.asarray(plan.levels, np.float64).astype(g.dtype))
  return (_codes_op.unpack_scale_planned(packed, levels, g, plan.codes),)


_few_bit.defvjp(_few_bit_fwd, _few_bit_bwd)


@functools.lru_cache(maxsize=None)
def _exact_core(fn: Callable) -> Callable:
  """`fn` whose differentiation keeps only its input x (``EXACT_NAME``).

  A ``custom_jvp`` whose tangent map ``t -> f'(x) t`` is rematerialised
  (``jax.checkpoint`` saving nothing): linearising it keeps x alone, and
  the backward recomputes f' from x with jax's own derivative of `fn`, in
  x's dtype. Being jax's derivative, it is differentiable again (second
  derivatives, ``jax.jvp``, ``jax.linear_transpose`` all work).
  """
  tangent = jax.checkpoint(lambda x, t: jax.jvp(fn, (x,), (t,))[1],
                           policy=jax.checkpoint_policies.nothing_saveable)

  @jax.custom_jvp
  def f(x):
    return fn(x)

  @f.defjvp
  def f_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return fn(x), tangent(checkpoint_name(x, EXACT_NAME), t)

  return f


def _user_table(borders, levels, bits) -> tuple[tuple, tuple, int]:
  for what, v in (("borders", borders), ("levels", levels)):
    if isinstance(v, jax.core.Tracer):
      raise TypeError(f"a user table's {what}= must be concrete (a list, numpy or jax array "
                      f"made outside jax.jit): the table is fixed when the function is traced, "
                      f"but got a traced value {v}. Build the table outside the jitted function "
                      f"and close over it (or pass it as a static argument).")
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


@functools.lru_cache(maxsize=None)
def _forward(name: str, params: tuple) -> Callable:
  """``x -> forward(x, **params)``, cached per parameter value so the core's cache hits."""
  rec = _RECORDS[name]
  return functools.partial(rec.forward, **dict(params)) if params else rec.forward


@functools.lru_cache(maxsize=None)
def _predicate(name: str, params: tuple) -> Callable:
  rec = _RECORDS[name]
  return functools.partial(rec.predicate, **dict(params)) if params else rec.predicate


def _check_exact(exact, name: str, bits, borders=None, levels=None) -> bool:
  """Validates ``exact=``: a bool, and then no bits or table."""
  if not isinstance(exact, (bool, np.bool_)):
    raise TypeError(f"{name}: exact must be True or False; got {exact!r}")
  if exact and (bits is not None or borders is not None or levels is not None):
    raise ValueError(f"{name}: exact=True keeps x and recomputes the exact derivative, so it "
                     f"takes no bits= or table (borders=, levels=); pass one or the other")
  return bool(exact)


def _piecewise(rec: _registry.Activation, x, params: dict, bits, exact=False) -> jax.Array:
  key = tuple(params.items())
  if _check_exact(exact, rec.name, bits):
    return _exact_core(_forward(rec.name, key))(_check_input(x, rec.name))
  if bits is not None and check_bits(bits) != 1:  # bits' one validation
    raise ValueError(f"{rec.name} is piecewise linear: its 1-bit gradient is exact, so bits "
                     f"must be 1 (or left out); got bits={bits!r}")
  x = _check_input(x, rec.name)
  fn = _forward(rec.name, key)
  plan = _plan(rec.name, fn, x, 1, tuple(rec.levels_for(params)),
               predicate=_predicate(rec.name, key))
  return _few_bit(plan, x)


def _continuous(rec: _registry.Activation, x, params: dict, bits, borders=None,
                levels=None, exact=False) -> jax.Array:
  key = tuple(params.items())
  if _check_exact(exact, rec.name, bits, borders, levels):
    return _exact_core(_forward(rec.name, key))(_check_input(x, rec.name))
  if borders is not None or levels is not None:
    bs, ls, nbits = _user_table(borders, levels, bits)
  else:  # the table validates bits, once
    t = _tables.table(rec.name, _DEFAULT_BITS if bits is None else bits, **params)
    bs, ls, nbits = tuple(t.borders.tolist()), tuple(t.levels.tolist()), t.bits
  x = _check_input(x, rec.name)
  return _few_bit(_plan(rec.name, _forward(rec.name, key), x, nbits, ls, bs), x)


_PUBLIC: dict[str, Callable] = {}


def _call(name: str, x, kwargs: dict):
  """The body of every public activation: compute, or bind the arguments."""
  if x is _NO_X:
    p = functools.partial(_PUBLIC[name], **kwargs)
    shown = {k: v for k, v in kwargs.items() if k not in ("borders", "levels", "exact")}
    if kwargs["exact"]:  # no bits then: say exact instead
      shown = {k: v for k, v in shown.items() if k != "bits"} | {"exact": True}
    desc = ", ".join(f"{k}={v!r}" for k, v in shown.items())
    p.__name__ = f"fewbit.{name}({desc})"  # type: ignore[attr-defined]
    p.__doc__ = _PUBLIC[name].__doc__
    return p
  rec = _RECORDS[name]
  params = rec.parse({p.name: kwargs.pop(p.name) for p in rec.params})
  run = _piecewise if rec.kind == _registry.KIND_PIECEWISE else _continuous
  return run(rec, x, params, **kwargs)


# --------------------------------------------------------------------------
# The public functions, generated from the registry.


_CONTINUOUS_DOC = """Few-bit {name}: ``{formula}``, saving ``bits`` bits per element for backward.

  Forward is identical to ``{reference}``; the backward multiplies the
  cotangent by the optimal ``2**bits``-level table of the derivative
  (`fewbit_jax.table("{name}", bits)`).

  Args:
    x: float array of any shape. Leave it out to get a callable ``x -> y``
      with the other arguments bound (e.g. ``activation=fb.{name}(bits=2)``).
    bits: 1..8, default 3.
    borders, levels: a user table instead (``2**k - 1`` ascending borders and
      ``2**k`` levels); excludes ``bits``.
    exact: keep x itself (in its dtype) instead of codes and recompute the
      exact derivative in the backward: gradients of ``{reference}``
      (within float rounding), second derivatives too; excludes ``bits`` and
      a table.

  Returns:
    ``{name}(x)``, bitwise; or, without x, the callable.

  A second derivative (``jax.hessian``, grad of grad) raises a TypeError
  unless ``exact=True``: the codes have no derivative in x.

  Example:
    >>> import jax, jax.numpy as jnp, fewbit_jax as fb
    >>> x = jnp.linspace(-2.0, 2.0, 5)
    >>> bool(jnp.all(fb.{name}(x) == fb.{name}(bits=4)(x)))
    True
  """

_COMPUTED_NOTE = ("\n  Non-default ``{param}`` gets its optimal table computed on first use and "
                  "cached.\n")

_PIECEWISE_DOC = """Few-bit {name}: ``{formula}`` with an exact 1-bit gradient.

  Forward is identical to ``{reference}``; the backward is exactly its gradient
  (at the kinks too), computed from 1 bit per element.

  Args:
    x: float array. Leave it out to get a callable ``x -> y``.
    bits: must be 1 if given (the gradient is exact at 1 bit).
    exact: keep x itself instead of its bit (no gain here: the 1-bit
      gradient is already exact; for uniformity with the other activations).

  Returns:
    ``{name}(x)``, bitwise; or, without x, the callable.

  Where the derivative is 0 the gradient is 0 whatever the cotangent (inf and
  NaN too), as jax's. Its second derivative is 0 (the derivative is piecewise
  constant), as ``jax.hessian`` of ``{reference}`` gives away from the kinks.

  Example:
    >>> import jax, jax.numpy as jnp, fewbit_jax as fb
    >>> x = jnp.linspace(-4.0, 4.0, 9)
    >>> g = jax.grad(lambda x: fb.{name}(x{example}).sum())(x)
    >>> bool(g.dtype == x.dtype)
    True
  """


def _doc(rec: _registry.Activation) -> str:
  fields = dict(name=rec.name, formula=rec.formula, reference=rec.reference,
                example=rec.example)
  if rec.kind == _registry.KIND_PIECEWISE:
    return _PIECEWISE_DOC.format(**fields)
  notes = [_COMPUTED_NOTE.format(param=p.name) for p in rec.params if p.annotation == "float"]
  return _CONTINUOUS_DOC.format(**fields) + "".join(notes)


def _define(rec: _registry.Activation) -> Callable:
  """The public function of `rec`: a real ``def`` with the record's signature.

  It is compiled from source (as `dataclasses` builds ``__init__``) so that
  its signature, defaults, keyword names and argument errors are Python's
  own; its body is `_call`.
  """
  names = [p.name for p in rec.params] + ["bits"]
  params = "".join(f", {p.name}: {p.annotation} = {p.default!r}" for p in rec.params)
  extra = ""
  if rec.kind == _registry.KIND_CONTINUOUS:
    names += ["borders", "levels"]
    extra = ", borders=None, levels=None"
  names.append("exact")
  src = (f"def {rec.name}(x=_NO_X{params}, *, bits: int | None = None{extra}, "
         f"exact: bool = False):\n"
         f"  return _call({rec.name!r}, x, dict({', '.join(f'{n}={n}' for n in names)}))\n")
  filename = f"<fewbit_jax.activations.{rec.name}>"
  linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)  # getsource
  code = compile(src, filename, "exec", flags=__future__.annotations.compiler_flag,
                 dont_inherit=True)
  exec(code, globals())  # pylint: disable=exec-used
  fn = globals()[rec.name]
  fn.__doc__ = _doc(rec)
  return fn


for _rec in _RECORDS.values():
  _PUBLIC[_rec.name] = _define(_rec)
  (PIECEWISE if _rec.kind == _registry.KIND_PIECEWISE else CONTINUOUS)[_rec.name] = _PUBLIC[_rec.name]
for _alias, _name in ALIASES.items():
  globals()[_alias] = _PUBLIC[_name]
del _rec, _alias, _name


# --------------------------------------------------------------------------
# Any elementwise function.


_fewbit_tables: dict[tuple, _tables.Table] = {}


def fewbit(fn: Callable, bits: int = _DEFAULT_BITS, *, weight: Callable | None = None,
           borders=None, levels=None, name: str | None = None,
           exact: bool = False) -> Callable:
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
    exact: keep x itself and recompute ``fn``'s exact derivative in the
      backward instead (no table; excludes a user table).

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
  if _check_exact(exact, label, None if bits == _DEFAULT_BITS else bits, borders, levels):
    core = _exact_core(fn)
    nbits = None
  elif borders is not None or levels is not None:
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

  def wrapped(x):
    x = _check_input(x, label)
    if exact:
      return core(x)
    return _few_bit(_plan(label, fn, x, nbits, ls, bs), x)

  wrapped.__name__ = f"fewbit({label}, {'exact=True' if exact else f'bits={nbits}'})"
  wrapped.__doc__ = fn.__doc__
  return wrapped
