"""Converting models written without fewbit in mind: `fb.linen.lean` and `fb.nnx.convert_lean`.

The same parameters, the forward bitwise (under jit, as training runs), the
gradients equal, less compiled temp, and composition with the randomized
and few-bit conversions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fewbit_jax as fb
from fewbit_jax import memory


class Model(nn.Module):
  """A post-LN block (as RoBERTa's) as a flax user writes it."""
  hidden: int = 64

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(x.shape[-1])(x)
    h = nn.Dense(self.hidden)(x)
    h = jax.nn.gelu(h)
    h = nn.Dropout(0.1, deterministic=not train)(h)
    h = nn.Dense(x.shape[-1])(h)
    x = nn.LayerNorm()(x + nn.Dropout(0.2)(h, deterministic=not train))
    return nn.Dense(8)(nn.RMSNorm()(x))


class NNXModel(nnx.Module):
  """Its NNX counterpart."""

  def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
    self.inp = nnx.Linear(dim, dim, rngs=rngs)
    self.up = nnx.Linear(dim, hidden, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.down = nnx.Linear(hidden, dim, rngs=rngs)
    self.drop2 = nnx.Dropout(0.2, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.out_norm = nnx.RMSNorm(dim, rngs=rngs)
    self.out = nnx.Linear(dim, 8, rngs=rngs)

  def __call__(self, x):
    x = self.inp(x)
    h = self.drop(jax.nn.gelu(self.up(x)))
    return self.out(self.out_norm(self.norm(x + self.drop2(self.down(h)))))


X = jax.random.normal(jax.random.key(0), (4, 16, 32))
RNGS = {"dropout": jax.random.key(1), "sketch": jax.random.key(2)}


def _loss(model, variables, x):
  return jnp.sum(jnp.sin(model.apply(variables, x, rngs=RNGS)))


def _same(a, b):
  return all(bool(jnp.all(u == v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_linen_lean_is_a_drop_in():
  model = Model()
  v = model.init(jax.random.key(3), X)
  with fb.linen.lean() as seen:
    assert _same(model.init(jax.random.key(3), X), v)
  with fb.linen.lean() as seen:
    y, g = jax.jit(jax.value_and_grad(lambda v, x: _loss(model, v, x), argnums=(0, 1)))(v, X)
  assert seen.converted == ["/Dropout_0", "/Dropout_1", "/LayerNorm_0", "/RMSNorm_0"]
  y0, g0 = jax.jit(jax.value_and_grad(lambda v, x: _loss(model, v, x), argnums=(0, 1)))(v, X)
  assert float(y) == pytest.approx(float(y0), rel=1e-6)  # XLA fuses the two programs apart
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
  fwd = lambda: jax.jit(lambda v, x: model.apply(v, x, rngs=RNGS))(v, X)
  with fb.linen.lean():
    y = fwd()
  assert bool(jnp.all(y == fwd()))
  with fb.linen.lean(r"Dropout") as seen:
    model.apply(v, X, rngs=RNGS)
  assert seen.converted == ["/Dropout_0", "/Dropout_1"]
  with pytest.warns(UserWarning, match="matched none of the norm or dropout layers"):
    with fb.linen.lean(r"nothing"):
      model.apply(v, X, rngs=RNGS)


def test_linen_lean_keeps_less():
  model = Model(hidden=256)
  x = jax.random.normal(jax.random.key(0), (8, 64, 128))
  v = model.init(jax.random.key(3), x)
  grad = jax.grad(lambda v, x: _loss(model, v, x))
  loss = lambda v, x: _loss(model, v, x)
  plain = memory.compiled(grad, v, x).temp, memory.saved_residuals(loss, v, x)
  with fb.linen.lean():
    lean = memory.compiled(grad, v, x).temp, memory.saved_residuals(loss, v, x)
  # The dropout keeps its key where flax keeps a boolean mask (masks of more
  # than REDRAW_BLOCK elements; fewbit_jax/_dropout.py says why).
  assert lean[1].by_dtype().get("bool", 0) < plain[1].by_dtype().get("bool")
  assert lean[1].saved_bytes < plain[1].saved_bytes - 2 * x.nbytes
  # On CPU, XLA already recomputes much of what flax's norms keep (their
  # broadcasts, the mask from the key) inside the backward's fusions: in
  # this block the compiled temp is the same; in a norm between two matmuls
  # (tests/test_lean.py) and a 2-layer post-LN stack it is lower.
  assert lean[0] <= plain[0], (lean[0], plain[0])


def test_linen_lean_composes_with_intercept_and_patch():
  model = Model()
  v = model.init(jax.random.key(3), X)
  step = lambda: jax.jit(jax.value_and_grad(lambda v, x: _loss(model, v, x)))(v, X)
  with fb.linen.intercept(proj_dim_ratio=0.5) as dense, fb.patch_activations(gelu=3):
    y0, g0 = step()
  with fb.linen.intercept(proj_dim_ratio=0.5), fb.patch_activations(gelu=3), \
      fb.linen.lean() as seen:
    y1, g1 = step()
    res = memory.saved_residuals(lambda v, x: _loss(model, v, x), v, X).by_source()
  assert set(dense.converted) == {f"/Dense_{i}" for i in range(4)}
  assert set(seen.converted) == {"/LayerNorm_0", "/Dropout_0", "/Dropout_1", "/RMSNorm_0"}
  assert float(y0) == pytest.approx(float(y1), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
  assert {"named 'lean_norm_input'", "named 'fewbit_codes'",
          "named 'randomized_dense_sketch'"} <= set(res)


@nnx.jit
def _nnx_step(model, x):
  return nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(x))))(model)


def test_nnx_convert_lean_is_a_drop_in():
  flax_model = NNXModel(32, 64, nnx.Rngs(0, dropout=1))
  model = NNXModel(32, 64, nnx.Rngs(0, dropout=1))
  scale, bias, stream = model.norm.scale, model.norm.bias, model.drop.rngs
  model = fb.nnx.map_module(model, lambda m, path: fb.nnx.convert_lean(m))
  assert [type(getattr(model, n)) for n in ("norm", "drop", "drop2", "out_norm", "up")] == [
      fb.nnx.LayerNorm, fb.nnx.Dropout, fb.nnx.Dropout, fb.nnx.RMSNorm, nnx.Linear]
  assert model.norm.scale is scale and model.norm.bias is bias and model.drop.rngs is stream
  # The dropout keys advance the same way: forward and gradients, step after step.
  for _ in range(2):
    (y0, g0), (y1, g1) = _nnx_step(flax_model, X), _nnx_step(model, X)
    assert float(y0) == float(y1)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
  x = jax.random.normal(jax.random.key(5), (2, 3, 32))
  assert bool(jnp.all(flax_model(x) == model(x)))


def test_nnx_convert_lean_composes_with_convert_linear():
  model = NNXModel(32, 64, nnx.Rngs(0, dropout=1))
  reference = NNXModel(32, 64, nnx.Rngs(0, dropout=1))
  convert = lambda m, path: fb.nnx.convert_lean(fb.nnx.convert_linear(
      m, proj_dim_ratio=0.5, rngs=nnx.Rngs(sketch=0)))
  model = fb.nnx.map_module(model, convert)
  assert type(model.up).__name__ == "RandomizedLinear" and type(model.norm) is fb.nnx.LayerNorm
  graphdef, state = nnx.split(model)
  with fb.patch_activations(gelu=3):
    y, y0 = model(X), reference(X)
    def loss(st, x, key):  # the functional loop: the step's key scope gives the sketch key
      with fb.nnx.step_keys(key):
        return jnp.sum(nnx.merge(graphdef, st)(x) ** 2)
    res = memory.saved_residuals(loss, state, X, jax.random.key(2)).by_source()
  assert bool(jnp.all(y == y0))
  assert {"named 'lean_norm_input'", "named 'fewbit_codes'",
          "named 'randomized_dense_sketch'"} <= set(res)


def test_attention_entries_use_fewbit_attention_where_present(monkeypatch):
  # fewbit_jax.attention may be absent: a stand-in module records the calls.
  import sys
  import types
  calls = []

  def attention(*args, **kwargs):
    calls.append(kwargs.get("deterministic"))
    return nn.dot_product_attention(*args, **kwargs)

  monkeypatch.setitem(sys.modules, "fewbit_jax.attention",
                      types.SimpleNamespace(dot_product_attention=attention))
  layer = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  v = layer.init(jax.random.key(1), x)
  with fb.linen.lean() as seen:
    y = layer.apply(v, x)
  assert seen.converted == ["/"] and calls and layer.attention_fn is nn.dot_product_attention
  assert bool(jnp.all(y == layer.apply(v, x)))
  custom = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8,
                                           attention_fn=lambda *a, **k: nn.dot_product_attention(
                                               *a, **k))
  with fb.linen.lean(warn_unused=False) as seen:
    custom.apply(v, x)
  assert seen.skipped == ["/"]
  mha = nnx.MultiHeadAttention(2, 8, 8, decode=False, rngs=nnx.Rngs(0))
  assert fb.nnx.convert_lean(mha) is mha and mha.attention_fn is attention
