"""Primitive plumbing shared by the code ops and the sketch op.

Each kernel is a JAX primitive lowered to its XLA FFI call on the platforms
the extension registered and to its pure-JAX code on the others (so a jitted
function stays portable), evaluated eagerly through ``jax.jit``, and marked
batch-partitionable over its leading axes (with a Shardy sharding rule), so
that XLA runs it shard by shard instead of gathering its operands. `define`
does all of that for one primitive.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend import core as _jcore
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from fewbit_jax._ffi import _load

# Float dtypes every kernel reads as it is (quantize_pack and the sketch take float64 too).
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _def_impl(prim):
  """Eager evaluation: compile the single primitive with jax.jit."""
  @functools.lru_cache(maxsize=None)
  def compiled(**params):
    return jax.jit(functools.partial(prim.bind, **params))

  def impl(*args, **params):
    return compiled(**params)(*args)

  prim.def_impl(impl)


def frontend_and_rule(ctx, num_batch_dims: int, in_specs, out_specs, **factor_sizes):
  """Extra custom-call attributes that make XLA partition over batch axes.

  `num_batch_dims` leading axes are shared by every operand and result whose
  spec starts with '...'; XLA's batch partitioner (enabled per target by
  jax.ffi.register_ffi_target_as_batch_partitionable) shards the call along
  them and replicates the rest. The Shardy rule tells the propagation the
  same thing; `factor_sizes` are the sizes of factors that only appear inside
  a compound dimension such as ``(g r)``.
  """
  if num_batch_dims <= 0:
    return None
  attrs = {"mhlo.frontend_attributes": mlir.ir_attribute({"num_batch_dims": str(num_batch_dims)})}
  if jax.config.jax_use_shardy_partitioner:
    from jax._src.custom_partitioning_sharding_rule import (  # pylint: disable=g-import-not-at-top
        sdy_sharding_rule_to_mlir, str_to_sdy_sharding_rule)
    rule = str_to_sdy_sharding_rule(", ".join(in_specs) + " -> " + ", ".join(out_specs),
                                    **factor_sizes)
    attrs["sdy.sharding_rule"] = sdy_sharding_rule_to_mlir(
        rule, [mlir.aval_to_ir_type(ctx.module_context, a) for a in ctx.avals_in],
        [mlir.aval_to_ir_type(ctx.module_context, a) for a in ctx.avals_out])
  return attrs


try:  # how JAX's own lowerings constrain a result to the sharding of its type
  from jax._src.interpreters.mlir import lower_with_sharding_in_types as _lower_with_sharding_in_types  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - a JAX that moved it
  def _lower_with_sharding_in_types(ctx, op, aval):
    """No constraint: the partitioner propagates the sharding rule's instead."""
    del ctx, aval
    return op


def _register_lowerings(prim, target, pure_fn, ffi_attrs_fn, batch_fn):
  """FFI lowering on platforms with kernels, the pure-JAX code elsewhere.

  `target(params)` names the FFI target, `ffi_attrs_fn(params)` gives its
  attributes and `batch_fn(ctx, **params)` the partitioning attributes.
  Under an Explicit mesh the result is constrained to the sharding of its
  type, as JAX's own primitives are.
  """
  mlir.register_lowering(prim, mlir.lower_fun(pure_fn, multiple_results=False))

  def rule(ctx, *args, **params):
    extra = batch_fn(ctx, **params)
    kwargs = {"extra_attributes": extra} if extra else {}
    lowering = jax.ffi.ffi_lowering(target(params), **kwargs)
    outs = lowering(ctx, *args, **ffi_attrs_fn(params))
    return [_lower_with_sharding_in_types(ctx, o, a) for o, a in zip(outs, ctx.avals_out)]

  for platform in _load.REGISTERED:
    mlir.register_lowering(prim, rule, platform=platform)


def result_aval(shape, dtype, spec, *operands):
  """The type of a primitive's result: `shape` and `dtype`, sharded as `spec`.

  `spec` is taken on the operands' mesh (JAX keeps only its Explicit axes in
  the type); inside ``jax.shard_map`` the result varies over every manual
  axis any operand varies over, as JAX's own primitives' results do.
  """
  mesh = next((a.sharding.mesh for a in operands if not a.sharding.mesh.empty), None)
  if mesh is None:
    return jax.core.ShapedArray(shape, dtype)
  varying = frozenset().union(*(a.mat.varying for a in operands))
  mat = operands[0].mat.update(varying=varying, unreduced=frozenset(), reduced=frozenset())
  return jax.core.ShapedArray(shape, dtype, sharding=NamedSharding(mesh, P(*spec)),
                              manual_axis_type=mat)


def sequential(prim, args, dims, params):
  """vmap fallback: loop over the batch with lax.map."""
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
  batched = [d is not None for d in dims]

  def one(xs):
    it = iter(xs)
    full = [next(it) if b else a for a, b in zip(moved, batched)]
    return prim.bind(*full, **params)

  del size
  return jax.lax.map(one, [a for a, b in zip(moved, batched) if b]), 0


def to_front(x, d, size):
  """x with its batch axis d first, or broadcast to `size` if d is None."""
  if d is None:
    return jnp.broadcast_to(x, (size, *x.shape))
  return jnp.moveaxis(x, d, 0)


def define(name, abstract, pure, *, target, ffi_attrs, partitioning, batch, jvp=None,
           transpose=None):
  """A primitive `name` with its abstract evaluation, eager impl, rules and lowerings.

  Args:
    name: the primitive's name.
    abstract: the abstract evaluation (avals -> result aval).
    pure: the pure-JAX definition, the lowering where there is no kernel.
    target: ``target(params)`` names the FFI target.
    ffi_attrs: ``ffi_attrs(params)`` gives the FFI call's attributes.
    partitioning: ``partitioning(ctx, **params)`` gives the batch-partitioning
      attributes (see `frontend_and_rule`).
    batch, jvp, transpose: the vmap, JVP and transpose rules (None: none).

  Returns:
    The primitive.
  """
  prim = _jcore.Primitive(name)
  prim.def_abstract_eval(abstract)
  _def_impl(prim)
  batching.primitive_batchers[prim] = batch
  if jvp is not None:
    ad.primitive_jvps[prim] = jvp
  if transpose is not None:
    ad.primitive_transposes[prim] = transpose
  _register_lowerings(prim, target, pure, ffi_attrs, partitioning)
  return prim
