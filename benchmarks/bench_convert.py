"""Converting a transformer nobody wrote for fewbit: outputs, gradients, memory, remat.

Two small pre-LN transformers written the plain way, an NNX one (``nnx.Linear``
everywhere, ``nnx.gelu`` called inline) and a linen one (``nn.Dense``,
``nn.gelu`` inline, ``@nn.compact``), defined in `fewbit_jax._models.plain`
(the tests convert the same ones), are converted without touching their
source:

* NNX: ``fb.nnx.map_module`` + ``fb.nnx.convert_linear`` on the blocks'
  linear layers (the head stays exact), ``fb.patch_activations(gelu=3)``
  for the inline GELU;
* linen: ``fb.linen.intercept`` on the blocks' dense layers and
  ``fb.patch_activations(gelu=3)``.

For each the script prints: whether the forward output is bitwise the same,
whether the parameters are the same objects / the same tree, the cosine
similarity of each layer's weight gradient with the vanilla one (one step,
and the mean of ``--average`` steps, which tends to 1 since the estimate is
unbiased), and XLA's compiled temp bytes of the gradient step, vanilla and
converted.

``--remat`` compares, on the linen transformer with ``nn.remat`` around
each block, the compiled temp bytes and the step time of: vanilla, few-bit
alone (3-bit GELU + randomized dense), plain ``jax.checkpoint`` (keep
nothing), ``jax.checkpoint`` keeping matmul outputs (jax's
``dots_with_no_batch_dims_saveable``), plain checkpoint of the few-bit
model, and few-bit with ``fb.checkpoint_policy()`` (keep only codes and
sketches). On CPU XLA's ``cse_barrier_expander`` pass undoes every remat
(it merges the recomputation back into the forward pass), so the script
compiles these steps without that pass (``fewbit_jax.memory.KEEP_REMAT``),
as ``benchmarks/memory_table.py`` does; GPU and TPU pipelines keep the
barriers.

Usage (from the repository root):
  python -m benchmarks.bench_convert                 # conversion table
  python -m benchmarks.bench_convert --remat         # remat comparison
  python -m benchmarks.bench_convert --remat --layers 2 --batch 4 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

import fewbit_jax as fb
import fewbit_jax.linen  # noqa: F401
import fewbit_jax.nnx  # noqa: F401
from fewbit_jax import memory
# The models and the remat rows, shared with the tests (one definition).
from fewbit_jax._models.plain import (LINEN_BLOCKS, REMAT_ROWS, Config, LinenTransformer,
                                      NnxTransformer, convert_nnx, cosines, data, kernels, mse,
                                      nnx_grads, remat_step)
from fewbit_jax.patch import patch_activations

MiB = 2.0 ** 20


def nnx_case(cfg: Config, ratio: float, bits: int, average: int, seed: int = 0) -> dict:
  """Convert the NNX transformer; compare outputs, params, gradients and memory."""
  model = NnxTransformer(cfg, rngs=nnx.Rngs(seed))
  x, y = data(cfg, seed)
  params_before = nnx.state(model, nnx.Param)
  param_objects = {id(v) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  y_vanilla = model(x)
  g_vanilla = kernels(nnx.jit(nnx_grads)(model, x, y))
  temp_vanilla = memory.compiled(nnx.jit(nnx_grads), model, x, y).temp

  convert_nnx(model, ratio)
  patch = patch_activations(gelu=bits)
  converted = [p for p, m in nnx.iter_graph(model) if isinstance(m, fb.nnx.RandomizedLinear)]
  with patch:
    y_conv = model(x)
  same_objects = param_objects == {id(v) for _, v in nnx.iter_graph(model)
                                   if isinstance(v, nnx.Param)}
  same_tree = jax.tree.structure(params_before) == jax.tree.structure(
      nnx.state(model, nnx.Param)) and all(
          a is b for a, b in zip(jax.tree.leaves(params_before),
                                 jax.tree.leaves(nnx.state(model, nnx.Param))))

  grads = nnx.jit(patch(nnx_grads))
  samples = [kernels(grads(model, x, y)) for _ in range(average)]  # a new sketch each call
  temp_conv = memory.compiled(grads, model, x, y).temp
  return dict(framework="nnx", converted=len(converted), forward_bitwise=bool(
      jnp.all(y_conv == y_vanilla)), same_param_objects=same_objects,
      same_param_tree=same_tree, cosine=cosines(g_vanilla, samples),
      temp_vanilla=temp_vanilla, temp_converted=temp_conv)


def linen_case(cfg: Config, ratio: float, bits: int, average: int, seed: int = 0) -> dict:
  """Intercept the linen transformer; compare outputs, params, gradients and memory."""
  model = LinenTransformer(cfg)
  x, y = data(cfg, seed)
  variables = model.init(jax.random.key(seed), x)
  with fb.linen.intercept(LINEN_BLOCKS, proj_dim_ratio=ratio, warn_unused=False):
    variables_inside = model.init(jax.random.key(seed), x)
  same_tree = jax.tree.structure(variables) == jax.tree.structure(variables_inside) and all(
      bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(variables),
                                            jax.tree.leaves(variables_inside)))

  def loss(params, x, y, key):
    return mse(model.apply({"params": params}, x, rngs={"sketch": key}), y)

  def converted(f):
    def g(*args):
      with patch_activations(gelu=bits), fb.linen.intercept(LINEN_BLOCKS,
                                                             proj_dim_ratio=ratio):
        return f(*args)
    return g

  key = jax.random.key(seed + 1)
  params = variables["params"]
  y_vanilla = model.apply(variables, x)
  y_conv = converted(lambda v, x: model.apply(v, x, rngs={"sketch": key}))(variables, x)
  step_vanilla, step_conv = jax.jit(jax.grad(loss)), jax.jit(converted(jax.grad(loss)))
  g_vanilla = kernels({"params": step_vanilla(params, x, y, key)})
  samples = [kernels({"params": step_conv(params, x, y, jax.random.fold_in(key, i))})
             for i in range(average)]
  with fb.linen.intercept(LINEN_BLOCKS, proj_dim_ratio=ratio) as seen:
    with patch_activations(gelu=bits):
      temp_conv = memory.compiled(jax.grad(loss), params, x, y, key).temp
  temp_vanilla = memory.compiled(jax.grad(loss), params, x, y, key).temp
  return dict(framework="linen", converted=len(seen.converted),
              forward_bitwise=bool(jnp.all(y_conv == y_vanilla)),
              same_param_objects=None, same_param_tree=same_tree,
              cosine=cosines(g_vanilla, samples), temp_vanilla=temp_vanilla,
              temp_converted=temp_conv)


# --------------------------------------------------------------------------
# Remat.

def keep_remat_options() -> dict:
  """The CPU's CSE barrier pass off (`fewbit_jax.memory.KEEP_REMAT`); nothing elsewhere."""
  return memory.compiler_options(keep_remat=jax.devices()[0].platform == "cpu")


