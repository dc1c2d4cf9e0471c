"""Block sketches of sharded arrays, computed shard by shard.

`fewbit_jax.sketch.project_blocks` takes the sketch ``S_c^T x[c]`` of every
block c of x (C, R, N). Each output block depends only on its input block,
and each output column only on the same input column, so on sharded arrays
the sketch needs no communication at all when the block axis C and the
column axis N keep their shardings. The SPMD partitioner cannot see that
through the FFI kernels (opaque custom calls), and it turns the scalars the
pure-JAX path ties its loops to into collectives. `project_blocks` here runs
the sketch on each device's own shard instead:

* under a mesh with ``AxisType.Explicit`` axes (``jax.set_mesh``), where x's
  type says how it is sharded, through ``jax.shard_map`` over those axes;
* under a mesh with ``AxisType.Auto`` axes (the context mesh, or the mesh
  an array placed by ``jax.device_put`` carries in its type inside
  ``jax.jit``), where the sharding is only known once the partitioner has
  chosen it, through
  ``jax.experimental.custom_partitioning``: its rule keeps the shardings of
  C and N and the partition callback builds the per-device sketch;
* elsewhere (no mesh, inside ``jax.vmap``, inside a ``shard_map`` body) as
  plain `fewbit_jax.sketch.project_blocks`.

If the rows R of a block are sharded too (e.g. one block under data
parallelism), each device sketches its rows of the block (the gaussian,
rademacher and countsketch sketches number rows globally, so the slices add
up to the block's sketch) and the partial sketches are summed over the
devices that share the block: one all-reduce of a (k, N) array, which is
what a sketch over rows spread across devices costs. dct and dft mix all
rows of a block, so for them sharded rows are gathered first.

All three give the same values as `fewbit_jax.sketch.project_blocks` on one
device (up to float32 summation order when rows are sharded).

`after` orders a computation after a sketch in the same way, shard by shard.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fewbit_jax import _sharded as sharded, sketch
  >>> x = jnp.ones((2, 4, 3))
  >>> keys = sketch.block_keys(jax.random.key(0), 2)
  >>> sharded.project_blocks("gaussian", x, keys, 2).shape
  (2, 2, 3)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from fewbit_jax import _order, _mesh, sketch as _sketch

__all__ = ["project_blocks", "after", "reshape", "to_blocks"]

_ROW_KINDS = ("gaussian", "rademacher", "countsketch")  # row slices of S add up


def reshape(a, shape, spec=None):
  """``a.reshape(shape)``; under an Explicit mesh with the result sharded as `spec`.

  Explicit meshes ask for the sharding of a reshape that merges or splits a
  sharded axis; `spec` gives it (entries for the new axes).

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import _sharded as sharded
    >>> sharded.reshape(jnp.ones((8, 3)), (2, 4, 3), ("data", None, None)).shape
    (2, 4, 3)
  """
  shape = tuple(int(d) for d in shape)
  mesh = _mesh.type_mesh(a)
  if spec is None or mesh is None:
    return a.reshape(shape)
  return lax.reshape(a, shape, out_sharding=NamedSharding(mesh, P(*spec)))


def to_blocks(a, n_batch: int, spec, blocks: int):
  """The (C, R, N) blocks of `a` typed on an Explicit mesh, each within one device's shard.

  `a`'s first `n_batch` axes are its positions, the others its features (N
  their product); `spec` its PartitionSpec entries. Every sharded position
  axis is split into (shards, rest): the shard factors, in order, make the
  D device blocks, the rest of the positions (in order) each block's rows, so
  that no row leaves its device whichever position axes are sharded. C =
  `blocks` must be a multiple of D: each device's rows are then cut into C / D
  contiguous blocks. Features stay sharded on their first axis (a later one
  is gathered: merged axes keep only a leading sharding).

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import _sharded as sharded
    >>> sharded.to_blocks(jnp.ones((4, 6, 3)), 2, (None, None, None), 2).shape
    (2, 12, 3)
  """
  spec = tuple(spec)
  shape = a.shape
  feat = tuple(shape[n_batch:])
  mesh = _mesh.type_mesh(a)
  if mesh is None:
    return a.reshape(blocks, -1, math.prod(feat))
  sizes = _mesh.sizes(mesh)
  fspec = spec[n_batch:]
  if any(e is not None for e in fspec[1:]):
    fspec = fspec[:1] + (None,) * (len(fspec) - 1)
    a = jax.sharding.reshard(a, NamedSharding(mesh, P(*spec[:n_batch], *fspec)))
  split, split_spec, front, rest = [], [], [], []
  for i in range(n_batch):
    s = _mesh.shards(sizes, spec[i])
    if s > 1:
      front.append(len(split))
      split += [s, shape[i] // s]
      split_spec += [spec[i], None]
      rest.append(len(split) - 1)
    else:
      rest.append(len(split))
      split.append(shape[i])
      split_spec.append(None)
  d = math.prod(split[i] for i in front)
  a = lax.reshape(a, (*split, *feat), out_sharding=NamedSharding(mesh, P(*split_spec, *fspec)))
  nf = len(split)
  perm = (*front, *rest, *range(nf, nf + len(feat)))
  if perm != tuple(range(a.ndim)):
    a = jnp.transpose(a, perm)
  c_entry = _mesh.entry(tuple(ax for i in front for ax in _mesh.axes(split_spec[i])))
  rows = math.prod(split[i] for i in rest)
  out = (blocks, rows * d // blocks, math.prod(feat))
  return lax.reshape(a, out, out_sharding=NamedSharding(
      mesh, P(c_entry, None, fspec[0] if fspec else None)))


# --- per-device body ---------------------------------------------------------------

def _local(x3, keys, *, kind, k, precision, row_axes, rows_local):
  """The block sketch of this device's shard; summed over `row_axes` if rows are split."""
  row0 = None
  if row_axes:
    row0 = (lax.axis_index(row_axes) * rows_local).astype(jnp.uint32)
  out = _sketch.project_blocks(kind, x3, keys, k, precision=precision, row0=row0)
  if row_axes:
    out = lax.psum(out, row_axes)
  return out


