"""Dispatch between the XLA FFI kernels of ``xla_ext`` and the pure-JAX path.

The compiled extension ``fewbit_jax._xla_ext`` is optional. Where it is
importable its FFI targets are registered with XLA at import, and the
functions here call them on the platforms they were built for; elsewhere they
run the pure-JAX reference (``fewbit_jax.codes``, ``fewbit_jax.rng``), which
gives the same codes bit for bit.

Choose the path with the environment variable ``FEWBIT_JAX_FFI`` (``auto``,
the default; ``1`` to require the kernels, which raises if they are missing;
``0`` for pure JAX) or with `set_mode` / the `mode` context manager. The
choice is read when a function is traced, so it is part of what ``jax.jit``
caches: change it before tracing.

How the kernels enter a computation: each is a JAX primitive
(``fewbit_quantize_pack``, ``fewbit_unpack_scale``, ``fewbit_pack``,
``fewbit_sketch``) lowered to the XLA FFI call on platforms with kernels and
to the pure-JAX code on the others, so a jitted function stays portable. The
primitives

* batch under ``jax.vmap`` natively: every leading axis is a row to the
  kernels, so a vmapped axis is moved to the front instead of looping (a
  vmapped table or sketch key falls back to a loop, ``lax.map``);
* partition under ``jax.jit`` with sharded inputs: the FFI calls are marked
  batch-partitionable over their leading axes (and carry a Shardy sharding
  rule), so XLA runs them shard by shard instead of gathering the
  activations. The code kernels pack along the last axis, 32 elements to a
  word, and the words are independent: where its length n is a multiple of
  32 (and above 32) and there is more than one device, they are called on
  the activation viewed as ``(..., n / 32, 32)``, every axis but the last a
  batch axis, and their ``(..., n / 32, bits, 1)`` result is transposed to
  the canonical ``(..., bits, n / 32)`` (and the codes back for
  `unpack_scale`; the codes are bits / 32 of the activation's elements). A
  sharding of the last axis over d devices with n / d a multiple of 32 is
  then a sharding of the word axis, kept with no collective. Where n / d is
  not a multiple of 32 (in particular where n is not), the shards would cut
  words, and XLA gathers the last axis before the call (the pure-JAX path
  moves data between devices there too);
* type their results under ``AxisType.Explicit`` meshes: codes take the
  sharding of their input (that of the last axis on the word axis where the
  shards hold whole words, the bits axis unsharded), `unpack_scale` that of
  the cotangent, and a sketch that of x's leading axes, its groups (where
  the shards of x's rows hold whole groups) and columns. Inside
  ``jax.shard_map`` a result varies over the manual axes any operand varies
  over, so the backward of an activation has its input's type there;
* differentiate where it makes sense: codes have zero tangents, and
  ``unpack_scale`` is linear in the cotangent (so a gradient of a gradient
  works).

The activation output itself is never computed by a kernel: it stays the
``jax.nn`` expression, computed by XLA, so the forward pass is bitwise that of
``jax.nn``; the kernels only replace the code computation, packing and the
backward product.

Example:
  >>> from fewbit_jax import ext
  >>> ext.available() in (True, False)
  True
  >>> with ext.mode("jax"):
  ...   ext.active_path("cpu")
  'jax'
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as _jcore
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from fewbit_jax import codes as _codes
from fewbit_jax import rng as _rng

__all__ = ["available", "platforms", "active_path", "set_mode", "get_mode", "mode",
           "pack", "quantize_pack", "unpack_scale", "sketch_kernel", "SKETCH_KINDS"]

_MODES = ("auto", "ffi", "jax")
_ENV_TO_MODE = {"": "auto", "auto": "auto", "1": "ffi", "ffi": "ffi", "0": "jax", "jax": "jax"}

# Sketch kinds with a kernel. S[i, j] for row i (flattened leading positions
# of x) and column j < k, with (k0, k1) = rng.key_words(key):
#   gaussian     rng.gaussian(k0, k1, i, j) * float32(1 / sqrt(k))
#   rademacher   (1 - 2 * (hash4(k0, k1, i, j) >> 31)) * float32(1 / sqrt(k))
#   countsketch  S[i, hash4(k0, k1, i, 0) % k] = 1 - 2 * (hash4(k0, k1, i, 1) >> 31)
SKETCH_KINDS = ("gaussian", "rademacher", "countsketch")

try:  # pragma: no cover - depends on how the package was installed
  from fewbit_jax import _xla_ext  # type: ignore[attr-defined]
  _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
  _xla_ext = None
  _IMPORT_ERROR = e

_REGISTERED: dict[str, set[str]] = {}


def _register() -> None:
  if _xla_ext is None:
    return
  for platform, table in _xla_ext.registrations().items():
    for name, capsule in table.items():
      jax.ffi.register_ffi_target(name, capsule, platform=platform)
      _REGISTERED.setdefault(platform.lower(), set()).add(name)


_register()


def _mode_from_env() -> str:
  raw = os.environ.get("FEWBIT_JAX_FFI", "auto").strip().lower()
  if raw not in _ENV_TO_MODE:
    raise ValueError(f"FEWBIT_JAX_FFI={raw!r}: expected auto, 1 (ffi) or 0 (jax)")
  return _ENV_TO_MODE[raw]


_mode = _mode_from_env()


def available() -> bool:
  """Whether the compiled extension was imported and registered.

  Example:
    >>> from fewbit_jax import ext
    >>> ext.available() in (True, False)
    True
  """
  return _xla_ext is not None


def platforms() -> tuple[str, ...]:
  """Platforms ('cpu', 'cuda') the extension registered FFI targets for.

  Example:
    >>> from fewbit_jax import ext
    >>> set(ext.platforms()) <= {"cpu", "cuda"}
    True
  """
  return tuple(sorted(_REGISTERED))


def set_mode(new_mode: str) -> None:
  """Sets the path: 'auto' (kernels where registered), 'ffi' (require them) or 'jax'.

  Read when a function is traced: set it before ``jax.jit`` traces.

  Example:
    >>> from fewbit_jax import ext
    >>> old = ext.get_mode()
    >>> ext.set_mode("jax"); ext.active_path("cpu")
    'jax'
    >>> ext.set_mode(old)
  """
  global _mode
  if new_mode not in _MODES:
    raise ValueError(f"mode must be one of {_MODES}; got {new_mode!r}")
  _mode = new_mode


def get_mode() -> str:
  """The current path setting ('auto', 'ffi' or 'jax').

  Example:
    >>> from fewbit_jax import ext
    >>> ext.get_mode() in ("auto", "ffi", "jax")
    True
  """
  return _mode


@contextlib.contextmanager
def mode(new_mode: str):
  """Context manager form of `set_mode`; restores the previous mode on exit.

  Example:
    >>> from fewbit_jax import ext
    >>> with ext.mode("jax"):
    ...   ext.get_mode()
    'jax'
  """
  old = _mode
  set_mode(new_mode)
  try:
    yield
  finally:
    set_mode(old)


def _canonical(platform: str) -> str:
  """'cpu', 'cuda' or 'rocm': jax calls both GPU platforms 'gpu'."""
  platform = platform.lower()
  if platform != "gpu":
    return platform
  try:
    version = jax.devices("gpu")[0].client.platform_version.lower()
  except RuntimeError:
    version = ""
  return "rocm" if "rocm" in version else "cuda"


def active_path(platform: str | None = None) -> str:
  """'ffi' or 'jax': the path used for arrays on `platform` (default backend).

  Raises:
    RuntimeError: in mode 'ffi' when there are no kernels for the platform.

  Example:
    >>> from fewbit_jax import ext
    >>> ext.active_path("cpu") == ("ffi" if "cpu" in ext.platforms()
    ...                            and ext.get_mode() != "jax" else "jax")
    True
  """
  platform = _canonical(platform or jax.default_backend())
  has = platform in _REGISTERED
  if _mode == "jax":
    return "jax"
  if _mode == "ffi" and not has:
    why = (f"the extension failed to import ({_IMPORT_ERROR})" if _xla_ext is None
           else f"it has no kernels for {platform!r} (built for {platforms()})")
    raise RuntimeError(
        f"FFI kernels were required (FEWBIT_JAX_FFI=1 or ext.set_mode('ffi')) but {why}. "
        "Reinstall with `pip install .` (with nvcc on PATH for CUDA) or use mode 'auto'.")
  return "ffi" if has else "jax"


def _use_primitives() -> bool:
  """Whether to emit the fewbit primitives (True) or plain jnp code (False).

  In mode 'auto' the primitives are emitted whenever the extension loaded:
  their lowering picks the kernel or the pure-JAX code per platform at
  compile time. In mode 'ffi' a default backend without kernels is an error.
  """
  if _mode == "jax" or _xla_ext is None:
    if _mode == "ffi":
      active_path()  # raises with the reason
    return False
  if _mode == "ffi":
    active_path()
  return True


# ---------------------------------------------------------------------------
# Primitive plumbing.

def _def_impl(prim):
  """Eager evaluation: compile the single primitive with jax.jit."""
  @functools.lru_cache(maxsize=None)
  def compiled(**params):
    return jax.jit(functools.partial(prim.bind, **params))

  def impl(*args, **params):
    return compiled(**params)(*args)

  prim.def_impl(impl)


def _frontend_and_rule(ctx, num_batch_dims: int, in_specs, out_specs, **factor_sizes):
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

  for platform in _REGISTERED:
    mlir.register_lowering(prim, rule, platform=platform)


def _spec(aval) -> tuple:
  """The PartitionSpec entries of an aval's type, one per axis."""
  spec = tuple(aval.sharding.spec)
  return spec + (None,) * (aval.ndim - len(spec))


