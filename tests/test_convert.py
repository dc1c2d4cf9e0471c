"""Converting models without editing them: inline activations (patch_activations)."""

import importlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fewbit_jax as fb
import fewbit_jax.linen  # noqa: F401  (fb.linen)
import fewbit_jax.nnx  # noqa: F401  (fb.nnx)
from fewbit_jax import memory
from fewbit_jax.activations import CODES_NAME
from fewbit_jax.patch import NAMESPACES, PATCHABLE, original, patch_activations

X = jnp.linspace(-4.0, 4.0, 96).reshape(3, 32)


def _codes_bytes(f, *args):
  return memory.saved_residuals(f, *args).named_bytes(CODES_NAME)


def _namespace_snapshot():
  out = {}
  for name in NAMESPACES:
    ns = importlib.import_module(name)
    out[name] = {k: v for k, v in vars(ns).items() if callable(v)}
  return out


# --------------------------------------------------------------------------
# patch_activations


@pytest.mark.parametrize("spelling", ["jax.nn", "flax.linen", "flax.nnx"])
def test_patch_inline_calls_forward_bitwise_backward_fewbit(spelling):
  mod = importlib.import_module(spelling)
  loss = lambda x: (mod.gelu(x) * mod.relu(x - 1)).sum()
  y0, g0 = loss(X), jax.grad(loss)(X)
  with patch_activations(gelu=2, relu=1):
    y1, g1 = loss(X), jax.grad(loss)(X)
    assert _codes_bytes(loss, X) > 0
  fewbit_loss = lambda x: (fb.gelu(x, bits=2) * fb.relu(x - 1)).sum()
  assert bool(jnp.all(y1 == y0))
  assert bool(jnp.all(g1 == jax.grad(fewbit_loss)(X)))
  assert not bool(jnp.all(g1 == g0))  # 2-bit gelu is an approximation
  assert _codes_bytes(loss, X) == 0


def test_every_patchable_activation_is_few_bit_inside():
  before = _namespace_snapshot()
  with patch_activations(**{n: True for n in PATCHABLE}):
    for name in PATCHABLE:
      f = getattr(jax.nn, name)
      assert bool(jnp.all(f(X) == original(name)(X))), name
      assert _codes_bytes(lambda x: f(x).sum(), X) > 0, name
  assert _namespace_snapshot() == before


def test_aliases_patch_the_same_function():
  with patch_activations(swish=3, hard_silu=3, warn_unused=False):
    assert jax.nn.silu is jax.nn.swish and nn.swish is jax.nn.silu
    assert nnx.hard_swish is jax.nn.hard_silu
    assert jax.nn.silu is not original("silu")
  assert jax.nn.swish is original("silu") and nn.hard_silu is original("hard_swish")


def test_restored_after_an_exception():
  before = _namespace_snapshot()
  with pytest.raises(RuntimeError, match="boom"):
    with patch_activations(gelu=3, sigmoid=2):
      assert jax.nn.gelu is not original("gelu")
      raise RuntimeError("boom")
  assert _namespace_snapshot() == before


def test_nested_contexts_restore_in_order():
  with patch_activations(gelu=3) as outer:
    outer_gelu = jax.nn.gelu
    with patch_activations(gelu=1, warn_unused=False):
      g1 = jax.grad(lambda x: jax.nn.gelu(x).sum())(X)
    assert jax.nn.gelu is outer_gelu
    g3 = jax.grad(lambda x: jax.nn.gelu(x).sum())(X)
    assert outer.calls() == {"gelu": 1}
  assert jax.nn.gelu is original("gelu")
  assert bool(jnp.all(g1 == jax.grad(lambda x: fb.gelu(x, bits=1).sum())(X)))
  assert bool(jnp.all(g3 == jax.grad(lambda x: fb.gelu(x, bits=3).sum())(X)))


