"""Training loops that carry no rng state: NNX's functional loop and linen's apply.

flax's own examples train NNX models with ``nnx.split`` inside ``jax.jit`` and
``nnx.merge`` inside ``jax.value_and_grad``, where a layer may not advance an
rng counter. A randomized layer takes its keys from ``fb.nnx.step_keys``
there, each layer its own; without it, a draw whose key would repeat every
step raises instead of training with a frozen sketch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fewbit_jax as fb

# The README's "The functional NNX loop", verbatim.
README_LOOP = '''
import jax, jax.numpy as jnp, optax
from flax import nnx
import fewbit_jax as fb

model = nnx.Sequential(nnx.Linear(16, 64, rngs=nnx.Rngs(0)), nnx.gelu,
                       nnx.Linear(64, 1, rngs=nnx.Rngs(1)))
model = fb.nnx.map_module(model, lambda m, path: fb.nnx.convert_linear(
    m, fb.nnx.RandomizedLinear, proj_dim_ratio=0.2))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
tx = optax.adam(1e-2)
opt_state = tx.init(params)

@jax.jit
def train_step(params, opt_state, rest, x, y, key):
  def loss_fn(params):
    model = nnx.merge(graphdef, params, rest)
    return jnp.mean((model(x) - y) ** 2)
  with fb.nnx.step_keys(key):        # each layer derives a key of its own
    loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss

x = jax.random.normal(jax.random.key(1), (256, 16))
y = jnp.sin(x).sum(-1, keepdims=True)
key = jax.random.key(0)
for step in range(50):
  params, opt_state, loss = train_step(params, opt_state, rest, x, y,
                                       jax.random.fold_in(key, step))
'''


def test_readme_functional_loop_trains():
  ns: dict = {}
  exec(README_LOOP, ns)  # noqa: S102 - the README's example, run as written
  graphdef, x, y = ns["graphdef"], ns["x"], ns["y"]
  layers = nnx.merge(graphdef, ns["params"], ns["rest"]).layers
  assert [type(m).__name__ for m in layers[::2]] == ["RandomizedLinear"] * 2
  final = float(ns["loss"])
  initial = float(jnp.mean((ns["model"](x) - y) ** 2))  # the untrained model
  assert final < 0.5 * initial


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(6, 16, rngs=rngs)
    self.down = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


def _converted(ratio=0.5):
  model = _MLP(nnx.Rngs(0))
  return fb.nnx.map_module(model, lambda m, path: fb.nnx.convert_linear(
      m, fb.nnx.RandomizedLinear, proj_dim_ratio=ratio, rngs=nnx.Rngs(sketch=3)))


X = jax.random.normal(jax.random.key(5), (32, 6))
Y = jax.random.normal(jax.random.key(6), (32, 3))


def _loss(model):
  return jnp.mean((model(X) - Y) ** 2)


def _functional_grads(graphdef):
  """gemma's step: merge inside jax.value_and_grad, inside jax.jit, in a step_keys scope."""
  @jax.jit
  def grads(params, rest, key):
    with fb.nnx.step_keys(key):
      return jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p, rest)))(params)
  return grads


def _kernels(grads):
  return [np.asarray(grads[name]["kernel"][...]) for name in ("up", "down")]


def test_functional_step_draws_a_new_sketch_every_step():
  model = _converted()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads = _functional_grads(graphdef)
  (l0, g0), (l1, g1) = (grads(params, rest, jax.random.key(k)) for k in (0, 1))
  exact_loss, exact = nnx.value_and_grad(_loss)(nnx.view(model, deterministic=True))
  assert float(l0) == float(l1) == pytest.approx(float(exact_loss), rel=1e-6)  # forward exact
  for a, b in zip(_kernels(g0), _kernels(g1)):
    assert not np.allclose(a, b)  # a different sketch on each step key
  for name in ("up", "down"):  # the bias gradient is exact, whatever the key
    np.testing.assert_allclose(g0[name]["bias"][...], exact[name]["bias"][...], rtol=1e-5,
                               atol=1e-7)
  # The same key gives the same sketch: the key is what makes a step's sketch new.
  for a, b in zip(_kernels(g0), _kernels(grads(params, rest, jax.random.key(0))[1])):
    np.testing.assert_array_equal(a, b)
  # Over many step keys the estimate averages to the exact gradient (unbiased).
  keys = jax.random.split(jax.random.key(9), 256)
  many = jax.vmap(lambda k: grads(params, rest, k)[1])(keys)
  for name in ("up", "down"):
    mean = np.asarray(many[name]["kernel"][...]).mean(0)
    want = np.asarray(exact[name]["kernel"][...])
    assert np.linalg.norm(mean - want) < 0.15 * np.linalg.norm(want)


