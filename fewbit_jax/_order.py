"""Ordering by data: an exact 1 or 0 that XLA cannot fold, read from an array.

XLA schedules for memory without knowing what a sketch is for: left alone it
may hoist a sketch's random blocks out of their loop, merge two sketches of
the same key into one buffer, run the sketch late (keeping its input alive)
or beside the matmul (adding its temporaries to the peak). Tying a value to
the data of another array, by adding a 0 or multiplying by a 1 computed from
that array's first element, orders the computation without changing a bit
(``optimization_barrier`` does not survive the CPU pipeline). The sharded
version of `after` is `fewbit_jax._sharded.after`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _zero_from(first) -> jax.Array:
  """uint32 0 computed from the scalar `first`: min(its float32 bits, 0)."""
  return jnp.minimum(lax.bitcast_convert_type(first.astype(jnp.float32), jnp.uint32),
                     jnp.uint32(0))


def zero_of(a) -> jax.Array:
  """A uint32 0 that XLA cannot tell is constant: it depends on `a`'s first element."""
  return _zero_from(a.reshape(-1)[0])


def after_body(a, dep) -> jax.Array:
  """`a` times an exact 1 that XLA cannot fold, read from dep's first element."""
  one = _zero_from(dep[(0,) * dep.ndim]) + 1
  return a * one.astype(a.dtype)


def after(a, dep) -> jax.Array:
  """`a` unchanged (bitwise), but computed only once `dep` is (`a` if dep is empty)."""
  if dep.size == 0:
    return a
  return after_body(a, dep)