def _shards(mesh, entry) -> int:
  """How many shards a PartitionSpec entry cuts an axis into on `mesh`."""
  if entry is None or entry is P.UNCONSTRAINED:
    return 1
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(sizes[a] for a in names)


def _if_divides(mesh, entry, size: int):
  """`entry` where its shards divide an axis of `size`, else None (unsharded)."""
  return entry if size % _shards(mesh, entry) == 0 else None


def _result_aval(shape, dtype, spec, *operands):
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


def _codes_aval(x, bits, *others):
  """Packed codes (..., bits, W) of x (..., n), sharded like x.

  W keeps the sharding of x's last axis where the shards hold whole 32-element
  words; the bits axis is unsharded. `others` are the other operands.
  """
  shape = _codes.packed_shape(x.shape, bits)
  spec, mesh = _spec(x), x.sharding.mesh
  last = None
  if x.shape[-1] % _codes.WORD_BITS == 0 and not mesh.empty:
    last = _if_divides(mesh, spec[-1], shape[-1])
  return _result_aval(shape, jnp.uint32, (*spec[:-1], None, last), x, *others)


def _sequential(prim, args, dims, params):
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


def _to_front(x, d, size):
  """x with its batch axis d first, or broadcast to `size` if d is None."""
  if d is None:
    return jnp.broadcast_to(x, (size, *x.shape))
  return jnp.moveaxis(x, d, 0)


