"""The randomized projection: one custom_vjp behind every randomized layer.

`fewbit_jax.dense.randomized_dense`, `fewbit_jax.dense_general.randomized_dot_general`
and `randomized_einsum` are all ``y = x2d @ W2d (+ bias)`` once x's axes are
grouped into B positions (its batch axes) and N features (its contracted
axes) and the kernel's into N and M (its feature axes). `Spec` says, for one
call, how: the op that computes y, the axes, the sketch and its blocks. One
planner, `plan`, makes it at the layer's entry (every layer goes through
`randomized`), and the core (`project`) only reads it. The core keeps
``S^T x2d`` for the weight gradient ``(S^T x2d)^T (S^T g2d)``; ``dx`` and
``db`` are the exact transposes of the forward.

Blocks (`resolve_blocks`): C == 0 is one sketch of all B rows
(`fewbit_jax.sketch.project`); C >= 1 cuts the rows into C blocks, each with
its own sketch, computed shard by shard (`fewbit_jax.sharded.project_blocks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.interpreters import ad as _ad, partial_eval as _pe
from jax.sharding import NamedSharding, PartitionSpec as P

from fewbit_jax import _order, _mesh, _quantized, _rng as rng, _sharded, sketch as _sketch

# checkpoint_name of the kept sketch S^T x, for jax.checkpoint policies such
# as jax.checkpoint_policies.save_only_these_names(SKETCH_NAME).
SKETCH_NAME = "randomized_dense_sketch"


def is_int(v) -> bool:
  return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)


def check_array(name, a):
  """TypeError unless `a` is an array of a real floating dtype."""
  if not hasattr(a, "dtype") or not hasattr(a, "shape"):
    raise TypeError(f"{name} must be an array; got {type(a).__name__}.")
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"{name} has dtype {a.dtype}; randomized_dense needs a real floating "
                    f"dtype (float32, bfloat16, float16, float64). Cast it first, e.g. "
                    f"{name}.astype(jnp.float32).")


def dense_dims(ndim: int):
  """dot_general dimension numbers of ``x @ kernel`` for an `ndim`-D x."""
  return (((ndim - 1,), (0,)), ((), ()))


def _forward(op, arg, x, kernel, bias, precision, pet, out_sharding):
  kwargs = {}
  if pet is not None:
    kwargs["preferred_element_type"] = pet
  if out_sharding is not None:
    kwargs["out_sharding"] = out_sharding
  if op == "einsum":
    y = jnp.einsum(arg, x, kernel, precision=precision, **kwargs)
  else:
    y = lax.dot_general(x, kernel, arg, precision=precision, **kwargs)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def dense_forward(x, kernel, bias, precision, preferred_element_type, out_sharding):
  """The computation of flax.linen.Dense / flax.nnx.Linear, op for op."""
  return _forward("dot_general", dense_dims(x.ndim), x, kernel, bias, precision,
                  preferred_element_type, out_sharding)


# --- the sketch blocks ---------------------------------------------------------------

_blocks_default = None  # set by blocks_default


def check_blocks_arg(v) -> None:
  """ValueError unless `v` is a valid ``sketch_blocks`` argument."""
  ok = (v is None or (is_int(v) and v >= 1) or isinstance(v, str)
        or (isinstance(v, tuple) and v and all(isinstance(a, str) for a in v)))
  if not ok:
    raise ValueError(f"sketch_blocks={v!r} must be None (the default rule), an int >= 1 (the "
                     "number of row blocks) or mesh axis name(s) such as 'data' or "
                     "('replica', 'data') (one block per shard of those axes).")


@contextlib.contextmanager
def blocks_default(sketch_blocks):
  """The body of `fewbit_jax.dense.sketch_blocks_default`."""
  global _blocks_default
  check_blocks_arg(sketch_blocks)
  old = _blocks_default
  _blocks_default = sketch_blocks
  try:
    yield
  finally:
    _blocks_default = old


def device_blocks(x, batch_axes) -> int:
  """How many shards x's type cuts its `batch_axes` into over Explicit mesh axes (1 if none)."""
  spec = _mesh.explicit_spec(x)
  if spec is None:
    return 1
  sizes = _mesh.sizes(jax.typeof(x).sharding.mesh)
  return math.prod(_mesh.shards(sizes, spec[a]) for a in batch_axes)


