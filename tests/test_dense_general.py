"""fewbit_jax.dense_general: randomized dot_general and einsum projections.

The forward is the very ``lax.dot_general`` / ``jnp.einsum`` of the layer,
``dx`` its exact transpose and the kernel gradient the sketched estimate of
`fewbit_jax.dense.randomized_dense` (the same core); the layers built on
them are tested in tests/test_convert.py.
"""

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewbit_jax import ext, sketch
from fewbit_jax.dense import randomized_dense, sketch_blocks_default
from fewbit_jax.dense_general import randomized_dot_general, randomized_einsum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def pure_jax(request):
  if "on_8_devices" in request.fixturenames:
    yield
    return
  with ext.mode("jax"):
    yield


def _normal(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("kind", sketch.KINDS)
def test_dense_dims_are_randomized_dense(kind):
  # One core: dot_general over x's last axis is randomized_dense without bias.
  x, w, c = _normal((4, 8, 6), 0), _normal((6, 5), 1), _normal((4, 8, 5), 2)
  key = jax.random.key(3)
  dims = (((2,), (0,)), ((), ()))
  for blocks in (None, 2):
    general = jax.jit(jax.grad(lambda x, w: jnp.sum(c * randomized_dot_general(
        x, w, key, dims, proj_dim=6, sketch=kind, sketch_blocks=blocks)), argnums=(0, 1)))
    dense = jax.jit(jax.grad(lambda x, w: jnp.sum(c * randomized_dense(
        x, w, None, key, proj_dim=6, sketch=kind, sketch_blocks=blocks)), argnums=(0, 1)))
    for a, b in zip(general(x, w), dense(x, w)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("subscripts,x_shape,w_shape", [
    ("btd,dnh->btnh", (4, 16, 32), (32, 2, 8)),
    ("dbt,dnh->bhnt", (32, 4, 16), (32, 2, 8)),
    ("...d,fd->...f", (4, 3, 8), (5, 8)),
])
def test_einsum_forward_bitwise_dx_exact_dw_shape(subscripts, x_shape, w_shape):
  x, w = _normal(x_shape, 0), _normal(w_shape, 1)
  key = jax.random.key(2)
  f = lambda x, w: randomized_einsum(subscripts, x, w, key, proj_dim=6)
  plain = lambda x, w: jnp.einsum(subscripts, x, w)
  np.testing.assert_array_equal(jax.jit(f)(x, w), jax.jit(plain)(x, w))
  c = _normal(jax.eval_shape(plain, x, w).shape, 3)
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(c * f(x, w)), argnums=(0, 1)))(x, w)
  dx_ref = jax.jit(jax.grad(lambda x: jnp.sum(c * plain(x, w))))(x)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)
  assert dw.shape == w.shape and dw.dtype == w.dtype


@pytest.mark.parametrize("kind", ["dct", "dft"])
def test_full_size_trig_sketch_gives_exact_dw(kind):
  x, w = _normal((4, 8, 16), 0), _normal((8, 16, 3), 1)
  dims = (((1, 2), (0, 1)), ((), ()))
  c = _normal((4, 3), 2)
  dw = jax.grad(lambda w: jnp.sum(c * randomized_dot_general(
      x, w, jax.random.key(0), dims, proj_dim_ratio=1.0, sketch=kind)))(w)
  exact = jax.grad(lambda w: jnp.sum(c * jax.lax.dot_general(x, w, dims)))(w)
  np.testing.assert_allclose(dw, exact, rtol=1e-4, atol=1e-4)


def test_errors():
  x, w, key = jnp.ones((4, 8, 6)), jnp.ones((6, 3)), jax.random.key(0)
  with pytest.raises(ValueError, match="batch dimensions"):
    randomized_dot_general(x, w[None], key, (((2,), (1,)), ((0,), (0,))), proj_dim=2)
  with pytest.raises(ValueError, match="pair up"):
    randomized_dot_general(x, w, key, (((1,), (0,)), ((), ())), proj_dim=2)
  with pytest.raises(ValueError, match="out of range"):
    randomized_dot_general(x, w, key, (((5,), (0,)), ((), ())), proj_dim=2)
  with pytest.raises(ValueError, match="in x, the kernel and the output"):
    randomized_einsum("btd,bdf->btf", x, jnp.ones((4, 6, 3)), key, proj_dim=2)
  with pytest.raises(ValueError, match="one operand only"):
    randomized_einsum("btd,df->bf", x, w, key, proj_dim=2)
  with pytest.raises(ValueError, match="explicit"):
    randomized_einsum("btd,df", x, w, key, proj_dim=2)
  with pytest.raises(TypeError, match="x has dtype int32"):
    randomized_einsum("btd,df->btf", x.astype(jnp.int32), w, key, proj_dim=2)
  with pytest.raises(ValueError, match="sketch size"):
    randomized_einsum("btd,df->btf", x, w, key)