# ---------------------------------------------------------------------------
# fewbit_pack: uint8 codes (..., n) -> planes (..., bits, W).

_pack_p = _jcore.Primitive("fewbit_pack")


def _pack_abstract(codes, *, bits):
  return _codes_aval(codes, bits)


_pack_p.def_abstract_eval(_pack_abstract)
_def_impl(_pack_p)


def _pack_batch(args, dims, *, bits):
  (c,), (d,) = args, dims
  return _pack_p.bind(jnp.moveaxis(c, d, 0), bits=bits), 0


batching.primitive_batchers[_pack_p] = _pack_batch
_register_lowerings(
    _pack_p, lambda params: "fewbit_pack",
    lambda c, *, bits: _codes.pack(c, bits),
    lambda params: {"bits": np.int32(params["bits"])},
    lambda ctx, *, bits: _frontend_and_rule(
        ctx, len(ctx.avals_in[0].shape) - 1, ["... n"], ["... b w"]))


# ---------------------------------------------------------------------------
# fewbit_quantize_pack: x (..., n), borders -> planes (..., bits, W).

_quantize_pack_p = _jcore.Primitive("fewbit_quantize_pack")


def _quantize_pack_abstract(x, borders, *, bits):
  return _codes_aval(x, bits, borders)


_quantize_pack_p.def_abstract_eval(_quantize_pack_abstract)
_def_impl(_quantize_pack_p)