def test_stale_reference_is_vanilla_after_exit():
  with patch_activations(gelu=3, warn_unused=False):
    kept = jax.nn.gelu
  assert kept is not original("gelu")
  assert _codes_bytes(lambda x: kept(x).sum(), X) == 0
  assert bool(jnp.all(kept(X) == jax.nn.gelu(X)))


def test_non_float_inputs_go_to_the_original():
  with patch_activations(relu=1, warn_unused=False) as p:
    y = jax.nn.relu(jnp.arange(-3, 3))
    assert p.calls() == {"relu": 0}
  assert y.dtype == jnp.arange(3).dtype
  assert y.tolist() == [0, 0, 0, 0, 1, 2]


def test_jit_cache_keeps_the_trace_made_outside():
  f = jax.jit(jax.grad(lambda x: jax.nn.gelu(x).sum()))
  vanilla = f(X)  # traced here, outside
  with pytest.warns(UserWarning, match="jax.jit reused a trace"):
    with patch_activations(gelu=1):
      inside = f(X)  # cached vanilla trace: nothing patched
  assert bool(jnp.all(inside == vanilla))

  # Decorated: each trace is patched, whenever it happens.
  g = jax.jit(patch_activations(gelu=1)(jax.grad(lambda x: jax.nn.gelu(x).sum())))
  want = jax.grad(lambda x: fb.gelu(x, bits=1).sum())(X)
  assert bool(jnp.all(g(X) == want))
  assert bool(jnp.all(g(X[:2]) == want[:2]))  # retraced for a new shape: still few-bit
  assert jax.nn.gelu is original("gelu")

  # Or clear the caches and trace inside.
  jax.clear_caches()
  with patch_activations(gelu=1):
    assert bool(jnp.all(f(X) == want))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(gelu=3, gleu=3), ValueError, "unknown activation 'gleu'"),
    (dict(threshold=1), ValueError, "call fb.threshold"),
    (dict(tanhshrink=3), ValueError, "not a jax.nn or flax function"),
    (dict(gelu=9), ValueError, "bits must be in 1..8"),
    (dict(gelu=0), ValueError, "gelu=0"),
    (dict(gelu=2.5), TypeError, "bits must be an int"),
    (dict(relu=3), ValueError, "relu is piecewise linear"),
    (dict(silu=3, swish=2), ValueError, "same function"),
    (dict(), ValueError, "at least one activation"),
])
def test_patch_bad_input(kwargs, error, match):
  before = _namespace_snapshot()
  with pytest.raises(error, match=match):
    patch_activations(**kwargs)
  assert _namespace_snapshot() == before


def test_unused_patch_warns_and_can_be_silenced():
  with pytest.warns(UserWarning, match="no patched activation was called"):
    with patch_activations(gelu=3):
      jnp.sin(X)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with patch_activations(gelu=3, warn_unused=False):
      jnp.sin(X)


# --------------------------------------------------------------------------
# Randomized dot_general / einsum (the core of the *General layers)

from fewbit_jax.dense import SKETCH_NAME  # noqa: E402
from fewbit_jax.dense_general import randomized_dot_general, randomized_einsum  # noqa: E402

_KX, _KW, _KG = jax.random.split(jax.random.key(3), 3)


def _vjp(f, x, w, g):
  y, pull = jax.vjp(f, x, w)
  return (y, *pull(g))


