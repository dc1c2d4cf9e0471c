"""The randomized linen layer: `RandomizedDense`, a drop-in for ``flax.linen.Dense``."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import default_kernel_init
from flax.typing import Dtype, Initializer, PrecisionLike

from fewbit_jax import _sketch_stream
from fewbit_jax._options import SketchOptions, check_no_dot_general
from fewbit_jax._projection import dense_forward
from fewbit_jax.dense import randomized_dense

__all__ = ["RandomizedDense"]


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
  key})`` (fold in the step number, as for dropout), as an argument of the
  jitted step. One key reused for every step (a key the jitted step closes
  over is one: it is compiled in as a constant) draws the same sketch every
  step, and the weight updates are then biased, all confined to what that
  one sketch keeps. No rng is needed

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
    sketch_blocks: cut the B positions into this many contiguous blocks, each
      with its own sketch of ``ceil(k / C)`` rows (an int C dividing B, mesh
      axis names for one block per data shard, or None for
      `fewbit_jax.dense.sketch_blocks_default`'s rule); see
      `fewbit_jax.dense.randomized_dense`. A gaussian, rademacher, dct or dft
      sketch costs ``k * B * in / C`` multiply-adds, so with many positions
      (long sequences times a large batch) one block per sequence
      (``sketch_blocks=batch_size``) keeps it well below the layer's matmul.
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
  sketch_blocks: int | str | tuple[str, ...] | None = None

  def __post_init__(self):
    SketchOptions.of(self)  # raises on bad sketch options, at construction
    check_no_dot_general(type(self).__name__, self.dot_general if self.dot_general is not None
                         else self.dot_general_cls)
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
      return dense_forward(inputs, kernel, bias, self.precision, None, None)
    key = _sketch_stream.linen_key(self, self.rng_collection, type(self).__name__)
    return randomized_dense(inputs, kernel, bias, key, precision=self.precision,
                            **SketchOptions.of(self).kwargs())
