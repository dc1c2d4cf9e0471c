"""FFI calls under a batch-sharded jax.jit: no gather of the activations.

XLA cannot see into a custom call, so without partitioning rules it would
all-gather a sharded activation onto every device before the call. The
fewbit primitives are batch-partitionable (see fewbit_jax._ffi._prim); this test
compiles a forward/backward step on 8 CPU devices with the batch axis sharded
and checks the compiled HLO: the kernels run on per-device slices, and no
all-gather moves an array as large as a device's share of an activation.
A second test shards the hidden (last) axis as well: the code kernels run
on each device's 32-element words where its shards hold whole words, and
the results are typed with their operands' sharding and manual axes.
They run in subprocesses because the device count is fixed at JAX start-up.
"""

import textwrap

import pytest

from fewbit_jax import ext

pytestmark = pytest.mark.skipif(not ext.available(), reason="fewbit_jax._xla_ext not built")

_SCRIPT = textwrap.dedent(r"""
  import json, re
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from fewbit_jax import ext, _rng as rng
  from fewbit_jax._ffi import _sketch_op

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
    return _sketch_op._sketch_pure(x2d[None], jnp.stack([k0, k1])[None],
                                   jnp.zeros((1,), jnp.uint32), kind=kind, k=K)[0]

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


def test_batch_sharded_step_does_not_gather_activations(tmp_path, on_8_devices):
  out = on_8_devices(_SCRIPT, timeout=600, cwd=str(tmp_path))
  # Every kernel ran on per-device slices: x's shard is (64/8, 4, 96), seen
  # by the code kernels as 3 words of 32 (8, 4, 3, 32), its codes
  # (8, 4, 3 words, bits=3, 1); each device sketches its own 32 rows (one
  # group of the 8) into a (1, 16, 96) partial.
  res = out["results"]
  assert res == {"fewbit_quantize_pack": "u32[8,4,3,3,1]", "fewbit_unpack_scale": "f32[8,4,3,32]",
                 "fewbit_sketch_gaussian": "f32[1,16,96]",
                 "fewbit_sketch_countsketch": "f32[1,16,96]"}, res
  assert out["n_calls"] == {"fewbit_quantize_pack": 2, "fewbit_unpack_scale": 2,
                            "fewbit_sketch_gaussian": 1, "fewbit_sketch_countsketch": 1}, out
  # No all-gather of anything near an activation shard.
  assert all(n < out["local_activation"] // 4 for n in out["gathers"]), out
  # Same results as the unsharded pure-JAX step.
  assert out["exact"] == [True, True], out
  assert max(out["max_err"]) < 1e-5, out


_HIDDEN_SCRIPT = textwrap.dedent(r"""
  import json, re
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from fewbit_jax import ext

  assert jax.device_count() == 8, jax.devices()
  bits = 3
  borders = jnp.sort(jax.random.normal(jax.random.key(0), (2**bits - 1,)))
  levels = jnp.linspace(-0.5, 1.5, 2**bits)

  def step(x, g):
    packed = ext.quantize_pack(x, borders, bits)
    return (packed, ext.unpack_scale(packed, levels, g, bits),
            ext.pack((x > 0).astype(jnp.uint8), 1))

  def spec_of(a):
    s = jax.typeof(a).sharding.spec
    return [list(e) if isinstance(e, tuple) else e for e in s]

  out = {}
  for axis_type in ("Auto", "Explicit"):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(getattr(AxisType, axis_type),) * 2)
    # Hidden sizes whose halves are whole words (128, 256), and not (96, 40).
    for n in (128, 256, 96, 40):
      x = jax.random.normal(jax.random.key(n), (8, 4, n))
      g = jax.random.normal(jax.random.key(n + 1), x.shape)
      with ext.mode("jax"):
        ref = jax.jit(step)(x, g)
      r = out[f"{axis_type}-{n}"] = {}
      with jax.set_mesh(mesh), ext.mode("ffi"):
        xs, gs = (jax.device_put(a, NamedSharding(mesh, P("data", None, "model"))) for a in (x, g))
        compiled = jax.jit(step).lower(xs, gs).compile()
        res = compiled(xs, gs)
        if axis_type == "Explicit":
          r["specs"] = [spec_of(a) for a in jax.jit(step)(xs, gs)]
      hlo = compiled.as_text()
      r["gathers"] = len(re.findall(r" all-gather(-start)?\(", hlo))
      r["calls"] = sorted(set(re.findall(
          r"= (\w+\[[\d,]*\])\{[^}]*\} custom-call\([^)]*\), custom_call_target=\"fewbit_(\w+)\"",
          hlo)))
      r["exact"] = [bool(jnp.all(a == b)) for a, b in zip(res, ref)]

  # Inside a user's shard_map: results vary over the manual axes their
  # operands vary over, on both paths.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  x = jax.random.normal(jax.random.key(0), (16, 64))

  def body(x):
    packed = ext.quantize_pack(x, borders, bits)
    res = [packed, ext.unpack_scale(packed, levels, x, bits), ext.pack((x > 0).astype(jnp.uint8), 1)]
    f = ext.sketch_kernel("gaussian")
    if f is not None:
      res.append(f(x, jnp.uint32(1), jnp.uint32(2), 4))
    out["vma-" + ext.get_mode()] = [sorted(jax.typeof(a).manual_axis_type.varying) for a in res]
    return x

  for m in ("ffi", "jax"):
    with ext.mode(m):
      jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(x)
  print(json.dumps(out))
