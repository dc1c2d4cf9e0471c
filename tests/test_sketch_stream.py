"""Where the randomized flax layers get their sketch keys (fewbit_jax._sketch_stream)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fewbit_jax as fb
from fewbit_jax._sketch_stream import linen_key, nnx_fork, nnx_key, nnx_source

X = jnp.ones((4, 6))


def _data(key):
  return jax.random.key_data(key).tolist()


class _Draw(nn.Module):
  collection: str = "sketch"

  def __call__(self):
    return linen_key(self, self.collection, "Draw")


def test_linen_key_is_make_rng_and_falls_back_to_params():
  class MakeRng(nn.Module):
    def __call__(self):
      return self.make_rng("sketch")
  rngs = {"sketch": jax.random.key(3)}
  assert _data(_Draw().apply({}, rngs=rngs)) == _data(MakeRng().apply({}, rngs=rngs))
  assert _data(_Draw().apply({}, rngs={"params": jax.random.key(4)})) == _data(
      MakeRng().apply({}, rngs={"params": jax.random.key(4)}))
  with pytest.raises(ValueError) as e:
    _Draw(collection="proj").apply({}, rngs={"sketch": jax.random.key(0)})
  assert str(e.value) == (
      "Draw draws a new random sketch on every call from the 'proj' rng stream, and none "
      "was given. Pass a fresh key each step: model.apply(variables, x, "
      "rngs={'proj': jax.random.fold_in(key, step)}). For evaluation without gradients pass "
      "deterministic=True instead: the layer is then exactly the plain dense layer and needs "
      "no rng.")


def test_linen_layer_and_intercept_share_the_error():
  layer = fb.RandomizedDense(3)
  v = layer.init(jax.random.key(0), X)
  with pytest.raises(ValueError) as layer_error:
    layer.apply(v, X)
  with pytest.raises(ValueError) as intercept_error:
    with fb.linen.intercept(warn_unused=False):
      nn.Dense(3).apply(v, X)
  assert str(layer_error.value).startswith("RandomizedDense draws a new random sketch")
  assert str(intercept_error.value) == str(layer_error.value).replace(
      "RandomizedDense", "fewbit_jax.linen.intercept (at /)")


def test_nnx_key_from_each_kind_of_rngs():
  rngs = nnx.Rngs(sketch=5)
  want = nnx.Rngs(sketch=5).sketch()
  assert _data(nnx_key(rngs, None, "sketch", "L")[0]) == _data(want)
  stream = nnx.Rngs(sketch=5)["sketch"]
  assert _data(nnx_key(stream, None, "sketch", "L")[0]) == _data(want)
  own = nnx.Rngs(sketch=5)["sketch"]
  assert _data(nnx_key(None, own, "sketch", "L")[0]) == _data(want)  # the layer's own stream
  key = jax.random.key(1)
  assert nnx_key(key, own, "sketch", "L") == (key, None)  # the call's rngs come first
  with pytest.raises(ValueError, match=r"^L draws a new random sketch.*nnx.Rngs\(params=0, "
                     r"proj=1\).*layer\(x, rngs=key\)"):
    nnx_key(None, None, "proj", "L")
  with pytest.raises(TypeError, match="got int"):
    nnx_key(3, None, "sketch", "L")


def test_nnx_fork_uses_the_default_stream_or_none():
  class Layer(nnx.Module):
    def __init__(self, rngs):
      self.rngs = nnx_fork(rngs, "sketch")
  assert isinstance(Layer(nnx.Rngs(sketch=0)).rngs, nnx.RngStream)
  assert isinstance(Layer(nnx.Rngs(0)).rngs, nnx.RngStream)  # 'default' serves
  assert Layer(nnx.Rngs(params=0)).rngs is None


def test_nnx_source_for_converted_layers():
  a, b = nnx_source(None, "sketch"), nnx_source(None, "sketch")
  assert _data(a()) != _data(b())  # a process-wide counter: distinct streams
  assert _data(nnx_source(7, "proj")()) == _data(nnx.Rngs(proj=7).proj())
  rngs = nnx.Rngs(sketch=1)
  assert nnx_source(rngs, "sketch") is rngs["sketch"]
  assert nnx_source(rngs["sketch"], "other") is rngs["sketch"]
  assert isinstance(nnx_source(jax.random.key(0), "sketch"), nnx.RngStream)
  with pytest.raises(TypeError, match="a seed or a key; got str"):
    nnx_source("seed", "sketch")


EACH_NNX_LAYER = pytest.mark.parametrize("make", [
    lambda rngs: fb.nnx.RandomizedLinear(6, 3, rngs=rngs),
    lambda rngs: fb.nnx.RandomizedLinearGeneral(6, (3,), rngs=rngs),
    lambda rngs: fb.nnx.RandomizedEinsum("bd,dh->bh", (6, 3), rngs=rngs),
], ids=["Linear", "LinearGeneral", "Einsum"])


@EACH_NNX_LAYER
def test_nnx_layers_share_one_stream_piece(make):
  layer = make(nnx.Rngs(0, sketch=2))
  assert isinstance(layer.rngs, nnx.RngStream)
  kernel = layer.kernel[...]
  (first, k1), (second, k2) = layer._key(None, kernel), layer._key(None, kernel)
  assert _data(first) != _data(second)  # the layer's own stream advances
  assert k1 is kernel and k2 is kernel  # eagerly nothing is guarded
  key = jax.random.key(9)
  assert layer._key(key, kernel)[0] is key  # the call's rngs take precedence
  name = type(layer).__name__
  bare = make(nnx.Rngs(params=0))
  with pytest.raises(ValueError, match=f"^{name} draws a new random sketch"):
    bare(X)
  y = bare(X, rngs=key)  # a key per call serves
  assert bool(jnp.all(y == bare(X, deterministic=True)))
  with pytest.raises(TypeError, match="nnx.RngStream or a key array; got str"):
    bare(X, rngs="key")
  assert nnx.view(layer, deterministic=True).deterministic


@EACH_NNX_LAYER
def test_nnx_layers_refuse_rngs_that_are_not_rngs(make):
  for bad in (None, jax.random.key(0)):
    with pytest.raises(TypeError, match=r"needs rngs=nnx.Rngs\(...\) to initialise its "
                       rf"parameters .*; got {type(bad).__name__}\. Pass e.g. "
                       r"rngs=nnx.Rngs\(0\)"):
      make(bad)


def test_scoped_keys_differ_per_salt_collection_and_call():
  from fewbit_jax._sketch_stream import scoped_key, step_keys
  a, b = jax.random.key(1), jax.random.key(2)
  assert scoped_key(a, "h", "sketch", "L") is None  # outside any scope

  def draws(key):
    with step_keys(key):
      return [_data(scoped_key(salt, holder, coll, "L")[0]) for salt, holder, coll in
              [(a, "x", "sketch"), (b, "y", "sketch"), (a, "z", "dropout"), (a, "x", "sketch")]]
  first = draws(jax.random.key(0))
  assert len({tuple(d) for d in first}) == 4  # salts, collections and repeated calls differ
  assert draws(jax.random.key(0)) == first  # a new scope with the same key: the same keys
  assert draws(jax.random.key(1)) != first
  with step_keys(jax.random.key(0)):
    with step_keys(jax.random.key(1)):  # the innermost scope serves
      inner = _data(scoped_key(a, "x", "sketch", "L")[0])
    outer = _data(scoped_key(a, "x", "sketch", "L")[0])
  assert inner == draws(jax.random.key(1))[0] and outer == first[0]
  raw = jax.random.key_data(jax.random.key(0))  # a raw uint32[2] key serves too
  with step_keys(raw):
    assert _data(jax.random.wrap_key_data(scoped_key(a, "x", "sketch", "L")[0])) == first[0]
  for bad in (0, jax.random.split(jax.random.key(0), 2), jnp.zeros(2)):
    with pytest.raises(TypeError, match="step_keys needs one PRNG key"):
      with step_keys(bad):
        pass


def test_guard_gradient_raises_only_when_differentiated():
  from fewbit_jax._sketch_stream import guard_gradient
  w = jnp.arange(3.0)
  f = lambda w, x: jnp.sum(guard_gradient(w, "frozen") * x)
  assert float(jax.jit(f)(w, w)) == 5.0
  np.testing.assert_array_equal(jax.grad(f, argnums=1)(w, w), w)  # only x differentiated
  with pytest.raises(ValueError, match="^frozen"):
    jax.jit(jax.grad(f))(w, w)


@EACH_NNX_LAYER
def test_nnx_layers_in_the_functional_loop(make):
  graphdef, params, rest = nnx.split(make(nnx.Rngs(0, sketch=2)), nnx.Param, ...)
  xs = jnp.ones((16, 6))

  def grads(params, rest, key=None, copy=False):
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest, copy=copy)(xs) ** 2)
    if key is None:
      return jax.grad(loss)(params)["kernel"][...]
    with fb.nnx.step_keys(key):
      return jax.grad(loss)(params)["kernel"][...]
  step = jax.jit(grads)
  assert not np.allclose(step(params, rest, jax.random.key(0)), step(params, rest,
                                                                      jax.random.key(1)))
  with pytest.raises(ValueError, match="cannot advance here"):
    step(params, rest)
  with pytest.raises(ValueError, match="same sketch"):
    jax.jit(lambda p, r: grads(p, r, copy=True))(params, rest)


def test_the_pieces_serve_a_dropout_in_the_functional_loop():
  from fewbit_jax._sketch_stream import scoped_key, stream_key

  class Drop(nnx.Module):  # the pattern stream_key's docstring shows
    def __init__(self, rngs):
      self.rngs = rngs["dropout"].fork()

    def __call__(self, x):
      drawn = scoped_key(self.rngs.key[...], self.rngs, "dropout", "Drop")
      key, frozen = drawn or stream_key(self.rngs, "dropout", "Drop", "dropout mask")
      if frozen is not None:
        raise ValueError(frozen)
      return jnp.where(jax.random.bernoulli(key, 0.5, x.shape), x * 2, 0)

  graphdef, state = nnx.split(Drop(nnx.Rngs(dropout=0)))
  xs = jnp.ones((64,))

  @jax.jit
  def mask(state, key):
    with fb.nnx.step_keys(key):
      return nnx.merge(graphdef, state)(xs)
  assert not bool(jnp.all(mask(state, jax.random.key(0)) == mask(state, jax.random.key(1))))
  with pytest.raises(ValueError, match="draw the same dropout mask. Give the step"):
    jax.jit(lambda state: nnx.merge(graphdef, state)(xs))(state)
  drop = Drop(nnx.Rngs(dropout=0))
  assert not bool(jnp.all(nnx.jit(lambda m: m(xs))(drop) == nnx.jit(lambda m: m(xs))(drop)))


def test_layer_streams_draw_flax_keys_and_serialise_with_msgpack():
  from flax import serialization
  from fewbit_jax._sketch_stream import KeyStream

  # A layer's own stream draws what flax's fork draws, from raw uint32 key data.
  layer = fb.nnx.RandomizedLinear(6, 3, rngs=nnx.Rngs(0, sketch=1))
  flax_fork = nnx.Rngs(0, sketch=1)["sketch"].fork()
  assert isinstance(layer.rngs, nnx.RngStream) and isinstance(layer.rngs, KeyStream)
  assert layer.rngs.key[...].dtype == jnp.uint32
  for _ in range(2):
    assert _data(nnx.clone(layer.rngs)()) == _data(flax_fork())
    layer.rngs()
  # A converted model's state round-trips through msgpack, and restored it draws the
  # same keys.
  def make():
    model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.gelu,
                           nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    model = fb.nnx.map_module(model, lambda m, path: fb.nnx.convert_linear(
        m, proj_dim_ratio=0.5, rngs=nnx.Rngs(sketch=7)))
    model.layers.append(fb.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3)))
    return model
  model = make()
  step = nnx.jit(lambda m: nnx.grad(lambda m: jnp.sum(m(X) ** 2))(m))
  step(model)  # advance the streams
  blob = serialization.msgpack_serialize(nnx.state(model).to_pure_dict())
  restored = make()
  state = nnx.state(restored)
  state.replace_by_pure_dict(serialization.msgpack_restore(blob))
  nnx.update(restored, state)
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
    np.testing.assert_array_equal(a, b)
  g, g_restored = step(model), step(restored)  # the same sketches and masks
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_restored)):
    np.testing.assert_array_equal(a, b)
  assert int(restored.layers[0].rngs.count[...]) == 2