def test_functional_loop_trains_like_the_stateful_loop():
  tx = optax.sgd(0.05)
  # Functional: split in jit, merge in value_and_grad, optax update.
  model = _converted()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, opt_state, rest, key):
    def loss_fn(params):
      return _loss(nnx.merge(graphdef, params, rest))
    with fb.nnx.step_keys(key):
      loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  # Stateful: nnx.jit and nnx.value_and_grad, here in the same scope.
  stateful = _converted()
  opt = nnx.Optimizer(stateful, tx, wrt=nnx.Param)

  @nnx.jit
  def stateful_step(model, opt, key):
    with fb.nnx.step_keys(key):
      loss, grads = nnx.value_and_grad(_loss)(model)
    opt.update(model, grads)
    return loss, grads

  opt_state = tx.init(params)
  losses, previous = [], None
  for t in range(30):
    key = jax.random.fold_in(jax.random.key(0), t)
    params, opt_state, loss, grads = step(params, opt_state, rest, key)
    s_loss, s_grads = stateful_step(stateful, opt, key)
    assert float(loss) == pytest.approx(float(s_loss), rel=1e-5)
    for a, b in zip(_kernels(grads), _kernels(s_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # the same sketches
    if previous is not None:
      assert not np.allclose(_kernels(grads)[0], previous)  # a new sketch every step
    previous = _kernels(grads)[0]
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  assert int(stateful.up.rngs.count[...]) == 0  # the scope advanced no stream


def test_stateful_loop_is_unchanged():
  layer = fb.nnx.RandomizedLinear(6, 3, proj_dim_ratio=0.5, rngs=nnx.Rngs(0, sketch=1))
  loss = lambda m: jnp.mean((m(X) - Y) ** 2)
  step = nnx.jit(lambda m: nnx.value_and_grad(loss)(m)[1])
  for t in range(2):
    expected = nnx.clone(layer.rngs)()  # the key the layer's own stream gives next
    explicit = nnx.grad(lambda m: jnp.mean((m(X, rngs=expected) - Y) ** 2))(layer)
    got = step(layer)
    np.testing.assert_array_equal(got["kernel"][...], explicit["kernel"][...])
    assert int(layer.rngs.count[...]) == t + 1  # nnx.jit carried the advance out


def _stack(n=3):
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return fb.nnx.RandomizedLinear(6, 4, proj_dim_ratio=0.25, rngs=nnx.Rngs(0, sketch=key))
  layers = make(jax.random.split(jax.random.key(4), n))
  layers.kernel[...] = jnp.broadcast_to(layers.kernel[0], layers.kernel.shape)  # all equal
  return layers


def _stacked_losses():
  def vmapped(layers):
    return nnx.vmap(lambda layer: jnp.sum(layer(X) ** 2), in_axes=0)(layers).sum()

  def scanned(layers):
    def body(total, layer):
      return total + jnp.sum(layer(X) ** 2), None
    return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(0.0, layers)[0]
  return {"vmap": vmapped, "scan": scanned}


@pytest.mark.parametrize("kind", ["vmap", "scan"])
def test_stacked_layers_get_distinct_keys(kind):
  loss = _stacked_losses()[kind]
  layers = _stack()
  exact = nnx.grad(loss)(nnx.view(layers, deterministic=True))["kernel"][...]
  assert bool(jnp.all(exact == exact[0]))  # the same layer three times: equal exact gradients

  def distinct(kernels):
    kernels = np.asarray(kernels)
    return all(not np.allclose(kernels[i], kernels[j]) for i in range(3) for j in range(i))

  # Functional loop, keys from the scope: each stacked layer its own. (nnx.vmap and
  # nnx.scan take no Variables of an outer trace: merge copies inside jax.grad.)
  graphdef, params, rest = nnx.split(layers, nnx.Param, ...)

  @jax.jit
  def functional(params, rest, key):
    with fb.nnx.step_keys(key):
      return jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest, copy=True)))(params)
  assert distinct(functional(params, rest, jax.random.key(0))["kernel"][...])
  # Stateful loop, keys from the stacked streams, advanced by nnx's transforms.
  stateful = nnx.jit(lambda m: nnx.grad(loss)(m))
  assert distinct(stateful(layers)["kernel"][...])
  assert np.asarray(layers.rngs.count[...]).tolist() == [1, 1, 1]


