"""Gated linear units ``act(gate) * up`` as one op, with a lean or few-bit backward.

The MLP of Gemma and Llama is ``down_proj(act(gate_proj(x)) * up_proj(x))``
with ``act`` GELU (GeGLU, tanh or erf form), SiLU (SwiGLU) or ReLU (ReGLU).
Differentiated as written, JAX keeps for the product and the activation
``act(gate)`` and ``up`` plus what the activation's own derivative needs
(the tanh GELU three more hidden-sized arrays, SiLU one or two), and the
``down_proj`` keeps the product: five to six hidden-sized arrays per layer.

`gated` computes the same forward (bitwise, the same operations) with one
``jax.custom_vjp`` whose backward uses the product rule

  ``d gate = g * up * act'(gate)``,  ``d up = g * act(gate)``

and keeps, by mode (``H`` = one hidden-sized array in the input dtype):

* exact (default): ``gate`` and ``up`` (2 H); ``act`` and ``act'`` are
  recomputed from ``gate`` in the backward with jax's own derivative, in
  float32 for bfloat16/float16 inputs (differentiable again: a grad of a
  grad works). The recomputation sits behind an optimization barrier that
  holds the cotangent too, so that XLA neither merges it with the forward's
  ``act(gate)`` (which would keep ``act(gate)`` and the tanh GELU's tanh from
  the forward pass) nor runs it before the backward reaches the op.
* few-bit (``bits=b``): a b-bit code of ``gate`` (``act'`` from the optimal
  ``2**b``-level table of `fewbit_jax.table`, exact at 1 bit for ReLU),
  ``up`` and the output ``h = act(gate) * up`` itself; ``act(gate)`` is
  recovered as ``h / up`` (0 where ``up == 0``, where ``x = 0`` gives
  ``act(0) = 0``). ``h`` is the very array that the following ``down_proj``
  keeps for its weight gradient, so XLA holds it once: the op adds
  1 H + b bits per element (``up`` and the codes) beyond what the MLP keeps
  anyway, against 2 H for exact mode. When ``down_proj`` does not keep ``h``
  (a randomized down projection keeps a sketch), ``h`` counts as well:
  2 H + b bits, and exact mode keeps less.
  ``h / up`` is within two roundings of ``act(gate)``; with float16 (whose
  products underflow early) prefer exact mode.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import fewbit_jax as fb
  >>> gate, up = jax.random.normal(jax.random.key(0), (2, 4, 32))
  >>> h = fb.gated(gate, up, "gelu")
  >>> bool(jnp.all(h == jax.nn.gelu(gate) * up))
  True
  >>> res = fb.memory.saved_residuals(lambda g, u: fb.gated(g, u, "silu").sum(), gate, up)
  >>> sorted(res.by_source())             # gate and up, nothing else
  ["named 'gated_gate'", "named 'gated_up'"]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fewbit_jax import ext, tables

__all__ = ["gated", "ACTIVATIONS", "GATE_NAME", "UP_NAME", "CODES_NAME"]

# checkpoint_name of what the backward keeps: the gate input (exact mode), the up
# input (both modes), the gate's packed codes (few-bit mode; it keeps the output
# too, unnamed: the array the op returns).
GATE_NAME = "gated_gate"
UP_NAME = "gated_up"
CODES_NAME = "gated_codes"

# activation name -> the jax.nn function (GeGLU, SwiGLU, ReGLU).
ACTIVATIONS: dict[str, Callable] = {
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}
_ALIASES = {"swish": "silu", "gelu_tanh": "gelu", "gelu_erf": "gelu"}


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static choices of one call (the custom_vjp's nondiff argument)."""
  activation: str  # "gelu", "silu" or "relu"
  approximate: bool  # gelu: tanh form (True) or erf (False)
  bits: int | None  # None: exact mode
  borders: tuple | None  # few-bit table (continuous activations), float32 values
  levels: tuple | None

  def act(self, x):
    if self.activation == "gelu":
      return jax.nn.gelu(x, approximate=self.approximate)
    return ACTIVATIONS[self.activation](x)


def _act_and_derivative(plan: _Plan, gate):
  """(act(gate), act'(gate)) with jax's own derivative, in float32 at least."""
  gate = gate.astype(jnp.promote_types(gate.dtype, jnp.float32))
  return jax.jvp(plan.act, (gate,), (jnp.ones_like(gate),))


