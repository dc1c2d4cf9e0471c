"""The gated MLP as a linen module: `GatedMLP`, drop-in for the usual gate/up/down MLP."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import initializers
from flax.linen.linear import default_kernel_init

from fewbit_jax.gated import gated
from fewbit_jax.linen._layers import RandomizedDense

__all__ = ["GatedMLP"]

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def check_randomized(randomized) -> tuple[str, ...]:
  """The projections to randomize, checked against `PROJECTIONS`."""
  names = (randomized,) if isinstance(randomized, str) else tuple(randomized)
  bad = [n for n in names if n not in PROJECTIONS]
  if bad:
    raise ValueError(f"randomized names projections of the MLP, some of {PROJECTIONS}; got "
                     f"{bad}.")
  return names


class GatedMLP(nn.Module):
  """``down_proj(act(gate_proj(x)) * up_proj(x))`` with a lean (or few-bit) gated product.

  Drop-in for the MLP as Gemma and Llama write it in linen::

    gate = nn.Dense(hidden, use_bias=False, name="gate_proj")(x)
    up = nn.Dense(hidden, use_bias=False, name="up_proj")(x)
    y = nn.Dense(x.shape[-1], use_bias=False, name="down_proj")(nn.gelu(gate) * up)

  with the same parameter tree (``gate_proj``, ``up_proj``, ``down_proj``, each
  ``{"kernel"}`` (and ``"bias"`` with ``use_bias``)) and the same forward
  output, but the product is `fewbit_jax.gated`: its backward keeps ``gate`` and
  ``up`` (exact) or codes of ``gate`` and ``up`` (``bits``), not the five or
  six hidden-sized arrays that autodiff of the written form keeps.

  With ``proj_dim_ratio`` the projections named in ``randomized`` (all three by
  default) are `fewbit_jax.RandomizedDense` (same parameters; their weight
  gradients estimated from a sketch of their input; apply with
  ``rngs={"sketch": key}``).
  A randomized ``down_proj`` keeps a sketch of the product instead of the
  product, so few-bit mode, which keeps the product for ``d up``, then keeps
  more than exact mode (``python -m benchmarks.bench_gated``).

  Attributes:
    hidden_features: the hidden width H.
    out_features: the output width (default: the input's last axis).
    activation, approximate, bits: as `fewbit_jax.gated` (``"gelu"``,
      ``"silu"``, ``"relu"`` or the jax.nn function).
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: of the
      three dense layers, as ``nn.Dense``.
    proj_dim_ratio, sketch: the randomized projections (None: plain dense).
    randomized: which projections a ``proj_dim_ratio`` applies to.
    deterministic: True makes the randomized projections plain dense layers.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import fewbit_jax as fb
    >>> class MLP(nn.Module):            # the usual way
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     gate = nn.Dense(64, use_bias=False, name="gate_proj")(x)
    ...     up = nn.Dense(64, use_bias=False, name="up_proj")(x)
    ...     return nn.Dense(16, use_bias=False, name="down_proj")(nn.gelu(gate) * up)
    >>> x = jnp.ones((2, 8, 16))
    >>> params = MLP().init(jax.random.key(0), x)
    >>> mlp = fb.linen.GatedMLP(64, activation="gelu")
    >>> jax.tree.structure(mlp.init(jax.random.key(0), x)) == jax.tree.structure(params)
    True
    >>> bool(jnp.all(mlp.apply(params, x) == MLP().apply(params, x)))
    True
  """
  hidden_features: int
  out_features: int | None = None
  activation: str | Callable = "gelu"
  approximate: bool | None = None
  bits: int | None = None
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = initializers.zeros_init()
  proj_dim_ratio: float | None = None
  sketch: str = "gaussian"
  randomized: tuple[str, ...] = PROJECTIONS
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool | None = None):
    """Applies the MLP to the last axis of `x` (..., D) -> (..., out_features or D)."""
    names = check_randomized(self.randomized)
    det = deterministic if deterministic is not None else self.deterministic

    def dense(features, name):
      kw = dict(features=features, use_bias=self.use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision,
                kernel_init=self.kernel_init, bias_init=self.bias_init, name=name)
      if self.proj_dim_ratio is not None and name in names:
        layer = RandomizedDense(proj_dim_ratio=self.proj_dim_ratio, sketch=self.sketch, **kw)
        return lambda v: layer(v, deterministic=det)
      return nn.Dense(**kw)

    gate = dense(self.hidden_features, "gate_proj")(x)
    up = dense(self.hidden_features, "up_proj")(x)
    h = gated(gate, up, self.activation, approximate=self.approximate, bits=self.bits)
    return dense(self.out_features or x.shape[-1], "down_proj")(h)
