"""randomized_dense and its Flax layers against the dense layers they replace."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax._src.ad_checkpoint import saved_residuals

from fewbit_jax import ext, sketch
from fewbit_jax.dense import SKETCH_NAME, projection_dim, randomized_dense
from fewbit_jax.linen import RandomizedDense
from fewbit_jax.nnx import RandomizedLinear

KINDS = sketch.KINDS


@pytest.fixture(autouse=True)
def pure_jax():
  with ext.mode("jax"):
    yield


def _data(shape=(4, 6, 8), m=5, dtype=jnp.float32, seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=shape) + 0.5
  w = r.normal(size=(shape[-1], m)) / math.sqrt(shape[-1])
  b = r.normal(size=(m,))
  c = r.normal(size=shape[:-1] + (m,))  # a fixed cotangent
  return tuple(jnp.asarray(a, dtype) for a in (x, w, b, c))


def _vanilla(x, w, b, precision=None):
  return nn.Dense(w.shape[1], use_bias=b is not None, precision=precision).apply(
      {"params": {"kernel": w, **({"bias": b} if b is not None else {})}}, x)


# --- sketch size ----------------------------------------------------------------

def test_projection_dim():
  assert projection_dim(100, proj_dim_ratio=0.2) == 20
  assert projection_dim(101, proj_dim_ratio=0.2) == 21  # ceil
  assert projection_dim(100, proj_dim_ratio=0.2, proj_dim=7) == 7  # proj_dim wins
  assert projection_dim(100, proj_dim_ratio=0.01, proj_dim_min=5) == 5
  assert projection_dim(100, proj_dim_ratio=0.5, proj_dim_max=30) == 30
  assert projection_dim(10, proj_dim=64) == 10  # never more than B
  assert projection_dim(3, proj_dim_ratio=0.01) == 1  # never less than 1
  assert projection_dim(100, proj_dim_ratio=1.0) == 100


@pytest.mark.parametrize("kwargs,match", [
    ({}, "needs a sketch size"),
    ({"proj_dim_ratio": 0.0}, r"must be a number in \(0, 1\]"),
    ({"proj_dim_ratio": 1.5}, r"must be a number in \(0, 1\]"),
    ({"proj_dim_ratio": True}, r"must be a number in \(0, 1\]"),
    ({"proj_dim": 0}, "proj_dim=0 must be an int >= 1"),
    ({"proj_dim": 2.5}, "proj_dim=2.5 must be an int >= 1"),
    ({"proj_dim_ratio": 0.2, "proj_dim_min": 0}, "proj_dim_min=0 must be an int >= 1"),
    ({"proj_dim_ratio": 0.2, "proj_dim_min": 9, "proj_dim_max": 3},
     "proj_dim_min=9 is larger than proj_dim_max=3"),
])
def test_bad_sizes(kwargs, match):
  x, w, b, _ = _data()
  with pytest.raises(ValueError, match=match):
    randomized_dense(x, w, b, jax.random.key(0), **kwargs)


def test_bad_inputs():
  x, w, b, _ = _data()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="unknown sketch 'gaussain'.*gaussian"):
    randomized_dense(x, w, b, key, proj_dim_ratio=0.2, sketch="gaussain")
  with pytest.raises(ValueError, match=r"x's last axis must match.*\(\.\.\., 8\)"):
    randomized_dense(x[..., :7], w, b, key, proj_dim_ratio=0.2)
  with pytest.raises(ValueError, match="kernel must be 2-D"):
    randomized_dense(x, w[None], b, key, proj_dim_ratio=0.2)
  with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
    randomized_dense(x, w, b[:3], key, proj_dim_ratio=0.2)
  with pytest.raises(TypeError, match="x has dtype int32.*astype"):
    randomized_dense(x.astype(jnp.int32), w, b, key, proj_dim_ratio=0.2)
  with pytest.raises(TypeError, match="kernel has dtype complex64"):
    randomized_dense(x, w.astype(jnp.complex64), b, key, proj_dim_ratio=0.2)
  with pytest.raises(TypeError, match="expected one PRNG key"):
    randomized_dense(x, w, b, jax.random.split(key, 3), proj_dim_ratio=0.2)
  with pytest.raises(TypeError, match="expected one PRNG key"):
    randomized_dense(x, w, b, 0, proj_dim_ratio=0.2)


# --- forward and gradients -----------------------------------------------------

@pytest.mark.parametrize("dtype,shape,use_bias", [
    (jnp.float32, (4, 6, 8), True), (jnp.float32, (8,), True), (jnp.float32, (30, 8), False),
    (jnp.bfloat16, (4, 6, 8), True), (jnp.float16, (30, 8), False)])
def test_forward_bitwise_and_exact_dx_db(dtype, shape, use_bias):
  x, w, b, c = _data(shape, dtype=dtype)
  b = b if use_bias else None
  key = jax.random.key(1)

  def rand(x, w, b):
    return randomized_dense(x, w, b, key, proj_dim_ratio=0.5, sketch="gaussian")

  def loss(f):
    return lambda x, w, b: jnp.vdot(f(x, w, b).astype(jnp.float32), c.astype(jnp.float32))

  y = jax.jit(rand)(x, w, b)
  np.testing.assert_array_equal(y, jax.jit(_vanilla)(x, w, b))
  if dtype == jnp.float32 and use_bias:
    np.testing.assert_array_equal(rand(x, w, b), _vanilla(x, w, b))  # eager too
  argnums = (0, 1, 2) if use_bias else (0, 1)
  got = jax.jit(jax.grad(loss(rand), argnums))(x, w, b)
  want = jax.jit(jax.grad(loss(_vanilla), argnums))(x, w, b)
  for a, v in zip(got, want):
    assert a.dtype == v.dtype == dtype
  np.testing.assert_array_equal(got[0], want[0])  # dx exact
  if use_bias:
    np.testing.assert_array_equal(got[2], want[2])  # db exact
  # dW is the sketch estimate: (S^T x)^T (S^T g), with S^T x kept in x's dtype.
  k = projection_dim(math.prod(shape[:-1]), proj_dim_ratio=0.5)

  @jax.jit
  def estimate(x, g):
    sx = sketch.project("gaussian", x.reshape(-1, x.shape[-1]), key, k).astype(dtype)
    return sx.astype(jnp.float32).T @ sketch.project("gaussian", g.reshape(-1, g.shape[-1]),
                                                     key, k)

  est = estimate(x, c)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got[1].astype(jnp.float32), est, rtol=tol, atol=tol)


def test_forward_under_grad_is_bitwise():
  x, w, b, c = _data((16, 8))
  key = jax.random.key(0)
  y, _ = jax.jit(lambda w: jax.value_and_grad(
      lambda w: randomized_dense(x, w, b, key, proj_dim_ratio=0.3).sum())(w))(w)
  np.testing.assert_array_equal(y, jax.jit(lambda w: _vanilla(x, w, b).sum())(w))


@pytest.mark.parametrize("precision", [lax.Precision.HIGHEST, "bfloat16"])
def test_precision_like_dense(precision):
  x, w, b, _ = _data()
  got = jax.jit(lambda x: randomized_dense(x, w, b, jax.random.key(0), proj_dim_ratio=0.2,
                                           precision=precision))(x)
  np.testing.assert_array_equal(got, jax.jit(lambda x: _vanilla(x, w, b, precision))(x))


def test_preferred_element_type_like_nnx_linear():
  x, w, b, _ = _data(dtype=jnp.bfloat16)
  lin = nnx.Linear(8, 5, preferred_element_type=jnp.float32, param_dtype=jnp.bfloat16,
                   rngs=nnx.Rngs(0))
  lin.kernel[...], lin.bias[...] = w, b
  assert lin.kernel[...].dtype == jnp.bfloat16
  f = lambda x, w, b: randomized_dense(x, w, b, jax.random.key(0), proj_dim_ratio=0.2,
                                       preferred_element_type=jnp.float32)
  y = jax.jit(f)(x, w, b)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(y, nnx.jit(lambda m, x: m(x))(lin, x))
  dx, dw, db = jax.jit(jax.grad(lambda *a: f(*a).sum(), (0, 1, 2)))(x, w, b)
  assert dx.dtype == dw.dtype == db.dtype == jnp.bfloat16


@pytest.mark.parametrize("kind", ["dct", "dft"])
def test_full_size_trig_sketch_gives_exact_dw(kind):
  x, w, b, c = _data((24, 8))
  dw = jax.jit(jax.grad(lambda w: jnp.vdot(
      randomized_dense(x, w, b, jax.random.key(3), proj_dim_ratio=1.0, sketch=kind), c)))(w)
  np.testing.assert_allclose(dw, x.T @ c, rtol=1e-4, atol=1e-4)


def test_dw_is_the_sketch_estimate():
  # The weight gradient is (S^T x)^T (S^T c) with S the sketch of the key,
  # whose mean and variance over keys tests/test_sketch.py checks against
  # theory (test_unbiased_and_variance_matches_theory, the same sizes).
  x, w, b, c = _data((64, 6), m=5)
  k = 16

  def dw(key):
    return jax.grad(lambda w: jnp.vdot(
        randomized_dense(x, w, b, key, proj_dim=k), c))(w)

  keys = jax.random.split(jax.random.key(9), 8)
  est = np.asarray(jax.jit(jax.vmap(dw))(keys), np.float64)
  s = np.asarray(jax.jit(jax.vmap(lambda key: sketch.sketch_matrix("gaussian", key, 64, k)))(
      keys), np.float64)
  x64, c64 = np.asarray(x, np.float64), np.asarray(c, np.float64)
  want = np.einsum("nbk,bi,nek,ej->nij", s, x64, s, c64, optimize=True)
  np.testing.assert_allclose(est, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert np.abs(est - x64.T @ c64).max() > 1e-3  # an estimate, not the exact gradient


def test_strict_promotion_and_rank_rules():
  # Users may run with JAX's strictest numpy rules; nothing here relies on
  # implicit promotion or broadcasting of ranks.
  x, w, b, _ = _data((3, 20, 8), dtype=jnp.bfloat16)
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    for kind in KINDS:
      g = jax.jit(jax.grad(lambda x, w, b: randomized_dense(
          x, w, b, jax.random.key(0), proj_dim_ratio=0.3, sketch=kind).astype(jnp.float32).sum(),
          (0, 1, 2)))(x, w, b)
      assert [a.dtype for a in g] == [jnp.bfloat16] * 3


def test_empty_batch():
  x, w, b, _ = _data((0, 8))
  y = randomized_dense(x, w, b, jax.random.key(0), proj_dim_ratio=0.2)
  assert y.shape == (0, 5)
  dw = jax.grad(lambda w: randomized_dense(x, w, b, jax.random.key(0), proj_dim_ratio=0.2).sum())(w)
  np.testing.assert_array_equal(dw, jnp.zeros_like(w))


def test_zero_width():
  x, w, b, _ = _data((4, 0), m=3)
  dw = jax.grad(lambda w: randomized_dense(x, w, b, jax.random.key(0), proj_dim_ratio=0.5).sum())(w)
  assert dw.shape == (0, 3)


def test_mixed_dtypes_promote_like_flax():
  x, w, b, _ = _data()
  y = randomized_dense(x.astype(jnp.bfloat16), w, b, jax.random.key(0), proj_dim_ratio=0.2)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(y, _vanilla(x.astype(jnp.bfloat16), w, b))


# --- transformations -------------------------------------------------------------

def test_vmap_over_examples_sketches_each_example():
  x, w, b, c = _data((3, 10, 8))
  key = jax.random.key(0)

  def loss(f):
    return lambda x, c: jnp.vdot(f(x), c)

  rand = lambda x: randomized_dense(x, w, b, key, proj_dim_ratio=0.5, sketch="rademacher")
  dx = jax.jit(jax.vmap(jax.grad(loss(rand))))(x, c)
  want = jax.jit(jax.vmap(jax.grad(loss(lambda x: _vanilla(x, w, b)))))(x, c)
  np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-6)  # exact up to XLA's fusion choices
  # Each example of 10 rows gets its own 5-row sketch: dW per example.
  dws = jax.jit(jax.vmap(jax.grad(lambda w, x, c: jnp.vdot(randomized_dense(
      x, w, b, key, proj_dim_ratio=0.5, sketch="rademacher"), c))))
  assert dws(jnp.broadcast_to(w, (3,) + w.shape), x, c).shape == (3, 8, 5)


def test_scan_over_layers():
  n, layers = 8, 3
  r = np.random.default_rng(0)
  ws = jnp.asarray(r.normal(size=(layers, n, n)) / math.sqrt(n), jnp.float32)
  bs = jnp.asarray(r.normal(size=(layers, n)), jnp.float32)
  x = jnp.asarray(r.normal(size=(32, n)), jnp.float32)

  def net(ws, bs, key, dense):
    def body(h, p):
      w, b, i = p
      return jax.nn.relu(dense(h, w, b, jax.random.fold_in(key, i))), None
    return lax.scan(body, x, (ws, bs, jnp.arange(layers)))[0].sum()

  rand = lambda h, w, b, key: randomized_dense(h, w, b, key, proj_dim_ratio=0.25, sketch="dct")
  plain = lambda h, w, b, key: _vanilla(h, w, b)
  key = jax.random.key(1)
  (v, (gw, gb)) = jax.jit(jax.value_and_grad(net, (0, 1)), static_argnums=3)(ws, bs, key, rand)
  (vv, (_, gbv)) = jax.jit(jax.value_and_grad(net, (0, 1)), static_argnums=3)(ws, bs, key, plain)
  np.testing.assert_array_equal(v, vv)
  assert gw.shape == ws.shape and bool(jnp.isfinite(gw).all())
  # dx is exact in every layer and only dW is estimated, so every db is exact.
  np.testing.assert_allclose(gb, gbv, rtol=1e-6, atol=1e-6)


# --- what the backward pass keeps -------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_residuals_are_sketch_key_and_params(kind):
  x, w, b, c = _data((4, 50, 8))
  key = jax.random.key(0)

  def f(w, b, x):
    h = jnp.sin(x)  # an intermediate: its residual would show if kept
    return randomized_dense(h, w, b, key, proj_dim_ratio=0.2, sketch=kind).sum()

  res = saved_residuals(f, w, b, x)
  shapes = sorted(tuple(aval.shape) for aval, _ in res)
  k = math.ceil(0.2 * 200)
  assert shapes == sorted([(8, 5), (5,), (2,), (k, 8), (4, 50, 8)]), res
  # (4, 50, 8) is cos(x) kept by sin's own backward, not by the dense layer:
  assert [why for aval, why in res if aval.shape == (4, 50, 8)][0].find("cos") >= 0
  sk = [(aval, why) for aval, why in res if aval.shape == (k, 8)]
  assert SKETCH_NAME in sk[0][1] and sk[0][0].dtype == jnp.float32
  bf = saved_residuals(lambda w, b, x: f(w, b, x.astype(jnp.bfloat16)).astype(jnp.float32),
                       w.astype(jnp.bfloat16), b.astype(jnp.bfloat16), x)
  assert [a.dtype for a, _ in bf if a.shape == (k, 8)] == [jnp.bfloat16]


def test_remat_policy_keeps_only_the_sketch():
  # With jax.checkpoint and save_only_these_names(SKETCH_NAME) the sketch is the
  # only activation kept: everything else is recomputed in the backward pass.
  x, w, b, _ = _data((64, 8), m=8)
  key = jax.random.key(0)

  def block(w, x):
    h = jnp.tanh(x @ w)
    return jnp.tanh(randomized_dense(h, w, b, key, proj_dim_ratio=0.25)).sum()

  policy = jax.checkpoint_policies.save_only_these_names(SKETCH_NAME)
  res = saved_residuals(jax.checkpoint(block, policy=policy), w, x)
  kept = [aval.shape for aval, why in res if "argument" not in why and "constant" not in why]
  assert kept == [(16, 8)], res
  g = jax.jit(jax.grad(jax.checkpoint(block, policy=policy)))(w, x)
  np.testing.assert_allclose(g, jax.jit(jax.grad(block))(w, x), rtol=1e-5, atol=1e-5)


# The memory tests run on both paths: pure JAX, and the FFI kernels where the
# extension is built (mode 'auto'). The compiled program, not the code, decides
# what is kept: XLA once computed the relu twice for the kernel's reshaped
# operand and kept both copies.
MODES = ["jax"] + (["auto"] if ext.available() else [])
# B = 16384 positions either way: a (B, N) input, and (batch, sequence, N) as
# in a transformer, where the layer reads x through a reshape.
LEADS = [(16384,), (64, 256)]


@functools.lru_cache(maxsize=None)
def _two_layer_temp(kind, lead=(16384,), mode="jax", n=768):
  """Compiled temp bytes of the parameter gradient of x -> dense -> relu -> dense.

  Two layers, because one cannot show the saving: its input and its output
  are live together in the forward pass with or without a sketch. The saving
  is that the second layer's input (the relu output) need not outlive the
  activations that follow it.
  """
  key = jax.random.key(0)

  def dense(x, w, bias, i):
    if kind is None:
      return x @ w + bias
    return randomized_dense(x, w, bias, jax.random.fold_in(key, i), proj_dim_ratio=0.2,
                            sketch=kind)

  def loss(params, x):
    (w1, b1), (w2, b2) = params
    return jnp.sum(dense(jax.nn.relu(dense(x, w1, b1, 0)), w2, b2, 1) ** 2)

  p = jax.ShapeDtypeStruct((n, n), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32)
  x = jax.ShapeDtypeStruct((*lead, n), jnp.float32)
  with ext.mode(mode):  # read at trace time
    # LLVM's optimization level changes no buffer; level 0 compiles faster.
    compiled = jax.jit(jax.grad(loss)).lower([p, p], x).compile(
        {"xla_backend_optimization_level": 0})
  return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_memory_below_vanilla(kind, mode, lead):
  # B = 16384 positions, width 768, ratio 0.2: a whole Gaussian S (16384 x 3277)
  # would be 205 MiB, over four times a layer input (48 MiB).
  vanilla_temp = _two_layer_temp(None, lead)[0]
  temp, hlo = _two_layer_temp(kind, lead, mode)
  mib = 2 ** 20
  # The relu output (48 MiB) is no longer kept; the two sketches (9.6 MiB each)
  # and a few blocks are: at least 15 MiB less.
  assert temp < vanilla_temp - 15 * mib, (temp / mib, vanilla_temp / mib)
  assert "16384,3277]" not in hlo and "3277,16384]" not in hlo  # S is never whole


@pytest.mark.parametrize("mode", MODES)
def test_small_batch_adds_no_kernel_copy(mode):
  # 128 positions through a 256 x 256 layer: the activation and the cotangent
  # are smaller than the kernel, so the sketch is ordered through them and no
  # kernel-sized (256 KiB) copy is added to what the plain layer's step holds.
  x, w, b = jnp.ones((128, 256)), jnp.ones((256, 256)), jnp.zeros(256)
  key = jax.random.key(0)
  plain = lambda w, b, x: jnp.sum(jnp.tanh(x @ w + b))
  rand = lambda w, b, x: jnp.sum(jnp.tanh(randomized_dense(x, w, b, key, proj_dim_ratio=0.2)))
  with ext.mode(mode):
    temps = [jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(w, b, x).compile(
        {"xla_backend_optimization_level": 0}).memory_analysis().temp_size_in_bytes
             for f in (plain, rand)]
  assert temps[1] - temps[0] < w.nbytes // 2, temps


@pytest.mark.skipif(not ext.available(), reason="fewbit_jax._xla_ext not built")
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("kind", ext.SKETCH_KINDS)
def test_kernels_keep_no_more_than_pure_jax(kind, lead):
  # The kernel reads x where the matmul does and allocates nothing: its step
  # holds no more than the pure-JAX loop over blocks of rows (which keeps a
  # block in flight), up to how XLA happens to pack the buffers (< 1 MiB).
  auto, hlo = _two_layer_temp(kind, lead, "auto")
  assert f"fewbit_sketch_{kind}" in hlo
  pure = _two_layer_temp(kind, lead, "jax")[0]
  assert auto <= pure + 2**20, (auto / 2**20, pure / 2**20)


# --- linen ---------------------------------------------------------------------------

LINEN_CONFIGS = [
    dict(),
    dict(use_bias=False, precision=lax.Precision.HIGHEST),
    dict(dtype=jnp.bfloat16),
    dict(dtype=jnp.float16, param_dtype=jnp.float16),
]


@pytest.mark.parametrize("config", LINEN_CONFIGS)
def test_linen_matches_dense(config):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 6)), jnp.float32)
  ours = RandomizedDense(5, proj_dim_ratio=0.3, **config)
  ref = nn.Dense(5, **config)
  variables = ours.init(jax.random.key(1), x)
  ref_vars = ref.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, variables, ref_vars)  # same tree, same init
  y = jax.jit(lambda v, x, key: ours.apply(v, x, rngs={"sketch": key}))(variables, x,
                                                                         jax.random.key(2))
  np.testing.assert_array_equal(y, jax.jit(ref.apply)(variables, x))
  g = jax.jit(jax.grad(lambda v: ours.apply(v, x, rngs={"sketch": jax.random.key(2)}).astype(
      jnp.float32).sum()))(variables)
  assert jax.tree.map(lambda a: a.dtype, g) == jax.tree.map(lambda a: a.dtype, variables)


def test_linen_rng_handling():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 6)), jnp.float32)
  layer = RandomizedDense(4)
  variables = layer.init(jax.random.key(1), x)  # no sketch rng needed to init
  with pytest.raises(ValueError, match=r"rngs=\{'sketch': jax.random.fold_in\(key, step\)\}"):
    layer.apply(variables, x)
  y = layer.apply(variables, x, deterministic=True)  # evaluation: no rng
  np.testing.assert_array_equal(y, nn.Dense(4).apply(variables, x))
  ev = RandomizedDense(4, deterministic=True)
  np.testing.assert_array_equal(ev.apply(variables, x), y)

  @functools.partial(jax.jit, static_argnames="det")
  def dw(key, det=False):
    return jax.grad(lambda v: jnp.sum(layer.apply(v, x, deterministic=det, rngs={"sketch": key})
                                      ** 2))(variables)["params"]["kernel"]

  assert not np.allclose(dw(jax.random.key(3)), dw(jax.random.key(4)))  # fresh sketch per key
  exact = jax.jit(jax.grad(lambda v: jnp.sum(nn.Dense(4).apply(v, x) ** 2)))(variables)[
      "params"]["kernel"]
  np.testing.assert_allclose(dw(jax.random.key(3), det=True), exact, rtol=1e-5)
  other = RandomizedDense(4, rng_collection="proj")
  with pytest.raises(ValueError, match="'proj'"):
    other.apply(variables, x)
  other.apply(variables, x, rngs={"proj": jax.random.key(0)})


def test_linen_bad_options():
  with pytest.raises(ValueError, match="unknown sketch"):
    RandomizedDense(4, sketch="fft")
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    RandomizedDense(4, proj_dim_ratio=2.0)
  with pytest.raises(ValueError, match="custom dot_general"):
    RandomizedDense(4, dot_general=lax.dot_general)
  with pytest.raises(ValueError, match="sketch_blocks=0"):
    RandomizedDense(4, sketch_blocks=0)
  with pytest.raises(ValueError, match="sketch_blocks=2.5"):
    RandomizedLinear(3, 4, sketch_blocks=2.5, rngs=nnx.Rngs(0))


def test_layers_take_sketch_blocks():
  # RandomizedLinear gives randomized_dense's gradient for the same blocks and
  # key; both layers keep one (ceil(k / C), N) sketch per block.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 3)), jnp.float32)
  key = jax.random.key(7)
  layer = RandomizedLinear(3, 5, proj_dim_ratio=0.5, sketch_blocks=4, rngs=nnx.Rngs(0))
  w, b = layer.kernel[...], layer.bias[...]
  loss = lambda w, blocks: jnp.sum(randomized_dense(
      x, w, b, key, proj_dim_ratio=0.5, sketch_blocks=blocks) ** 2)
  want = jax.grad(loss)(w, 4)
  assert not np.allclose(want, jax.grad(loss)(w, 1))  # the blocks change the estimate
  got = nnx.grad(lambda m: jnp.sum(m(x, rngs=key) ** 2))(layer)["kernel"][...]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  linen = RandomizedDense(5, proj_dim_ratio=0.5, sketch_blocks=4)
  variables = linen.init(jax.random.key(1), x)
  graphdef, state = nnx.split(layer)
  kept = [saved_residuals(lambda v: linen.apply(v, x, rngs={"sketch": key}).sum(), variables),
          saved_residuals(lambda s: nnx.merge(graphdef, s)(x, rngs=key).sum(), state)]
  for residuals in kept:
    shapes = [r[0].shape for r in residuals]
    assert (4, 3, 3) in shapes and x.shape not in shapes, shapes  # 4 blocks of 3 rows


# --- nnx -------------------------------------------------------------------------------

@pytest.mark.parametrize("config", LINEN_CONFIGS)
def test_nnx_matches_linear_and_linen(config):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 6)), jnp.float32)
  ours = RandomizedLinear(6, 5, proj_dim_ratio=0.3, rngs=nnx.Rngs(0, sketch=1), **config)
  ref = nnx.Linear(6, 5, rngs=nnx.Rngs(0), **config)
  ours_params, ref_params = nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param)
  assert jax.tree.structure(ours_params) == jax.tree.structure(ref_params)
  jax.tree.map(np.testing.assert_array_equal, ours_params, ref_params)
  y = nnx.jit(lambda m, x: m(x))(ours, x)
  np.testing.assert_array_equal(y, ref(x))
  # NNX against linen, as flax tests them: the same parameters give the same output.
  linen = RandomizedDense(5, proj_dim_ratio=0.3, **config)
  variables = {"params": {k: v[...] for k, v in nnx.to_pure_dict(ours_params).items()}}
  np.testing.assert_array_equal(y, linen.apply(variables, x, rngs={"sketch": jax.random.key(0)}))


def test_nnx_fresh_sketch_every_step():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 6)), jnp.float32)
  model = RandomizedLinear(6, 4, sketch="countsketch", rngs=nnx.Rngs(0, sketch=1))

  @nnx.jit
  def grad_step(model):
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)["kernel"][...]

  g1, g2 = grad_step(model), grad_step(model)
  assert not np.allclose(g1, g2)
  assert int(model.rngs.count[...]) == 2
  model.eval()  # as nnx.Dropout: deterministic, exact, no key drawn
  g3, g4 = grad_step(model), grad_step(model)
  np.testing.assert_array_equal(g3, g4)
  assert int(model.rngs.count[...]) == 2
  ref = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(g3, grad_step(ref), rtol=1e-6)
  model.train()
  assert not model.deterministic
  assert nnx.view(model, deterministic=True).deterministic


def test_nnx_rngs():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 6)), jnp.float32)
  # A separate sketch stream leaves the parameter draws of a model untouched.
  rngs, ref_rngs = nnx.Rngs(0, sketch=7), nnx.Rngs(0)
  a = [RandomizedLinear(6, 6, rngs=rngs) for _ in range(2)]
  b = [nnx.Linear(6, 6, rngs=ref_rngs) for _ in range(2)]
  np.testing.assert_array_equal(a[1].kernel[...], b[1].kernel[...])
  # Without any stream for sketches: an error at call time that says what to do.
  layer = RandomizedLinear(6, 3, rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match=r"nnx.Rngs\(params=0, sketch=1\).*rngs=key"):
    layer(x)
  layer(x, deterministic=True)
  y1 = layer(x, rngs=jax.random.key(1))
  y2 = layer(x, rngs=nnx.Rngs(sketch=2))
  np.testing.assert_array_equal(y1, y2)  # the key only matters for the gradient
  with pytest.raises(TypeError, match="rngs must be"):
    layer(x, rngs=3)
  with pytest.raises(ValueError, match="custom dot_general"):
    RandomizedLinear(6, 3, dot_general=lambda *a, **k: lax.dot_general(*a, **k),
                     rngs=nnx.Rngs(0))
