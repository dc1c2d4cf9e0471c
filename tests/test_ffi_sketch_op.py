"""The sketch kernels against their definition and the pure-JAX path.

Sketch sums differ from the pure path's in float32 summation order, so the
comparisons use a tight tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewbit_jax import _hash, ext, _rng as rng
from fewbit_jax._ffi import _sketch_op

pytestmark = pytest.mark.skipif(not ext.available(), reason="fewbit_jax._xla_ext not built")

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _both(fn, *args):
  with ext.mode("ffi"):
    a = fn(*args)
  with ext.mode("jax"):
    return a, fn(*args)


def _sketch_reference(kind, x, k0, k1, k):
  """S^T x in float64 with S from the one definition in fewbit_jax._hash."""
  b = x.shape[0]
  rows = jnp.arange(b, dtype=jnp.uint32)
  s = np.asarray(_hash.rows_matrix(kind, k0, k1, rows, k), np.float64)
  return s.T @ np.asarray(x.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("kind", ext.SKETCH_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((1, 1), 1), ((37, 5), 4), ((300, 70), 61), ((513, 17), 130)])
def test_sketch_matches_definition(kind, dtype, shape, k):
  x = jax.random.normal(jax.random.key(9), shape).astype(dtype)
  k0, k1 = rng.key_words(jax.random.key(11))
  with ext.mode("ffi"):
    out = ext.sketch_kernel(kind)(x, k0, k1, k)
  assert out.shape == (k, shape[1]) and out.dtype == jnp.float32
  ref = _sketch_reference(kind, x, k0, k1, k)
  # float32 sums of B terms in another order: a few ulps of the sum of |terms|.
  rows = jnp.arange(shape[0], dtype=jnp.uint32)
  s = np.abs(np.asarray(_hash.rows_matrix(kind, k0, k1, rows, k)))
  bound = 4 * np.finfo(np.float32).eps * (s.T @ np.abs(np.asarray(x.astype(jnp.float32)))) + 1e-30
  assert np.all(np.abs(np.asarray(out) - ref) <= bound)


@pytest.mark.parametrize("kind", ext.SKETCH_KINDS)
def test_sketch_matches_fewbit_sketch(kind):
  sketch = pytest.importorskip("fewbit_jax.sketch")
  x = jax.random.normal(jax.random.key(12), (1000, 48))
  key = jax.random.key(13)
  a, b = _both(lambda x: sketch.project(kind, x, key, 200), x)
  assert a.dtype == b.dtype == jnp.float32
  scale = np.abs(np.asarray(b)).max()
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)
  if kind == "countsketch":  # one term per (row, column) in a bucket: few summands
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_sketch_groups_are_rows_of_one_sketch():
  """Partial sketches over row groups add up to the sketch of all rows.

  The kernel reads x (B, N) with no group axis and splits its rows into the G
  groups of keys (G, 2) and row0 (G,); the pure lowering does the same.
  """
  x = jax.random.normal(jax.random.key(14), (96, 20))
  k0, k1 = rng.key_words(jax.random.key(15))
  keys = jnp.stack([k0, k1])
  for kind in ext.SKETCH_KINDS:
    whole = _sketch_op._sketch_p.bind(x, keys[None], jnp.zeros((1,), jnp.uint32), kind=kind, k=9)
    assert whole.shape == (1, 9, 20)
    parts = _sketch_op._sketch_p.bind(x, jnp.broadcast_to(keys, (4, 2)),
                                      jnp.arange(4, dtype=jnp.uint32) * 24, kind=kind, k=9)
    assert parts.shape == (4, 9, 20)
    np.testing.assert_allclose(np.asarray(parts.sum(0)), np.asarray(whole[0]), rtol=1e-5,
                               atol=1e-5)
    # Group g is rows 24 g .. 24 g + 23 of x: the definition on that slice.
    for g in range(4):
      want = _sketch_op._sketch_pure(x[24 * g:24 * (g + 1)][None], keys[None],
                                     jnp.full((1,), 24 * g, jnp.uint32), kind=kind, k=9)[0]
      np.testing.assert_allclose(np.asarray(parts[g]), np.asarray(want), rtol=1e-5, atol=1e-5)
    # The lowering on platforms without kernels.
    pure = _sketch_op._sketch_pure_rows(x, jnp.broadcast_to(keys, (4, 2)),
                                        jnp.arange(4, dtype=jnp.uint32) * 24, kind=kind, k=9)
    np.testing.assert_allclose(np.asarray(pure), np.asarray(parts), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="G dividing B"):
    _sketch_op._sketch_p.bind(x, jnp.broadcast_to(keys, (5, 2)), jnp.zeros((5,), jnp.uint32),
                              kind="gaussian", k=3)


@pytest.mark.parametrize("kind", ext.SKETCH_KINDS)
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("lead", [(4096,), (16, 256)])
def test_matmul_and_sketch_share_one_copy_of_x(kind, groups, lead, monkeypatch):
  """An activation read by a matmul and by the sketch kernel is computed once.

  The kernel takes x (B, N) as the layer's matmul reads it. Given a reshaped
  view, XLA fused the activation into a second consumer and computed it
  twice (three B x N buffers for (16, 256, N) inputs, against one).
  """
  monkeypatch.setattr(_sketch_op, "_sketch_groups", lambda rows: groups)  # as with `groups` devices
  n = 256
  k0, k1 = rng.key_words(jax.random.key(0))

  def f(x, w):
    h = jnp.tanh(x) * x
    y = jnp.einsum("...n,nm->...m", h, w)
    return y, ext.sketch_kernel(kind)(h.reshape(-1, n), k0, k1, 64)

  with ext.mode("ffi"):
    compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((*lead, n), jnp.float32),
                                jax.ShapeDtypeStruct((n, 64), jnp.float32)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 1.5 * 4096 * n * 4, temp / (4096 * n * 4)
  assert f"fewbit_sketch_{kind}" in compiled.as_text()


@pytest.mark.parametrize("kind", ext.SKETCH_KINDS)
def test_vmapped_blocks_and_matmul_share_one_copy_of_x(kind):
  """Sketching blocks of x's rows under vmap keeps x whole for the kernel.

  The mapped axis joins the kernel's row groups, so the kernel reads the
  (B, N) array the matmul reads, not a (blocks, B / blocks, N) view of it.
  """
  n, blocks = 256, 4
  keys = jnp.stack([jnp.stack(rng.key_words(kk))
                    for kk in jax.random.split(jax.random.key(1), blocks)])

  def f(x, w):
    h = jnp.tanh(x) * x
    y = jnp.einsum("...n,nm->...m", h, w)
    sk = jax.vmap(lambda xb, kw: ext.sketch_kernel(kind)(xb, kw[0], kw[1], 16))
    return y, sk(h.reshape(blocks, -1, n), keys)

  with ext.mode("ffi"):
    args = (jax.ShapeDtypeStruct((16, 256, n), jnp.float32),
            jax.ShapeDtypeStruct((n, 64), jnp.float32))
    compiled = jax.jit(f).lower(*args).compile()
    x = jax.random.normal(jax.random.key(2), args[0].shape)
    w = jax.random.normal(jax.random.key(3), args[1].shape)
    _, got = jax.jit(f)(x, w)
    h = (jnp.tanh(x) * x).reshape(blocks, -1, n)
    for c in range(blocks):
      want = ext.sketch_kernel(kind)(h[c], keys[c, 0], keys[c, 1], 16)
      np.testing.assert_allclose(np.asarray(got[c]), np.asarray(want), rtol=1e-5, atol=1e-5)
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 1.5 * 4096 * n * 4, temp / (4096 * n * 4)


def test_sketch_vmap_over_inputs_and_keys():
  xs = jax.random.normal(jax.random.key(16), (3, 64, 10))
  keys = jax.random.split(jax.random.key(17), 3)
  with ext.mode("ffi"):
    f = ext.sketch_kernel("gaussian")
    per_key = jax.jit(jax.vmap(lambda x, key: f(x, *rng.key_words(key), 8)))(xs, keys)
    shared = jax.vmap(lambda x: f(x, *rng.key_words(keys[0]), 8))(xs)
    for i in range(3):
      np.testing.assert_allclose(per_key[i], f(xs[i], *rng.key_words(keys[i]), 8), rtol=1e-6)
      np.testing.assert_allclose(shared[i], f(xs[i], *rng.key_words(keys[0]), 8), rtol=1e-6)


def test_sketch_empty_and_bad_inputs():
  k0, k1 = rng.key_words(jax.random.key(0))
  with ext.mode("ffi"):
    f = ext.sketch_kernel("rademacher")
    assert f(jnp.zeros((0, 5)), k0, k1, 3).shape == (3, 5)
    with pytest.raises(ValueError, match="2-D"):
      f(jnp.zeros((2, 3, 4)), k0, k1, 3)
    with pytest.raises(TypeError, match="float"):
      f(jnp.zeros((2, 3), jnp.int32), k0, k1, 3)