@jax.custom_jvp
def _codes_input(gate):
  """`gate`, for the codes; differentiating it (a second derivative) raises a clear error."""
  return gate


@_codes_input.defjvp
def _codes_input_jvp(primals, tangents):
  del primals, tangents
  raise TypeError(
      "gated(bits=...): a second derivative (a grad of a grad, jax.hessian) differentiates "
      "the backward pass in gate, but few-bit mode keeps only b-bit codes of gate, which have "
      "no derivative. Use exact mode (bits=None), whose backward is jax's own derivative.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(plan: _Plan, gate, up):
  return plan.act(gate) * up


def _fwd(plan: _Plan, gate, up):
  h = plan.act(gate) * up
  if plan.bits is None:
    return h, (checkpoint_name(gate, GATE_NAME), checkpoint_name(up, UP_NAME))
  if plan.borders is None:  # relu: the sign bit, exact
    codes = ext.pack((gate > 0).astype(jnp.uint8), 1)
  else:
    codes = ext.quantize_pack(_codes_input(gate), np.asarray(plan.borders, np.float32),
                              plan.bits)
  # h unnamed: the very output array, which the next dense layer keeps anyway.
  return h, (checkpoint_name(codes, CODES_NAME), checkpoint_name(up, UP_NAME), h)


def _bwd(plan: _Plan, res, g):
  if plan.bits is None:
    # The barrier keeps XLA from merging the recomputed act(gate) and act'(gate)
    # with the forward's act(gate) (common-subexpression elimination), which
    # would keep act(gate) and its intermediates (the tanh GELU's tanh) from the
    # forward pass: two more hidden-sized arrays than gate and up. With the
    # cotangent inside it, the recomputation cannot be scheduled before the
    # backward reaches this op (it would then be held instead).
    gate, up, g = jax.lax.optimization_barrier((*res, g))
    a, da = _act_and_derivative(plan, gate)
    g32 = g.astype(a.dtype)
    return (g32 * up.astype(a.dtype) * da).astype(gate.dtype), (g32 * a).astype(up.dtype)
  codes, up, h = res
  levels = jnp.asarray(np.asarray(plan.levels, np.float64).astype(g.dtype))
  dgate = ext.unpack_scale(codes, levels, g * up, plan.bits)
  zero = up == 0
  a = jnp.where(zero, jnp.zeros((), jnp.float32),
                h.astype(jnp.float32) / jnp.where(zero, 1, up).astype(jnp.float32))
  return dgate.astype(h.dtype), (g.astype(jnp.float32) * a).astype(up.dtype)


_core.defvjp(_fwd, _bwd)


def _resolve(activation, approximate) -> tuple[str, bool]:
  """(name, approximate) of `activation`: a name or one of the jax.nn functions."""
  if callable(activation):
    fn, kw = activation, {}
    if isinstance(activation, functools.partial):
      fn, kw = activation.func, dict(activation.keywords)
      if activation.args or set(kw) - {"approximate"}:
        fn = None
    for name, f in ACTIVATIONS.items():
      if fn is f:
        if "approximate" in kw:
          if approximate is not None and bool(approximate) != bool(kw["approximate"]):
            raise ValueError("approximate= disagrees with the activation's own "
                             f"approximate={kw['approximate']!r}; give it once.")
          approximate = kw["approximate"]
        return name, True if approximate is None else bool(approximate)
    raise ValueError(f"activation {activation!r} is not one of the gated activations: give "
                     f"one of {sorted(ACTIVATIONS)} (or jax.nn.gelu, jax.nn.silu, "
                     f"jax.nn.relu, flax's nn.gelu / nnx.gelu ...).")
  if not isinstance(activation, str) or activation.lower() not in set(ACTIVATIONS) | set(
      _ALIASES):
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} (GeGLU, SwiGLU, "
                     f"ReGLU; also {sorted(_ALIASES)}) or the jax.nn function; got "
                     f"{activation!r}.")
  a = activation.lower()
  if a in ("gelu_tanh", "gelu_erf"):
    want = a == "gelu_tanh"
    if approximate is not None and bool(approximate) != want:
      raise ValueError(f"activation={activation!r} fixes approximate={want}; drop approximate=.")
    approximate = want
  name = _ALIASES.get(a, a)
  if name != "gelu" and approximate is not None:
    raise ValueError(f"approximate= is a GELU option (tanh or erf form); {name} takes none.")
  return name, True if approximate is None else bool(approximate)


