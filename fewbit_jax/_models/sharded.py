"""The sharded transformer stack: a functional model laid out on a ("data", "model") mesh.

A stack of pre-LayerNorm transformer blocks (causal attention, GELU MLP),
parameters as plain dicts, differentiated on up to 8 devices in the layouts
of `LAYOUTS` (one device; data parallel; Megatron tensor parallel; both)
under ``AxisType.Auto`` or ``AxisType.Explicit`` meshes. ``vanilla`` uses
``x @ W + b`` and ``jax.nn.gelu``; ``fewbit`` uses ``fewbit_jax.gelu`` and
``fewbit_jax.randomized_dense`` for every dense layer. `measure` compiles
(and runs) one layout's step and reads its per-device memory and
collectives. ``benchmarks/bench_sharding.py`` prints the table;
tests/test_sharding.py checks the same stack on 8 devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import fewbit_jax as fb
from fewbit_jax import memory
from fewbit_jax.memory import collectives

LAYOUTS = {"single": (1, 1), "dp": (8, 1), "tp": (1, 8), "dp+tp": (4, 2)}


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the model and its batch."""
  layers: int = 2
  batch: int = 32
  seq: int = 32
  dim: int = 64
  heads: int = 8
  ratio: float = 0.2  # randomized dense: kept fraction of the rows
  bits: int = 3  # few-bit GELU
  # randomized dense's sketch_blocks; None: one block per data shard ('data'
  # under Auto meshes, from the input's type under Explicit ones)
  sketch_blocks: int | None = None


def init(cfg: Config, key) -> list[dict]:
  """Parameters of `cfg.layers` blocks (float32)."""
  d = cfg.dim
  params = []
  for lk in jax.random.split(key, cfg.layers):
    ks = jax.random.split(lk, 6)
    w = lambda k, shape: jax.random.normal(k, shape) / math.sqrt(shape[0])
    params.append(dict(
        ln1=jnp.ones(d), ln2=jnp.ones(d),
        wq=w(ks[0], (d, d)), wk=w(ks[1], (d, d)), wv=w(ks[2], (d, d)), wo=w(ks[3], (d, d)),
        w1=w(ks[4], (d, 4 * d)), w2=w(ks[5], (4 * d, d)),
        bq=jnp.zeros(d), bk=jnp.zeros(d), bv=jnp.zeros(d), bo=jnp.zeros(d),
        b1=jnp.zeros(4 * d), b2=jnp.zeros(d)))
  return params


def param_specs(tp: bool) -> dict:
  """PartitionSpecs of one block's parameters: Megatron tensor parallel over 'model'."""
  m = "model" if tp else None
  col, row = P(None, m), P(m, None)
  return dict(ln1=P(), ln2=P(), wq=col, wk=col, wv=col, wo=row, w1=col, w2=row,
              bq=P(m), bk=P(m), bv=P(m), bo=P(), b1=P(m), b2=P())


def layer_norm(x, scale):
  """LayerNorm with a scale and no bias, written out."""
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + 1e-6) * scale


