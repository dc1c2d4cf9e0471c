"""Randomized dense: ``x @ kernel + bias`` that keeps only a sketch of ``x``.

For ``y = x W + b`` with ``x`` of shape (..., N) and B leading positions, the
weight gradient ``dW = x^T g`` normally keeps all of ``x`` from the forward
to the backward pass. `randomized_dense` keeps ``S^T x`` (k x N) instead, for
a random sketch S (B x k, ``E[S S^T] = I``, see `fewbit_jax.sketch`) drawn
from a key, regenerates S in the backward pass and uses the unbiased estimate

    dW ~= (S^T x)^T (S^T g),

accumulated in float32. ``dx = g W^T`` and ``db`` are exact, and the forward
output is exactly that of ``flax.linen.Dense`` / ``flax.nnx.Linear``.

Sharded training: under data parallelism a sketch over all B rows sums over
the devices (an all-reduce of a (k, N) array in the forward and another in
the backward pass). With ``sketch_blocks=C`` the rows are cut into C blocks,
one per data shard, each with its own sketch of k / C columns
(`fewbit_jax.sketch.project_blocks`): S is block-diagonal, still unbiased,
and every sketch stays on its device, so the only collective left is the
usual all-reduce of the weight gradient. Under an ``AxisType.Explicit`` mesh
C is taken from x's type by default; under an ``AxisType.Auto`` mesh pass it
(or set it for a whole model with `sketch_blocks_default`). Kernels sharded
on either axis (tensor parallelism) need nothing: the sketches keep the
sharding of x's and g's feature axis (`fewbit_jax.sharded`).

Reference: Bershatsky et al., "Memory-Efficient Backpropagation through Large
Linear Layers", arXiv 2201.13195.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from fewbit_jax import rng, sharded as _sharded, sketch as _sketch

__all__ = ["randomized_dense", "projection_dim", "sketch_blocks_default", "SKETCH_NAME"]

# checkpoint_name of the kept sketch S^T x, for jax.checkpoint policies such
# as jax.checkpoint_policies.save_only_these_names(SKETCH_NAME).
SKETCH_NAME = "randomized_dense_sketch"


def _is_int(v) -> bool:
  return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)


def projection_dim(b: int, *, proj_dim_ratio=None, proj_dim=None, proj_dim_min=None,
                   proj_dim_max=None) -> int:
  """The sketch size k for B rows.

  ``k = proj_dim`` if given (it takes precedence over the ratio), else
  ``ceil(proj_dim_ratio * B)``; then clamped to ``[proj_dim_min, proj_dim_max]``
  and to ``[1, B]``.

  Raises:
    ValueError: if neither `proj_dim_ratio` nor `proj_dim` is given, the ratio
      is not in (0, 1], a size is not a positive int, or min > max.

  Example:
    >>> from fewbit_jax.dense import projection_dim
    >>> projection_dim(1000, proj_dim_ratio=0.2), projection_dim(1000, proj_dim=64)
    (200, 64)
    >>> projection_dim(1000, proj_dim_ratio=0.01, proj_dim_min=32)
    32
  """
  if proj_dim_ratio is None and proj_dim is None:
    raise ValueError("randomized dense needs a sketch size: pass proj_dim_ratio "
                     "(a fraction in (0, 1] of the B leading positions, e.g. 0.2) or "
                     "proj_dim (a number of rows >= 1).")
  if proj_dim_ratio is not None:
    ok = isinstance(proj_dim_ratio, (numbers.Real, np.floating)) and not isinstance(proj_dim_ratio, bool)
    if not ok or not 0.0 < float(proj_dim_ratio) <= 1.0:
      raise ValueError(f"proj_dim_ratio={proj_dim_ratio!r} must be a number in (0, 1]: "
                       "the fraction of the B leading positions kept, e.g. 0.2. For "
                       "a fixed size use proj_dim instead.")
  for name, v in (("proj_dim", proj_dim), ("proj_dim_min", proj_dim_min),
                  ("proj_dim_max", proj_dim_max)):
    if v is not None and (not _is_int(v) or v < 1):
      raise ValueError(f"{name}={v!r} must be an int >= 1 (a number of sketch rows), or None.")
  if proj_dim_min is not None and proj_dim_max is not None and proj_dim_min > proj_dim_max:
    raise ValueError(f"proj_dim_min={proj_dim_min} is larger than proj_dim_max="
                     f"{proj_dim_max}; pass min <= max.")
  if proj_dim is not None:
    k = int(proj_dim)
  else:
    k = math.ceil(float(proj_dim_ratio) * b)
  if proj_dim_min is not None:
    k = max(k, int(proj_dim_min))
  if proj_dim_max is not None:
    k = min(k, int(proj_dim_max))
  return max(1, min(k, b))


def _forward(x, kernel, bias, precision, preferred_element_type, out_sharding):
  # The computation of flax.linen.Dense / flax.nnx.Linear, op for op.
  kwargs = {}
  if preferred_element_type is not None:
    kwargs["preferred_element_type"] = preferred_element_type
  if out_sharding is not None:
    kwargs["out_sharding"] = out_sharding
  y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                      **kwargs)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def _after(a, dep):
  """`a` unchanged (bitwise), but computed only once `dep` is.

  XLA schedules for memory without knowing that the sketch lets x die: left
  alone it may run the projection late (keeping x alive into the backward
  pass) or beside the matmul (adding its temporaries to the peak). Making the
  small kernel operand of the matmul depend on the sketch orders the projection
  first. ``optimization_barrier`` does not survive the CPU pipeline; this
  multiply by an exact 1 that XLA cannot fold does.
  """
  if dep.size == 0:
    return a
  bits = lax.bitcast_convert_type(dep[(0,) * dep.ndim].astype(jnp.float32), jnp.uint32)
  one = (jnp.minimum(bits, jnp.uint32(0)) + 1).astype(a.dtype)
  return a * one


def _after_smaller(a, b, dep, after=_after):
  """(a, b) with the smaller of the two made to wait for `dep` by `after`.

  The multiply by 1 of `after` writes a copy of its operand, alive until the
  matmul that reads it: order through whichever matmul operand is smaller
  (the kernel for the many positions of a training batch, the activation for
  a small batch on a large layer).
  """
  if a.size < b.size:
    return after(a, dep), b
  return a, after(b, dep)


# --- block-diagonal sketches -------------------------------------------------------

_blocks_default = None  # set by sketch_blocks_default


@contextlib.contextmanager
def sketch_blocks_default(sketch_blocks):
  """Sets ``sketch_blocks`` for every randomized layer traced inside the context.

  For models whose layers (`fewbit_jax.linen.RandomizedDense`,
  `fewbit_jax.nnx.RandomizedLinear`, `randomized_dense` calls without the
  argument) should sketch per data shard under an ``AxisType.Auto`` mesh.
  An explicit ``sketch_blocks=`` argument takes precedence. Like
  ``fewbit_jax.ext.mode``, it is read when a function is traced: enter it
  around the first call of a jitted step (or its ``.lower``).

  Args:
    sketch_blocks: as the argument of `randomized_dense`: an int, mesh axis
      name(s), or None (the default rule).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax.dense import randomized_dense, sketch_blocks_default
    >>> x, w = jnp.ones((8, 4)), jnp.ones((4, 2))
    >>> f = lambda w: randomized_dense(x, w, None, jax.random.key(0), proj_dim=4).sum()
    >>> with sketch_blocks_default(2):   # two blocks of 4 rows, 2 sketch rows each
    ...   dw = jax.grad(f)(w)
    >>> dw.shape
    (4, 2)
  """
  global _blocks_default
  _check_blocks_arg(sketch_blocks)
  old = _blocks_default
  _blocks_default = sketch_blocks
  try:
    yield
  finally:
    _blocks_default = old


def _check_blocks_arg(v) -> None:
  ok = (v is None or (_is_int(v) and v >= 1) or isinstance(v, str)
        or (isinstance(v, tuple) and v and all(isinstance(a, str) for a in v)))
  if not ok:
    raise ValueError(f"sketch_blocks={v!r} must be None (the default rule), an int >= 1 (the "
                     "number of row blocks) or mesh axis name(s) such as 'data' or "
                     "('replica', 'data') (one block per shard of those axes).")


def _mesh_axis_sizes(x) -> dict:
  mesh = jax.sharding.get_abstract_mesh()
  if not getattr(mesh, "axis_names", ()):
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if mesh is None or not getattr(mesh, "axis_names", ()):
    return {}
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def _num_blocks(x, sketch_blocks) -> tuple[int, bool]:
  """(C, per_shard) for the leading positions of x; C == 0 means the plain path.

  per_shard: C was derived from a sharding, so the blocks must line up with
  the shards of x's first axis.
  """
  v = _blocks_default if sketch_blocks is None else sketch_blocks
  _check_blocks_arg(v)
  spec = _sharded.explicit_spec(x)
  if v is None:
    if spec is None:
      return (1 if _sharded._context_mesh() is not None else 0), False
    lead = spec[:-1]
    if any(e is not None for e in lead[1:]):
      raise ValueError(
          f"x is sharded on leading axes beyond the first ({jax.typeof(x)}): randomized_dense "
          "takes one sketch per shard of the first axis (the batch) only. Reshard x so that "
          "only its first and last axes are sharded, or pass sketch_blocks=1 for one sketch "
          "over all positions.")
    names = _sharded._axes(lead[0]) if lead else ()
    sizes = _mesh_axis_sizes(x)
    return math.prod(sizes[a] for a in names), bool(names)
  return _blocks_of(x, v)


def _blocks_of(x, v) -> tuple[int, bool]:
  """(C, per_shard) for a given sketch_blocks `v`: an int, or mesh axis names."""
  if _is_int(v):
    return int(v), False
  names = (v,) if isinstance(v, str) else v
  sizes = _mesh_axis_sizes(x)
  missing = [a for a in names if a not in sizes]
  if missing:
    raise ValueError(f"sketch_blocks={v!r} names mesh axes {missing} that the current mesh "
                     f"({sizes or 'none'}) lacks. Call under jax.set_mesh(mesh), or pass the "
                     "number of blocks as an int.")
  return math.prod(sizes[a] for a in names), True


def _block_layout(x, c: int, per_shard: bool, y_aval):
  """Checks that C blocks fit x; returns the explicit specs of x, its (C, R, N) view and y."""
  b = math.prod(x.shape[:-1])
  if b % c or (per_shard and x.ndim > 1 and x.shape[0] % c):
    what = (f"x's first axis ({x.shape[0]})" if per_shard else f"the B={b} leading positions")
    raise ValueError(f"sketch_blocks gives {c} blocks, which do not divide {what} of x "
                     f"{x.shape}. Use a batch size divisible by the number of data shards, or "
                     "pass sketch_blocks explicitly (an int dividing B, or 1).")
  spec = _sharded.explicit_spec(x)
  if spec is None:
    return None, None, None
  y_spec = tuple(y_aval.sharding.spec) + (None,) * (len(y_aval.shape) - len(y_aval.sharding.spec))
  return spec, (spec[0] if x.ndim > 1 else None, None, spec[-1]), y_spec


def _input_avals(g, n, kernel, bias, x_sharding=None):
  """Types of x and bias for transposing the forward at cotangent g.

  Built from g's type, so that inside ``jax.shard_map`` x's type varies over
  the same manual axes as g's (a bare ShapeDtypeStruct would not, and
  ``linear_transpose`` rejects the mismatch).
  """
  kw = {} if x_sharding is None else {"sharding": x_sharding}
  x_aval = jax.typeof(g).update(shape=g.shape[:-1] + (n,), dtype=kernel.dtype, **kw)
  b_aval = None if bias is None else jax.typeof(bias)
  return x_aval, b_aval


def _dx_db(g, n, kernel, bias, precision, pet, out_sharding, x_sharding=None):
  """(dx, db) at cotangent g: the transpose of the forward's linear map in x and bias.

  Exactly what autodiff of the plain dense layer gives; db is None without a bias.
  """
  x_aval, b_aval = _input_avals(g, n, kernel, bias, x_sharding)
  if bias is None:
    (dx,) = jax.linear_transpose(
        lambda x: _forward(x, kernel, None, precision, pet, out_sharding), x_aval)(g)
    return dx, None
  return jax.linear_transpose(
      lambda x, b: _forward(x, kernel, b, precision, pet, out_sharding), x_aval, b_aval)(g)


def _like_primal(ct, primal):
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _rdense_blocks(x, kernel, bias, keys, kb, kind, precision, pet, out_sharding, layout):
  del keys, kb, kind, layout
  return _forward(x, kernel, bias, precision, pet, out_sharding)


def _as_blocks(a, c, spec3):
  return _sharded.reshape(a, (c, math.prod(a.shape[:-1]) // c, a.shape[-1]), spec3)


def _rdense_blocks_fwd(x, kernel, bias, keys, kb, kind, precision, pet, out_sharding, layout):
  x3_spec = layout[1]
  c = keys.shape[0]
  x3 = _as_blocks(x, c, x3_spec)
  sx = _sharded.project_blocks(kind, x3, keys, kb, precision=precision).astype(x.dtype)
  y = _forward(*_after_smaller(x, kernel, sx, _sharded.after), bias, precision, pet,
               out_sharding)
  sx = jax.ad_checkpoint.checkpoint_name(sx, SKETCH_NAME)
  return y, (sx, keys, kernel, bias)


def _rdense_blocks_bwd(kb, kind, precision, pet, out_sharding, layout, res, g):
  sx, keys, kernel, bias = res
  x_spec, _, y_spec = layout
  n, _ = kernel.shape
  c = keys.shape[0]
  g3_spec = None
  mesh = _sharded.type_mesh(sx, kernel, g)
  if y_spec is not None:
    # The cotangent has y's type, whatever sharding the type of the op that
    # produced it claims (an FFI call typed as replicated, say): resharding
    # from a replicated type to y's is a local slice.
    g = jax.sharding.reshard(g, NamedSharding(mesh, P(*y_spec)))
    g3_spec = (y_spec[0], None, y_spec[-1])
  g3 = _as_blocks(g, c, g3_spec)
  sg = _sharded.project_blocks(kind, g3, keys, kb, precision=precision)
  w_in = kernel
  g, kernel = _after_smaller(g, kernel, sg, _sharded.after)
  # dx and db are the transposes of the forward's linear map, so they are
  # exactly what autodiff of the plain dense layer gives.
  x_sharding = None
  if x_spec is not None:
    x_sharding = NamedSharding(mesh, P(*x_spec))
  dx, db = _dx_db(g, n, kernel, bias, precision, pet, out_sharding, x_sharding)
  # dW = sum over blocks of (S_c^T x_c)^T (S_c^T g_c): a sum over the blocks,
  # so over the data shards: the all-reduce any data-parallel weight gradient has.
  kw = {}
  k_spec = _sharded.explicit_spec(kernel)
  if k_spec is not None:
    kw["out_sharding"] = NamedSharding(mesh, P(*k_spec))
  dw = lax.dot_general(sx.astype(jnp.float32), sg, (((0, 1), (0, 1)), ((), ())),
                       precision=precision, preferred_element_type=jnp.float32, **kw)
  return dx, _like_primal(dw.astype(kernel.dtype), w_in), _like_primal(db, bias), None


_rdense_blocks.defvjp(_rdense_blocks_fwd, _rdense_blocks_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _rdense(x, kernel, bias, kw, k, kind, precision, pet, out_sharding):
  del kw, k, kind
  return _forward(x, kernel, bias, precision, pet, out_sharding)


def _rdense_fwd(x, kernel, bias, kw, k, kind, precision, pet, out_sharding):
  sx = _sketch.project(kind, x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), kw, k,
                       precision=precision)
  sx = sx.astype(x.dtype)
  y = _forward(*_after_smaller(x, kernel, sx), bias, precision, pet, out_sharding)
  sx = jax.ad_checkpoint.checkpoint_name(sx, SKETCH_NAME)
  return y, (sx, kw, kernel, bias)


def _rdense_bwd(k, kind, precision, pet, out_sharding, res, g):
  sx, kw, kernel, bias = res
  n, m = kernel.shape
  sg = _sketch.project(kind, g.reshape(math.prod(g.shape[:-1]), m), kw, k, precision=precision)
  w_in = kernel
  g, kernel = _after_smaller(g, kernel, sg)
  # dx and db are the transposes of the forward's linear map, so they are
  # exactly what autodiff of the plain dense layer gives.
  dx, db = _dx_db(g, n, kernel, bias, precision, pet, out_sharding)
  dw = lax.dot_general(sx.astype(jnp.float32), sg, (((0,), (0,)), ((), ())),
                       precision=precision, preferred_element_type=jnp.float32)
  return dx, _like_primal(dw.astype(kernel.dtype), w_in), _like_primal(db, bias), None


_rdense.defvjp(_rdense_fwd, _rdense_bwd)


def _check_array(name, a):
  if not hasattr(a, "dtype") or not hasattr(a, "shape"):
    raise TypeError(f"{name} must be an array; got {type(a).__name__}.")
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"{name} has dtype {a.dtype}; randomized_dense needs a real floating "
                    f"dtype (float32, bfloat16, float16, float64). Cast it first, e.g. "
                    f"{name}.astype(jnp.float32).")


def randomized_dense(x, kernel, bias, key, *, proj_dim_ratio=None, proj_dim=None,
                     proj_dim_min=None, proj_dim_max=None, sketch: str = "gaussian",
                     precision=None, preferred_element_type=None, out_sharding=None,
                     sketch_blocks=None):
  """``x @ kernel + bias`` whose weight gradient is estimated from a sketch.

  The forward output is exactly ``flax.linen.Dense``'s (same ``dot_general``
  and bias add). For the backward pass only ``S^T x`` (k x N, in x's dtype)
  and the key are kept, where S (B x k) is the sketch `sketch` drawn from
  `key` and B is the number of leading positions of `x` (all axes but the
  last). Then

  * ``dW = (S^T x)^T (S^T g)``, accumulated in float32 and cast to the
    kernel's dtype; unbiased since ``E[S S^T] = I``;
  * ``dx = g W^T`` and ``db = sum(g)``: exact.

  Use a fresh key every step. Under ``jax.vmap`` each mapped example gets its
  own sketch over its own leading positions.

  Sharded inputs (see the module docstring): with C = `sketch_blocks` blocks
  the B positions are cut into C contiguous blocks of B / C rows, each
  sketched with its own key (`fewbit_jax.sketch.block_keys`) and
  ``ceil(k / C)`` columns, and ``dW = sum_c (S_c^T x_c)^T (S_c^T g_c)``. With
  x's first (batch) axis sharded over C devices each block lies on one
  device, so the sketches need no communication.

  Args:
    x: input (..., N).
    kernel: weights (N, M).
    bias: (M,) or None.
    key: a PRNG key (``jax.random.key(...)`` or a raw ``uint32[2]``).
    proj_dim_ratio: k as a fraction in (0, 1] of B: ``k = ceil(ratio * B)``.
    proj_dim: k as a number of rows; takes precedence over `proj_dim_ratio`.
    proj_dim_min: lower bound on k.
    proj_dim_max: upper bound on k. k is also clamped to [1, B].
    sketch: one of ``gaussian``, ``rademacher``, ``countsketch`` (O(B N),
      the fastest), ``dct``, ``dft``; see `fewbit_jax.sketch`.
    precision: ``lax.Precision`` of the matmuls, as in ``nn.Dense``.
    preferred_element_type: output dtype of the forward ``dot_general``, as in
      ``nnx.Linear``.
    out_sharding: sharding of the forward output, as in ``nnx.Linear``.
    sketch_blocks: how many blocks of rows get their own sketch:

      * None (default): the value set by `sketch_blocks_default` if any;
        else, when x's type is sharded over ``AxisType.Explicit`` mesh axes,
        one block per shard of its first axis; else one sketch over all B
        positions (under an ``AxisType.Auto`` mesh each device then sketches
        its rows and the partial sketches are all-reduced);
      * an int C dividing B: C blocks;
      * mesh axis name(s), e.g. ``'data'``: one block per shard of those
        axes of the current mesh (``jax.set_mesh``); x's first axis must be
        divisible by their size. Use this under ``AxisType.Auto`` meshes for
        no sketch communication.

      One block on one device is exactly the sketch without blocks.

  Returns:
    ``x @ kernel + bias``, shape (..., M). Arrays of different dtypes are
    promoted to a common one first, as flax does.

  Raises:
    ValueError: bad sketch size options, unknown `sketch`, shapes that do not
      match, or blocks that do not divide the positions.
    TypeError: non-float inputs or a key that is not one PRNG key.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax.dense import randomized_dense
    >>> x = jnp.ones((8, 16, 32))                     # B = 128 positions
    >>> w, b = jnp.ones((32, 4)), jnp.zeros(4)
    >>> def loss(w, key):
    ...   y = randomized_dense(x, w, b, key, proj_dim_ratio=0.25)
    ...   return (y ** 2).sum()
    >>> dw = jax.grad(loss)(w, jax.random.key(0))      # keeps 32 x 32, not 128 x 32
    >>> dw.shape
    (32, 4)
  """
  kind = _sketch.check_kind(sketch)
  _check_array("x", x)
  _check_array("kernel", kernel)
  if bias is not None:
    _check_array("bias", bias)
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2-D (in_features, out_features); got shape {kernel.shape}.")
  if x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(f"x's last axis must match kernel's first: x {x.shape}, kernel "
                     f"{kernel.shape}; expected x of shape (..., {kernel.shape[0]}).")
  if bias is not None and bias.shape != (kernel.shape[1],):
    raise ValueError(f"bias must have shape ({kernel.shape[1]},) to match kernel "
                     f"{kernel.shape}; got {bias.shape}. Pass None for no bias.")
  b = math.prod(x.shape[:-1])
  k = projection_dim(b, proj_dim_ratio=proj_dim_ratio, proj_dim=proj_dim,
                     proj_dim_min=proj_dim_min, proj_dim_max=proj_dim_max)
  k0, k1 = rng.key_words(key)
  dtype = jnp.result_type(*(a for a in (x, kernel, bias) if a is not None))
  x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
  bias = None if bias is None else jnp.asarray(bias, dtype)
  c, per_shard = _num_blocks(x, sketch_blocks)
  with jax.named_scope("randomized_dense"):
    if b == 0 or kernel.size == 0:  # nothing to sketch; dW is empty or zero
      return _forward(x, kernel, bias, precision, preferred_element_type, out_sharding)
    if c == 0:  # no mesh, no blocks asked for: one sketch of the (B, N) rows
      return _rdense(x, kernel, bias, jnp.stack([k0, k1]), k, kind, precision,
                     preferred_element_type, out_sharding)
    y_aval = jax.eval_shape(
        lambda x, w, b: _forward(x, w, b, precision, preferred_element_type, out_sharding),
        x, kernel, bias)
    layout = _block_layout(x, c, per_shard, y_aval)
    keys = _sketch.block_keys(jnp.stack([k0, k1]), c)
    return _rdense_blocks(x, kernel, bias, keys, -(-k // c), kind, precision,
                          preferred_element_type, out_sharding, layout)
