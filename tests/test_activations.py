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


@pytest.mark.xla_optimized  # exact mode to float32's last bits against eager jax.nn
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


# --------------------------------------------------------------------------
# Issue 11: second derivatives, non-finite cotangents, float64, clear errors.

PATHS = ["jax"] + (["ffi"] if fb.ext.available() else [])
XS = jnp.array([-1.0, 0.3, 1.5])


def _second_orders(f):
  """Hessian, grad of grad and forward-over-reverse of sum(f) at XS."""
  first = jax.grad(lambda x: f(x).sum())
  return {"hessian": lambda: jnp.diag(jax.hessian(lambda x: f(x).sum())(XS)),
          "grad of grad": lambda: jax.grad(lambda x: first(x).sum())(XS),
          "jvp of grad": lambda: jax.jvp(first, (XS,), (jnp.ones(3),))[1]}


@pytest.mark.parametrize("path", PATHS)
def test_second_derivative_through_codes_is_a_clear_error(path):
  # Issue 11, defect 4: these returned exactly 0 (gelu: [0, 0, 0], true
  # [0.242, 0.728, -0.031]).
  table = dict(borders=[-0.5, 0.0, 0.5], levels=[0.0, 0.3, 0.7, 1.0])
  fns = {name: fb_fn(name) for name in CONTINUOUS}
  fns["user table"] = fb.gelu(**table)
  fns["fb.fewbit"] = fb.fewbit(jnp.sin, bits=2)
  with fb.ext.mode(path):
    for f in fns.values():
      for run in _second_orders(f).values():
        with pytest.raises(TypeError, match="keeps only b-bit codes.*exact=True"):
          run()


@pytest.mark.parametrize("path", PATHS)
def test_cotangent_side_stays_differentiable(path):
  # The backward is linear in the cotangent: its transpose, its gradient and
  # its jvp in g work, and equal the levels (levels[code] * g is diagonal).
  g = jnp.array([0.5, -2.0, 3.0])
  with fb.ext.mode(path):
    bwd = lambda g: jax.vjp(fb.gelu, XS)[1](g)[0]
    diag = bwd(jnp.ones(3))
    np.testing.assert_array_equal(jax.linear_transpose(bwd, XS)(g)[0], diag * g)
    np.testing.assert_array_equal(jax.grad(lambda g: (bwd(g) * g).sum())(g), 2 * diag * g)
    np.testing.assert_array_equal(jax.jvp(bwd, (g,), (jnp.ones(3),))[1], diag)


@pytest.mark.parametrize("path", PATHS)
def test_piecewise_second_derivative_is_zero_like_jax(path):
  # Piecewise-linear: f'' = 0 away from the kinks; jax's hessian says so too.
  x = jnp.array([-7.0, -2.2, -0.7, 0.8, 2.5, 7.0])  # away from every kink
  with fb.ext.mode(path):
    for name in PIECEWISE:
      h = jnp.diag(jax.hessian(lambda v: fb_fn(name)(v).sum())(x))
      ref = jnp.diag(jax.hessian(lambda v: REF[name](v).sum())(x))
      np.testing.assert_array_equal(h, ref)
      np.testing.assert_array_equal(h, jnp.zeros_like(x))


def test_second_order_guard_costs_nothing_at_first_order(monkeypatch):
  # The guard is an identity with a custom jvp: a first-order gradient's
  # compiled temp bytes are those without it.
  w = jax.random.normal(KEY, (256, 256)) / 16
  x = jax.random.normal(KEY, (128, 256))
  loss = lambda w, x: (fb.gelu(fb.gelu(x @ w) @ w) ** 2).sum()

  def temp():  # a fresh jit traces the core again, with the guard as it is now
    return jax.jit(jax.grad(loss)).lower(w, x).compile().memory_analysis().temp_size_in_bytes

  guarded = temp()
  monkeypatch.setattr(A, "_codes_input", lambda x, name: x)
  assert guarded == temp()