@pytest.mark.parametrize("op, xs, ws", [
    ((((2, 3), (0, 1)), ((), ())), (3, 4, 2, 6), (2, 6, 8)),         # from heads back
    ((((0,), (1,)), ((), ())), (6, 3, 4), (5, 6)),                   # leading axis, kernel^T
    ("...d,fd->...f", (2, 3, 6), (4, 6)),
], ids=["from-heads", "leading-axis", "ellipsis"])
def test_general_exact_with_a_full_orthogonal_sketch(op, xs, ws):
  x, w = jax.random.normal(_KX, xs), jax.random.normal(_KW, ws)
  if isinstance(op, str):
    ref = lambda x, w: jnp.einsum(op, x, w)
    ours = lambda b: lambda x, w: randomized_einsum(op, x, w, jax.random.key(0), proj_dim=b,
                                                    sketch="dct")
  else:
    ref = lambda x, w: jax.lax.dot_general(x, w, op)
    ours = lambda b: lambda x, w: randomized_dot_general(x, w, jax.random.key(0), op,
                                                         proj_dim=b, sketch="dct")
  y_shape = jax.eval_shape(ref, x, w).shape
  g = jax.random.normal(_KG, y_shape)
  contracted = (xs[-1],) if isinstance(op, str) else tuple(xs[a] for a in op[0][0])
  b = x.size // int(np.prod(contracted))  # rows of x2d

  y0, dx0, dw0 = jax.jit(lambda x, w, g: _vjp(ref, x, w, g))(x, w, g)  # separate programs,
  y1, dx1, dw1 = jax.jit(lambda x, w, g: _vjp(ours(b), x, w, g))(x, w, g)  # as in training
  assert bool(jnp.all(y1 == y0))            # the same dot_general / einsum
  assert bool(jnp.all(dx1 == dx0))          # its exact transpose
  np.testing.assert_allclose(dw1, dw0, rtol=2e-5, atol=2e-5)  # S S^T = I at k = B


def test_einsum_forward_bitwise_and_gradient_unbiased():
  subscripts = "bdt,ndh->hbnt"  # contracted axis in the middle, output permuted
  x, w = jax.random.normal(_KX, (2, 6, 5)), jax.random.normal(_KW, (3, 6, 4))
  ref = lambda x, w: jnp.einsum(subscripts, x, w)
  g = jax.random.normal(_KG, (4, 2, 3, 5))
  n = 1000

  # Arguments, not constants: XLA folds constant expressions with other numerics.
  y0, dx0, dw0 = jax.jit(lambda x, w, g: _vjp(ref, x, w, g))(x, w, g)
  ours = lambda key, x, w, g: _vjp(
      lambda x, w: randomized_einsum(subscripts, x, w, key, proj_dim=3), x, w, g)
  y1, dx1, _ = jax.jit(ours)(jax.random.key(0), x, w, g)
  dw1 = jax.jit(jax.vmap(lambda key, x, w, g: ours(key, x, w, g)[2], (0, None, None, None)))(
      jax.random.split(jax.random.key(1), n), x, w, g)
  assert bool(jnp.all(y1 == y0)) and bool(jnp.all(dx1 == dx0))
  mean = dw1.mean(0)
  # The mean of n independent estimates is within a few of its standard errors.
  err = jnp.abs(mean - dw0) / (dw1.std(0) / np.sqrt(n) + 1e-6)
  assert float(jnp.max(err)) < 5.0
  assert 0.98 < cosine_np(mean, dw0)


def cosine_np(a, b):
  a, b = np.ravel(a), np.ravel(b)
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_general_keeps_the_sketch_not_the_input():
  x, w = jnp.ones((16, 8, 32)), jnp.ones((32, 4, 8))
  rep = memory.saved_residuals(
      lambda w: randomized_einsum("btd,dnh->btnh", x, w, jax.random.key(0),
                                  proj_dim_ratio=0.25).sum(), w)
  assert rep.named_bytes(SKETCH_NAME) == 32 * 32 * 4     # k = 128 / 4 rows of 32
  assert rep.saved_bytes == rep.named_bytes(SKETCH_NAME) + 8  # and the key words


