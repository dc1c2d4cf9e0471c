"""fb.gated and the GatedMLP modules against the MLP as flax users write it."""

from __future__ import annotations

import functools
import importlib
import json
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fewbit_jax as fb
from fewbit_jax import memory

G = importlib.import_module("fewbit_jax.gated")  # the module (fb.gated is the function)

REF = {
    "gelu": jax.nn.gelu,
    "gelu_erf": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}
FEW = {"gelu": 3, "gelu_erf": 3, "silu": 3, "relu": 1}


def _data(dtype=jnp.float32, shape=(4, 8, 64)):
  k = jax.random.split(jax.random.key(0), 3)
  gate = (jax.random.normal(k[0], shape) * 2).astype(dtype)
  up = jax.random.normal(k[1], shape).astype(dtype)
  ct = jax.random.normal(k[2], shape).astype(dtype)
  return gate, up, ct


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("act", list(REF))
def test_exact_mode_equals_jax(act, dtype):
  gate, up, ct = _data(jnp.dtype(dtype))
  out = fb.gated(gate, up, act)
  assert out.dtype == gate.dtype
  assert bool(jnp.all(out == REF[act](gate) * up))  # the same operations: bitwise
  f = lambda g, u: (fb.gated(g, u, act) * ct).sum()
  r = lambda g, u: (REF[act](g) * u * ct).sum()
  got, ref = jax.grad(f, (0, 1))(gate, up), jax.grad(r, (0, 1))(gate, up)
  for a, b in zip(got, ref):
    assert a.dtype == b.dtype
    assert _rel(a, b) < (1e-6 if dtype == "float32" else 5e-2)
  if dtype == "bfloat16":  # the backward in float32: no further from float32 math than jax's
    f32 = [a.astype(jnp.float32) for a in (gate, up, ct)]
    exact = jax.grad(lambda g, u: (REF[act](g) * u * f32[2]).sum(), (0, 1))(*f32[:2])
    for a, b, e in zip(got, ref, exact):
      assert _rel(a, e) <= _rel(b, e) + 4e-3


@pytest.mark.parametrize("act", list(REF))
def test_few_bit_mode_is_the_few_bit_activation_times_up(act):
  """d up is exact; d gate is the few-bit activation's backward times up."""
  gate, up, ct = _data()
  bits = FEW[act]
  out = fb.gated(gate, up, act, bits=bits)
  assert bool(jnp.all(out == REF[act](gate) * up))
  dg, du = jax.grad(lambda g, u: (fb.gated(g, u, act, bits=bits) * ct).sum(), (0, 1))(gate, up)
  name = "gelu" if act.startswith("gelu") else act
  kw = {"approximate": act != "gelu_erf"} if name == "gelu" else {}
  fewbit_act = functools.partial(getattr(fb, name), bits=bits, **kw)
  want_dg = jax.grad(lambda g: (fewbit_act(g) * jax.lax.stop_gradient(up) * ct).sum())(gate)
  assert _rel(dg, want_dg) < 1e-6
  assert _rel(du, REF[act](gate) * ct) < 1e-6
  exact_dg = jax.grad(lambda g: (REF[act](g) * up * ct).sum())(gate)
  assert _rel(dg, exact_dg) < (1e-7 if act == "relu" else 0.15)  # relu's 1 bit is exact


def test_few_bit_up_gradient_where_up_is_zero():
  gate, up, ct = _data()
  up = up.at[0].set(0.0)
  gate = gate.at[0, 0].set(0.0)  # x = 0 rows: gate and up both 0
  du = jax.grad(lambda u: (fb.gated(gate, u, "silu", bits=3) * ct).sum())(up)
  assert bool(jnp.all(jnp.isfinite(du)))
  assert bool(jnp.all(du[0, 0] == 0))
  assert _rel(du[1:], (jax.nn.silu(gate) * ct)[1:]) < 1e-6


def test_bfloat16_few_bit():
  gate, up, ct = _data(jnp.bfloat16)
  dg, du = jax.grad(lambda g, u: (fb.gated(g, u, "gelu", bits=3) * ct).sum(), (0, 1))(gate, up)
  assert dg.dtype == du.dtype == jnp.bfloat16
  assert _rel(du, jax.nn.gelu(gate) * ct) < 2e-2


