"""Few-bit activations: residual size, compiled memory and step time.

Prints
1. the bytes per element that the backward of fb.gelu keeps, bits 1..8,
   read from jax's saved residuals (vanilla jax.nn.gelu beside it);
2. XLA's compiled temp bytes of a jitted grad of a GELU MLP, vanilla vs
   few-bit;
3. the step-time ratio few-bit / vanilla of a jitted optax MLP training step
   (median of several runs, same process).

Usage: python benchmarks/bench_activations.py [--batch 512] [--width 2048] [--repeats 20]
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fewbit_jax as fb


def residual_bytes(f, x) -> int:
  return fb.memory.saved_residuals(f, x).total_bytes


def mlp_params(key, dims):
  keys = jax.random.split(key, len(dims) - 1)
  return [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
          for k, a, b in zip(keys, dims[:-1], dims[1:])]


def mlp_loss(act, params, x, y):
  h = x
  for w, b in params[:-1]:
    h = act(h @ w + b)
  w, b = params[-1]
  return jnp.mean((h @ w + b - y) ** 2)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=512)
  p.add_argument("--width", type=int, default=2048)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.default_backend()}, kernels: {fb.ext.active_path()}")

  x = jnp.ones((256, 3072))
  n = x.size
  print("\n1. Residual bytes per element kept for backward (x: f32[256, 3072])")
  print("| activation | bytes/element | vs jax.nn.gelu |")
  print("|---|---|---|")
  van = residual_bytes(lambda v: jax.nn.gelu(v, approximate=False).sum(), x)
  print(f"| jax.nn.gelu(approximate=False) | {van / n:.3f} | 1.000 |")
  van_t = residual_bytes(lambda v: jax.nn.gelu(v).sum(), x)
  print(f"| jax.nn.gelu(approximate=True) | {van_t / n:.3f} | {van_t / van:.3f} |")
  for bits in range(1, 9):
    r = residual_bytes(lambda v: fb.gelu(v, bits=bits).sum(), x)
    print(f"| fb.gelu, {bits} bit | {r / n:.3f} | {r / van:.4f} |")
  for approximate in (False, True):
    r = residual_bytes(lambda v: fb.gelu(v, approximate=approximate, exact=True).sum(), x)
    print(f"| fb.gelu(approximate={approximate}, exact=True) | {r / n:.3f} | {r / van:.4f} |")

  dims = [args.width] * (args.layers + 1)
  key = jax.random.key(0)
  params = mlp_params(key, dims)
  xb = jax.random.normal(key, (args.batch, args.width))
  yb = jnp.zeros((args.batch, args.width))
  print(f"\n2. Compiled temp bytes of jit(grad) of a {args.layers}-layer GELU MLP "
        f"(batch {args.batch}, width {args.width}, f32)")
  print("| activation | temp MiB | vs vanilla |")
  print("|---|---|---|")
  acts = {"jax.nn.gelu (exact)": functools.partial(jax.nn.gelu, approximate=False)}
  for bits in (1, 2, 3, 4, 8):
    acts[f"fb.gelu exact, {bits} bit"] = fb.gelu(approximate=False, bits=bits)
  acts["jax.nn.gelu (tanh form)"] = jax.nn.gelu
  acts["fb.gelu exact mode (exact=True)"] = fb.gelu(approximate=False, exact=True)
  acts["fb.gelu tanh form, exact=True"] = fb.gelu(exact=True)
  acts["jax.nn.relu"] = jax.nn.relu
  acts["fb.relu (1 bit, exact)"] = fb.relu()
  base = None
  for name, act in acts.items():
    g = jax.jit(jax.grad(functools.partial(mlp_loss, act)))
    t = fb.memory.compiled(g, params, xb, yb).temp
    if name == "jax.nn.gelu (exact)":
      base = t
    rel = "" if name.startswith("jax.nn.relu") else f"{t / base:.3f}"
    print(f"| {name} | {t / 2 ** 20:.1f} | {rel} |")

  print(f"\n3. Step time of a jitted optax.adam MLP training step, median of {args.repeats}")
  tx = optax.adam(1e-3)

  def make_step(act):
    @jax.jit
    def step(params, state, x, y):
      loss, grads = jax.value_and_grad(functools.partial(mlp_loss, act))(params, x, y)
      upd, state = tx.update(grads, state, params)
      return optax.apply_updates(params, upd), state, loss
    return step

  cases = {"vanilla": functools.partial(jax.nn.gelu, approximate=False),
           "fb.gelu 3 bit": fb.gelu(approximate=False, bits=3),
           "fb.gelu 1 bit": fb.gelu(approximate=False, bits=1),
           "fb.gelu 8 bit": fb.gelu(approximate=False, bits=8)}
  steps = {k: make_step(a) for k, a in cases.items()}
  state = tx.init(params)
  for s in steps.values():
    jax.block_until_ready(s(params, state, xb, yb))
  times = {k: [] for k in steps}
  for _ in range(args.repeats):  # interleaved, so drift hits every case alike
    for k, s in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(s(params, state, xb, yb))
      times[k].append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  print("| case | median ms | ratio to vanilla |")
  print("|---|---|---|")
  for k, v in med.items():
    print(f"| {k} | {1e3 * v:.1f} | {v / med['vanilla']:.2f} |")


if __name__ == "__main__":
  main()