def auto_blocks(x, batch_axes, mesh) -> int:
  """The default blocks of x's B positions on an all-``AxisType.Auto`` `mesh`: gcd(devices, x.shape[0]).

  An Auto mesh's type says nothing of how x is sharded (the partitioner
  chooses later), but a data-parallel batch is cut along x's first axis into
  D shards, D a divisor of the mesh's device count: with C = gcd(devices,
  x.shape[0]) contiguous blocks, a multiple of D, every block lies within
  one device's shard, so the sketches need no communication whatever data
  axes (or none) the batch is sharded over; a replicated x is C blocks on
  every device, as cheap as one sketch. 1 where x's batch axes are not its
  leading ones (the blocks would not follow the first axis).
  """
  if not batch_axes or tuple(batch_axes) != tuple(range(len(batch_axes))):
    return 1
  return math.gcd(math.prod(mesh.axis_sizes), x.shape[0])


def resolve_blocks(x, sketch_blocks, batch_axes) -> tuple[int, bool]:
  """(C, per_shard): the sketch blocks of x's B positions (its `batch_axes`); C == 0: one sketch.

  per_shard: C was derived from a sharding, so the blocks must line up with
  the shards of x's first axis. An explicit `sketch_blocks` (or the
  `blocks_default`) is an int C or mesh axis names. None is: for x typed on
  an Explicit mesh, one block per device's shard of the batch axes
  (whichever of them are sharded, see `fewbit_jax.sharded.to_blocks`); on a
  mesh of Auto axes (the context mesh or x's type's), `auto_blocks` blocks
  along x's first axis; under any other mesh one sketch of all positions,
  each device sketching its own rows (`fewbit_jax.sharded`); without a mesh
  one sketch.
  """
  v = _blocks_default if sketch_blocks is None else sketch_blocks
  check_blocks_arg(v)
  if v is None:
    if _mesh.explicit_spec(x) is not None:
      return device_blocks(x, batch_axes), True
    mesh = _mesh.auto_mesh(x)
    if mesh is not None:
      c = auto_blocks(x, batch_axes, mesh)
      if c > 1:
        return c, True
    return (1 if _mesh.context_mesh() is not None else 0), False
  if is_int(v):
    return int(v), False
  names = (v,) if isinstance(v, str) else v
  sizes = _mesh.mesh_axis_sizes(x)
  missing = [a for a in names if a not in sizes]
  if missing:
    raise ValueError(f"sketch_blocks={v!r} names mesh axes {missing} that the current mesh "
                     f"({sizes or 'none'}) lacks. Call under jax.set_mesh(mesh), or pass the "
                     "number of blocks as an int.")
  return math.prod(sizes[a] for a in names), True