@pytest.mark.parametrize("bits", [None, 3])
def test_what_the_backward_keeps(bits):
  gate, up, _ = _data()
  w = jnp.ones((64, 16))  # a down projection after it, which keeps its input, the output
  res = memory.saved_residuals(lambda g, u, w: (fb.gated(g, u, "gelu", bits=bits) @ w).sum(),
                               gate, up, w)
  src = res.by_source()
  name = lambda n: f"named '{n}'"
  if bits is None:  # gate and up, and the down projection's input
    assert src[name(G.GATE_NAME)] == gate.nbytes
    assert res.saved_bytes == 3 * gate.nbytes, res
  else:  # codes, up and the output, the same array as the down projection's input
    assert name(G.GATE_NAME) not in src
    assert src[name(G.CODES_NAME)] <= gate.size * 3 // 8 + 4 * 64
    assert res.saved_bytes <= 2 * gate.nbytes + gate.size * 3 // 8 + 4 * 64, res
  assert src[name(G.UP_NAME)] == up.nbytes


def test_jit_vmap_scan_checkpoint():
  gate, up, ct = _data()
  f = lambda g, u: fb.gated(g, u, "silu")
  want = jax.nn.silu(gate) * up
  assert bool(jnp.all(jax.jit(f)(gate, up) == want))
  assert _rel(jax.vmap(f)(gate, up), want) < 1e-7
  assert _rel(jax.vmap(lambda g, u: fb.gated(g, u, "gelu", bits=3))(gate, up),
              jax.nn.gelu(gate) * up) < 1e-7
  _, ys = jax.lax.scan(lambda c, gu: (c, f(*gu)), 0.0, (gate, up))
  assert _rel(ys, want) < 1e-7
  for bits in (None, 3):
    loss = lambda g, u: (fb.gated(g, u, "silu", bits=bits) * ct).sum()
    a = jax.grad(jax.checkpoint(loss), (0, 1))(gate, up)
    b = jax.grad(loss, (0, 1))(gate, up)
    assert all(_rel(x, y) < 1e-6 for x, y in zip(a, b))
    s = jax.grad(lambda g, u: jax.lax.scan(
        lambda c, gu: (c + (fb.gated(*gu, "silu", bits=bits) * 2).sum(), None), 0.0,
        (g, u))[0], (0, 1))(gate, up)
    t = jax.grad(lambda g, u: (fb.gated(g, u, "silu", bits=bits) * 2).sum(), (0, 1))(gate, up)
    assert all(_rel(x, y) < 1e-6 for x, y in zip(s, t))


def test_grad_of_grad_exact_and_refused_few_bit():
  gate, up, ct = _data()
  for act in ("gelu", "silu"):
    f = lambda g: (fb.gated(g, up, act) * ct).sum()
    r = lambda g: (REF[act](g) * up * ct).sum()
    hv = jax.grad(lambda g: (jax.grad(f)(g) ** 2).sum())(gate)
    want = jax.grad(lambda g: (jax.grad(r)(g) ** 2).sum())(gate)
    assert _rel(hv, want) < 1e-5
  with pytest.raises(TypeError, match="exact mode"):
    jax.grad(lambda g: jax.grad(lambda g: (fb.gated(g, up, "gelu", bits=3) * ct).sum())(g)
             .sum())(gate)
  # relu: its 1-bit derivative is exact and its second derivative 0
  jax.grad(lambda g: jax.grad(lambda g: (fb.gated(g, up, "relu", bits=1) * ct).sum())(g)
           .sum())(gate)


def test_activation_spellings():
  gate, up, _ = _data()
  erf = jax.nn.gelu(gate, approximate=False) * up
  for a, kw in [("gelu_erf", {}), ("gelu", {"approximate": False}), (REF["gelu_erf"], {}),
                (jax.nn.gelu, {"approximate": False})]:
    assert bool(jnp.all(fb.gated(gate, up, a, **kw) == erf))
  assert bool(jnp.all(fb.gated(gate, up, nnx.gelu) == jax.nn.gelu(gate) * up))
  assert bool(jnp.all(fb.gated(gate, up, "swish") == jax.nn.silu(gate) * up))
  assert bool(jnp.all(fb.gated(gate, up, nn.relu) == jax.nn.relu(gate) * up))


