"""Random sketches ``S`` (B x k) with ``E[S S^T] = I``, applied as ``S^T x``.

A randomized dense layer keeps ``S^T x`` (k x N) instead of its input ``x``
(B x N, B = all batch and sequence positions) and estimates the weight
gradient ``x^T g`` by ``(S^T x)^T (S^T g)``, which is unbiased whenever
``E[S S^T] = I_B``. Every sketch here is a pure function of a PRNG key, so the
backward pass regenerates the forward's ``S`` instead of keeping it.

The kinds (rows ``i`` in ``0..B-1`` index the flattened leading positions,
columns ``j`` in ``0..k-1``; ``(k0, k1) = rng.sketch_words(key)``, the key's
words mixed, so that keys differing in any bit give unrelated sketches):

* ``gaussian``: ``S[i, j] = rng.gaussian(k0, k1, i, j) / sqrt(k)``.
* ``rademacher``: ``S[i, j] = (1 - 2 * (hash4(k0, k1, i, j) >> 31)) / sqrt(k)``.
* ``countsketch``: row ``i`` has one non-zero, ``sign(i)`` in column
  ``bucket(i)``, where ``bucket(i) = hash4(k0, k1, i, 0) % k`` and
  ``sign(i) = 1 - 2 * (hash4(k0, k1, i, 1) >> 31)``. ``S^T x`` is a signed
  segment sum: O(B N) work and no ``S`` at all.
* ``dct``: ``S = sqrt(B / k) * diag(sign) * C[:, J]`` where ``C`` is the
  orthonormal DCT-II basis of size B (column ``m``:
  ``s_m cos(pi (2 i + 1) m / (2 B))``, ``s_0 = sqrt(1/B)``, else ``sqrt(2/B)``),
  ``sign(i)`` is countsketch's sign, and ``J`` holds the k basis indices with
  the smallest ``(hash4(k0, k1, m, 2), m)``: k of B chosen uniformly without
  replacement, in that order.
* ``dft``: the same with the real orthonormal Fourier basis of size B, which
  spans what the unitary DFT does with real vectors: index 0 is the constant
  ``1/sqrt(B)``; odd ``m`` is ``sqrt(2/B) cos(2 pi f i / B)`` and even
  ``m > 0`` is ``sqrt(2/B) sin(2 pi f i / B)`` with ``f = (m + 1) // 2``; for
  even B the last index is the alternating ``(-1)**i / sqrt(B)``.

* ``orthogonal``: ``S = sqrt(B / k) Q``, ``Q`` (B x k) the orthonormal
  factor of the QR decomposition of gaussian's matrix (``G[i, j] =
  rng.gaussian(k0, k1, i, j)``). Its columns span a uniformly random
  k-dimensional subspace, so ``E[Q Q^T] = (k / B) I``; the variance is about
  ``1 - k / B`` times gaussian's (exact form in `estimate_variance`). The
  QR needs the whole S: O(B k) memory and O(B k^2) work, so use it with
  blocks (`project_blocks`) of a few hundred or thousand rows.

Two more kinds choose k rows of x by their norms ``|x_i|`` instead of mixing
all rows with a fixed S (`SAMPLED_KINDS`; the S they amount to depends on x,
so they are not `project`'s but `sample_rows`'s, and a layer keeps the
chosen rows, scaled, and their indices; the backward pass takes the same
rows of g):

* ``sampled``: k rows drawn with replacement, row i with probability
  ``p_i = |x_i| / sum_l |x_l|``, kept scaled by ``1 / (k p_i)``
  (importance sampling, Drineas-Kannan-Mahoney).
* ``wta``: winner take all: the rows whose inclusion probability would reach
  1 are kept for certain (the largest ``|x_i|``: as many as the
  take-all rule of sampling proportional to size gives), the other rows
  drawn without replacement by systematic sampling with inclusion
  probabilities ``pi_i`` proportional to ``|x_i|``, kept scaled by
  ``1 / pi_i``.

Both are unbiased for every g; their variance is below gaussian's where the
row norms of x (and of g with them) are uneven, see `estimate_variance`.
The exact rule of each is in `fewbit_jax._sampling`.

One kind keeps every row of x at fewer bits instead (`QUANTIZED_KINDS`,
`quantize_rows`): ``quantized``, x rounded stochastically (unbiased) to the
most bits an element that, with a float32 scale per row, fit in the bytes a
k-row sketch in x's dtype takes (about ``8 * itemsize * k / B``); the backward pass
takes g whole. Its variance is that of the rounding, at most a quarter of a
step squared an element (the rule is in `fewbit_jax._quantized`).

``dct`` and ``dft`` are the original fewbit kinds with the unbiased scale
``sqrt(B/k)`` (the original scaled by ``k B``). The random signs are an
addition: ``E[S S^T] = diag(sign) I diag(sign) = I`` for any signs, so they
keep the estimator unbiased, and they spread inputs that are concentrated on a
few basis vectors (a per-feature mean over the batch is all in the constant
vector) over all of them; without them the variance of such inputs grows by up
to a factor B / k. tests/test_sketch.py measures both.

Block-diagonal sketches (`project_blocks`, used by the randomized layers under
data parallelism): the B rows are cut into C contiguous blocks of B / C rows
and block c gets its own sketch ``S_c`` of the same kind with ``k_c`` columns,
drawn from the key words ``block_keys(key, C)[c] = (hash4(k0, k1, c, 3),
hash4(k0, k1, c, 4))``, which `project` mixes as it mixes any key (for C = 1
the key's own words, so that one block is the sketch above). Then ``S = diag(S_0, ..., S_{C-1})`` and
``E[S S^T] = diag(E[S_c S_c^T]) = I``: still unbiased, and with one block per
device the sketch of a batch-sharded x never leaves its device.

Memory: ``gaussian`` and ``rademacher`` generate ``S`` in blocks of rows inside
a loop and accumulate ``S_block^T x_block`` in float32, so neither ``S`` nor a
float32 copy of ``x`` is ever whole; ``countsketch`` loops over the same row
blocks; ``dct`` and ``dft`` run FFTs over blocks of columns of ``x``.
``orthogonal`` builds its whole S (B x k, per block with blocks). ``sampled``
and ``wta`` read x once for its row norms and keep k rows and k indices.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fewbit_jax import sketch
  >>> x = jnp.ones((6, 3))
  >>> sketch.project("countsketch", x, jax.random.key(0), 2).shape
  (2, 3)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fewbit_jax import _hash, _order, _quantized, _rng as rng, _sampling, ext

__all__ = ["KINDS", "FIXED_KINDS", "SAMPLED_KINDS", "QUANTIZED_KINDS", "ALL_KINDS", "check_kind",
           "project", "project_blocks", "block_keys", "sketch_matrix", "sample_rows",
           "sample_rows_blocks", "take_rows", "quantize_rows", "dequantize_rows",
           "estimate_variance"]

# The kinds whose S is generated a block at a time and never whole.
KINDS = ("gaussian", "rademacher", "countsketch", "dct", "dft")
# The kinds with an S fixed by the key (`project`): KINDS and orthogonal,
# whose QR builds its S whole.
FIXED_KINDS = KINDS + ("orthogonal",)
# The kinds that choose rows of x by their norms (`sample_rows`).
SAMPLED_KINDS = _sampling.SAMPLED_KINDS
# The kinds that keep every row of x at fewer bits (`quantize_rows`).
QUANTIZED_KINDS = _quantized.QUANTIZED_KINDS
# Every kind a randomized layer takes.
ALL_KINDS = FIXED_KINDS + SAMPLED_KINDS + QUANTIZED_KINDS

# Elements (float32) of the largest temporary a pure-JAX projection builds per
# loop step: an S block for gaussian/rademacher, an x block for countsketch, a
# column slab of the FFT for dct/dft. 2**20 elements = 4 MiB.
_BLOCK_ELEMS = 1 << 20

_DIMS_T = (((0,), (0,)), ((), ()))  # contract the row axes: A^T B


def check_kind(kind) -> str:
  """Returns `kind` if it names a sketch (`ALL_KINDS`), else raises a ValueError saying which do.

  Example:
    >>> from fewbit_jax import sketch
    >>> sketch.check_kind("dct")
    'dct'
    >>> sketch.check_kind("wta")
    'wta'
  """
  if not isinstance(kind, str) or kind not in ALL_KINDS:
    raise ValueError(f"unknown sketch {kind!r}: expected one of {', '.join(ALL_KINDS)}.")
  return kind


def _check_fixed(kind, what: str) -> None:
  """ValueError for a sampled kind where a fixed S (one of `FIXED_KINDS`) is needed."""
  check_kind(kind)
  if kind in QUANTIZED_KINDS:
    raise ValueError(f"the {kind} sketch keeps every row of x at fewer bits, so it has no S "
                     f"and {what} cannot take it: use quantize_rows / dequantize_rows, or "
                     f"one of {', '.join(FIXED_KINDS)}.")
  if kind in SAMPLED_KINDS:
    raise ValueError(f"the {kind} sketch chooses rows of x by their norms, so it has no S "
                     f"fixed by the key and {what} cannot take it: use sample_rows / "
                     f"sample_rows_blocks (the rows and their indices) and take_rows "
                     f"(the same rows of g), or one of {', '.join(FIXED_KINDS)}.")


def _default_block_rows(kind: str, b: int, n: int, k: int) -> int:
  """Rows per loop step of the pure-JAX gaussian/rademacher/countsketch path."""
  # countsketch's step only adds x rows into buckets: small blocks cost it little.
  budget = _BLOCK_ELEMS // 4 if kind == "countsketch" else _BLOCK_ELEMS
  rows = max(8, budget // max(k if kind != "countsketch" else 1, n, 1))
  return max(1, min(b, rows))


def project(kind: str, x2d: jax.Array, key: jax.Array, k: int, *,
            precision=None, block_rows: int | None = None, row0=None) -> jax.Array:
  """``S^T x`` (k x N, float32) for the sketch `kind` drawn from `key`.

  Uses the FFI kernel of `kind` where ``fewbit_jax.ext`` has one for the
  current backend, otherwise the pure-JAX definition (see the module
  docstring); both give the same S.

  Args:
    kind: one of `FIXED_KINDS`.
    x2d: array (B, N) of any float dtype; accumulation is float32.
    key: a PRNG key (typed or raw uint32[2]); the same key gives the same S.
    k: number of sketch columns, ``1 <= k <= B`` (any ``k >= 1`` with `row0`).
    precision: ``lax.Precision`` of the float32 matmuls (gaussian, rademacher).
    block_rows: rows per loop step of the pure-JAX path (default: bounded so a
      step holds at most 2**20 float32 elements).
    row0: gaussian, rademacher and countsketch only: the row number of x2d's
      first row in S (a uint32 scalar, may be traced), so that x2d can be a
      slice of the rows of a larger x whose sketch is the sum of the slices'.
      The kernels number rows from 0, so a given `row0` takes the pure-JAX
      path.

  Returns:
    float32 array (k, N).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import sketch
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> s = sketch.project("dct", x, jax.random.key(1), 4)  # k = B: exact
    >>> bool(jnp.allclose(s.T @ s, x.T @ x, rtol=1e-5))
    True
  """
  _check_fixed(kind, "project")
  if x2d.ndim != 2:
    raise ValueError(f"project expects a 2-D array (B, N); got shape {x2d.shape}.")
  b, n = x2d.shape
  k = int(k)
  # With row0, x2d is one device's slice of the rows of a larger x: k counts
  # the columns of the whole sketch, which may exceed the slice's rows.
  if k < 1 or (row0 is None and k > max(b, 1)):
    raise ValueError(f"sketch size k={k} must be in [1, B={b}].")
  if row0 is not None and kind in ("dct", "dft", "orthogonal"):
    raise ValueError(f"the {kind} sketch mixes all B rows (an FFT or a QR over them), so it cannot be "
                     "taken over a slice of the rows: row0 is for gaussian, rademacher and "
                     "countsketch.")
  k0, k1 = rng.sketch_words(key)
  if b == 0 or n == 0:  # an empty sum, on every path
    return jnp.zeros((k, n), jnp.float32)
  if ext.active_path() == "ffi" and row0 is None:
    kernel = ext.sketch_kernel(kind)
    if kernel is not None:
      return kernel(x2d, k0, k1, k).astype(jnp.float32)
  if kind in ("dct", "dft"):
    return _project_trig(kind, x2d, k0, k1, k, signs=True)
  if kind == "orthogonal":
    return _project_orthogonal(x2d, k0, k1, k, precision)
  rows = block_rows or _default_block_rows(kind, b, n, k)
  return _project_rows(kind, x2d, k0, k1, k, min(int(rows), b), precision,
                       jnp.uint32(0) if row0 is None else jnp.asarray(row0, jnp.uint32))


def block_keys(key: jax.Array, blocks: int) -> jax.Array:
  """Key words (C, 2) of the C blocks of a block-diagonal sketch (module docstring).

  Example:
    >>> import jax
    >>> from fewbit_jax import sketch
    >>> sketch.block_keys(jax.random.key(0), 4).shape
    (4, 2)
  """
  if int(blocks) == 1:  # `project` mixes these as it mixes the key: one block is no block
    return jnp.stack(rng.key_words(key))[None]
  k0, k1 = rng.sketch_words(key)
  return _hash.block_key_words(k0, k1, jnp.arange(int(blocks), dtype=jnp.uint32))


def _block_args(name: str, x3d, keys) -> jax.Array:
  """`keys` as an array, checked against the (C, R, N) blocks `x3d`: one raw uint32 key per block."""
  if x3d.ndim != 3:
    raise ValueError(f"{name} expects a 3-D array (C, R, N); got shape {x3d.shape}.")
  keys = jnp.asarray(keys)
  if keys.shape != (x3d.shape[0], 2) or keys.dtype != jnp.uint32:
    raise ValueError(f"keys must be uint32 of shape (C, 2) = ({x3d.shape[0]}, 2), one raw key "
                     f"per block (see block_keys); got {keys.dtype} {keys.shape}.")
  return keys


def project_blocks(kind: str, x3d: jax.Array, keys: jax.Array, k: int, *, precision=None,
                   row0=None) -> jax.Array:
  """``S_c^T x3d[c]`` for every block c: the block-diagonal sketch, (C, k, N) float32.

  Block c is sketched by `project` with the raw key ``keys[c]`` and k columns,
  so ``project_blocks(kind, x.reshape(C, B // C, N), block_keys(key, C), k)``
  is the sketch ``S^T x`` of the block-diagonal S (``C * k`` columns) of the
  module docstring, kept as (C, k, N). The estimate of ``x^T g`` is the sum
  over blocks, ``einsum('ckn,ckm->nm', sx, sg)``.

  Args:
    kind: one of `FIXED_KINDS`.
    x3d: array (C, R, N): C blocks of R rows.
    keys: uint32 (C, 2), e.g. from `block_keys`.
    k: columns per block, ``1 <= k <= R``.
    precision: as in `project`.
    row0: as in `project`, the same for every block.

  Returns:
    float32 array (C, k, N).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import sketch
    >>> x = jnp.ones((8, 3))
    >>> key = jax.random.key(0)
    >>> sx = sketch.project_blocks("gaussian", x.reshape(2, 4, 3), sketch.block_keys(key, 2), 2)
    >>> s = sketch.sketch_matrix("gaussian", key, 8, 2, blocks=2)  # (8, 4), block-diagonal
    >>> bool(jnp.allclose(sx.reshape(4, 3), s.T @ x, atol=1e-5))
    True
  """
  _check_fixed(kind, "project_blocks")
  keys = _block_args("project_blocks", x3d, keys)
  one = lambda xb, kb: project(kind, xb, kb, k, precision=precision, row0=row0)
  if x3d.shape[0] == 1:
    return one(x3d[0], keys[0])[None]
  return jax.vmap(one)(x3d, keys)


# --- gaussian, rademacher, countsketch: loop over blocks of rows -------------

# Adding a 0 tied to the data (`_order.zero_of`) to the counters of a sketch
# ties the sketch to the array it is applied to. Otherwise S depends on the
# key alone, and XLA hoists its blocks out of the loop, computes them at the
# start of the program, or merges the forward's and the backward's S (same
# key) into one buffer kept alive across the whole model: the memory the
# sketch was meant to save.
_zero_of = _order.zero_of


def _zero_of_whole(x2d):
  """`_zero_of` for an array that a loop reads: computed by a matmul over all of it.

  A sketch loop reads x2d as a whole (so does the layer's matmul), but any
  other use of it outside the loop, even of one element, is a consumer into
  which XLA fuses, and so duplicates, the code that produced x2d. When that
  code is expensive (an exact GELU's erfc) XLA then keeps its intermediates
  as whole arrays for both copies: three or four more arrays of x's size. A
  matmul reads x2d as it is; this one, (1, B) ones times x2d, costs one more
  pass over x2d.
  """
  ones = jnp.ones((1, x2d.shape[0]), x2d.dtype)
  return _zero_of(lax.dot_general(ones, x2d, (((1,), (0,)), ((), ()))))


def _row_contribution(kind, xb, rows, valid, k0, k1, k, precision):
  """S[rows]^T xb for one block; rows not `valid` contribute nothing."""
  if kind == "countsketch":
    bucket = _hash.bucket(k0, k1, rows, k)
    sign = _hash.sign(k0, k1, rows)
    upd = jnp.where(valid, sign, 0.0)[:, None] * xb
    return lambda acc: acc.at[bucket.astype(jnp.int32)].add(upd)
  s = jnp.where(valid[:, None], _hash.rows_matrix(kind, k0, k1, rows, k), 0.0)
  part = lax.dot_general(s, xb, _DIMS_T, precision=precision,
                         preferred_element_type=jnp.float32)
  return lambda acc: acc + part


def _project_rows(kind, x2d, k0, k1, k, bs, precision, row0):
  b, n = x2d.shape
  nblocks = -(-b // bs)

  def step(t, acc):
    # The last block is shifted back to stay inside x (no padded copy of x);
    # rows it shares with the previous block are masked out.
    start = jnp.minimum(t * bs, b - bs)
    xb = lax.dynamic_slice_in_dim(x2d, start, bs, axis=0).astype(jnp.float32)
    rows = start + jnp.arange(bs, dtype=jnp.int32)
    valid = rows >= t * bs
    rows = rows.astype(jnp.uint32) + (row0 + _zero_of(xb))
    return _row_contribution(kind, xb, rows, valid, k0, k1, k, precision)(acc)

  # Every block is read inside the loop (see _zero_of_whole). The zeros the
  # sum starts from are tied to x: shared zeros would be one more (k, N)
  # buffer, copied once per loop, and zeros tied to the key alone are
  # computed at the start of the program and kept until the loop runs.
  acc = jnp.zeros((k, n), jnp.float32) + _zero_of_whole(x2d).astype(jnp.float32)
  return lax.fori_loop(0, nblocks, step, acc)


_sign = _hash.sign


# --- dct, dft: FFT over blocks of columns ------------------------------------

def _chosen(k0, k1, b, k):
  """The k basis indices of dct/dft, in order: smallest (hash, index) first."""
  idx = jnp.arange(b, dtype=jnp.uint32)
  order = jnp.argsort(_hash.order_bits(k0, k1, idx), stable=True)
  return order[:k].astype(jnp.int32)


def _trig_weights(kind, m, b, k):
  """For basis indices m: rfft bin, and weights of its real and imaginary parts.

  Column m of the basis applied to v (dct: Makhoul's reordering of x) is
  ``wr * Re(rfft(v)[bin]) + wi * Im(rfft(v)[bin])``, already scaled by sqrt(B/k).
  """
  scale = math.sqrt(b / k)
  half = b // 2
  if kind == "dct":
    # X[m] = s_m Re(V[m] exp(-i pi m / 2B)), V = fft(v); V[m] = conj(V[B-m]).
    upper = m > half
    binx = jnp.where(upper, b - m, m)
    theta = m.astype(jnp.float32) * jnp.float32(math.pi / (2 * b))
    s = jnp.where(m == 0, math.sqrt(1.0 / b), math.sqrt(2.0 / b)) * scale
    wr = s * jnp.cos(theta)
    wi = jnp.where(upper, -1.0, 1.0) * s * jnp.sin(theta)
    return binx, wr.astype(jnp.float32), wi.astype(jnp.float32)
  # dft: rfft(x)[f] = sum x cos(2 pi f i / B) - i sum x sin(2 pi f i / B).
  binx = (m + 1) // 2
  is_sin = (m > 0) & (m % 2 == 0)
  lone = (m == 0) | ((b % 2 == 0) & (m == b - 1))  # constant and alternating
  s = jnp.where(lone, math.sqrt(1.0 / b), math.sqrt(2.0 / b)) * scale
  wr = jnp.where(is_sin, 0.0, s)
  wi = jnp.where(is_sin, -s, 0.0)
  return binx, wr.astype(jnp.float32), wi.astype(jnp.float32)


def _project_trig(kind, x2d, k0, k1, k, *, signs: bool = True, block_cols=None):
  b, n = x2d.shape
  zero = _zero_of_whole(x2d)
  m = _chosen(k0, k1 + zero, b, k)
  binx, wr, wi = _trig_weights(kind, m, b, k)
  sign = _sign(k0, k1 + zero, jnp.arange(b, dtype=jnp.uint32)) if signs else None
  nb = int(block_cols or max(1, min(n, _BLOCK_ELEMS // (2 * b))))
  nblocks = -(-n // nb)

  def step(t, out):
    # Columns are independent, so the shifted last block just recomputes some.
    start = jnp.minimum(t * nb, n - nb)
    xb = lax.dynamic_slice_in_dim(x2d, start, nb, axis=1).astype(jnp.float32).T
    if sign is not None:
      xb = xb * sign[None, :]
    if kind == "dct":
      xb = jnp.concatenate([xb[:, 0::2], xb[:, 1::2][:, ::-1]], axis=1)
    v = jnp.fft.rfft(xb, axis=1)[:, binx]  # (nb, k)
    part = (v.real * wr[None, :] + v.imag * wi[None, :]).T
    return lax.dynamic_update_slice_in_dim(out, part, start, axis=1)

  # Zeros tied to x: shared zeros would be copied once per loop and allocated
  # at the start of the program.
  out = jnp.zeros((k, n), jnp.float32) + zero.astype(jnp.float32)
  if nblocks == 1:
    return step(jnp.int32(0), out)
  return lax.fori_loop(0, nblocks, step, out)


# --- orthogonal: the QR of gaussian's matrix -----------------------------------

def _orthogonal_matrix(k0, k1, b: int, k: int) -> jax.Array:
  """``sqrt(B / k) Q`` (B, k) float32, Q from the QR of ``G[i, j] = rng.gaussian(k0, k1, i, j)``."""
  rows = jnp.arange(b, dtype=jnp.uint32)[:, None]
  cols = jnp.arange(k, dtype=jnp.uint32)[None, :]
  q, _ = jnp.linalg.qr(rng.gaussian(k0, k1, rows, cols))
  return q * jnp.float32(math.sqrt(b / k))


def _project_orthogonal(x2d, k0, k1, k, precision):
  # S tied to x (see _zero_of): a key-only S would be hoisted, or shared with
  # the backward's, and kept alive between them.
  s = _orthogonal_matrix(k0, k1 + _zero_of_whole(x2d), x2d.shape[0], k)
  return lax.dot_general(s, x2d.astype(jnp.float32), _DIMS_T, precision=precision,
                         preferred_element_type=jnp.float32)


# --- sampled, wta: rows chosen by their norms ------------------------------------

def sample_rows(kind: str, x2d: jax.Array, key: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k rows of x2d that the sampled sketch `kind` chooses: (rows, indices).

  ``rows[j] = w_j * x2d[idx[j]]`` with the weights of the module docstring,
  so that ``rows.T @ take_rows(g, idx)`` is an unbiased estimate of
  ``x2d.T @ g`` for any g (B, M) with the rows of x2d.

  Args:
    kind: one of `SAMPLED_KINDS`.
    x2d: array (B, N) of any float dtype.
    key: a PRNG key (typed or raw uint32[2]).
    k: rows to keep, ``1 <= k <= B``.

  Returns:
    (rows float32 (k, N), idx int32 (k,)).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import sketch
    >>> x = jnp.array([[3.0, 4.0], [0.0, 0.0], [0.0, 1.0]])
    >>> rows, idx = sketch.sample_rows("wta", x, jax.random.key(0), 2)
    >>> idx.tolist()  # the row of norm 5 reaches inclusion 1, the zero row is never drawn
    [0, 2]
    >>> bool(jnp.allclose(rows.T @ sketch.take_rows(x, idx), x.T @ x))
    True
  """
  check_kind(kind)
  if kind not in SAMPLED_KINDS:
    raise ValueError(f"sample_rows takes a sampled sketch ({', '.join(SAMPLED_KINDS)}); "
                     f"{kind!r} has a fixed S: use project.")
  if x2d.ndim != 2:
    raise ValueError(f"sample_rows expects a 2-D array (B, N); got shape {x2d.shape}.")
  b, n = x2d.shape
  k = int(k)
  if not 1 <= k <= max(b, 1):
    raise ValueError(f"sketch size k={k} must be in [1, B={b}].")
  if b == 0:
    return jnp.zeros((k, n), jnp.float32), jnp.zeros((k,), jnp.int32)
  k0, k1 = rng.sketch_words(key)
  return _sampling.sample(kind, x2d, k0, k1, k)


def sample_rows_blocks(kind: str, x3d: jax.Array, keys: jax.Array,
                       k: int) -> tuple[jax.Array, jax.Array]:
  """`sample_rows` of every block: (rows (C, k, N) float32, idx (C, k) int32, within the block).

  Block c is sampled with the raw key ``keys[c]`` (as in `project_blocks`):
  the estimate of ``x^T g`` is ``einsum('ckn,ckm->nm', rows, take_rows(g3d, idx))``.
  Each block's rows are chosen from that block alone, so blocks on different
  devices need no communication (for x3d typed on an Explicit mesh the
  blocks are sampled shard by shard; where its features are sharded too, the
  row norms are summed over those mesh axes: B floats).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import sketch
    >>> x = jnp.ones((8, 3)).reshape(2, 4, 3)
    >>> rows, idx = sketch.sample_rows_blocks("sampled", x, sketch.block_keys(jax.random.key(0), 2), 2)
    >>> rows.shape, idx.shape
    ((2, 2, 3), (2, 2))
  """
  check_kind(kind)
  keys = _block_args("sample_rows_blocks", x3d, keys)
  if kind not in SAMPLED_KINDS:
    raise ValueError(f"sample_rows_blocks takes a sampled sketch ({', '.join(SAMPLED_KINDS)}); "
                     f"{kind!r} has a fixed S: use project_blocks.")
  k = int(k)
  if not 1 <= k <= max(x3d.shape[1], 1):
    raise ValueError(f"sketch size k={k} must be in [1, R={x3d.shape[1]}] (rows per block).")
  if x3d.shape[1] == 0:
    return (jnp.zeros((x3d.shape[0], k, x3d.shape[2]), jnp.float32),
            jnp.zeros((x3d.shape[0], k), jnp.int32))
  # Raw key words, mixed as `project` mixes any key.
  words = jax.vmap(lambda kb: jnp.stack(rng.sketch_words(kb)))(keys)
  return _sampling.sample_blocks(kind, x3d, words, k)


def quantize_rows(x: jax.Array, key: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """x (..., B, N) kept at `bits` bits an element by unbiased stochastic rounding.

  Each row is rounded on ``2^bits`` levels spanning ``[-s, s]``, s its
  largest magnitude, to the level below or above each element with the
  probabilities that make its expectation the element (uniforms from `key`,
  the row and the column). ``dequantize_rows`` gives x^ with ``E[x^] = x``.
  For blocks (C, R, N) pass `block_keys` (C keys, one per block: a block's
  rounding never reads another's).

  Args:
    x: array (B, N), or (C, R, N) with `key` of shape (C, 2) (raw keys).
    key: a PRNG key (typed or raw uint32[2]), or (C, 2) raw keys for blocks.
    bits: 1 to `fewbit_jax.codes.MAX_BITS`.

  Returns:
    (packed codes uint32 (..., B, bits, ceil(N / 32)), scales float32 (..., B)).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import sketch
    >>> x = jnp.array([[0.5, -1.0, 0.25, 1.0]])
    >>> keys = jax.random.split(jax.random.key(0), 4000)
    >>> mean = jnp.mean(jax.vmap(lambda k: sketch.dequantize_rows(
    ...     *sketch.quantize_rows(x, k, 1), 1, 4))(keys), axis=0)
    >>> bool(jnp.allclose(mean, x, atol=0.05))   # 1 bit: each element is +-1, mean x
    True
  """
  from fewbit_jax import codes as _codes
  bits = _codes.check_bits(bits)
  if x.ndim == 3:
    keys = _block_args("quantize_rows", x, key)
    words = jax.vmap(lambda kb: jnp.stack(rng.sketch_words(kb)))(keys)
    return _quantized.quantize_blocks(x, words, bits)
  if x.ndim != 2:
    raise ValueError(f"quantize_rows expects x of shape (B, N) or blocks (C, R, N); got "
                     f"{x.shape}.")
  k0, k1 = rng.sketch_words(key)
  return _quantized.quantize(x, k0, k1, bits)


def dequantize_rows(packed: jax.Array, scale: jax.Array, bits: int, n: int) -> jax.Array:
  """x^ float32 (..., N) from `quantize_rows`'s codes and scales (`n` the columns of x).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import sketch
    >>> x = jnp.array([[-2.0, 0.0, 2.0]])
    >>> sketch.dequantize_rows(*sketch.quantize_rows(x, jax.random.key(0), 1), 1, 3)[0, ::2]
    Array([-2.,  2.], dtype=float32)
  """
  return _quantized.dequantize(packed, scale, bits, n)


def take_rows(g: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows `idx` of g, float32: g (B, M) with idx (k,), or blocks g (C, R, M) with idx (C, k).

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import sketch
    >>> sketch.take_rows(jnp.arange(6.0).reshape(3, 2), jnp.array([2, 0])).tolist()
    [[4.0, 5.0], [0.0, 1.0]]
  """
  if g.ndim != idx.ndim + 1:
    raise ValueError(f"take_rows takes g (B, M) with idx (k,), or g (C, R, M) with idx (C, k); "
                     f"got g {g.shape} and idx {idx.shape}.")
  return jnp.take_along_axis(g, idx[..., None].astype(jnp.int32), axis=-2).astype(jnp.float32)


# --- reference ---------------------------------------------------------------

def sketch_matrix(kind: str, key: jax.Array, b: int, k: int, *, blocks: int = 1) -> jax.Array:
  """The whole sketch S (B x k, float32), straight from the definitions.

  For tests and small sizes only: `project` never builds it. For every kind,
  ``project(kind, x, key, k) == sketch_matrix(kind, key, B, k).T @ x`` up to
  float32 rounding. With ``blocks=C`` (dividing B), the block-diagonal sketch
  of `project_blocks`: B x (C k), block c being the sketch of
  ``block_keys(key, C)[c]`` over B / C rows with k columns.

  Example:
    >>> import jax
    >>> from fewbit_jax import sketch
    >>> s = sketch.sketch_matrix("countsketch", jax.random.key(0), 5, 2)
    >>> s.shape, int((s != 0).sum())
    ((5, 2), 5)
  """
  _check_fixed(kind, "sketch_matrix")
  if blocks != 1:
    if blocks < 1 or b % blocks:
      raise ValueError(f"blocks={blocks} must be a positive divisor of B={b}.")
    parts = [sketch_matrix(kind, kc, b // blocks, k) for kc in block_keys(key, blocks)]
    return jax.scipy.linalg.block_diag(*parts)
  k0, k1 = rng.sketch_words(key)
  if kind == "orthogonal":
    return _orthogonal_matrix(k0, k1, b, k)
  i = jnp.arange(b, dtype=jnp.uint32)[:, None]
  j = jnp.arange(k, dtype=jnp.uint32)[None, :]
  if kind in ("gaussian", "rademacher"):
    return _hash.entry(kind, k0, k1, i, j) / np.float32(math.sqrt(k))
  sign = _hash.sign(k0, k1, i[:, 0])[:, None]
  if kind == "countsketch":
    return jnp.where(_hash.bucket(k0, k1, i[:, 0], k)[:, None] == j, sign, 0.0)
  m = _chosen(k0, k1, b, k)[None, :].astype(jnp.float32)
  fi = i.astype(jnp.float32)
  if kind == "dct":
    s = jnp.where(m == 0, math.sqrt(1.0 / b), math.sqrt(2.0 / b))
    basis = s * jnp.cos(jnp.pi * (2 * fi + 1) * m / (2 * b))
  else:
    f = jnp.floor((m + 1) / 2)
    ang = 2 * jnp.pi * jnp.mod(f * fi, b) / b
    lone = (m == 0) | ((b % 2 == 0) & (m == b - 1))
    s = jnp.where(lone, math.sqrt(1.0 / b), math.sqrt(2.0 / b))
    basis = s * jnp.where((m > 0) & (jnp.mod(m, 2) == 0), jnp.sin(ang), jnp.cos(ang))
  return (sign * basis * math.sqrt(b / k)).astype(jnp.float32)


# --- variance of the estimate ----------------------------------------------------

def _trig_basis(kind: str, b: int) -> np.ndarray:
  """Rows: the orthonormal dct/dft basis of size B in the index order above (float64)."""
  i = np.arange(b)
  if kind == "dct":
    m = np.arange(b)[:, None]
    scale = np.where(m == 0, math.sqrt(1.0 / b), math.sqrt(2.0 / b))
    return scale * np.cos(np.pi * (2 * i[None, :] + 1) * m / (2 * b))
  m = np.arange(b)[:, None]
  f = (m + 1) // 2
  ang = 2 * np.pi * ((f * i[None, :]) % b) / b
  lone = (m == 0) | ((b % 2 == 0) & (m == b - 1))
  scale = np.where(lone, math.sqrt(1.0 / b), math.sqrt(2.0 / b))
  return scale * np.where((m > 0) & (m % 2 == 0), np.sin(ang), np.cos(ang))


def estimate_variance(kind: str, x, g, k: int, *, signs: bool = True) -> np.ndarray:
  """Variance over keys of each entry of ``(S^T x)^T (S^T g)``, the dW estimate.

  In float64 with numpy, for choosing a kind and k for given data; dct/dft
  build a B x B basis, so keep B small (hundreds). With ``a = x[:, n]``,
  ``b = g[:, m]``:

  * gaussian: ``((a.b)^2 + |a|^2 |b|^2) / k`` (each of the k terms
    ``(z.a)(z.b)``, z ~ N(0, I), has that variance by Isserlis' theorem).
  * rademacher, countsketch: ``((a.b)^2 + |a|^2 |b|^2 - 2 sum_i a_i^2 b_i^2) / k``
    (fourth moments of +-1 signs pair up; for countsketch the pairs collide
    in a bucket with probability 1/k). Never more than gaussian's.
  * dct, dft: k of the B basis vectors r_j drawn without replacement and
    scaled by B/k: for fixed signs, with ``z_j = (r_j.Da)(r_j.Db)``,
    ``B (B - k) / (k (B - 1)) * (sum_j z_j^2 - (a.b)^2 / B)``, averaged over
    the random signs D. ``signs=False`` gives the variance without the signs
    (the original fewbit kinds, with the unbiased scale), for comparison.
  * orthogonal: ``(B - k) / (k (B - 1) (B + 2)) * (B |a|^2 |b|^2 + (B - 2) (a.b)^2)``
    (the second moments of a uniformly random rank-k projection), about
    ``1 - k / B`` times gaussian's.
  * sampled: ``(sum_i a_i^2 b_i^2 / p_i - (a.b)^2) / k`` with
    ``p_i = |x_i| / sum_l |x_l|`` (k independent draws).
  * wta: exact, as the mean over the pieces of [0, 1) on which the one
    uniform of the systematic draw gives the same rows (a loop over up to B
    pieces, each an estimate of x^T g: keep B, N and M small).

  Args:
    kind: one of `ALL_KINDS`.
    x: (B, N) array.
    g: (B, M) array.
    k: sketch size.
    signs: dct/dft only, see above.

  Returns:
    float64 array (N, M).

  Example:
    >>> import numpy as np
    >>> from fewbit_jax import sketch
    >>> x, g = np.ones((8, 1)), np.ones((8, 1))
    >>> float(sketch.estimate_variance("gaussian", x, g, 4)[0, 0])  # (64 + 64) / 4
    32.0
    >>> float(sketch.estimate_variance("countsketch", x, g, 4)[0, 0])  # (64 + 64 - 16) / 4
    28.0
  """
  check_kind(kind)
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  if x.ndim != 2 or g.ndim != 2 or x.shape[0] != g.shape[0]:
    raise ValueError(f"x (B, N) and g (B, M) must be 2-D with the same B; got x {x.shape} "
                     f"and g {g.shape}.")
  b = x.shape[0]
  k = int(k)
  if not 1 <= k <= max(b, 1) or (kind in ("dct", "dft") and b == 0):
    raise ValueError(f"sketch size k={k} must be in [1, B={b}] (and B >= 1 for {kind}).")
  t = x.T @ g
  if kind == "wta":
    return _sampling.wta_variance(x, g, k)
  if kind == "sampled":
    p = _sampling.inclusion_weights(kind, np.sqrt((x ** 2).sum(1)), k)
    inv = np.where(p > 0, 1.0 / np.where(p > 0, p, 1.0), 0.0)
    return ((x ** 2 * inv[:, None]).T @ (g ** 2) - t ** 2) / k
  outer = np.outer((x ** 2).sum(0), (g ** 2).sum(0))
  if kind == "orthogonal":
    if k == b:
      return np.zeros_like(t)
    return (b - k) / (k * (b - 1) * (b + 2)) * (b * outer + (b - 2) * t ** 2)
  if kind == "gaussian":
    return (t ** 2 + outer) / k
  if kind in ("rademacher", "countsketch"):
    return (t ** 2 + outer - 2 * (x ** 2).T @ (g ** 2)) / k
  if k == b:  # every basis vector is chosen: S S^T = I, the estimate is exact
    return np.zeros_like(t)
  r = _trig_basis(kind, b)
  if signs:
    # E_D[z_j^2] = (sum_i P_ji a_i^2)(sum_i P_ji b_i^2) + 2 (sum_i P_ji a_i b_i)^2
    #              - 2 sum_i P_ji^2 a_i^2 b_i^2,  P = r^2 (pairings of the signs).
    p = r ** 2
    xg = np.einsum("in,im->inm", x, g)
    sum_z2 = (np.einsum("jn,jm->nm", p @ x ** 2, p @ g ** 2)
              + 2 * (np.einsum("ji,inm->jnm", p, xg) ** 2).sum(0)
              - 2 * np.einsum("ji,inm->nm", p ** 2, xg ** 2))
  else:
    sum_z2 = np.einsum("jn,jm->nm", (r @ x) ** 2, (r @ g) ** 2)
  return b * (b - k) / (k * (b - 1)) * (sum_z2 - t ** 2 / b)