""")


def test_hidden_sharded_codes_stay_sharded(on_8_devices):
  # An activation sharded on its hidden axis: the code kernels run on each
  # device's words where the shards hold whole words (no all-gather), gather
  # where they cut words; the same codes either way, typed with the
  # activation's sharding under Explicit meshes and with its manual axes
  # inside shard_map.
  out = on_8_devices(_HIDDEN_SCRIPT, timeout=600, cwd=None)
  for axis_type in ("Auto", "Explicit"):
    for n in (128, 256, 96, 40):
      r = out[f"{axis_type}-{n}"]
      assert r["exact"] == [True, True, True], (axis_type, n, r)
      if n in (128, 256):
        w = n // 64  # each device's words
        assert r["gathers"] == 0, (axis_type, n, r)
        assert r["calls"] == [[f"f32[2,4,{w},32]", "unpack_scale"], [f"u32[2,4,{w},1,1]", "pack"],
                              [f"u32[2,4,{w},3,1]", "quantize_pack"]], (axis_type, n, r)
      else:
        assert r["gathers"] > 0, (axis_type, n, r)  # documented: shards that cut words
  for n, words in ((128, "model"), (256, "model"), (96, None), (40, None)):
    codes_spec = ["data", None, None, words]
    assert out[f"Explicit-{n}"]["specs"] == [codes_spec, ["data", None, "model"],
                                             codes_spec], n
  assert out["vma-ffi"] == [["data"]] * 4, out
  assert out["vma-jax"] == [["data"]] * 3, out


_SHAPES_SCRIPT = textwrap.dedent(r"""
  import json, re
  import jax, jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import fewbit_jax as fb

  assert jax.device_count() == 8, jax.devices()
  out = {}

  def step(f):
    def loss(x):
      return (f(x) * jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape))).sum()
    return jax.jit(jax.grad(loss))

  for axis_type in ("Auto", "Explicit"):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(getattr(AxisType, axis_type),))
    for shape in ((16, 100), (16, 32), (16, 16), (16, 33), (8, 1), (256,), (16, 64)):
      for name in ("gelu", "relu", "relu6"):
        f = getattr(fb, name)
        x = jax.random.normal(jax.random.key(len(shape) + shape[-1]), shape) * 4
        key = f"{axis_type}-{shape}-{name}"
        with fb.ext.mode("ffi"):
          ref = step(f)(x)  # one device
          try:
            with jax.set_mesh(mesh):
              xs = jax.device_put(x, NamedSharding(mesh, P("d")))
              compiled = step(f).lower(xs).compile()
              got = compiled(xs)
          except Exception as e:  # reported, so that every case is seen
            out[key] = str(e).splitlines()[0][:200]
            continue
        hlo = compiled.as_text()
        out[key] = {"equal": bool(jnp.all(got == ref)),
                    "gathers": len(re.findall(r" all-gather(-start)?\(", hlo)),
                    "calls": len(re.findall(r"custom_call_target=\"fewbit_", hlo))}
  print(json.dumps(out))
""")


def test_sharded_activation_every_last_axis(on_8_devices):
  # Issue 11, defect 1: the kernels' 1-D borders and levels were cut into
  # shards with the batch axes ("borders has 1 entries; expected 7") wherever
  # the kernel saw a single batch axis: a last axis that is not a multiple of
  # 32, exactly 32, or a 1-D input. Every shape now runs shard by shard, with
  # the gradient of one device bit for bit.
  out = on_8_devices(_SHAPES_SCRIPT, timeout=600, cwd=None)
  assert len(out) == 2 * 7 * 3, out
  for key, r in out.items():
    assert isinstance(r, dict), (key, r)
    assert r["equal"], (key, r)
    assert r["calls"] == 2 and r["gathers"] == 0, (key, r)