def test_bad_inputs_say_what_to_do():
  gate, up, _ = _data()
  with pytest.raises(ValueError, match="same shape and dtype"):
    fb.gated(gate, up[..., :3])
  with pytest.raises(ValueError, match="same shape and dtype"):
    fb.gated(gate, up.astype(jnp.bfloat16))
  with pytest.raises(TypeError, match="floating point"):
    fb.gated(gate.astype(jnp.int32), up.astype(jnp.int32))
  with pytest.raises(ValueError, match="activation must be one of"):
    fb.gated(gate, up, "tanh")
  with pytest.raises(ValueError, match="not one of the gated"):
    fb.gated(gate, up, jnp.tanh)
  with pytest.raises(ValueError, match="bits must be 1"):
    fb.gated(gate, up, "relu", bits=2)
  with pytest.raises(ValueError, match="bits must be an int"):
    fb.gated(gate, up, "gelu", bits=9)
  with pytest.raises(ValueError, match="GELU option"):
    fb.gated(gate, up, "silu", approximate=True)
  with pytest.raises(ValueError, match="fixes approximate"):
    fb.gated(gate, up, "gelu_tanh", approximate=False)
  with pytest.raises(ValueError, match="randomized names"):
    fb.nnx.GatedMLP(8, 16, proj_dim_ratio=0.5, randomized=("q_proj",), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------
# The modules, against the MLP written the flax way.


class FlaxMLP(nn.Module):
  hidden: int
  act: object = nn.gelu

  @nn.compact
  def __call__(self, x):
    gate = nn.Dense(self.hidden, use_bias=False, name="gate_proj")(x)
    up = nn.Dense(self.hidden, use_bias=False, name="up_proj")(x)
    return nn.Dense(x.shape[-1], use_bias=False, name="down_proj")(self.act(gate) * up)


class NnxMLP(nnx.Module):
  def __init__(self, d, h, rngs, act=nnx.gelu):
    self.act = act
    self.gate_proj = nnx.Linear(d, h, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(d, h, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(h, d, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("act", ["gelu"])
def test_linen_drop_in(act):
  x = jax.random.normal(jax.random.key(1), (2, 16, 32))
  ref = FlaxMLP(128, getattr(nn, act))
  params = ref.init(jax.random.key(0), x)
  mlp = fb.linen.GatedMLP(128, activation=act)
  mine = mlp.init(jax.random.key(0), x)
  assert jax.tree.structure(mine) == jax.tree.structure(params)
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(params)))
  assert bool(jnp.all(mlp.apply(params, x) == ref.apply(params, x)))
  loss = lambda m: lambda p, x: (m.apply(p, x, rngs={"sketch": jax.random.key(2)}) ** 2).sum()
  ga, gb = jax.grad(loss(mlp), (0, 1))(params, x), jax.grad(loss(ref), (0, 1))(params, x)
  assert all(_rel(a, b) < 1e-5 for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
  # Randomized projections: same parameters and forward, gradients of the right shape.
  rnd = fb.linen.GatedMLP(128, activation=act, proj_dim_ratio=0.5, bits=3)
  assert jax.tree.structure(rnd.init(jax.random.key(0), x)) == jax.tree.structure(params)
  assert _rel(rnd.apply(params, x, rngs={"sketch": jax.random.key(3)}), ref.apply(params, x)) \
      < 1e-6
  gr = jax.grad(loss(rnd))(params, x)
  assert jax.tree.structure(gr) == jax.tree.structure(params)
  det = jax.grad(lambda p: (rnd.apply(p, x, deterministic=True) ** 2).sum())(params)
  gdet = jax.grad(lambda p: (fb.linen.GatedMLP(128, activation=act, bits=3).apply(p, x) ** 2)
                  .sum())(params)
  assert all(_rel(a, b) < 1e-6 for a, b in zip(jax.tree.leaves(det), jax.tree.leaves(gdet)))


def test_nnx_drop_in():
  x = jax.random.normal(jax.random.key(1), (2, 16, 32))
  ref = NnxMLP(32, 128, nnx.Rngs(0))
  mlp = fb.nnx.GatedMLP(32, 128, activation=nnx.gelu, rngs=nnx.Rngs(0))
  sa, sb = nnx.state(mlp, nnx.Param), nnx.state(ref, nnx.Param)
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)))
  assert bool(jnp.all(mlp(x) == ref(x)))
  ga = nnx.grad(lambda m: (m(x) ** 2).sum())(mlp)
  gb = nnx.grad(lambda m: (m(x) ** 2).sum())(ref)
  assert all(_rel(a, b) < 1e-5 for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
  rnd = fb.nnx.GatedMLP(32, 128, proj_dim_ratio=0.5, bits=3, rngs=nnx.Rngs(0, sketch=1))
  assert isinstance(rnd.down_proj, fb.nnx.RandomizedLinear)
  sr = nnx.state(rnd, nnx.Param)
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(sr), jax.tree.leaves(sb)))
  assert _rel(rnd(x), ref(x)) < 1e-6
  g = nnx.grad(lambda m: (m(x) ** 2).sum())(rnd)
  assert g["gate_proj"]["kernel"].shape == (32, 128)
  one = fb.nnx.GatedMLP(32, 128, proj_dim_ratio=0.5, randomized=("down_proj",),
                        rngs=nnx.Rngs(0, sketch=1))
  assert isinstance(one.gate_proj, nnx.Linear) and isinstance(one.down_proj,
                                                              fb.nnx.RandomizedLinear)


