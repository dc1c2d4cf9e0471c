"""Randomized layers at their default options on each kind of mesh: per-device memory and collectives.

A 2-block pre-LN MLP (``fb.RandomizedDense(F, proj_dim_ratio=0.2)`` or
``fb.nnx.RandomizedLinear``, no other option, 3-bit GELU; F = 4 D) takes a
plain SGD step on x (batch, seq, D) sharded over the batch on 8 devices,
beside the same model with flax's layers, on meshes built as users build
them: ``jax.sharding.Mesh(devices, names)`` (``AxisType.Auto``, as flax's
examples), ``jax.make_mesh`` (``AxisType.Explicit`` by default) and
``jax.make_mesh(..., axis_types=Auto)``, each with and without
``jax.set_mesh``. It prints XLA's compiled temp bytes per device and the
all-reduces (and any other collective) of each program.

Usage (from the repository root; it sets 8 CPU devices itself):
  python -m benchmarks.bench_mesh_defaults                 # x (64, 128, 256), the issue's case
  python -m benchmarks.bench_mesh_defaults --dim 64 --batch 32 --seq 64 --nnx
"""

from __future__ import annotations

import argparse
import os

if __name__ == "__main__":  # before jax starts: the simulated devices
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

# The models and the measurement, shared with tests/test_mesh_defaults.py.
from fewbit_jax._models.mesh_mlp import linen_step, measure, meshes, nnx_step


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--nnx", action="store_true", help="the NNX model in the functional loop")
  args = ap.parse_args(argv)
  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.dim))
  make = nnx_step if args.nnx else linen_step
  print(f"{'nnx' if args.nnx else 'linen'} 2-block MLP, x {x.shape}, F = {4 * args.dim}, "
        f"8 devices, batch sharded")
  print("| mesh | axis types | jax.set_mesh | temp vanilla | temp fewbit | all-reduces "
        "vanilla / fewbit | other collectives fewbit |")
  print("|---|---|---|---|---|---|---|")
  for name, mk in meshes().items():
    for set_mesh in (False, True):
      mesh = mk()
      v = measure(make, False, mesh, set_mesh, x, run=False)
      f = measure(make, True, mesh, set_mesh, x, run=False)
      other = sum(n for op, (n, _) in f["collectives"].items() if op != "all-reduce")
      print(f"| {name} | {','.join(str(t).split('.')[-1] for t in mesh.axis_types)} | "
            f"{'yes' if set_mesh else 'no'} | {v['temp'] / 2**20:.1f} MiB | "
            f"{f['temp'] / 2**20:.1f} MiB | {v['collectives']['all-reduce'][0]} / "
            f"{f['collectives']['all-reduce'][0]} | {other} |", flush=True)


if __name__ == "__main__":
  main()
