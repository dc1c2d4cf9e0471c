"""Randomized layers with no option set, on every kind of mesh: less memory, no extra collective.

A mesh built as flax's examples build it, ``jax.sharding.Mesh(devices,
names)``, has ``AxisType.Auto`` axes, whose types do not say how an array is
sharded; ``jax.make_mesh`` builds Explicit ones unless told otherwise. For
each construction, with and without ``jax.set_mesh``, a 2-block pre-LN MLP
(randomized dense layers at the default options, 3-bit GELU) takes a
batch-sharded SGD step on 8 simulated CPU devices, beside the same model
with flax's layers. The few-bit step must keep less per device (compiled
temp bytes) and hold no collective beyond vanilla's (count and bytes of
each kind), and its loss must be vanilla's. All of it runs in one child
process (the device count is fixed when JAX starts).
"""

from __future__ import annotations

import textwrap

import pytest

_SCRIPT = textwrap.dedent(r"""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  import flax.linen as nn
  from flax import nnx
  from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
  import fewbit_jax as fb
  from benchmarks.bench_sharding import collectives

  assert jax.device_count() == 8, jax.devices()
  D, F = int(sys.argv[1]), 4 * int(sys.argv[1])
  X = jax.random.normal(jax.random.key(1), (int(sys.argv[2]), int(sys.argv[3]), D))

  class Block(nn.Module):
    fewbit: bool

    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm()(x)
      if self.fewbit:  # the same names: the same parameters
        up, down = (fb.RandomizedDense(n, proj_dim_ratio=0.2, name=m)
                    for n, m in ((F, "up"), (D, "down")))
        return x + down(fb.gelu(up(h), bits=3))
      up, down = nn.Dense(F, name="up"), nn.Dense(D, name="down")
      return x + down(jax.nn.gelu(up(h)))

  class MLP(nn.Module):
    fewbit: bool

    @nn.compact
    def __call__(self, x):
      return Block(self.fewbit)(Block(self.fewbit)(x))

  def linen_step(fewbit, mesh):
    model = MLP(fewbit)
    params = jax.device_put(model.init(jax.random.key(0), X[:1])["params"],
                            NamedSharding(mesh, P()))
    def loss(p, x, key):
      return jnp.mean(model.apply({"params": p}, x, rngs={"sketch": key}) ** 2)
    def step(p, x, key):
      l, g = jax.value_and_grad(loss)(p, x, key)
      return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), l
    return step, (params,)

  class NnxMLP(nnx.Module):
    def __init__(self, fewbit, rngs):
      lin = (lambda i, o: fb.nnx.RandomizedLinear(i, o, rngs=rngs)) if fewbit else (
          lambda i, o: nnx.Linear(i, o, rngs=rngs))
      self.norms = nnx.List([nnx.LayerNorm(D, rngs=rngs) for _ in range(2)])
      self.ups = nnx.List([lin(D, F) for _ in range(2)])
      self.downs = nnx.List([lin(F, D) for _ in range(2)])
      self.act = (lambda h: fb.gelu(h, bits=3)) if fewbit else jax.nn.gelu

    def __call__(self, x):
      for norm, up, down in zip(self.norms, self.ups, self.downs):
        x = x + down(self.act(up(norm(x))))
      return x

  def nnx_step(fewbit, mesh):
    model = NnxMLP(fewbit, nnx.Rngs(0, sketch=1))  # the sketch streams apart: the same params
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    def step(params, rest, x, key):
      def loss(p):
        return jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)
      with fb.nnx.step_keys(key):
        l, g = jax.value_and_grad(loss)(params)
      return jax.tree.map(lambda a, b: a - 0.1 * b, params, g), l
    return step, (params, rest)

  def measure(make, fewbit, mesh, set_mesh):
    step, args = make(fewbit, mesh)
    x = jax.device_put(X, NamedSharding(mesh, P("data")))
    key = jax.random.key(2)
    def compile_and_run():
      c = jax.jit(step).lower(*args, x, key).compile()
      return c, float(c(*args, x, key)[1])
    if set_mesh:
      with jax.set_mesh(mesh):
        c, loss = compile_and_run()
    else:
      c, loss = compile_and_run()
    return dict(temp=c.memory_analysis().temp_size_in_bytes,
                collectives=collectives(c.as_text()), loss=loss)

  devices = np.array(jax.devices())
  meshes = {
      "Mesh(devices, names)": lambda: Mesh(devices, ("data",)),
      "jax.make_mesh": lambda: jax.make_mesh((8,), ("data",)),
      "jax.make_mesh Auto": lambda: jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)),
      "Mesh 4x2 Auto": lambda: Mesh(devices.reshape(4, 2), ("data", "model")),
  }
  cases = [("linen", name, set_mesh) for name in meshes for set_mesh in (False, True)]
  cases += [("nnx", "Mesh(devices, names)", False), ("nnx", "jax.make_mesh Auto", True),
            ("nnx", "jax.make_mesh", False)]
  out = {}
  for model, name, set_mesh in cases:
    make = {"linen": linen_step, "nnx": nnx_step}[model]
    mesh = meshes[name]()
    out[f"{model} {name} {'set_mesh' if set_mesh else 'no context'}"] = dict(
        axis_types=str(mesh.axis_types), vanilla=measure(make, False, mesh, set_mesh),
        fewbit=measure(make, True, mesh, set_mesh))
  print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def results(on_8_devices):
  return on_8_devices(_SCRIPT, *SIZES, timeout=600)


SIZES = ("64", "32", "64")  # D, batch, sequence (F = 4 D)
CASES = [f"linen {n} {c}"
         for n in ("Mesh(devices, names)", "jax.make_mesh", "jax.make_mesh Auto", "Mesh 4x2 Auto")
         for c in ("no context", "set_mesh")]
CASES += ["nnx Mesh(devices, names) no context", "nnx jax.make_mesh Auto set_mesh",
          "nnx jax.make_mesh no context"]


@pytest.mark.parametrize("case", CASES)
def test_default_layers_save_memory_and_add_no_collective(results, case):
  r = results[case]
  v, f = r["vanilla"], r["fewbit"]
  assert f["loss"] == pytest.approx(v["loss"], rel=1e-5)  # the forward is the plain layers'
  for op, (n, nbytes) in f["collectives"].items():
    vn, vbytes = v["collectives"][op]
    assert n <= vn and nbytes <= vbytes, (op, r)
  assert v["collectives"]["all-reduce"][0] >= 1  # the gradient all-reduce is counted
  # The activations of a 20% sketch and 3-bit codes: well below vanilla's.
  assert f["temp"] < 0.8 * v["temp"], r


@pytest.mark.parametrize("model", ["linen", "nnx"])
def test_an_auto_mesh_saves_what_an_explicit_one_saves(results, model):
  # The Explicit mesh's blocks come from the input's type; the Auto mesh's
  # default blocks must do as well without it.
  explicit = results[f"{model} jax.make_mesh no context"]
  assert explicit["axis_types"] == "(Explicit,)"  # jax.make_mesh's default
  autos = [r for case, r in results.items()
           if case.startswith(model) and r["axis_types"] == "(Auto,)"]
  assert len(autos) >= 2
  for auto in autos:
    assert auto["fewbit"]["temp"] <= 1.05 * explicit["fewbit"]["temp"], (auto, explicit)
