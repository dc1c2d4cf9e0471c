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

Each function is generated from its record in the activation registry
(`fewbit_jax._registry`: forward, parameters, kind, predicate and levels or
table, aliases), with one ``jax.custom_vjp`` core for all of them.

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
import functools
import linecache
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fewbit_jax import _registry
from fewbit_jax import ext
from fewbit_jax import tables as _tables
from fewbit_jax.codes import check_bits

_RECORDS = _registry.ACTIVATIONS

# Name -> public function, per kind (generated below from the registry).
PIECEWISE: dict[str, Callable] = {}
CONTINUOUS: dict[str, Callable] = {}
# The original library's spellings (and jax's second names) -> canonical name.
ALIASES: dict[str, str] = dict(_registry.ALIASES)

__all__ = (["fewbit", "CODES_NAME"] + [r.name for r in _RECORDS.values()] + list(ALIASES)
           + ["PIECEWISE", "CONTINUOUS", "ALIASES"])

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
# The codes: the only calls into the kernels (fewbit_jax.ext).


def _keep_codes(x: jax.Array, bits: int, borders: np.ndarray | None,
                predicate: Callable | None) -> jax.Array:
  """Packed codes of x: its interval among `borders`, or the bit of `predicate(x)`."""
  if predicate is not None:
    return ext.pack(predicate(x).astype(jnp.uint8), 1)
  return ext.quantize_pack(x, borders, bits)


def _apply_codes(packed: jax.Array, levels: np.ndarray, g: jax.Array, bits: int) -> jax.Array:
  """``levels[code] * g``, in g's dtype."""
  return ext.unpack_scale(packed, jnp.asarray(levels), g, bits)


# --------------------------------------------------------------------------
# The custom_vjp core, cached per forward and code table.


@functools.lru_cache(maxsize=None)
def _core(fn: Callable, bits: int, levels: tuple, borders: tuple | None = None,
          predicate: Callable | None = None) -> Callable:
  """custom_vjp of `fn` keeping b-bit codes: against `borders`, or ``predicate``'s bit."""
  b = None if borders is None else np.asarray(borders, np.float32)
  l = np.asarray(levels, np.float32)

  @jax.custom_vjp
  def f(x):
    return fn(x)

  def f_fwd(x):
    packed = checkpoint_name(_keep_codes(x, bits, b, predicate), CODES_NAME)
    return fn(x), packed

  def f_bwd(packed, g):
    return (_apply_codes(packed, l, g, bits),)

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


@functools.lru_cache(maxsize=None)
def _forward(name: str, params: tuple) -> Callable:
  """``x -> forward(x, **params)``, cached per parameter value so the core's cache hits."""
  rec = _RECORDS[name]
  return functools.partial(rec.forward, **dict(params)) if params else rec.forward


@functools.lru_cache(maxsize=None)
def _predicate(name: str, params: tuple) -> Callable:
  rec = _RECORDS[name]
  return functools.partial(rec.predicate, **dict(params)) if params else rec.predicate


def _piecewise(rec: _registry.Activation, x, params: dict, bits) -> jax.Array:
  if bits is not None and bits != 1:
    raise ValueError(f"{rec.name} is piecewise linear: its 1-bit gradient is exact, so bits "
                     f"must be 1 (or left out); got bits={bits!r}")
  x = _check_input(x, rec.name)
  key = tuple(params.items())
  levels = tuple(rec.levels_for(params))
  return _core(_forward(rec.name, key), 1, levels, predicate=_predicate(rec.name, key))(x)


def _continuous(rec: _registry.Activation, x, params: dict, bits, borders=None,
                levels=None) -> jax.Array:
  if borders is not None or levels is not None:
    bs, ls, nbits = _user_table(borders, levels, bits)
  else:
    nbits = check_bits(_DEFAULT_BITS if bits is None else bits)
    t = _tables.table(rec.name, nbits, **params)
    bs, ls = tuple(t.borders.tolist()), tuple(t.levels.tolist())
  x = _check_input(x, rec.name)
  return _core(_forward(rec.name, tuple(params.items())), nbits, ls, bs)(x)


_PUBLIC: dict[str, Callable] = {}


def _call(name: str, x, kwargs: dict):
  """The body of every public activation: compute, or bind the arguments."""
  if x is _NO_X:
    p = functools.partial(_PUBLIC[name], **kwargs)
    desc = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in ("borders", "levels"))
    p.__name__ = f"fewbit.{name}({desc})"  # type: ignore[attr-defined]
    p.__doc__ = _PUBLIC[name].__doc__
    return p
  rec = _RECORDS[name]
  params = rec.parse({p.name: kwargs.pop(p.name) for p in rec.params})
  run = _piecewise if rec.kind == _registry.PIECEWISE else _continuous
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
  if rec.kind == _registry.PIECEWISE:
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
  if rec.kind == _registry.CONTINUOUS:
    names += ["borders", "levels"]
    extra = ", borders=None, levels=None"
  src = (f"def {rec.name}(x=_NO_X{params}, *, bits: int | None = None{extra}):\n"
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
  (PIECEWISE if _rec.kind == _registry.PIECEWISE else CONTINUOUS)[_rec.name] = _PUBLIC[_rec.name]
for _alias, _name in ALIASES.items():
  globals()[_alias] = _PUBLIC[_name]
del _rec, _alias, _name


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

  core = _core(fn, nbits, ls, bs)

  def wrapped(x):
    return core(_check_input(x, label))

  wrapped.__name__ = f"fewbit({label}, bits={nbits})"
  wrapped.__doc__ = fn.__doc__
  return wrapped
