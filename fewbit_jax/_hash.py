"""The entries of the random sketches, from `fewbit_jax._rng`'s counter hash.

The one definition of every random number a sketch draws (see
`fewbit_jax.sketch` for the sketches themselves): the pure-JAX loops of
`fewbit_jax.sketch.project`, `fewbit_jax.sketch.sketch_matrix` and the pure
lowering of the FFI sketch op all call these, and ``xla_ext/codes.h`` holds
their C++ twins. Row and column numbers are uint32 counters; ``(k0, k1)`` are
the key words (`fewbit_jax._rng.key_words`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fewbit_jax import _rng as rng

# Counter `b` of hash4 behind each per-row draw.
BUCKET = 0    # countsketch: the column of row i
SIGN = 1      # countsketch, dct, dft: the sign of row i
ORDER = 2     # dct, dft: the order in which basis indices are chosen
BLOCK_K0 = 3  # the two key words of block c of a block-diagonal sketch
BLOCK_K1 = 4


def entry(kind: str, k0, k1, i, j) -> jax.Array:
  """Unscaled ``S[i, j]`` (float32) of the gaussian or rademacher sketch."""
  if kind == "gaussian":
    return rng.gaussian(k0, k1, i, j)
  return 1.0 - 2.0 * (rng.hash4(k0, k1, i, j) >> 31).astype(jnp.float32)


def bucket(k0, k1, rows, k: int) -> jax.Array:
  """countsketch: the column (uint32, in [0, k)) of the non-zero of each row."""
  return rng.hash4(k0, k1, rows, BUCKET) % jnp.uint32(k)


def sign(k0, k1, rows) -> jax.Array:
  """The random sign (float32 +-1) of each row: countsketch's value, dct/dft's signs."""
  return 1.0 - 2.0 * (rng.hash4(k0, k1, rows, SIGN) >> 31).astype(jnp.float32)


def order_bits(k0, k1, idx) -> jax.Array:
  """dct/dft: the hash that orders the basis indices `idx` (smallest chosen first)."""
  return rng.hash4(k0, k1, idx, ORDER)


def block_key_words(k0, k1, c) -> jax.Array:
  """(..., 2) key words of blocks `c` (uint32) of a block-diagonal sketch."""
  return jnp.stack([rng.hash4(k0, k1, c, BLOCK_K0), rng.hash4(k0, k1, c, BLOCK_K1)], axis=-1)


def rows_matrix(kind: str, k0, k1, rows, k: int) -> jax.Array:
  """``S[rows]`` (R, k) in float32 for uint32 row numbers `rows`, scaled by 1/sqrt(k).

  gaussian and rademacher: ``entry / sqrt(k)`` (a multiply by the float32
  reciprocal); countsketch: ``sign`` in column ``bucket``, as ``one_hot * sign``.
  """
  if kind == "countsketch":
    return jax.nn.one_hot(bucket(k0, k1, rows, k), k, dtype=jnp.float32) * sign(k0, k1, rows)[:, None]
  cols = jnp.arange(k, dtype=jnp.uint32)[None, :]
  return entry(kind, k0, k1, rows[:, None], cols) * jnp.float32(1.0 / math.sqrt(k))