def _quantize_pack_batch(args, dims, *, bits):
  (x, borders), (dx, db) = args, dims
  if db is not None:
    return _sequential(_quantize_pack_p, args, dims, {"bits": bits})
  return _quantize_pack_p.bind(jnp.moveaxis(x, dx, 0), borders, bits=bits), 0


batching.primitive_batchers[_quantize_pack_p] = _quantize_pack_batch
_register_lowerings(
    _quantize_pack_p, lambda params: "fewbit_quantize_pack",
    lambda x, borders, *, bits: _codes.pack(_codes.compute_codes(x, borders, bits), bits),
    lambda params: {"bits": np.int32(params["bits"])},
    lambda ctx, *, bits: _frontend_and_rule(
        ctx, len(ctx.avals_in[0].shape) - 1, ["... n", "m"], ["... b w"]))


# ---------------------------------------------------------------------------
# fewbit_unpack_scale: planes, levels (f32, exact in g's dtype), g -> levels[code] * g.

_unpack_scale_p = _jcore.Primitive("fewbit_unpack_scale")


def _unpack_scale_abstract(packed, levels, g, *, bits):
  del bits
  return _result_aval(g.shape, g.dtype, _spec(g), g, packed, levels)


def _unpack_scale_pure(packed, levels, g, *, bits):
  n = g.shape[-1] if g.ndim else 1  # a scalar's codes are those of shape (1,)
  code = _codes.unpack(packed, bits, n).reshape(g.shape)
  return _codes.lookup(levels.astype(g.dtype), code) * g


_unpack_scale_p.def_abstract_eval(_unpack_scale_abstract)
_def_impl(_unpack_scale_p)


def _unpack_scale_batch(args, dims, *, bits):
  (packed, levels, g), (dp, dl, dg) = args, dims
  if dl is not None:
    return _sequential(_unpack_scale_p, args, dims, {"bits": bits})
  size = packed.shape[dp] if dp is not None else g.shape[dg]
  return _unpack_scale_p.bind(_to_front(packed, dp, size), levels, _to_front(g, dg, size),
                              bits=bits), 0


def _unpack_scale_jvp(primals, tangents, *, bits):
  packed, levels, g = primals
  _, dlevels, dg = tangents
  out = _unpack_scale_p.bind(packed, levels, g, bits=bits)
  terms = []
  if type(dg) is not ad.Zero:
    terms.append(_unpack_scale_p.bind(packed, levels, dg, bits=bits))
  if type(dlevels) is not ad.Zero:  # rare (a learned table): plain jnp is enough
    terms.append(_unpack_scale_pure(packed, dlevels, g, bits=bits))
  if not terms:
    return out, ad.Zero.from_primal_value(out)
  return out, functools.reduce(jnp.add, terms)


def _unpack_scale_transpose(ct, packed, levels, g, *, bits):
  if ad.is_undefined_primal(levels) or ad.is_undefined_primal(packed):
    raise NotImplementedError("fewbit unpack_scale is transposed only with respect to g")
  if type(ct) is ad.Zero:
    return None, None, ad.Zero(g.aval)
  return None, None, _unpack_scale_p.bind(packed, levels, ct, bits=bits)


batching.primitive_batchers[_unpack_scale_p] = _unpack_scale_batch
ad.primitive_jvps[_unpack_scale_p] = _unpack_scale_jvp
ad.primitive_transposes[_unpack_scale_p] = _unpack_scale_transpose
_register_lowerings(
    _unpack_scale_p, lambda params: "fewbit_unpack_scale", _unpack_scale_pure,
    lambda params: {"bits": np.int32(params["bits"])},
    lambda ctx, *, bits: _frontend_and_rule(
        ctx, len(ctx.avals_in[2].shape) - 1, ["... b w", "l", "... n"], ["... m"]))


