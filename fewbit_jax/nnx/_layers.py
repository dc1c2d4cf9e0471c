"""The randomized NNX layers: drop-ins for ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``.

Each keeps the ``Param``s and the forward output of the layer it replaces and
estimates its kernel's gradient from a sketch of the input. What they share
(the sketch options, the layer's own sketch stream, ``deterministic`` and the
call into the randomized projection) is `_Randomized`, a base they all mix in.
"""

from __future__ import annotations

import typing as tp
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict
from flax.nnx import rnglib
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from flax.typing import Dtype, Initializer, PrecisionLike
from jax import lax

from fewbit_jax import _sketch_stream
from fewbit_jax._options import SketchOptions, check_no_dot_general
from fewbit_jax._projection import dense_forward
from fewbit_jax.dense import randomized_dense
from fewbit_jax.dense_general import randomized_dot_general, randomized_einsum

__all__ = ["RandomizedLinear", "RandomizedLinearGeneral", "RandomizedEinsum"]


class _Randomized:
  """What the randomized NNX layers share, mixed in before their nnx base.

  The sketch options and ``deterministic`` are plain attributes (as
  ``nnx.Dropout``'s ``rate`` and ``deterministic``); the sketch keys come
  from the layer's own fork of its ``rngs`` stream (`fewbit_jax._sketch_stream`).
  """

  def _check_rngs(self, rngs) -> None:
    """Refuses `rngs` that are not an ``nnx.Rngs``, with what to pass instead."""
    if not isinstance(rngs, rnglib.Rngs):
      raise TypeError(
          f"{type(self).__name__} needs rngs=nnx.Rngs(...) to initialise its parameters (as "
          f"the nnx layer it replaces does) and to fork its sketch stream; got "
          f"{type(rngs).__name__}. Pass e.g. rngs=nnx.Rngs(0), or rngs=nnx.Rngs(params=0, "
          "sketch=1) to leave the parameter draws as the nnx layer's. To convert a layer "
          "that already has parameters, use fb.nnx.convert_linear.")

  def _init_sketch(self, rngs: rnglib.Rngs, options: SketchOptions, deterministic: bool,
                   rng_collection: str) -> None:
    """The sketch attributes and the layer's own rng stream, forked from `rngs`."""
    self.sketch_blocks = options.sketch_blocks
    self.proj_dim_ratio = options.proj_dim_ratio
    self.proj_dim = options.proj_dim
    self.proj_dim_min = options.proj_dim_min
    self.proj_dim_max = options.proj_dim_max
    self.sketch = options.sketch
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    self.rngs = _sketch_stream.nnx_fork(rngs, rng_collection)

  def _key(self, rngs, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """This call's sketch key, and `kernel`, guarded where that key would repeat every step.

    The key comes from `rngs` if given, else from the innermost
    ``fb.nnx.step_keys`` scope salted with this layer's stream key, else from
    the layer's own stream (`fewbit_jax._sketch_stream.nnx_key`). Where it
    would be the same every step, a gradient through `kernel` raises.
    """
    key, frozen = _sketch_stream.nnx_key(rngs, self.rngs, self.rng_collection,
                                         type(self).__name__)
    if frozen is not None:
      kernel = _sketch_stream.guard_gradient(kernel, frozen)
    return key, kernel

  def _plain(self, deterministic: bool | None) -> bool:
    """Whether this call is the plain layer: the call's `deterministic`, else the attribute."""
    return bool(deterministic if deterministic is not None else self.deterministic)

  def _promoted(self, inputs):
    """`inputs`, the kernel and the bias (or None), promoted as the nnx layer promotes them."""
    bias = self.bias[...] if self.bias is not None else None
    return self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)

  def _randomized(self, projection, *args, out_sharding):
    """``projection(*args, ...)`` with the layer's precision, output type and sketch options."""
    return projection(*args, precision=self.precision,
                      preferred_element_type=self.preferred_element_type,
                      out_sharding=out_sharding, **SketchOptions.of(self).kwargs())

  def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view``: ``deterministic=True`` for the plain layer.

    Example:
      >>> from flax import nnx
      >>> from fewbit_jax.nnx import RandomizedLinear
      >>> layer = RandomizedLinear(3, 4, rngs=nnx.Rngs(0))
      >>> nnx.view(layer, deterministic=True).deterministic
      True
    """
    if deterministic is not None:
      self.deterministic = deterministic


class RandomizedLinear(_Randomized, nnx.Module):
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
  ``Rngs`` passed to the call takes precedence. In a step that merges the
  model inside plain ``jax.jit``/``jax.value_and_grad`` (flax's functional
  loop), where the stream cannot advance, call it inside
  ``fb.nnx.step_keys(key)`` with a new key every step: it then derives its
  key from that one and its stream's key, and advances nothing; without the
  scope it raises rather than draw the same sketch every step.
  ``model.eval()`` (or
  ``deterministic=True``) makes the layer exactly ``nnx.Linear``, exact
  gradients included, and needs no rng; ``model.train()`` turns the sketch
  back on.

  Args:
    in_features, out_features, use_bias, dtype, param_dtype, precision,
    kernel_init, bias_init, promote_dtype, preferred_element_type,
    kernel_metadata, bias_metadata: as in ``flax.nnx.Linear``.
    dot_general: must be ``lax.dot_general`` (the backward pass uses its own
      matmuls); kept for signature compatibility.
    proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch,
    sketch_blocks: the sketch: its size (a fraction in (0, 1] of B, default
      0.2, or a number of rows, which takes precedence; with optional
      bounds), its kind (``gaussian`` by default, ``countsketch`` the
      fastest) and its row blocks (one sketch per block of positions, e.g.
      one per sequence or per data shard), exactly as the fields of
      `fewbit_jax.linen.RandomizedDense`, which says what blocks save.
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
      sketch_blocks: int | str | tuple[str, ...] | None = None,
      deterministic: bool = False,
      rng_collection: str = "sketch",
      rngs: rnglib.Rngs,
      kernel_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
      bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
  ):
    self._check_rngs(rngs)
    options = SketchOptions(proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch,
                            sketch_blocks)
    check_no_dot_general(type(self).__name__,
                         None if dot_general is lax.dot_general else dot_general)
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
    # After the parameters, so that their draws are those of nnx.Linear.
    self._init_sketch(rngs, options, deterministic, rng_collection)

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
    inputs, kernel, bias = self._promoted(inputs)
    if self._plain(deterministic):
      return dense_forward(inputs, kernel, bias, self.precision, self.preferred_element_type,
                      out_sharding)
    key, kernel = self._key(rngs, kernel)
    return self._randomized(randomized_dense, inputs, kernel, bias, key,
                            out_sharding=out_sharding)


# --------------------------------------------------------------------------
# Projections beyond nnx.Linear.


class RandomizedLinearGeneral(_Randomized, nnx.LinearGeneral):
  """``flax.nnx.LinearGeneral`` whose backward pass keeps only a sketch of the input.

  A subclass of ``nnx.LinearGeneral``: the same arguments, the same
  ``Param``s from the same draws, and bitwise the same forward output. The
  input's free axes are B positions and its contracted axes (`axis`) N
  features; the kernel's gradient is estimated from ``S^T x`` (k x N) by
  `fewbit_jax.dense_general.randomized_dot_general`, and ``dx`` and the
  bias gradient are exact. Randomness and ``deterministic`` work as in
  `RandomizedLinear`.

  Args:
    in_features, out_features, axis, use_bias, dtype, param_dtype,
    kernel_init, bias_init, precision, promote_dtype, preferred_element_type,
    kernel_metadata, bias_metadata: as in ``nnx.LinearGeneral``.
    batch_axis: must be empty: a kernel with batch axes is one layer per
      batch index, which one sketch cannot serve (see
      `fewbit_jax.dense_general`).
    dot_general, dot_general_cls: must be None (the backward pass uses its
      own matmuls).
    proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch,
    deterministic, rng_collection, rngs: as in `RandomizedLinear`.
    sketch_blocks: as in `RandomizedLinear`, for the input's leading batch
      axes (see `fewbit_jax.dense_general.randomized_dot_general`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from fewbit_jax.nnx import RandomizedLinearGeneral
    >>> qkv = RandomizedLinearGeneral(16, (4, 8), proj_dim_ratio=0.25,
    ...                               rngs=nnx.Rngs(0, sketch=1))
    >>> ref = nnx.LinearGeneral(16, (4, 8), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 5, 16))
    >>> bool(jnp.all(qkv(x) == ref(x)))
    True
    >>> nnx.grad(lambda m: m(x).sum())(qkv)['kernel'].shape
    (16, 4, 8)
  """

  def __init__(self, in_features, out_features, *, axis=-1, batch_axis=FrozenDict({}),
               use_bias: bool = True, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init, precision: PrecisionLike = None,
               promote_dtype: tp.Any = dtypes.promote_dtype, dot_general: tp.Any = None,
               dot_general_cls: tp.Any = None, preferred_element_type: Dtype | None = None,
               proj_dim_ratio: float | None = 0.2, proj_dim: int | None = None,
               proj_dim_min: int | None = None, proj_dim_max: int | None = None,
               sketch: str = "gaussian",
               sketch_blocks: int | str | tuple[str, ...] | None = None,
               deterministic: bool = False, rng_collection: str = "sketch",
               rngs: rnglib.Rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
               bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({})):
    self._check_rngs(rngs)
    options = SketchOptions(proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch,
                            sketch_blocks)
    check_no_dot_general(type(self).__name__,
                         dot_general if dot_general is not None else dot_general_cls)
    if batch_axis:
      raise ValueError(f"{type(self).__name__} does not take batch_axis (got "
                       f"{dict(batch_axis)}): a kernel with batch axes is one layer per batch "
                       "index, each with its own weight gradient, which one sketch cannot "
                       "estimate. Keep nnx.LinearGeneral for it.")
    super().__init__(in_features, out_features, axis=axis, batch_axis=batch_axis,
                     use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                     kernel_init=kernel_init, bias_init=bias_init, precision=precision,
                     promote_dtype=promote_dtype, dot_general=None, dot_general_cls=None,
                     preferred_element_type=preferred_element_type, rngs=rngs,
                     kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
    self._init_sketch(rngs, options, deterministic, rng_collection)

  def __call__(self, inputs: jax.Array, out_sharding=None, *, deterministic: bool | None = None,
               rngs: rnglib.Rngs | rnglib.RngStream | jax.Array | None = None) -> jax.Array:
    """Applies the layer to the `axis` axes of `inputs`, as ``nnx.LinearGeneral``.

    Args:
      inputs: the input array.
      out_sharding: sharding of the output, as in ``nnx.LinearGeneral``.
      deterministic: overrides the attribute: True for the plain layer.
      rngs: a key, ``RngStream`` or ``Rngs`` for this call's sketch.

    Returns:
      The output, of shape ``free axes of inputs + out_features``.
    """
    if self._plain(deterministic):
      return super().__call__(inputs, out_sharding)
    axis = tuple(a % inputs.ndim for a in self.axis)
    inputs, kernel, bias = self._promoted(inputs)
    dims = ((axis, tuple(range(len(axis)))), ((), ()))
    key, kernel = self._key(rngs, kernel)
    out = self._randomized(randomized_dot_general, inputs, kernel, key, dims,
                           out_sharding=out_sharding)
    if bias is not None:
      out += jnp.reshape(bias, (1,) * (inputs.ndim - len(axis)) + tuple(self.out_features))
    return out


class RandomizedEinsum(_Randomized, nnx.Einsum):
  """``flax.nnx.Einsum`` whose backward pass keeps only a sketch of the input.

  A subclass of ``nnx.Einsum``: the same arguments, ``Param``s and forward
  output. The einsum must be a projection: each index is a batch index (x
  and output), a contracted one (x and kernel) or a feature (kernel and
  output); see `fewbit_jax.dense_general.randomized_einsum`, which
  estimates the kernel's gradient from ``S^T x``. Randomness and
  ``deterministic`` work as in `RandomizedLinear`.

  Args:
    einsum_str, kernel_shape, bias_shape, dtype, param_dtype, precision,
    kernel_init, bias_init, promote_dtype, preferred_element_type,
    kernel_metadata, bias_metadata: as in ``nnx.Einsum``.
    einsum_op: must be ``jnp.einsum`` (the backward pass uses its own).
    proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch,
    sketch_blocks, deterministic, rng_collection, rngs: as in
      `RandomizedLinearGeneral`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from fewbit_jax.nnx import RandomizedEinsum
    >>> layer = RandomizedEinsum("btd,dnh->btnh", (16, 4, 8), (4, 8), proj_dim_ratio=0.25,
    ...                          rngs=nnx.Rngs(0, sketch=1))
    >>> ref = nnx.Einsum("btd,dnh->btnh", (16, 4, 8), (4, 8), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 5, 16))
    >>> bool(jnp.all(layer(x) == ref(x)))
    True
  """

  def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               precision: PrecisionLike = None, kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init,
               promote_dtype: tp.Any = dtypes.promote_dtype, einsum_op: tp.Any = jnp.einsum,
               preferred_element_type: Dtype | None = None,
               proj_dim_ratio: float | None = 0.2, proj_dim: int | None = None,
               proj_dim_min: int | None = None, proj_dim_max: int | None = None,
               sketch: str = "gaussian",
               sketch_blocks: int | str | tuple[str, ...] | None = None,
               deterministic: bool = False, rng_collection: str = "sketch",
               rngs: rnglib.Rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
               bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({})):
    self._check_rngs(rngs)
    options = SketchOptions(proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch,
                            sketch_blocks)
    if einsum_op is not jnp.einsum:
      raise ValueError(f"{type(self).__name__} does not take a custom einsum_op: its backward "
                       "pass computes the gradients with its own matmuls. Keep nnx.Einsum "
                       "where you need one.")
    super().__init__(einsum_str, kernel_shape, bias_shape, dtype=dtype,
                     param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
                     bias_init=bias_init, promote_dtype=promote_dtype, einsum_op=einsum_op,
                     preferred_element_type=preferred_element_type, rngs=rngs,
                     kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
    self._init_sketch(rngs, options, deterministic, rng_collection)

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None, out_sharding=None, *,
               deterministic: bool | None = None,
               rngs: rnglib.Rngs | rnglib.RngStream | jax.Array | None = None) -> jax.Array:
    """Applies the einsum to `inputs`, as ``nnx.Einsum``.

    Args:
      inputs: the input array.
      einsum_str: overrides the constructor's, as in ``nnx.Einsum``.
      out_sharding: sharding of the output.
      deterministic: overrides the attribute: True for the plain layer.
      rngs: a key, ``RngStream`` or ``Rngs`` for this call's sketch.

    Returns:
      ``einsum(einsum_str, inputs, kernel) + bias``.
    """
    if self._plain(deterministic):
      return super().__call__(inputs, einsum_str, out_sharding)
    einsum_str = (einsum_str if einsum_str is not None else self.einsum_str).replace(" ", "")
    self._einsum_str_check(einsum_str)
    inputs, kernel, bias = self._promoted(inputs)
    key, kernel = self._key(rngs, kernel)
    y = self._randomized(randomized_einsum, einsum_str, inputs, kernel, key,
                         out_sharding=out_sharding)
    if bias is not None:
      y += jnp.reshape(bias, self._infer_broadcasted_bias_shape(einsum_str, inputs, kernel))
    return y