def remat_table(cfg: Config, repeats: int, log=lambda s: None) -> list[dict]:
  """Compiled temp/total bytes and median step time of each REMAT_ROWS entry."""
  rows, runners = [], {}
  for name, fewbit, remat in REMAT_ROWS:
    step, params_shape, (x, y, key), model = remat_step(cfg, fewbit, remat)
    exe = step.lower(params_shape, x, y, key).compile(keep_remat_options())
    m = memory.CompiledMemory.of(exe)
    rows.append(dict(name=name, temp=m.temp, total=m.total))
    log(f"compiled {name}: temp {m.temp / MiB:.1f} MiB")
    if repeats:
      params = model.init(jax.random.key(0), x)["params"]
      jax.block_until_ready(exe(params, x, y, key))
      runners[name] = lambda exe=exe, params=params: jax.block_until_ready(
          exe(params, x, y, key))
  if repeats:
    times = {n: [] for n in runners}
    for _ in range(repeats):  # interleaved, so load hits every row alike
      for n, run in runners.items():
        t0 = time.perf_counter()
        run()
        times[n].append(time.perf_counter() - t0)
    for r in rows:
      r["time"] = statistics.median(times[r["name"]])
  return rows


# --------------------------------------------------------------------------
# Printing.


def format_case(res: dict) -> str:
  lines = [f"### {res['framework']}: {res['converted']} dense layers converted",
           f"forward output bitwise unchanged: {res['forward_bitwise']}",
           f"parameter tree identical: {res['same_param_tree']}"]
  if res["same_param_objects"] is not None:
    lines.append(f"the very same nnx.Param objects: {res['same_param_objects']}")
  lines += ["", "| layer | cosine, 1 step | cosine, mean of steps |", "|---|---|---|"]
  for path, (one, mean) in res["cosine"].items():
    lines.append(f"| {path} | {one:.3f} | {mean:.3f} |")
  v, c = res["temp_vanilla"], res["temp_converted"]
  lines += ["", f"compiled temp bytes of the gradient step: vanilla {v / MiB:.2f} MiB, "
                f"converted {c / MiB:.2f} MiB ({100 * (1 - c / v):.1f}% less)"]
  return "\n".join(lines)


