"""Random draws inside rematerialised blocks run when their block does, not at the step's start.

On the CPU, threefry's lowering holds two uint32 arrays of the mask's size
while a draw runs, and XLA's scheduler starts every draw whose key is known
as early as it can: with each block rematerialised, the draws of all blocks
were held from the step's start, more than the blocks' activations (the
RoBERTa-base step of ``python -m benchmarks.frontier --model roberta --full
--no-run``, ``fb.linen.convert(exact=True, remat=True, policy=nothing)``:
5.16 GiB of temp memory, 4.5 GiB of it random bits; 2.34 GiB with the draws tied
to their block): ``fb.linen.convert``'s and ``fb.nnx.convert``'s
rematerialised blocks hand the draws inside them (the lean dropout's and the
model's own) keys tied to the block's input. The masks stay bitwise flax's.
"""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fewbit_jax as fb
from fewbit_jax import memory
from fewbit_jax._dropout import REDRAW_BLOCK

NOTHING = jax.checkpoint_policies.nothing_saveable
N, D, LAYERS = 512, 512, 4  # N * D > REDRAW_BLOCK: the lean dropout redraws


def _stack(drop, layers=LAYERS):
  def block(x, w, key):
    return drop(jnp.tanh(x @ w), key)

  def loss(ws, x, key):
    for i in range(layers):
      x = jax.checkpoint(block, policy=NOTHING)(x, ws[i], jax.random.fold_in(key, i))
    return (x ** 2).sum()
  return loss


def _lean(h, key):
  return fb.dropout(h, 0.1, key)


def _bernoulli(h, key):  # flax's nn.Dropout, written out
  return jnp.where(jax.random.bernoulli(key, 0.9, h.shape), h / 0.9, 0)


WS = jax.random.normal(jax.random.key(1), (LAYERS, D, D)) / np.sqrt(D)
X = jax.random.normal(jax.random.key(2), (N, D))
KEY = jax.random.key(3)


def test_sizes_exercise_the_redraw():
  assert N * D > REDRAW_BLOCK


def test_rematerialised_lean_dropout_is_flax_in_every_mode():
  # Under jax.checkpoint JAX differentiates the lean dropout's rule (not its
  # linearized one): gradient, jvp and vmap equal flax's mask's.
  ours, theirs = _stack(_lean), _stack(_bernoulli)
  for a, b in ((jax.grad(ours)(WS, X, KEY), jax.grad(theirs)(WS, X, KEY)),
               (jax.jvp(lambda x: ours(WS, x, KEY), (X,), (X[::-1],)),
                jax.jvp(lambda x: theirs(WS, x, KEY), (X,), (X[::-1],)))):
    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(u, w, rtol=2e-5, atol=1e-5)
  keys = jax.random.split(KEY, 2)
  np.testing.assert_allclose(jax.vmap(lambda k: ours(WS, X, k))(keys),
                             jax.vmap(lambda k: theirs(WS, X, k))(keys), rtol=2e-5)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(D, use_bias=False)(x))
    # the model's own draw, as RoBERTa's attention core draws its dropout
    keep = jax.random.bernoulli(self.make_rng("dropout"), 0.9, h.shape)
    return x + jnp.where(keep, h / 0.9, 0)


class _Model(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_Block, policy=NOTHING) if self.remat else _Block
    for i in range(LAYERS):
      x = block(name=f"block_{i}")(x)
    return (x ** 2).sum()


def test_converted_blocks_draw_after_their_input():
  params = _Model().init({"params": jax.random.key(0), "dropout": KEY}, X)["params"]

  def grad_of(model, context=None):
    def g(params, x, key):
      if context is None:
        return jax.grad(lambda p: model.apply({"params": p}, x, rngs={"dropout": key}))(params)
      with context():
        return jax.grad(lambda p: model.apply({"params": p}, x, rngs={"dropout": key}))(params)
    return g

  def converted():
    return fb.linen.convert(exact=True, remat=True, policy="nothing_saveable",
                            warn_unused=False)

  ours, plain, vanilla = (grad_of(_Model(), converted), grad_of(_Model(remat=True)),
                          grad_of(_Model()))
  # the same masks: gradients equal to the model without remat
  # (rounding apart: errors relative to each gradient's largest entry; a mask
  # drawn differently moves a tenth of the entries by their own size)
  for u, w in zip(jax.tree.leaves(jax.jit(ours)(params, X, KEY)),
                  jax.tree.leaves(jax.jit(vanilla)(params, X, KEY))):
    assert float(jnp.max(jnp.abs(u - w)) / jnp.max(jnp.abs(w))) < 1e-5
  temp = {name: memory.compiled(f, params, X, KEY, compiler_options=memory.KEEP_REMAT).temp
          for name, f in (("converted", ours), ("nn.remat", plain))}
  act = N * D * 4
  # Measured: converted 5.0 MiB, nn.remat (the draws of every block held from
  # the start) 7.0 MiB, 1 MiB activations.
  assert temp["converted"] <= temp["nn.remat"] - 2 * act, {k: v / act for k, v in temp.items()}
  # What the peak holds (fb.memory.peak_buffers): the bits of one draw in
  # flight (two uint32 arrays and copies), not those of every block.
  # Measured: converted 4.0 MiB of uint32 at the peak, nn.remat 10.0 MiB.
  bits = {name: sum(g.nbytes for g in memory.peak_buffers(
      f, params, X, KEY, compiler_options=memory.KEEP_REMAT, top=None)
      if g.kind.startswith("u32["))
      for name, f in (("converted", ours), ("nn.remat", plain))}
  assert bits["converted"] <= 4.5 * act < bits["nn.remat"], {k: v / act for k, v in bits.items()}


