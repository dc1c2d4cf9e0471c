"""Randomized dense: what it keeps, what a training step holds, its time, its variance.

Five tables, each against the plain dense layer (``nn.Dense``):

1. Residual bytes of one layer: what the backward pass keeps besides the
   parameters (the input x for the plain layer; S^T x and the key here), for
   proj_dim_ratio 0.1, 0.2 and 0.5.
2. Compiled temp bytes (XLA's memory analysis, no run needed) of a jitted
   ``optax.adam`` training step of a 4-layer MLP, per sketch kind, with two
   activations: ``jax.nn.relu``, which itself keeps its f32 input, and
   ``fewbit_jax.relu``, which keeps 1 bit per element, so the layer inputs
   are what is left to save.
3. Step time per sketch kind as a ratio to the plain step: the median of
   several steps, the kinds interleaved in one process so that load from
   other processes hits all alike.
4. Variance of the dW estimate over many keys, measured against
   ``fewbit_jax.sketch.estimate_variance``, on iid inputs and on inputs with a
   per-feature offset over positions (as activations have), including dct/dft
   without their random row signs.
5. Step time with many positions per batch (sequences x tokens): a dense
   sketch costs k * B * N for k = ratio * B, so one sketch over all B
   positions, C blocks (``sketch_blocks``, one per sequence) and countsketch
   against the plain step.

Usage (from the repository root):
  python -m benchmarks.bench_dense                  # about 1-2 minutes on 2 CPU cores
  python -m benchmarks.bench_dense --path auto      # FFI sketch kernels where built
  python -m benchmarks.bench_dense --time-batch 4096 --time-width 1024   # time the big MLP
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fewbit_jax.activations as fba
from fewbit_jax import _rng as rng, ext, memory, sketch
from fewbit_jax.dense import randomized_dense
from fewbit_jax.linen import RandomizedDense

MiB = 2.0 ** 20
KINDS = sketch.KINDS


def _compiler_options(memory_only: bool) -> dict:
  """LLVM's optimisation level changes no buffer: memory-only compiles skip it."""
  on_cpu = jax.devices()[0].platform == "cpu"
  return memory.compiler_options(memory_only=memory_only and on_cpu)


# --- 1. residuals --------------------------------------------------------------

def residual_bytes(kind, ratio, b, n, m, dtype) -> int:
  """Bytes the backward pass of one layer keeps, parameters excluded."""
  x = jax.ShapeDtypeStruct((b, n), dtype)
  w = jax.ShapeDtypeStruct((n, m), dtype)
  bias = jax.ShapeDtypeStruct((m,), dtype)
  key = jax.random.key(0)

  def f(w, bias, x):
    if kind is None:
      return (x @ w + bias).astype(jnp.float32).sum()
    return randomized_dense(x, w, bias, key, proj_dim_ratio=ratio,
                            sketch=kind).astype(jnp.float32).sum()

  res = memory.saved_residuals(f, w, bias, x)
  return sum(r.nbytes for r in res.residuals
             if not (r.kind == "argument" and r.label in ("w", "bias")))


def table_residuals(args):
  b, n = args.batch, args.width
  print(f"\n1. Residual bytes of one dense layer ({b} positions, {n} -> {n}), "
        "parameters excluded")
  print(f"   {'dtype':9s} {'ratio':>5s} {'plain':>10s} {'randomized':>11s} {'relative':>9s}")
  for dtype in (jnp.float32, jnp.bfloat16):
    plain = residual_bytes(None, None, b, n, n, dtype)
    for ratio in (0.1, 0.2, 0.5):
      ours = residual_bytes("gaussian", ratio, b, n, n, dtype)
      print(f"   {jnp.dtype(dtype).name:9s} {ratio:5.1f} {plain / MiB:8.2f}Mi "
            f"{ours / MiB:9.2f}Mi {ours / plain:9.4f}")
  print("   (the same for every sketch kind: S^T x is k x N in x's dtype, plus an 8-byte key)")


# --- 2. and 3. an MLP training step ---------------------------------------------

