"""Lean NNX layers (`LayerNorm`, `RMSNorm`, `Dropout`) and `convert_lean`, which converts existing ones.

Each layer is a subclass of flax's with the same arguments and ``Variable``s
whose call runs the lean function (`fewbit_jax.layer_norm`,
`fewbit_jax.rms_norm`, `fewbit_jax.dropout`);
`convert_lean` turns flax's layers into them by a table, keeping the very
same ``Param`` and rng stream objects.
"""

from __future__ import annotations

import dataclasses
import functools
import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as _nnx_dtypes
from flax.nnx.module import first_from

from fewbit_jax import _sketch_stream
from fewbit_jax import norms as _norms
from fewbit_jax._dropout import dropout
from fewbit_jax.nnx._convert import read, with_params

__all__ = ["LayerNorm", "RMSNorm", "Dropout", "convert_lean"]


def _norm_call(module, x, mask, *, use_mean: bool):
  """flax's nnx LayerNorm (`use_mean`) or RMSNorm call, with the lean normalisation."""
  # flax's own test: a Param of no features is falsy, and then not applied
  # (nor does its dtype enter the promotion).
  scale = module.scale[...] if module.scale else None
  bias = module.bias[...] if use_mean and module.bias else None
  promote_to = None
  if module.promote_dtype is _nnx_dtypes.promote_dtype:
    # flax casts x, scale and bias to one dtype first; the cast of x happens
    # inside the lean op, so that the backward keeps x in its own dtype.
    promote_to = _nnx_dtypes.canonicalize_dtype(x, scale, bias, dtype=module.dtype)
    scale, bias = (None if p is None else jnp.asarray(p, promote_to) for p in (scale, bias))
  elif use_mean:
    x, scale, bias = module.promote_dtype((x, scale, bias), dtype=module.dtype)
  else:
    x, scale = module.promote_dtype((x, scale), dtype=module.dtype)
  return _norms.normalize(
      x, scale, bias, use_mean=use_mean, reduction_axes=module.reduction_axes,
      feature_axes=module.feature_axes, epsilon=module.epsilon, dtype=module.dtype,
      use_fast_variance=module.use_fast_variance, force_float32_reductions=True,
      axis_name=module.axis_name, axis_index_groups=module.axis_index_groups, mask=mask,
      promote_to=promote_to, name="layer_norm" if use_mean else "rms_norm")


class LayerNorm(nnx.LayerNorm):
  """``flax.nnx.LayerNorm`` whose backward keeps only its input and per-row statistics.

  The same arguments, the same ``Param``s (``scale``, ``bias``) and the same
  output, bitwise; the gradients are exact (`fewbit_jax.norms`). The input
  is kept in its own dtype (flax's promotion to the parameters' dtype
  happens inside the lean op) unless a custom ``promote_dtype`` is given.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> x = jax.random.normal(jax.random.key(0), (4, 6))
    >>> ours, theirs = fb.nnx.LayerNorm(6, rngs=nnx.Rngs(0)), nnx.LayerNorm(6, rngs=nnx.Rngs(0))
    >>> bool(jnp.all(ours(x) == theirs(x)))
    True
  """

  def __call__(self, x, *, mask=None):
    """Normalises `x` as ``nnx.LayerNorm`` does (`mask`: the positions of the statistics)."""
    return _norm_call(self, x, mask, use_mean=True)


class RMSNorm(nnx.RMSNorm):
  """``flax.nnx.RMSNorm`` whose backward keeps only its input and per-row rstd.

  The same arguments, the same ``scale`` and the same output, bitwise; the
  gradients are exact (`fewbit_jax.norms`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> x = jax.random.normal(jax.random.key(0), (4, 6), jnp.bfloat16)
    >>> ours, theirs = fb.nnx.RMSNorm(6, rngs=nnx.Rngs(0)), nnx.RMSNorm(6, rngs=nnx.Rngs(0))
    >>> bool(jnp.all(ours(x) == theirs(x)))
    True
  """

  def __call__(self, x, mask=None):
    """Normalises `x` as ``nnx.RMSNorm`` does (`mask`: the positions of the statistics)."""
    return _norm_call(self, x, mask, use_mean=False)