def _divides(mesh_shape, axes, size) -> bool:
  return size % math.prod(mesh_shape[a] for a in axes) == 0


def _plan(kind, shape, spec, mesh_shape):
  """(x3 spec, keys spec, output spec, row axes) for x3 of `shape` sharded as `spec`.

  Keeps the shardings of C and N that divide them evenly; rows stay split
  only for the kinds whose row slices add up.
  """
  spec = tuple(spec) + (None,) * (3 - len(tuple(spec)))
  c_axes, r_axes, n_axes = (_mesh.axes(e) for e in spec)
  if not _divides(mesh_shape, c_axes, shape[0]):
    c_axes = ()
  if not _divides(mesh_shape, n_axes, shape[2]):
    n_axes = ()
  if kind not in _ROW_KINDS or not _divides(mesh_shape, r_axes, shape[1]):
    r_axes = ()
  c, r, n = _mesh.entry(c_axes), _mesh.entry(r_axes), _mesh.entry(n_axes)
  return P(c, r, n), P(c, None), P(c, None, n), r_axes


# --- Auto meshes: custom_partitioning ------------------------------------------------

def _cp_body(x3, keys, kind, k, precision):
  return _sketch.project_blocks(kind, x3, keys, k, precision=precision)


_cp_project = custom_partitioning(_cp_body, static_argnums=(2, 3, 4))


def _named(sharding):
  if isinstance(sharding, NamedSharding):
    return sharding.mesh, sharding.spec
  return None, P()


def _cp_partition(kind, k, precision, mesh, arg_shapes, result_shape):
  del result_shape
  x_mesh, x_spec = _named(arg_shapes[0].sharding)
  mesh = x_mesh if x_mesh is not None else mesh
  x_spec, k_spec, out_spec, r_axes = _plan(kind, arg_shapes[0].shape, x_spec, dict(mesh.shape))
  rows_local = arg_shapes[0].shape[1] // math.prod(mesh.shape[a] for a in r_axes)
  body = functools.partial(_local, kind=kind, k=k, precision=precision, row_axes=r_axes,
                           rows_local=rows_local)
  return (mesh, body, NamedSharding(mesh, out_spec),
          (NamedSharding(mesh, x_spec), NamedSharding(mesh, k_spec)))


def _cp_infer(kind, k, precision, mesh, arg_shapes, result_shape):
  del precision, result_shape
  x_mesh, x_spec = _named(arg_shapes[0].sharding)
  mesh = x_mesh if x_mesh is not None else mesh
  return NamedSharding(mesh, _plan(kind, arg_shapes[0].shape, x_spec, dict(mesh.shape))[2])


# Factors: c (blocks) and n (columns) pass through; r (rows) is summed over,
# t (the two key words) and q (the k sketch rows) are never split. Shardy wants
# the special factors in the order they first appear: r, t, q.
_cp_project.def_partition(
    _cp_partition, infer_sharding_from_operands=_cp_infer,
    sharding_rule="c r n, c t -> c q n", reduction_factors=("r",),
    need_replication_factors=("t", "q"))


# --- dispatch ----------------------------------------------------------------------

