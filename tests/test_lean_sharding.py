"""The lean norms and dropout on 8 simulated CPU devices: the input's sharding kept, no collective added.

Data-parallel (batch over 8 devices), hidden-sharded (the normalised axis
over 8) and both (4 x 2), under ``AxisType.Auto`` and ``AxisType.Explicit``
meshes: the output and the gradient of `fb.layer_norm`, `fb.rms_norm` (its
per-row statistics included) and `dropout` (linen's mask and nnx's, drawn with
the input's sharding) against one device, the output's sharding against the
input's, and the collectives of the compiled vjp against flax's (a hidden-
sharded norm needs the all-reduces of its statistics, flax's as much).
The device count is fixed when JAX starts, so all cases run in one subprocess.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ["Auto", "Explicit"]
LAYOUTS = ["dp", "tp", "dp+tp"]
OPS = ["layer_norm", "rms_norm", "dropout_linen", "dropout_nnx"]
CASES = [f"{m}-{l}-{o}" for m in MESHES for l in LAYOUTS for o in OPS]

_SCRIPT = textwrap.dedent(r"""
  import json, sys
  import flax.linen as nn
  from flax import nnx
  import jax, jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import fewbit_jax as fb

  assert jax.device_count() == 8, jax.devices()
  x = jax.random.normal(jax.random.key(0), (16, 8, 64)) * 2 + 0.5
  ct = jax.random.normal(jax.random.key(1), x.shape)
  scale = 1 + jax.random.normal(jax.random.key(2), (64,)) / 4
  bias = jax.random.normal(jax.random.key(3), (64,)) / 4
  key = jax.random.key(4)
  v = {"params": {"scale": scale, "bias": bias}}

  def ops():
    # name -> (lean, flax): (x, scale, bias) -> y
    return {
        "layer_norm": (lambda x, s, b: fb.layer_norm(x, s, b),
                       lambda x, s, b: nn.LayerNorm().apply({"params": {"scale": s, "bias": b}}, x)),
        "rms_norm": (lambda x, s, b: fb.rms_norm(x, s) + b,
                     lambda x, s, b: nn.RMSNorm().apply({"params": {"scale": s}}, x) + b),
        # flax's reference for both: nnx.Dropout (linen's draws a replicated
        # mask, which an Explicit mesh refuses to select with a sharded input).
        "dropout_linen": (lambda x, s, b: fb.Dropout(0.3, deterministic=False).apply(
                              {}, x * s, rng=key) + b,
                          lambda x, s, b: nnx.Dropout(0.3)(x * s, rngs=key) + b),
        "dropout_nnx": (lambda x, s, b: fb.nnx.Dropout(0.3)(x * s, rngs=key) + b,
                        lambda x, s, b: nnx.Dropout(0.3)(x * s, rngs=key) + b),
    }

  def vjp(f):
    def run(x, s, b, ct):
      y, back = jax.vjp(f, x, s, b)
      return (y,) + back(ct)
    return jax.jit(run)

  def rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())

  results = {}
  one = {name: vjp(f[0])(x, scale, bias, ct) for name, f in ops().items()}
  for case in json.loads(sys.argv[1]):
    mesh_name, layout, name = case.split("-")
    r = results[case] = {}
    try:
      dp, tp = {"dp": (8, 1), "tp": (1, 8), "dp+tp": (4, 2)}[layout]
      axis_type = getattr(AxisType, mesh_name)
      mesh = jax.make_mesh((dp, tp), ("data", "model"), axis_types=(axis_type, axis_type))
      spec = P("data" if dp > 1 else None, None, "model" if tp > 1 else None)
      lean, theirs = ops()[name]
      with jax.set_mesh(mesh):
        xs, cs = (jax.device_put(a, NamedSharding(mesh, spec)) for a in (x, ct))
        fl = vjp(lean).lower(xs, scale, bias, cs).compile()
        ft = vjp(theirs).lower(xs, scale, bias, cs).compile()
        out = fl(xs, scale, bias, cs)
        ref = ft(xs, scale, bias, cs)
      r["err"] = max(rel(a, b) for a, b in zip(out, one[name]))
      r["flax_err"] = max(rel(a, b) for a, b in zip(out, ref))
      r["bitwise_flax"] = bool(jnp.all(out[0] == ref[0]))
      r["spec"] = [str(out[0].sharding.spec), str(out[1].sharding.spec),
                   str(NamedSharding(mesh, spec).spec)]
      r["same_sharding"] = out[0].sharding.is_equivalent_to(xs.sharding, 3) and \
          out[1].sharding.is_equivalent_to(xs.sharding, 3)
      r["collectives"] = {"lean": fb.memory.collectives(fl),
                          "flax": fb.memory.collectives(ft)}
    except Exception as e:
      import traceback
      r["error"] = traceback.format_exc()[-3000:]
  print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def results(on_8_devices):
  return on_8_devices(_SCRIPT, json.dumps(CASES))


@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_one_device_keeping_the_sharding(results, case):
  r = results[case]
  assert "error" not in r, r["error"]
  assert r["err"] < 1e-5, r
  assert r["flax_err"] < 1e-5, r
  assert r["bitwise_flax"] or "-tp" in case or "dp+tp" in case, r  # reductions split: rounding
  assert r["same_sharding"], r["spec"]
  # No more communication than flax's: the bytes of all collectives together
  # (XLA may split the same all-reduced bytes into one more op: a hidden-
  # sharded norm's statistics and its backward's sums; under an Explicit mesh
  # flax's vjp all-gathers the input, the lean one does not).
  lean, theirs = (sum(b for _, b in r["collectives"][k].values()) for k in ("lean", "flax"))
  assert lean <= theirs, r["collectives"]
  for op in ("all-gather", "all-to-all", "collective-permute"):
    assert r["collectives"]["lean"][op][1] <= r["collectives"]["flax"][op][1], r["collectives"]
  # Data parallel, the only collective is the all-reduce of the parameters'
  # gradients (scale and bias, summed over the batch shards).
  if case.split("-")[1] == "dp":
    assert all(n == 0 for op, (n, _) in r["collectives"]["lean"].items()
               if op != "all-reduce"), r["collectives"]
