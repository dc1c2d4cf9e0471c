"""GB/s of each kernel against the pure-JAX path and a device copy, on a GPU.

Bytes counted are the minimum each operation must move: quantize_pack reads x
and writes bits/32 words per element; unpack_scale reads the planes and g and
writes the result; a sketch reads x and writes the (k, N) result (S is never
in memory). The copy line is a jitted ``x + 1`` (read and write once), the
practical ceiling (an H200's HBM3e peaks near 4.8 TB/s, copies reach about
4.3 TB/s). Times are medians of --runs calls.

Usage:
  python tests/gpu/bench_bandwidth.py [--rows 16384] [--cols 8192] [--runs 20]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from fewbit_jax import ext, _rng as rng
from fewbit_jax._ffi import _sketch_op


def _median(fn, *args, runs):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=16384)
  p.add_argument("--cols", type=int, default=8192)
  p.add_argument("--bits", type=int, default=3)
  p.add_argument("--runs", type=int, default=20)
  p.add_argument("--sketch-rows", type=int, default=16384)
  p.add_argument("--sketch-cols", type=int, default=4096)
  p.add_argument("--ratio", type=float, default=0.2)
  a = p.parse_args(argv)
  print("devices:", jax.devices(), "| ext platforms:", ext.platforms())
  r, c, bits = a.rows, a.cols, a.bits
  borders = jnp.sort(jax.random.normal(jax.random.key(0), (2**bits - 1,)))
  levels = jnp.linspace(0.0, 1.0, 2**bits)
  print(f"{'kernel':<44} {'path':>4} {'ms':>9} {'GB/s':>9}")

  def report(name, fn, args, nbytes):
    for m in ("ffi", "jax"):
      with ext.mode(m):
        t = _median(jax.jit(fn), *args, runs=a.runs)
      print(f"{name:<44} {m:>4} {1e3 * t:9.3f} {nbytes / t / 1e9:9.1f}")

  for dtype in (jnp.float32, jnp.bfloat16):
    x = jax.random.normal(jax.random.key(1), (r, c), dtype)
    g = jax.random.normal(jax.random.key(2), (r, c), dtype)
    e = x.dtype.itemsize
    words = r * bits * (-(-c // 32)) * 4
    t = _median(jax.jit(lambda x: x + 1), x, runs=a.runs)
    print(f"{'copy (x + 1) ' + x.dtype.name:<44} {'xla':>4} {1e3 * t:9.3f} {2 * r * c * e / t / 1e9:9.1f}")
    report(f"quantize_pack {r}x{c} {x.dtype.name} {bits}b",
           lambda x: ext.quantize_pack(x, borders, bits), (x,), r * c * e + words)
    with ext.mode("jax"):
      packed = ext.quantize_pack(x, borders, bits)
    report(f"unpack_scale {r}x{c} {x.dtype.name} {bits}b",
           lambda p, g: ext.unpack_scale(p, levels, g, bits), (packed, g), words + 2 * r * c * e)

  b, n = a.sketch_rows, a.sketch_cols
  k = max(1, int(a.ratio * b))
  xs = jax.random.normal(jax.random.key(3), (b, n), jnp.float32)
  k0, k1 = rng.key_words(jax.random.key(4))
  try:
    from fewbit_jax import sketch
  except ImportError:
    sketch = None
  for kind in ext.SKETCH_KINDS:
    def f(x, kind=kind):
      kern = ext.sketch_kernel(kind)
      if kern is not None:
        return kern(x, k0, k1, k)
      if sketch is not None:
        return sketch.project(kind, x, jax.random.wrap_key_data(jnp.stack([k0, k1])), k)
      return _sketch_op._sketch_pure(x[None], jnp.stack([k0, k1])[None],
                                     jnp.zeros((1,), jnp.uint32), kind=kind, k=k)[0]
    flops = 2.0 * b * k * n if kind != "countsketch" else 2.0 * b * n
    nbytes = b * n * 4 + k * n * 4
    for m in ("ffi", "jax"):
      with ext.mode(m):
        t = _median(jax.jit(f), xs, runs=a.runs)
      print(f"{'sketch ' + kind + f' {b}x{n} k={k}':<44} {m:>4} {1e3 * t:9.3f} {nbytes / t / 1e9:9.1f}"
            f"  ({flops / t / 1e12:.2f} TFLOP/s)")


if __name__ == "__main__":
  main()
