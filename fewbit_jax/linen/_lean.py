"""Lean linen layers (`LayerNorm`, `RMSNorm`, `Dropout`) and `lean`, which converts existing ones.

Each layer is a subclass of flax's with the same fields and parameters whose
call runs the lean function (`fewbit_jax.layer_norm`,
`fewbit_jax.rms_norm`, `fewbit_jax.dropout`); the
computation is a plain function of the module (`_CALLS`), so `lean` runs
flax's own layers of an existing model through the very same code.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from fewbit_jax import norms as _norms
from fewbit_jax._dropout import dropout
from fewbit_jax.linen._convert import intercepting, Rule

__all__ = ["LayerNorm", "RMSNorm", "Dropout", "lean"]


def _norm_call(module, x, *, mask=None, use_mean: bool):
  """flax's LayerNorm (`use_mean`) or RMSNorm call, with the lean normalisation."""
  x = jnp.asarray(x)
  axes = _norms.canonical_axes(x.ndim, module.feature_axes, "feature_axes")
  shape = [x.shape[a] for a in axes]

  def param(name, init):
    value = module.param(name, init, shape, module.param_dtype)
    return value if module.force_float32_reductions else jnp.asarray(value, module.param_dtype)

  scale = param("scale", module.scale_init) if module.use_scale else None
  bias = param("bias", module.bias_init) if use_mean and module.use_bias else None
  return _norms.normalize(
      x, scale, bias, use_mean=use_mean, reduction_axes=module.reduction_axes,
      feature_axes=module.feature_axes, epsilon=module.epsilon, dtype=module.dtype,
      use_fast_variance=module.use_fast_variance,
      force_float32_reductions=module.force_float32_reductions, axis_name=module.axis_name,
      axis_index_groups=module.axis_index_groups, mask=mask,
      name="layer_norm" if use_mean else "rms_norm")


def _dropout_call(module, inputs, deterministic: bool | None = None, rng=None):
  """flax's Dropout call, through `fewbit_jax.dropout`."""
  deterministic = nn.merge_param("deterministic", module.deterministic, deterministic)
  if module.rate == 0.0 or deterministic:
    return inputs
  if module.rate == 1.0:
    return jnp.zeros_like(inputs)
  if rng is None:
    rng = module.make_rng(module.rng_collection)
  # The mask takes the input's sharding, as nnx.Dropout's: the same bits, and
  # under an Explicit mesh no select of a replicated mask with a sharded input
  # (which flax's linen Dropout refuses).
  return dropout(inputs, module.rate, rng, broadcast_dims=module.broadcast_dims,
                  out_sharding=jax.typeof(inputs).sharding)


class LayerNorm(nn.LayerNorm):
  """``flax.linen.LayerNorm`` whose backward keeps only its input and per-row statistics.

  The same fields, the same parameters (``'scale'``, ``'bias'``) and the
  same output, bitwise; the gradients are exact (`fewbit_jax.norms`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> x = jax.random.normal(jax.random.key(0), (4, 6))
    >>> v = nn.LayerNorm().init(jax.random.key(1), x)
    >>> jax.tree.map(jnp.shape, fb.LayerNorm().init(jax.random.key(1), x)) == \\
    ...     jax.tree.map(jnp.shape, v)
    True
    >>> bool(jnp.all(fb.LayerNorm().apply(v, x) == nn.LayerNorm().apply(v, x)))
    True
  """

  @nn.compact
  def __call__(self, x, *, mask=None):
    """Normalises `x` as ``nn.LayerNorm`` does (`mask`: the positions of the statistics)."""
    return _norm_call(self, x, mask=mask, use_mean=True)


class RMSNorm(nn.RMSNorm):
  """``flax.linen.RMSNorm`` whose backward keeps only its input and per-row rstd.

  The same fields, the same ``'scale'`` parameter and the same output,
  bitwise; the gradients are exact (`fewbit_jax.norms`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> x = jax.random.normal(jax.random.key(0), (4, 6), jnp.bfloat16)
    >>> v = nn.RMSNorm().init(jax.random.key(1), x)
    >>> bool(jnp.all(fb.RMSNorm().apply(v, x) == nn.RMSNorm().apply(v, x)))
    True
  """

  @nn.compact
  def __call__(self, x, *, mask=None):
    """Normalises `x` as ``nn.RMSNorm`` does (`mask`: the positions of the statistics)."""
    return _norm_call(self, x, mask=mask, use_mean=False)