def test_sketch_blocks():
  x, w, key = _normal((4, 8, 6), 0), _normal((6, 3), 1), jax.random.key(0)
  saved = lambda f: [r[0].shape for r in jax._src.ad_checkpoint.saved_residuals(f, w)  # pylint: disable=protected-access
                     if len(r[0].shape) == 3]
  f = lambda blocks: lambda w: randomized_einsum("btd,df->btf", x, w, key, proj_dim=8,
                                                 sketch_blocks=blocks).sum()
  assert saved(f(4)) == [(4, 2, 6)]
  assert saved(f(None)) == []  # one (8, 6) sketch
  with sketch_blocks_default(2):
    assert saved(f(None)) == [(2, 4, 6)]
  with pytest.raises(ValueError, match="do not divide"):
    f(5)(w)
  with pytest.raises(ValueError, match="leading axes"):
    randomized_einsum("bdt,df->btf", x, jnp.ones((8, 3)), key, proj_dim=8, sketch_blocks=2)
  # No positions: the plain einsum, whatever the blocks.
  empty = randomized_einsum("btd,df->btf", x[:0], w, key, proj_dim=1, sketch_blocks=3)
  assert empty.shape == (0, 8, 3)


_GENERAL_SCRIPT = textwrap.dedent(r"""
  import json
  import jax, jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from fewbit_jax.memory import collectives
  from fewbit_jax.dense_general import randomized_einsum

  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  x = jax.random.normal(jax.random.key(0), (32, 16, 64))
  w = jax.random.normal(jax.random.key(1), (64, 4, 8))
  key = jax.random.key(2)

  def loss(w, x, blocks, fewbit=True):
    y = (randomized_einsum("btd,dnh->btnh", x, w, key, proj_dim_ratio=0.2, sketch_blocks=blocks)
         if fewbit else jnp.einsum("btd,dnh->btnh", x, w))
    return jnp.sum(jnp.tanh(y))

  out = {}
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P()))
    for name, blocks, fewbit in (("vanilla", None, False), ("blocks", "data", True)):
      f = jax.jit(jax.grad(lambda w, x: loss(w, x, blocks, fewbit)))
      out[name] = collectives(f.lower(ws, xs).compile().as_text())
    sharded = jax.jit(jax.grad(lambda w, x: loss(w, x, "data")))(ws, xs)
  one = jax.jit(jax.grad(lambda w, x: loss(w, x, 8)))(w, x)
  out["rel_err"] = float(jnp.abs(sharded - one).max() / jnp.abs(one).max())
  print(json.dumps(out))
""")


def test_general_layers_sketch_per_data_shard(on_8_devices):
  # randomized_einsum (the core of RandomizedEinsum / RandomizedLinearGeneral
  # and of converted DenseGeneral layers) with sketch_blocks="data" on an
  # Auto mesh: the data-parallel gradient's all-reduce is the only collective,
  # and the gradient is one device's with 8 blocks.
  out = on_8_devices(_GENERAL_SCRIPT, timeout=600)
  assert out["blocks"] == out["vanilla"], out
  assert out["vanilla"]["all-reduce"][0] == 1
  assert out["rel_err"] < 1e-5, out


# One planner (`fewbit_jax._projection.plan`) behind randomized_dense and
# randomized_dot_general / randomized_einsum: their zero-size cases agree.
# Each case: the plain layer's output, a zero or empty kernel gradient, an
# exact dx, and the arguments (key, sketch, sketch_blocks) validated all the same.
_ZERO_CASES = {"zero positions": ((0, 8), (8, 5)), "zero-size kernel": ((4, 3, 8), (8, 0)),
               "zero features in": ((4, 0), (0, 3))}


@pytest.mark.parametrize("case", sorted(_ZERO_CASES))
def test_zero_size_cases_agree_across_layers(case):
  xs, ws = _ZERO_CASES[case]
  x, w = _normal(xs, 0), _normal(ws, 1)
  key = jax.random.key(2)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  layers = {
      "dense": lambda x, w, **kw: randomized_dense(x, w, None, key, proj_dim_ratio=0.5, **kw),
      "dot_general": lambda x, w, **kw: randomized_dot_general(x, w, key, dims,
                                                               proj_dim_ratio=0.5, **kw),
      "einsum": lambda x, w, **kw: randomized_einsum("...d,df->...f", x, w, key,
                                                     proj_dim_ratio=0.5, **kw),
  }
  plain = jax.lax.dot_general(x, w, dims)
  for name, f in layers.items():
    np.testing.assert_array_equal(f(x, w), plain, err_msg=name)
    dx, dw = jax.grad(lambda x, w: f(x, w).sum(), (0, 1))(x, w)
    assert dw.shape == w.shape, name
    np.testing.assert_array_equal(dw, jnp.zeros_like(w), err_msg=name)  # sums of no terms
    np.testing.assert_array_equal(dx, jnp.broadcast_to(w.sum(1), x.shape), err_msg=name)
    # Nothing to sketch, but a bad argument is an error as it is for any shape.
    with pytest.raises(ValueError, match="unknown sketch"):
      f(x, w, sketch="nope")
    with pytest.raises(ValueError, match="must be None"):
      f(x, w, sketch_blocks=0)
    with pytest.raises(ValueError, match="mesh axes"):
      f(x, w, sketch_blocks="data")
  bad_key = lambda: randomized_dot_general(x, w, jnp.zeros(3, jnp.uint32), dims, proj_dim=1)
  with pytest.raises(TypeError, match="one PRNG key"):
    bad_key()
  with pytest.raises(TypeError, match="one PRNG key"):
    randomized_dense(x, w, None, jnp.zeros(3, jnp.uint32), proj_dim=1)