class Dropout(nnx.Dropout):
  """``flax.nnx.Dropout`` with forward-mode derivatives (the same mask, output and gradient).

  The same arguments, the same rng stream (forked from ``rngs`` at
  construction, or given per call) and the same output for the same keys,
  bitwise, with the same gradient (`fewbit_jax.dropout`).

  Its keys, in this order: a key, ``RngStream`` or ``Rngs`` given to the
  call; else, inside ``fb.nnx.step_keys(key)``, a key derived from the
  scope's key and this layer's own stream key (each layer its own, a new
  one per call, nothing advanced: flax's functional loop, where a model is
  merged inside ``jax.value_and_grad`` in a ``jax.jit`` step); else the
  layer's own stream, advanced as flax's (``nnx.jit``, ``nnx.value_and_grad``
  and NNX's other transforms carry it). Where that advance would be lost (a
  model merged inside plain JAX transforms without the scope), a training
  call raises instead of drawing the same mask every step. Its own stream
  keeps the key as raw ``uint32`` data (the draws are flax's), so a model's
  state serialises with msgpack; a stream handed over by
  `convert_lean` stays flax's object.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> x = jnp.ones((4, 8))
    >>> ours = fb.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    >>> theirs = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    >>> bool(jnp.all(ours(x) == theirs(x))), bool(jnp.all(ours(x) == theirs(x)))
    (True, True)
    >>> with fb.nnx.step_keys(jax.random.key(1)):  # a key of the scope's, no stream advanced
    ...   y = ours(x)
    >>> int(ours.rngs.count[...])
    2
  """

  def __init__(self, rate: float, *, broadcast_dims=(), deterministic: bool | None = False,
               rng_collection: str = "dropout", rngs=None):
    super().__init__(rate, broadcast_dims=broadcast_dims, deterministic=deterministic,
                     rng_collection=rng_collection, rngs=rngs)
    if isinstance(self.rngs, nnx.RngStream) and not isinstance(self.rngs,
                                                                _sketch_stream.KeyStream):
      # flax's fork, with its key as raw data: the same draws (count 0).
      self.rngs = _sketch_stream.KeyStream(self.rngs.key[...], tag=self.rngs.tag)

  def _key(self, rngs):
    """This call's mask key: the call's `rngs`, else the step_keys scope, else the own stream."""
    if rngs is not None:
      if isinstance(rngs, nnx.Rngs):
        return rngs[self.rng_collection]()
      if isinstance(rngs, nnx.RngStream):
        return rngs()
      if isinstance(rngs, jax.Array):
        return rngs
      raise TypeError(f"rngs must be a Rngs, RngStream or jax.Array, but got {type(rngs)}.")
    stream = self.rngs
    owner = type(self).__name__
    if stream is None:
      raise ValueError(
          f"`deterministic` is False, but no `rngs` argument was given to {owner} as either "
          "a __call__ argument or at construction. Construct it with rngs=nnx.Rngs(...) "
          f"(a {self.rng_collection!r} or default stream), or pass rngs=key to the call.")
    drawn = _sketch_stream.scoped_key(stream.key[...], stream, self.rng_collection, owner)
    if drawn is None:
      drawn = _sketch_stream.stream_key(stream, self.rng_collection, owner, "dropout mask")
    key, frozen = drawn
    if frozen is not None:
      raise ValueError(frozen)
    return key

  def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
    """Drops elements of `inputs` as ``nnx.Dropout`` does (keys as the class says)."""
    deterministic = first_from(
        deterministic, self.deterministic,
        error_msg="No `deterministic` argument was given to Dropout: pass it to the "
                  "constructor or the call, or use nnx.view(model, deterministic=...).")
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    return dropout(inputs, self.rate, self._key(rngs), broadcast_dims=self.broadcast_dims,
                    out_sharding=jax.typeof(inputs).sharding)