class Dropout(nn.Dropout):
  """``flax.linen.Dropout`` with forward-mode derivatives (the same mask, output and gradient).

  The same fields, the same ``'dropout'`` rng collection (``rng_collection``)
  and the same output for the same rng, bitwise, with the same gradient
  (`fewbit_jax.dropout`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> x, rngs = jnp.ones((4, 8)), {"dropout": jax.random.key(0)}
    >>> y = fb.Dropout(0.5, deterministic=False).apply({}, x, rngs=rngs)
    >>> bool(jnp.all(y == nn.Dropout(0.5, deterministic=False).apply({}, x, rngs=rngs)))
    True
  """

  @nn.compact
  def __call__(self, inputs, deterministic: bool | None = None, rng=None):
    """Drops elements of `inputs` as ``nn.Dropout`` does."""
    return _dropout_call(self, inputs, deterministic, rng)


def _calls(fn):
  """A `Rule` call running ``fn(module, *args, **kwargs)`` instead of the layer's own."""
  return lambda module, next_fun, args, kwargs: fn(module, *args, **kwargs)


def _norm_refusal(module, args, kwargs) -> str | None:
  x = args[0] if args else kwargs.get("x")
  if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    return f"its input is {jnp.result_type(x)}, not real floating point"
  return None


def _attention_rule(lean_fn):
  """The rule running an attention layer's default ``attention_fn`` as `lean_fn`."""

  def call(module, next_fun, args, kwargs):
    # The field is read by the layer's own __call__: set it for this call only.
    object.__setattr__(module, "attention_fn", lean_fn)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "attention_fn", nn.dot_product_attention)

  def refusal(module, args, kwargs):
    if module.attention_fn is not nn.dot_product_attention:
      return "it has its own attention_fn"
    return None

  return Rule(call, refusal)


# flax class -> how `lean` runs it: the exact classes (a subclass may compute
# something else).
_RULES = {
    nn.LayerNorm: Rule(_calls(functools.partial(_norm_call, use_mean=True)), _norm_refusal),
    nn.RMSNorm: Rule(_calls(functools.partial(_norm_call, use_mean=False)), _norm_refusal),
    nn.Dropout: Rule(_calls(_dropout_call), lambda m, a, k: None),
}


def _rules() -> dict:
  """`_RULES`, and the attention layers where `fewbit_jax.attention` is present."""
  try:
    from fewbit_jax.attention import dot_product_attention
  except ImportError:
    return _RULES
  rule = _attention_rule(dot_product_attention)
  return {**_RULES, nn.MultiHeadDotProductAttention: rule, nn.MultiHeadAttention: rule,
          nn.SelfAttention: rule}


@contextlib.contextmanager
def lean(pattern: str | None = None, *, warn_unused: bool = True):
  """Runs the model's ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.Dropout`` calls lean while inside.

  Like `fewbit_jax.linen.intercept` for dense layers: every call of one of
  these flax layers whose path matches `pattern` computes what `LayerNorm`,
  `RMSNorm` or `Dropout` computes, with the layer's own fields, parameters
  and rngs: the same output (bitwise), the same gradients, but a backward
  that keeps the norm's input and per-row statistics only, and no dropout
  mask. Initialisation inside or outside gives the same parameters. Where
  ``fewbit_jax.attention`` is present, ``nn.MultiHeadDotProductAttention``
  (and ``nn.MultiHeadAttention``, ``nn.SelfAttention``) with the default
  ``attention_fn`` run ``fewbit_jax.attention.dot_product_attention``.

  The conversion happens while the model is traced (a ``jax.jit`` step
  traced outside the context stays plain); it composes with
  `fewbit_jax.linen.intercept` and `fewbit_jax.patch_activations`.
  Complex or integer inputs to a norm run flax's layer, listed in
  ``skipped``.

  Args:
    pattern: a regular expression searched in each layer's path, as for
      `fewbit_jax.linen.intercept`; None: every layer.
    warn_unused: warn on exit when no layer was converted.

  Yields:
    An `fewbit_jax.linen.Interception` listing the converted (and skipped)
    layer paths, one entry per call.

  Raises:
    re.error: `pattern` is not a regular expression.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import fewbit_jax as fb
    >>> model = nn.Sequential([nn.Dense(8), nn.LayerNorm(), nn.Dropout(0.1, deterministic=False)])
    >>> x, rngs = jnp.ones((4, 3)), {"dropout": jax.random.key(1)}
    >>> v = model.init(jax.random.key(0), x)
    >>> with fb.linen.lean() as seen:
    ...   y = model.apply(v, x, rngs=rngs)
    >>> seen.converted
    ['/layers_1', '/layers_2']
    >>> bool(jnp.all(y == model.apply(v, x, rngs=rngs)))
    True
  """
  with intercepting(_rules(), pattern, warn_unused, "lean", "norm or dropout layers",
                     "nn.LayerNorm, nn.RMSNorm or nn.Dropout") as record:
    yield record
