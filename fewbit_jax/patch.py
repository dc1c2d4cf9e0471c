"""Few-bit activations for inline ``jax.nn`` / ``flax`` calls, without editing a model.

Real models call activations inline, ``x = nn.gelu(x)`` in a ``__call__``.
`patch_activations` makes those names refer to the few-bit functions of
`fewbit_jax.activations` while a function is *traced* inside it:

  >>> import jax, jax.numpy as jnp
  >>> import fewbit_jax as fb
  >>> from fewbit_jax.patch import patch_activations, original
  >>> def mlp(x):
  ...   return jax.nn.gelu(x @ jnp.ones((4, 4))).sum()
  >>> x = jnp.ones((2, 4))
  >>> with patch_activations(gelu=3):
  ...   g = jax.grad(mlp)(x)          # gelu's backward keeps 3-bit codes
  >>> jax.nn.gelu is original("gelu")   # restored on exit
  True

``softmax=True`` does the same for ``jax.nn.softmax`` (flax's attention
weights call it): `fewbit_jax.softmax`, the same output with an exact
backward keeping only the output.

What it replaces: the attributes of ``jax.nn``, ``flax.linen``,
``flax.linen.activation``, ``flax.nnx`` and ``flax.nnx.nn.activations`` that
are the very function object of the named activation (``jax.nn.silu`` and its
alias ``jax.nn.swish`` are one object, so ``silu=3`` patches both). Calls go
through the module attribute at trace time (``nn.gelu(x)``, ``jax.nn.relu(x)``)
are seen; a name bound before the context (``from jax.nn import gelu`` at
import, an ``activation=nn.gelu`` default or field) is not: swap those with
`fewbit_jax.nnx.convert_activations` / `fewbit_jax.linen.swap_activations`.
Inputs that are not floating point (``jax.nn.relu`` of an int array) go to
the original function.

**jax.jit caching.** Patching changes Python globals, which ``jax.jit`` (and
``nnx.jit``) does not look at: it caches a trace by the function's identity
and the shapes, dtypes and static values of its arguments. So

* a function jitted and traced *before or outside* the context keeps its
  vanilla trace when called inside it (nothing is retraced, nothing is
  patched, and the context warns on exit that no patched function was
  called);
* a function first traced *inside* the context keeps the few-bit trace when
  called again outside it with the same argument types, but is traced vanilla
  if a new shape makes it retrace outside.

Either trace inside the context every time by decorating the function
(``jax.jit(patch_activations(gelu=3)(step))``: the patch is then active
whenever ``step`` is traced, whatever the caller does), or call
``jax.clear_caches()`` before tracing inside it. Patching is process-wide
while it lasts: other threads tracing at the same time see it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import threading
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fewbit_jax import _registry, activations, attention

__all__ = ["patch_activations", "PATCHABLE", "LEAN", "NAMESPACES", "original", "parse_bits",
           "swap_activation"]

# Modules whose attributes are patched (those importable at patch time).
NAMESPACES = ("jax.nn", "flax.linen", "flax.linen.activation", "flax.nnx",
              "flax.nnx.nn.activations")

# Few-bit activations that have a jax.nn function (the registry's jax_name),
# the only ones an inline call can reach. (threshold, hard_shrink, soft_shrink
# and tanhshrink are not in jax.nn or flax: call fb.<name> directly.)
PATCHABLE = tuple(r.name for r in _registry.ACTIVATIONS.values() if r.jax_name)

# Lean functions (exact gradient, smaller residuals, no bits) patched by
# name=True: the fewbit_jax.attention function of the same name.
LEAN = ("softmax",)

# The jax.nn functions as they were when fewbit_jax was imported.
_ORIGINALS: dict[str, Callable] = {
    r.name: getattr(jax.nn, r.jax_name) for r in _registry.ACTIVATIONS.values() if r.jax_name}
_ORIGINALS.update({name: getattr(jax.nn, name) for name in LEAN})

_local = threading.local()


def original(name: str) -> Callable:
  """The ``jax.nn`` function `name` (or an alias of it) as jax defines it.

  Example:
    >>> import jax
    >>> from fewbit_jax.patch import original
    >>> original("swish") is jax.nn.silu
    True
  """
  return _ORIGINALS[_canonical(name)]


def _canonical(name: str) -> str:
  if not isinstance(name, str):
    raise TypeError(f"activation names are strings; got {name!r}")
  canon = _registry.ALIASES.get(name, name)
  if canon in PATCHABLE or canon in LEAN:
    return canon
  aliases = ", ".join(sorted(_registry.ALIASES))
  if canon in _registry.ACTIVATIONS:
    raise ValueError(
        f"{name!r} is a few-bit activation but not a jax.nn or flax function, so no inline "
        f"call can reach it: call fb.{canon}(x) in the model instead. patch_activations "
        f"takes {', '.join(PATCHABLE)} (or their aliases {aliases}).")
  raise ValueError(
      f"unknown activation {name!r}: patch_activations takes {', '.join(PATCHABLE)} (or the "
      f"aliases {aliases}), each with its bit width, e.g. patch_activations(gelu=3, relu=1), "
      f"and {', '.join(n + '=True' for n in LEAN)}.")


# The choice that runs an activation in exact mode (fb.<name>(x, exact=True)).
EXACT = "exact"


def _check_bits(name: str, bits: Any) -> int | str | None:
  """The bits to pass to fb.<name> (None: its default; `EXACT`), or a clear error."""
  if bits is True:
    return None
  if name in LEAN:
    raise ValueError(f"{name} has an exact lean backward and no bits: pass {name}=True; "
                     f"got {name}={bits!r}")
  if isinstance(bits, str):
    if bits != EXACT:
      raise ValueError(f"{name}={bits!r}: the only string choice is {EXACT!r} (keep x, exact "
                       f"gradient); otherwise pass the bit width, e.g. {name}=3")
    return EXACT
  if _registry.ACTIVATIONS[name].kind == _registry.KIND_PIECEWISE:
    if bits != 1 or isinstance(bits, bool):
      raise ValueError(f"{name} is piecewise linear: its 1-bit gradient is exact, so pass "
                       f"{name}=1 (or {name}=True); got {name}={bits!r}")
    return 1
  try:
    from fewbit_jax.codes import check_bits
    return check_bits(bits)
  except (TypeError, ValueError) as e:
    raise type(e)(f"{name}={bits!r}: {e}") from None


def _is_float(x) -> bool:
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    return isinstance(x, float)
  return jnp.issubdtype(dtype, jnp.floating)


@dataclasses.dataclass
class _Entry:
  """One activation of one active patch: what is called and what was seen."""
  name: str
  bits: int | None
  fallback: Callable
  active: bool = True
  calls: int = 0


def _kwargs(bits: int | str | None) -> dict[str, Any]:
  """fb.<name>'s keyword for a `parse_bits` choice: ``bits=`` or ``exact=True``."""
  return {"exact": True} if bits == EXACT else {"bits": bits}