def format_remat(rows: list[dict]) -> str:
  base = rows[0]
  timed = "time" in base
  lines = ["| configuration | temp MiB | total MiB | temp vs vanilla |"
           + (" step time vs vanilla |" if timed else ""),
           "|---|---|---|---|" + ("---|" if timed else "")]
  for r in rows:
    cells = [r["name"], f"{r['temp'] / MiB:.2f}", f"{r['total'] / MiB:.2f}",
             f"{100 * (r['temp'] / base['temp'] - 1):+.1f}%"]
    if timed:
      cells.append(f"{r['time'] / base['time']:.2f}x")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("Usage")[1])
  p.add_argument("--remat", action="store_true", help="the remat comparison")
  p.add_argument("--layers", type=int, default=Config.layers)
  p.add_argument("--batch", type=int, default=Config.batch)
  p.add_argument("--seq", type=int, default=Config.seq)
  p.add_argument("--ratio", type=float, default=0.2, help="randomized dense proj_dim_ratio")
  p.add_argument("--bits", type=int, default=3, help="GELU bits")
  p.add_argument("--average", type=int, default=16, help="steps averaged for the mean cosine")
  p.add_argument("--repeats", type=int, default=7, help="timing rounds for --remat (0: none)")
  p.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests)")
  p.add_argument("--json", help="also write the results to this file")
  args = p.parse_args(argv)
  base = Config.tiny() if args.tiny else Config()
  cfg = dataclasses.replace(base, layers=args.layers if not args.tiny else base.layers,
                            batch=args.batch if not args.tiny else base.batch,
                            seq=args.seq if not args.tiny else base.seq)
  t0 = time.perf_counter()
  log = lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] {s}", file=sys.stderr, flush=True)
  print(f"transformer: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, MLP "
        f"{cfg.hidden}, batch {cfg.batch} x {cfg.seq}, f32; {jax.devices()[0].platform}, "
        f"jax {jax.__version__}\n")
  if args.remat:
    rows = remat_table(cfg, args.repeats, log)
    print(format_remat(rows))
    if args.repeats:
      print(f"\nstep time: median of {args.repeats} interleaved runs of the jitted gradient "
            f"step, ratio to vanilla ({rows[0]['time'] * 1e3:.0f} ms). Compiled with "
            f"{keep_remat_options() or 'default options'}; XLA_FLAGS="
            f"{os.environ.get('XLA_FLAGS', '')}")
    results = rows
  else:
    results = []
    for case in (nnx_case, linen_case):
      res = case(cfg, args.ratio, args.bits, args.average)
      log(f"{res['framework']} done")
      print(format_case(res) + "\n")
      results.append(res)
    print(f"randomized dense: proj_dim_ratio {args.ratio}, gaussian sketch; GELU: {args.bits} "
          f"bits; mean of {args.average} steps with fresh sketches.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
