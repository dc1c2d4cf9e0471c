"""The 2-block pre-LN MLPs of the mesh-defaults measurement, linen and NNX.

x + down(gelu(up(LayerNorm(x)))) twice, F = 4 D, with flax's layers or the
randomized ones at their default options (``proj_dim_ratio=0.2`` and
nothing else; 3-bit GELU); each takes a plain SGD step on x sharded over the
batch, on meshes built as users build them (`meshes`). `measure` compiles
(and runs) one step: per-device temp bytes, collectives, loss.
``benchmarks/bench_mesh_defaults.py`` prints the table;
tests/test_mesh_defaults.py checks the same models on 8 devices.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import fewbit_jax as fb
import fewbit_jax.nnx  # noqa: F401
from fewbit_jax import memory
from fewbit_jax.memory import collectives


class Block(nn.Module):
  """x + down(gelu(up(LayerNorm(x)))), flax's layers or the randomized ones (same names)."""
  dim: int
  fewbit: bool

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    if self.fewbit:
      up, down = (fb.RandomizedDense(n, proj_dim_ratio=0.2, name=m)
                  for n, m in ((4 * self.dim, "up"), (self.dim, "down")))
      return x + down(fb.gelu(up(h), bits=3))
    up, down = nn.Dense(4 * self.dim, name="up"), nn.Dense(self.dim, name="down")
    return x + down(jax.nn.gelu(up(h)))


class MLP(nn.Module):
  """Two `Block`s."""
  dim: int
  fewbit: bool

  @nn.compact
  def __call__(self, x):
    return Block(self.dim, self.fewbit)(Block(self.dim, self.fewbit)(x))


def linen_step(fewbit: bool, mesh, x):
  """(step, args before x and key): the linen model's SGD step, params replicated on `mesh`."""
  model = MLP(x.shape[-1], fewbit)
  params = jax.device_put(model.init(jax.random.key(0), x[:1])["params"],
                          NamedSharding(mesh, P()))

  def loss(p, x, key):
    return jnp.mean(model.apply({"params": p}, x, rngs={"sketch": key}) ** 2)

  def step(p, x, key):
    l, g = jax.value_and_grad(loss)(p, x, key)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), l
  return step, (params,)


class NnxMLP(nnx.Module):
  """`MLP` in NNX: ``nnx.Linear`` or ``fb.nnx.RandomizedLinear`` layers."""

  def __init__(self, dim: int, fewbit: bool, rngs: nnx.Rngs):
    lin = fb.nnx.RandomizedLinear if fewbit else nnx.Linear
    self.norms = nnx.List([nnx.LayerNorm(dim, rngs=rngs) for _ in range(2)])
    self.ups = nnx.List([lin(dim, 4 * dim, rngs=rngs) for _ in range(2)])
    self.downs = nnx.List([lin(4 * dim, dim, rngs=rngs) for _ in range(2)])
    self.fewbit = fewbit

  def __call__(self, x):
    act = (lambda h: fb.gelu(h, bits=3)) if self.fewbit else jax.nn.gelu
    for norm, up, down in zip(self.norms, self.ups, self.downs):
      x = x + down(act(up(norm(x))))
    return x


def nnx_step(fewbit: bool, mesh, x):
  """The NNX model's SGD step in flax's functional loop (keys from ``fb.nnx.step_keys``)."""
  # A separate sketch stream: the parameters are nnx.Linear's draws.
  model = NnxMLP(x.shape[-1], fewbit, nnx.Rngs(0, sketch=1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, NamedSharding(mesh, P()))

  def step(params, rest, x, key):
    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)
    with fb.nnx.step_keys(key):
      l, g = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda a, b: a - 0.1 * b, params, g), l
  return step, (params, rest)


def meshes() -> dict:
  """Name -> a function that builds that mesh of 8 devices."""
  devices = np.array(jax.devices()[:8])
  return {
      "Mesh(devices, names)": lambda: Mesh(devices, ("data",)),
      "jax.make_mesh": lambda: jax.make_mesh((8,), ("data",)),
      "jax.make_mesh Auto": lambda: jax.make_mesh((8,), ("data",),
                                                  axis_types=(AxisType.Auto,)),
      "Mesh 4x2 Auto": lambda: Mesh(devices.reshape(4, 2), ("data", "model")),
  }


def measure(make, fewbit: bool, mesh, set_mesh: bool, x, run: bool = True) -> dict:
  """Compiles (and runs) one step: temp bytes per device, collectives, loss."""
  step, args = make(fewbit, mesh, x)
  x = jax.device_put(x, NamedSharding(mesh, P("data")))
  key = jax.random.key(2)

  def go():
    c = jax.jit(step).lower(*args, x, key).compile()
    return c, (float(c(*args, x, key)[1]) if run else None)
  if set_mesh:
    with jax.set_mesh(mesh):
      c, loss = go()
  else:
    c, loss = go()
  return dict(temp=memory.CompiledMemory.of(c).temp, collectives=collectives(c), loss=loss)
