"""Counter-based randomness shared by the pure-JAX path and the kernels.

Every random sketch in fewbit_jax is a pure function of a 64-bit key and two
integer counters (a row and a column), so that the forward pass can throw the
sketch away and the backward pass can rebuild exactly the same one, and so
that the pure-JAX path, the C++ kernels and the CUDA kernels draw the very same
numbers. ``xla_ext/codes.h`` holds the C++ twin of each function here.

Example:
  >>> import jax.numpy as jnp
  >>> from fewbit_jax import _rng as rng
  >>> int(rng.hash4(jnp.uint32(1), jnp.uint32(2), jnp.uint32(3), jnp.uint32(4)))
  2545114071
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mix32", "hash4", "key_words", "sketch_words", "uniform01", "gaussian"]


def _u32(x):
  return jnp.asarray(x, jnp.uint32)


def mix32(x: jax.Array) -> jax.Array:
  """lowbias32 integer finaliser (a bijection of uint32).

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import _rng as rng
    >>> int(rng.mix32(jnp.uint32(1)))
    1753845952
  """
  x = _u32(x)
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  x = x ^ (x >> 16)
  return x


def hash4(k0, k1, a, b) -> jax.Array:
  """Hash of a key (k0, k1) and counters (a, b) to uniform uint32 bits.

  Example:
    >>> from fewbit_jax import _rng as rng
    >>> int(rng.hash4(1, 2, 3, 4))
    2545114071
  """
  h = mix32(_u32(a) ^ _u32(k0) ^ jnp.uint32(0x9E3779B9))
  h = mix32(h ^ _u32(b) ^ jnp.uint32(0x85EBCA6B))
  return mix32(h ^ _u32(k1) ^ jnp.uint32(0xC2B2AE35))


def key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The two uint32 words of a PRNG key (typed ``jax.random.key`` or raw).

  Raises:
    TypeError: for anything that is not a single 2-word key.

  Example:
    >>> import jax
    >>> from fewbit_jax import _rng as rng
    >>> [int(w) for w in rng.key_words(jax.random.key(0))]
    [0, 0]
  """
  if jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
    data = jax.random.key_data(key)
  else:
    data = jnp.asarray(key)
  if data.shape != (2,) or data.dtype != jnp.uint32:
    raise TypeError(
        "expected one PRNG key: jax.random.key(seed) or jax.random.PRNGKey(seed) "
        f"(uint32[2]); got dtype {data.dtype} and shape {data.shape}. Split a "
        "batch of keys before calling.")
  return data[0], data[1]


def sketch_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The two words a sketch draws from: each of the key's words mixed with both.

  `hash4` XORs its first key word with the row counter, so keys that differ
  only in that word would give the same rows in another order. Mixing both
  words into each, once, before any hash or kernel reads them, makes keys
  that differ in any bit give unrelated sketches; the kernels take the mixed
  words as they are, so every path draws the same numbers.

  Raises:
    TypeError: as `key_words`.

  Example:
    >>> import jax
    >>> from fewbit_jax import _rng as rng
    >>> a = [int(w) for w in rng.sketch_words(jax.numpy.array([0, 7], "uint32"))]
    >>> b = [int(w) for w in rng.sketch_words(jax.numpy.array([1, 7], "uint32"))]
    >>> a[0] != b[0] and a[1] != b[1]
    True
  """
  k0, k1 = key_words(key)
  return hash4(k0, k1, 0, _KEY0), hash4(k1, k0, 0, _KEY1)


# Counters `b` of the two hash4 calls of sketch_words (apart from every
# per-row counter of fewbit_jax._hash, which hash the mixed words).
_KEY0, _KEY1 = 0x6B65790, 0x6B65791


def uniform01(bits: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Map uint32 bits to a float in (0, 1]: ((bits >> 8) + 1) * 2**-24.

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import _rng as rng
    >>> rng.uniform01(jnp.array([0, 0xFFFFFFFF], jnp.uint32)).tolist()
    [5.960464477539063e-08, 1.0]
  """
  return (((_u32(bits) >> 8) + 1).astype(jnp.float32) * (1.0 / 16777216.0)).astype(dtype)


def gaussian(k0, k1, a, b) -> jax.Array:
  """Standard normal draw at counters (a, b) by Box-Muller (float32).

  Uses hash4 at columns 2b and 2b + 1: z = sqrt(-2 log u1) cos(2 pi u2).

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import _rng as rng
    >>> rows, cols = jnp.arange(3, dtype=jnp.uint32)[:, None], jnp.arange(4, dtype=jnp.uint32)
    >>> rng.gaussian(1, 2, rows, cols).shape      # S[i, j] for a key (1, 2)
    (3, 4)
  """
  b = _u32(b)
  u1 = uniform01(hash4(k0, k1, a, b * 2))
  u2 = uniform01(hash4(k0, k1, a, b * 2 + 1))
  return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(jnp.float32(2.0 * 3.14159265358979) * u2)