@functools.lru_cache(maxsize=None)
def _plan(name: str, approximate: bool, bits: int | None) -> _Plan:
  if bits is None:
    return _Plan(name, approximate, None, None, None)
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
    raise ValueError(f"bits must be an int in 1..8 (few-bit mode) or None (exact); got {bits!r}.")
  if name == "relu":
    if bits != 1:
      raise ValueError(f"relu's derivative takes two values, so its 1-bit code is exact: "
                       f"bits must be 1 (or None for exact mode); got bits={bits}.")
    return _Plan(name, approximate, 1, None, (0.0, 1.0))
  params = {"approximate": approximate} if name == "gelu" else {}
  t = tables.table(name, int(bits), **params)
  return _Plan(name, approximate, int(bits), tuple(float(b) for b in t.borders),
               tuple(float(l) for l in t.levels))


def gated(gate, up, activation: str | Callable = "gelu", *, approximate: bool | None = None,
          bits: int | None = None):
  r"""``act(gate) * up`` (GeGLU, SwiGLU, ReGLU) keeping the least for its backward.

  The forward is bitwise ``jax.nn.<act>(gate) * up``. The backward uses
  ``d gate = g * up * act'(gate)`` and ``d up = g * act(gate)``; what it keeps
  depends on the mode (see the module docstring, `fewbit_jax.gated`):

  * ``bits=None`` (exact): ``gate`` and ``up`` (2 hidden-sized arrays),
    recomputing ``act`` and ``act'``; gradients as jax's up to rounding.
  * ``bits=b``: b-bit codes of ``gate`` for ``act'`` (1 bit, exact, for relu),
    ``up``, and the output (which a following dense layer keeps anyway).

  Args:
    gate, up: float arrays of the same shape and dtype (the two projections
      of the MLP's input).
    activation: ``"gelu"`` (GeGLU), ``"silu"`` (SwiGLU; ``"swish"``),
      ``"relu"`` (ReGLU), or the function itself (``jax.nn.gelu``,
      ``nnx.gelu``, ``functools.partial(jax.nn.gelu, approximate=False)``...).
      ``"gelu_tanh"`` and ``"gelu_erf"`` name the two GELU forms.
    approximate: GELU only: the tanh form (True, jax's default) or erf.
    bits: None for the exact lean backward; 1..8 for few-bit (``act'`` from
      the optimal table of `fewbit_jax.table`).

  Returns:
    ``act(gate) * up``, in the inputs' dtype.

  Raises:
    ValueError: different shapes or dtypes, an unknown activation, bad bits.
    TypeError: non-float inputs.

  A grad of a grad works in exact mode (its backward is jax's derivative)
  and for relu; few-bit mode of gelu/silu raises a TypeError that says to
  use exact mode (the codes have no derivative in ``gate``).

  Example:
    >>> import jax, jax.numpy as jnp, fewbit_jax as fb
    >>> gate, up = jnp.linspace(-3, 3, 8), jnp.linspace(1, 2, 8)
    >>> bool(jnp.all(fb.gated(gate, up, "silu") == jax.nn.silu(gate) * up))
    True
    >>> f = lambda g, u: fb.gated(g, u, jax.nn.gelu, bits=3).sum()
    >>> dg, du = jax.grad(f, (0, 1))(gate, up)
    >>> bool(jnp.allclose(du, jax.nn.gelu(gate), atol=1e-6))   # d up is exact
    True
  """
  gate, up = jnp.asarray(gate), jnp.asarray(up)
  for n, a in (("gate", gate), ("up", up)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"gated: {n} must be floating point; got {a.dtype}. Cast it first.")
  if gate.shape != up.shape or gate.dtype != up.dtype:
    raise ValueError(f"gated: gate and up must have the same shape and dtype (the two "
                     f"projections of one input); got gate {gate.dtype}{list(gate.shape)} and "
                     f"up {up.dtype}{list(up.shape)}.")
  name, approx = _resolve(activation, approximate)
  plan = _plan(name, approx, bits)
  with jax.named_scope(f"gated_{name}"):
    return _core(plan, gate, up)
