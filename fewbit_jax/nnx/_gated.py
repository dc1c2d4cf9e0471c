"""The gated MLP as an NNX module: `GatedMLP`, drop-in for the usual gate/up/down MLP."""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import default_bias_init, default_kernel_init

from fewbit_jax.gated import gated
from fewbit_jax.linen._gated import check_randomized
from fewbit_jax.nnx._layers import RandomizedLinear

__all__ = ["GatedMLP"]


class GatedMLP(nnx.Module):
  """``down_proj(act(gate_proj(x)) * up_proj(x))`` with a lean (or few-bit) gated product.

  Drop-in for the MLP as flax's gemma example writes it in NNX::

    self.gate_proj = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(hidden, d, use_bias=False, rngs=rngs)
    ...  self.down_proj(nnx.gelu(self.gate_proj(x)) * self.up_proj(x))

  with the same attributes and ``Param``s (drawn in that order from
  ``rngs.params()``, so the same values as that module from the same
  ``nnx.Rngs``) and the same forward output; the product is
  `fewbit_jax.gated`, whose backward keeps ``gate`` and ``up`` (exact) or
  codes of ``gate`` and ``up`` (``bits``).

  With ``proj_dim_ratio`` the projections named in ``randomized`` (all three by
  default) are `fewbit_jax.nnx.RandomizedLinear` (same ``Param``s when `rngs`
  has a separate ``sketch`` stream: ``nnx.Rngs(0, sketch=1)``).
  A randomized ``down_proj`` keeps a sketch of the product instead of the
  product, so few-bit mode, which keeps the product for ``d up``, then keeps
  more than exact mode (``python -m benchmarks.bench_gated``).

  Args:
    in_features, hidden_features: D and H.
    out_features: the output width (default D).
    activation, approximate, bits: as `fewbit_jax.gated`.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: of the
      three ``nnx.Linear`` layers.
    proj_dim_ratio, sketch: the randomized projections (None: plain linear).
    randomized: which projections a ``proj_dim_ratio`` applies to.
    rngs: ``nnx.Rngs``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> class MLP(nnx.Module):           # the usual way
    ...   def __init__(self, d, h, rngs):
    ...     self.gate_proj = nnx.Linear(d, h, use_bias=False, rngs=rngs)
    ...     self.up_proj = nnx.Linear(d, h, use_bias=False, rngs=rngs)
    ...     self.down_proj = nnx.Linear(h, d, use_bias=False, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.down_proj(nnx.gelu(self.gate_proj(x)) * self.up_proj(x))
    >>> ref = MLP(16, 64, nnx.Rngs(0))
    >>> mlp = fb.nnx.GatedMLP(16, 64, activation=nnx.gelu, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 8, 16))
    >>> bool(jnp.all(mlp(x) == ref(x)))
    True
  """

  def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, *,
               activation: str | Callable = "gelu", approximate: bool | None = None,
               bits: int | None = None, use_bias: bool = False, dtype: Any = None,
               param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: Any = default_kernel_init, bias_init: Any = default_bias_init,
               proj_dim_ratio: float | None = None, sketch: str = "gaussian",
               randomized: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"),
               rngs: nnx.Rngs):
    names = check_randomized(randomized)
    gated(jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32), activation,
          approximate=approximate, bits=bits)  # checks the options now, not at the first call
    self.activation, self.approximate, self.bits = activation, approximate, bits

    def linear(n_in, n_out, name):
      kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
                kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
      if proj_dim_ratio is not None and name in names:
        return RandomizedLinear(n_in, n_out, proj_dim_ratio=proj_dim_ratio, sketch=sketch, **kw)
      return nnx.Linear(n_in, n_out, **kw)

    self.gate_proj = linear(in_features, hidden_features, "gate_proj")
    self.up_proj = linear(in_features, hidden_features, "up_proj")
    self.down_proj = linear(hidden_features, out_features or in_features, "down_proj")

  def __call__(self, x):
    """Applies the MLP to the last axis of `x` (..., D)."""
    h = gated(self.gate_proj(x), self.up_proj(x), self.activation, approximate=self.approximate,
              bits=self.bits)
    return self.down_proj(h)