def test_the_mlp_keeps_less_compiled():
  """XLA's temp bytes of the MLP's gradient: flax > exact > few-bit."""
  x = jax.random.normal(jax.random.key(1), (512, 64))
  ct = jax.random.normal(jax.random.key(2), (512, 64))

  def temp(model):
    params = model.init(jax.random.key(0), x)
    loss = lambda p, x: (model.apply(p, x) * ct).sum()
    return memory.compiled(jax.grad(loss, (0, 1)), params, x).temp

  row = 512 * 256 * 4  # one hidden-sized array
  flax_, exact, few = (temp(FlaxMLP(256)), temp(fb.linen.GatedMLP(256)),
                       temp(fb.linen.GatedMLP(256, bits=3)))
  assert exact <= flax_ - row, (flax_, exact, few)
  assert few <= exact - row // 2, (flax_, exact, few)


# --------------------------------------------------------------------------
# 8 simulated devices.

CASES = ["Auto-dp-bits", "Auto-tp-exact", "Auto-dp+tp-bits", "Explicit-dp-exact",
         "Explicit-tp-bits", "Explicit-dp+tp-exact", "Explicit-dp+tp-bits"]

_SCRIPT = textwrap.dedent(r"""
  import json, re, sys
  import jax, jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import fewbit_jax as fb

  assert jax.device_count() == 8
  gate = jax.random.normal(jax.random.key(0), (16, 8, 256)) * 2
  up = jax.random.normal(jax.random.key(1), gate.shape)
  ct = jax.random.normal(jax.random.key(2), gate.shape)

  def run(bits):
    def f(g, u, ct):
      y, back = jax.vjp(lambda g, u: fb.gated(g, u, "gelu", bits=bits), g, u)
      return (y,) + back(ct)
    return jax.jit(f)

  results = {}
  for case in json.loads(sys.argv[1]):
    r = results[case] = {}
    try:
      mt, layout, mode = case.split("-")
      bits = None if mode == "exact" else 3
      one = run(bits)(gate, up, ct)
      sizes = {"dp": (8, 1), "tp": (1, 8), "dp+tp": (4, 2)}[layout]
      mesh = jax.make_mesh(sizes, ("data", "model"), axis_types=(getattr(AxisType, mt),) * 2)
      spec = P("data" if sizes[0] > 1 else None, None, "model" if sizes[1] > 1 else None)
      with jax.set_mesh(mesh):
        args = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (gate, up, ct)]
        c = run(bits).lower(*args).compile()
        out = c(*args)
      r["err"] = max(float(jnp.abs(a - b).max()) for a, b in zip(out, one))
      r["same_sharding"] = all(o.sharding.is_equivalent_to(args[0].sharding, 3) for o in out)
      r["collectives"] = len(re.findall(r" (all-gather|all-reduce|all-to-all|collective-permute)"
                                        r"(-start)?\(", c.as_text()))
    except Exception:
      import traceback
      r["error"] = traceback.format_exc()[-3000:]
  print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def sharded(on_8_devices):
  return on_8_devices(_SCRIPT, json.dumps(CASES), timeout=600)


@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_one_device_with_no_collective(sharded, case):
  r = sharded[case]
  assert "error" not in r, r["error"]
  assert r["err"] < 1e-5, r
  assert r["same_sharding"], r
  assert r["collectives"] == 0, r
