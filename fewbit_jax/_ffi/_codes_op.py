"""The code ops: `quantize_pack`, `pack` and `unpack_scale`, kernel or pure JAX.

Three primitives (``fewbit_quantize_pack``, ``fewbit_pack``,
``fewbit_unpack_scale``) and the functions that bind them where the path
rule (`fewbit_jax._ffi._path`, op ``codes``) picks the kernels, or call the
pure-JAX reference of `fewbit_jax.codes` where it picks 'jax': the same
codes and products bit for bit.

The code kernels pack along the last axis, 32 elements to a word, and the
words are independent: where its length n is a multiple of 32 (and above
32) and there is more than one device, they are called on the activation
viewed as ``(..., n / 32, 32)``, every axis but the last a batch axis, and
their ``(..., n / 32, bits, 1)`` result is transposed to the canonical
``(..., bits, n / 32)`` (and the codes back for `unpack_scale`; the codes
are bits / 32 of the activation's elements). A sharding of the last axis
over d devices with n / d a multiple of 32 is then a sharding of the word
axis, kept with no collective. Where n / d is not a multiple of 32 (in
particular where n is not), the shards would cut words, and XLA gathers the
last axis before the call (the pure-JAX path moves data between devices
there too). Codes take the sharding of their input (that of the last axis
on the word axis where the shards hold whole words, the bits axis
unsharded), `unpack_scale` that of the cotangent. Codes have zero tangents,
and `unpack_scale` is linear in the cotangent (so a gradient of a gradient
works).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad

from fewbit_jax import _mesh
from fewbit_jax import codes as _codes
from fewbit_jax._ffi import _load, _path, _prim


def _codes_aval(x, bits, *others):
  """Packed codes (..., bits, W) of x (..., n), sharded like x.

  W keeps the sharding of x's last axis where the shards hold whole 32-element
  words; the bits axis is unsharded. `others` are the other operands.
  """
  shape = _codes.packed_shape(x.shape, bits)
  spec, mesh = _mesh.padded(x.sharding.spec, x.ndim), x.sharding.mesh
  last = None
  if x.shape[-1] % _codes.WORD_BITS == 0 and not mesh.empty:
    last = _mesh.if_divides(_mesh.sizes(mesh), spec[-1], shape[-1])
  return _prim.result_aval(shape, jnp.uint32, (*spec[:-1], None, last), x, *others)


def _bits_attrs(params):
  return {"bits": np.int32(params["bits"])}


def _define(name, abstract, pure, batch, operand, in_specs, out_specs, **rules):
  """A code primitive and FFI target `name` with attribute bits.

  Its batch axes are all axes but the last of operand number `operand`;
  `in_specs` and `out_specs` are the Shardy specs of its operands and result.
  """
  return _prim.define(
      name, abstract, pure, target=lambda params: name, ffi_attrs=_bits_attrs,
      partitioning=lambda ctx, *, bits: _prim.frontend_and_rule(
          ctx, len(ctx.avals_in[operand].shape) - 1, in_specs, out_specs),
      batch=batch, **rules)


# ---------------------------------------------------------------------------
# fewbit_pack: uint8 codes (..., n) -> planes (..., bits, W).

def _pack_abstract(codes, *, bits):
  return _codes_aval(codes, bits)


def _pack_batch(args, dims, *, bits):
  (c,), (d,) = args, dims
  return _pack_p.bind(jnp.moveaxis(c, d, 0), bits=bits), 0


_pack_p = _define("fewbit_pack", _pack_abstract, lambda c, *, bits: _codes.pack(c, bits),
                  _pack_batch, 0, ["... n"], ["... b w"])


# ---------------------------------------------------------------------------
# fewbit_quantize_pack: x (..., n), borders -> planes (..., bits, W).

def _quantize_pack_abstract(x, borders, *, bits):
  return _codes_aval(x, bits, borders)


def _quantize_pack_batch(args, dims, *, bits):
  (x, borders), (dx, db) = args, dims
  if db is not None:
    return _prim.sequential(_quantize_pack_p, args, dims, {"bits": bits})
  return _quantize_pack_p.bind(jnp.moveaxis(x, dx, 0), borders, bits=bits), 0


_quantize_pack_p = _define(
    "fewbit_quantize_pack", _quantize_pack_abstract,
    lambda x, borders, *, bits: _codes.pack(_codes.compute_codes(x, borders, bits), bits),
    _quantize_pack_batch, 0, ["... n", "m"], ["... b w"])


# ---------------------------------------------------------------------------
# fewbit_unpack_scale: planes, levels (f32, exact in g's dtype), g -> levels[code] * g
# (0 where the level is 0, whatever g).

def _unpack_scale_abstract(packed, levels, g, *, bits):
  del bits
  return _prim.result_aval(g.shape, g.dtype, _mesh.padded(g.sharding.spec, g.ndim), g, packed, levels)


def _unpack_scale_pure(packed, levels, g, *, bits):
  n = g.shape[-1] if g.ndim else 1  # a scalar's codes are those of shape (1,)
  code = _codes.unpack(packed, bits, n).reshape(g.shape)
  level = _codes.lookup(levels.astype(g.dtype), code)
  # A zero level gives 0 whatever g is (inf, NaN), as jax's select-based
  # gradients (relu's) do; the kernels do the same.
  return jnp.where(level == 0, jnp.zeros((), g.dtype), level * g)


def _unpack_scale_batch(args, dims, *, bits):
  (packed, levels, g), (dp, dl, dg) = args, dims
  if dl is not None:
    return _prim.sequential(_unpack_scale_p, args, dims, {"bits": bits})
  size = packed.shape[dp] if dp is not None else g.shape[dg]
  return _unpack_scale_p.bind(_prim.to_front(packed, dp, size), levels, _prim.to_front(g, dg, size),
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


_unpack_scale_p = _define(
    "fewbit_unpack_scale", _unpack_scale_abstract, _unpack_scale_pure, _unpack_scale_batch, 2,
    ["... b w", "l", "... n"], ["... m"], jvp=_unpack_scale_jvp,
    transpose=_unpack_scale_transpose)


# ---------------------------------------------------------------------------
# The functions the activations call.

def _check_borders(borders, bits: int) -> jax.Array:
  borders = jnp.asarray(borders, jnp.float32)
  if borders.shape != (2**bits - 1,):
    raise ValueError(f"borders must have shape ({2**bits - 1},) for bits={bits} "
                     f"(2**bits - 1 ascending values); got shape {borders.shape}")
  return borders


# ---------------------------------------------------------------------------
# The plan: everything static about the codes of one array, decided once.

@dataclasses.dataclass(frozen=True)
class CodesPlan:
  """How the codes of one array are made and read: decided once, from its type.

  Made by `plan` where an op starts (an activation's entry, or each of the
  public functions below); `pack_planned`, `quantize_pack_planned` and
  `unpack_scale_planned` read it and decide nothing. Hashable, so it can be
  a ``custom_vjp``'s static argument.
  """
  bits: int  # 1..8, validated
  shape: tuple  # the array's shape (a scalar's codes are those of shape (1,))
  codes_kernel: bool  # quantize_pack / pack by the kernel (else the pure-JAX code)
  scale_kernel: bool  # unpack_scale by the kernel (the cotangent's dtype permitting)
  codes_dtype: object  # the dtype x is compared in by the kernel (x's, or float32)
  words: int | None  # the word view (`_words`) of the codes, or None
  scale_words: int | None  # that of the cotangent


def _multi_device() -> bool:
  """Whether arrays may be sharded: more than one device."""
  return jax.device_count() > 1


def _words(a, multi_device: bool) -> int | None:
  """The number W of 32-element words to call a code kernel on, or None.

  An array (..., n) with n a multiple of 32 is handed to the kernels as
  (..., W, 32), so that its words are batch rows: a sharding of the last axis
  becomes one of the word axis, which XLA partitions (see the module
  docstring). None where n is not a multiple of 32, where W = 1 (the plain
  call is the same), where a type sharded over Explicit mesh axes would cut
  words (the shards of n are not multiples of 32), and on one device, where
  nothing is sharded and the plain call saves the transposes (`multi_device`
  false).
  """
  n = a.shape[-1] if a.ndim else 1
  if n % _codes.WORD_BITS or n <= _codes.WORD_BITS or not multi_device:
    return None
  words = n // _codes.WORD_BITS
  return None if words % _mesh.last_axis_shards(a) else words


def plan(x, bits: int, *, g=None) -> CodesPlan:
  """The `CodesPlan` of the codes of `x` at `bits` (an int in 1..8, validated by the caller).

  `g` is the type of the cotangent that `unpack_scale` will scale (x's
  where left out). The path is the one `fewbit_jax._ffi._path` gives for the
  platform the array lives on (`fewbit_jax._ffi._load.platform_of`).
  """
  g = x if g is None else g
  kernel = _path.path("codes", _load.platform_of(x)) == "ffi"
  codes_kernel = kernel and x.size > 0
  scale_kernel = kernel and g.size > 0 and g.dtype in _prim.KERNEL_DTYPES
  dtype = x.dtype if x.dtype in (*_prim.KERNEL_DTYPES, jnp.float64) else jnp.dtype(jnp.float32)
  multi = (codes_kernel or scale_kernel) and _multi_device()
  return CodesPlan(
      bits=bits, shape=tuple(x.shape), codes_kernel=codes_kernel, scale_kernel=scale_kernel,
      codes_dtype=jnp.dtype(dtype), words=_words(x, multi) if codes_kernel and x.ndim else None,
      scale_words=_words(g, multi) if scale_kernel and g.ndim else None)


# XLA's batch partitioner gives every operand of a batch-partitionable call the
# sharding of the call's batch axes on its leading axes, unless the operand has
# fewer axes than there are batch axes: then it is replicated. The borders and
# levels tables are 1-D, so a kernel always sees its array operands with at
# least two batch axes (unit axes put in front, free reshapes); with one, the
# tables would be cut into shards along with the batch.
_MIN_BATCH_AXES = 2


def _lift(a, ndim: int):
  """`a` with unit axes in front: `ndim` axes in all (at least those it has)."""
  return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def _bind_lifted(prim, main, *tables, bits):
  """``prim.bind(main, *tables)`` with `main` lifted to two batch axes or more.

  `main` is the operand whose leading axes are the batch axes, `tables` the
  1-D borders or levels; the result loses the lifted axes.
  """
  ndim = max(main.ndim, _MIN_BATCH_AXES + 1)
  out = prim.bind(_lift(main, ndim), *tables, bits=bits)
  return out.reshape(out.shape[ndim - main.ndim:])


def _bind_codes(prim, a, words, *tables, bits):
  """The packed codes (..., bits, W) of a (..., n) from a code kernel.

  Through the word view of `_words` (`words`, None for none): the kernel's
  (..., W, bits, 1) result is transposed to the canonical layout. The codes
  are bits / 32 of a's elements, so the transpose is a small copy.
  """
  if words is None:
    return _bind_lifted(prim, a, *tables, bits=bits)
  lead = a.shape[:-1]
  out = _bind_lifted(prim, a.reshape(*lead, words, _codes.WORD_BITS), *tables, bits=bits)
  return jnp.swapaxes(out.reshape(*lead, words, bits), -1, -2)


def pack_planned(codes: jax.Array, p: CodesPlan) -> jax.Array:
  """`pack` by plan `p` (of an array of the codes' shape)."""
  if not p.codes_kernel:
    return _codes.pack(codes, p.bits)
  c = codes.reshape(1) if codes.ndim == 0 else codes
  return _bind_codes(_pack_p, c.astype(jnp.uint8), p.words, bits=p.bits)


def quantize_pack_planned(x: jax.Array, borders: jax.Array, p: CodesPlan) -> jax.Array:
  """`quantize_pack` by plan `p`; `borders` float32 of shape ``(2**bits - 1,)``."""
  if not p.codes_kernel:
    return _codes.pack(_codes.compute_codes(x, borders, p.bits), p.bits)
  x = x.astype(p.codes_dtype) if x.dtype != p.codes_dtype else x  # what compute_codes does
  x = x.reshape(1) if x.ndim == 0 else x
  return _bind_codes(_quantize_pack_p, jax.lax.stop_gradient(x), p.words,
                     jax.lax.stop_gradient(borders), bits=p.bits)


def unpack_scale_planned(packed: jax.Array, levels: jax.Array, g: jax.Array,
                         p: CodesPlan) -> jax.Array:
  """`unpack_scale` by plan `p`; `levels` of shape ``(2**bits,)``."""
  bits = p.bits
  if not p.scale_kernel:
    return _unpack_scale_pure(packed, levels, g, bits=bits)
  # Rounding to g's dtype first makes the float32 table hold exactly the
  # values the pure path multiplies by.
  lv = levels.astype(g.dtype).astype(jnp.float32)
  g1 = g.reshape(1) if g.ndim == 0 else g
  words = p.scale_words
  if words is None:
    return _unpack_scale_lifted(packed, lv, g1, bits).reshape(g.shape)
  # The word view of `_bind_codes`: codes (..., W, bits, 1), g (..., W, 32).
  lead = g.shape[:-1]
  pw = jnp.swapaxes(packed, -1, -2).reshape(*lead, words, bits, 1)
  gw = g.reshape(*lead, words, _codes.WORD_BITS)
  return _unpack_scale_lifted(pw, lv, gw, bits).reshape(g.shape)


def _unpack_scale_lifted(packed, levels, g, bits):
  """The kernel's unpack_scale with g as the batch operand (see `_bind_lifted`)."""
  ndim = max(g.ndim, _MIN_BATCH_AXES + 1)
  out = _unpack_scale_p.bind(_lift(packed, packed.ndim + ndim - g.ndim), levels, _lift(g, ndim),
                             bits=bits)
  return out.reshape(g.shape)


# ---------------------------------------------------------------------------
# The public functions (`fewbit_jax.ext`): each plans its own call.

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
  return pack_planned(codes, plan(codes, bits))


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
  return quantize_pack_planned(x, borders, plan(x, bits))


def unpack_scale(packed: jax.Array, levels: jax.Array, g: jax.Array, bits: int) -> jax.Array:
  """``levels[code] * g`` in g's dtype, from packed codes of g's shape.

  Args:
    packed: uint32 planes from `quantize_pack` or `pack` for an array of g's
      shape.
    levels: the ``2**bits`` levels; rounded to g's dtype before the product.
    g: the cotangent (float32, bfloat16 or float16 use the kernel).
    bits: 1..8.

  Returns:
    An array of g's shape and dtype, exactly 0 where the level is 0 (even
    for an inf or NaN g, as jax's select-based gradients give). Linear in g
    (differentiable again).

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
  return unpack_scale_planned(packed, levels, g, plan(g, bits))