# ---------------------------------------------------------------------------
# fewbit_sketch: x (L..., B, N), keys (L..., G, 2), row0 (L..., G)
#                -> f32 (L..., G, k, N).
#
# The B rows of x are G groups of R = B / G consecutive rows; group g is
# sketched with its own key words and its rows numbered row0[g] + r. L... are
# independent problems (vmap). x keeps its (B, N) shape, with no group axis:
# the layer's matmul reads the same array, and XLA computes it once. A
# reshaped operand is a second consumer of another shape, into which XLA
# fuses (duplicates) the elementwise producer of x: a second B x N buffer, and
# the producer's intermediates kept alive for both.

_sketch_p = _jcore.Primitive("fewbit_sketch")


def _sketch_abstract(x, keys, row0, *, kind, k):
  del kind
  lead, groups = row0.shape[:-1], (row0.shape[-1] if row0.ndim else 0)
  if (groups < 1 or x.ndim != row0.ndim + 1 or x.shape[:-2] != lead
      or keys.shape != (*lead, groups, 2) or x.shape[-2] % groups):
    raise ValueError(f"fewbit_sketch: x (L..., B, N), keys (L..., G, 2) and row0 (L..., G) "
                     f"with G dividing B; got x {x.shape}, keys {keys.shape}, row0 {row0.shape}")
  # Shards of B that hold whole groups are shards of G.
  spec = _spec(x)
  g_spec = None if x.sharding.mesh.empty else _if_divides(x.sharding.mesh, spec[-2], groups)
  return _result_aval((*lead, groups, k, x.shape[-1]), jnp.float32,
                      (*spec[:-2], g_spec, None, spec[-1]), x, keys, row0)


def _dense_sketch_matrix(kind, k0, k1, rows, k):
  """S (R, k) in float32 for uint32 row numbers `rows` (the pure-JAX twin)."""
  i = rows[:, None]
  j = jnp.arange(k, dtype=jnp.uint32)[None, :]
  if kind == "gaussian":
    return _rng.gaussian(k0, k1, i, j) * jnp.float32(1.0 / math.sqrt(k))
  if kind == "rademacher":
    sign = 1.0 - 2.0 * (_rng.hash4(k0, k1, i, j) >> 31).astype(jnp.float32)
    return sign * jnp.float32(1.0 / math.sqrt(k))
  bucket = _rng.hash4(k0, k1, rows, jnp.uint32(0)) % jnp.uint32(k)
  sign = 1.0 - 2.0 * (_rng.hash4(k0, k1, rows, jnp.uint32(1)) >> 31).astype(jnp.float32)
  return jax.nn.one_hot(bucket, k, dtype=jnp.float32) * sign[:, None]


def _sketch_pure_one(x, keys, row0, *, kind, k):
  rows = row0 + jnp.arange(x.shape[0], dtype=jnp.uint32)
  xf = x.astype(jnp.float32)
  if kind == "countsketch":
    bucket = _rng.hash4(keys[0], keys[1], rows, jnp.uint32(0)) % jnp.uint32(k)
    sign = 1.0 - 2.0 * (_rng.hash4(keys[0], keys[1], rows, jnp.uint32(1)) >> 31).astype(
        jnp.float32)
    return jax.ops.segment_sum(xf * sign[:, None], bucket.astype(jnp.int32), num_segments=k)
  s = _dense_sketch_matrix(kind, keys[0], keys[1], rows, k)
  return jnp.dot(s.T, xf, precision=jax.lax.Precision.HIGHEST)


def _sketch_pure(x, keys, row0, *, kind, k):
  """The definition for groups as leading axes: x (G..., R, N) -> (G..., k, N)."""
  lead = x.shape[:-2]
  g = math.prod(lead)
  out = jax.vmap(functools.partial(_sketch_pure_one, kind=kind, k=k))(
      x.reshape(g, *x.shape[-2:]), keys.reshape(g, 2), row0.reshape(g))
  return out.reshape(*lead, k, x.shape[-1])


