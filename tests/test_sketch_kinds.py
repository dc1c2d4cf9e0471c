"""The lower-variance sketch kinds: orthogonal, sampled and wta.

Each is checked for unbiasedness (the mean over many keys of the estimated
x^T g against the exact one, within a bound from the variance) and for its
variance against `sketch.estimate_variance`; through the randomized layer for
what it keeps (k rows, as many bytes as the Gaussian sketch's, plus k
indices for the sampled kinds), under jit, scan and remat, and on 8 devices
for blocks sampled shard by shard with no collective beyond the plain layer's.
"""

import json
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src.ad_checkpoint import saved_residuals

from fewbit_jax import ext, sketch
from fewbit_jax.dense import SKETCH_NAME, randomized_dense

NEW = ("orthogonal", "sampled", "wta")
# Through the layer: every kind beside gaussian's family, the quantized one too.
LAYER = NEW + sketch.QUANTIZED_KINDS


@pytest.fixture(autouse=True)
def pure_jax():
  with ext.mode("jax"):
    yield


def _xg(b=64, n=6, m=5, seed=0, spread=1.0):
  """x with uneven row norms (log-normal, as tokens' activations have), g correlated with x."""
  r = np.random.default_rng(seed)
  x = (r.normal(size=(b, n)) + r.normal(size=(1, n))) * np.exp(spread * r.normal(size=(b, 1)))
  g = 0.5 * x[:, :m] @ r.normal(size=(m, m)) + r.normal(size=(b, m))
  return x.astype(np.float32), g.astype(np.float32)


def _estimate(kind, x, g, key, k):
  if kind in sketch.SAMPLED_KINDS:
    rows, idx = sketch.sample_rows(kind, x, key, k)
    return rows.T @ sketch.take_rows(g, idx)
  return sketch.project(kind, x, key, k).T @ sketch.project(kind, g, key, k)


def _estimates(kind, x, g, k, n_keys, seed=0):
  keys = jax.random.split(jax.random.key(seed), n_keys)
  return np.asarray(jax.jit(jax.vmap(lambda key: _estimate(kind, x, g, key, k)))(keys),
                    np.float64)


# --- definitions ----------------------------------------------------------------

def test_orthogonal_is_scaled_orthonormal_columns():
  b, k = 40, 12
  s = np.asarray(sketch.sketch_matrix("orthogonal", jax.random.key(0), b, k), np.float64)
  np.testing.assert_allclose(s.T @ s, (b / k) * np.eye(k), atol=1e-4)
  x, _ = _xg(b=b)
  got = jax.jit(lambda x: sketch.project("orthogonal", x, jax.random.key(0), k))(x)
  np.testing.assert_allclose(got, s.T @ x, rtol=1e-4, atol=1e-4)
  other = sketch.sketch_matrix("orthogonal", jax.random.key(1), b, k)
  assert np.abs(np.asarray(other) - s).max() > 0.1  # the key decides S
  # Full size: S S^T = I, the estimate is exact.
  full = np.asarray(sketch.sketch_matrix("orthogonal", jax.random.key(2), b, b), np.float64)
  np.testing.assert_allclose(full @ full.T, np.eye(b), atol=1e-4)


def test_orthogonal_blocks_are_the_block_diagonal_sketch():
  key, c, r, k = jax.random.key(1), 4, 8, 3
  x = jax.random.normal(jax.random.key(0), (c * r, 5))
  s = sketch.sketch_matrix("orthogonal", key, c * r, k, blocks=c)
  sx = jax.jit(lambda x: sketch.project_blocks("orthogonal", x, sketch.block_keys(key, c), k))(
      x.reshape(c, r, 5))
  np.testing.assert_allclose(sx.reshape(c * k, 5), s.T @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sketch.SAMPLED_KINDS)
