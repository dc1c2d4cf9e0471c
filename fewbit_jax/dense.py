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
C is taken from x's type by default; under an ``AxisType.Auto`` mesh (the
context mesh, or the one an input placed on it carries into ``jax.jit``),
whose types do not say how x is sharded, C defaults to gcd(devices,
x.shape[0]) blocks along x's first axis, which every data-parallel shard of
that axis holds whole. Pass C (or set it for a whole model with
`sketch_blocks_default`) to choose otherwise. Kernels sharded
on either axis (tensor parallelism) need nothing: the sketches keep the
sharding of x's and g's feature axis (`fewbit_jax.sharded`).

Reference: Bershatsky et al., "Memory-Efficient Backpropagation through Large
Linear Layers", arXiv 2201.13195.
"""

from __future__ import annotations

import contextlib

import jax

from fewbit_jax import _projection
from fewbit_jax._projection import SKETCH_NAME

__all__ = ["randomized_dense", "projection_dim", "sketch_blocks_default", "SKETCH_NAME"]

projection_dim = _projection.projection_dim


# --- block-diagonal sketches -------------------------------------------------------

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
  with _projection.blocks_default(sketch_blocks):
    yield


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

  It is `fewbit_jax.dense_general.randomized_dot_general` over x's last axis
  plus the bias: the same planner and core, so the same sketch for the same
  key. Use a fresh key every step. Under ``jax.vmap`` each mapped example gets its
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
      the fastest), ``dct``, ``dft``, ``orthogonal``, ``sampled``, ``wta``
      (k rows chosen by their norms), or ``quantized`` (every row kept at the
      bits k rows' bytes allow, stochastically rounded: the lowest variance
      for the same residual bytes); see `fewbit_jax.sketch`.
    precision: ``lax.Precision`` of the matmuls, as in ``nn.Dense``.
    preferred_element_type: output dtype of the forward ``dot_general``, as in
      ``nnx.Linear``.
    out_sharding: sharding of the forward output, as in ``nnx.Linear``.
    sketch_blocks: how many blocks of rows get their own sketch:

      * None (default): the value set by `sketch_blocks_default` if any;
        else, when x's type is sharded over ``AxisType.Explicit`` mesh axes,
        one block per device's shard of its leading axes (whichever are
        sharded; `fewbit_jax.sharded.to_blocks`); on a mesh whose axes are
        all ``AxisType.Auto`` (``jax.set_mesh``'s, or the mesh x's type
        carries inside ``jax.jit`` once placed with a ``NamedSharding``),
        gcd(devices, x.shape[0]) contiguous blocks along x's first axis, so
        that a batch sharded on that axis needs no sketch communication;
        else one sketch over all B positions (where rows are sharded, each
        device then sketches its rows and the partial sketches are
        all-reduced). Correct on any mesh and sharding; the options below
        only change the cost;
      * an int C dividing B: C blocks;
      * mesh axis name(s), e.g. ``'data'``: one block per shard of those
        axes of the current mesh (``jax.set_mesh``); x's first axis must be
        divisible by their size.

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
  _projection.check_array("x", x)
  _projection.check_array("kernel", kernel)
  if bias is not None:
    _projection.check_array("bias", bias)
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2-D (in_features, out_features); got shape {kernel.shape}.")
  if x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(f"x's last axis must match kernel's first: x {x.shape}, kernel "
                     f"{kernel.shape}; expected x of shape (..., {kernel.shape[0]}).")
  if bias is not None and bias.shape != (kernel.shape[1],):
    raise ValueError(f"bias must have shape ({kernel.shape[1]},) to match kernel "
                     f"{kernel.shape}; got {bias.shape}. Pass None for no bias.")
  # randomized_dot_general over x's last axis, plus the bias: one planner, one core.
  lead = tuple(range(x.ndim))
  with jax.named_scope("randomized_dense"):
    return _projection.randomized(
        "dot_general", _projection.dense_dims(x.ndim), x, kernel, bias, key, lead, lead, (0, 1),
        proj_dim_ratio=proj_dim_ratio, proj_dim=proj_dim, proj_dim_min=proj_dim_min,
        proj_dim_max=proj_dim_max, sketch=sketch, precision=precision,
        preferred_element_type=preferred_element_type, out_sharding=out_sharding,
        sketch_blocks=sketch_blocks)