def _sketch_pure_rows(x, keys, row0, *, kind, k):
  """The primitive's pure-JAX lowering: groups of rows, as the kernels read them."""
  groups = row0.shape[-1]
  xg = x.reshape(*x.shape[:-2], groups, x.shape[-2] // groups, x.shape[-1])
  return _sketch_pure(xg, keys, row0, kind=kind, k=k)


_sketch_p.def_abstract_eval(_sketch_abstract)
_def_impl(_sketch_p)


def _sketch_batch(args, dims, *, kind, k):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  x, keys, row0 = (_to_front(a, d, size) for a, d in zip(args, dims))
  # The mapped axis joins the groups: x (V, L..., B, N) holds its rows group
  # after group, so the kernel reads it as one (V * ... * B, N) array. That is
  # also how a layer's matmul reads an x whose rows a caller split into
  # blocks and vmapped over: the same array, computed once (see _sketch_p).
  out = _sketch_p.bind(x.reshape(-1, x.shape[-1]), keys.reshape(-1, 2), row0.reshape(-1),
                       kind=kind, k=k)
  return out.reshape(*row0.shape, k, x.shape[-1]), 0


def _sketch_jvp(primals, tangents, *, kind, k):
  x, keys, row0 = primals
  out = _sketch_p.bind(x, keys, row0, kind=kind, k=k)
  dx = tangents[0]
  if type(dx) is ad.Zero:
    return out, ad.Zero.from_primal_value(out)
  return out, _sketch_p.bind(dx, keys, row0, kind=kind, k=k)


def _sketch_partitioning(ctx):
  """x's B rows split like the G groups: (g r) in Shardy's terms.

  A shard of x along B holds whole groups when the number of shards divides
  G, which `_sketch_groups` arranges. Shardy takes no factor of size 1 in a
  compound dimension, so G = 1 or R = 1 name B as one factor.
  """
  groups = ctx.avals_in[2].shape[-1]
  rows = ctx.avals_in[0].shape[-2] // groups
  if groups == 1:
    x_spec, sizes = "... r n", {}
  elif rows == 1:
    x_spec, sizes = "... g n", {}
  else:
    x_spec, sizes = "... (g r) n", {"r": rows}
  return _frontend_and_rule(ctx, len(ctx.avals_in[2].shape), [x_spec, "... g t", "... g"],
                            ["... g q m"], **sizes)


batching.primitive_batchers[_sketch_p] = _sketch_batch
ad.primitive_jvps[_sketch_p] = _sketch_jvp
_register_lowerings(
    _sketch_p, lambda params: f"fewbit_sketch_{params['kind']}",
    _sketch_pure_rows, lambda params: {}, lambda ctx, *, kind, k: _sketch_partitioning(ctx))

for _platform, _names in _REGISTERED.items():
  for _name in sorted(_names):
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)


# ---------------------------------------------------------------------------
# Public functions: the interface the activations and sketches call.

_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_borders(borders, bits: int) -> jax.Array:
  borders = jnp.asarray(borders, jnp.float32)
  if borders.shape != (2**bits - 1,):
    raise ValueError(f"borders must have shape ({2**bits - 1},) for bits={bits} "
                     f"(2**bits - 1 ascending values); got shape {borders.shape}")
  return borders


def _multi_device() -> bool:
  """Whether arrays may be sharded: more than one device."""
  return jax.device_count() > 1


def _words(a) -> int | None:
  """The number W of 32-element words to call a code kernel on, or None.

  An array (..., n) with n a multiple of 32 is handed to the kernels as
  (..., W, 32), so that its words are batch rows: a sharding of the last axis
  becomes one of the word axis, which XLA partitions (see the module
  docstring). None where n is not a multiple of 32, where W = 1 (the plain
  call is the same), where a type sharded over Explicit mesh axes would cut
  words (the shards of n are not multiples of 32), and on one device, where
  nothing is sharded and the plain call saves the transposes.
  """
  n = a.shape[-1] if a.ndim else 1
  if n % _codes.WORD_BITS or n <= _codes.WORD_BITS or not _multi_device():
    return None
  words = n // _codes.WORD_BITS
  return None if words % _codes._last_axis_shards(a) else words  # pylint: disable=protected-access


