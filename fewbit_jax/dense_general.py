"""Randomized projections beyond ``x @ W``: ``dot_general`` and ``einsum`` layers.

Attention and many modern models project with ``nn.DenseGeneral``,
``nnx.LinearGeneral`` or ``nnx.Einsum``: the kernel has several axes (e.g.
``(embed, heads, head_dim)``) and the input may be contracted over more than
one axis. All of them are still one matrix product once the axes are
grouped: with

* batch axes: axes of x that are not contracted (they index B positions),
* contracted axes: axes shared by x and the kernel (N features in),
* feature axes: kernel axes that are not contracted (M features out),

the layer is ``y2d = x2d @ W2d`` with ``x2d`` (B x N) and ``W2d`` (N x M),
and the weight gradient ``dW2d = x2d^T g2d`` is estimated exactly as in
`fewbit_jax.dense.randomized_dense`, from the sketch ``S^T x2d`` (k x N):

    dW2d ~= (S^T x2d)^T (S^T g2d),    E[S S^T] = I_B,

then reshaped to the kernel's axes. The forward output is computed by the
very ``dot_general`` / ``einsum`` call of the layer (so it is bitwise the
same), ``dx`` is its exact transpose, and the bias (added outside) keeps its
exact gradient.

Not covered: kernels with batch axes (``nn.DenseGeneral(batch_dims=...)``,
``nnx.LinearGeneral(batch_axis=...)``, an einsum index in x, kernel and
output alike) are a batch of independent layers, one weight gradient per
batch index; sketching them needs one sketch per index and is left out.
Those raise a ValueError that says so.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fewbit_jax.dense_general import randomized_einsum
  >>> x = jnp.ones((4, 16, 32))                  # (batch, seq, embed)
  >>> w = jnp.ones((32, 2, 8))                   # (embed, heads, head_dim)
  >>> y = randomized_einsum("btd,dnh->btnh", x, w, jax.random.key(0),
  ...                       proj_dim_ratio=0.25)
  >>> bool(jnp.all(y == jnp.einsum("btd,dnh->btnh", x, w)))
  True
  >>> dw = jax.grad(lambda w: randomized_einsum(
  ...     "btd,dnh->btnh", x, w, jax.random.key(0), proj_dim_ratio=0.25).sum())(w)
  >>> dw.shape                                   # from a (16 x 32) sketch, not (64 x 32)
  (32, 2, 8)
"""

from __future__ import annotations

import string
from typing import Sequence

from fewbit_jax import _projection
from fewbit_jax._projection import SKETCH_NAME, check_array as _check_array

__all__ = ["randomized_dot_general", "randomized_einsum", "SKETCH_NAME"]