def _fewbit_function(name: str, bits: int | str | None) -> Callable:
  if name in LEAN:
    return getattr(attention, name)
  return functools.partial(getattr(activations, name), **_kwargs(bits))


def _wrapper(entry: _Entry) -> Callable:
  fb_fn = _fewbit_function(entry.name, entry.bits)

  @functools.wraps(entry.fallback)
  def patched(x, *args, **kwargs):
    # Depth > 0: called from inside a patched call (the few-bit function
    # runs with every patch bypassed), which must get the original.
    # Inactive: the context has exited but someone kept a reference.
    if getattr(_local, "depth", 0) or not entry.active or not _is_float(x):
      return entry.fallback(x, *args, **kwargs)
    _local.depth = 1
    try:
      entry.calls += 1
      return fb_fn(x, *args, **kwargs)
    finally:
      _local.depth = 0

  patched.__fewbit_entry__ = entry  # type: ignore[attr-defined]
  return patched


def parse_bits(bits: dict[str, Any]) -> dict[str, int | str | None]:
  """Validates ``{name: bits}`` into ``{canonical name: bits for fb.<name>}``.

  ``True`` stands for the default bits (None), ``"exact"`` for exact mode.
  The same checks and errors as `patch_activations`.

  Example:
    >>> from fewbit_jax.patch import parse_bits
    >>> parse_bits({"swish": 2, "relu": True, "gelu": "exact"})
    {'silu': 2, 'relu': None, 'gelu': 'exact'}
  """
  chosen: dict[str, int | str | None] = {}
  given: dict[str, str] = {}
  for name, b in bits.items():
    canon = _canonical(name)
    nb = _check_bits(canon, b)
    if canon in chosen and chosen[canon] != nb:
      raise ValueError(f"{given[canon]}={bits[given[canon]]!r} and {name}={b!r} name the same "
                       f"function ({canon}) with different bits; pass one of them.")
    chosen[canon] = nb
    given[canon] = name
  return chosen