class MLP(nn.Module):
  width: int
  layers: int
  dense: type = nn.Dense
  activation: object = jax.nn.relu

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = self.dense(self.width, name=f"dense{i}")(x)
      if i < self.layers - 1:
        x = self.activation(x)
    return x


def _dense_class(kind, ratio, blocks=None):
  if kind is None:
    return nn.Dense
  return lambda features, name: RandomizedDense(features, proj_dim_ratio=ratio, sketch=kind,
                                                sketch_blocks=blocks, name=name)


def make_step(kind, ratio, width, layers, activation, blocks=None):
  model = MLP(width, layers, _dense_class(kind, ratio, blocks), activation)
  opt = optax.adam(1e-3)

  def step(params, opt_state, x, y, key):
    def loss(p):
      out = model.apply({"params": p}, x, rngs={"sketch": key})
      return jnp.mean((out - y) ** 2)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  def init(x):
    params = model.init(jax.random.key(0), x)["params"]
    return params, opt.init(params)

  return jax.jit(step, donate_argnums=(0, 1)), init


def step_temp(kind, ratio, batch, width, layers, activation) -> int:
  step, init = make_step(kind, ratio, width, layers, activation)
  x = jax.ShapeDtypeStruct((batch, width), jnp.float32)
  params, opt_state = jax.eval_shape(init, x)
  return memory.compiled(step, params, opt_state, x, x, jax.random.key(0),
                         compiler_options=_compiler_options(memory_only=True)).temp


def table_memory(args):
  b, n, layers = args.batch, args.width, args.layers
  acts = {"jax.nn.relu": jax.nn.relu, "fewbit_jax.relu": fba.relu}
  print(f"\n2. Compiled temp of a jitted adam step, {layers}-layer MLP, {b} x {n} f32, "
        f"ratio {args.ratio} (a layer input is {b * n * 4 / MiB:.0f} MiB)")
  print(f"   {'sketch':12s}" + "".join(f" {a:>22s}" for a in acts))
  plain = {a: step_temp(None, None, b, n, layers, f) for a, f in acts.items()}
  print(f"   {'plain':12s}" + "".join(f" {plain[a] / MiB:12.1f} MiB      " for a in acts))
  for kind in KINDS:
    row = [step_temp(kind, args.ratio, b, n, layers, f) for f in acts.values()]
    print(f"   {kind:12s}" + "".join(f" {t / MiB:12.1f} MiB {t / plain[a] - 1:+5.0%}"
                                     for t, a in zip(row, acts)))


def interleaved_times(configs, x, y, layers, repeats) -> dict:
  """Median step time of each (kind, ratio, blocks) config, steps interleaved."""
  runs = {}
  for name, (kind, ratio, blocks) in configs.items():
    step, init = make_step(kind, ratio, x.shape[-1], layers, jax.nn.relu, blocks)
    state = init(x)
    state = step(*state, x, y, jax.random.key(0))[:2]  # compile and warm up
    jax.block_until_ready(state)
    runs[name] = [step, state, []]
  for r in range(repeats):
    for run in runs.values():
      step, state, times = run
      t0 = time.perf_counter()
      out = step(*state, x, y, jax.random.key(r + 1))
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
      run[1] = out[:2]
  return {name: statistics.median(run[2]) for name, run in runs.items()}


def table_time(args):
  b, n, layers = args.time_batch, args.time_width, args.layers
  print(f"\n3. Step time, {layers}-layer MLP, {b} x {n} f32, ratio {args.ratio}, "
        f"jax.nn.relu; median of {args.repeats} interleaved steps")
  x = jax.random.normal(jax.random.key(1), (b, n))
  y = jax.random.normal(jax.random.key(2), (b, n))
  configs = {"plain": (None, None, None)}
  configs.update({kind: (kind, args.ratio, None) for kind in KINDS})
  times = interleaved_times(configs, x, y, layers, args.repeats)
  base = times["plain"]
  print(f"   {'plain':12s} {base * 1e3:9.1f} ms")
  for kind in KINDS:
    print(f"   {kind:12s} {times[kind] * 1e3:9.1f} ms  {times[kind] / base:5.2f}x")