@pytest.mark.parametrize("path", PATHS)
def test_non_finite_cotangent_where_derivative_is_zero(path):
  # Issue 11, defect 5: fb.relu's backward gave 0 * inf = NaN where x < 0;
  # jax.grad of jax.nn.relu gives 0. Every piecewise activation now matches
  # jax's vjp bit for bit, for every cotangent (inf, -inf, NaN, finite).
  x = jnp.repeat(jnp.array([-7.0, -4.0, -2.2, -0.7, -0.3, 0.3, 0.8, 2.5, 4.0, 7.0]), 4)
  g = jnp.tile(jnp.array([jnp.inf, -jnp.inf, jnp.nan, -1.5]), 10)
  with fb.ext.mode(path):
    for name in PIECEWISE:
      got = jax.vjp(fb_fn(name), x)[1](g)[0]
      ref = jax.vjp(REF[name], x)[1](g)[0]
      np.testing.assert_array_equal(got, ref, err_msg=name)


@pytest.mark.parametrize("path", PATHS)
def test_float64_levels_are_applied_in_float64(path):
  # Issue 11, defect 6: the slope was the float32 0.009999999776.
  with jax.enable_x64(True), fb.ext.mode(path):
    x = jnp.array([-3.0, -1.0, 2.0], jnp.float64)
    g = jax.jit(jax.grad(lambda v: fb.leaky_relu(v).sum()))(x)
    assert g.dtype == jnp.float64
    assert g.tolist() == [0.01, 0.01, 1.0]
    hard_sigmoid = jax.jit(jax.grad(lambda v: fb.hard_sigmoid(v).sum()))
    assert hard_sigmoid(x).tolist() == [0.0, 1 / 6, 1 / 6]
    levels = fb.table("gelu", 3).levels.astype(np.float64)
    gelu = jax.jit(jax.grad(lambda v: fb.gelu(v).sum()))
    gg = gelu(jnp.linspace(-4, 4, 101, dtype=jnp.float64))
    assert set(np.asarray(gg).tolist()) <= set(levels.tolist())
    # Lower precisions round the float64 level once, as jax rounds 0.01 * x.
    # (jitted: one compilation per dtype instead of one per eager op)
    ours = jax.jit(jax.grad(lambda v: fb.leaky_relu(v).sum()))
    ref = jax.jit(jax.grad(lambda v: jax.nn.leaky_relu(v).sum()))
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
      xd = x.astype(dtype)
      np.testing.assert_array_equal(ours(xd), ref(xd))


def test_traced_user_table_is_a_clear_error():
  # Issue 11, defect 8: a raw TracerArrayConversionError before.
  levels = jnp.array([0.0, 0.5, 0.8, 1.0])
  borders = jnp.array([-1.0, 0.0, 1.0])
  with pytest.raises(TypeError, match="levels= must be concrete.*outside the jitted"):
    jax.jit(lambda x, l: fb.gelu(x, borders=borders, levels=l))(X, levels)
  with pytest.raises(TypeError, match="borders= must be concrete"):
    jax.jit(lambda x, b: fb.fewbit(jnp.tanh, borders=b, levels=levels)(x))(X, borders)
  # Concrete arrays closed over are fine.
  jax.jit(lambda x: fb.gelu(x, borders=borders, levels=levels))(X)


def test_celu_alpha_zero_error_names_only_its_arguments():
  with pytest.raises(ValueError, match="celu needs alpha != 0") as e:
    fb.celu(X, alpha=0.0)
  assert "lim" not in str(e.value)


@pytest.mark.parametrize("bits", [True, 1.0, np.float32(2.0), "1"])
@pytest.mark.parametrize("name", ["relu", "leaky_relu", "gelu", "tanh"])
def test_non_int_bits_refused_by_every_kind(name, bits):
  # Issue 11, defect 8: bits=True / 1.0 were accepted by piecewise ones only.
  with pytest.raises(TypeError, match="bits must be an int in 1..8; got"):
    fb_fn(name, bits=bits)(X)


# --------------------------------------------------------------------------
# Exact mode (issue 12).


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


