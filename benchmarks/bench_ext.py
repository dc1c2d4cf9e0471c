"""Step time of the FFI kernels against the pure-JAX path, on the default backend.

Prints, for each case, the median wall time of a jitted call over several
runs in this process with ext.mode("ffi") and with ext.mode("jax"), and their
ratio (below 1: the kernels are faster):

* act fwd+bwd: jax.grad of a custom_vjp activation whose forward is
  ``tanh`` (computed by XLA either way) plus ``quantize_pack`` and whose
  backward is ``unpack_scale``, on a (4096, 3072) float32 input at 3 bits;
* quantize_pack and unpack_scale alone;
* each sketch kind: ``S^T x`` of a (4096, 768) input at k = 819 (20%),
  the pure path being ``fewbit_jax.sketch.project`` (rows in blocks) where it
  exists.

Usage:
  python benchmarks/bench_ext.py [--runs 7] [--bits 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from fewbit_jax import ext, _rng as rng
from fewbit_jax._ffi import _sketch_op


def median_times(fns: dict, args, runs: int) -> dict:
  """Median seconds per call of each jitted fn, runs interleaved.

  Alternating the paths call by call exposes both to the same background
  load, so their ratio holds up on a shared machine better than the times.
  """
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compile and warm up
  times = {name: [] for name in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def traced(make, m):
  """make() jitted and traced under ext.mode(m): the path is fixed at trace time."""
  fn = make()

  def call(*args):
    with ext.mode(m):
      return fn(*args)
  return call


def _activation(bits):
  borders = jnp.sort(jax.random.normal(jax.random.key(0), (2**bits - 1,)))
  levels = jnp.linspace(0.0, 1.0, 2**bits)

  @jax.custom_vjp
  def act(x):
    return jnp.tanh(x)

  def fwd(x):
    return jnp.tanh(x), ext.quantize_pack(x, borders, bits)

  def bwd(packed, g):
    return (ext.unpack_scale(packed, levels, g, bits),)

  act.defvjp(fwd, bwd)
  return act, borders, levels


def _project(kind):
  try:
    from fewbit_jax import sketch  # pylint: disable=g-import-not-at-top
  except ImportError:
    sketch = None
  if sketch is not None:
    return lambda x, key, k: sketch.project(kind, x, key, k)

  def pure(x, key, k):
    k0, k1 = rng.key_words(key)
    f = ext.sketch_kernel(kind)
    if f is not None:
      return f(x, k0, k1, k)
    return _sketch_op._sketch_pure(x[None], jnp.stack([k0, k1])[None],  # pylint: disable=protected-access
                                   jnp.zeros((1,), jnp.uint32), kind=kind, k=k)[0]
  return pure


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=7)
  p.add_argument("--bits", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="smaller arrays (smoke test)")
  a = p.parse_args(argv)
  if not ext.available():
    raise SystemExit("fewbit_jax._xla_ext is not built: nothing to compare")
  rows, cols = (512, 384) if a.quick else (4096, 3072)
  sb, sn, sk = (512, 96, 102) if a.quick else (4096, 768, 819)
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); "
        f"median of {a.runs} runs; ratio = ffi / jax")

  act, borders, levels = _activation(a.bits)
  x = jax.random.normal(jax.random.key(1), (rows, cols), jnp.float32)
  g = jax.random.normal(jax.random.key(2), (rows, cols), jnp.float32)
  packed = ext.quantize_pack(x, borders, a.bits)
  cases = {
      f"act fwd+bwd {rows}x{cols} f32 {a.bits}b": (
          lambda: jax.jit(jax.grad(lambda x, g: (act(x) * g).sum())), (x, g)),
      f"quantize_pack {rows}x{cols} f32": (lambda: jax.jit(lambda x: ext.quantize_pack(x, borders, a.bits)), (x,)),
      f"unpack_scale {rows}x{cols} f32": (lambda: jax.jit(lambda p, g: ext.unpack_scale(p, levels, g, a.bits)), (packed, g)),
  }
  xs = jax.random.normal(jax.random.key(3), (sb, sn), jnp.float32)
  key = jax.random.key(4)
  for kind in ext.SKETCH_KINDS:
    proj = _project(kind)
    cases[f"sketch {kind} {sb}x{sn} k={sk}"] = (
        lambda proj=proj: jax.jit(lambda x, key: proj(x, key, sk)), (xs, key))

  print(f"{'case':<40} {'ffi ms':>9} {'jax ms':>9} {'ratio':>7}")
  for name, (make, args) in cases.items():
    t = median_times({m: traced(make, m) for m in ("ffi", "jax")}, args, a.runs)
    print(f"{name:<40} {1e3 * t['ffi']:9.2f} {1e3 * t['jax']:9.2f} {t['ffi'] / t['jax']:7.3f}")


if __name__ == "__main__":
  main()
