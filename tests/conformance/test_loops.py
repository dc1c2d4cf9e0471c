"""Conformance of the randomized layers and dropout in every Flax training-loop pattern.

Each NNX loop (``nnx.jit`` with ``nnx.value_and_grad``, the same inside
``fb.nnx.step_keys``, and flax's functional loop: ``nnx.merge`` inside
``jax.value_and_grad`` inside ``jax.jit``, keys from ``step_keys``) runs a
model whose blocks are called plainly, through ``nnx.remat`` (also with
``fb.checkpoint_policy()``), through ``nnx.scan`` over stacked blocks and
``nnx.scan`` of remat'ed blocks; linen runs ``apply`` with plain blocks,
``nn.remat``, ``nn.scan`` and ``nn.scan`` of ``nn.remat``. Each block has
two randomized dense layers and a dropout on a branch of its own (so that
the loss shows the mask and the kernel gradients only the sketches). For
every pattern: a new step key (or a new step of the stateful loop) gives a
new dropout mask and new sketches; the functional loop's repeated key gives
the same ones; and a remat'ed model gives the gradients of the same model
without remat under the same keys.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fewbit_jax as fb

D, H, BLOCKS = 6, 12, 2
X = jax.random.normal(jax.random.key(5), (16, D))
C = jax.random.normal(jax.random.key(6), (16, D))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.up = fb.nnx.RandomizedLinear(D, H, proj_dim_ratio=0.5, rngs=rngs)
    self.down = fb.nnx.RandomizedLinear(H, D, proj_dim_ratio=0.5, rngs=rngs)
    self.drop = fb.nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.tanh(self.up(x))), self.drop(X)


def _wrap(wrapper):
  call = lambda block, x: block(x)
  if wrapper == "remat":
    return nnx.remat(call)
  if wrapper == "remat_policy":
    return nnx.remat(call, policy=fb.checkpoint_policy())
  return call


class Listed(nnx.Module):
  def __init__(self, wrapper):
    self.blocks = nnx.List([Block(nnx.Rngs(i, sketch=10 + i, dropout=20 + i))
                            for i in range(BLOCKS)])
    self.wrapper = wrapper

  def __call__(self, x):
    drops = 0.0
    for block in self.blocks:
      x, d = _wrap(self.wrapper)(block, x)
      drops = drops + jnp.sum(d * C)
    return jnp.sum(x ** 2) + drops


class Scanned(nnx.Module):
  def __init__(self, wrapper):
    make = nnx.vmap(lambda key: Block(nnx.Rngs(0, sketch=key, dropout=jax.random.fold_in(
        key, 1))), in_axes=0, out_axes=0)
    self.blocks = make(jax.random.split(jax.random.key(4), BLOCKS))
    self.wrapper = wrapper

  def __call__(self, x):
    body = lambda x, block: _wrap(self.wrapper)(block, x)
    x, d = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x, self.blocks)
    return jnp.sum(x ** 2) + jnp.sum(d * C)


def _model(structure, wrapper):
  return (Listed if structure == "list" else Scanned)(wrapper)


def _loss(model):
  return model(X)


def _kernels(grads):
  return np.concatenate([np.ravel(np.asarray(v[...])) for p, v in
                         nnx.to_flat_state(grads) if p[-1] == "kernel"])


def _run(loop, model, keys):
  """(loss, kernel gradients) of one step per key (the stateful loops step the same model)."""
  out = []
  if loop == "functional":
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, key):
      with fb.nnx.step_keys(key):
        return jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p, rest)))(params)
    for key in keys:
      loss, grads = step(params, rest, key)
      out.append((float(loss), _kernels(grads)))
  elif loop == "nnx.jit":
    step = nnx.jit(lambda m: nnx.value_and_grad(_loss)(m))
    for _ in keys:
      loss, grads = step(model)
      out.append((float(loss), _kernels(grads)))
  else:  # nnx.jit, keys from a step_keys scope
    @nnx.jit
    def step(m, key):
      with fb.nnx.step_keys(key):
        return nnx.value_and_grad(_loss)(m)
    for key in keys:
      loss, grads = step(model, key)
      out.append((float(loss), _kernels(grads)))
  return out


LOOPS = ["nnx.jit", "nnx.jit+step_keys", "functional"]
STRUCTURES = [("list", "plain"), ("list", "remat"), ("list", "remat_policy"),
              ("scan", "plain"), ("scan", "remat")]
KEYS = [jax.random.key(0), jax.random.key(1), jax.random.key(0)]
# In the default run: both loops that differ in where keys come from, each
# with a remat'ed list (the policy's) and a scan of remat'ed blocks beside
# their plain twins; the rest is marked slow.
DEFAULT = {(loop, s) for loop in ("nnx.jit", "functional")
           for s in (("list", "plain"), ("list", "remat_policy"), ("scan", "plain"),
                     ("scan", "remat"))}
_CACHE: dict = {}


def _results(loop, structure):
  if (loop, structure) not in _CACHE:
    _CACHE[loop, structure] = _run(loop, _model(*structure), KEYS)
  return _CACHE[loop, structure]


def _cases(structures):
  return [pytest.param(loop, s, id=f"{loop}-{'-'.join(s)}",
                       marks=() if (loop, s) in DEFAULT else pytest.mark.slow)
          for loop in LOOPS for s in structures]


@pytest.mark.parametrize("loop, structure", _cases(STRUCTURES))
def test_nnx_new_masks_and_sketches_every_step(loop, structure):
  (l0, g0), (l1, g1), (l2, g2) = _results(loop, structure)
  assert l0 != l1  # a new dropout mask
  assert not np.allclose(g0, g1)  # new sketches
  if loop != "nnx.jit":  # the same step key: the same mask and sketches
    assert l2 == l0
    np.testing.assert_array_equal(g2, g0)
  else:  # the stateful loop's streams advance: every step new
    assert l2 != l0 and not np.allclose(g2, g0)


@pytest.mark.parametrize("loop, structure", _cases([s for s in STRUCTURES if s[1] != "plain"]))
def test_nnx_remat_gives_the_gradients_without_remat(loop, structure):
  plain = _results(loop, (structure[0], "plain"))
  for (l, g), (lp, gp) in zip(_results(loop, structure), plain):
    assert l == pytest.approx(lp, rel=1e-6)
    np.testing.assert_allclose(g, gp, rtol=1e-5, atol=1e-5)


def test_functional_loop_advances_no_stream():
  model = _model("scan", "remat")
  _run("functional", model, KEYS[:1])
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.RngCount)):
    assert not np.any(np.asarray(v[...])), path


# --- linen ----------------------------------------------------------------------------


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = fb.RandomizedDense(H, proj_dim_ratio=0.5)(x)
    y = x + fb.RandomizedDense(D, proj_dim_ratio=0.5)(jax.nn.tanh(h))
    return y, fb.Dropout(0.5, deterministic=False)(X)


def _linen_model(wrapper):
  if wrapper.startswith("scan"):
    block = nn.remat(LinenBlock) if wrapper == "scan_remat" else LinenBlock
    return nn.scan(block, variable_axes={"params": 0},
                   split_rngs={"params": True, "sketch": True, "dropout": True},
                   length=BLOCKS)()
  block = nn.remat(LinenBlock) if wrapper == "remat" else LinenBlock

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      ds = []
      for i in range(BLOCKS):
        x, d = block(name=f"block{i}")(x, None)
        ds.append(d)
      return x, jnp.stack(ds)
  return Stack()


_LINEN: dict = {}


def _linen_results(wrapper):
  if wrapper not in _LINEN:
    model = _linen_model(wrapper)
    params = model.init({"params": jax.random.key(0), "sketch": jax.random.key(1),
                         "dropout": jax.random.key(2)}, X, None)["params"]

    @jax.jit
    def step(params, key, model=model):
      def loss(p):
        x, d = model.apply({"params": p}, X, None, rngs={
            "sketch": key, "dropout": jax.random.fold_in(key, 1)})
        return jnp.sum(x ** 2) + jnp.sum(d * C)
      return jax.value_and_grad(loss)(params)
    runs = [step(params, key) for key in KEYS]
    _LINEN[wrapper] = [(float(l), np.concatenate([np.ravel(np.asarray(v)) for p, v in
                                                  jax.tree_util.tree_leaves_with_path(g)
                                                  if "kernel" in jax.tree_util.keystr(p)]))
                       for l, g in runs]
  return _LINEN[wrapper]


@pytest.mark.parametrize("wrapper", ["plain", "remat", pytest.param("scan", marks=pytest.mark.slow),
                                     "scan_remat"])
def test_linen_new_masks_and_sketches_every_step(wrapper):
  (l0, g0), (l1, g1), (l2, g2) = _linen_results(wrapper)
  assert l0 != l1 and not np.allclose(g0, g1)
  assert l2 == l0
  np.testing.assert_array_equal(g2, g0)


@pytest.mark.parametrize("wrapper, plain", [
    ("remat", "plain"), pytest.param("scan_remat", "scan", marks=pytest.mark.slow)])
def test_linen_remat_gives_the_gradients_without_remat(wrapper, plain):
  for (l, g), (lp, gp) in zip(_linen_results(wrapper), _linen_results(plain)):
    assert l == pytest.approx(lp, rel=1e-6)
    np.testing.assert_allclose(g, gp, rtol=1e-5, atol=1e-5)