def swap_activation(value: Any, chosen: dict[str, int | str | None]) -> Callable | None:
  """The few-bit version of `value` if it is a chosen activation, else None.

  `value` may be the ``jax.nn`` function object (as ``flax.linen`` and
  ``flax.nnx`` re-export it) or a ``functools.partial`` of it with keyword
  arguments only (``partial(nn.gelu, approximate=False)``). `chosen` is
  `parse_bits`'s result.

  Example:
    >>> import functools, jax
    >>> from fewbit_jax.patch import parse_bits, swap_activation
    >>> f = swap_activation(functools.partial(jax.nn.gelu, approximate=False),
    ...                     parse_bits({"gelu": 4}))
    >>> f.__name__
    'fewbit.gelu(approximate=False, bits=4)'
    >>> swap_activation(jax.nn.relu, parse_bits({"gelu": 4})) is None
    True
  """
  func, keywords = value, {}
  if isinstance(value, functools.partial):
    if value.args:
      return None
    func, keywords = value.func, dict(value.keywords)
  if not callable(func):
    return None
  for name, nb in chosen.items():
    if func is _ORIGINALS[name] and name in LEAN:
      lean = getattr(attention, name)
      return functools.partial(lean, **keywords) if keywords else lean
    if func is _ORIGINALS[name]:
      return getattr(activations, name)(**_kwargs(nb), **keywords)
  return None