def test_a_frozen_sketch_is_caught():
  model = _converted()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(copy):
    @jax.jit
    def grads(params, rest):
      return jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest, copy=copy)))(params)
    return grads

  # flax refuses the advance: the error says what to do instead.
  with pytest.raises(ValueError, match=r"own 'sketch' rng stream, which cannot advance here.*"
                     r"copy=True\) does not help.*fb\.nnx\.step_keys\(key\)"):
    step(False)(params, rest)
  # copy=True would advance a copy, lost after the step: the same sketch every step.
  with pytest.raises(ValueError, match=r"does not carry the stream's state back out.*same "
                     r"sketch.*fb\.nnx\.step_keys\(key\)"):
    step(True)(params, rest)
  # The same inside nnx.jit, where the model is merged by hand inside jax.grad.
  with pytest.raises(ValueError, match="does not carry the stream's state back out"):
    nnx.jit(lambda m: jax.grad(lambda p: _loss(nnx.merge(graphdef, p, nnx.state(
        m, nnx.RngState), copy=True)))(nnx.state(m, nnx.Param)))(model)
  # A scope entered outside the jitted step: its key would be compiled in as a constant.
  grads = jax.jit(lambda params, rest: jax.grad(
      lambda p: _loss(nnx.merge(graphdef, p, rest)))(params))
  with fb.nnx.step_keys(jax.random.key(0)):
    with pytest.raises(ValueError, match=r"concrete array while the call is traced.*"
                       r"reuses it.*as an argument"):
      grads(params, rest)
  # Forward passes need no fresh sketch: evaluation in a plain jitted merge still works.
  evaluate = jax.jit(lambda params, rest: _loss(nnx.merge(graphdef, params, rest)))
  assert float(evaluate(params, rest)) == pytest.approx(float(_loss(model)), rel=1e-6)
  # A scope salts each layer's key with its own stream: a layer without one is refused.
  bare = fb.nnx.RandomizedLinear(6, 3, rngs=nnx.Rngs(params=0))
  with fb.nnx.step_keys(jax.random.key(0)):
    with pytest.raises(ValueError, match=r"inside fb.nnx.step_keys but has no 'sketch' rng "
                       r"stream.*rngs=nnx.Rngs\(params=0, sketch=1\).*rngs=key"):
      bare(X)


# --------------------------------------------------------------------------
# linen: parameters passed explicitly, the sketch rng passed to apply.


class _LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return fb.RandomizedDense(6, proj_dim_ratio=0.5)(x), None