def table_blocks(args):
  s, t, n, layers = args.sequences, args.seq_len, args.blocks_width, args.layers
  print(f"\n5. Step time against sketch_blocks, {layers}-layer MLP on {s} sequences x {t} "
        f"positions x {n} f32 (B = {s * t}), ratio {args.ratio}, jax.nn.relu; median of "
        f"{args.repeats} interleaved steps")
  x = jax.random.normal(jax.random.key(1), (s, t, n))
  y = jax.random.normal(jax.random.key(2), (s, t, n))
  configs = {"plain": (None, None, None),
             "gaussian, one sketch": ("gaussian", args.ratio, None),
             f"gaussian, {s} blocks": ("gaussian", args.ratio, s),
             "countsketch, one sketch": ("countsketch", args.ratio, None)}
  times = interleaved_times(configs, x, y, layers, args.repeats)
  base = times["plain"]
  for name, sec in times.items():
    print(f"   {name:24s} {sec * 1e3:9.1f} ms  {sec / base:5.2f}x")


# --- 4. variance ------------------------------------------------------------------

def measured(kind, x, g, k, n_keys, signs=True):
  keys = jax.random.split(jax.random.key(7), n_keys)

  def one(key):
    if signs:
      return sketch.project(kind, x, key, k).T @ sketch.project(kind, g, key, k)
    k0, k1 = rng.key_words(key)
    return (sketch._project_trig(kind, x, k0, k1, k, signs=False).T
            @ sketch._project_trig(kind, g, k0, k1, k, signs=False))

  est = np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)
  return est.var(0, ddof=1).sum(), np.abs(est.mean(0) - x.T.astype(np.float64) @ g).max()


def table_variance(args):
  b, n, k, n_keys = 256, 16, math.ceil(args.ratio * 256), args.keys
  r = np.random.default_rng(0)
  x_iid, g_iid = r.normal(size=(b, n)), r.normal(size=(b, n))
  offset = r.normal(size=(1, n)) * 2
  data = {"iid": (x_iid, g_iid), "offset": (x_iid + offset, g_iid + 0.5 * offset)}
  print(f"\n4. Variance of the dW estimate, B={b}, N=M={n}, k={k}, {n_keys} keys: "
        "sum over entries, measured / theory; rel. std = sqrt(sum var) / |x^T g|_F")
  print(f"   {'sketch':16s}" + "".join(f" {d + ' meas/theory':>20s} {d + ' rel.std':>14s}"
                                     for d in data))
  rows = [(kind, True) for kind in KINDS] + [("dct", False), ("dft", False)]
  for kind, signs in rows:
    line = f"   {kind + ('' if signs else ' (no signs)'):16s}"
    for xg in data.values():
      x, g = (a.astype(np.float32) for a in xg)
      var, _ = measured(kind, x, g, k, n_keys, signs)
      theory = sketch.estimate_variance(kind, x, g, k, signs=signs).sum()
      norm = np.linalg.norm(x.T.astype(np.float64) @ g)
      line += f" {var / theory:20.3f} {math.sqrt(theory) / norm:14.3f}"
    print(line)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--path", choices=("jax", "auto"), default="jax",
                 help="pure-JAX sketches (default) or FFI kernels where built")
  p.add_argument("--batch", type=int, default=4096, help="positions, tables 1 and 2")
  p.add_argument("--width", type=int, default=1024, help="features, tables 1 and 2")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--ratio", type=float, default=0.2)
  p.add_argument("--time-batch", type=int, default=2048)
  p.add_argument("--time-width", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--keys", type=int, default=2000, help="keys for the variance table")
  p.add_argument("--sequences", type=int, default=32, help="table 5")
  p.add_argument("--seq-len", type=int, default=128, help="table 5")
  p.add_argument("--blocks-width", type=int, default=128, help="table 5")
  p.add_argument("--tables", default="1,2,3,4,5", help="which tables, e.g. 1,4")
  args = p.parse_args(argv)
  ext.set_mode(args.path)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; sketch path: "
        f"{ext.active_path()}")
  tables = {"1": table_residuals, "2": table_memory, "3": table_time, "4": table_variance,
            "5": table_blocks}
  for t in args.tables.split(","):
    tables[t.strip()](args)


if __name__ == "__main__":
  main()
