"""Mesh and PartitionSpec helpers of the primitives' result types (one place for all four ops)."""

from __future__ import annotations

import math

from jax.sharding import PartitionSpec as P


def spec(aval) -> tuple:
  """The PartitionSpec entries of an aval's type, one per axis."""
  spec = tuple(aval.sharding.spec)
  return spec + (None,) * (aval.ndim - len(spec))


def shards(mesh, entry) -> int:
  """How many shards a PartitionSpec entry cuts an axis into on `mesh`."""
  if entry is None or entry is P.UNCONSTRAINED:
    return 1
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(sizes[a] for a in names)


def if_divides(mesh, entry, size: int):
  """`entry` where its shards divide an axis of `size`, else None (unsharded)."""
  return entry if size % shards(mesh, entry) == 0 else None

