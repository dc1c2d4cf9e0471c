"""The default path of each kernel op, chosen by measurement on this backend.

For each op of `fewbit_jax.ext.OPS`, in one process, on both paths (the FFI
kernel, ``ext.mode("ffi")``, and pure JAX, ``ext.mode("jax")``):

* memory: XLA's compiled ``temp_size_in_bytes`` of the op's forward and
  backward (exact and deterministic on the CPU);
* time: the median of several interleaved calls, as the ratio ffi / jax.

The cases are the op alone and the op in the FFN block of the main job
(``python -m fewbit_jax bench``: 32 x 128 positions, hidden 256, FFN 1024;
the block's input is an intermediate, as in a model): ``codes`` in a 3-bit
GELU (the forward packs its codes with ``quantize_pack``, the backward runs
``unpack_scale``) and a 1-bit ReLU (``pack``, ``unpack_scale``), alone on a
(4096, 3072) float32 input; each ``sketch_<kind>`` in ``randomized_dense``
at ratio 0.2, alone on a (4096, 768) input to 768 features, and as both
dense layers of the block. Then, per op (its cases summed): the path with
less memory, where the two differ by more than `MEMORY_TIE`; else the
kernel where it is faster by more than `TIME_NOISE` (the geometric mean of
its cases' ratios), else the pure path. It prints the table and the
``MEASURED`` entry for ``fewbit_jax/_ffi/_path.py``.

Usage (from the repository root):
  python -m benchmarks.bench_paths [--runs 7] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import math

import jax
import jax.numpy as jnp

import fewbit_jax as fb
from fewbit_jax import ext, memory
from fewbit_jax._ffi import _load
from benchmarks.bench_ext import median_times, traced

MEMORY_TIE = 0.01  # relative memory difference below which the paths tie
TIME_NOISE = 0.10  # the kernel must be this much faster to win a tie in memory
PATHS = ("ffi", "jax")


def _block(sketch, act):
  """The FFN block of the main job (``python -m fewbit_jax bench``) as a loss.

  Its input is an intermediate (as in a model, where XLA may fuse into it),
  and `sketch` (None: plain dense layers) the randomized layers' kind.
  """
  key = jax.random.key(0)

  def dense(x, w, i):
    if sketch is None:
      return x @ w
    return fb.randomized_dense(x, w, None, jax.random.fold_in(key, i), proj_dim_ratio=0.2,
                               sketch=sketch)

  def loss(x0, w1, w2):
    h = jnp.tanh(x0)
    y = dense(act(dense(h, w1, 0)), w2, 1)
    return (jnp.tanh(y + h) ** 2).sum()
  return loss


def cases(quick: bool = False) -> list[tuple[str, str, callable, tuple, tuple]]:
  """(op, case, loss, arguments, argnums): the gradient of each loss is measured.

  Each op alone (the vjp of an activation, of one randomized layer) and in
  the FFN block of the main job (batch 32 x 128, hidden 256, FFN 1024).
  """
  rows, cols = (512, 384) if quick else (4096, 3072)
  b, n, f = (512, 64, 256) if quick else (4096, 256, 1024)
  r = lambda i, *shape: jax.random.normal(jax.random.key(i), shape, jnp.float32)
  x, c = r(1, rows, cols), r(2, rows, cols)
  block_args = (r(3, b, n), r(4, n, f) / math.sqrt(n), r(5, f, n) / math.sqrt(f))
  gelu = functools.partial(jax.nn.gelu, approximate=False)
  out = []
  for act in (fb.gelu(approximate=False, bits=3), fb.relu):
    name = "3-bit gelu" if act is not fb.relu else "1-bit relu"
    out.append(("codes", f"{name} vjp {rows}x{cols}", lambda x, c, act=act: (act(x) * c).sum(),
                (x, c), (0,)))
    out.append(("codes", f"{name} in the FFN block {b}x{n}x{f}", _block(None, act), block_args,
                (0, 1, 2)))
  xs, w, key = r(6, rows // 4 * 4, n * 3), r(7, n * 3, n * 3) / math.sqrt(3 * n), jax.random.key(8)
  for kind in ext.SKETCH_KINDS:
    def loss(x, w, kind=kind):
      y = fb.randomized_dense(x, w, None, key, proj_dim_ratio=0.2, sketch=kind)
      return (y * y).sum()
    out.append((f"sketch_{kind}", f"randomized_dense vjp {xs.shape[0]}x{xs.shape[1]}", loss,
                (xs, w), (0, 1)))
    out.append((f"sketch_{kind}", f"{kind} in the FFN block {b}x{n}x{f}", _block(kind, gelu),
                block_args, (0, 1, 2)))
  return out


def measure(loss, args, argnums, runs: int) -> dict:
  """{path: (temp bytes, median seconds)} of the jitted gradient of `loss`."""
  make = lambda: jax.jit(jax.grad(loss, argnums=argnums))
  temp = {}
  for path in PATHS:
    with ext.mode(path):
      temp[path] = memory.compiled(make(), *args).temp
  times = median_times({p: traced(make, p) for p in PATHS}, args, runs)
  return {p: (temp[p], times[p]) for p in PATHS}


def choose(temp_ffi: int, temp_jax: int, ratio: float) -> str:
  """Memory first, then time; a tie within noise goes to the pure path."""
  if abs(temp_ffi - temp_jax) > MEMORY_TIE * max(temp_ffi, temp_jax):
    return "ffi" if temp_ffi < temp_jax else "jax"
  return "ffi" if ratio < 1.0 - TIME_NOISE else "jax"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=7)
  p.add_argument("--quick", action="store_true", help="smaller arrays (smoke test)")
  a = p.parse_args(argv)
  platform = _load.canonical()
  if platform not in ext.platforms():
    raise SystemExit(f"no kernels for {platform!r} (built for {ext.platforms()}): "
                     "nothing to compare")
  print(f"backend {platform}, {jax.device_count()} device(s); memory: compiled temp MiB of the "
        f"vjp; time: median of {a.runs} interleaved runs, ratio = ffi / jax")
  print()
  print("| op | case | ffi MiB | jax MiB | time ffi / jax |")
  print("|---|---|---|---|---|")
  per_op: dict[str, list] = {}
  for op, name, loss, args, argnums in cases(a.quick):
    r = measure(loss, args, argnums, a.runs)
    ratio = r["ffi"][1] / r["jax"][1]
    per_op.setdefault(op, []).append((r["ffi"][0], r["jax"][0], ratio))
    print(f"| {op} | {name} | {r['ffi'][0] / 2**20:.1f} | {r['jax'][0] / 2**20:.1f} | "
          f"{ratio:.2f} |", flush=True)
  print()
  print(f"| op | {platform} ffi MiB | jax MiB | time ffi / jax | chosen |")
  print("|---|---|---|---|---|")
  chosen = {}
  for op, rs in per_op.items():
    mf, mj = sum(r[0] for r in rs), sum(r[1] for r in rs)
    ratio = math.prod(r[2] for r in rs) ** (1 / len(rs))  # geometric mean
    chosen[op] = choose(mf, mj, ratio)
    print(f"| {op} | {mf / 2**20:.1f} | {mj / 2**20:.1f} | {ratio:.2f} | {chosen[op]} |")
  print()
  print(f"MEASURED[{platform!r}] = {chosen!r}")
  return 0


if __name__ == "__main__":
  main()
