"""Few-bit activations: forward identity, exact/tabled backward, residuals, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import fewbit_jax as fb
from fewbit_jax import activations as A
from fewbit_jax import codes

KEY = jax.random.key(0)
X = 3.0 * jax.random.normal(KEY, (3, 77))  # last axis not a multiple of 32

# Reference forwards: jax.nn where it has the function, else torch's definition.
REF = {
    "relu": jax.nn.relu, "relu6": jax.nn.relu6, "leaky_relu": jax.nn.leaky_relu,
    "hard_tanh": jax.nn.hard_tanh, "hard_sigmoid": jax.nn.hard_sigmoid,
    "threshold": lambda x: jnp.where(x > 0.5, x, jnp.asarray(-2.0, x.dtype)),
    "hard_shrink": lambda x: jnp.where(jnp.abs(x) > 0.5, x, jnp.zeros_like(x)),
    "soft_shrink": lambda x: jnp.where(x > 0.5, x - 0.5, jnp.where(x < -0.5, x + 0.5,
                                                                 jnp.zeros_like(x))),
    "celu": jax.nn.celu, "elu": jax.nn.elu, "gelu": jax.nn.gelu,
    "hard_swish": jax.nn.hard_swish, "log_sigmoid": jax.nn.log_sigmoid, "mish": jax.nn.mish,
    "selu": jax.nn.selu, "sigmoid": jax.nn.sigmoid, "silu": jax.nn.silu,
    "softplus": jax.nn.softplus, "soft_sign": jax.nn.soft_sign, "tanh": jnp.tanh,
    "tanhshrink": lambda x: x - jnp.tanh(x),
}
PIECEWISE = sorted(A.PIECEWISE)
CONTINUOUS = sorted(A.CONTINUOUS)
ALL = PIECEWISE + CONTINUOUS


def fb_fn(name, **kw):
  f = getattr(fb, name)
  if name == "threshold":
    return functools.partial(f, threshold=0.5, value=-2.0, **kw)
  return functools.partial(f, **kw)


def test_all_21_are_exported():
  assert len(ALL) == 21
  for name in ALL:
    assert callable(getattr(fb, name))
  for alias, name in A.ALIASES.items():
    assert getattr(fb, alias) is getattr(fb, name)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_forward_is_bitwise_identical(name, dtype):
  x = X.astype(dtype)
  y = fb_fn(name)(x)
  ref = REF[name](x)
  assert y.dtype == ref.dtype and y.shape == ref.shape
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
  y_jit = jax.jit(fb_fn(name))(x)
  np.testing.assert_array_equal(np.asarray(y_jit, np.float32), np.asarray(jax.jit(REF[name])(x),
                                                                          np.float32))


KINKS = jnp.array([-6.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 6.0])


@pytest.mark.parametrize("name", PIECEWISE)
def test_piecewise_gradient_is_exact_including_kinks(name):
  x = jnp.concatenate([X.reshape(-1), KINKS])
  w = jnp.arange(x.size, dtype=jnp.float32) - 50.0  # a non-trivial cotangent
  g = jax.grad(lambda v: jnp.sum(fb_fn(name)(v) * w))(x)
  g_ref = jax.grad(lambda v: jnp.sum(REF[name](v) * w))(x)
  np.testing.assert_array_equal(g, g_ref)


def table_grad(name, x, g, bits):
  kw = {"approximate": True} if name == "gelu" else {}
  t = fb.table(name, bits, **kw)
  return t(np.asarray(x, np.float32)).astype(np.float32) * np.asarray(g, np.float32)


@pytest.mark.parametrize("name", CONTINUOUS)
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_continuous_gradient_is_levels_times_cotangent(name, bits):
  g_out = jax.random.normal(jax.random.key(1), X.shape)
  _, vjp = jax.vjp(fb_fn(name, bits=bits), X)
  (g,) = vjp(g_out)
  np.testing.assert_allclose(g, table_grad(name, X, g_out, bits), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", CONTINUOUS)
def test_gradient_error_shrinks_with_bits(name):
  x = 1.5 * jax.random.normal(jax.random.key(2), (20000,))
  true = jax.grad(lambda v: REF[name](v).sum())(x)
  errs = []
  for bits in (1, 2, 4, 8):
    g = jax.grad(lambda v: fb_fn(name, bits=bits)(v).sum())(x)
    errs.append(float(jnp.linalg.norm(g - true) / jnp.linalg.norm(true)))
  assert errs == sorted(errs, reverse=True), errs
  assert errs[-1] < 0.01, errs
  assert errs[0] < 0.6, errs  # the original's local search gave 0.96 for 1-bit sigmoid


@pytest.mark.parametrize("bits", range(1, 9))
def test_only_residual_is_packed_codes(bits):
  x = jnp.ones((8, 100))
  res = saved_residuals(lambda v: fb.gelu(v, bits=bits).sum(), x)
  assert len(res) == 1, res
  aval = res[0][0]
  assert aval.dtype == jnp.uint32
  assert aval.shape == codes.packed_shape(x.shape, bits) == (8, bits, 4)
  nbytes = aval.size * 4
  assert nbytes == 8 * bits * 4 * 4  # bits per element, last axis padded 100 -> 128


@pytest.mark.parametrize("name", PIECEWISE)
def test_piecewise_residual_is_one_bit(name):
  res = saved_residuals(lambda v: fb_fn(name)(v).sum(), jnp.ones((2, 64)))
  assert [(r[0].shape, r[0].dtype) for r in res] == [((2, 1, 2), jnp.uint32)]


@pytest.mark.parametrize("shape", [(), (0,), (5, 0), (1,), (33,), (2, 3, 31)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_any_shape_and_dtype(shape, dtype):
  x = jnp.linspace(-3, 3, int(np.prod(shape))).reshape(shape).astype(dtype)
  for f in (fb.gelu, fb.relu, fb.silu):
    y, vjp = jax.vjp(f, x)
    (g,) = vjp(jnp.ones_like(y))
    assert y.shape == shape and g.shape == shape
    assert g.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(g)))


def test_grad_dtype_follows_cotangent():
  x = X.astype(jnp.bfloat16)
  g = jax.grad(lambda v: fb.gelu(v).astype(jnp.float32).sum())(x)
  assert g.dtype == jnp.bfloat16
  expect = table_grad("gelu", x, np.ones(x.shape), 3)
  np.testing.assert_allclose(np.asarray(g, np.float32), expect, rtol=1e-2)


def test_transformations_jit_vmap_scan_checkpoint():
  x = jax.random.normal(KEY, (4, 6, 40))

  def loss(v):
    return jnp.sum(fb.gelu(v) ** 2)

  g = jax.grad(loss)(x)
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), g, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(loss))(x).sum(0), g.sum(0) * 1.0, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(jax.checkpoint(loss))(x), g, rtol=1e-6)

  def scanned(v):
    def body(c, xi):
      return c + loss(xi), None
    return jax.lax.scan(body, 0.0, v)[0]

  np.testing.assert_allclose(jax.grad(scanned)(x), g, rtol=1e-6)
  # per-example grads under vmap equal the slices of the batched grad
  per = jax.vmap(jax.grad(loss))(x)
  np.testing.assert_allclose(per, g, rtol=1e-6)


def test_callable_form_and_flax_field():
  import flax.linen as nn
  act = fb.gelu(approximate=False, bits=2)
  np.testing.assert_array_equal(act(X), fb.gelu(X, approximate=False, bits=2))
  assert "gelu" in act.__name__ and "bits=2" in act.__name__

  class MLP(nn.Module):
    activation: object = nn.gelu

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(self.activation(nn.Dense(8)(x)))

  params = MLP().init(KEY, X)
  y_ref = MLP().apply(params, X)
  y_fb = MLP(activation=fb.gelu(bits=3)).apply(params, X)
  np.testing.assert_array_equal(y_ref, y_fb)


def test_user_table_and_fewbit():
  borders, levels = [-1.0, 0.0, 1.0], [0.0, 0.25, 0.75, 1.0]
  _, vjp = jax.vjp(lambda v: fb.gelu(v, borders=borders, levels=levels), X)
  (g,) = vjp(jnp.ones_like(X))
  expect = np.asarray(levels)[np.searchsorted(borders, np.asarray(X))]
  np.testing.assert_allclose(g, expect, rtol=1e-7)

  def cube_tanh(v):
    return jnp.tanh(v) ** 3

  f = fb.fewbit(cube_tanh, bits=4)
  np.testing.assert_array_equal(f(X), cube_tanh(X))
  x = jax.random.normal(jax.random.key(5), (5000,))
  g = jax.grad(lambda v: f(v).sum())(x)
  g_true = jax.grad(lambda v: cube_tanh(v).sum())(x)
  assert float(jnp.linalg.norm(g - g_true) / jnp.linalg.norm(g_true)) < 0.1
  f2 = fb.fewbit(cube_tanh, borders=borders, levels=levels)
  (g2,) = jax.vjp(f2, X)[1](jnp.ones_like(X))
  np.testing.assert_allclose(g2, expect, rtol=1e-7)


def test_parametrised_tables_are_computed_and_cached():
  x = jax.random.normal(KEY, (1000,))
  y = fb.elu(x, alpha=0.5)
  np.testing.assert_array_equal(y, jax.nn.elu(x, 0.5))
  t = fb.table("elu", 3, alpha=0.5)
  assert t is fb.table("elu", 3, alpha=0.5)
  assert not np.allclose(t.levels, fb.table("elu", 3).levels)
  g = jax.grad(lambda v: fb.elu(v, alpha=0.5).sum())(x)
  np.testing.assert_allclose(g, t(np.asarray(x)), rtol=1e-6)
  # computed outside tracing: works the first time inside jit too
  g2 = jax.jit(jax.grad(lambda v: fb.celu(v, alpha=0.7, bits=2).sum()))(x)
  np.testing.assert_allclose(g2, fb.table("celu", 2, alpha=0.7)(np.asarray(x)), rtol=1e-6)
  # piecewise parameters change the exact levels
  gl = jax.grad(lambda v: fb.leaky_relu(v, negative_slope=0.2).sum())(x)
  np.testing.assert_allclose(gl, jax.grad(lambda v: jax.nn.leaky_relu(v, 0.2).sum())(x))
  gh = jax.grad(lambda v: fb.hard_tanh(v, min_val=-2.0, max_val=0.5).sum())(KINKS)
  np.testing.assert_array_equal(gh, ((KINKS >= -2) & (KINKS <= 0.5)).astype(jnp.float32))


@pytest.mark.parametrize("bits", [0, 9, -3])
def test_bad_bits(bits):
  with pytest.raises(ValueError, match=r"1\.\.8"):
    fb.gelu(X, bits=bits)


def test_bad_inputs_have_clear_errors():
  with pytest.raises(TypeError, match="floating-point"):
    fb.gelu(jnp.arange(4))
  with pytest.raises(TypeError, match="floating-point"):
    fb.relu(jnp.arange(4))
  with pytest.raises(ValueError, match="2\\*\\*bits"):
    fb.gelu(X, borders=[0.0, 1.0], levels=[0.0, 0.5, 1.0])
  with pytest.raises(ValueError, match="inner borders"):
    fb.gelu(X, borders=[0.0, 1.0], levels=[0.0, 0.5])
  with pytest.raises(ValueError, match="ascending"):
    fb.gelu(X, borders=[1.0, 0.0, 2.0], levels=[0.0, 0.5, 0.7, 1.0])
  with pytest.raises(ValueError, match="not both"):
    fb.gelu(X, bits=2, borders=[-1.0, 0.0, 1.0], levels=[0.0, 0.5, 0.7, 1.0])
  with pytest.raises(ValueError, match="both borders= and levels="):
    fb.gelu(X, borders=[0.0])
  with pytest.raises(ValueError, match="exact"):
    fb.relu(X, bits=3)
  with pytest.raises(TypeError, match="threshold= and value="):
    fb.threshold(X)
  with pytest.raises(ValueError, match="no table"):
    fb.table("softmax", 3)
  with pytest.raises(TypeError, match="parameters"):
    fb.table("gelu", 3, alpha=1.0)
  with pytest.raises(ValueError, match="finite"):
    fb.gelu(X, borders=[np.nan], levels=[0.0, 1.0])


def test_nan_and_inf():
  x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.0, 1.0])
  for name in ALL:
    f, ref = fb_fn(name), REF[name]
    np.testing.assert_array_equal(np.isnan(f(x)), np.isnan(ref(x)))
    ok = ~np.isnan(np.asarray(ref(x)))
    np.testing.assert_array_equal(np.asarray(f(x))[ok], np.asarray(ref(x))[ok])
    g = jax.grad(lambda v: f(v).sum())(x)
    assert bool(jnp.all(jnp.isfinite(g))), (name, g)


def test_mlp_compiled_temp_is_smaller():
  """A 3-layer GELU MLP: XLA's compiled temp bytes of a grad step."""
  k1, k2, k3, kx = jax.random.split(KEY, 4)
  w = [jax.random.normal(k, s) * 0.05 for k, s in
       zip((k1, k2, k3), [(512, 2048), (2048, 2048), (2048, 512)])]
  x = jax.random.normal(kx, (256, 512))

  def make(act):
    def loss(ws, x):
      h = act(x @ ws[0])
      h = act(h @ ws[1])
      return jnp.mean((h @ ws[2]) ** 2)
    return jax.jit(jax.grad(loss))

  def temp(f):
    return f.lower(w, x).compile().memory_analysis().temp_size_in_bytes

  vanilla = temp(make(functools.partial(jax.nn.gelu, approximate=False)))
  few = temp(make(fb.gelu(approximate=False, bits=3)))
  assert few < 0.75 * vanilla, (few, vanilla)
