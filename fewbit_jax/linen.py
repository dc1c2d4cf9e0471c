"""Flax linen layers of fewbit_jax.

`RandomizedDense` is a drop-in for ``flax.linen.Dense``: the same fields, the
same parameter tree and the same forward output, but its weight gradient is
estimated from a random sketch of the input (`fewbit_jax.dense`), so the
backward pass keeps ``proj_dim_ratio`` of the input instead of all of it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import default_kernel_init
from flax.typing import Dtype, Initializer, PrecisionLike

from fewbit_jax import sketch as _sketch
from fewbit_jax.dense import _forward, projection_dim, randomized_dense

__all__ = ["RandomizedDense"]


def _check_options(owner: str, sketch, proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max,
                   dot_general) -> None:
  """Eager checks of a randomized layer's options, so errors show at construction."""
  _sketch.check_kind(sketch)
  projection_dim(1, proj_dim_ratio=proj_dim_ratio, proj_dim=proj_dim,
                 proj_dim_min=proj_dim_min, proj_dim_max=proj_dim_max)
  if dot_general is not None:
    raise ValueError(
        f"{owner} does not take a custom dot_general: its backward pass computes the "
        "gradients with its own matmuls, which would not match yours. Keep the plain "
        "layer (nn.Dense / nnx.Linear) where you need a custom dot_general.")


def _missing_rng_message(owner: str, collection: str, how: str) -> str:
  return (f"{owner} draws a new random sketch on every call from the {collection!r} rng "
          f"stream, and none was given. {how} For evaluation without gradients pass "
          "deterministic=True instead: the layer is then exactly the plain dense layer "
          "and needs no rng.")


class RandomizedDense(nn.Module):
  """``flax.linen.Dense`` whose backward pass keeps only a sketch of the input.

  The forward output is bitwise that of ``nn.Dense`` with the same fields and
  parameters (``{'kernel': (in, features), 'bias': (features,)}``). For the
  weight gradient only ``S^T x`` (k x in, ``k = ceil(proj_dim_ratio * B)``,
  B = all leading positions of the input) is kept and
  ``dW ~= (S^T x)^T (S^T g)`` is used, an unbiased estimate; the gradients of
  the input and the bias are exact. See `fewbit_jax.dense.randomized_dense`.

  Randomness: each call draws a key with ``self.make_rng(rng_collection)``, so
  pass a fresh one every step, ``model.apply(variables, x, rngs={'sketch':
  key})`` (fold in the step number, as for dropout). No rng is needed

  * under ``model.init`` (nothing is differentiated there; the output is the
    plain dense output), or
  * with ``deterministic=True`` (field or call argument): the layer is then
    exactly ``nn.Dense``, exact gradients included. Use it for evaluation.

  Otherwise a missing rng raises an error that says how to pass one. As with
  ``make_rng``, a ``'params'`` rng is used when there is no
  ``rng_collection`` one.

  Attributes:
    features, use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
    promote_dtype: as in ``flax.linen.Dense``.
    dot_general, dot_general_cls: kept for field compatibility with
      ``nn.Dense``; must be None (the backward pass uses its own matmuls).
    proj_dim_ratio: sketch size as a fraction in (0, 1] of B (default 0.2).
    proj_dim: sketch size in rows; takes precedence over `proj_dim_ratio`.
    proj_dim_min, proj_dim_max: bounds on the sketch size.
    sketch: ``gaussian`` (default), ``rademacher``, ``countsketch`` (fastest),
      ``dct`` or ``dft``; see `fewbit_jax.sketch`.
    rng_collection: the rng stream of the sketch keys (default ``'sketch'``).
    deterministic: if True, no sketch: the plain dense layer. The call
      argument of the same name takes precedence.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from fewbit_jax.linen import RandomizedDense
    >>> layer = RandomizedDense(features=4, proj_dim_ratio=0.25)
    >>> x = jnp.ones((2, 8, 3))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (4,), 'kernel': (3, 4)}}
    >>> y = layer.apply(variables, x, rngs={'sketch': jax.random.key(1)})
    >>> bool(jnp.all(y == nn.Dense(4).apply(variables, x)))
    True
    >>> loss = lambda v, key: layer.apply(v, x, rngs={'sketch': key}).sum()
    >>> grads = jax.grad(loss)(variables, jax.random.key(2))  # keeps 4 x 3, not 16 x 3
  """

  features: int
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = initializers.zeros_init()
  promote_dtype: Any = promote_dtype
  dot_general: Any = None
  dot_general_cls: Any = None
  proj_dim_ratio: float | None = 0.2
  proj_dim: int | None = None
  proj_dim_min: int | None = None
  proj_dim_max: int | None = None
  sketch: str = "gaussian"
  rng_collection: str = "sketch"
  deterministic: bool | None = None

  def __post_init__(self):
    _check_options(type(self).__name__, self.sketch, self.proj_dim_ratio, self.proj_dim,
                   self.proj_dim_min, self.proj_dim_max,
                   self.dot_general if self.dot_general is not None else self.dot_general_cls)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs, deterministic: bool | None = None):
    """Applies the layer to the last axis of `inputs`.

    Args:
      inputs: array (..., in_features).
      deterministic: overrides the field: True for the plain dense layer.

    Returns:
      ``inputs @ kernel + bias``, as ``nn.Dense``.
    """
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    deterministic = bool(deterministic if deterministic is not None else self.deterministic)
    if deterministic or self.is_initializing():
      return _forward(inputs, kernel, bias, self.precision, None, None)
    if not (self.has_rng(self.rng_collection) or self.has_rng("params")):
      raise ValueError(_missing_rng_message(
          type(self).__name__, self.rng_collection,
          f"Pass a fresh key each step: model.apply(variables, x, "
          f"rngs={{{self.rng_collection!r}: jax.random.fold_in(key, step)}})."))
    return randomized_dense(
        inputs, kernel, bias, self.make_rng(self.rng_collection),
        proj_dim_ratio=None if self.proj_dim is not None else self.proj_dim_ratio,
        proj_dim=self.proj_dim, proj_dim_min=self.proj_dim_min,
        proj_dim_max=self.proj_dim_max, sketch=self.sketch, precision=self.precision)