class patch_activations(contextlib.ContextDecorator):
  """Context (or decorator) making ``jax.nn``/flax activations few-bit while tracing.

  Inside ``with patch_activations(gelu=3, relu=1):`` the names ``jax.nn.gelu``,
  ``flax.linen.gelu``, ``flax.nnx.gelu`` (and the same for relu) are the
  few-bit ``fb.gelu(..., bits=3)`` and ``fb.relu``: forward outputs are the
  same, the backward keeps b-bit codes. On exit, normal or by an exception,
  every attribute gets back the object it had before. Contexts nest (the
  inner one wins while it lasts) and may be re-entered.

  As a decorator, ``patch_activations(gelu=3)(f)`` is ``f`` with the patch
  active during each call, so each *trace* of ``jax.jit(...)(f)`` is
  few-bit, whenever it happens. See the module docstring for why this
  matters with ``jax.jit``'s cache.

  Args:
    **bits: activation name -> bit width: 1..8 for continuous activations
      (``True`` for the default, 3); 1 (or ``True``) for piecewise-linear
      ones, whose 1-bit gradient is exact; or ``"exact"`` for exact mode
      (``gelu="exact"``: keep x, recompute the exact derivative). Names are those of
      `PATCHABLE` or their aliases (``swish``, ``hard_silu``, ...).
      ``softmax=True`` makes ``jax.nn.softmax`` (and flax's attention
      weights, which call it) `fewbit_jax.softmax`: the same output, an
      exact backward keeping only the output.
    warn_unused: warn on a normal exit if no patched function was called in
      the context (default True). That is almost always a function traced
      before the context and reused from ``jax.jit``'s cache, or an
      activation the model binds before the context (an ``activation=``
      field); the warning says what to do.

  Raises:
    ValueError: an unknown name, a few-bit activation jax.nn lacks
      (threshold, hard_shrink, soft_shrink, tanhshrink), bits out of range,
      no activation given, or two aliases of one function with different
      bits.
    TypeError: bits that are not an int.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> from fewbit_jax.patch import patch_activations
    >>> x = jnp.linspace(-2.0, 2.0, 8)
    >>> loss = lambda x: nn.gelu(x).sum()
    >>> with patch_activations(gelu=2):
    ...   g = jax.grad(loss)(x)
    >>> bool(jnp.all(g == jax.grad(lambda x: fb.gelu(x, bits=2).sum())(x)))
    True
    >>> step = jax.jit(patch_activations(gelu=2)(jax.grad(loss)))  # decorator
    >>> bool(jnp.all(step(x) == g))
    True
  """

  def __init__(self, *, warn_unused: bool = True, **bits: Any):
    if not bits:
      raise ValueError("patch_activations needs at least one activation and its bits, e.g. "
                       "patch_activations(gelu=3, relu=1).")
    chosen = parse_bits(bits)
    self.bits = chosen
    self.warn_unused = warn_unused
    self._stack: list[tuple[list[tuple[Any, str, Any]], list[_Entry]]] = []

  def __repr__(self) -> str:
    args = ", ".join(f"{k}={True if k in LEAN else 'default' if v is None else v}"
                     for k, v in self.bits.items())
    return f"patch_activations({args})"

  def __enter__(self) -> "patch_activations":
    namespaces = []
    for modname in NAMESPACES:
      try:
        namespaces.append(importlib.import_module(modname))
      except ImportError:  # flax is a dependency, but jax.nn alone still works
        pass
    saved: list[tuple[Any, str, Any]] = []
    entries: list[_Entry] = []
    try:
      for name, nb in self.bits.items():
        orig = _ORIGINALS[name]
        # The function in place now: jax's, or an outer patch's wrapper.
        current = getattr(jax.nn, name)
        targets = {id(orig), id(current)}
        entry = _Entry(name, nb, orig)
        entries.append(entry)
        wrapper = _wrapper(entry)
        for ns in namespaces:
          for attr, value in list(vars(ns).items()):
            if id(value) in targets and callable(value):
              saved.append((ns, attr, value))
              setattr(ns, attr, wrapper)
    except BaseException:
      self._restore(saved, entries)
      raise
    self._stack.append((saved, entries))
    return self

  @staticmethod
  def _restore(saved, entries) -> None:
    for entry in entries:
      entry.active = False
    for ns, attr, value in reversed(saved):
      setattr(ns, attr, value)

  def __exit__(self, exc_type, exc, tb) -> bool:
    saved, entries = self._stack.pop()
    self._restore(saved, entries)
    if exc_type is None and self.warn_unused and not any(e.calls for e in entries):
      warnings.warn(
          f"{self!r}: no patched activation was called inside the context, so nothing was "
          "made few-bit. If the function is jitted, jax.jit reused a trace made before the "
          "context (it caches by function and argument types, not by globals): trace it "
          "inside the context, decorate it (jax.jit(patch_activations(...)(f))), or call "
          "jax.clear_caches() first. If the model binds the activation before the context "
          "(an activation= field, `from jax.nn import gelu`), swap it with "
          "fewbit_jax.nnx.convert_activations / fewbit_jax.linen.swap_activations.",
          UserWarning, stacklevel=2)
    return False

  def calls(self) -> dict[str, int]:
    """Calls of each patched activation in the innermost active context.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fewbit_jax.patch import patch_activations
      >>> with patch_activations(relu=1) as p:
      ...   _ = jax.nn.relu(jnp.ones(3))
      ...   print(p.calls())
      {'relu': 1}
    """
    if not self._stack:
      return {}
    return {e.name: e.calls for e in self._stack[-1][1]}