def test_sampled_rows_are_weighted_rows_of_x(kind):
  x, _ = _xg(b=32)
  x[5] = 0.0  # a zero row is never drawn
  rows, idx = jax.jit(lambda x: sketch.sample_rows(kind, x, jax.random.key(3), 8))(x)
  assert rows.shape == (8, 6) and idx.shape == (8,) and idx.dtype == jnp.int32
  idx = np.asarray(idx)
  assert 5 not in idx and idx.min() >= 0 and idx.max() < 32
  w = np.linalg.norm(rows, axis=1) / np.linalg.norm(x[idx], axis=1)
  np.testing.assert_allclose(rows, w[:, None] * x[idx], rtol=1e-5, atol=1e-6)
  a = np.linalg.norm(x.astype(np.float64), axis=1)
  if kind == "sampled":  # weight 1 / (k p_i), p_i = a_i / sum(a)
    np.testing.assert_allclose(w, a.sum() / (8 * a[idx]), rtol=1e-4)
  else:  # no row twice, weight 1 / pi_i
    assert len(set(idx.tolist())) == 8
    pi = sketch._sampling.inclusion_weights("wta", a, 8)
    np.testing.assert_allclose(pi.sum(), 8.0, rtol=1e-9)
    np.testing.assert_allclose(w, 1 / pi[idx], rtol=1e-4)


def test_wta_keeps_the_largest_rows_for_certain():
  x, g = _xg(b=32, spread=0.2)
  x[[3, 17]] *= 50.0  # inclusion probability would exceed 1: kept with weight 1
  keys = jax.random.split(jax.random.key(0), 50)
  rows, idx = jax.jit(jax.vmap(lambda key: sketch.sample_rows("wta", x, key, 8)))(keys)
  idx = np.asarray(idx)
  assert (idx[:, :2] == [3, 17]).all() or (idx[:, :2] == [17, 3]).all()
  np.testing.assert_allclose(np.sort(np.asarray(rows)[:, :2, 0], axis=1)[0],
                             np.sort(x[[3, 17], 0]), rtol=1e-6)
  assert len({tuple(sorted(i[2:])) for i in idx}) > 10  # the rest is drawn
  # And sampled draws them almost every time, but with replacement and weights.
  _, idx_s = jax.jit(jax.vmap(lambda key: sketch.sample_rows("sampled", x, key, 8)))(keys)
  assert (np.asarray(idx_s) == 3).any(axis=1).mean() > 0.9


@pytest.mark.parametrize("kind", sketch.SAMPLED_KINDS)
def test_zero_input_gives_zero_estimate(kind):
  x = np.zeros((16, 4), np.float32)
  rows, idx = sketch.sample_rows(kind, x, jax.random.key(0), 4)
  assert bool(jnp.all(rows == 0)) and bool(jnp.all((idx >= 0) & (idx < 16)))


# --- unbiased, and the variance of theory ----------------------------------------------

@pytest.mark.parametrize("kind", NEW)
def test_unbiased_and_variance_matches_theory(kind, matches_theory):
  b, k, n_keys = 64, 16, 4000
  x, g = _xg(b=b)
  est = _estimates(kind, x, g, k, n_keys)
  truth = x.astype(np.float64).T @ g
  var = sketch.estimate_variance(kind, x, g, k)
  matches_theory(est, truth, var, n_keys)


def test_variance_below_gaussian():
  # Orthogonal: about 1 - k / B of gaussian's for any x. The sampled kinds:
  # below it where row norms are uneven; wta far below (sampled draws the
  # heavy rows again and again, wta keeps them once and draws the rest).
  x, g = _xg(b=64)
  v = {kind: sketch.estimate_variance(kind, x, g, 16).sum() for kind in ("gaussian",) + NEW}
  assert v["orthogonal"] < 0.8 * v["gaussian"], v
  assert v["sampled"] < 0.85 * v["gaussian"], v
  assert v["wta"] < 0.3 * v["gaussian"], v
  # With even row norms, sampling is uniform and still no worse than gaussian.
  xe, ge = _xg(b=64, spread=0.0)
  xe = xe / np.linalg.norm(xe, axis=1, keepdims=True)
  ve = {kind: sketch.estimate_variance(kind, xe, ge, 16).sum() for kind in ("gaussian", "sampled")}
  assert ve["sampled"] <= ve["gaussian"], ve


