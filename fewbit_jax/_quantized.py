"""The ``quantized`` sketch: x kept at b bits an element by unbiased stochastic rounding.

Where the other kinds keep k rows mixed or chosen from x's B rows, this one
keeps all B rows at fewer bits, in no more residual bytes: b the most bits
an element for which the codes and one float32 scale per row fit in the
bytes of a Gaussian sketch of k rows (`bits_for`; about ``8 * itemsize * k /
B``: 6 bits for float32 x at ratio 0.2, 3 at 0.1). Row i is rounded on the grid of ``2^b`` levels
spanning ``[-s_i, s_i]``, ``s_i = max_j |x_ij|``, step ``D_i = 2 s_i / (2^b -
1)``: element x goes to the level below it or the one above with the
probabilities that make its expectation x (stochastic rounding, from a
uniform drawn by `fewbit_jax._rng.hash4` of the key, the row and the
column). So ``E[x^] = x`` elementwise, ``x^T g`` is estimated without bias
for any g, and the variance of an element is at most ``D_i^2 / 4``: far
below a k-row sketch's for the same bytes wherever b is more than a couple
of bits (measured: ``benchmarks.bench_sketch_variance``).

The codes are packed as `fewbit_jax.codes` packs an activation's; the
backward unpacks them, rebuilds x^ (B, N) float32 for the one matmul that
needs it and takes g whole, as the plain layer does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fewbit_jax import _mesh, _rng as rng
from fewbit_jax import codes as _codes

QUANTIZED_KINDS = ("quantized",)

# The low bits of hash4's counter `b` for the rounding uniforms (the column in
# the bits above): apart from _hash's BUCKET, SIGN, ORDER, BLOCK_K0/1 and
# _sampling's _DRAW.
_ROUND = 6


def bits_for(k: int, rows: int, n: int, itemsize: int) -> int:
  """The most bits an element such that `rows` rows of n elements cost no more than k rows of x.

  A k-row sketch of x (rows of n elements of `itemsize` bytes) keeps ``k n
  itemsize`` bytes; `quantize` keeps ``rows * bits`` planes of ``ceil(n /
  32)`` uint32 words and a float32 scale per row: the largest bits within
  the sketch's bytes.

  Raises:
    ValueError: fewer than one bit (ask for a larger projection), or more
      than `fewbit_jax.codes.MAX_BITS` (keep x: nothing to save).

  Example:
    >>> from fewbit_jax._quantized import bits_for
    >>> bits_for(26, 128, 512, 4), bits_for(13, 128, 512, 4), bits_for(26, 128, 512, 2)
    (6, 3, 3)
  """
  words = -(-n // _codes.WORD_BITS)
  rows = max(rows, 1)
  bits = (k * n * itemsize - 4 * rows) // (rows * words * 4)
  if bits < 1:
    raise ValueError(
        f"the quantized sketch keeps every row of x at the bits a k-row sketch's bytes "
        f"allow, and k={k} of B={rows} rows of {n} elements leaves less than one: ask for a "
        f"larger projection (proj_dim_ratio >= about {1 / (8 * itemsize):.3g}) or use another "
        "sketch kind.")
  if bits > _codes.MAX_BITS:
    raise ValueError(
        f"the quantized sketch would keep {bits} bits an element (k={k} of B={rows} rows of "
        f"{8 * itemsize}-bit x), more than {_codes.MAX_BITS}: at that ratio keeping x costs "
        "about as much; ask for a smaller projection or use another sketch kind.")
  return int(bits)


def quantize(x2d, k0, k1, bits: int):
  """(packed codes uint32 (..., B, bits, ceil(N / 32)), scales float32 (..., B)) of x2d (..., B, N).

  `k0`, `k1`: the key words, scalars or broadcastable to x2d (one pair per block).
  """
  x = x2d.astype(jnp.float32)
  levels = (1 << bits) - 1
  s = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  step = jnp.where(s > 0, 2.0 * s / levels, 1.0)
  rows = jax.lax.broadcasted_iota(jnp.uint32, x.shape, x.ndim - 2)
  cols = jax.lax.broadcasted_iota(jnp.uint32, x.shape, x.ndim - 1)
  u = 1.0 - rng.uniform01(rng.hash4(k0, k1, rows, cols * jnp.uint32(8) + jnp.uint32(_ROUND)))
  # u in [0, 1): the code is the level below y or the one above, with
  # probability its distance to the one below (E[code] = y).
  y = (x + s) / step
  code = jnp.clip(jnp.floor(y + u), 0, levels).astype(jnp.uint32)
  # The one-pass packing's variadic reduction cannot be partitioned across
  # devices (XLA: "Unsupported reduction computation"): codes.pack's, one
  # reduction a plane, where a mesh is in play.
  on_mesh = _mesh.type_mesh(x2d) is not None or _mesh.auto_mesh(x2d) is not None
  return (_codes.pack if on_mesh else _pack)(code, bits), s[..., 0]


def _pack(code, bits: int):
  """`fewbit_jax.codes.pack`'s words, every plane from one variadic reduction.

  `codes.pack` reduces each plane on its own, and XLA fuses the codes'
  computation (here the rounding's hash) into each: bits times over. One
  reduction with an output per plane computes each code once (3x faster for
  6 bits on the CPU).
  """
  *lead, n = code.shape
  words = -(-n // _codes.WORD_BITS)
  pad = words * _codes.WORD_BITS - n
  if pad:
    code = jnp.pad(code, [(0, 0)] * len(lead) + [(0, pad)])
  c = code.reshape(*lead, words, _codes.WORD_BITS)
  shifts = jnp.arange(_codes.WORD_BITS, dtype=jnp.uint32)
  planes = [((c >> jnp.uint32(p)) & jnp.uint32(1)) << shifts for p in range(bits)]
  out = jax.lax.reduce(planes, [jnp.uint32(0)] * bits,
                       lambda a, b: tuple(u | v for u, v in zip(a, b)), (len(lead) + 1,))
  return jnp.stack(out, axis=-2)


def dequantize(packed, scale, bits: int, n: int):
  """x^ float32 (..., N) from `quantize`'s codes and scales: code * step - s."""
  levels = (1 << bits) - 1
  s = scale[..., None]
  step = jnp.where(s > 0, 2.0 * s / levels, 1.0)
  code = _codes.unpack(packed, bits, n).astype(jnp.float32)
  return jnp.where(s > 0, code * step - s, 0.0)


def quantize_blocks(x3d, words, bits: int):
  """`quantize` of every block (C, R, N), block c with its words (C, 2).

  Elementwise in the blocks (their key words broadcast over their rows), so
  blocks sharded over devices are rounded where they lie.
  """
  return quantize(x3d, words[:, 0, None, None], words[:, 1, None, None], bits)


# Elements (float32) of the x^ block `xt_g` rebuilds per loop step: 4 MiB.
_BLOCK_ELEMS = 1 << 20


def xt_g(packed, scale, bits: int, n: int, g, precision=None):
  """x^T g (N, M) float32 from `quantize`'s codes of x (B rows) and g (B, M), a block of rows at a time.

  x^ is rebuilt `_BLOCK_ELEMS` elements at a time, so the backward never
  holds it whole (it is the size of x).
  """
  b = packed.shape[0]
  rows = max(1, min(b, _BLOCK_ELEMS // max(n, 1)))
  full, tail = divmod(b, rows)
  g = g.astype(jnp.float32)

  def part(start, size):
    p = jax.lax.dynamic_slice_in_dim(packed, start, size, 0)
    s = jax.lax.dynamic_slice_in_dim(scale, start, size, 0)
    gb = jax.lax.dynamic_slice_in_dim(g, start, size, 0)
    return jax.lax.dot_general(dequantize(p, s, bits, n), gb, (((0,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)

  acc = jnp.zeros((n, g.shape[1]), jnp.float32)
  if full:
    acc = jax.lax.fori_loop(0, full, lambda i, acc: acc + part(i * rows, rows), acc)
  if tail:
    acc = acc + part(full * rows, tail)
  return acc