def _canon_axes(axes: Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
  out = []
  for a in axes:
    if not isinstance(a, int) or not -ndim <= a < ndim:
      raise ValueError(f"{what} axis {a!r} is out of range for {ndim} dimensions")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{what} axes {tuple(axes)} repeat an axis")
  return tuple(out)


def randomized_dot_general(x, kernel, key, dimension_numbers, *, proj_dim_ratio=None,
                           proj_dim=None, proj_dim_min=None, proj_dim_max=None,
                           sketch: str = "gaussian", precision=None,
                           preferred_element_type=None, out_sharding=None,
                           sketch_blocks=None):
  """``lax.dot_general(x, kernel, dimension_numbers)`` with a sketched weight gradient.

  The forward output is exactly that ``lax.dot_general`` (the computation of
  ``nn.DenseGeneral`` and ``nnx.LinearGeneral`` before the bias). The
  backward pass keeps ``S^T x2d`` (k x N) instead of x, where x2d groups x's
  free axes into B rows and its contracted axes into N columns, and
  estimates the kernel's gradient as in `fewbit_jax.dense.randomized_dense`;
  ``dx`` is exact.

  Args:
    x: input array.
    kernel: weights; its free axes are the output features.
    key: a PRNG key; use a fresh one every step.
    dimension_numbers: ``((x_contracting, kernel_contracting), ((), ()))``,
      as for ``lax.dot_general``; batch dimensions must be empty.
    proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch: the sketch
      size and kind, as in `fewbit_jax.dense.randomized_dense` (B = product
      of x's free axes).
    precision, preferred_element_type, out_sharding: passed to
      ``lax.dot_general``.
    sketch_blocks: C contiguous blocks of the B positions, each with its own
      sketch, as in `fewbit_jax.dense.randomized_dense` (an int dividing B,
      or mesh axis names for one block per data shard of x's first axis);
      x's free axes must lead. None: the `sketch_blocks_default` if set;
      else for x typed on an Explicit mesh one block per device's shard of
      its free axes, whichever are sharded; else one sketch.

  Returns:
    Shape ``x_free + kernel_free``, as ``lax.dot_general``.

  Raises:
    ValueError: batch dimensions, mismatched contracted sizes, bad sketch
      options.
    TypeError: non-float inputs.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax.dense_general import randomized_dot_general
    >>> x, w = jnp.ones((8, 4, 16)), jnp.ones((4, 16, 32))   # contract (heads, dim)
    >>> dims = (((1, 2), (0, 1)), ((), ()))
    >>> y = randomized_dot_general(x, w, jax.random.key(0), dims, proj_dim=4)
    >>> y.shape, bool(jnp.all(y == jax.lax.dot_general(x, w, dims)))
    ((8, 32), True)
  """
  _check_array("x", x)
  _check_array("kernel", kernel)
  try:
    (xc, kc), (xb, kb) = dimension_numbers
  except (TypeError, ValueError):
    raise ValueError(f"dimension_numbers must be ((x_contracting, kernel_contracting), "
                     f"(x_batch, kernel_batch)); got {dimension_numbers!r}") from None
  if tuple(xb) or tuple(kb):
    raise ValueError(
        f"randomized_dot_general does not take batch dimensions (got {tuple(xb)}, "
        f"{tuple(kb)}): a kernel with batch axes is one layer per batch index, each with "
        "its own weight gradient, which one sketch over all positions cannot estimate. "
        "Keep the plain layer for it.")
  xc = _canon_axes(tuple(xc), x.ndim, "x contracting")
  kc = _canon_axes(tuple(kc), kernel.ndim, "kernel contracting")
  if len(xc) != len(kc) or any(x.shape[a] != kernel.shape[b] for a, b in zip(xc, kc)):
    raise ValueError(f"contracted axes must pair up with equal sizes: x {x.shape} axes {xc}, "
                     f"kernel {kernel.shape} axes {kc}")
  x_free = tuple(a for a in range(x.ndim) if a not in xc)
  k_free = tuple(a for a in range(kernel.ndim) if a not in kc)
  dims = ((xc, kc), ((), ()))
  return _projection.randomized(
      "dot_general", dims, x, kernel, None, key, x_free + xc,
      tuple(range(len(x_free) + len(k_free))), kc + k_free, proj_dim_ratio=proj_dim_ratio,
      proj_dim=proj_dim, proj_dim_min=proj_dim_min, proj_dim_max=proj_dim_max, sketch=sketch,
      precision=precision, preferred_element_type=preferred_element_type,
      out_sharding=out_sharding, sketch_blocks=sketch_blocks)


def _parse_einsum(subscripts: str, x_ndim: int, k_ndim: int) -> tuple[str, str, str]:
  s = subscripts.replace(" ", "")
  if "->" not in s or s.count(",") != 1:
    raise ValueError(f"einsum subscripts must be explicit with two operands, 'x,kernel->out'; "
                     f"got {subscripts!r}")
  ins, out = s.split("->")
  xs, ks = ins.split(",")
  if "..." in ks:
    raise ValueError(f"the kernel's subscripts cannot hold '...'; got {subscripts!r}")
  if "..." in xs:
    used = set(xs + ks + out)
    free = [c for c in string.ascii_letters if c not in used]
    n = x_ndim - (len(xs) - 3)
    if n < 0 or n > len(free):
      raise ValueError(f"'...' in {subscripts!r} does not fit an input of {x_ndim} dimensions")
    fill = "".join(free[:n])
    if "..." not in out:
      raise ValueError(f"'...' must appear in the output of {subscripts!r} too")
    xs, out = xs.replace("...", fill), out.replace("...", fill)
  for name, sub in (("x", xs), ("kernel", ks), ("output", out)):
    if not sub.isalpha() or len(set(sub)) != len(sub):
      raise ValueError(f"the {name} subscripts {sub!r} of {subscripts!r} must be distinct letters")
  if len(xs) != x_ndim or len(ks) != k_ndim:
    raise ValueError(f"{subscripts!r} names {len(xs)} and {len(ks)} axes, but x has {x_ndim} "
                     f"and the kernel {k_ndim}")
  return xs, ks, out


def randomized_einsum(subscripts: str, x, kernel, key, *, proj_dim_ratio=None, proj_dim=None,
                      proj_dim_min=None, proj_dim_max=None, sketch: str = "gaussian",
                      precision=None, preferred_element_type=None, out_sharding=None,
                      sketch_blocks=None):
  """``jnp.einsum(subscripts, x, kernel)`` with a sketched weight gradient.

  The forward output is exactly that ``jnp.einsum`` (the computation of
  ``nnx.Einsum`` before the bias). Each index must be one of

  * batch: in x and the output, not the kernel;
  * contracted: in x and the kernel, not the output;
  * feature: in the kernel and the output, not x;

  so the einsum is a dense layer over B = product of the batch sizes
  positions; its kernel gradient is estimated from ``S^T x2d`` as in
  `fewbit_jax.dense.randomized_dense`. ``...`` in x and the output stands
  for batch axes.

  Args:
    subscripts: explicit two-operand subscripts, e.g. ``'btd,dnh->btnh'``.
    x, kernel, key: input, weights and a PRNG key (fresh every step).
    proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch: as in
      `fewbit_jax.dense.randomized_dense`.
    precision, preferred_element_type, out_sharding: passed to ``jnp.einsum``.
    sketch_blocks: as in `randomized_dot_general`; x's batch indices must be
      its leading axes.

  Returns:
    ``jnp.einsum(subscripts, x, kernel)``.

  Raises:
    ValueError: an index in all three operands (a batched kernel), an index
      only in x or only in the kernel (a sum, not a projection), or
      malformed subscripts.
    TypeError: non-float inputs.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax.dense_general import randomized_einsum
    >>> x, w = jnp.ones((8, 3, 16)), jnp.ones((4, 16))
    >>> randomized_einsum("...d,fd->...f", x, w, jax.random.key(0), proj_dim=6).shape
    (8, 3, 4)
  """
  _check_array("x", x)
  _check_array("kernel", kernel)
  if not isinstance(subscripts, str):
    raise TypeError(f"subscripts must be a string like 'btd,dh->bth'; got {subscripts!r}")
  xs, ks, out = _parse_einsum(subscripts, x.ndim, kernel.ndim)
  for c in set(xs + ks + out):
    where = (c in xs, c in ks, c in out)
    if where == (True, True, True):
      raise ValueError(
          f"index {c!r} of {subscripts!r} is in x, the kernel and the output: a batch of "
          "independent kernels, each with its own gradient, which one sketch over all "
          "positions cannot estimate. Keep the plain einsum for it.")
    if where in ((True, False, False), (False, True, False)):
      raise ValueError(f"index {c!r} of {subscripts!r} is summed over one operand only: not a "
                       "projection of x by the kernel.")
    if where == (False, False, True):
      raise ValueError(f"output index {c!r} of {subscripts!r} is in neither operand")
  for c in xs:
    if c in ks and x.shape[xs.index(c)] != kernel.shape[ks.index(c)]:
      raise ValueError(f"index {c!r} of {subscripts!r} has size {x.shape[xs.index(c)]} in x "
                       f"but {kernel.shape[ks.index(c)]} in the kernel")
  batch = [c for c in xs if c not in ks]
  contract = [c for c in xs if c in ks]
  feature = [c for c in ks if c not in xs]
  x_perm = tuple(xs.index(c) for c in batch + contract)
  g_perm = tuple(out.index(c) for c in batch + feature)
  k_perm = tuple(ks.index(c) for c in contract + feature)
  return _projection.randomized(
      "einsum", subscripts, x, kernel, None, key, x_perm, g_perm, k_perm,
      proj_dim_ratio=proj_dim_ratio, proj_dim=proj_dim, proj_dim_min=proj_dim_min,
      proj_dim_max=proj_dim_max, sketch=sketch, precision=precision,
      preferred_element_type=preferred_element_type, out_sharding=out_sharding,
      sketch_blocks=sketch_blocks)
