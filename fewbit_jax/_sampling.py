"""Row sampling for the ``sampled`` and ``wta`` sketches (see `fewbit_jax.sketch`).

Both choose k of the B rows of x from their norms ``a_i = |x_i|`` and a key,
and return the chosen rows' indices and weights ``w``, so that
``sum_j w_j x[idx_j]^T g[idx_j]`` is an unbiased estimate of ``x^T g`` for
any g (the backward pass gathers the same rows of g):

* ``sampled``: k rows drawn independently, with replacement, row i with
  probability ``p_i = a_i / sum(a)``: draw j takes the row where
  ``u_j sum(a)`` falls in the running sum of a, ``u_j`` uniform in [0, 1)
  from the key; weight ``1 / (k p_i)``.
* ``wta``: the rows whose inclusion probability would reach 1 are kept
  (weight 1): the t largest, t the smallest count for which the largest
  remaining row has ``(k - t) a_i < sum of the remaining a`` (the
  "take-all" rule of sampling proportional to size). The other k - t rows
  are drawn without replacement by systematic sampling over the remaining
  rows in their order, inclusion probability ``pi_i = (k - t) a_i / sum of
  the remaining a`` (< 1, so no row twice), from one uniform u: the rows
  where ``u + 0, u + 1, ..., u + k - t - 1`` fall in their running sum of
  pi. Weight ``1 / pi_i`` (Horvitz-Thompson).

Rows of norm 0 are never drawn (where all are 0 the weights are 0 and so is
the estimate, which is then exact).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fewbit_jax import _mesh, _rng as rng

SAMPLED_KINDS = ("sampled", "wta")

# hash4 counter `b` of the uniforms (apart from _hash's BUCKET, SIGN, ORDER, BLOCK_K0/1).
_DRAW = 5


def row_norms(x2d, feature_axes=()) -> jax.Array:
  """|x_i| (B,) float32; inside a shard_map, summed over the mesh axes `feature_axes` too."""
  x = x2d.astype(jnp.float32)
  sq = jnp.sum(x * x, axis=1)
  if feature_axes:
    sq = jax.lax.psum(sq, feature_axes)
  return jnp.sqrt(sq)


def sample(kind: str, x2d, k0, k1, k: int, feature_axes=()):
  """(w_j x2d[idx_j] float32 (k, N), idx int32 (k,)): the rows `kind` keeps."""
  idx, w = choose(kind, row_norms(x2d, feature_axes), k0, k1, k)
  return jnp.asarray(x2d)[idx].astype(jnp.float32) * w[:, None], idx


def sample_blocks(kind: str, x3d, keys, k: int):
  """`sample` of every block (C, R, N) with its key words (C, 2): ((C, k, N), (C, k)).

  For x3d typed on an Explicit mesh, the blocks are sampled shard by shard
  (a shard_map over its Explicit axes): a block's rows never leave their
  device; where x3d's features are sharded, the row norms are summed over
  those axes (B floats per device).
  """
  one = lambda xb, kb: sample(kind, xb, kb[0], kb[1], k)
  spec = _mesh.explicit_spec(x3d)
  if spec is None or all(e is None for e in spec):
    if x3d.shape[0] == 1:
      rows, idx = one(x3d[0], keys[0])
      return rows[None], idx[None]
    return jax.vmap(one)(x3d, keys)
  mesh = jax.typeof(x3d).sharding.mesh
  x_spec = P(spec[0], None, spec[2])  # the rows of a block on one device
  feature_axes = tuple(_mesh.axes(spec[2]))

  def local(xs, ks):
    return jax.vmap(lambda xb, kb: sample(kind, xb, kb[0], kb[1], k, feature_axes))(xs, ks)

  x3d = jax.sharding.reshard(x3d, NamedSharding(mesh, x_spec))
  keys = jax.sharding.reshard(keys, NamedSharding(mesh, P(spec[0], None)))
  return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, P(spec[0], None)),
                       out_specs=(x_spec, P(spec[0], None)),
                       axis_names=_mesh.explicit_axes(mesh))(x3d, keys)


def uniforms(k0, k1, count: int) -> jax.Array:
  """`count` uniforms in [0, 1) from the key words."""
  j = jnp.arange(count, dtype=jnp.uint32)
  return 1.0 - rng.uniform01(rng.hash4(k0, k1, j, _DRAW))


def take_all(a, k: int):
  """(t, order): the number t of rows kept for certain by `wta`, and the rows by descending a."""
  order = jnp.argsort(-a, stable=True)
  s = a[order]
  suffix = jnp.cumsum(s[::-1])[::-1]  # suffix[t] = sum of s[t:]
  t = jnp.arange(k, dtype=jnp.float32)
  ok = (k - t) * s[:k] < suffix[:k]
  return jnp.where(jnp.any(ok), jnp.argmax(ok), k).astype(jnp.int32), order


def choose(kind: str, a, k0, k1, k: int):
  """(idx int32 (k,), weight float32 (k,)) of `kind` for row norms `a` (B,)."""
  b = a.shape[0]
  a = a.astype(jnp.float32)
  if kind == "sampled":
    total = jnp.sum(a)
    c = jnp.cumsum(a)
    idx = jnp.searchsorted(c, uniforms(k0, k1, k) * total, side="right")
    idx = jnp.minimum(idx, b - 1).astype(jnp.int32)
    ai = a[idx]
    w = jnp.where(ai > 0, total / (k * jnp.where(ai > 0, ai, 1.0)), 0.0)
    return idx, w
  if kind != "wta":
    raise ValueError(f"unknown sampled sketch {kind!r}: expected one of {SAMPLED_KINDS}.")
  t, order = take_all(a, k)
  certain = jnp.zeros(b, bool).at[order].set(jnp.arange(b) < t)
  rest = jnp.where(certain, 0.0, a)
  m = k - t  # rows to draw
  q = m.astype(jnp.float32) * rest / jnp.maximum(jnp.sum(rest), jnp.finfo(jnp.float32).tiny)
  c = jnp.cumsum(q)
  total = c[-1]
  j = jnp.arange(k, dtype=jnp.int32)
  u = uniforms(k0, k1, 1)[0]
  # Points u + j - t of [0, m), stretched to the running sum's own total so
  # that rounding never puts one past the last row with pi > 0.
  pts = (u + (j - t).astype(jnp.float32)) * (total / jnp.maximum(m, 1).astype(jnp.float32))
  drawn = jnp.minimum(jnp.searchsorted(c, pts, side="right"), b - 1).astype(jnp.int32)
  idx = jnp.where(j < t, order[jnp.minimum(j, b - 1)].astype(jnp.int32), drawn)
  pi = q[idx]
  w = jnp.where(j < t, 1.0, jnp.where(pi > 0, 1.0 / jnp.where(pi > 0, pi, 1.0), 0.0))
  return idx, w


def inclusion_weights(kind: str, a: np.ndarray, k: int) -> np.ndarray:
  """float64 (B,): sampled: the draw probabilities p; wta: the inclusion probabilities pi."""
  a = np.asarray(a, np.float64)
  total = a.sum()
  if kind == "sampled":
    return a / total if total > 0 else np.zeros_like(a)
  order = np.argsort(-a, kind="stable")
  s = a[order]
  suffix = np.cumsum(s[::-1])[::-1]
  t = next((t for t in range(k) if (k - t) * s[t] < suffix[t]), k)
  pi = np.zeros_like(a)
  pi[order[:t]] = 1.0
  if t < k:
    rest = order[t:]
    pi[rest] = (k - t) * a[rest] / suffix[t]
  return pi


def wta_variance(x: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
  """Exact variance (N, M) of the wta estimate, over its one uniform u (float64).

  The drawn set is constant between the points where u crosses a fractional
  part of the running sum of pi: average the squared error over those pieces.
  """
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  a = np.sqrt((x ** 2).sum(1))
  pi = inclusion_weights("wta", a, k)
  certain = pi >= 1.0
  q = np.where(certain, 0.0, pi)
  c = np.cumsum(q)
  m = int(round(c[-1])) if q.any() else 0
  truth = x.T @ g
  fixed = x[certain].T @ g[certain]
  if m == 0:
    return np.zeros_like(truth)
  c = c * (m / c[-1])  # a total of exactly m, so that u + m - 1 < c[-1]
  cuts = np.unique(np.concatenate([[0.0, 1.0], np.mod(c, 1.0)]))
  cuts = cuts[(cuts >= 0) & (cuts <= 1)]
  var = np.zeros_like(truth)
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    if hi - lo <= 0:
      continue
    u = 0.5 * (lo + hi)
    idx = np.minimum(np.searchsorted(c, u + np.arange(m), side="right"), len(c) - 1)
    est = fixed + (x[idx] / q[idx, None]).T @ g[idx]
    var += (hi - lo) * (est - truth) ** 2
  return var