def check_blocks_fit(x, c: int, per_shard: bool, batch_axes: tuple[int, ...]) -> None:
  """ValueError unless C blocks cut x's B positions (its `batch_axes`) evenly."""
  n = len(batch_axes)
  b = math.prod(x.shape[a] for a in batch_axes)
  if _mesh.explicit_spec(x) is not None:
    # Explicit types: blocks follow the devices' shards (`sharded.to_blocks`).
    d = device_blocks(x, batch_axes)
    if c % d or (b // d) % (c // d):
      raise ValueError(f"sketch_blocks gives {c} blocks for x typed on an Explicit mesh "
                       f"({jax.typeof(x)}), whose batch axes are cut into {d} shards: the "
                       f"blocks must split each shard's {b // d} positions evenly (C a "
                       f"multiple of {d} dividing {b}). Leave sketch_blocks=None: one block "
                       "per shard.")
    return
  if c > 1 and tuple(batch_axes) != tuple(range(n)):
    raise ValueError(f"sketch_blocks gives {c} blocks: the blocks cut the positions along x's "
                     f"leading axes, but this projection's batch axes are x's axes "
                     f"{tuple(batch_axes)} of {x.shape}. Use sketch_blocks=1 (one sketch) for it.")
  if b % c or (per_shard and x.ndim > 1 and x.shape[0] % c):
    what = (f"x's first axis ({x.shape[0]})" if per_shard else f"the B={b} leading positions")
    raise ValueError(f"sketch_blocks gives {c} blocks, which do not divide {what} of x "
                     f"{x.shape}. Use a batch size divisible by the number of data shards, or "
                     "pass sketch_blocks explicitly (an int dividing B, or 1).")


# --- the core ------------------------------------------------------------------------

def n_batch(x_perm, g_perm, k_perm) -> int:
  """How many of x's axes are batch axes (the first ones of `x_perm`)."""
  # x_perm = batch + contracted, k_perm = contracted + features and
  # g_perm = batch + features, so len(x) + len(k) - len(g) = 2 * contracted.
  return len(x_perm) - (len(x_perm) + len(k_perm) - len(g_perm)) // 2


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything static about one projection: the op and how to flatten it."""
  op: str  # 'dot_general' or 'einsum'
  arg: Any  # dimension numbers, or the einsum subscripts
  precision: Any
  preferred_element_type: Any
  out_sharding: Any
  x_perm: tuple[int, ...]  # x's batch axes, then its contracted axes
  g_perm: tuple[int, ...]  # the output's batch axes (same order), then feature axes
  k_perm: tuple[int, ...]  # the kernel's contracted axes (same order), then feature axes
  k: int = 0  # sketch columns (per block with blocks)
  kind: str = "gaussian"
  blocks: int = 0  # 0: one sketch of all B rows; C: C blocks, each its own sketch
  # With blocks of x typed on an Explicit mesh (`block_layout`): the specs of
  # x and of the cotangent g, each with its axes in x_perm / g_perm order;
  # None for x of no Explicit mesh.
  layout: tuple | None = None
  # Nothing to sketch: zero positions or a zero-size kernel (dW is empty or
  # zero), or a forward-mode / transpose trace (`_exact_trace`): the plain layer.
  plain: bool = False
  # The quantized kind's bits an element of x (`fewbit_jax._quantized.bits_for`); else 0.
  bits: int = 0

  @property
  def n_batch(self) -> int:
    return n_batch(self.x_perm, self.g_perm, self.k_perm)

  def forward(self, x, kernel, bias=None):
    return _forward(self.op, self.arg, x, kernel, bias, self.precision,
                    self.preferred_element_type, self.out_sharding)

  def x_shape(self, g_shape, k_shape) -> tuple[int, ...]:
    """x's shape, from the output's (batch axes) and the kernel's (contracted axes)."""
    n = self.n_batch
    sizes = ([g_shape[a] for a in self.g_perm[:n]]
             + [k_shape[a] for a in self.k_perm[:len(self.x_perm) - n]])
    shape = [0] * len(self.x_perm)
    for a, s in zip(self.x_perm, sizes):
      shape[a] = s
    return tuple(shape)


def _flatten(spec, a, perm, pspec):
  """(B, N) rows of `a` (axes `perm`, batch first); (C, B / C, N) with blocks.

  `pspec`: a's Explicit spec in `perm` order (blocks on an Explicit mesh),
  or None.
  """
  a = jnp.transpose(a, perm) if perm != tuple(range(a.ndim)) else a
  b = math.prod(a.shape[:spec.n_batch])
  if not spec.blocks:
    return a.reshape(b, -1)
  if pspec is not None:
    return _sharded.to_blocks(a, spec.n_batch, pspec, spec.blocks)
  return a.reshape(spec.blocks, b // spec.blocks, -1)


def _sketch_of(spec, a, keys):
  """S^T a: (k, N), or (C, k, N) for C blocks of rows.

  A sampled kind (`fewbit_jax.sketch.SAMPLED_KINDS`) gives (rows, their
  indices): its S depends on a, so the backward takes the same rows of g.
  """
  if spec.kind in _sketch.SAMPLED_KINDS:
    sample = _sketch.sample_rows_blocks if spec.blocks else _sketch.sample_rows
    return sample(spec.kind, a, keys, spec.k)
  if spec.kind in _sketch.QUANTIZED_KINDS:  # (codes, scales) of every row
    return _sketch.quantize_rows(a, keys, spec.bits)
  if not spec.blocks:
    return _sketch.project(spec.kind, a, keys, spec.k, precision=spec.precision)
  return _sharded.project_blocks(spec.kind, a, keys, spec.k, precision=spec.precision)


def _after_smaller(spec, a, b, dep):
  """(a, b) with the smaller of the two made to wait for `dep`.

  The multiply by 1 of `after` writes a copy of its operand, alive until the
  matmul that reads it: order through whichever matmul operand is smaller
  (the kernel for the many positions of a training batch, the activation for
  a small batch on a large layer). Blocks may lie on different devices: each
  reads its own shard's 1.
  """
  after = _sharded.after if spec.blocks else _order.after
  if a.size < b.size:
    return after(a, dep), b
  return a, after(b, dep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _project(x, kernel, bias, keys, spec):
  del keys
  return spec.forward(x, kernel, bias)


def _project_fwd(x, kernel, bias, keys, spec):
  x_pspec = None if spec.layout is None else spec.layout[0]
  sx = _sketch_of(spec, _flatten(spec, x, spec.x_perm, x_pspec), keys)
  if spec.kind in _sketch.SAMPLED_KINDS + _sketch.QUANTIZED_KINDS:
    # sampled: the rows' indices, not the keys, find g's rows; quantized:
    # the rows' scales (the codes in sx)
    sx, keys = sx
    keys = jax.ad_checkpoint.checkpoint_name(keys, SKETCH_NAME)
  quantized = spec.kind in _sketch.QUANTIZED_KINDS
  if not quantized:
    sx = sx.astype(x.dtype)
  # (the quantized kind orders by its scales, shaped as x's rows: its words
  # may split a sharded feature axis in a way a partitioner cannot follow)
  y = spec.forward(*_after_smaller(spec, x, kernel, keys if quantized else sx), bias)
  sx = jax.ad_checkpoint.checkpoint_name(sx, SKETCH_NAME)
  return y, (sx, keys, kernel, bias)


def _project_bwd(spec, res, g):
  sx, keys, kernel, bias = res
  x_pspec, g_pspec = spec.layout or (None, None)
  mesh = _mesh.type_mesh(sx, kernel, g)
  x_spec = None
  if g_pspec is not None:
    # The cotangent's batch axes are sharded as x's, so that its blocks hold
    # the rows of x's blocks, whatever sharding the type of the op that
    # produced it claims (an FFI call typed as replicated, say): resharding
    # from a replicated type is a local slice.
    g = jax.sharding.reshard(g, NamedSharding(mesh, P(*_unpermute(g_pspec, spec.g_perm))))
    x_spec = _unpermute(x_pspec, spec.x_perm)
  g2d = _flatten(spec, g, spec.g_perm, g_pspec)
  dw = None
  if spec.kind in _sketch.QUANTIZED_KINDS:  # x^ from its codes, once g is here; g whole
    n = math.prod(kernel.shape[a] for a in spec.k_perm[:len(spec.x_perm) - spec.n_batch])
    # (x^ reads nothing but residuals: left alone, XLA's CPU scheduler builds
    # every layer's at the backward's start, each the size of x)
    keys = (_sharded.after if spec.blocks else _order.after)(keys, g2d)  # the scales
    sg = g2d
    if spec.blocks:  # x^ whole, its blocks where they lie
      sx = _sketch.dequantize_rows(sx, keys, spec.bits, n)
    else:  # x^T g a block of rows at a time: x^ is never whole
      dw = _quantized.xt_g(sx, keys, spec.bits, n, g2d, spec.precision)
  elif spec.kind in _sketch.SAMPLED_KINDS:
    sg = _sketch.take_rows(g2d, keys)
  else:
    sg = _sketch_of(spec, g2d, keys)
  w_in = kernel
  g, kernel = _after_smaller(spec, g, kernel, sg)
  # dx and db are the transposes of the forward's linear map, so they are
  # exactly what autodiff of the plain layer gives. x's type is built from
  # g's, so that inside jax.shard_map it varies over the same manual axes.
  kw = {} if x_spec is None else {"sharding": NamedSharding(mesh, P(*x_spec))}
  x_aval = jax.typeof(g).update(shape=spec.x_shape(g.shape, kernel.shape), dtype=kernel.dtype,
                                **kw)
  if bias is None:
    (dx,) = jax.linear_transpose(lambda x: spec.forward(x, kernel), x_aval)(g)
    db = None
  else:
    dx, db = jax.linear_transpose(lambda x, b: spec.forward(x, kernel, b), x_aval,
                                  jax.typeof(bias))(g)
  # dW = sum over blocks of (S_c^T x_c)^T (S_c^T g_c): a sum over the blocks,
  # so over the data shards: the all-reduce any data-parallel weight gradient has.
  # On an Explicit mesh the sum over the (sharded) blocks needs the result's
  # sharding: the kernel's where it is 2-D in order, else replicated, and then
  # the kernel's, as autodiff of the plain layer gives the kernel's type.
  kw = {}
  k_spec = _mesh.explicit_spec(kernel)
  simple = spec.k_perm == tuple(range(kernel.ndim)) == (0, 1)
  if mesh is not None and _mesh.explicit_spec(sx) is not None:
    kw["out_sharding"] = NamedSharding(mesh, P(*k_spec) if simple and k_spec else P())
  rows = tuple(range(sx.ndim - 1))  # the sketch rows, and the blocks if any
  if dw is None:
    dw = lax.dot_general(sx.astype(jnp.float32), sg, ((rows, rows), ((), ())),
                         precision=spec.precision, preferred_element_type=jnp.float32, **kw)
  dw = dw.reshape(tuple(kernel.shape[a] for a in spec.k_perm))
  inverse = tuple(sorted(range(kernel.ndim), key=lambda i: spec.k_perm[i]))
  dw = jnp.transpose(dw, inverse).astype(kernel.dtype)
  if kw and not simple and k_spec is not None:
    dw = jax.sharding.reshard(dw, NamedSharding(mesh, P(*k_spec)))
  return dx, _mesh.like_primal(dw, w_in), _mesh.like_primal(db, bias), None


_project.defvjp(_project_fwd, _project_bwd)


def _exact_trace(*arrays) -> bool:
  """Whether an input is traced for forward mode (``jax.jvp``) or ``jax.linear_transpose``.

  A custom_vjp has neither a forward-mode rule nor a transpose rule, and
  neither needs the sketch: the forward is exactly the plain layer's, so its
  tangent ``dx W + x dW (+ db)`` and its transpose in x, ``g W^T``, are the
  plain layer's too, and they keep nothing for a weight gradient.
  """
  for a in arrays:
    if isinstance(a, _ad.JVPTracer):
      return True
    if isinstance(a, _pe.JaxprTracer) and not a.pval.is_known():
      return True
  return False


def project(x, kernel, bias, key_words, spec: Spec):
  """`spec.forward(x, kernel, bias)` with its kernel gradient sketched as `spec` (`plan`) says.

  `key_words` uint32 (2,). ``spec.blocks == 0``: one sketch of ``spec.k``
  columns; C blocks: each its own key (`fewbit_jax.sketch.block_keys`) and
  ``spec.k`` columns. A `plain` spec is the plain layer.
  """
  if spec.plain:
    return spec.forward(x, kernel, bias)
  keys = _sketch.block_keys(key_words, spec.blocks) if spec.blocks else key_words
  return _project(x, kernel, bias, keys, spec)


def _unpermute(pspec, perm) -> tuple:
  """Spec entries in `perm` order back in the array's own axis order."""
  out = [None] * len(perm)
  for a, e in zip(perm, pspec):
    out[a] = e
  return tuple(out)


def block_layout(x, kernel, bias, forward, x_perm, g_perm, n: int) -> tuple | None:
  """`Spec.layout` for x typed on an Explicit mesh: x's and g's specs in perm order.

  g's batch axes (the first `n` of `g_perm`) take x's sharding (its blocks
  must hold x's blocks' rows); its feature axes y's, less the mesh axes the
  batch axes use. ``forward(x, kernel, bias)`` is the layer's output.
  """
  x_spec = _mesh.explicit_spec(x)
  if x_spec is None:
    return None
  y_aval = jax.eval_shape(forward, x, kernel, bias)
  explicit = _mesh.explicit_axes(jax.typeof(x).sharding.mesh)
  y_spec = tuple(_mesh.entry(tuple(a for a in _mesh.axes(e) if a in explicit))
                 for e in _mesh.padded(y_aval.sharding.spec, len(y_aval.shape)))
  x_pspec = tuple(x_spec[a] for a in x_perm)
  used = {a for e in x_pspec[:n] for a in _mesh.axes(e)}
  features = tuple(_mesh.entry(tuple(a for a in _mesh.axes(y_spec[i]) if a not in used))
                   for i in g_perm[n:])
  return x_pspec, x_pspec[:n] + features


# --- the planner ---------------------------------------------------------------------

def _real(v, name) -> float | None:
  """`v` as a Python float if it is one real number (a numpy or concrete 0-d jax one too)."""
  if isinstance(v, (bool, np.bool_)):
    return None
  if isinstance(v, (numbers.Real, np.floating, np.integer)):
    return float(v)
  dtype = getattr(v, "dtype", None)
  if dtype is None or np.ndim(v) != 0 or not (jnp.issubdtype(dtype, jnp.floating)
                                               or jnp.issubdtype(dtype, jnp.integer)):
    return None
  if isinstance(v, jax.core.Tracer):
    raise TypeError(f"{name} is a traced value ({jax.typeof(v)}): the sketch size fixes the "
                    "shapes of the program, so it must be known when the function is traced. "
                    "Pass a Python float (or a concrete array), not a jit argument.")
  return float(v)


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
    ratio = _real(proj_dim_ratio, "proj_dim_ratio")
    if ratio is None or not 0.0 < ratio <= 1.0:
      raise ValueError(f"proj_dim_ratio={proj_dim_ratio!r} must be a number in (0, 1]: "
                       "the fraction of the B leading positions kept, e.g. 0.2. For "
                       "a fixed size use proj_dim instead.")
  for name, v in (("proj_dim", proj_dim), ("proj_dim_min", proj_dim_min),
                  ("proj_dim_max", proj_dim_max)):
    if v is not None and (not is_int(v) or v < 1):
      raise ValueError(f"{name}={v!r} must be an int >= 1 (a number of sketch rows), or None.")
  if proj_dim_min is not None and proj_dim_max is not None and proj_dim_min > proj_dim_max:
    raise ValueError(f"proj_dim_min={proj_dim_min} is larger than proj_dim_max="
                     f"{proj_dim_max}; pass min <= max.")
  if proj_dim is not None:
    k = int(proj_dim)
  else:
    k = math.ceil(ratio * b)
  if proj_dim_min is not None:
    k = max(k, int(proj_dim_min))
  if proj_dim_max is not None:
    k = min(k, int(proj_dim_max))
  return max(1, min(k, b))


def plan(op, arg, x, kernel, bias, x_perm, g_perm, k_perm, *, proj_dim_ratio=None,
         proj_dim=None, proj_dim_min=None, proj_dim_max=None, sketch="gaussian",
         precision=None, preferred_element_type=None, out_sharding=None,
         sketch_blocks=None) -> Spec:
  """The `Spec` of one randomized projection: everything static, decided once.

  check_kind -> projection_dim -> resolve_blocks -> check_blocks_fit ->
  block_layout, for ``y = op(x, kernel) (+ bias)`` with x's axes `x_perm`
  (batch, then contracted), the output's `g_perm` and the kernel's `k_perm`.
  The options are those of `fewbit_jax.dense.randomized_dense`. Every
  argument is validated whatever the shapes; where there is nothing to
  sketch (zero positions, a zero-size kernel) or the trace is forward mode
  (`_exact_trace`) the spec is `plain` and has no blocks.
  """
  kind = _sketch.check_kind(sketch)
  x_perm, g_perm, k_perm = tuple(x_perm), tuple(g_perm), tuple(k_perm)
  batch_axes = x_perm[:n_batch(x_perm, g_perm, k_perm)]
  b = math.prod(x.shape[a] for a in batch_axes)
  k = projection_dim(b, proj_dim_ratio=proj_dim_ratio, proj_dim=proj_dim,
                     proj_dim_min=proj_dim_min, proj_dim_max=proj_dim_max)
  c, per_shard = resolve_blocks(x, sketch_blocks, batch_axes)
  empty = b == 0 or kernel.size == 0  # nothing to sketch: dW is empty or zero
  layout = None
  if empty:
    c = 0
  elif c:  # c == 0: no mesh, no blocks asked for: one sketch of the (B, N) rows
    check_blocks_fit(x, c, per_shard, batch_axes)
    forward = functools.partial(_forward, op, arg, precision=precision,
                                pet=preferred_element_type, out_sharding=out_sharding)
    layout = block_layout(x, kernel, bias, forward, x_perm, g_perm, len(batch_axes))
  k = -(-k // c) if c else k
  bits = 0
  if kind in _sketch.QUANTIZED_KINDS and not empty:
    n = math.prod(x.shape[a] for a in x_perm[len(batch_axes):])
    bits = _quantized.bits_for(k, b // c if c else b, n, jnp.dtype(x.dtype).itemsize)
  return Spec(op, arg, precision, preferred_element_type, out_sharding, x_perm, g_perm, k_perm,
              k=k, kind=kind, blocks=c, layout=layout,
              plain=empty or _exact_trace(x, kernel, bias), bits=bits)


def randomized(op, arg, x, kernel, bias, key, x_perm, g_perm, k_perm, **options):
  """``op(x, kernel) (+ bias)`` with a sketched kernel gradient: every randomized layer's body.

  Promotes the arrays to one dtype (as flax does), plans (`plan`), reads the
  key's words and calls the core (`project`).
  """
  dtype = jnp.result_type(*(a for a in (x, kernel, bias) if a is not None))
  x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
  bias = None if bias is None else jnp.asarray(bias, dtype)
  spec = plan(op, arg, x, kernel, bias, x_perm, g_perm, k_perm, **options)
  k0, k1 = rng.key_words(key)
  return project(x, kernel, bias, jnp.stack([k0, k1]), spec)