def test_general_sketch_blocks_match_randomized_dense():
  # An einsum over (batch, seq, embed) -> (batch, seq, heads, dim) is a dense
  # layer on the flattened positions: with the same key and blocks, its
  # weight gradient is randomized_dense's, and it keeps one sketch per block.
  x = jax.random.normal(jax.random.key(0), (4, 6, 8))
  w = jax.random.normal(jax.random.key(1), (8, 2, 3))
  key = jax.random.key(2)
  ct = jax.random.normal(jax.random.key(3), (4, 6, 2, 3))
  for blocks in (None, 1, 4):
    got = jax.grad(lambda w: jnp.sum(randomized_einsum(
        "btd,dnh->btnh", x, w, key, proj_dim_ratio=0.5, sketch_blocks=blocks) * ct))(w)
    want = jax.grad(lambda w2: jnp.sum(fb.randomized_dense(
        x, w2, None, key, proj_dim_ratio=0.5, sketch_blocks=blocks) * ct.reshape(4, 6, 6)))(
            w.reshape(8, 6))
    np.testing.assert_allclose(got.reshape(8, 6), want, rtol=1e-5, atol=1e-5)
  rep = memory.saved_residuals(lambda w: randomized_dot_general(
      x, w, key, (((2,), (0,)), ((), ())), proj_dim_ratio=0.5, sketch_blocks=4).sum(), w)
  assert rep.named_bytes(SKETCH_NAME) == 4 * 3 * 8 * 4  # 4 blocks of ceil(12 / 4) rows
  with fb.dense.sketch_blocks_default(4):  # the context reaches the General layers
    rep = memory.saved_residuals(lambda w: randomized_dot_general(
        x, w, key, (((2,), (0,)), ((), ())), proj_dim_ratio=0.5).sum(), w)
  assert rep.named_bytes(SKETCH_NAME) == 4 * 3 * 8 * 4
  with pytest.raises(ValueError, match="do not divide"):
    randomized_einsum("btd,dnh->btnh", x, w, key, proj_dim=4, sketch_blocks=5)
  with pytest.raises(ValueError, match="leading axes"):  # batch axes (0, 2) of x (4, 8, 6)
    randomized_dot_general(x.transpose(0, 2, 1), w, key, (((1,), (0,)), ((), ())),
                           proj_dim=4, sketch_blocks=2)
  layer = fb.nnx.RandomizedEinsum("btd,dnh->btnh", (8, 2, 3), proj_dim_ratio=0.5,
                                  sketch_blocks=4, rngs=nnx.Rngs(0))
  assert layer.sketch_blocks == 4
  general = fb.nnx.convert_linear(nnx.LinearGeneral(8, (2, 3), rngs=nnx.Rngs(0)),
                                  sketch_blocks=2)
  assert general.sketch_blocks == 2


@pytest.mark.parametrize("call, match", [
    (lambda x, w: randomized_dot_general(x, w, jax.random.key(0), (((2,), (0,)), ((0,), (1,))),
                                         proj_dim=2), "batch dimensions"),
    (lambda x, w: randomized_einsum("btd,bdh->bth", x, w, jax.random.key(0), proj_dim=2),
     "in x, the kernel and the output"),
    (lambda x, w: randomized_einsum("btd,dh->bh", x, w, jax.random.key(0), proj_dim=2),
     "summed over one operand"),
    (lambda x, w: randomized_einsum("btd,eh->bth", x, w, jax.random.key(0), proj_dim=2),
     "summed over one operand"),
    (lambda x, w: randomized_einsum("btd,dh", x, w, jax.random.key(0), proj_dim=2),
     "explicit"),
    (lambda x, w: randomized_dot_general(x, w, jax.random.key(0), (((1,), (0,)), ((), ())),
                                         proj_dim=2), "equal sizes"),
    (lambda x, w: randomized_einsum("btd,dh->bth", x, w, jax.random.key(0)), "sketch size"),
])
def test_general_bad_input(call, match):
  x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
  if "bdh" in str(call.__code__.co_consts):
    w = jnp.ones((2, 4, 5))
  with pytest.raises(ValueError, match=match):
    call(x, w)


# --------------------------------------------------------------------------
# Converting whole transformers (the models of benchmarks/bench_convert.py)

import optax  # noqa: E402

from benchmarks import bench_convert as bc  # noqa: E402

CFG = bc.Config.tiny()


