"""The sketch op: ``S^T x`` of the kinds with a kernel, kernel or pure JAX.

The primitive ``fewbit_sketch`` and `sketch_kernel`, which returns a function
binding it where the path rule (`fewbit_jax._ffi._path`, op
``sketch_<kind>``) picks the kernel. The sketch entries, with
(k0, k1) = rng.sketch_words(key), for row i (flattened leading positions of x)
and column j < k:

  gaussian     rng.gaussian(k0, k1, i, j) * float32(1 / sqrt(k))
  rademacher   (1 - 2 * (hash4(k0, k1, i, j) >> 31)) * float32(1 / sqrt(k))
  countsketch  S[i, hash4(k0, k1, i, 0) % k] = 1 - 2 * (hash4(k0, k1, i, 1) >> 31)

`fewbit_jax._hash` is their one pure-JAX definition (the kernels' twin). The result of the primitive is
typed with the sharding of x's leading axes, its groups (where the shards
of x's rows hold whole groups) and columns; inside ``jax.shard_map`` it
varies over the manual axes any operand varies over.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.interpreters import ad

from fewbit_jax import _hash
from fewbit_jax._ffi import _path, _prim
from fewbit_jax import _mesh

SKETCH_KINDS = ("gaussian", "rademacher", "countsketch")

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

def _sketch_abstract(x, keys, row0, *, kind, k):
  del kind
  lead, groups = row0.shape[:-1], (row0.shape[-1] if row0.ndim else 0)
  if (groups < 1 or x.ndim != row0.ndim + 1 or x.shape[:-2] != lead
      or keys.shape != (*lead, groups, 2) or x.shape[-2] % groups):
    raise ValueError(f"fewbit_sketch: x (L..., B, N), keys (L..., G, 2) and row0 (L..., G) "
                     f"with G dividing B; got x {x.shape}, keys {keys.shape}, row0 {row0.shape}")
  # Shards of B that hold whole groups are shards of G.
  spec = _mesh.padded(x.sharding.spec, x.ndim)
  g_spec = None if x.sharding.mesh.empty else _mesh.if_divides(_mesh.sizes(x.sharding.mesh), spec[-2], groups)
  return _prim.result_aval((*lead, groups, k, x.shape[-1]), jnp.float32,
                           (*spec[:-2], g_spec, None, spec[-1]), x, keys, row0)


def _sketch_pure_one(x, keys, row0, *, kind, k):
  rows = row0 + jnp.arange(x.shape[0], dtype=jnp.uint32)
  xf = x.astype(jnp.float32)
  if kind == "countsketch":
    bucket, sign = _hash.bucket(keys[0], keys[1], rows, k), _hash.sign(keys[0], keys[1], rows)
    return jax.ops.segment_sum(xf * sign[:, None], bucket.astype(jnp.int32), num_segments=k)
  s = _hash.rows_matrix(kind, keys[0], keys[1], rows, k)
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


def _sketch_batch(args, dims, *, kind, k):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  x, keys, row0 = (_prim.to_front(a, d, size) for a, d in zip(args, dims))
  if size == 0:  # no problems to sketch: the kernel's groups would be empty
    return jnp.zeros((*row0.shape, k, x.shape[-1]), jnp.float32), 0
  # The mapped axis joins the groups: x (V, L..., B, N) holds its rows group
  # after group, so the kernel reads it as one (V * ... * B, N) array. That is
  # also how a layer's matmul reads an x whose rows a caller split into
  # blocks and vmapped over: the same array, computed once (see fewbit_sketch above).
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
  return _prim.frontend_and_rule(ctx, len(ctx.avals_in[2].shape), [x_spec, "... g t", "... g"],
                            ["... g q m"], **sizes)


_sketch_p = _prim.define(
    "fewbit_sketch", _sketch_abstract, _sketch_pure_rows,
    target=lambda params: f"fewbit_sketch_{params['kind']}", ffi_attrs=lambda params: {},
    partitioning=lambda ctx, *, kind, k: _sketch_partitioning(ctx), batch=_sketch_batch,
    jvp=_sketch_jvp)


# ---------------------------------------------------------------------------
# The function fewbit_jax.sketch calls.

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
    # x2d itself, not a (groups, B / groups, N) view of it: see fewbit_sketch above.
    xin = x2d if x2d.dtype in (*_prim.KERNEL_DTYPES, jnp.float64) else x2d.astype(jnp.float32)
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
  kinds without a kernel (dct, dft), where the path rule picks the pure-JAX
  path for the kind (mode 'jax', or the default on this platform: see
  `fewbit_jax.ext.active_path`), or without the extension.

  Example:
    >>> from fewbit_jax import ext
    >>> ext.sketch_kernel("dct") is None          # no kernel for the FFT sketches
    True
    >>> with ext.mode("jax"):
    ...   ext.sketch_kernel("gaussian") is None
    True
  """
  if kind not in _SKETCHES or _path.path(f"sketch_{kind}") == "jax":
    return None
  return _SKETCHES[kind]
