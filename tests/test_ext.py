"""The XLA FFI kernels against the pure-JAX path: same codes, same gradients.

Every comparison runs the same public function of fewbit_jax.ext twice, once
with ext.mode("ffi") and once with ext.mode("jax"), and needs bitwise equality
(NaN equal to NaN) except for sketch sums, where float32 summation order
differs and a tight tolerance is used.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewbit_jax import codes, ext, rng

pytestmark = pytest.mark.skipif(not ext.available(), reason="fewbit_jax._xla_ext not built")

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SHAPES = [(), (0,), (3, 0), (0, 5), (1,), (31,), (33,), (2, 3, 1, 65), (7, 100)]


def _both(fn, *args):
  with ext.mode("ffi"):
    a = fn(*args)
  with ext.mode("jax"):
    b = fn(*args)
  return a, b


def _assert_same(a, b):
  assert a.dtype == b.dtype and a.shape == b.shape
  np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32) if a.dtype in DTYPES else a),
                                np.asarray(b.astype(jnp.float32) if b.dtype in DTYPES else b))


def _borders(bits, seed=0):
  # Ascending, with ties: repeated borders are legal (empty intervals).
  b = np.sort(np.random.default_rng(seed).normal(size=2**bits - 1) * 1.5).astype(np.float32)
  if bits >= 3:
    b[1] = b[2]
  return jnp.asarray(b)


def _inputs(shape, dtype, borders, seed=1):
  rng_ = np.random.default_rng(seed)
  x = rng_.normal(size=shape).astype(np.float32) * 2
  flat = x.reshape(-1)
  special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, *np.asarray(borders)[:4]], np.float32)
  m = min(flat.size, special.size)
  flat[:m] = special[:m]  # borders themselves: code must not count them (side="left")
  return jnp.asarray(x).astype(dtype)


def test_reports_active_path():
  assert "cpu" in ext.platforms()
  assert ext.active_path("cpu") in ("ffi", "jax")
  with ext.mode("ffi"):
    assert ext.active_path("cpu") == "ffi"
  with ext.mode("jax"):
    assert ext.active_path("cpu") == "jax"
    assert ext.sketch_kernel("gaussian") is None
  with ext.mode("ffi"):
    assert callable(ext.sketch_kernel("countsketch"))
    assert ext.sketch_kernel("dct") is None


def test_ffi_mode_emits_the_custom_call():
  x = jnp.ones((4, 40))
  with ext.mode("ffi"):
    hlo = jax.jit(lambda x: ext.quantize_pack(x, _borders(2), 2)).lower(x).as_text()
  assert "fewbit_quantize_pack" in hlo
  with ext.mode("jax"):
    hlo = jax.jit(lambda x: ext.quantize_pack(x, _borders(2), 2)).lower(x).as_text()
  assert "fewbit_quantize_pack" not in hlo


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_pack_parity(bits, dtype):
  borders = _borders(bits, seed=bits)
  for shape in SHAPES:
    x = _inputs(shape, dtype, borders, seed=len(shape))
    a, b = _both(ext.quantize_pack, x, borders, bits)
    assert a.shape == codes.packed_shape(shape, bits)
    _assert_same(a, b)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_scale_parity(bits, dtype):
  borders = _borders(bits, seed=bits)
  levels = jnp.asarray(np.random.default_rng(bits).normal(size=2**bits).astype(np.float32))
  levels = levels.at[0].set(1e-8).at[-1].set(70000.0)  # underflow / overflow in f16
  for shape in SHAPES:
    x = _inputs(shape, jnp.float32, borders, seed=len(shape))
    packed = ext.quantize_pack(x, borders, bits)
    g = _inputs(shape, dtype, borders, seed=7 + len(shape))
    a, b = _both(ext.unpack_scale, packed, levels, g, bits)
    assert a.dtype == dtype
    _assert_same(a, b)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_pack_parity(bits):
  r = np.random.default_rng(bits)
  for shape in SHAPES:
    c = jnp.asarray(r.integers(0, 2**bits, size=shape).astype(np.uint8))
    a, b = _both(ext.pack, c, bits)
    _assert_same(a, b)
    np.testing.assert_array_equal(codes.unpack(a.reshape(codes.packed_shape(shape, bits)), bits,
                                               shape[-1] if shape else 1).reshape(shape), c)


def test_float64_input_quantizes_like_float32():
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 40)))
    a, b = _both(ext.quantize_pack, x, _borders(3), 3)
    _assert_same(a, b)


# Last axes of whole words, one word, and not whole words.
WORD_SHAPES = [(64,), (3, 96), (2, 3, 256), (4, 32), (7, 100), (33,), (2, 1, 65)]


def _kernel_results(fn, *args):
  """Shapes of the results of the fewbit primitives that fn binds in mode 'ffi'."""
  with ext.mode("ffi"):
    jaxpr = jax.make_jaxpr(fn)(*args)
  return [e.outvars[0].aval.shape for e in jaxpr.eqns if e.primitive.name.startswith("fewbit_")]


@pytest.mark.parametrize("multi_device", [True, False])
@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_word_view_gives_the_same_codes(multi_device, bits, dtype, monkeypatch):
  """With several devices, n = 32 W (W > 1) goes to the kernels as (..., W, 32).

  That view makes the words batch rows, so that a sharding of the last axis
  is kept (tests/test_ext_sharding.py); its codes, transposed to the
  canonical layout, and its products are bitwise the pure path's. Other
  shapes, and every shape on one device, go whole.
  """
  monkeypatch.setattr(ext, "_multi_device", lambda: multi_device)
  borders = _borders(bits, seed=bits)
  levels = jnp.asarray(np.random.default_rng(bits).normal(size=2**bits).astype(np.float32))
  r = np.random.default_rng(bits)
  for shape in WORD_SHAPES:
    *lead, n = shape
    words = -(-n // 32)
    split = multi_device and n % 32 == 0 and words > 1
    x = _inputs(shape, dtype, borders, seed=len(shape))
    g = _inputs(shape, dtype, borders, seed=7 + len(shape))
    c = jnp.asarray(r.integers(0, 2**bits, size=shape).astype(np.uint8))
    codes_shape = (*lead, words, bits, 1) if split else (*lead, bits, words)
    assert _kernel_results(lambda x: ext.quantize_pack(x, borders, bits), x) == [codes_shape]
    assert _kernel_results(lambda c: ext.pack(c, bits), c) == [codes_shape]
    packed, pure = _both(ext.quantize_pack, x, borders, bits)
    _assert_same(packed, pure)
    _assert_same(*_both(ext.pack, c, bits))
    scale = lambda p, g: ext.unpack_scale(p, levels, g, bits)
    assert _kernel_results(scale, packed, g) == [(*lead, words, 32) if split else shape]
    _assert_same(*_both(scale, packed, g))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_word_view_gradient_parity(dtype, monkeypatch):
  monkeypatch.setattr(ext, "_multi_device", lambda: True)
  f = _fewbit_relu_like(3)
  x = jax.random.normal(jax.random.key(0), (3, 5, 128)).astype(dtype)
  c = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
  step = lambda x: jax.jit(jax.grad(lambda x: (f(x) * c).astype(jnp.float32).sum()))(x)
  assert _kernel_results(jax.grad(lambda x: (f(x) * c).astype(jnp.float32).sum()), x) == [
      (3, 5, 4, 3, 1), (3, 5, 4, 32)]
  _assert_same(*_both(step, x))


# --- transformations ---------------------------------------------------------

def _fewbit_relu_like(bits):
  """A few-bit activation built from the ext functions, as activations.py does."""
  borders = _borders(bits, seed=3)
  levels = jnp.linspace(-0.5, 1.5, 2**bits)

  @jax.custom_vjp
  def f(x):
    return jnp.tanh(x)

  def fwd(x):
    return jnp.tanh(x), ext.quantize_pack(x, borders, bits)

  def bwd(packed, g):
    return (ext.unpack_scale(packed, levels, g, bits),)

  f.defvjp(fwd, bwd)
  return f


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_jit_parity(bits, dtype):
  f = _fewbit_relu_like(bits)
  x = jax.random.normal(jax.random.key(0), (3, 5, 37)).astype(dtype)
  a, b = _both(lambda x: jax.jit(jax.grad(lambda x: (f(x) * jnp.arange(37, dtype=x.dtype)).sum()))(x), x)
  _assert_same(a, b)


def test_vmap_parity_over_every_axis():
  bits = 3
  borders = _borders(bits)
  levels = jnp.linspace(0.0, 1.0, 2**bits)
  x = jax.random.normal(jax.random.key(1), (4, 6, 45))
  g = jax.random.normal(jax.random.key(2), (4, 6, 45))
  for axis in range(3):
    qp = lambda x: ext.quantize_pack(x, borders, bits)
    a, b = _both(lambda x: jax.vmap(qp, in_axes=axis)(x), x)
    _assert_same(a, b)
    # unpack_scale with codes batched and g batched along different axes.
    packed = jnp.moveaxis(ext.quantize_pack(x, borders, bits), 0, 0)
    us = lambda p, g: ext.unpack_scale(p, levels, g, bits)
    g_ax = jnp.moveaxis(g, 0, axis)
    a, b = _both(lambda p, g: jax.vmap(us, in_axes=(0, axis))(p, g), packed, g_ax)
    _assert_same(a, b)
  # Only g batched (codes shared), and nested vmaps.
  packed1 = ext.quantize_pack(x[0], borders, bits)
  a, b = _both(lambda g: jax.vmap(lambda g: ext.unpack_scale(packed1, levels, g, bits))(g), g)
  _assert_same(a, b)
  a, b = _both(lambda x: jax.vmap(jax.vmap(lambda r: ext.quantize_pack(r, borders, bits)))(x), x)
  _assert_same(a, b)


def test_vmap_over_tables_loops():
  bits = 2
  bs = jnp.stack([_borders(bits, seed=s) for s in range(3)])
  x = jax.random.normal(jax.random.key(3), (3, 2, 70))
  a, b = _both(lambda x, bs: jax.vmap(lambda x, b: ext.quantize_pack(x, b, bits))(x, bs), x, bs)
  _assert_same(a, b)
  lv = jnp.stack([jnp.linspace(0.0, s + 1.0, 2**bits) for s in range(3)])
  p = a
  a, b = _both(lambda p, lv, g: jax.vmap(lambda p, l, g: ext.unpack_scale(p, l, g, bits))(p, lv, g),
               p, lv, x)
  _assert_same(a, b)


def test_scan_parity():
  f = _fewbit_relu_like(4)
  w = jax.random.normal(jax.random.key(4), (40, 40)) / 6

  def net(x):
    def body(h, _):
      return f(h @ w), None
    return jax.lax.scan(body, x, None, length=5)[0].sum()

  x = jax.random.normal(jax.random.key(5), (8, 40))
  a, b = _both(lambda x: jax.jit(jax.grad(net))(x), x)
  _assert_same(a, b)


def test_unpack_scale_is_linear_in_g():
  bits = 3
  x = jax.random.normal(jax.random.key(6), (5, 50))
  packed = ext.quantize_pack(x, _borders(bits), bits)
  levels = jnp.linspace(-1.0, 2.0, 2**bits)
  g = jax.random.normal(jax.random.key(7), (5, 50))

  def second_order(g):
    inner = lambda g: (ext.unpack_scale(packed, levels, g, bits) ** 2).sum()
    return jax.grad(lambda g: jax.grad(inner)(g).sum())(g)

  a, b = _both(second_order, g)
  _assert_same(a, b)
  # jvp in levels (a learned table) goes through the pure formula.
  jl = lambda lv: jax.jvp(lambda l: ext.unpack_scale(packed, l, g, bits), (lv,), (jnp.ones_like(lv),))[1]
  a, b = _both(jl, levels)
  _assert_same(a, b)


def test_codes_have_no_gradient():
  x = jax.random.normal(jax.random.key(8), (3, 40))
  with ext.mode("ffi"):
    out, tangent = jax.jvp(lambda x: ext.quantize_pack(x, _borders(2), 2), (x,), (x,))
  assert out.dtype == jnp.uint32 and tangent.dtype == jax.dtypes.float0


# --- errors ------------------------------------------------------------------

def test_python_errors_name_what_is_allowed():
  x = jnp.ones((2, 40))
  with ext.mode("ffi"):
    with pytest.raises(ValueError, match="1..8"):
      ext.quantize_pack(x, _borders(3), 9)
    with pytest.raises(ValueError, match=r"borders must have shape \(7,\)"):
      ext.quantize_pack(x, _borders(2), 3)
    packed = ext.quantize_pack(x, _borders(2), 2)
    with pytest.raises(ValueError, match="expected"):
      ext.unpack_scale(packed, jnp.ones(4), jnp.ones((2, 80)), 2)
    with pytest.raises(ValueError, match=r"levels must have shape \(4,\)"):
      ext.unpack_scale(packed, jnp.ones(3), x, 2)


def _raw_call(target, out_shape, *args, **attrs):
  return jax.ffi.ffi_call(target, out_shape)(*args, **attrs)


@pytest.mark.parametrize("case", ["bits", "borders", "planes", "dtype", "levels", "sketch"])
def test_kernel_errors_are_ffi_errors(case):
  """Bad calls that bypass the Python checks come back as errors, not crashes."""
  x = jnp.ones((2, 40), jnp.float32)
  u32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.uint32)
  if case == "bits":
    fn, match = lambda: _raw_call("fewbit_quantize_pack", u32(2, 9, 2), x, jnp.ones(511),
                                  bits=np.int32(9)), "bits must be in 1..8"
  elif case == "borders":
    fn, match = lambda: _raw_call("fewbit_quantize_pack", u32(2, 3, 2), x, jnp.ones(6),
                                  bits=np.int32(3)), "borders has 6 entries; expected 7"
  elif case == "planes":
    fn, match = lambda: _raw_call("fewbit_quantize_pack", u32(2, 3, 1), x, jnp.ones(7),
                                  bits=np.int32(3)), "expected"
  elif case == "dtype":
    fn, match = lambda: _raw_call("fewbit_quantize_pack", u32(2, 1, 2), x.astype(jnp.int32),
                                  jnp.ones(1), bits=np.int32(1)), "must be float32"
  elif case == "levels":
    p = jnp.zeros((2, 2, 2), jnp.uint32)
    fn, match = lambda: _raw_call("fewbit_unpack_scale", jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  p, jnp.ones(3), x, bits=np.int32(2)), "levels has 3 entries"
  else:
    fn, match = lambda: _raw_call("fewbit_sketch_gaussian", jax.ShapeDtypeStruct((4, 5), jnp.float32),
                                  x, jnp.zeros((2,), jnp.uint32),
                                  jnp.zeros((), jnp.uint32)), "expected x"
  with pytest.raises(Exception, match=match):
    jax.block_until_ready(jax.jit(fn)())


# --- sketches ----------------------------------------------------------------

def _sketch_reference(kind, x, k0, k1, k):
  """S^T x in float64 with S from the definitions in fewbit_jax.ext / sketch."""
  b = x.shape[0]
  rows = jnp.arange(b, dtype=jnp.uint32)
  s = np.asarray(ext._dense_sketch_matrix(kind, k0, k1, rows, k), np.float64)
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
  s = np.abs(np.asarray(ext._dense_sketch_matrix(kind, k0, k1, jnp.arange(shape[0], dtype=jnp.uint32), k)))
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
    whole = ext._sketch_p.bind(x, keys[None], jnp.zeros((1,), jnp.uint32), kind=kind, k=9)
    assert whole.shape == (1, 9, 20)
    parts = ext._sketch_p.bind(x, jnp.broadcast_to(keys, (4, 2)),
                               jnp.arange(4, dtype=jnp.uint32) * 24, kind=kind, k=9)
    assert parts.shape == (4, 9, 20)
    np.testing.assert_allclose(np.asarray(parts.sum(0)), np.asarray(whole[0]), rtol=1e-5,
                               atol=1e-5)
    # Group g is rows 24 g .. 24 g + 23 of x: the definition on that slice.
    for g in range(4):
      want = ext._sketch_pure(x[24 * g:24 * (g + 1)][None], keys[None],
                              jnp.full((1,), 24 * g, jnp.uint32), kind=kind, k=9)[0]
      np.testing.assert_allclose(np.asarray(parts[g]), np.asarray(want), rtol=1e-5, atol=1e-5)
    # The lowering on platforms without kernels.
    pure = ext._sketch_pure_rows(x, jnp.broadcast_to(keys, (4, 2)),
                                 jnp.arange(4, dtype=jnp.uint32) * 24, kind=kind, k=9)
    np.testing.assert_allclose(np.asarray(pure), np.asarray(parts), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="G dividing B"):
    ext._sketch_p.bind(x, jnp.broadcast_to(keys, (5, 2)), jnp.zeros((5,), jnp.uint32),
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
  monkeypatch.setattr(ext, "_sketch_groups", lambda rows: groups)  # as with `groups` devices
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


@pytest.mark.slow
def test_more_than_2_to_31_elements():
  """64-bit indexing: a 1-bit pack of 2**31 + 96 codes (2 GiB in, 256 MiB out)."""
  n = 2**31 + 96
  c = jnp.zeros((n,), jnp.uint8).at[-70:].set(1).at[5].set(1)
  with ext.mode("ffi"):
    p = jax.jit(lambda c: ext.pack(c, 1))(c)
  p = np.asarray(p)[0]
  assert p.shape == (math.ceil(n / 32),)
  assert p[0] == 1 << 5
  last = np.zeros(128, np.uint8)  # the last 4 words: elements n - 128 .. n - 1
  last[-70:] = 1
  np.testing.assert_array_equal(p[-4:], np.asarray(codes.pack(jnp.asarray(last), 1))[0])
