"""Converting models without editing them: inline activations (patch_activations).

Also the randomized dot_general / einsum core of the General layers. The
converters of fewbit_jax.linen and fewbit_jax.nnx have their own files:
test_linen_convert.py and test_nnx_convert.py.
"""

import importlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fewbit_jax as fb
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
    (dict(gelu="exactly"), ValueError, "only string choice is 'exact'"),
    (dict(), ValueError, "at least one activation"),
])
def test_patch_bad_input(kwargs, error, match):
  before = _namespace_snapshot()
  with pytest.raises(error, match=match):
    patch_activations(**kwargs)
  assert _namespace_snapshot() == before


def test_patch_exact_mode():
  # gelu="exact": inline calls keep x (exact gradient), nothing else.
  loss = lambda x: (nn.gelu(x * 2, approximate=False) * X).sum()
  with patch_activations(gelu="exact", relu="exact") as p:
    g = jax.grad(loss)(X)
    rep = memory.saved_residuals(loss, X)
    r = jax.grad(lambda x: (jax.nn.relu(x) * X).sum())(X)
    assert p.calls() == {"gelu": 2, "relu": 1}
  assert rep.named_bytes(fb.activations.EXACT_NAME) == X.size * 4
  want = jax.grad(lambda x: (jax.nn.gelu(x * 2, approximate=False) * X).sum())(X)
  np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(r, jax.grad(lambda x: (jax.nn.relu(x) * X).sum())(X))
  f = fb.patch.swap_activation(nn.silu, fb.patch.parse_bits({"swish": "exact"}))
  assert "exact=True" in f.__name__


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
