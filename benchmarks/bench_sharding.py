"""Per-device memory and collectives of a sharded transformer step, vanilla vs fewbit.

A stack of pre-LayerNorm transformer blocks (causal attention, GELU MLP;
`fewbit_jax._models.sharded`, which tests/test_sharding.py checks) is
differentiated on 8 devices laid out as a ("data", "model") mesh, in four
layouts:

* ``single``: one device, for the reference saving;
* ``dp``: data parallel, the batch sharded over 8 devices;
* ``tp``: tensor parallel (Megatron): q/k/v and the first MLP layer sharded
  on their output axis, the attention output and second MLP layer on their
  input axis, over 8 devices;
* ``dp+tp``: 4-way data parallel times 2-way tensor parallel;

each under an ``AxisType.Auto`` mesh (the partitioner propagates shardings)
and an ``AxisType.Explicit`` one (``jax.set_mesh``, shardings in the types).
``vanilla`` uses ``x @ W + b`` and ``jax.nn.gelu``; ``fewbit`` uses
``fewbit_jax.gelu`` (3 bits) and ``fewbit_jax.randomized_dense`` (20%
sketch, one block per data shard) for every dense layer.

For every program it prints XLA's compiled memory per device (temp bytes,
the residuals' home, and argument + output + temp) and the collectives in
the compiled HLO (count and bytes of all-reduce, all-gather, reduce-scatter,
all-to-all and collective-permute), fewbit beside vanilla.

Usage (from the repository root; it sets 8 CPU devices itself):
  python -m benchmarks.bench_sharding
  python -m benchmarks.bench_sharding --layers 2 --batch 32 --seq 64 --dim 128
  python -m benchmarks.bench_sharding --path jax     # the pure-JAX path, not the kernels
"""

from __future__ import annotations

import argparse
import dataclasses
import os

if __name__ == "__main__":  # before jax starts: the simulated devices
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from jax.sharding import AxisType

from fewbit_jax import ext, memory
# The stack and its measurement, shared with tests/test_sharding.py (one definition).
from fewbit_jax._models.sharded import LAYOUTS, Config, init, measure

def _fmt_coll(c: dict) -> str:
  parts = [f"{op} {n} ({b / 1024:.0f} KiB)" for op, (n, b) in c.items() if n]
  return ", ".join(parts) or "none"


_FAST = memory.MEMORY_ONLY  # LLVM's level assigns the same buffers


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  for name, v in dataclasses.asdict(Config()).items():
    if name != "sketch_blocks":
      p.add_argument(f"--{name}", type=type(v), default=v)
  p.add_argument("--path", choices=("auto", "ffi", "jax"), default="auto",
                 help="fewbit_jax.ext mode: FFI kernels or pure JAX")
  args = p.parse_args(argv)
  cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                  if f.name != "sketch_blocks"})
  if jax.device_count() < 8:
    raise SystemExit("needs 8 devices: run as `python -m benchmarks.bench_sharding` (it sets "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts).")
  params = init(cfg, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (cfg.batch, cfg.seq, cfg.dim))

  def temps(c, layout, axis_type=AxisType.Auto, xs=x):
    r = {f: measure(c, layout, axis_type, fewbit=f, params=params, x=xs, compiler_options=_FAST)
         for f in (False, True)}
    return r[False], r[True]

  with ext.mode(args.path):
    print(f"{cfg}\n{jax.device_count()} {jax.devices()[0].platform} devices, path "
          f"{ext.active_path()}; memory per device: XLA's compiled temp bytes (the residuals' "
          "home) and argument + output + temp\n")
    print("| mesh | layout | temp vanilla | temp fewbit | saving | one device, one data shard: "
          "saving | total vanilla | total fewbit | collectives vanilla | collectives fewbit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    shard_saving = {}
    for axis_type in (AxisType.Auto, AxisType.Explicit):
      for layout in LAYOUTS:
        if layout == "single" and axis_type == AxisType.Explicit:
          continue
        dp = LAYOUTS[layout][0]
        if dp not in shard_saving:  # the rows one device holds, on one device
          shard = dataclasses.replace(cfg, batch=cfg.batch // dp, sketch_blocks=1)
          sv, sf = temps(shard, "single", xs=x[:shard.batch])
          shard_saving[dp] = 1 - sf["temp"] / sv["temp"]
        try:
          v, f = temps(cfg, layout, axis_type)
        except Exception as e:  # an op without a sharding rule on this path and mesh
          print(f"| {axis_type.name} | {layout} | fails: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:120]} |", flush=True)
          continue
        print(f"| {axis_type.name} | {layout} | {v['temp'] / 2**20:.3f} MiB | "
              f"{f['temp'] / 2**20:.3f} MiB | {1 - f['temp'] / v['temp']:.1%} | "
              f"{shard_saving[dp]:.1%} | {v['total'] / 2**20:.3f} MiB | "
              f"{f['total'] / 2**20:.3f} MiB | {_fmt_coll(v['collectives'])} | "
              f"{_fmt_coll(f['collectives'])} |", flush=True)
    print("\nsaving = 1 - fewbit / vanilla. 'One device, one data shard' compiles the "
          "step for the batch / (data shards) rows one device holds, on one device.")


if __name__ == "__main__":
  main()