def project_blocks(kind: str, x3d: jax.Array, keys: jax.Array, k: int, *,
                   precision=None) -> jax.Array:
  """`fewbit_jax.sketch.project_blocks`, computed on each device's shard.

  Args and result as in `fewbit_jax.sketch.project_blocks`: x3d (C, R, N),
  keys uint32 (C, 2), k columns per block; returns float32 (C, k, N), sharded
  like x3d on C and N (see the module docstring for how).

  Raises:
    ValueError: as `fewbit_jax.sketch.project_blocks`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import _sharded as sharded, sketch
    >>> keys = sketch.block_keys(jax.random.key(0), 2)
    >>> sharded.project_blocks("gaussian", jnp.ones((2, 4, 3)), keys, 2).shape
    (2, 2, 3)
  """
  _sketch.check_kind(kind)
  if x3d.ndim != 3:
    raise ValueError(f"project_blocks expects a 3-D array (C, R, N); got shape {x3d.shape}.")
  keys = jnp.asarray(keys, jnp.uint32)
  spec = _mesh.explicit_spec(x3d)
  if spec is not None and any(e is not None for e in spec):
    mesh = jax.typeof(x3d).sharding.mesh
    shape = _mesh.sizes(mesh)
    x_spec, k_spec, out_spec, r_axes = _plan(kind, x3d.shape, spec, shape)
    rows_local = x3d.shape[1] // math.prod(shape[a] for a in r_axes)
    body = functools.partial(_local, kind=kind, k=k, precision=precision, row_axes=r_axes,
                             rows_local=rows_local)
    manual = _mesh.explicit_axes(mesh)
    x3d = jax.sharding.reshard(x3d, NamedSharding(mesh, x_spec))
    keys = jax.sharding.reshard(keys, NamedSharding(mesh, k_spec))
    return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, k_spec), out_specs=out_spec,
                         axis_names=manual)(x3d, keys)
  if spec is None and _mesh.auto_mesh(x3d) is not None:
    try:
      return _cp_project(x3d, keys, kind, int(k), precision)
    except NotImplementedError:
      # custom_partitioning has no batching rule: under jax.vmap the mapped
      # example's sketch is taken as a whole, by the plain path below.
      pass
  return _sketch.project_blocks(kind, x3d, keys, k, precision=precision)


# --- ordering ------------------------------------------------------------------------

_after_body = _order.after_body
_cp_after = custom_partitioning(_after_body)


def _cp_after_partition(mesh, arg_shapes, result_shape):
  del result_shape
  a, dep = (s.sharding for s in arg_shapes)
  return mesh, _after_body, a, (a, dep)


def _cp_after_infer(mesh, arg_shapes, result_shape):
  del mesh, result_shape
  return arg_shapes[0].sharding


def _after_rule(mesh, value_types, result_types):
  """Shardy rule of `after`: a's axes pass through; dep's are read where they are."""
  del mesh, result_types
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  a, dep = (" ".join(next(letters) for _ in t.shape) or "()" for t in value_types)
  return f"{a}, {dep} -> {a}"


_cp_after.def_partition(_cp_after_partition, infer_sharding_from_operands=_cp_after_infer,
                        sharding_rule=_after_rule)


def after(a: jax.Array, dep: jax.Array) -> jax.Array:
  """`a` unchanged (bitwise), but computed only once `dep` is, with no communication.

  XLA schedules for memory without knowing that a sketch lets its input die:
  left alone it may run the sketch late (keeping the input alive into the
  backward pass) or beside the matmul (adding its temporaries to the peak).
  Multiplying the matmul's small operand by an exact 1 read from the sketch
  orders the sketch first (``optimization_barrier`` does not survive the CPU
  pipeline). On sharded arrays one element of `dep` lies on one device only,
  and XLA would send it to all; here each device reads its own shard's first
  element instead: all of them are the same 1, so `a` keeps its sharding.

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import _sharded as sharded
    >>> sharded.after(jnp.arange(3.0), jnp.ones((2, 2))).tolist()
    [0.0, 1.0, 2.0]
  """
  if dep.size == 0:
    return a
  a_spec, d_spec = _mesh.explicit_spec(a), _mesh.explicit_spec(dep)
  if a_spec is not None or d_spec is not None:
    mesh = _mesh.type_mesh(a, dep)
    manual = _mesh.explicit_axes(mesh)
    a_spec = a_spec or (None,) * a.ndim
    d_spec = d_spec or (None,) * dep.ndim
    return jax.shard_map(_after_body, mesh=mesh, in_specs=(P(*a_spec), P(*d_spec)),
                         out_specs=P(*a_spec), axis_names=manual, check_vma=False)(a, dep)
  if a.ndim and _mesh.auto_mesh(a) is not None:
    try:
      return _cp_after(a, dep)
    except NotImplementedError:  # under jax.vmap, see project_blocks
      pass
  return _after_body(a, dep)
