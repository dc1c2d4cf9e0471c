"""b-bit codes: computing them from inputs, and packing them into bit planes.

The layout (the same in the pure-JAX path here and in ``xla_ext/codes.h``):
codes of an array of shape ``(..., n)`` are stored as ``bits`` planes of one
bit each, 32 codes to a ``uint32`` word along the *last* axis, in an array of
shape ``(..., bits, ceil(n / 32))``. Bit ``t`` of word ``w`` of plane ``p``
is bit ``p`` of the code of element ``32 * w + t``; padding elements have code
0. So any ``bits`` costs exactly ``bits`` bits per element plus the padding of
the last axis to a multiple of 32, and the leading axes (batch, sequence) keep
their shape and so their sharding.

Scalars are packed as shape ``(1,)``.

Example:
  >>> import jax.numpy as jnp
  >>> from fewbit_jax import codes
  >>> c = jnp.array([[0, 1, 2, 3, 3]], jnp.uint8)
  >>> p = codes.pack(c, bits=2)
  >>> p.shape, p.dtype
  ((1, 2, 1), dtype('uint32'))
  >>> codes.unpack(p, bits=2, n=5)
  Array([[0, 1, 2, 3, 3]], dtype=uint8)
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fewbit_jax import _mesh

__all__ = ["WORD_BITS", "MAX_BITS", "packed_shape", "packed_nbytes", "compute_codes",
           "pack", "unpack", "check_bits", "lookup"]

WORD_BITS = 32
MAX_BITS = 8


def check_bits(bits, *, low: int = 1, high: int = MAX_BITS) -> int:
  """Validates a bit width and returns it as an int.

  Example:
    >>> from fewbit_jax import codes
    >>> codes.check_bits(3)
    3
    >>> codes.check_bits(9)
    Traceback (most recent call last):
    ...
    ValueError: bits must be in 1..8; got 9. ...
  """
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f"bits must be an int in {low}..{high}; got {bits!r} of type {type(bits).__name__}")
  if not low <= int(bits) <= high:
    raise ValueError(f"bits must be in {low}..{high}; got {bits}. Use fewer bits for more "
                     "memory saving, more bits for a more accurate gradient.")
  return int(bits)


def packed_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
  """Shape of the packed codes of an array of `shape`: (..., bits, ceil(n / 32)).

  Example:
    >>> from fewbit_jax import codes
    >>> codes.packed_shape((8, 100), 3)
    (8, 3, 4)
  """
  shape = tuple(shape) or (1,)
  n = shape[-1]
  return (*shape[:-1], bits, -(-n // WORD_BITS))


def packed_nbytes(shape: tuple[int, ...], bits: int) -> int:
  """Bytes of the packed codes of an array of `shape` (4 per word).

  Example:
    >>> from fewbit_jax import codes
    >>> codes.packed_nbytes((8, 100), 3)     # 3 bits x 128 padded elements x 8 rows / 8
    384
  """
  return 4 * int(np.prod(packed_shape(shape, bits)))


def lookup(table: jax.Array, index: jax.Array) -> jax.Array:
  """``table[index]`` for a small table and an integer index array of any sharding.

  A table lookup by an array of indices is a gather. Under a mesh with
  ``AxisType.Explicit`` axes JAX asks for the sharding of a gather's result
  when the indices are sharded: it is the index's (every element looks up
  its own entry), given here. Elsewhere this is plain indexing.

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import codes
    >>> codes.lookup(jnp.array([10.0, 20.0, 30.0]), jnp.array([2, 0])).tolist()
    [30.0, 10.0]
  """
  if _mesh.explicit_mesh(index) is not None:
    return table.at[index].get(out_sharding=jax.typeof(index).sharding)
  return table[index]


def compute_codes(x: jax.Array, borders: jax.Array, bits: int) -> jax.Array:
  """The code of each element: how many of the ascending borders are < x.

  Equal to ``jnp.searchsorted(borders, x, side="left")`` for non-NaN x (and
  to the kernels' codes), found by counting: one compare per border, all in
  one elementwise fusion. A binary search would need a table lookup per step,
  a gather that XLA does not fuse: each step's full-size index and border
  arrays then stay in memory, and at 8 bits the few-bit step held more than
  the plain activation's (73 MiB against 44 in benchmarks/bench_activations.py
  on the CPU; 11 MiB counting). The comparison is done in float32 whatever
  the dtype of x, so bf16/f16 inputs meet the same borders as f32 ones. NaN
  gets code 0.

  Args:
    x: array of any float dtype.
    borders: ``2**bits - 1`` ascending float borders.
    bits: the bit width, 1..8.

  Returns:
    uint8 array of x's shape with values in ``0 .. 2**bits - 1``.

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import codes
    >>> x = jnp.array([-1.0, 0.0, 0.5, 2.0])
    >>> codes.compute_codes(x, jnp.array([-0.5, 0.25, 1.0]), 2).tolist()
    [0, 1, 2, 3]
  """
  borders = jnp.asarray(borders, jnp.float32)
  xf = jnp.asarray(x).astype(jnp.float32)
  count = jnp.zeros(xf.shape, jnp.int32)
  for i in range((1 << bits) - 1):
    count = count + (borders[i] < xf).astype(jnp.int32)
  return count.astype(jnp.uint8)


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs integer codes of shape (..., n) into uint32 planes (..., bits, ceil(n/32)).

  Bit i of element j of a row is bit j % 32 of word j // 32 of plane i.

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import codes
    >>> codes.pack(jnp.array([0, 1, 2, 3], jnp.uint8), 2).tolist()   # planes 0b1010, 0b1100
    [[10], [12]]
  """
  codes = jnp.asarray(codes)
  if codes.ndim == 0:
    codes = codes.reshape(1)
  *lead, n = codes.shape
  words = -(-n // WORD_BITS)
  c = codes.astype(jnp.uint32)
  if words % _mesh.last_axis_shards(c):
    # Shards of the last axis that cut words (an Explicit mesh's type says
    # so): the words are packed from the whole axis.
    spec = (*jax.typeof(c).sharding.spec[:-1], None)
    c = jax.sharding.reshard(c, NamedSharding(_mesh.explicit_mesh(c), P(*spec)))
  pad = words * WORD_BITS - n
  if pad:
    c = jnp.pad(c, [(0, 0)] * len(lead) + [(0, pad)])
  c = c.reshape(*lead, 1, words, WORD_BITS)
  planes = jnp.arange(bits, dtype=jnp.uint32).reshape(bits, 1, 1)
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  bitvals = ((c >> planes) & jnp.uint32(1)) << shifts
  # Bits are disjoint, so a sum is an OR; XLA reduces it in the fusion.
  return jnp.sum(bitvals, axis=-1, dtype=jnp.uint32)


def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of `pack`: uint32 planes (..., bits, W) -> uint8 codes (..., n).

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import codes
    >>> codes.unpack(jnp.array([[10], [12]], jnp.uint32), 2, 4).tolist()
    [0, 1, 2, 3]
  """
  *lead, b, words = packed.shape
  if b != bits:
    raise ValueError(f"packed codes have {b} planes, expected bits={bits}")
  if not 0 <= n <= words * WORD_BITS or words != -(-n // WORD_BITS):
    raise ValueError(f"packed codes of {words} words cannot hold a last axis of {n}")
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  planes = jnp.arange(bits, dtype=jnp.uint32).reshape(bits, 1, 1)
  bit = (packed[..., None] >> shifts) & jnp.uint32(1)  # (..., bits, W, 32)
  code = jnp.sum(bit << planes, axis=-3, dtype=jnp.uint32)  # (..., W, 32)
  code = code.reshape(*lead, words * WORD_BITS)[..., :n]
  return code.astype(jnp.uint8)