def _nnx_model(seed=0):
  return bc.NnxTransformer(CFG, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def nnx_vanilla():
  model = _nnx_model()
  x, y = bc.data(CFG)
  grads = bc._kernels(nnx.jit(bc.nnx_grads)(model, x, y))
  temp = memory.compiled(nnx.jit(bc.nnx_grads), model, x, y).temp
  return dict(y=nnx.jit(lambda m, x: m(x))(model, x), grads=grads, temp=temp, x=x, t=y)


def test_nnx_transformer_converted_in_place(nnx_vanilla):
  model = _nnx_model()
  x, t = nnx_vanilla["x"], nnx_vanilla["t"]
  params = nnx.state(model, nnx.Param)
  objects = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)  # state made before
  out = bc.convert_nnx(model, ratio=0.5)
  assert out is model
  kinds = {p: type(m).__name__ for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
  assert sum(k == "RandomizedLinear" for k in kinds.values()) == 6 * CFG.layers
  assert kinds[("head",)] == "Linear"  # outside the pattern
  # The very same Param objects, in the same tree.
  assert [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)] == objects
  after = nnx.state(model, nnx.Param)
  assert jax.tree.structure(after) == jax.tree.structure(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(after)))

  patch = patch_activations(gelu=3)
  y = nnx.jit(patch(lambda m, x: m(x)))(model, x)
  assert bool(jnp.all(y == nnx_vanilla["y"]))  # forward bitwise unchanged
  grads_fn = nnx.jit(patch(bc.nnx_grads))
  samples = [bc._kernels(grads_fn(model, x, t)) for _ in range(8)]  # fresh sketch per call
  cos = bc._cosines(nnx_vanilla["grads"], samples)
  print("\nNNX per-layer cosine (1 step, mean of 8):",
        {k: (round(a, 3), round(b, 3)) for k, (a, b) in cos.items()})
  assert cos["/head"][0] > 0.999  # exact layer; only the GELU codes upstream differ
  for path, (one, mean) in cos.items():
    assert one > 0.25 and mean > 0.8 and mean >= one - 0.05, (path, one, mean)
  temp = memory.compiled(grads_fn, model, x, t).temp
  assert temp < 0.8 * nnx_vanilla["temp"]

  # The optimizer state made before the conversion fits and updates the same Params.
  kernel = model.layers[0].mlp.up.kernel
  before = kernel[...]
  optimizer.update(model, grads_fn(model, x, t))
  assert model.layers[0].mlp.up.kernel is kernel and not bool(jnp.all(kernel[...] == before))


@pytest.fixture(scope="module")
def linen_setup():
  model = bc.LinenTransformer(CFG)
  x, t = bc.data(CFG)
  variables = model.init(jax.random.key(0), x)
  loss = lambda p, x, t, key: bc.mse(model.apply({"params": p}, x, rngs={"sketch": key}), t)
  step = jax.jit(jax.grad(loss))
  grads = bc._kernels({"params": step(variables["params"], x, t, jax.random.key(1))})
  temp = memory.compiled(jax.grad(loss), variables["params"], x, t, jax.random.key(1)).temp
  return dict(model=model, x=x, t=t, variables=variables, loss=loss, grads=grads, temp=temp,
              y=jax.jit(model.apply)(variables, x))