def _bind_codes(prim, a, *operands, bits):
  """The packed codes (..., bits, W) of a (..., n) from a code kernel.

  Through the word view of `_words` where it applies: the kernel's
  (..., W, bits, 1) result is transposed to the canonical layout. The codes
  are bits / 32 of a's elements, so the transpose is a small copy.
  """
  words = _words(a)
  if words is None:
    return prim.bind(a, *operands, bits=bits)
  lead = a.shape[:-1]
  out = prim.bind(a.reshape(*lead, words, _codes.WORD_BITS), *operands, bits=bits)
  return jnp.swapaxes(out.reshape(*lead, words, bits), -1, -2)


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs integer codes (..., n) into bit planes (..., bits, ceil(n/32)).

  The kernel where active, else `fewbit_jax.codes.pack`; the same words.

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import ext
    >>> ext.pack(jnp.array([0, 1, 2, 3], jnp.uint8), 2).tolist()
    [[10], [12]]
  """
  bits = _codes.check_bits(bits)
  codes = jnp.asarray(codes)
  if not _use_primitives() or codes.size == 0:
    return _codes.pack(codes, bits)
  c = codes.reshape(1) if codes.ndim == 0 else codes
  return _bind_codes(_pack_p, c.astype(jnp.uint8), bits=bits)


def quantize_pack(x: jax.Array, borders: jax.Array, bits: int) -> jax.Array:
  """Codes of x against `borders`, packed into bit planes (see fewbit_jax.codes).

  Args:
    x: float array of any shape; compared with the borders in float32.
    borders: the ``2**bits - 1`` ascending borders.
    bits: 1..8.

  Returns:
    uint32 array of shape ``(..., bits, ceil(n / 32))`` (a scalar counts as
    shape ``(1,)``). It carries no gradient.

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import ext
    >>> x = jnp.array([-1.0, 0.0, 0.5, 2.0])
    >>> ext.quantize_pack(x, jnp.array([-0.5, 0.25, 1.0]), 2).tolist()   # codes 0, 1, 2, 3
    [[10], [12]]
  """
  bits = _codes.check_bits(bits)
  borders = _check_borders(borders, bits)
  x = jnp.asarray(x)
  if not _use_primitives() or x.size == 0:
    return _codes.pack(_codes.compute_codes(x, borders, bits), bits)
  if x.dtype not in (*_KERNEL_DTYPES, jnp.float64):
    x = x.astype(jnp.float32)  # what compute_codes does
  x = x.reshape(1) if x.ndim == 0 else x
  return _bind_codes(_quantize_pack_p, jax.lax.stop_gradient(x), jax.lax.stop_gradient(borders),
                     bits=bits)


def unpack_scale(packed: jax.Array, levels: jax.Array, g: jax.Array, bits: int) -> jax.Array:
  """``levels[code] * g`` in g's dtype, from packed codes of g's shape.

  Args:
    packed: uint32 planes from `quantize_pack` or `pack` for an array of g's
      shape.
    levels: the ``2**bits`` levels; rounded to g's dtype before the product.
    g: the cotangent (float32, bfloat16 or float16 use the kernel).
    bits: 1..8.

  Returns:
    An array of g's shape and dtype. Linear in g (differentiable again).

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import ext
    >>> packed = jnp.array([[10], [12]], jnp.uint32)          # codes 0, 1, 2, 3
    >>> ext.unpack_scale(packed, jnp.array([0.0, 0.25, 0.5, 1.0]), jnp.full(4, 2.0), 2).tolist()
    [0.0, 0.5, 1.0, 2.0]
  """
  bits = _codes.check_bits(bits)
  g = jnp.asarray(g)
  levels = jnp.asarray(levels)
  want = _codes.packed_shape(g.shape, bits)
  if tuple(packed.shape) != want:
    raise ValueError(f"packed codes have shape {tuple(packed.shape)}; expected {want} for a "
                     f"cotangent of shape {g.shape} at bits={bits}")
  if levels.shape != (2**bits,):
    raise ValueError(f"levels must have shape ({2**bits},) for bits={bits}; got {levels.shape}")
  if not _use_primitives() or g.size == 0 or g.dtype not in _KERNEL_DTYPES:
    return _unpack_scale_pure(packed, levels, g, bits=bits)
  # Rounding to g's dtype first makes the float32 table hold exactly the
  # values the pure path multiplies by.
  lv = levels.astype(g.dtype).astype(jnp.float32)
  g1 = g.reshape(1) if g.ndim == 0 else g
  words = _words(g1)
  if words is None:
    return _unpack_scale_p.bind(packed, lv, g1, bits=bits).reshape(g.shape)
  # The word view of `_bind_codes`: codes (..., W, bits, 1), g (..., W, 32).
  lead = g.shape[:-1]
  pw = jnp.swapaxes(packed, -1, -2).reshape(*lead, words, bits, 1)
  gw = g.reshape(*lead, words, _codes.WORD_BITS)
  return _unpack_scale_p.bind(pw, lv, gw, bits=bits).reshape(g.shape)


def _sketch_groups(rows: int) -> int:
  """Number of row groups a sketch is computed in.

  Groups are the unit XLA can place on different devices: with the batch
  sharded over d devices (d dividing the device count), each device
  computes the partial sketch of its own rows, and XLA adds the partials
  (an all-reduce of a (k, N) array) instead of gathering x. On one device
  this is one group.
  """
  return math.gcd(rows, jax.device_count()) if rows else 1


def _make_sketch(kind: str):
  def sketch(x2d: jax.Array, k0, k1, k: int) -> jax.Array:
    """S^T x2d for the sketch S (B, k) of key words (k0, k1): float32 (k, N)."""
    x2d = jnp.asarray(x2d)
    if x2d.ndim != 2:
      raise ValueError(f"sketch kernel expects a 2-D (B, N) array; got shape {x2d.shape}")
    if not jnp.issubdtype(x2d.dtype, jnp.floating):
      raise TypeError(f"sketch kernel expects a float array; got {x2d.dtype}")
    k = int(k)
    if k < 1:
      raise ValueError(f"sketch size k must be >= 1; got {k}")
    b, n = x2d.shape
    if b == 0 or n == 0:
      return jnp.zeros((k, n), jnp.float32)
    groups = _sketch_groups(b)
    keys = jnp.broadcast_to(jnp.stack([jnp.asarray(k0, jnp.uint32), jnp.asarray(k1, jnp.uint32)]),
                            (groups, 2))
    row0 = jnp.arange(groups, dtype=jnp.uint32) * jnp.uint32(b // groups)
    # x2d itself, not a (groups, B / groups, N) view of it: see _sketch_p.
    xin = x2d if x2d.dtype in (*_KERNEL_DTYPES, jnp.float64) else x2d.astype(jnp.float32)
    part = _sketch_p.bind(xin, keys, row0, kind=kind, k=k)
    return part[0] if groups == 1 else jnp.sum(part, axis=0)

  sketch.__name__ = f"sketch_{kind}"
  return sketch


_SKETCHES = {kind: _make_sketch(kind) for kind in SKETCH_KINDS}


def sketch_kernel(kind: str):
  """The FFI implementation of ``S^T x`` for a sketch kind, or None.

  Where it returns a callable ``f(x2d, k0, k1, k) -> float32 (k, N)``,
  fewbit_jax.sketch uses it in place of its pure-JAX projection; it gives the
  same result up to float32 summation order (S is generated inside the kernel
  from the key and never stored). The result is float32, the accumulation
  type, whatever x2d's dtype: `fewbit_jax.sketch.project` returns float32, and
  a bfloat16 result would round the sketch to 8 bits on the way. None for
  kinds without a kernel (dct, dft), in mode 'jax', or without the extension.

  Example:
    >>> from fewbit_jax import ext
    >>> ext.sketch_kernel("dct") is None          # no kernel for the FFT sketches
    True
    >>> with ext.mode("jax"):
    ...   ext.sketch_kernel("gaussian") is None
    True
  """
  if kind not in _SKETCHES or not _use_primitives():
    return None
  return _SKETCHES[kind]
