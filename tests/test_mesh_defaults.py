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
process (the device count is fixed when JAX starts). The models and the
measurement are benchmarks/bench_mesh_defaults.py's (`fewbit_jax._models.mesh_mlp`),
at a smaller size.
"""

from __future__ import annotations

import textwrap

import pytest

_SCRIPT = textwrap.dedent(r"""
  import json, sys
  import jax
  from fewbit_jax._models import mesh_mlp as bm

  assert jax.device_count() == 8, jax.devices()
  d, batch, seq = (int(a) for a in sys.argv[1:4])
  x = jax.random.normal(jax.random.key(1), (batch, seq, d))
  meshes = bm.meshes()
  cases = [("linen", name, set_mesh) for name in meshes for set_mesh in (False, True)]
  cases += [("nnx", "Mesh(devices, names)", False), ("nnx", "jax.make_mesh Auto", True),
            ("nnx", "jax.make_mesh", False)]
  out = {}
  for model, name, set_mesh in cases:
    make = {"linen": bm.linen_step, "nnx": bm.nnx_step}[model]
    mesh = meshes[name]()
    out[f"{model} {name} {'set_mesh' if set_mesh else 'no context'}"] = dict(
        axis_types=str(mesh.axis_types), vanilla=bm.measure(make, False, mesh, set_mesh, x),
        fewbit=bm.measure(make, True, mesh, set_mesh, x))
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