def test_linen_transformer_intercepted(linen_setup):
  s = linen_setup
  model, x, t, params, loss = s["model"], s["x"], s["t"], s["variables"]["params"], s["loss"]
  with bc.fb.linen.intercept(bc.LINEN_BLOCKS, proj_dim_ratio=0.5, warn_unused=False):
    inside = model.init(jax.random.key(0), x)  # parameters are untouched by interception
  assert jax.tree.structure(inside) == jax.tree.structure(s["variables"])
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(inside),
                                                    jax.tree.leaves(s["variables"])))

  def converted(*args):
    with patch_activations(gelu=3), bc.fb.linen.intercept(bc.LINEN_BLOCKS,
                                                           proj_dim_ratio=0.5) as seen:
      out = jax.grad(loss)(*args)
    assert len(seen.converted) == 6 * CFG.layers and "/head" not in seen.converted
    return out

  def apply(v, x, key):
    with patch_activations(gelu=3), bc.fb.linen.intercept(proj_dim_ratio=0.5):
      return model.apply(v, x, rngs={"sketch": key})
  assert bool(jnp.all(jax.jit(apply)(s["variables"], x, jax.random.key(2)) == s["y"]))
  step = jax.jit(converted)
  samples = [bc._kernels({"params": step(params, x, t, jax.random.key(i))}) for i in range(8)]
  cos = bc._cosines(s["grads"], samples)
  print("\nlinen per-layer cosine (1 step, mean of 8):",
        {k: (round(a, 3), round(b, 3)) for k, (a, b) in cos.items()})
  for path, (one, mean) in cos.items():
    assert one > 0.25 and mean > 0.8 and mean >= one - 0.05, (path, one, mean)
  temp = memory.compiled(step, params, x, t, jax.random.key(0)).temp
  assert temp < 0.8 * s["temp"]


def test_linen_intercept_errors(linen_setup):
  s = linen_setup
  with pytest.raises(ValueError, match="'sketch' rng stream"):
    with bc.fb.linen.intercept(warn_unused=False):
      jax.eval_shape(s["model"].apply, s["variables"], s["x"])
  with pytest.warns(UserWarning, match="matched none of the dense layers called: /Block_0/down"):
    with bc.fb.linen.intercept("/Blok_"):
      jax.eval_shape(s["model"].apply, s["variables"], s["x"])
  with pytest.raises(ValueError, match="unknown sketch"):
    with bc.fb.linen.intercept(sketch="gauss"):
      pass


# --------------------------------------------------------------------------
# map_module, convert_linear, convert_activations

class _Shared(nnx.Module):
  def __init__(self):
    lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    self.a = lin
    self.b = nnx.List([lin, nnx.Linear(4, 2, rngs=nnx.Rngs(1))])
    self.act = nnx.gelu


def test_map_module_post_order_paths_and_shared_modules():
  model = _Shared()
  calls = []

  def fn(m, path):
    calls.append((path, type(m).__name__))
    if isinstance(m, nnx.Linear):
      return fb.nnx.convert_linear(m, proj_dim=2, rngs=nnx.Rngs(sketch=0))
    return m

  shared_kernel = model.a.kernel
  out = fb.nnx.map_module(model, fn)
  assert out is model
  assert calls == [("/a", "Linear"), ("/b/1", "Linear"), ("/b", "List"), ("/", "_Shared")]
  assert model.a is model.b[0]                  # converted once, still shared
  assert isinstance(model.a, fb.nnx.RandomizedLinear) and model.a.kernel is shared_kernel
  assert isinstance(model.b[1], fb.nnx.RandomizedLinear)


def test_map_module_pattern_root_and_errors():
  model = _Shared()
  fb.nnx.map_module(model, lambda m, p: fb.nnx.convert_linear(m, proj_dim=2), pattern=r"^/b/1$")
  assert type(model.a) is nnx.Linear and isinstance(model.b[1], fb.nnx.RandomizedLinear)
  with pytest.raises(ValueError, match=r"matches no module path.*/b/1, /b, /"):
    fb.nnx.map_module(model, lambda m, p: m, pattern="/decoder/")
  lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  new = fb.nnx.map_module(lin, lambda m, p: fb.nnx.convert_linear(m, proj_dim=1))
  assert isinstance(new, fb.nnx.RandomizedLinear) and new.kernel is lin.kernel

  class InTuple(nnx.Module):
    def __init__(self):
      self.t = nnx.data((nnx.Linear(2, 2, rngs=nnx.Rngs(0)),))
  with pytest.raises(ValueError, match="cannot be changed in place.*nnx.List"):
    fb.nnx.map_module(InTuple(), lambda m, p: fb.nnx.convert_linear(m, proj_dim=1))
  with pytest.raises(TypeError, match="needs a function"):
    fb.nnx.map_module(model, "convert")


