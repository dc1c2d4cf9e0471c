"""Converting models without editing them: inline activations (patch_activations)."""

import importlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
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


def test_patch_docstring_examples():
  import doctest
  from fewbit_jax import patch
  res = doctest.testmod(patch, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert res.attempted > 0 and res.failed == 0
