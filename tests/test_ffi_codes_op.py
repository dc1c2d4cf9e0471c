"""The code kernels against the pure-JAX path: same codes, same gradients.

Every comparison runs the same public function of fewbit_jax.ext
(fewbit_jax._ffi._codes_op) twice, once with ext.mode("ffi") and once with
ext.mode("jax"), and needs bitwise equality (NaN equal to NaN).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewbit_jax import codes, ext
from fewbit_jax._ffi import _codes_op

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
  is kept (tests/test_ffi_sharding.py); its codes, transposed to the
  canonical layout, and its products are bitwise the pure path's. Other
  shapes, and every shape on one device, go whole.
  """
  monkeypatch.setattr(_codes_op, "_multi_device", lambda: multi_device)
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
    # The kernels see two batch axes or more (unit axes in front), so that
    # XLA's batch partitioner never cuts the 1-D tables.
    unit = (1,) * max(0, 2 - len(lead) - split)
    codes_shape = (*unit, *lead, words, bits, 1) if split else (*unit, *lead, bits, words)
    assert _kernel_results(lambda x: ext.quantize_pack(x, borders, bits), x) == [codes_shape]
    assert _kernel_results(lambda c: ext.pack(c, bits), c) == [codes_shape]
    packed, pure = _both(ext.quantize_pack, x, borders, bits)
    _assert_same(packed, pure)
    _assert_same(*_both(ext.pack, c, bits))
    scale = lambda p, g: ext.unpack_scale(p, levels, g, bits)
    assert _kernel_results(scale, packed, g) == [(*unit, *lead, words, 32) if split
                                                 else (*unit, *shape)]
    _assert_same(*_both(scale, packed, g))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_word_view_gradient_parity(dtype, monkeypatch):
  monkeypatch.setattr(_codes_op, "_multi_device", lambda: True)
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