def test_convert_linear_options_and_pass_through():
  lin = nnx.Linear(3, 5, use_bias=False, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  new = fb.nnx.convert_linear(lin, fb.nnx.RandomizedLinear, proj_dim_ratio=0.3,
                              sketch="countsketch", rngs=nnx.Rngs(sketch=1))
  assert (new.use_bias, new.param_dtype, new.sketch, new.proj_dim_ratio) == (
      False, jnp.bfloat16, "countsketch", 0.3)
  assert new.kernel is lin.kernel and new.bias is None
  x = jnp.ones((6, 3), jnp.bfloat16)
  assert bool(jnp.all(new(x) == lin(x)))
  with pytest.raises(ValueError, match="proj_dim_ratio=2.0"):
    fb.nnx.convert_linear(lin, proj_dim_ratio=2.0)
  with pytest.raises(ValueError, match="unknown sketch"):
    fb.nnx.convert_linear(lin, sketch="fft")
  assert fb.nnx.convert_linear(lin, sketch_blocks=2).sketch_blocks == 2
  with pytest.raises(ValueError, match="sketch_blocks=-1"):
    fb.nnx.convert_linear(lin, sketch_blocks=-1)

  class MyLinear(nnx.Linear):  # a subclass may compute something else: left alone
    pass
  mine = MyLinear(2, 2, rngs=nnx.Rngs(0))
  assert fb.nnx.convert_linear(mine) is mine
  custom = nnx.Linear(2, 2, dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k),
                      rngs=nnx.Rngs(0))
  with pytest.warns(UserWarning, match="custom dot_general"):
    assert fb.nnx.convert_linear(custom) is custom
  # Layers converted from one Rngs get different sketch streams.
  r = nnx.Rngs(sketch=0)
  a, b = (fb.nnx.convert_linear(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), rngs=r) for _ in range(2))
  assert not bool(jnp.all(jax.random.key_data(a._key(None)) == jax.random.key_data(b._key(None))))


def test_convert_activations_attributes_and_sequential():
  import functools
  model = _Shared()
  model.act2 = functools.partial(nnx.gelu, approximate=False)
  seq = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.relu, nnx.silu)
  fb.nnx.convert_activations(model, gelu=2)
  assert model.act.__name__ == "fewbit.gelu(approximate=True, bits=2)"
  assert model.act2.__name__ == "fewbit.gelu(approximate=False, bits=2)"
  fb.nnx.map_module(seq, lambda m, _: fb.nnx.convert_activations(m, relu=1, swish=3))
  assert [getattr(f, "__name__", "") for f in seq.layers][1:] == [
      "fewbit.relu(bits=1)", "fewbit.silu(bits=3)"]
  x = jnp.linspace(-2, 2, 12).reshape(3, 4)
  assert _codes_bytes(lambda x: seq(x).sum(), x) > 0
  with pytest.raises(ValueError, match="unknown activation"):
    fb.nnx.convert_activations(model, gleu=2)


