"""Sketch kinds: definitions, unbiasedness, variance against theory, memory.

For a sketch S (B x k) the estimate of a^T b is (S^T a)^T (S^T b). Its
variance per kind, derived in `sketch.estimate_variance`, is checked against
the variance measured over many keys; the mean over the same keys is checked
against a^T b with a bound from that variance.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewbit_jax import ext, _rng as rng, sketch

KINDS = sketch.KINDS


@pytest.fixture(autouse=True)
def pure_jax():
  with ext.mode("jax"):
    yield


def _xg(b=64, n=6, m=5, seed=0, dc=1.0):
  """Inputs with structure: a per-feature offset across rows (as activations
  have), correlated columns, and g correlated with x."""
  r = np.random.default_rng(seed)
  x = r.normal(size=(b, n)) + dc * r.normal(size=(1, n)) + 0.3 * np.linspace(-1, 1, b)[:, None]
  g = 0.5 * x[:, :m] @ r.normal(size=(m, m)) + r.normal(size=(b, m))
  return x.astype(np.float32), g.astype(np.float32)


def _basis(kind, b):
  """Orthonormal basis (rows = basis vectors) of dct/dft, float64, from numpy/jax FFTs."""
  if kind == "dct":
    return np.asarray(jax.scipy.fft.dct(jnp.eye(b), norm="ortho", axis=0), np.float64)
  f = np.fft.rfft(np.eye(b), axis=0)
  rows = [f[0].real / math.sqrt(b)]
  for j in range(1, b):
    q = (j + 1) // 2
    if b % 2 == 0 and j == b - 1:
      rows.append(f[b // 2].real / math.sqrt(b))
    elif j % 2:
      rows.append(f[q].real * math.sqrt(2 / b))
    else:
      rows.append(-f[q].imag * math.sqrt(2 / b))
  return np.stack(rows)


def _estimates(kind, x, g, k, n_keys, signs=True, seed=0):
  keys = jax.random.split(jax.random.key(seed), n_keys)

  def one(key):
    if signs:
      sx, sg = sketch.project(kind, x, key, k), sketch.project(kind, g, key, k)
    else:
      k0, k1 = rng.sketch_words(key)
      sx = sketch._project_trig(kind, x, k0, k1, k, signs=False)
      sg = sketch._project_trig(kind, g, k0, k1, k, signs=False)
    return sx.T @ sg

  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


# --- definitions --------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _project(kind, x, key, k, block_rows=None):
  return sketch.project(kind, x, key, k, block_rows=block_rows)


_matrix = jax.jit(sketch.sketch_matrix, static_argnums=(0, 2, 3))


@pytest.mark.parametrize("kind", KINDS)
def test_project_is_s_transpose_x(kind):
  key = jax.random.key(3)
  # (B, k, rows per loop step): one block, several with a partial last one,
  # one row per step, k = 1, k = B.
  for b, k, block_rows in [(37, 9, None), (37, 9, 8), (5, 1, 1), (12, 12, 5)]:
    x, _ = _xg(b=b, n=7)
    s = np.asarray(_matrix(kind, key, b, k), np.float64)
    got = _project(kind, jnp.asarray(x), key, k, block_rows)
    assert got.shape == (k, 7) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, s.T @ x, rtol=1e-4, atol=2e-4)  # f32 FFT rounding


@pytest.mark.parametrize("kind", ["dct", "dft"])
def test_trig_column_blocks_agree(kind):
  x, _ = _xg(b=40, n=11)
  k0, k1 = rng.key_words(jax.random.key(1))
  trig = jax.jit(sketch._project_trig, static_argnums=(0, 4), static_argnames="block_cols")
  whole = trig(kind, x, k0, k1, 10)
  for cols in (1, 4):
    np.testing.assert_allclose(trig(kind, x, k0, k1, 10, block_cols=cols), whole,
                               rtol=1e-6, atol=1e-6)


def test_definitions_of_hash_kinds():
  key = jax.random.key(7)
  k0, k1 = rng.sketch_words(key)
  b, k = 50, 8
  i = jnp.arange(b, dtype=jnp.uint32)[:, None]
  j = jnp.arange(k, dtype=jnp.uint32)[None, :]
  g = _matrix("gaussian", key, b, k)
  np.testing.assert_array_equal(g, rng.gaussian(k0, k1, i, j) / np.float32(math.sqrt(k)))
  r = np.asarray(_matrix("rademacher", key, b, k)) * math.sqrt(k)
  bit = np.asarray(rng.hash4(k0, k1, i, j) >> 31).astype(np.float32)
  np.testing.assert_allclose(r, 1 - 2 * bit, rtol=1e-6)
  c = np.asarray(_matrix("countsketch", key, b, k))
  bucket = np.asarray(rng.hash4(k0, k1, i[:, 0], 0) % k)
  sign = 1 - 2 * np.asarray(rng.hash4(k0, k1, i[:, 0], 1) >> 31).astype(np.float32)
  want = np.zeros((b, k), np.float32)
  want[np.arange(b), bucket] = sign
  np.testing.assert_array_equal(c, want)


@pytest.mark.parametrize("kind", ["dct", "dft"])
@pytest.mark.parametrize("b", [16, 15])
def test_trig_sketch_is_signed_scaled_basis_columns(kind, b):
  key = jax.random.key(11)
  k0, k1 = rng.sketch_words(key)
  k = 6
  s = np.asarray(_matrix(kind, key, b, k), np.float64)
  chosen = np.asarray(jax.jit(sketch._chosen, static_argnums=(2, 3))(k0, k1, b, k))
  assert len(set(chosen.tolist())) == k  # without replacement
  order = np.asarray(rng.hash4(k0, k1, jnp.arange(b, dtype=jnp.uint32), 2))
  np.testing.assert_array_equal(chosen, np.lexsort((np.arange(b), order))[:k])
  sign = np.asarray(jax.jit(sketch._sign)(k0, k1, jnp.arange(b, dtype=jnp.uint32)), np.float64)
  want = sign[:, None] * _basis(kind, b)[chosen].T * math.sqrt(b / k)
  np.testing.assert_allclose(s, want, atol=2e-5)


@pytest.mark.parametrize("kind", ["dct", "dft"])
def test_variance_basis_is_the_fft_basis(kind):
  for b in (15, 16):
    np.testing.assert_allclose(sketch._trig_basis(kind, b), _basis(kind, b), atol=1e-6)


@pytest.mark.parametrize("kind", ["dct", "dft"])
def test_trig_full_size_is_exact(kind):
  # k = B: S is a signed orthonormal basis, S S^T = I, the estimate is exact.
  x, g = _xg(b=24)
  key = jax.random.key(0)
  s = np.asarray(_matrix(kind, key, 24, 24), np.float64)
  np.testing.assert_allclose(s @ s.T, np.eye(24), atol=1e-5)
  est = _project(kind, x, key, 24).T @ _project(kind, g, key, 24)
  np.testing.assert_allclose(est, x.T @ g, rtol=1e-4, atol=1e-4)


def test_keys_typed_raw_and_distinct():
  x, _ = _xg(b=20)
  for kind in ("gaussian", "dct"):
    typed = _project(kind, x, jax.random.key(5), 6)
    raw = _project(kind, x, jax.random.key_data(jax.random.key(5)), 6)
    other = _project(kind, x, jax.random.key(6), 6)
    np.testing.assert_array_equal(typed, raw)
    assert not np.allclose(typed, other)


def test_low_precision_inputs_accumulate_in_f32():
  x, _ = _xg(b=48, n=5)
  for dtype, kinds in ((jnp.bfloat16, KINDS), (jnp.float16, ("gaussian", "dft"))):
    xl = jnp.asarray(x, dtype)
    for kind in kinds:
      got = _project(kind, xl, jax.random.key(2), 12)
      assert got.dtype == jnp.float32
      want = _project(kind, xl.astype(jnp.float32), jax.random.key(2), 12)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_errors():
  x = jnp.ones((8, 3))
  with pytest.raises(ValueError, match="unknown sketch 'gauss'.*gaussian, rademacher"):
    sketch.project("gauss", x, jax.random.key(0), 2)
  with pytest.raises(ValueError, match=r"k=9 must be in \[1, B=8\]"):
    sketch.project("gaussian", x, jax.random.key(0), 9)
  with pytest.raises(ValueError, match="2-D"):
    sketch.project("gaussian", jnp.ones((2, 4, 3)), jax.random.key(0), 2)
  with pytest.raises(TypeError, match="expected one PRNG key"):
    sketch.project("gaussian", x, jax.random.split(jax.random.key(0), 2), 2)


# --- statistics ---------------------------------------------------------------

# (kind, signs): signs=False is dct/dft without the random signs, for comparison.
STAT_CASES = [(kind, True) for kind in KINDS] + [("dct", False), ("dft", False)]


@pytest.mark.parametrize("kind,signs", STAT_CASES)
def test_unbiased_and_variance_matches_theory(kind, signs, matches_theory):
  b, k, n_keys = 64, 16, 4000
  x, g = _xg(b=b)
  est = _estimates(kind, x, g, k, n_keys, signs=signs)
  truth = x.astype(np.float64).T @ g
  var = sketch.estimate_variance(kind, x, g, k, signs=signs)
  matches_theory(est, truth, var, n_keys)


def test_random_signs_cut_trig_variance_of_offset_inputs():
  # A per-feature offset over rows is all in the constant basis vector; without
  # signs a sketch either catches it (weight B/k) or misses it.
  x, g = _xg(b=64, dc=4.0)
  g = g + 3.0
  for kind in ("dct", "dft"):
    with_signs = sketch.estimate_variance(kind, x, g, 16, signs=True).sum()
    without = sketch.estimate_variance(kind, x, g, 16, signs=False).sum()
    assert with_signs < without / 3, (kind, with_signs, without)
    measured = [((_estimates(kind, x, g, 16, 1000, signs=s) - x.T @ g) ** 2).sum(axis=(1, 2)).mean()
                for s in (True, False)]
    assert measured[0] < measured[1] / 3, (kind, measured)


def test_rademacher_and_countsketch_beat_gaussian_on_spiky_rows():
  # sum_i a_i^2 b_i^2 is large when a few rows dominate; the -2 sum term then
  # makes the +-1 sketches strictly better than the Gaussian one.
  x, g = _xg(b=64)
  x[3] *= 20
  g[3] *= 20
  vg = sketch.estimate_variance("gaussian", x, g, 16).sum()
  for kind in ("rademacher", "countsketch"):
    assert sketch.estimate_variance(kind, x, g, 16).sum() < 0.8 * vg


# --- memory -------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_projection_temp_below_input_size(kind):
  # B = 16384 rows, N = 768, k = 0.2 B: a whole Gaussian S (16384 x 3277 f32,
  # 205 MiB) would be over four times x (48 MiB).
  x = jax.ShapeDtypeStruct((16384, 768), jnp.float32)
  f = jax.jit(lambda x, key: sketch.project(kind, x, key, 3277))
  compiled = f.lower(x, jax.random.key(0)).compile({"xla_backend_optimization_level": 0})
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 16384 * 768 * 4 / 2, temp


# --- kernels --------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_ffi_kernel_matches_pure_jax_where_present(kind):
  with ext.mode("auto"):
    if ext.active_path() != "ffi" or ext.sketch_kernel(kind) is None:
      pytest.skip(f"no FFI kernel for {kind} here")
    x, _ = _xg(b=300, n=9)
    # A fresh jit per mode: the path is chosen at trace time.
    got = jax.jit(lambda x, key: sketch.project(kind, x, key, 40))(x, jax.random.key(4))
  want = jax.jit(lambda x, key: sketch.project(kind, x, key, 40))(x, jax.random.key(4))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --- block-diagonal sketches --------------------------------------------------------

def test_one_block_is_the_plain_sketch():
  key = jax.random.key(3)
  words = jnp.stack(rng.key_words(key))
  np.testing.assert_array_equal(sketch.block_keys(key, 1)[0], words)
  x = jax.random.normal(jax.random.key(0), (24, 5))
  for kind in ("gaussian", "dct"):
    blocks = jax.jit(lambda x, kind=kind: sketch.project_blocks(
        kind, x[None], sketch.block_keys(key, 1), 6)[0])
    plain = jax.jit(lambda x, kind=kind: sketch.project(kind, x, key, 6))
    np.testing.assert_array_equal(blocks(x), plain(x))


@pytest.mark.parametrize("kind", sketch.KINDS)
def test_project_blocks_is_the_block_diagonal_sketch(kind):
  key, c, r, k = jax.random.key(1), 4, 8, 3
  x = jax.random.normal(jax.random.key(0), (c * r, 5))
  s = sketch.sketch_matrix(kind, key, c * r, k, blocks=c)
  assert s.shape == (c * r, c * k)
  blocks = np.asarray(s).reshape(c, r, c, k).transpose(0, 2, 1, 3)  # [row block, col block]
  off_diagonal = blocks[~np.eye(c, dtype=bool)]
  assert not np.any(off_diagonal)
  sx = jax.jit(lambda x: sketch.project_blocks(kind, x, sketch.block_keys(key, c), k))(
      x.reshape(c, r, 5))
  np.testing.assert_allclose(sx.reshape(c * k, 5), s.T @ x, rtol=1e-5, atol=1e-5)
  keys = sketch.block_keys(key, c)
  assert len({tuple(map(int, w)) for w in keys}) == c  # every block its own sketch


@pytest.mark.parametrize("kind", ("gaussian", "rademacher", "countsketch"))
def test_row_slices_add_up_to_the_sketch(kind):
  x = jax.random.normal(jax.random.key(0), (32, 4))
  key = jax.random.key(2)
  whole = jax.jit(lambda x: sketch.project(kind, x, key, 5))(x)
  part = jax.jit(lambda xs, i: sketch.project(kind, xs, key, 5, row0=i))
  parts = sum(part(x[i:i + 8], i) for i in range(0, 32, 8))
  np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="cannot be taken over a slice"):
    sketch.project("dct", x, key, 5, row0=0)
