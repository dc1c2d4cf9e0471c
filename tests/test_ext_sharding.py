"""FFI calls under a batch-sharded jax.jit: no gather of the activations.

XLA cannot see into a custom call, so without partitioning rules it would
all-gather a sharded activation onto every device before the call. The
fewbit primitives are batch-partitionable (see fewbit_jax.ext); this test
compiles a forward/backward step on 8 CPU devices with the batch axis sharded
and checks the compiled HLO: the kernels run on per-device slices, and no
all-gather moves an array as large as a device's share of an activation.
It runs in a subprocess because the device count is fixed at JAX start-up.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import fewbit_jax
from fewbit_jax import ext

pytestmark = pytest.mark.skipif(not ext.available(), reason="fewbit_jax._xla_ext not built")

_SCRIPT = textwrap.dedent(r"""
  import json, re
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from fewbit_jax import ext, rng

  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((8,), ("data",))
  B, S, N, K = 64, 4, 96, 16
  bits = 3
  borders = jnp.sort(jax.random.normal(jax.random.key(0), (2**bits - 1,)))
  levels = jnp.linspace(-0.5, 1.5, 2**bits)
  k0, k1 = rng.key_words(jax.random.key(1))

  @jax.custom_vjp
  def act(x):
    return jnp.tanh(x)

  def act_fwd(x):
    return jnp.tanh(x), ext.quantize_pack(x, borders, bits)

  def act_bwd(packed, g):
    return (ext.unpack_scale(packed, levels, g, bits),)

  act.defvjp(act_fwd, act_bwd)

  def step(x, w):
    # A few-bit activation's forward and backward, and a sketch of its input.
    loss = lambda x, w: (act(x @ w) ** 2).sum()
    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    packed = ext.quantize_pack(x, borders, bits)
    scaled = ext.unpack_scale(packed, levels, x, bits)
    return gx, gw, sketch("gaussian", x), sketch("countsketch", x), packed, scaled

  def sketch(kind, x):
    x2d = x.reshape(-1, N)
    f = ext.sketch_kernel(kind)
    if f is not None:
      return f(x2d, k0, k1, K)
    # Mode "jax": the definition, unsharded, as the reference.
    return ext._sketch_pure(x2d[None], jnp.stack([k0, k1])[None], jnp.zeros((1,), jnp.uint32),
                            kind=kind, k=K)[0]

  x = jax.random.normal(jax.random.key(2), (B, S, N))
  w = jax.random.normal(jax.random.key(3), (N, N)) / 10
  xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
  ws = jax.device_put(w, NamedSharding(mesh, P()))

  with ext.mode("ffi"):
    compiled = jax.jit(step).lower(xs, ws).compile()
    sharded = compiled(xs, ws)
  with ext.mode("jax"):
    ref = jax.jit(step)(x, w)
  hlo = compiled.as_text()

  gathers = []
  for m in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather\(", hlo):
    dims = [int(d) for d in m.group(1).split(",") if d]
    gathers.append(int(np.prod(dims)))
  ops = re.findall(r"= (\w+\[[\d,]*\])\{[^}]*\} custom-call\([^)]*\), "
                   r"custom_call_target=\"(fewbit_\w+)\"", hlo)
  results = {t: shape for shape, t in ops}
  n_calls = {t: sum(1 for _, u in ops if u == t) for t in results}
  print(json.dumps({
      "gathers": gathers,
      "results": results,
      "n_calls": n_calls,
      "local_activation": B * S * N // 8,
      # Matmuls of other sizes may round differently: relative errors.
      "max_err": [float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))
                  for a, b in zip(sharded[:4], ref[:4])],
      "exact": [bool(jnp.all(a == b)) for a, b in zip(sharded[4:], ref[4:])],
  }))
""")


def test_batch_sharded_step_does_not_gather_activations(tmp_path):
  env = dict(os.environ)
  # The child must import the fewbit_jax this process imported (the installed
  # one with its extension, not a source checkout that `-c` would put first).
  here = os.path.dirname(os.path.dirname(os.path.abspath(fewbit_jax.__file__)))
  env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # Every kernel ran on per-device slices: x's shard is (64/8, 4, 96), its
  # codes (8, 4, bits=3, 3 words); each device sketches its own 32 rows
  # (one group of the 8) into a (1, 16, 96) partial.
  res = out["results"]
  assert res == {"fewbit_quantize_pack": "u32[8,4,3,3]", "fewbit_unpack_scale": "f32[8,4,96]",
                 "fewbit_sketch_gaussian": "f32[1,16,96]",
                 "fewbit_sketch_countsketch": "f32[1,16,96]"}, res
  assert out["n_calls"] == {"fewbit_quantize_pack": 2, "fewbit_unpack_scale": 2,
                            "fewbit_sketch_gaussian": 1, "fewbit_sketch_countsketch": 1}, out
  # No all-gather of anything near an activation shard.
  assert all(n < out["local_activation"] // 4 for n in out["gathers"]), out
  # Same results as the unsharded pure-JAX step.
  assert out["exact"] == [True, True], out
  assert max(out["max_err"]) < 1e-5, out