def test_linear_general_and_einsum_converted():
  class Attn(nnx.Module):
    def __init__(self, rngs):
      self.qkv = nnx.LinearGeneral(16, (3, 2, 8), rngs=rngs)
      self.out = nnx.LinearGeneral((2, 8), 16, axis=(-2, -1), rngs=rngs)
      self.proj = nnx.Einsum("btd,dh->bth", (16, 8), (8,), rngs=rngs)
      self.batched = nnx.LinearGeneral(16, 4, batch_axis={0: 2}, rngs=rngs)

    def __call__(self, x):
      q, k, v = jnp.moveaxis(self.qkv(x), 2, 0)
      a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), -1)
      return self.proj(self.out(jnp.einsum("bhts,bshd->bthd", a, v)))

  model = Attn(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  fwd = nnx.jit(lambda m: m(x))
  y0 = fwd(model)
  grads = nnx.jit(lambda m: nnx.grad(lambda m: m(x).sum())(m))
  g0 = bc._kernels(grads(model))
  objects = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
  with pytest.warns(UserWarning, match="batch axes"):
    fb.nnx.map_module(model, lambda m, p: fb.nnx.convert_linear(
        m, proj_dim_ratio=1.0, sketch="dct", rngs=nnx.Rngs(sketch=0)))
  assert isinstance(model.qkv, fb.nnx.RandomizedLinearGeneral)
  assert isinstance(model.out, fb.nnx.RandomizedLinearGeneral)
  assert isinstance(model.proj, fb.nnx.RandomizedEinsum)
  assert type(model.batched) is nnx.LinearGeneral
  assert [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)] == objects
  assert bool(jnp.all(fwd(model) == y0))
  g1 = bc._kernels(grads(model))
  for path in ("/qkv", "/out", "/proj"):  # exact at k = B with an orthogonal sketch
    np.testing.assert_allclose(g1[path], g0[path], rtol=1e-4, atol=1e-5, err_msg=path)

  # Constructed directly: the same Params as the nnx layer from the same rngs.
  ref = nnx.LinearGeneral(16, (2, 8), rngs=nnx.Rngs(3))
  ours = fb.nnx.RandomizedLinearGeneral(16, (2, 8), rngs=nnx.Rngs(3, sketch=0))
  assert bool(jnp.all(ours.kernel[...] == ref.kernel[...])) and ours.kernel.shape == (16, 2, 8)
  with pytest.raises(ValueError, match="batch_axis"):
    fb.nnx.RandomizedLinearGeneral(16, 4, batch_axis={0: 2}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="einsum_op"):
    fb.nnx.RandomizedEinsum("bd,dh->bh", (4, 2), einsum_op=lambda *a, **k: 0,
                            rngs=nnx.Rngs(0))


def test_linen_dense_general_and_swap_activations():
  import functools

  class Mlp(nn.Module):
    activation: object = nn.gelu

    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((2, 8), name="heads")(x)
      h = nn.DenseGeneral(16, axis=(-2, -1), name="merge")(self.activation(h))
      return nn.Dense(4, name="out")(h)

  class Net(nn.Module):
    mlps: tuple = (Mlp(), Mlp(activation=functools.partial(nn.gelu, approximate=False)))

    def __call__(self, x):
      for m in self.mlps:
        x = jnp.tile(m(x), (1, 1, 4))
      return x

  net, x = Net(), jax.random.normal(jax.random.key(0), (2, 5, 16))
  v = jax.jit(net.init)(jax.random.key(1), x)
  y0 = jax.jit(net.apply)(v, x)
  swapped = fb.linen.swap_activations(net, gelu=3)
  assert [m.activation.__name__ for m in swapped.mlps] == [
      "fewbit.gelu(approximate=True, bits=3)", "fewbit.gelu(approximate=False, bits=3)"]
  assert net.mlps[0].activation is nn.gelu  # the original is untouched
  assert fb.linen.swap_activations(net, relu=1) is net  # nothing to swap
  assert bool(jnp.all(jax.jit(swapped.apply)(v, x) == y0))
  assert _codes_bytes(lambda x: swapped.apply(v, x).sum(), x) > 0

  loss = lambda p, key: (net.apply({"params": p}, x, rngs={"sketch": key}) ** 2).sum()
  g0 = bc._kernels({"params": jax.jit(jax.grad(loss))(v["params"], jax.random.key(0))})
  with fb.linen.intercept(proj_dim_ratio=1.0, sketch="dct") as seen:
    g1 = bc._kernels({"params": jax.jit(jax.grad(loss))(v["params"], jax.random.key(0))})
  assert sorted(set(seen.converted)) == [f"/mlps_{i}/{n}" for i in range(2)
                                         for n in ("heads", "merge", "out")]
  for path, want in g0.items():
    np.testing.assert_allclose(g1[path], want, rtol=1e-4, atol=1e-5, err_msg=path)
