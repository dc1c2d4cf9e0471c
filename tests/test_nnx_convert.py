"""Converting existing NNX models in place (fewbit_jax.nnx._convert).

map_module, convert_linear and convert_activations, on single layers and on a
whole transformer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from flax import nnx

import fewbit_jax as fb
from fewbit_jax import memory
from fewbit_jax.activations import CODES_NAME
from fewbit_jax.patch import patch_activations

from fewbit_jax._models import plain as models

CFG = models.Config.tiny()


def _codes_bytes(f, *args):
  return memory.saved_residuals(f, *args).named_bytes(CODES_NAME)


# --------------------------------------------------------------------------
# A whole transformer (fewbit_jax._models.plain: benchmarks/bench_convert.py converts it)

def _nnx_model(seed=0):
  return models.NnxTransformer(CFG, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def nnx_vanilla():
  model = _nnx_model()
  x, y = models.data(CFG)
  grads = models.kernels(nnx.jit(models.nnx_grads)(model, x, y))
  temp = memory.compiled(nnx.jit(models.nnx_grads), model, x, y).temp
  return dict(y=nnx.jit(lambda m, x: m(x))(model, x), grads=grads, temp=temp, x=x, t=y)


def test_nnx_transformer_converted_in_place(nnx_vanilla):
  model = _nnx_model()
  x, t = nnx_vanilla["x"], nnx_vanilla["t"]
  params = nnx.state(model, nnx.Param)
  objects = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)  # state made before
  out = models.convert_nnx(model, ratio=0.5)
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
  grads_fn = nnx.jit(patch(models.nnx_grads))
  samples = [models.kernels(grads_fn(model, x, t)) for _ in range(8)]  # fresh sketch per call
  cos = models.cosines(nnx_vanilla["grads"], samples)
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
  assert not bool(jnp.all(jax.random.key_data(a.rngs()) == jax.random.key_data(b.rngs())))


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
  g0 = models.kernels(grads(model))
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
  g1 = models.kernels(grads(model))
  for path in ("/qkv", "/out", "/proj"):  # exact at k = B with an orthogonal sketch
    np.testing.assert_allclose(g1[path], g0[path], rtol=1e-4, atol=1e-5, err_msg=path)