def block(p: dict, x, key, cfg: Config, fewbit: bool, explicit: bool, dp: bool, tp: bool):
  """One transformer block. Under Explicit meshes the shardings that the types
  cannot infer (sums over a sharded axis, splits of a sharded axis) are given."""
  b, t, d = x.shape
  data, model = ("data" if dp else None), ("model" if tp else None)
  keys = iter(jax.random.split(key, 6))

  def dense(h, w, bias, reduce_out=False):
    out = P(data, None, None) if (explicit and reduce_out) else None
    if fewbit:
      blocks = cfg.sketch_blocks
      if blocks is None and not explicit:  # one block per data shard, as the Explicit default
        blocks = "data" if dp else 1
      return fb.randomized_dense(h, w, bias, next(keys), proj_dim_ratio=cfg.ratio,
                                 out_sharding=out, sketch_blocks=blocks)
    return jnp.einsum("btn,nm->btm", h, w, out_sharding=out) + bias

  def heads(a):
    shape = (b, t, cfg.heads, d // cfg.heads)
    if explicit:
      return a.reshape(shape, out_sharding=P(data, None, model, None))
    return a.reshape(shape)

  h = layer_norm(x, p["ln1"])
  q, k, v = (heads(dense(h, p[w], p[bias])) for w, bias in (("wq", "bq"), ("wk", "bk"),
                                                             ("wv", "bv")))
  att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  att = (att.reshape((b, t, d), out_sharding=P(data, None, model)) if explicit
         else att.reshape(b, t, d))
  x = x + dense(att, p["wo"], p["bo"], reduce_out=True)
  act = fb.gelu(bits=cfg.bits) if fewbit else jax.nn.gelu
  u = act(dense(layer_norm(x, p["ln2"]), p["w1"], p["b1"]))
  return x + dense(u, p["w2"], p["b2"], reduce_out=True)


def loss_fn(params, x, key, cfg: Config, fewbit: bool, explicit: bool, dp: bool, tp: bool):
  """The mean square of the stack's output (a block per entry of `params`)."""
  for i, p in enumerate(params):
    x = block(p, x, jax.random.fold_in(key, i), cfg, fewbit, explicit, dp, tp)
  return jnp.mean(jnp.square(x))


def mesh_for(layout: str, axis_type):
  """The ("data", "model") mesh of `layout` (`LAYOUTS`) with axes of `axis_type`."""
  dp, tp = LAYOUTS[layout]
  return jax.make_mesh((dp, tp), ("data", "model"), axis_types=(axis_type, axis_type),
                       devices=jax.devices()[:dp * tp])


def step_fn(cfg: Config, fewbit: bool, explicit: bool, dp: bool, tp: bool):
  """The jitted gradient step of the stack."""
  def step(params, x, key):
    return jax.value_and_grad(loss_fn)(params, x, key, cfg, fewbit, explicit, dp, tp)
  return jax.jit(step)


def place(cfg: Config, layout: str, axis_type, params, x):
  """`params` and `x` put on the mesh of `layout`."""
  mesh = mesh_for(layout, axis_type)
  dp, tp = (n > 1 for n in LAYOUTS[layout])
  specs = param_specs(tp)
  params = [{n: jax.device_put(v, NamedSharding(mesh, specs[n])) for n, v in p.items()}
            for p in params]
  x = jax.device_put(x, NamedSharding(mesh, P("data" if dp else None, None, None)))
  return mesh, params, x


def measure(cfg: Config, layout: str, axis_type=AxisType.Auto, fewbit: bool = True,
            params=None, x=None, key=None, run: bool = False, compiler_options=None) -> dict:
  """Compiles (and with `run`, runs) the step of one layout; memory, collectives, results.

  `compiler_options` go to XLA, e.g. ``{"xla_backend_optimization_level": 0}``
  compiles faster and assigns the same buffers (LLVM's level changes none).
  """
  params = init(cfg, jax.random.key(0)) if params is None else params
  x = jax.random.normal(jax.random.key(1), (cfg.batch, cfg.seq, cfg.dim)) if x is None else x
  key = jax.random.key(2) if key is None else key
  explicit = axis_type == AxisType.Explicit
  dp, tp = (n > 1 for n in LAYOUTS[layout])
  mesh, params, x = place(cfg, layout, axis_type, params, x)
  with jax.set_mesh(mesh):
    step = step_fn(cfg, fewbit, explicit, dp, tp)
    compiled = step.lower(params, x, key).compile(compiler_options)
    result = compiled(params, x, key) if run else None
  m = memory.CompiledMemory.of(compiled)
  return dict(
      temp=m.temp,
      total=m.total,
      collectives=collectives(compiled),
      result=None if result is None else jax.device_get(result))