@pytest.mark.parametrize("name", ALL)
def test_exact_mode_gradient_equals_jax(name):
  f, ref = fb_fn(name, exact=True), REF[name]
  c = jax.random.normal(jax.random.key(1), X.shape)
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
    x = X.astype(dtype)
    np.testing.assert_array_equal(f(x), ref(x))
    got = jax.grad(lambda v: (f(v) * c.astype(dtype)).astype(jnp.float32).sum())(x)
    want = jax.grad(lambda v: (ref(v) * c.astype(dtype)).astype(jnp.float32).sum())(x)
    assert got.dtype == dtype
    assert _rel_err(got, want) <= tol, (name, dtype, _rel_err(got, want))


@pytest.mark.parametrize("name", ["gelu", "silu", "tanh", "softplus", "elu", "mish"])
def test_exact_mode_second_derivatives(name):
  f, ref = fb_fn(name, exact=True), REF[name]
  want = jnp.diag(jax.hessian(lambda x: ref(x).sum())(XS))
  for how, run in _second_orders(f).items():
    assert _rel_err(run(), want) < 1e-6, (name, how)
  np.testing.assert_allclose(jax.jvp(f, (XS,), (jnp.ones(3),))[1],
                             jax.jvp(ref, (XS,), (jnp.ones(3),))[1], rtol=1e-6)
  bwd = lambda g: jax.vjp(f, XS)[1](g)[0]
  np.testing.assert_allclose(jax.linear_transpose(bwd, XS)(jnp.ones(3))[0], bwd(jnp.ones(3)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_exact_mode_keeps_only_its_input(dtype):
  x = jnp.ones((64, 96), dtype)
  for f in (fb.gelu(approximate=False, exact=True), fb.gelu(exact=True), fb.silu(exact=True),
            fb.fewbit(jnp.sin, exact=True)):
    res = saved_residuals(lambda v: f(v * 2).sum(), x)
    sizes = [(a.shape, a.dtype) for a, _ in res if a.shape]
    assert sizes == [(x.shape, dtype)], (f, res)  # 2 v: f's input, nothing else
  # jax.nn.gelu keeps 12 (erf form) and 20 (tanh form) bytes per f32 element.
  rep = fb.memory.saved_residuals(lambda v: fb.gelu(v * 2, exact=True).sum(), x)
  assert rep.named_bytes(A.EXACT_NAME) == x.size * x.dtype.itemsize


def test_exact_mode_with_checkpoint_policy():
  # fb.checkpoint_policy() keeps the named input and recomputes the rest.
  w = jnp.ones((32, 32)) / 32
  x = jnp.linspace(-2, 2, 8 * 32).reshape(8, 32)
  def kept(policy):
    block = jax.checkpoint(lambda w, x: fb.gelu(jnp.sin(x) @ w, exact=True), policy=policy)
    return sum(fb.memory.saved_residuals(lambda w, x: block(w, x).sum(), w, x)
               .by_source().values()), block

  assert kept(jax.checkpoint_policies.save_only_these_names("other"))[0] == 0
  saved, block = kept(fb.checkpoint_policy())
  assert saved == 8 * 32 * 4  # the activation's input, f32
  assert kept(fb.checkpoint_policy(codes=False))[0] == 0
  got = jax.grad(lambda w: block(w, x).sum())(w)
  want = jax.grad(lambda w: jax.nn.gelu(jnp.sin(x) @ w).sum())(w)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_exact_mode_errors():
  with pytest.raises(ValueError, match="exact=True .* no bits="):
    fb.gelu(X, exact=True, bits=3)
  with pytest.raises(ValueError, match="exact=True .* no bits="):
    fb.gelu(X, exact=True, borders=[0.0], levels=[0.0, 1.0])
  with pytest.raises(ValueError, match="exact=True .* no bits="):
    fb.fewbit(jnp.sin, bits=4, exact=True)
  with pytest.raises(TypeError, match="exact must be True or False"):
    fb.relu(X, exact="yes")
  assert "exact=True" in fb.gelu(exact=True).__name__