class _NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(D, D, use_bias=False, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x):
    h = jnp.tanh(self.dense(x))
    keep = jax.random.bernoulli(self.rngs.dropout(), 0.9, h.shape)  # the model's own draw
    return x + self.drop(jnp.where(keep, h / 0.9, 0))


class _NnxModel(nnx.Module):
  def __init__(self, remat=False):
    rngs = nnx.Rngs(params=0, dropout=3)
    self.blocks = nnx.List([_NnxBlock(rngs) for _ in range(LAYERS)])
    self.remat = remat

  def __call__(self, x):
    for block in self.blocks:
      x = nnx.remat(lambda b, x: b(x), policy=NOTHING)(block, x) if self.remat else block(x)
    return (x ** 2).sum()


def test_nnx_converted_blocks_draw_after_their_input():
  def grad_of(model):
    @nnx.jit
    def g(model, x):
      return nnx.grad(lambda m: m(x))(model)
    return g

  ours = fb.nnx.convert(_NnxModel(), exact=True, remat=True, policy="nothing_saveable")
  # the same masks (flax's dropout and the model's own draw): gradients equal
  # to the model without remat, rounding apart
  got, want = (jax.tree.leaves(nnx.to_pure_dict(grad_of(m)(m, X)))
               for m in (ours, _NnxModel()))
  for u, w in zip(got, want):
    assert float(jnp.max(jnp.abs(u - w)) / jnp.max(jnp.abs(w))) < 1e-5
  ours = fb.nnx.convert(_NnxModel(), exact=True, remat=True, policy="nothing_saveable")
  temp = {name: memory.compiled(grad_of(m), m, X, compiler_options=memory.KEEP_REMAT).temp
          for name, m in (("converted", ours), ("nnx.remat", _NnxModel(remat=True)))}
  act = N * D * 4
  # Measured: converted 7.0 MiB, nnx.remat 15.0 MiB (the draws of every
  # block, flax's dropout and the model's own, held from the start).
  assert temp["converted"] <= temp["nnx.remat"] - 2 * act, {k: v / act for k, v in temp.items()}


class _DropBlock(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(D, D, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)

  def __call__(self, x):
    return x + self.drop(jnp.tanh(self.dense(x)))


class _DropModel(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(params=0, dropout=1)  # one stream shared by the blocks
    self.blocks = nnx.List([_DropBlock(rngs) for _ in range(3)])

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return (x ** 2).sum()


def test_nnx_converted_remat_with_dropout_runs_in_the_functional_loop():
  # flax's functional loop (nnx.split outside the step, nnx.merge inside
  # jax.value_and_grad, keys from fb.nnx.step_keys): nnx.remat around a block
  # holding a dropout wrote its rng count back there, which NNX refuses
  # (TraceContextError: Cannot mutate RngCount from a different trace level).
  x = X[:32, :D]

  def losses(remat):
    model = fb.nnx.convert(_DropModel(), exact=True, remat=remat, policy="nothing_saveable")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, key):
      with fb.nnx.step_keys(key):
        return jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest)(x))(params)
    out = [step(params, rest, jax.random.key(k)) for k in (5, 6, 5)]
    return [float(loss) for loss, _ in out], out[0][1]

  (l0, l1, l2), g = losses(True)
  assert l0 == l2 != l1  # the step's key decides the masks
  want, g_want = losses(False)
  assert want == [l0, l1, l2]  # remat changes no mask
  for u, w in zip(jax.tree.leaves(nnx.to_pure_dict(g)), jax.tree.leaves(nnx.to_pure_dict(g_want))):
    assert float(jnp.max(jnp.abs(u - w)) / jnp.max(jnp.abs(w))) < 1e-5
