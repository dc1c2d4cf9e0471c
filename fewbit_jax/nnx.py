"""Flax NNX layers of fewbit_jax, and converting existing NNX models.

`RandomizedLinear` is a drop-in for ``flax.nnx.Linear``: the same arguments,
the same ``Param``s and the same forward output, but its weight gradient is
estimated from a random sketch of the input (`fewbit_jax.dense`), so the
backward pass keeps ``proj_dim_ratio`` of the input instead of all of it.
`RandomizedLinearGeneral` and `RandomizedEinsum` do the same for
``nnx.LinearGeneral`` and ``nnx.Einsum`` (`fewbit_jax.dense_general`).

A model someone else wrote is converted in place, keeping its ``Param``
objects (so its optimizer state and checkpoints): `map_module` walks it,
`convert_linear` swaps linear layers, `convert_activations` swaps
activation-valued attributes, and `fewbit_jax.patch_activations` covers
activations called inline::

  rngs = nnx.Rngs(sketch=0)
  fb.nnx.map_module(model, lambda m, path: fb.nnx.convert_linear(
      m, fb.nnx.RandomizedLinear, proj_dim_ratio=0.2, rngs=rngs))
  with fb.patch_activations(gelu=3):
    grads = nnx.grad(loss)(model)
"""

from __future__ import annotations

import itertools
import re
import typing as tp
import warnings
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict
from flax.nnx import graphlib, rnglib
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from flax.typing import Dtype, Initializer, PrecisionLike
from jax import lax

from fewbit_jax import patch as _patch
from fewbit_jax.dense import _check_blocks_arg, _forward, randomized_dense
from fewbit_jax.dense_general import randomized_dot_general, randomized_einsum
from fewbit_jax.linen import _check_options, _missing_rng_message

__all__ = ["RandomizedLinear", "RandomizedLinearGeneral", "RandomizedEinsum", "map_module",
           "convert_linear", "convert_activations"]


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
    sketch_blocks: cut the B positions into this many contiguous blocks, each
      with its own sketch of ``ceil(k / C)`` rows (an int C dividing B, mesh
      axis names for one block per data shard, or None for
      `fewbit_jax.dense.sketch_blocks_default`'s rule); see
      `fewbit_jax.dense.randomized_dense`. A gaussian, rademacher, dct or dft
      sketch costs ``k * B * in / C`` multiply-adds, so with many positions
      (long sequences times a large batch) one block per sequence
      (``sketch_blocks=batch_size``) keeps it well below the layer's matmul.
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
    # After the parameters, so that their draws are those of nnx.Linear.
    _init_sketch(self, rngs, proj_dim_ratio=proj_dim_ratio, proj_dim=proj_dim,
                 proj_dim_min=proj_dim_min, proj_dim_max=proj_dim_max, sketch=sketch,
                 sketch_blocks=sketch_blocks, deterministic=deterministic,
                 rng_collection=rng_collection)

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
        inputs, kernel, bias, self._key(rngs), precision=self.precision,
        preferred_element_type=self.preferred_element_type, out_sharding=out_sharding,
        **_sketch_options(self))

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


# --------------------------------------------------------------------------
# Projections beyond nnx.Linear.


class RandomizedLinearGeneral(nnx.LinearGeneral):
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
    _check_options(type(self).__name__, sketch, proj_dim_ratio, proj_dim, proj_dim_min,
                   proj_dim_max, dot_general if dot_general is not None else dot_general_cls)
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
    _init_sketch(self, rngs, proj_dim_ratio=proj_dim_ratio, proj_dim=proj_dim,
                 proj_dim_min=proj_dim_min, proj_dim_max=proj_dim_max, sketch=sketch,
                 sketch_blocks=sketch_blocks, deterministic=deterministic,
                 rng_collection=rng_collection)

  _key = RandomizedLinear._key
  set_view = RandomizedLinear.set_view

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
    if deterministic if deterministic is not None else self.deterministic:
      return super().__call__(inputs, out_sharding)
    axis = tuple(a % inputs.ndim for a in self.axis)
    expanded_batch_shape = (1,) * (inputs.ndim - len(axis))
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    dims = ((axis, tuple(range(len(axis)))), ((), ()))
    out = randomized_dot_general(inputs, kernel, self._key(rngs), dims,
                                 precision=self.precision,
                                 preferred_element_type=self.preferred_element_type,
                                 out_sharding=out_sharding, **_sketch_options(self))
    if bias is not None:
      out += jnp.reshape(bias, (*expanded_batch_shape, *self.out_features))
    return out