# --- errors -------------------------------------------------------------------------

def test_errors():
  x = jnp.ones((8, 3))
  key = jax.random.key(0)
  for kind in sketch.SAMPLED_KINDS:
    with pytest.raises(ValueError, match=f"{kind} sketch chooses rows.*sample_rows"):
      sketch.project(kind, x, key, 2)
    with pytest.raises(ValueError, match="sample_rows"):
      sketch.sketch_matrix(kind, key, 8, 2)
    with pytest.raises(ValueError, match=r"k=9 must be in \[1, B=8\]"):
      sketch.sample_rows(kind, x, key, 9)
    with pytest.raises(ValueError, match="2-D"):
      sketch.sample_rows(kind, x[None], key, 2)
  with pytest.raises(ValueError, match="fixed S: use project"):
    sketch.sample_rows("gaussian", x, key, 2)
  with pytest.raises(ValueError, match="unknown sketch 'WTA'"):
    sketch.check_kind("WTA")
  with pytest.raises(ValueError, match="QR"):
    sketch.project("orthogonal", x, key, 2, row0=0)
  with pytest.raises(ValueError, match="take_rows takes"):
    sketch.take_rows(x, jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(ValueError, match="unknown sketch"):
    randomized_dense(x, jnp.ones((3, 2)), None, key, proj_dim=2, sketch="importance")


# --- through the randomized layer ------------------------------------------------------

def _layer_data(shape=(4, 16, 8), m=5):
  r = np.random.default_rng(0)
  x = r.normal(size=shape) * np.exp(r.normal(size=shape[:-1] + (1,)))
  w = r.normal(size=(shape[-1], m)) / math.sqrt(shape[-1])
  c = r.normal(size=shape[:-1] + (m,))
  return tuple(jnp.asarray(a, jnp.float32) for a in (x, w, c))


@pytest.mark.parametrize("kind", LAYER)
@pytest.mark.parametrize("blocks", [None, 4])
def test_layer_weight_gradient_is_unbiased(kind, blocks):
  x, w, c = _layer_data()

  def dw(key):
    return jax.grad(lambda w: jnp.vdot(randomized_dense(
        x, w, None, key, proj_dim=16, sketch=kind, sketch_blocks=blocks), c))(w)

  n_keys = 2000
  est = np.asarray(jax.jit(jax.vmap(dw))(jax.random.split(jax.random.key(1), n_keys)),
                   np.float64)
  truth = np.einsum("btn,btm->nm", np.asarray(x, np.float64), np.asarray(c, np.float64))
  z = (est.mean(0) - truth) / (est.std(0) / math.sqrt(n_keys))
  assert np.abs(z).max() < 5.0, z
  assert np.abs(est - truth).max() > 1e-3  # an estimate, not the exact gradient


@pytest.mark.parametrize("kind", sketch.SAMPLED_KINDS)
def test_layer_dw_is_the_sample_estimate_and_dx_exact(kind):
  x, w, c = _layer_data()
  key = jax.random.key(7)
  f = lambda x, w: jnp.vdot(randomized_dense(x, w, None, key, proj_dim=16, sketch=kind), c)
  dx, dw = jax.jit(jax.grad(f, (0, 1)))(x, w)
  rows, idx = sketch.sample_rows(kind, x.reshape(64, 8), key, 16)
  np.testing.assert_allclose(dw, rows.T @ sketch.take_rows(c.reshape(64, 5), idx), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(dx, jax.grad(lambda x: jnp.vdot(x @ w, c))(x), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("kind", NEW)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_residual_is_k_rows_like_gaussian_plus_indices(kind, dtype):
  x, w, _ = _layer_data((4, 50, 8))
  x, w = x.astype(dtype), w.astype(dtype)
  k = math.ceil(0.2 * 200)

  def kept(kind):
    res = saved_residuals(lambda w, x: randomized_dense(
        jnp.sin(x), w, None, jax.random.key(0), proj_dim_ratio=0.2, sketch=kind).sum(), w, x)
    return sorted((tuple(a.shape), str(a.dtype)) for a, why in res
                  if "argument" not in why and (len(a.shape) != 3))

  rows = ((k, 8), str(jnp.dtype(dtype)))
  gauss = kept("gaussian")
  assert rows in gauss
  extra = [("int32", (k,))] if kind in sketch.SAMPLED_KINDS else [("uint32", (2,))]
  assert sorted(kept(kind)) == sorted([rows] + [(s, d) for d, s in extra]), kept(kind)


@pytest.mark.parametrize("kind", LAYER)
def test_scan_over_layers(kind):
  n, layers = 8, 3
  r = np.random.default_rng(0)
  ws = jnp.asarray(r.normal(size=(layers, n, n)) / math.sqrt(n), jnp.float32)
  bs = jnp.asarray(r.normal(size=(layers, n)), jnp.float32)
  x = jnp.asarray(r.normal(size=(32, n)), jnp.float32)

  def net(ws, bs, key, rand):
    def body(h, p):
      w, b, i = p
      y = (randomized_dense(h, w, b, jax.random.fold_in(key, i), proj_dim_ratio=0.25,
                            sketch=kind) if rand else h @ w + b)
      return jax.nn.relu(y), None
    return lax.scan(body, x, (ws, bs, jnp.arange(layers)))[0].sum()

  f = jax.jit(jax.value_and_grad(net, (0, 1)), static_argnums=3)
  v, (gw, gb) = f(ws, bs, jax.random.key(1), True)
  vv, (_, gbv) = f(ws, bs, jax.random.key(1), False)
  np.testing.assert_allclose(v, vv, rtol=1e-6)
  assert gw.shape == ws.shape and bool(jnp.isfinite(gw).all())
  np.testing.assert_allclose(gb, gbv, rtol=1e-5, atol=1e-5)  # dx is exact: db too


@pytest.mark.parametrize("kind", NEW)
def test_remat_policy_keeps_only_the_sketch(kind):
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(64, 8)), jnp.float32)
  w = jnp.asarray(r.normal(size=(8, 8)) / 3, jnp.float32)
  key = jax.random.key(0)

  def block(w, x):
    h = jnp.tanh(x @ w)
    return jnp.tanh(randomized_dense(h, w, None, key, proj_dim_ratio=0.25, sketch=kind)).sum()

  policy = jax.checkpoint_policies.save_only_these_names(SKETCH_NAME)
  res = saved_residuals(jax.checkpoint(block, policy=policy), w, x)
  kept = sorted(a.shape for a, why in res if "argument" not in why and "constant" not in why)
  assert kept == sorted([(16, 8)] + ([(16,)] if kind in sketch.SAMPLED_KINDS else [])), res
  g = jax.jit(jax.grad(jax.checkpoint(block, policy=policy)))(w, x)
  np.testing.assert_allclose(g, jax.jit(jax.grad(block))(w, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sketch.SAMPLED_KINDS + sketch.QUANTIZED_KINDS)
def test_compiled_memory_below_vanilla(kind):
  # As tests/test_dense.py's: B = 64 x 256, width 768, ratio 0.2; the relu
  # output (48 MiB) is no longer kept, the rows (9.6 MiB) and indices are
  # (quantized: 6-bit codes, 9 MiB, and scales; x^ rebuilt a block at a time
  # in the backward, once g is there: 214.6 MiB against vanilla's 288.0,
  # 249.0 with x^ whole, 288.0 with every layer's built at once).
  def temp(kind):
    def dense(x, w, b, i):
      if kind is None:
        return x @ w + b
      return randomized_dense(x, w, b, jax.random.fold_in(jax.random.key(0), i),
                              proj_dim_ratio=0.2, sketch=kind)

    def loss(params, x):
      (w1, b1), (w2, b2) = params
      return jnp.sum(dense(jax.nn.relu(dense(x, w1, b1, 0)), w2, b2, 1) ** 2)

    p = jax.ShapeDtypeStruct((768, 768), jnp.float32), jax.ShapeDtypeStruct((768,), jnp.float32)
    x = jax.ShapeDtypeStruct((64, 256, 768), jnp.float32)
    compiled = jax.jit(jax.grad(loss)).lower([p, p], x).compile(
        {"xla_backend_optimization_level": 0})
    return compiled.memory_analysis().temp_size_in_bytes

  mib = 2 ** 20
  assert temp(kind) < temp(None) - 15 * mib, (temp(kind) / mib, temp(None) / mib)


# --- 8 devices --------------------------------------------------------------------------

_SCRIPT = textwrap.dedent(r"""
  import json
  import jax, jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import fewbit_jax as fb
  from fewbit_jax import ext

  assert jax.device_count() == 8, jax.devices()
  x = jax.random.normal(jax.random.key(1), (16, 12, 32))
  x = x * jnp.exp(jax.random.normal(jax.random.key(3), (16, 12, 1)))
  w = jax.random.normal(jax.random.key(2), (32, 24)) / 6
  key = jax.random.key(5)
  fast = {"xla_backend_optimization_level": 0}
  out = {}
  with ext.mode("jax"):
    for at in ("Auto", "Explicit"):
      mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(AxisType, at),))
      for kind in ("orthogonal", "sampled", "wta", "quantized", None):
        def loss(w, x, blocks=None, kind=kind):
          y = x @ w if kind is None else fb.randomized_dense(
              x, w, None, key, proj_dim_ratio=0.25, sketch=kind, sketch_blocks=blocks)
          return jnp.sum(jnp.tanh(y) ** 2)
        r = out[f"{at}-{kind}"] = {}
        try:
          with jax.set_mesh(mesh):
            xs = jax.device_put(x, NamedSharding(mesh, P("data")))
            ws = jax.device_put(w, NamedSharding(mesh, P()))
            compiled = jax.jit(jax.grad(loss)).lower(ws, xs).compile(fast)
            g = compiled(ws, xs)
          r["collectives"] = {k: list(v) for k, v in fb.memory.collectives(compiled).items()}
          if kind is not None:  # one device, the same 8 blocks
            ref = jax.jit(jax.grad(lambda w, x: loss(w, x, 8)))(w, x)
            r["err"] = float(jnp.abs(g - ref).max() / jnp.abs(ref).max())
        except Exception as e:
          r["error"] = f"{type(e).__name__}: {e}"[:2000]
      # quantized with x's features sharded (its words split the axis): Auto
      # partitions the batch into one block a device, Explicit keeps one block
      # (its leading axes are not sharded)
      r = out[f"{at}-quantized-features"] = {}
      x64 = jax.random.normal(jax.random.key(6), (16, 12, 64))  # two words a row
      w64 = jax.random.normal(jax.random.key(7), (64, 24)) / 8
      try:
        with jax.set_mesh(mesh):
          xs = jax.device_put(x64, NamedSharding(mesh, P(None, None, "data")))
          ws = jax.device_put(w64, NamedSharding(mesh, P()))
          g = jax.jit(jax.grad(lambda w, x: loss(w, x, kind="quantized"))).lower(
              ws, xs).compile(fast)(ws, xs)
        blocks = 8 if at == "Auto" else 1
        ref = jax.jit(jax.grad(lambda w, x: loss(w, x, blocks, kind="quantized")))(w64, x64)
        r["err"] = float(jnp.abs(g - ref).max() / jnp.abs(ref).max())
      except Exception as e:
        r["error"] = f"{type(e).__name__}: {e}"[:2000]
  print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_results(on_8_devices):
  return on_8_devices(_SCRIPT)


@pytest.mark.parametrize("mesh", ["Auto", "Explicit"])
@pytest.mark.parametrize("kind", LAYER)
def test_blocks_per_shard_with_no_collective_beyond_vanilla(sharded_results, mesh, kind):
  r = sharded_results[f"{mesh}-{kind}"]
  assert "error" not in r, r["error"]
  vanilla = sharded_results[f"{mesh}-None"]["collectives"]
  assert r["collectives"] == vanilla, (r["collectives"], vanilla)  # no all-gather, nothing more
  assert r["err"] < 1e-5, r["err"]


@pytest.mark.parametrize("blocks", [None, 3])
def test_strict_promotion_and_rank_rules(blocks):
  # As tests/test_dense.py's: nothing relies on implicit promotion or rank broadcasting.
  x, w, _ = _layer_data((3, 20, 8))
  x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    for kind in NEW:
      g = jax.jit(jax.grad(lambda x, w: randomized_dense(
          x, w, None, jax.random.key(0), proj_dim_ratio=0.3, sketch=kind,
          sketch_blocks=blocks).astype(jnp.float32).sum(), (0, 1)))(x, w)
      assert [a.dtype for a in g] == [jnp.bfloat16] * 2


# --- quantized: every row at fewer bits ------------------------------------------------

def test_quantized_rows_are_unbiased_within_a_step():
  x, _ = _xg(b=16, n=40)
  for bits in (1, 3, 6):
    packed, scale = sketch.quantize_rows(x, jax.random.key(bits), bits)
    assert packed.shape == (16, bits, 2) and packed.dtype == jnp.uint32, packed.shape
    xh = np.asarray(sketch.dequantize_rows(packed, scale, bits, 40))
    step = 2 * np.abs(x).max(axis=1, keepdims=True) / (2 ** bits - 1)
    assert (np.abs(xh - x) <= step * (1 + 1e-5)).all()  # the level below or the one above
  keys = jax.random.split(jax.random.key(0), 4000)
  xs = np.asarray(jax.jit(jax.vmap(lambda k: sketch.dequantize_rows(
      *sketch.quantize_rows(x, k, 2), 2, 40)))(keys), np.float64)
  # (an element at a row's extreme is a level: no spread, and float rounding)
  slack = 5 * xs.std(0) / math.sqrt(len(keys)) + 1e-5 * np.abs(x).max()
  assert (np.abs(xs.mean(0) - x) <= slack).all()
  # blocks: each with its own key, the same as quantizing the block alone
  x3 = jnp.asarray(x).reshape(4, 4, 40)
  bk = sketch.block_keys(jax.random.key(1), 4)
  p3, s3 = sketch.quantize_rows(x3, bk, 3)
  p1, s1 = sketch.quantize_rows(x3[2], bk[2], 3)
  np.testing.assert_array_equal(p3[2], p1)
  np.testing.assert_array_equal(s3[2], s1)


def test_quantized_zero_rows_stay_zero():
  x = jnp.zeros((4, 7)).at[1].set(jnp.arange(7.0))
  xh = sketch.dequantize_rows(*sketch.quantize_rows(x, jax.random.key(0), 2), 2, 7)
  assert float(jnp.abs(xh[jnp.array([0, 2, 3])]).max()) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantized_residual_fits_in_the_gaussian_sketchs_bytes(dtype):
  x, w, _ = _layer_data((4, 50, 64))
  x, w = x.astype(dtype), w.astype(dtype)

  def kept(kind):
    res = saved_residuals(lambda w, x: randomized_dense(
        jnp.sin(x), w, None, jax.random.key(0), proj_dim_ratio=0.2, sketch=kind).sum(), w, x)
    return {(tuple(a.shape), str(a.dtype)): a.size * a.dtype.itemsize for a, why in res
            if "argument" not in why and len(a.shape) != 3 or str(a.dtype) == "uint32"}

  gauss, quant = sum(kept("gaussian").values()), kept("quantized")
  # 200 rows of 64: float32 at ratio 0.2 (k = 40 rows, 10240 bytes) fits 5
  # bits an element and a float32 scale a row (8800 bytes); bfloat16, 2 bits.
  bits = 5 if dtype == jnp.float32 else 2
  assert ((200, bits, 2), "uint32") in quant and ((200,), "float32") in quant, quant
  assert sum(quant.values()) <= gauss, (quant, gauss)


def test_quantized_variance_far_below_the_gaussian_sketchs():
  # The same residual bytes (ratio 0.2, float32: 6 bits): the rounding's
  # variance of dW against the Gaussian sketch's, over 64 keys.
  x, w, c = _layer_data((4, 32, 64), m=16)

  def dws(kind):
    dw = lambda key: jax.grad(lambda w: jnp.vdot(randomized_dense(
        x, w, None, key, proj_dim_ratio=0.2, sketch=kind), c))(w)
    return np.asarray(jax.jit(jax.vmap(dw))(jax.random.split(jax.random.key(2), 64)), np.float64)

  truth = np.einsum("btn,btm->nm", np.asarray(x, np.float64), np.asarray(c, np.float64))
  var = {kind: ((dws(kind) - truth) ** 2).sum(axis=(1, 2)).mean()
         for kind in ("gaussian", "quantized")}
  assert var["quantized"] < 0.01 * var["gaussian"], var


def test_quantized_errors_say_what_to_do():
  x, w, _ = _layer_data((2, 32, 64))
  with pytest.raises(ValueError, match="less than one.*larger projection"):
    randomized_dense(x, w, None, jax.random.key(0), proj_dim=1, sketch="quantized")
  with pytest.raises(ValueError, match="more than 8.*smaller projection"):
    randomized_dense(x, w, None, jax.random.key(0), proj_dim=64, sketch="quantized")
  with pytest.raises(ValueError, match="quantize_rows"):
    sketch.project("quantized", x[0], jax.random.key(0), 4)
  with pytest.raises(ValueError, match="quantize_rows"):
    sketch.sketch_matrix("quantized", jax.random.key(0), 8, 2)
  with pytest.raises(ValueError, match="bits must be in 1..8"):
    sketch.quantize_rows(x[0], jax.random.key(0), 9)


def test_quantized_packs_the_words_of_codes_pack():
  # codes.pack builds every plane in one variadic reduction (the quantized
  # sketch's codes are computed once, not once per plane); its words must be
  # the layout's, bit for bit: bit t of word w of plane p is bit p of the code
  # of element 32 w + t (here written out in numpy).
  from fewbit_jax import codes
  for shape, bits in [((5, 37), 6), ((3, 4, 64), 3), ((1, 1), 1), ((8, 96), 8)]:
    c = np.asarray(jax.random.randint(jax.random.key(bits), shape, 0, 2 ** bits), np.uint64)
    n = shape[-1]
    words = -(-n // 32)
    padded = np.zeros(shape[:-1] + (words * 32,), np.uint64)
    padded[..., :n] = c
    lanes = padded.reshape(shape[:-1] + (words, 32))
    want = np.stack([(((lanes >> p) & 1) << np.arange(32, dtype=np.uint64)).sum(-1)
                     for p in range(bits)], axis=-2).astype(np.uint32)
    np.testing.assert_array_equal(codes.pack(jnp.asarray(c, jnp.uint8), bits), want)
    np.testing.assert_array_equal(codes.pack(jnp.asarray(c, jnp.uint32), bits), want)


@pytest.mark.parametrize("mesh", ["Auto", "Explicit"])
def test_quantized_with_sharded_features(sharded_results, mesh):
  # Its packed words split a sharded feature axis: it failed to partition
  # (Auto: the order of its matmul after the codes; Explicit: the reshape of
  # the codes) before it ordered by its scales and packed per plane on a mesh.
  r = sharded_results[f"{mesh}-quantized-features"]
  assert "error" not in r, r["error"]
  assert r["err"] < 1e-5, r["err"]
