"""Flax linen layers of fewbit_jax, and converting existing linen models.

`RandomizedDense` is a drop-in for ``flax.linen.Dense``: the same fields, the
same parameter tree and the same forward output, but its weight gradient is
estimated from a random sketch of the input (`fewbit_jax.dense`), so the
backward pass keeps ``proj_dim_ratio`` of the input instead of all of it.

Linen models are immutable and build their layers in ``@compact`` bodies,
so existing ones are converted without editing them by interception:
inside `intercept` their ``nn.Dense`` (and ``nn.DenseGeneral``) calls run
randomized with the same parameters; `swap_activations` clones a model with
its activation-valued fields few-bit; `fewbit_jax.patch_activations` covers
activations called inline::

  with fb.linen.intercept(proj_dim_ratio=0.2), fb.patch_activations(gelu=3):
    grads = jax.grad(loss)(params, batch, key)   # loss applies with rngs={'sketch': key}
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.core import meta
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import default_kernel_init
from flax.typing import Dtype, Initializer, PrecisionLike

from fewbit_jax import patch as _patch
from fewbit_jax import sketch as _sketch
from fewbit_jax.dense import _check_blocks_arg, _forward, projection_dim, randomized_dense
from fewbit_jax.dense_general import randomized_dot_general

__all__ = ["RandomizedDense", "intercept", "Interception", "swap_activations"]


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
    _check_options(type(self).__name__, self.sketch, self.proj_dim_ratio, self.proj_dim,
                   self.proj_dim_min, self.proj_dim_max,
                   self.dot_general if self.dot_general is not None else self.dot_general_cls)
    _check_blocks_arg(self.sketch_blocks)
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
        proj_dim_max=self.proj_dim_max, sketch=self.sketch, precision=self.precision,
        sketch_blocks=self.sketch_blocks)


# --------------------------------------------------------------------------
# Converting existing models: interception and field swapping.


@dataclasses.dataclass
class Interception:
  """What an `intercept` context converted: the paths of the layers it ran randomized.

  ``converted`` has one entry per converted call (a layer called twice, or
  traced twice, appears twice); ``skipped`` lists matching layers left
  plain (a custom ``dot_general``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> layer = nn.Dense(3)
    >>> v = layer.init(jax.random.key(0), jnp.ones((4, 2)))
    >>> with fb.linen.intercept(proj_dim=2) as seen:
    ...   _ = layer.apply(v, jnp.ones((4, 2)), rngs={"sketch": jax.random.key(1)})
    >>> seen
    Interception(converted=['/'], skipped=[])
  """
  converted: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)

  def __repr__(self) -> str:
    return f"Interception(converted={self.converted}, skipped={self.skipped})"


def _module_path(module: nn.Module) -> str:
  return "/" + "/".join(str(p) for p in module.path)


def _unboxed(module: nn.Module, name: str):
  value = module.get_variable("params", name)
  return meta.unbox(value) if value is not None else None


def _sketch_key(module: nn.Module, collection: str):
  if not (module.has_rng(collection) or module.has_rng("params")):
    raise ValueError(_missing_rng_message(
        f"fewbit_jax.linen.intercept (at {_module_path(module)})", collection,
        f"Pass a fresh key each step: model.apply(variables, x, "
        f"rngs={{{collection!r}: jax.random.fold_in(key, step)}})."))
  return module.make_rng(collection)


def _dense_call(module: nn.Dense, inputs, options: dict, collection: str):
  """nn.Dense's computation, with the weight gradient from a sketch."""
  kernel = _unboxed(module, "kernel")
  bias = _unboxed(module, "bias") if module.use_bias else None
  inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
  return randomized_dense(inputs, kernel, bias, _sketch_key(module, collection),
                          precision=module.precision, **options)


def _dense_general_call(module: nn.DenseGeneral, inputs, options: dict, collection: str):
  """nn.DenseGeneral's computation (no batch_dims), with the weight gradient from a sketch."""
  features = tuple(module.features) if isinstance(module.features, Sequence) \
      else (module.features,)
  axis = tuple(module.axis) if isinstance(module.axis, Sequence) else (module.axis,)
  axis = tuple(a % inputs.ndim for a in axis)
  kernel = _unboxed(module, "kernel")
  bias = _unboxed(module, "bias") if module.use_bias else None
  inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
  dims = ((axis, tuple(range(len(axis)))), ((), ()))
  out = randomized_dot_general(inputs, kernel, _sketch_key(module, collection), dims,
                               precision=module.precision, **options)
  if bias is not None:
    out += jnp.reshape(bias, (1,) * (inputs.ndim - len(axis)) + features)
  return out


def _can_randomize(module: nn.Module) -> str | None:
  """None if `module` (an exact nn.Dense / nn.DenseGeneral) can run randomized, else why not."""
  if module.dot_general is not None or module.dot_general_cls is not None:
    return "it has a custom dot_general"
  if type(module) is nn.DenseGeneral and module.batch_dims:
    return f"it has batch_dims {module.batch_dims}"
  return None


@contextlib.contextmanager
def intercept(pattern: str | None = None, *, proj_dim_ratio: float | None = 0.2,
              proj_dim: int | None = None, proj_dim_min: int | None = None,
              proj_dim_max: int | None = None, sketch: str = "gaussian",
              rng_collection: str = "sketch", general: bool = True,
              warn_unused: bool = True, sketch_blocks=None):
  """Runs the model's ``nn.Dense`` layers as randomized dense layers while inside.

  Linen modules are immutable and usually build their layers inside a
  ``@compact`` body, so they cannot be swapped like NNX modules. Inside this
  context (built on ``flax.linen.intercept_methods``) every call of an
  ``nn.Dense`` whose path matches `pattern` computes what
  `RandomizedDense` computes, with the layer's own parameters: the same
  forward output (bitwise), the weight gradient estimated from a sketch of
  the input (`fewbit_jax.dense.randomized_dense`). With ``general=True``
  ``nn.DenseGeneral`` layers without ``batch_dims`` run as randomized
  projections too (`fewbit_jax.dense_general.randomized_dot_general`).

  Nothing about the parameters changes: ``model.init`` inside or outside the
  context gives the same tree, and existing variables and optimizer state
  apply as they are. Each converted call draws its sketch key with
  ``make_rng(rng_collection)``: pass ``rngs={'sketch': key}`` (a fresh key
  every step) to ``model.apply``; initialisation needs none.

  Like `fewbit_jax.patch_activations`, interception happens while the model
  is *traced*: a ``jax.jit``-compiled step traced outside the context stays
  plain (jit caches by function and argument types), so trace the step
  inside it, or jit a function that enters it.

  Only the exact classes ``nn.Dense`` and ``nn.DenseGeneral`` are converted
  (a subclass may compute something else); layers with a custom
  ``dot_general`` are run as they are and listed in ``skipped``.

  Args:
    pattern: a regular expression searched (``re.search``) in each layer's
      path, ``'/Block_0/Dense_1'`` style (the names linen gives, or yours).
      None: every layer. A pattern that matches no called layer is only
      known at the end: a warning then says so, with the paths seen.
    proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch,
      sketch_blocks: the sketch, as for `RandomizedDense`.
    rng_collection: the rng stream of the sketch keys.
    general: also convert ``nn.DenseGeneral``.
    warn_unused: warn on exit when no layer was converted (no matching
      layer was called, e.g. a jitted step traced before the context).

  Yields:
    An `Interception` listing the converted (and skipped) layer paths,
    one entry per converted call.

  Raises:
    ValueError: bad sketch options (at entry), or a converted call with no
      ``'sketch'`` (or ``'params'``) rng.
    re.error: `pattern` is not a regular expression.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((16, 4))
    >>> variables = model.init(jax.random.key(0), x)
    >>> with fb.linen.intercept(r"layers_0", proj_dim_ratio=0.25) as seen:
    ...   y = model.apply(variables, x, rngs={"sketch": jax.random.key(1)})
    >>> seen.converted
    ['/layers_0']
    >>> bool(jnp.all(y == model.apply(variables, x)))
    True
  """
  regex = re.compile(pattern) if pattern is not None else None
  _check_options("fewbit_jax.linen.intercept", sketch, proj_dim_ratio, proj_dim, proj_dim_min,
                 proj_dim_max, None)
  _check_blocks_arg(sketch_blocks)
  options = dict(proj_dim_ratio=None if proj_dim is not None else proj_dim_ratio,
                 proj_dim=proj_dim, proj_dim_min=proj_dim_min, proj_dim_max=proj_dim_max,
                 sketch=sketch, sketch_blocks=sketch_blocks)
  record = Interception()
  seen: list[str] = []
  kinds = {nn.Dense: _dense_call}
  if general:
    kinds[nn.DenseGeneral] = _dense_general_call

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    call = kinds.get(type(module))
    if call is None or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = _module_path(module)
    seen.append(path)
    if regex is not None and not regex.search(path):
      return next_fun(*args, **kwargs)
    if module.is_initializing() or _unboxed(module, "kernel") is None:
      return next_fun(*args, **kwargs)
    why = _can_randomize(module)
    if why is not None:
      record.skipped.append(path)
      return next_fun(*args, **kwargs)
    if len(args) != 1 or kwargs:
      raise TypeError(f"{type(module).__name__} at {path} was called with {len(args)} "
                      f"positional and {sorted(kwargs)} keyword arguments; it takes inputs only.")
    record.converted.append(path)
    return call(module, args[0], options, rng_collection)

  with nn.intercept_methods(interceptor):
    yield record
  if warn_unused and not record.converted:
    layers = sorted(set(seen))
    shown = ", ".join(layers[:24]) + (", ..." if len(layers) > 24 else "")
    warnings.warn(
        "fewbit_jax.linen.intercept converted no layer. "
        + (f"Pattern {pattern!r} matched none of the dense layers called: {shown}."
           if layers else "No nn.Dense was called while tracing in the context: a jitted "
           "step traced before it is reused from jax.jit's cache (trace it inside, or jit a "
           "function that enters the context), or the model was only initialised."),
        UserWarning, stacklevel=3)


def swap_activations(module: nn.Module, **bits) -> nn.Module:
  """A clone of `module` whose activation-valued fields are few-bit.

  A field holding a ``jax.nn``/``flax.linen`` activation named in `bits`
  (the function itself or a ``functools.partial`` of it, e.g. an
  ``activation: Callable = nn.gelu`` field) gets the few-bit function;
  fields holding modules (and lists, tuples and dicts of them) are swapped
  recursively. Unbound definitions are what this is for; the clone has the
  same fields otherwise, so it takes the same variables. Activations called
  inline in a body need `fewbit_jax.patch_activations`.

  Args:
    module: a linen module (definition).
    **bits: activation name -> bits, as in `fewbit_jax.patch_activations`.

  Returns:
    The clone, or `module` itself if no field changed.

  Raises:
    ValueError, TypeError: as `fewbit_jax.patch_activations` for unknown
      names or bad bits.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> class MLP(nn.Module):
    ...   activation: object = nn.gelu
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2)(self.activation(nn.Dense(8)(x)))
    >>> model = fb.linen.swap_activations(MLP(), gelu=3)
    >>> model.activation.__name__
    'fewbit.gelu(approximate=True, bits=3)'
    >>> x = jnp.ones((4, 3))
    >>> v = MLP().init(jax.random.key(0), x)
    >>> bool(jnp.all(model.apply(v, x) == MLP().apply(v, x)))
    True
  """
  return _swap_fields(module, _patch.parse_bits(bits))


def _swap_value(value, chosen):
  """The swapped value, or None where nothing in it changes."""
  new = _patch.swap_activation(value, chosen)
  if new is not None:
    return new
  if isinstance(value, nn.Module):
    out = _swap_fields(value, chosen)
    return None if out is value else out
  if isinstance(value, (list, tuple)):
    items = [_swap_value(v, chosen) for v in value]
    if all(i is None for i in items):
      return None
    swapped = [v if i is None else i for v, i in zip(value, items)]
    return type(value)(swapped) if isinstance(value, tuple) else swapped
  if isinstance(value, dict):
    items = {k: _swap_value(v, chosen) for k, v in value.items()}
    if all(i is None for i in items.values()):
      return None
    return type(value)({k: v if items[k] is None else items[k] for k, v in value.items()})
  return None


def _swap_fields(module: nn.Module, chosen) -> nn.Module:
  if not isinstance(module, nn.Module):
    raise TypeError(f"swap_activations needs a linen module; got {type(module).__name__}")
  updates = {}
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name") or not f.init:
      continue
    new = _swap_value(getattr(module, f.name), chosen)
    if new is not None:
      updates[f.name] = new
  return module.clone(**updates) if updates else module