class RandomizedEinsum(nnx.Einsum):
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
    deterministic, rng_collection, rngs: as in `RandomizedLinear`.
    sketch_blocks: as in `RandomizedLinear`, for the input's leading batch
      axes (see `fewbit_jax.dense_general.randomized_dot_general`).

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
    _check_options(type(self).__name__, sketch, proj_dim_ratio, proj_dim, proj_dim_min,
                   proj_dim_max, None)
    if einsum_op is not jnp.einsum:
      raise ValueError(f"{type(self).__name__} does not take a custom einsum_op: its backward "
                       "pass computes the gradients with its own matmuls. Keep nnx.Einsum "
                       "where you need one.")
    super().__init__(einsum_str, kernel_shape, bias_shape, dtype=dtype,
                     param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
                     bias_init=bias_init, promote_dtype=promote_dtype, einsum_op=einsum_op,
                     preferred_element_type=preferred_element_type, rngs=rngs,
                     kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
    _init_sketch(self, rngs, proj_dim_ratio=proj_dim_ratio, proj_dim=proj_dim,
                 proj_dim_min=proj_dim_min, proj_dim_max=proj_dim_max, sketch=sketch,
                 sketch_blocks=sketch_blocks, deterministic=deterministic,
                 rng_collection=rng_collection)

  _key = RandomizedLinear._key
  set_view = RandomizedLinear.set_view

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
    if deterministic if deterministic is not None else self.deterministic:
      return super().__call__(inputs, einsum_str, out_sharding)
    einsum_str = (einsum_str if einsum_str is not None else self.einsum_str).replace(" ", "")
    self._einsum_str_check(einsum_str)
    inputs, kernel, bias = self.promote_dtype(
        (inputs, self.kernel[...], self.bias[...] if self.bias is not None else None),
        dtype=self.dtype)
    y = randomized_einsum(einsum_str, inputs, kernel, self._key(rngs), precision=self.precision,
                          preferred_element_type=self.preferred_element_type,
                          out_sharding=out_sharding, **_sketch_options(self))
    if bias is not None:
      y += jnp.reshape(bias, self._infer_broadcasted_bias_shape(einsum_str, inputs, kernel))
    return y


def _init_sketch(self, rngs, *, proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch,
                 sketch_blocks, deterministic, rng_collection) -> None:
  """The sketch attributes and the layer's own rng stream, forked from `rngs`."""
  _check_blocks_arg(sketch_blocks)
  self.sketch_blocks = sketch_blocks
  self.proj_dim_ratio = proj_dim_ratio
  self.proj_dim = proj_dim
  self.proj_dim_min = proj_dim_min
  self.proj_dim_max = proj_dim_max
  self.sketch = sketch
  self.deterministic = deterministic
  self.rng_collection = rng_collection
  try:
    stream = rngs[rng_collection]
  except KeyError:  # no such stream and no default: only calls with rngs= can sketch
    stream = None
  self.rngs = stream.fork() if stream is not None else nnx.data(None)


def _sketch_options(self) -> dict:
  return dict(proj_dim_ratio=None if self.proj_dim is not None else self.proj_dim_ratio,
              proj_dim=self.proj_dim, proj_dim_min=self.proj_dim_min,
              proj_dim_max=self.proj_dim_max, sketch=self.sketch,
              sketch_blocks=self.sketch_blocks)


# --------------------------------------------------------------------------
# Converting existing models.


def _path_str(parts) -> str:
  return "/" + "/".join(str(p) for p in parts)


def map_module(model, fn: tp.Callable[[nnx.Module, str], tp.Any], pattern: str | None = None):
  """Applies ``fn(module, path)`` to every module of `model`, replacing each in place.

  The walk is post-order (a module's children before the module), over the
  whole graph: attributes, ``nnx.List``/``nnx.Dict`` and list or dict
  containers. Paths are strings like ``'/layers/0/mlp/up'`` (the root is
  ``'/'``). Where ``fn`` returns a different object, it replaces the module
  in its parent, at every place the module is referenced (a module shared by
  two parents is converted once and stays shared). Parameters live in the
  ``Variable`` objects the modules hold, so a converter that reuses them
  (`convert_linear` does) keeps parameters, optimizer state and checkpoints
  valid.

  Args:
    model: an NNX module (or any NNX graph node holding modules).
    fn: ``(module, path) -> module``; return the module itself to keep it.
    pattern: a regular expression; only modules whose path it matches
      (``re.search``: anchor it with ``^``/``$`` for exact paths) are given
      to ``fn``. None: all of them.

  Returns:
    `model`, changed in place (or ``fn``'s result, if it replaced the root).

  Raises:
    ValueError: `pattern` matches no module path (nothing would change: most
      likely a typo; the message lists the paths), or a module to replace
      sits in a tuple (immutable: store such modules in an ``nnx.List``).
    re.error: `pattern` is not a regular expression.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> kernel = model.layers[0].kernel
    >>> convert = lambda m, path: fb.nnx.convert_linear(m, fb.nnx.RandomizedLinear,
    ...                                                 proj_dim_ratio=0.5)
    >>> model = fb.nnx.map_module(model, convert, pattern=r"^/layers/0$")
    >>> type(model.layers[0]).__name__, type(model.layers[2]).__name__
    ('RandomizedLinear', 'Linear')
    >>> model.layers[0].kernel is kernel                # the very same Param
    True
  """
  if not callable(fn):
    raise TypeError(f"map_module needs a function (module, path) -> module; got {fn!r}")
  regex = re.compile(pattern) if pattern is not None else None
  seen_paths: list[str] = []
  matched = [0]
  results: dict[int, tp.Any] = {}
  active: set[int] = set()

  def visit(node, parts):
    key = id(node)
    if key in results:
      return results[key]
    if key in active:  # a cycle back to a module being visited: leave it
      return node
    impl = graphlib.get_node_impl(node)
    if impl is None or isinstance(node, nnx.Variable):
      return node
    active.add(key)
    for k, value in list(impl.node_dict(node).items()):
      if isinstance(k, str) and k.startswith("_pytree__"):
        continue
      new = visit(value, (*parts, k))
      if new is not value:
        if impl.set_key is None:
          raise ValueError(f"map_module cannot replace {_path_str((*parts, k))}: it sits in a "
                           f"{type(node).__name__}, which cannot be changed in place. Store "
                           "modules to convert in an nnx.List (or an nnx.Dict) instead.")
        impl.set_key(node, k, new)
    active.discard(key)
    out = node
    if isinstance(node, nnx.Module):
      path = _path_str(parts)
      seen_paths.append(path)
      if regex is None or regex.search(path):
        matched[0] += 1
        out = fn(node, path)
    results[key] = out
    return out

  out = visit(model, ())
  if regex is not None and not matched[0]:
    shown = ", ".join(seen_paths[:24]) + (", ..." if len(seen_paths) > 24 else "")
    raise ValueError(f"pattern {pattern!r} matches no module path, so nothing was converted. "
                     f"The paths are: {shown}")
  return out


_default_seeds = itertools.count()


def _sketch_stream(rngs, collection: str) -> rnglib.RngStream:
  """The stream a converted layer forks its sketch stream from."""
  if rngs is None:
    return nnx.Rngs(**{collection: next(_default_seeds)})[collection]
  if isinstance(rngs, rnglib.Rngs):
    return rngs[collection]
  if isinstance(rngs, rnglib.RngStream):
    return rngs
  if isinstance(rngs, (int, jax.Array)):
    return nnx.Rngs(**{collection: rngs})[collection]
  raise TypeError(f"rngs must be an nnx.Rngs, an nnx.RngStream, a seed or a key; got "
                  f"{type(rngs).__name__}")


def _with_params(old, build: tp.Callable[[], nnx.Module], stream: rnglib.RngStream):
  """``build()`` holding `old`'s very Param objects, without initialising any.

  The new module is built abstractly (``nnx.eval_shape``): its own kernel and
  bias are replaced by `old`'s, and any rng stream it made by a fork of
  `stream`.
  """
  new = nnx.eval_shape(build)
  for name in ("kernel", "bias"):
    if hasattr(old, name) or hasattr(new, name):
      setattr(new, name, getattr(old, name))
  for name, value in list(vars(new).items()):
    if isinstance(value, rnglib.RngStream):
      setattr(new, name, stream.fork())
  abstract = [jax.tree_util.keystr(p) for p, v in
              jax.tree_util.tree_leaves_with_path(nnx.state(new))
              if isinstance(v, jax.ShapeDtypeStruct)]
  if abstract:
    raise ValueError(f"converting {type(old).__name__} to {type(new).__name__}: the new module "
                     f"has state that is neither the old module's kernel and bias nor an rng "
                     f"stream ({', '.join(abstract)}), so it cannot be converted without "
                     "initialising it. Give the converter a class with nnx.Linear's state.")
  return new


def convert_linear(module, ctor: tp.Callable[..., nnx.Module] | None = None, *,
                   general: bool = True, rngs=None, **options):
  """Turns an ``nnx.Linear`` into ``ctor(...)`` that holds the same ``Param`` objects.

  The original fewbit's ``convert_linear``, for NNX. The new layer is built
  with the linear layer's configuration (features, use_bias, dtype,
  param_dtype, precision, promote_dtype, preferred_element_type) and
  `options`, without initialising anything: its ``kernel`` and ``bias`` are
  the *very same* ``nnx.Param`` objects, so an optimizer state or checkpoint
  made for the model before the conversion still fits it. Other modules
  come back unchanged, so it can be given to `map_module` for a whole
  model. Only the exact classes are converted (a subclass of
  ``nnx.Linear`` may compute something else), and layers with a custom
  ``dot_general`` are left alone with a warning.

  With ``general=True`` (the default) ``nnx.LinearGeneral`` becomes
  `RandomizedLinearGeneral` and ``nnx.Einsum`` `RandomizedEinsum`, with the
  same options, where their shape allows (no batch axes; an einsum that is a
  projection); others are left alone with a warning.

  Args:
    module: any module; only ``nnx.Linear`` (and with `general`,
      ``nnx.LinearGeneral`` and ``nnx.Einsum``) are converted.
    ctor: the class for ``nnx.Linear``, default `RandomizedLinear`; it
      takes ``nnx.Linear``'s arguments and `options`.
    general: also convert ``LinearGeneral`` and ``Einsum`` layers.
    rngs: where the converted layers' sketch keys come from: an
      ``nnx.Rngs`` (its ``'sketch'`` stream, or the one named by
      ``rng_collection``), an ``RngStream``, or a seed. Pass one object to
      every conversion of a model: each layer forks its own stream from it.
      None: each conversion seeds a fresh stream from a process-wide
      counter (distinct per layer; reproducible only if the conversions
      happen in the same order).
    **options: for the new layer, e.g. ``proj_dim_ratio=0.1``,
      ``sketch='countsketch'``.

  Returns:
    The new layer, or `module` itself.

  Raises:
    ValueError: bad `options` (an unknown sketch, a ratio outside (0, 1]).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> new = fb.nnx.convert_linear(lin, fb.nnx.RandomizedLinear, proj_dim_ratio=0.1,
    ...                             rngs=nnx.Rngs(sketch=0))
    >>> new.kernel is lin.kernel and new.bias is lin.bias
    True
    >>> x = jnp.ones((8, 3))
    >>> bool(jnp.all(new(x) == lin(x)))
    True
    >>> fb.nnx.convert_linear(nnx.relu) is nnx.relu     # anything else passes through
    True
  """
  collection = options.get("rng_collection", "sketch")
  kind = type(module)
  if kind is nnx.Linear:
    if module.dot_general is not lax.dot_general:
      warnings.warn(f"convert_linear leaves an nnx.Linear with a custom dot_general "
                    f"({module.dot_general!r}) as it is: a randomized layer computes its "
                    "gradients with its own matmuls.", UserWarning, stacklevel=2)
      return module
    ctor = RandomizedLinear if ctor is None else ctor
    kwargs = dict(use_bias=module.use_bias, dtype=module.dtype, param_dtype=module.param_dtype,
                  precision=module.precision, promote_dtype=module.promote_dtype,
                  preferred_element_type=module.preferred_element_type)
    kwargs.update(options)
    _validate(ctor, kwargs)
    build = lambda: ctor(module.in_features, module.out_features, rngs=nnx.Rngs(0), **kwargs)
  elif general and kind is nnx.LinearGeneral:
    reason = None
    if module.batch_axis:
      reason = f"it has batch axes {dict(module.batch_axis)}"
    elif module.dot_general is not None or module.dot_general_cls is not None:
      reason = "it has a custom dot_general"
    if reason:
      warnings.warn(f"convert_linear leaves an nnx.LinearGeneral as it is: {reason}, which a "
                    "randomized projection cannot serve.", UserWarning, stacklevel=2)
      return module
    kwargs = dict(axis=module.axis, use_bias=module.use_bias, dtype=module.dtype,
                  param_dtype=module.param_dtype, precision=module.precision,
                  promote_dtype=module.promote_dtype,
                  preferred_element_type=module.preferred_element_type)
    kwargs.update(options)
    _validate(RandomizedLinearGeneral, kwargs)
    build = lambda: RandomizedLinearGeneral(module.in_features, module.out_features,
                                            rngs=nnx.Rngs(0), **kwargs)
  elif general and kind is nnx.Einsum:
    reason = None
    if module.einsum_op is not jnp.einsum:
      reason = "it has a custom einsum_op"
    elif module.einsum_str is None:
      reason = "its einsum string is given per call"
    else:
      try:
        xs, ks, out = module.einsum_str.replace(" ", "").replace("->", ",").split(",")
        shared = set(xs) & set(ks) & set(out)
        if shared:
          reason = f"indices {''.join(sorted(shared))} are in x, kernel and output (batched kernels)"
      except ValueError:
        reason = f"its einsum string {module.einsum_str!r} is not 'x,kernel->out'"
    if reason:
      warnings.warn(f"convert_linear leaves an nnx.Einsum as it is: {reason}.", UserWarning,
                    stacklevel=2)
      return module
    kwargs = dict(dtype=module.dtype, param_dtype=module.param_dtype,
                  precision=module.precision, promote_dtype=module.promote_dtype,
                  preferred_element_type=module.preferred_element_type)
    kwargs.update(options)
    _validate(RandomizedEinsum, kwargs)
    bias_shape = None if module.bias is None else tuple(module.bias.shape)
    build = lambda: RandomizedEinsum(module.einsum_str, tuple(module.kernel.shape), bias_shape,
                                     rngs=nnx.Rngs(0), **kwargs)
  else:
    return module
  return _with_params(module, build, _sketch_stream(rngs, collection))


def _validate(ctor, kwargs) -> None:
  """Option errors at conversion, with the converter's name, not from inside eval_shape."""
  if ctor in (RandomizedLinear, RandomizedLinearGeneral, RandomizedEinsum):
    _check_blocks_arg(kwargs.get("sketch_blocks"))
  if ctor in (RandomizedLinear, RandomizedLinearGeneral, RandomizedEinsum):
    _check_options(ctor.__name__, kwargs.get("sketch", "gaussian"),
                   kwargs.get("proj_dim_ratio", 0.2), kwargs.get("proj_dim"),
                   kwargs.get("proj_dim_min"), kwargs.get("proj_dim_max"), None)


def convert_activations(module, **bits):
  """Makes `module`'s activation-valued attributes few-bit, in place.

  An attribute (or an element of an ``nnx.List``/list/tuple attribute, as in
  ``nnx.Sequential``) that is a ``jax.nn``/``flax.nnx`` activation named in
  `bits` (the function object itself, or a ``functools.partial`` of it) is
  replaced by the few-bit function with those bits and the partial's
  arguments. Only `module`'s own attributes change: use `map_module` for a
  whole model, and `fewbit_jax.patch_activations` for activations called
  inline in a ``__call__``.

  Args:
    module: an NNX module.
    **bits: activation name -> bits, as in `fewbit_jax.patch_activations`
      (``gelu=3``, ``relu=1``, ``silu=True`` for the default).

  Returns:
    `module`.

  Raises:
    ValueError, TypeError: as `fewbit_jax.patch_activations` for unknown
      names or bad bits.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.gelu)
    >>> model = fb.nnx.map_module(model, lambda m, _: fb.nnx.convert_activations(m, gelu=2))
    >>> model.layers[1].__name__
    'fewbit.gelu(approximate=True, bits=2)'
  """
  chosen = _patch.parse_bits(bits)
  impl = graphlib.get_node_impl(module)
  if impl is None:
    raise TypeError(f"convert_activations needs an NNX module; got {type(module).__name__}")
  for k, value in list(impl.node_dict(module).items()):
    if isinstance(k, str) and k.startswith("_pytree__"):
      continue
    new = _patch.swap_activation(value, chosen)
    if new is None and isinstance(value, (list, tuple)) and not isinstance(value, nnx.Module):
      items = [_patch.swap_activation(v, chosen) for v in value]
      if any(i is not None for i in items):
        swapped = [v if i is None else i for v, i in zip(value, items)]
        new = type(value)(swapped) if isinstance(value, tuple) else swapped
    if new is not None:
      impl.set_key(module, k, new)
  return module
