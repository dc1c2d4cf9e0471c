"""The character GPT trained data-parallel over two processes, fewbit on.

Two processes on this machine join one JAX runtime with
``jax.distributed.initialize`` (CPU collectives over gloo, the coordinator on
127.0.0.1). Each owns 4 CPU devices; together they form one 8-device mesh
``('data',)`` (``AxisType.Auto``). The model is ``examples.char_gpt.CharGPT``
with 3-bit GELU and every dense layer a ``fewbit_jax.nnx.RandomizedLinear``
keeping a 20% sketch, one block per data shard
(``fewbit_jax.dense.sketch_blocks_default('data')``), so that the only
collective of a step is the gradient all-reduce that plain data parallelism
has. Parameters are replicated, the batch sharded; every process builds the
same global batches and contributes the rows of its own devices.

Each process prints one JSON line: its losses, and the collectives counted
in the compiled step next to those of the vanilla model (``nnx.Linear``,
``jax.nn.gelu``) on the same mesh.

Usage (from the repository root):
  python -m examples.distributed_lm                 # launches both processes, ~1 min
  python -m examples.distributed_lm --steps 20 --dim 128
  # or start each process yourself (same flags, one --process-id per process):
  python -m examples.distributed_lm --process-id 0 --coordinator 127.0.0.1:12345
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

from examples import _common

LOCAL_DEVICES = 4
NUM_PROCESSES = 2
_WORKER_FLAGS = ("steps", "batch", "context", "dim", "heads", "layers", "lr", "text_chars")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(argv: list[str], *, timeout: float = 600.0) -> list[dict]:
  """Runs `NUM_PROCESSES` worker processes with `argv`; returns their JSON results.

  Raises:
    RuntimeError: if a worker fails or prints no result; TimeoutError past
      `timeout` seconds (the workers are killed).
  """
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = _common.child_pythonpath(root)  # the workers run with -P
  procs = [subprocess.Popen(
      [sys.executable, "-P", "-m", "examples.distributed_lm", *argv, "--process-id", str(i),
       "--coordinator", coordinator], cwd=root, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(NUM_PROCESSES)]
  deadline = time.monotonic() + timeout
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      outs.append((p.returncode, out, err))
  except subprocess.TimeoutExpired as e:
    raise TimeoutError(f"distributed run took over {timeout:.0f}s") from e
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  results = []
  for i, (rc, out, err) in enumerate(outs):
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if rc != 0 or not lines:
      raise RuntimeError(f"process {i} failed (exit {rc}):\n{err[-4000:]}")
    results.append(json.loads(lines[-1]))
  return results


def worker(args) -> dict:
  """One process: joins the runtime, trains, returns its losses and collective counts."""
  import jax  # after the launcher's environment: 4 CPU devices here

  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=NUM_PROCESSES, process_id=args.process_id,
                             local_device_ids=list(range(LOCAL_DEVICES)),
                             initialization_timeout=120)
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  from fewbit_jax.memory import collectives
  from examples import char_gpt
  import fewbit_jax as fb

  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data", None))

  text = char_gpt.load_text()[:args.text_chars]
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  data = np.fromiter((lookup[c] for c in text), np.int32, len(text))
  sizes = dict(context=args.context, dim=args.dim, heads=args.heads, layers=args.layers)
  tx = optax.adamw(args.lr, weight_decay=0.01)

  def setup(variant):
    model = char_gpt.build(variant, len(chars), seed=0, **sizes)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated)  # the same values in every process
    opt_state = jax.device_put(tx.init(nnx.state(model, nnx.Param)), replicated)
    step, _ = char_gpt.make_step(graphdef, tx)
    return state, opt_state, step

  def global_batch(rng):
    x, y = char_gpt.batches(data, args.batch, args.context, rng)  # the same in every process
    return tuple(jax.make_array_from_callback(a.shape, rows, lambda idx, a=a: a[idx])
                 for a in (x, y))

  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh), fb.dense.sketch_blocks_default("data"):
    state, opt_state, step = setup("both")
    x, y = global_batch(rng)
    counts = {"fewbit": collectives(step.lower(state, opt_state, x, y).compile().as_text())}
    if args.compare_vanilla:
      v_state, v_opt, v_step = setup("vanilla")
      counts["vanilla"] = collectives(v_step.lower(v_state, v_opt, x, y).compile().as_text())
      del v_state, v_opt
    losses = []
    for i in range(args.steps):
      if i:
        x, y = global_batch(rng)
      state, opt_state, loss = step(state, opt_state, x, y)
      losses.append(float(loss))  # replicated: every process holds the value
  param_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(nnx.merge(*nnx.split(
      char_gpt.build("both", len(chars), seed=0, **sizes))), nnx.Param)))
  return dict(process=jax.process_index(), devices=jax.device_count(),
              local_devices=jax.local_device_count(), losses=losses, collectives=counts,
              param_bytes=param_bytes)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("Usage")[1])
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--batch", type=int, default=16, help="global batch, divisible by 8")
  p.add_argument("--context", type=int, default=64)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--text-chars", type=int, default=200_000)
  p.add_argument("--compare-vanilla", action="store_true",
                 help="also compile the vanilla step and count its collectives")
  p.add_argument("--timeout", type=float, default=600.0)
  p.add_argument("--process-id", type=int, default=None, help="run as this worker")
  p.add_argument("--coordinator", default=None, help="host:port of process 0")
  args = p.parse_args(argv)
  if args.process_id is not None:
    if args.coordinator is None:
      p.error("--process-id needs --coordinator host:port")
    print(json.dumps(worker(args)), flush=True)
    return
  forward = [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in _WORKER_FLAGS]
  forward += ["--compare-vanilla"] if args.compare_vanilla else []
  results = launch(forward, timeout=args.timeout)
  for r in results:
    print(f"process {r['process']}: {r['local_devices']} of {r['devices']} devices, losses "
          + " ".join(f"{l:.3f}" for l in r["losses"]))
  for name, c in results[0]["collectives"].items():
    print(f"{name} step collectives: "
          + (", ".join(f"{op} {n} ({b / 1024:.0f} KiB)" for op, (n, b) in c.items() if n)
             or "none"))


if __name__ == "__main__":
  main()
