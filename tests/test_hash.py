"""fewbit_jax._hash: the one definition of the sketches' random entries."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewbit_jax import _hash, ext, _rng as rng, sketch
from fewbit_jax._ffi import _sketch_op

KEY = (jnp.uint32(0x12345678), jnp.uint32(0x9ABCDEF0))


def test_counters_are_distinct():
  counters = (_hash.BUCKET, _hash.SIGN, _hash.ORDER, _hash.BLOCK_K0, _hash.BLOCK_K1)
  assert counters == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "countsketch"])
@pytest.mark.parametrize("row0", [0, 1000])
def test_rows_matrix_is_the_kernels_twin(kind, row0):
  # The C++ kernel's S^T x of the identity is S^T itself (one term per sum,
  # so exact): its entries are those of _hash, bit for bit where no
  # transcendental is involved (gaussian: log/cos of two libraries, a few ulps).
  if not ext.available():
    pytest.skip("compiled kernels not built")
  rows = jnp.uint32(row0) + jnp.arange(37, dtype=jnp.uint32)
  k0, k1 = KEY
  ours = jax.jit(_hash.rows_matrix, static_argnums=(0, 4))(kind, k0, k1, rows, 7)
  eye = jnp.zeros((row0 + 37, 37), jnp.float32).at[row0 + jnp.arange(37), jnp.arange(37)].set(1.0)
  with ext.mode("ffi"):
    st = ext.sketch_kernel(kind)(eye, k0, k1, 7)
  if kind == "gaussian":
    np.testing.assert_allclose(np.asarray(ours), np.asarray(st.T), rtol=4e-6, atol=1e-7)
  else:
    np.testing.assert_array_equal(np.asarray(ours).view(np.uint32), np.asarray(st.T).view(np.uint32))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "countsketch"])
def test_sketch_of_rows_is_the_sketch_ops_pure_twin(kind):
  x = jax.random.normal(jax.random.key(0), (40, 6))
  keys, row0 = jnp.stack(KEY), jnp.uint32(8)
  twin = jax.jit(lambda x: _sketch_op._sketch_pure_one(x, keys, row0, kind=kind, k=5))(x)  # pylint: disable=protected-access

  def ours(x):
    rows = row0 + jnp.arange(x.shape[0], dtype=jnp.uint32)
    if kind == "countsketch":
      return jax.ops.segment_sum(x * _hash.sign(*KEY, rows)[:, None],
                                 _hash.bucket(*KEY, rows, 5).astype(jnp.int32), num_segments=5)
    return jnp.dot(_hash.rows_matrix(kind, *KEY, rows, 5).T, x,
                   precision=jax.lax.Precision.HIGHEST)

  np.testing.assert_array_equal(jax.jit(ours)(x), twin)


def test_entries_follow_the_documented_definitions():
  i = jnp.arange(16, dtype=jnp.uint32)[:, None]
  j = jnp.arange(4, dtype=jnp.uint32)[None, :]
  k0, k1 = KEY
  np.testing.assert_array_equal(_hash.entry("gaussian", k0, k1, i, j), rng.gaussian(k0, k1, i, j))
  bits = np.asarray(rng.hash4(k0, k1, i, j))
  np.testing.assert_array_equal(_hash.entry("rademacher", k0, k1, i, j),
                                np.where(bits >> 31, -1.0, 1.0))
  rows = i[:, 0]
  np.testing.assert_array_equal(_hash.bucket(k0, k1, rows, 3), np.asarray(rng.hash4(k0, k1, rows, 0)) % 3)
  np.testing.assert_array_equal(_hash.sign(k0, k1, rows),
                                np.where(np.asarray(rng.hash4(k0, k1, rows, 1)) >> 31, -1.0, 1.0))
  np.testing.assert_array_equal(_hash.order_bits(k0, k1, rows), rng.hash4(k0, k1, rows, 2))
  words = _hash.block_key_words(k0, k1, rows)
  assert words.shape == (16, 2)
  np.testing.assert_array_equal(words[:, 1], rng.hash4(k0, k1, rows, 4))
  s = _hash.rows_matrix("gaussian", k0, k1, rows, 4)
  np.testing.assert_array_equal(s, rng.gaussian(k0, k1, i, j) * np.float32(1 / math.sqrt(4)))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "countsketch"])
def test_sketch_matrix_and_project_draw_the_same_entries(kind):
  key = jax.random.key(4)
  x = jax.random.normal(jax.random.key(1), (50, 3))
  with ext.mode("jax"):
    sx = sketch.project(kind, x, key, 6)
  s = sketch.sketch_matrix(kind, key, 50, 6)
  np.testing.assert_allclose(sx, s.T @ x, rtol=1e-5, atol=1e-5)