_NORM = ("epsilon", "dtype", "param_dtype", "use_scale", "reduction_axes", "feature_axes",
         "axis_name", "axis_index_groups", "use_fast_variance", "promote_dtype")


@dataclasses.dataclass(frozen=True)
class _Twin:
  """How `convert_lean` turns one nnx class into its lean twin."""
  lean: type  # the class it becomes
  config: tp.Callable[[nnx.Module], tuple[tuple, dict]]  # its constructor's (args, kwargs)
  state: tuple[str, ...]  # the attributes carried over as they are (Params, rng streams)
  params: bool = True  # its constructor initialises Params (replaced: any key will do)


# flax class -> its lean twin: the exact classes (a subclass may compute
# something else).
_TWINS = {
    nnx.LayerNorm: _Twin(LayerNorm, lambda m: ((m.num_features,), read(m, "use_bias", *_NORM)),
                         ("scale", "bias")),
    nnx.RMSNorm: _Twin(RMSNorm, lambda m: ((m.num_features,), read(m, *_NORM)), ("scale",)),
    nnx.Dropout: _Twin(Dropout, lambda m: ((m.rate,), read(
        m, "broadcast_dims", "deterministic", "rng_collection")), ("rngs",), params=False),
}


def _attention_converter(lean_fn):
  """Sets an attention layer's default ``attention_fn`` to `lean_fn`, in place."""
  def convert(module):
    if module.attention_fn is nnx.dot_product_attention:
      module.attention_fn = lean_fn
    return module
  return convert


def _converters() -> dict:
  """flax class -> ``module -> lean module``: the twins, and attention where present."""
  table = {cls: functools.partial(_to_twin, twin) for cls, twin in _TWINS.items()}
  try:
    from fewbit_jax.attention import dot_product_attention
  except ImportError:
    return table
  table[nnx.MultiHeadAttention] = _attention_converter(dot_product_attention)
  return table


def _to_twin(twin: _Twin, module):
  args, kwargs = twin.config(module)
  if twin.params:
    build = lambda: twin.lean(*args, **kwargs, rngs=nnx.Rngs(0))
  else:
    build = lambda: twin.lean(*args, **kwargs)
  return with_params(module, build, None, twin.state)


def convert_lean(module):
  """Turns an ``nnx.LayerNorm``, ``nnx.RMSNorm`` or ``nnx.Dropout`` into its lean twin.

  The twin (`LayerNorm`, `RMSNorm`, `Dropout` of `fewbit_jax.nnx`) has the
  same configuration and holds the *very same* ``Param`` objects (and, for
  dropout, the same rng stream), so optimizer state, checkpoints and the
  sequence of dropout keys carry on as before; its output is bitwise the
  layer's and its gradients equal, with a backward that keeps less. Other
  modules (and subclasses of these, which may compute something else) come
  back unchanged, so it can be given to `fewbit_jax.nnx.map_module`. Where
  ``fewbit_jax.attention`` is present, an ``nnx.MultiHeadAttention`` with
  the default ``attention_fn`` gets ``fewbit_jax.attention.
  dot_product_attention`` (in place: the same module comes back).

  Args:
    module: any module.

  Returns:
    The lean twin, or `module` itself.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import fewbit_jax as fb
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    >>> scale = model.layers[1].scale
    >>> x = jnp.ones((2, 3))
    >>> y = model(x)
    >>> model = fb.nnx.map_module(model, lambda m, path: fb.nnx.convert_lean(m))
    >>> type(model.layers[1]).__module__, model.layers[1].scale is scale
    ('fewbit_jax.nnx._lean', True)
    >>> bool(jnp.all(model(x) == y))
    True
  """
  convert = _converters().get(type(module))
  return module if convert is None else convert(module)
