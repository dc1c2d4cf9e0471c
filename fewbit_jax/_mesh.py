"""Mesh and PartitionSpec helpers shared by the sketches, the layers and the codes.

Reading shardings from types: which mesh an array's type is on, its
PartitionSpec entries over the ``AxisType.Explicit`` axes, how many shards an
entry cuts an axis into, and the mesh of the current ``jax.set_mesh``.
"""

from __future__ import annotations

import math

import jax
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P


def axes(entry) -> tuple[str, ...]:
  """Mesh axis names of one PartitionSpec entry."""
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def entry(names: tuple[str, ...]):
  """The PartitionSpec entry of mesh axis `names` (None for none)."""
  return None if not names else names[0] if len(names) == 1 else names


def padded(spec, ndim: int) -> tuple:
  """The entries of PartitionSpec `spec`, one per axis of an `ndim`-D array."""
  spec = tuple(spec)
  return spec + (None,) * (ndim - len(spec))


def sizes(mesh) -> dict:
  """{axis name: size} of `mesh`."""
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def shards(axis_sizes: dict, entry_) -> int:
  """Into how many shards a PartitionSpec entry cuts an axis, for mesh `axis_sizes`."""
  return math.prod(axis_sizes[a] for a in axes(entry_))


def if_divides(axis_sizes: dict, entry_, size: int):
  """`entry_` where its shards divide an axis of `size`, else None (unsharded)."""
  return entry_ if size % shards(axis_sizes, entry_) == 0 else None


def explicit_axes(mesh) -> set:
  """Names of the ``AxisType.Explicit`` axes of `mesh`."""
  return {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}


def explicit_spec(a) -> tuple | None:
  """The PartitionSpec entries of `a`'s type over its Explicit mesh axes, or None.

  None when `a`'s type carries no Explicit axis (no mesh, or an Auto one).
  """
  sharding = getattr(jax.typeof(a), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not getattr(mesh, "axis_names", ()):
    return None
  explicit = explicit_axes(mesh)
  if not explicit:
    return None
  return tuple(entry(tuple(n for n in axes(e) if n in explicit))
               for e in padded(sharding.spec, a.ndim))


def explicit_mesh(a):
  """The mesh of a's type where it has ``AxisType.Explicit`` axes, else None."""
  mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
  return mesh if AxisType.Explicit in getattr(mesh, "axis_types", ()) else None


def type_mesh(*arrays):
  """The (abstract) mesh of the first of `arrays` whose type has Explicit axes, or None."""
  for a in arrays:
    if a is not None and explicit_spec(a) is not None:
      return jax.typeof(a).sharding.mesh
  return None


def context_mesh():
  """The mesh of the current ``jax.set_mesh``, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh if getattr(mesh, "axis_names", ()) else None


def auto_mesh(a=None):
  """The mesh, all of whose axes are ``AxisType.Auto``, that `a` is partitioned over, or None.

  The context mesh (``jax.set_mesh``) where there is one, else the mesh of
  `a`'s type: an array placed with a ``NamedSharding`` on a mesh built by
  ``jax.sharding.Mesh(devices, names)`` or ``jax.make_mesh(...,
  axis_types=(AxisType.Auto, ...))`` carries that mesh in its type inside
  ``jax.jit`` (with every spec entry None: Auto shardings are the
  partitioner's to choose). None where the mesh has an Explicit or Manual
  axis, or there is none.
  """
  mesh = context_mesh()
  if mesh is None and a is not None:
    mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
  if mesh is None or not getattr(mesh, "axis_names", ()):
    return None
  return mesh if all(t == AxisType.Auto for t in mesh.axis_types) else None


def mesh_axis_sizes(x) -> dict:
  """{axis name: size} of the context mesh, else of x's type's mesh ({} if none)."""
  mesh = context_mesh()
  if mesh is None:
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if mesh is None or not getattr(mesh, "axis_names", ()):
    return {}
  return sizes(mesh)


def last_axis_shards(a) -> int:
  """Into how many shards a's type cuts its last axis over Explicit mesh axes (1 if none)."""
  spec = explicit_spec(a)
  if spec is None or not a.ndim:
    return 1
  return shards(sizes(jax.typeof(a).sharding.mesh), spec[-1])


def like_primal(ct, primal):
  """`ct` summed over the manual axes it varies over and `primal` does not.

  Inside ``jax.shard_map`` a weight the same on every device (invariant) has
  per-device products with varying inputs; autodiff of the plain layer sums
  their gradients over those axes (the transpose of the implicit ``pvary``),
  and a custom_vjp must return a cotangent of the primal's type.
  """
  if primal is None:
    return ct
  extra = jax.typeof(ct).mat.varying - jax.typeof(primal).mat.varying
  return lax.psum(ct, tuple(sorted(extra))) if extra else ct
