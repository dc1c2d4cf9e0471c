"""Flax NNX layers of fewbit_jax.

`RandomizedLinear` is a drop-in for ``flax.nnx.Linear``: the same arguments,
the same ``Param``s and the same forward output, but its weight gradient is
estimated from a random sketch of the input (`fewbit_jax.dense`), so the
backward pass keeps ``proj_dim_ratio`` of the input instead of all of it.
"""

from __future__ import annotations

import typing as tp
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import rnglib
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from flax.typing import Dtype, Initializer, PrecisionLike
from jax import lax

from fewbit_jax.dense import _forward, randomized_dense
from fewbit_jax.linen import _check_options, _missing_rng_message

__all__ = ["RandomizedLinear"]


class RandomizedLinear(nnx.Module):
  """``flax.nnx.Linear`` whose backward pass keeps only a sketch of the input.

  The parameters (``kernel`` (in, out) and ``bias`` (out,)) are created as
  ``nnx.Linear`` creates them, from the same ``rngs.params()`` draws, and the
  forward output is bitwise that of ``nnx.Linear``. For the weight gradient
  only ``S^T x`` (k x in, ``k = ceil(proj_dim_ratio * B)``, B = all leading
  positions of the input) is kept and ``dW ~= (S^T x)^T (S^T g)`` is used, an
  unbiased estimate; the gradients of the input and the bias are exact. See
  `fewbit_jax.dense.randomized_dense`.

  Randomness, as in ``nnx.Dropout``: at construction the layer forks the
  ``rng_collection`` stream of `rngs` (``'sketch'``, or ``'default'`` when
  `rngs` has no such stream) and draws a new key from it on every call, so
  every step, inside ``nnx.jit`` too, gets a fresh sketch. Give `rngs` a
  separate stream, ``nnx.Rngs(0, sketch=1)``, to leave the parameter draws of
  the rest of a model exactly as with ``nnx.Linear``. A key, ``RngStream`` or
  ``Rngs`` passed to the call takes precedence. ``model.eval()`` (or
  ``deterministic=True``) makes the layer exactly ``nnx.Linear``, exact
  gradients included, and needs no rng; ``model.train()`` turns the sketch
  back on.

  Args:
    in_features, out_features, use_bias, dtype, param_dtype, precision,
    kernel_init, bias_init, promote_dtype, preferred_element_type,
    kernel_metadata, bias_metadata: as in ``flax.nnx.Linear``.
    dot_general: must be ``lax.dot_general`` (the backward pass uses its own
      matmuls); kept for signature compatibility.
    proj_dim_ratio: sketch size as a fraction in (0, 1] of B (default 0.2).
    proj_dim: sketch size in rows; takes precedence over `proj_dim_ratio`.
    proj_dim_min, proj_dim_max: bounds on the sketch size.
    sketch: ``gaussian`` (default), ``rademacher``, ``countsketch`` (fastest),
      ``dct`` or ``dft``; see `fewbit_jax.sketch`.
    deterministic: if True, no sketch: the plain linear layer.
    rng_collection: the rng stream of the sketch keys (default ``'sketch'``).
    rngs: ``nnx.Rngs`` for the parameters and the sketch stream.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from fewbit_jax.nnx import RandomizedLinear
    >>> layer = RandomizedLinear(3, 4, proj_dim_ratio=0.25, rngs=nnx.Rngs(0, sketch=1))
    >>> ref = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> bool(jnp.all(layer.kernel[...] == ref.kernel[...]))
    True
    >>> x = jnp.ones((2, 8, 3))
    >>> bool(jnp.all(layer(x) == ref(x)))
    True
    >>> grads = nnx.grad(lambda m: m(x).sum())(layer)  # keeps 4 x 3, not 16 x 3
    >>> grads['kernel'].shape
    (3, 4)
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = True,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      precision: PrecisionLike = None,
      kernel_init: Initializer = default_kernel_init,
      bias_init: Initializer = default_bias_init,
      dot_general: tp.Any = lax.dot_general,
      promote_dtype: tp.Any = dtypes.promote_dtype,
      preferred_element_type: Dtype | None = None,
      proj_dim_ratio: float | None = 0.2,
      proj_dim: int | None = None,
      proj_dim_min: int | None = None,
      proj_dim_max: int | None = None,
      sketch: str = "gaussian",
      deterministic: bool = False,
      rng_collection: str = "sketch",
      rngs: rnglib.Rngs,
      kernel_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
      bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
  ):
    _check_options(type(self).__name__, sketch, proj_dim_ratio, proj_dim, proj_dim_min,
                   proj_dim_max, None if dot_general is lax.dot_general else dot_general)
    # The parameters exactly as nnx.Linear makes them (same rngs.params() draws).
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (in_features, out_features), param_dtype), **kernel_metadata)
    self.bias: nnx.Param[jax.Array] | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype),
                            **bias_metadata)
    else:
      self.bias = nnx.data(None)
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.dot_general = dot_general
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type
    self.proj_dim_ratio = proj_dim_ratio
    self.proj_dim = proj_dim
    self.proj_dim_min = proj_dim_min
    self.proj_dim_max = proj_dim_max
    self.sketch = sketch
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    try:  # after the parameters, so their draws are those of nnx.Linear
      stream = rngs[rng_collection]
    except KeyError:  # no such stream and no default: only calls with rngs= can sketch
      stream = None
    self.rngs = stream.fork() if stream is not None else nnx.data(None)

  def __call__(self, inputs: jax.Array, out_sharding=None, *, deterministic: bool | None = None,
               rngs: rnglib.Rngs | rnglib.RngStream | jax.Array | None = None) -> jax.Array:
    """Applies the layer to the last axis of `inputs`.

    Args:
      inputs: array (..., in_features).
      out_sharding: sharding of the output, as in ``nnx.Linear``.
      deterministic: overrides the attribute: True for the plain linear layer.
      rngs: a key, ``RngStream`` or ``Rngs`` to draw this call's sketch key
        from, instead of the layer's own stream.

    Returns:
      ``inputs @ kernel + bias``, as ``nnx.Linear``.
    """
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    deterministic = bool(deterministic if deterministic is not None else self.deterministic)
    if deterministic:
      return _forward(inputs, kernel, bias, self.precision, self.preferred_element_type,
                      out_sharding)
    return randomized_dense(
        inputs, kernel, bias, self._key(rngs),
        proj_dim_ratio=None if self.proj_dim is not None else self.proj_dim_ratio,
        proj_dim=self.proj_dim, proj_dim_min=self.proj_dim_min, proj_dim_max=self.proj_dim_max,
        sketch=self.sketch, precision=self.precision,
        preferred_element_type=self.preferred_element_type, out_sharding=out_sharding)

  def _key(self, rngs) -> jax.Array:
    rngs = rngs if rngs is not None else self.rngs
    if isinstance(rngs, rnglib.Rngs):
      return rngs[self.rng_collection]()
    if isinstance(rngs, rnglib.RngStream):
      return rngs()
    if isinstance(rngs, jax.Array):
      return rngs
    if rngs is None:
      raise ValueError(_missing_rng_message(
          type(self).__name__, self.rng_collection,
          f"Construct it with a stream for it, e.g. rngs=nnx.Rngs(params=0, "
          f"{self.rng_collection}=1) (or nnx.Rngs(0)), or pass one per call: "
          f"layer(x, rngs=key)."))
    raise TypeError(f"rngs must be an nnx.Rngs, nnx.RngStream or a key array; got "
                    f"{type(rngs).__name__}.")

  def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view``: ``deterministic=True`` for the plain linear layer.

    Example:
      >>> from flax import nnx
      >>> from fewbit_jax.nnx import RandomizedLinear
      >>> layer = RandomizedLinear(3, 4, rngs=nnx.Rngs(0))
      >>> nnx.view(layer, deterministic=True).deterministic
      True
    """
    if deterministic is not None:
      self.deterministic = deterministic