def test_linen_functional_loop_takes_a_key_per_step():
  model = fb.RandomizedDense(3, proj_dim_ratio=0.5)
  params = model.init(jax.random.key(0), X)["params"]
  tx = optax.sgd(0.05)

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(params):
      y = model.apply({"params": params}, X, rngs={"sketch": key})
      return jnp.mean((y - Y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = tx.init(params)
  _, _, _, g0 = step(params, opt_state, jax.random.key(0))
  _, _, _, g1 = step(params, opt_state, jax.random.key(1))
  _, _, _, again = step(params, opt_state, jax.random.key(0))
  assert not np.allclose(g0["kernel"], g1["kernel"])  # a new key: a new sketch
  np.testing.assert_array_equal(g0["kernel"], again["kernel"])  # one key reused: one sketch
  losses = []
  for t in range(30):
    params, opt_state, loss, _ = step(params, opt_state, jax.random.fold_in(jax.random.key(1), t))
    losses.append(float(loss))
  assert losses[-1] < losses[0]


@pytest.mark.parametrize("lift", ["scan", "vmap"])
def test_linen_lifted_transform_names_split_rngs(lift):
  if lift == "scan":
    make = lambda split: nn.scan(_LinenBlock, variable_axes={"params": 0}, split_rngs=split,
                                 length=3)()
    x = X
  else:
    make = lambda split: nn.vmap(_LinenBlock, variable_axes={"params": 0}, split_rngs=split,
                                 in_axes=(0, None), axis_size=3)()
    x = jnp.broadcast_to(X, (3, *X.shape))
  model = make({"params": True})
  variables = model.init(jax.random.key(0), x, None)
  with pytest.raises(ValueError, match=r"model.apply was given a 'sketch' rng, but a lifted "
                     r"transform .* split_rngs=\{'params': True, 'sketch': True\}"):
    model.apply(variables, x, None, rngs={"sketch": jax.random.key(1)})
  with pytest.raises(ValueError, match="and none was given. Pass a fresh key each step"):
    model.apply(variables, x, None)
  # Split as the error says, each layer draws its own key.
  split = make({"params": True, "sketch": True})
  out = split.apply(variables, x, None, rngs={"sketch": jax.random.key(1)})
  assert out[0].shape == x.shape[:-1] + (6,)


# --------------------------------------------------------------------------
# Remat'ed and scanned blocks, and dropout, in the functional loop.


class _Block(nnx.Module):
  def __init__(self, rngs, drop=0.0):
    self.up = fb.nnx.RandomizedLinear(6, 16, proj_dim_ratio=0.5, rngs=rngs)
    self.down = fb.nnx.RandomizedLinear(16, 6, proj_dim_ratio=0.5, rngs=rngs)
    self.drop = fb.nnx.Dropout(drop, rngs=rngs)

  def __call__(self, x):
    return x + self.drop(self.down(jax.nn.gelu(self.up(x))))


class _Blocks(nnx.Module):
  def __init__(self, remat=None, drop=0.0):
    self.blocks = nnx.List([_Block(nnx.Rngs(i, sketch=5 + i), drop) for i in range(2)])
    self.remat = remat

  def __call__(self, x):
    for block in self.blocks:
      if self.remat == "remat":
        x = nnx.remat(lambda b, x: b(x))(block, x)
      elif self.remat == "policy":
        x = nnx.remat(lambda b, x: b(x), policy=fb.checkpoint_policy())(block, x)
      else:
        x = block(x)
    return jnp.mean((x - 1.0) ** 2)


def _readme_step(model):
  """The README's functional step (no optimizer): loss and gradients for a step key."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, rest, key):
    def loss_fn(params):
      return nnx.merge(graphdef, params, rest)(X)
    with fb.nnx.step_keys(key):
      return jax.value_and_grad(loss_fn)(params)
  return lambda key: step(params, rest, key)


@pytest.mark.parametrize("remat", ["remat", "policy"])
def test_remat_blocks_in_the_functional_loop(remat):
  step, plain = _readme_step(_Blocks(remat)), _readme_step(_Blocks())
  previous = None
  for t in range(2):
    key = jax.random.fold_in(jax.random.key(0), t)
    (loss, grads), (plain_loss, plain_grads) = step(key), plain(key)
    assert float(loss) == pytest.approx(float(plain_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # remat changes nothing
    kernel = np.asarray(grads["blocks"][0]["up"]["kernel"][...])
    if previous is not None:
      assert not np.allclose(kernel, previous)  # a new sketch every step
    previous = kernel


def test_dropout_draws_a_new_mask_every_step_from_step_keys():
  model = _Blocks("remat", drop=0.5)
  step = _readme_step(model)
  losses = [float(step(jax.random.key(k))[0]) for k in (0, 1, 0)]
  assert losses[0] != losses[1] and losses[0] == losses[2]  # the key makes the mask
  assert all(int(c[...]) == 0 for _, c in nnx.to_flat_state(nnx.state(model, nnx.RngCount)))
  # Each layer its own mask: two dropouts on the same input in one scope differ.
  a, b = (fb.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=s)) for s in (0, 1))
  with fb.nnx.step_keys(jax.random.key(3)):
    ya, yb, ya2 = a(jnp.ones(64)), b(jnp.ones(64)), a(jnp.ones(64))
  assert not np.array_equal(ya, yb) and not np.array_equal(ya, ya2)


def test_dropout_refuses_a_frozen_mask():
  model = _Blocks(drop=0.5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  no_scope = jax.jit(lambda params, rest: nnx.merge(graphdef, params, rest, copy=True)(X))
  with pytest.raises(ValueError, match=r"Dropout draws its dropout mask key.*same dropout "
                     r"mask.*fb\.nnx\.step_keys\(key\)"):
    no_scope(params, rest)
  # nnx.jit carries the stream, as flax's: a new mask every step, no scope needed.
  step = nnx.jit(lambda m: m(X))
  assert float(step(model)) != float(step(model))


def test_converted_dropout_takes_the_scope_key():
  # flax's nnx.Dropout cannot see the scope: convert_lean turns it into one that does.
  seq = nnx.Sequential(nnx.Linear(6, 6, rngs=nnx.Rngs(0)),
                       nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1)))
  model = fb.nnx.map_module(seq, lambda m, path: fb.nnx.convert_lean(m))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, rest, key):
    with fb.nnx.step_keys(key):
      return jnp.sum(nnx.merge(graphdef, params, rest)(X))
  y0, y1, again = (float(step(params, rest, jax.random.key(k))) for k in (0, 1, 0))
  assert y0 != y1 and y0 == again
