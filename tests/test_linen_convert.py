"""Converting existing linen models: intercept and swap_activations (fewbit_jax.linen._convert)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fewbit_jax as fb
from fewbit_jax import memory
from fewbit_jax.activations import CODES_NAME
from fewbit_jax.patch import patch_activations

from fewbit_jax._models import plain as models

CFG = models.Config.tiny()


def _codes_bytes(f, *args):
  return memory.saved_residuals(f, *args).named_bytes(CODES_NAME)


# --------------------------------------------------------------------------
# Whole transformers (fewbit_jax._models.plain: benchmarks/bench_convert.py converts them)

@pytest.fixture(scope="module")
def linen_setup():
  model = models.LinenTransformer(CFG)
  x, t = models.data(CFG)
  variables = model.init(jax.random.key(0), x)
  loss = lambda p, x, t, key: models.mse(model.apply({"params": p}, x, rngs={"sketch": key}),
                                         t)
  step = jax.jit(jax.grad(loss))
  grads = models.kernels({"params": step(variables["params"], x, t, jax.random.key(1))})
  temp = memory.compiled(jax.grad(loss), variables["params"], x, t, jax.random.key(1)).temp
  return dict(model=model, x=x, t=t, variables=variables, loss=loss, grads=grads, temp=temp,
              y=jax.jit(model.apply)(variables, x))


def test_linen_transformer_intercepted(linen_setup):
  s = linen_setup
  model, x, t, params, loss = s["model"], s["x"], s["t"], s["variables"]["params"], s["loss"]
  with fb.linen.intercept(models.LINEN_BLOCKS, proj_dim_ratio=0.5, warn_unused=False):
    inside = model.init(jax.random.key(0), x)  # parameters are untouched by interception
  assert jax.tree.structure(inside) == jax.tree.structure(s["variables"])
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(inside),
                                                    jax.tree.leaves(s["variables"])))

  def converted(*args):
    with patch_activations(gelu=3), fb.linen.intercept(models.LINEN_BLOCKS,
                                                           proj_dim_ratio=0.5) as seen:
      out = jax.grad(loss)(*args)
    assert len(seen.converted) == 6 * CFG.layers and "/head" not in seen.converted
    return out

  def apply(v, x, key):
    with patch_activations(gelu=3), fb.linen.intercept(proj_dim_ratio=0.5):
      return model.apply(v, x, rngs={"sketch": key})
  assert bool(jnp.all(jax.jit(apply)(s["variables"], x, jax.random.key(2)) == s["y"]))
  step = jax.jit(converted)
  samples = [models.kernels({"params": step(params, x, t, jax.random.key(i))})
             for i in range(8)]
  cos = models.cosines(s["grads"], samples)
  print("\nlinen per-layer cosine (1 step, mean of 8):",
        {k: (round(a, 3), round(b, 3)) for k, (a, b) in cos.items()})
  for path, (one, mean) in cos.items():
    assert one > 0.25 and mean > 0.8 and mean >= one - 0.05, (path, one, mean)
  temp = memory.compiled(step, params, x, t, jax.random.key(0)).temp
  assert temp < 0.8 * s["temp"]


def test_linen_intercept_errors(linen_setup):
  s = linen_setup
  with pytest.raises(ValueError, match="'sketch' rng stream"):
    with fb.linen.intercept(warn_unused=False):
      jax.eval_shape(s["model"].apply, s["variables"], s["x"])
  with pytest.warns(UserWarning, match="matched none of the dense layers called: /Block_0/down"):
    with fb.linen.intercept("/Blok_"):
      jax.eval_shape(s["model"].apply, s["variables"], s["x"])
  with pytest.raises(ValueError, match="unknown sketch"):
    with fb.linen.intercept(sketch="gauss"):
      pass


# --------------------------------------------------------------------------
# DenseGeneral and activation fields

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
  g0 = models.kernels({"params": jax.jit(jax.grad(loss))(v["params"], jax.random.key(0))})
  with fb.linen.intercept(proj_dim_ratio=1.0, sketch="dct") as seen:
    g1 = models.kernels({"params": jax.jit(jax.grad(loss))(v["params"], jax.random.key(0))})
  assert sorted(set(seen.converted)) == [f"/mlps_{i}/{n}" for i in range(2)
                                         for n in ("heads", "merge", "out")]
  for path, want in g0.items():
    np.testing.assert_allclose(g1[path], want, rtol=1e-4, atol=1e-5, err_msg=path)


@pytest.mark.parametrize("cfg", [dict(), dict(sketch="countsketch", proj_dim=3),
                                 dict(sketch_blocks=2, proj_dim_ratio=0.5, use_bias=False)],
                         ids=repr)
def test_intercepted_dense_is_randomized_dense(cfg):
  # The same parameters, key and options: bitwise the same output and gradients.
  cfg = dict(cfg)
  use_bias = cfg.pop("use_bias", True)
  x = jax.random.normal(jax.random.key(0), (4, 6, 8))
  plain, ours = nn.Dense(5, use_bias=use_bias), fb.RandomizedDense(5, use_bias=use_bias, **cfg)
  v = plain.init(jax.random.key(1), x)
  rngs = {"sketch": jax.random.key(2)}
  loss = lambda m: lambda v: jnp.sum(m.apply(v, x, rngs=rngs) ** 2)
  with fb.linen.intercept(**cfg):
    y, g = plain.apply(v, x, rngs=rngs), jax.grad(loss(plain))(v)
  assert bool(jnp.all(y == ours.apply(v, x, rngs=rngs)))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(jax.grad(loss(ours))(v))):
    np.testing.assert_array_equal(a, b)
