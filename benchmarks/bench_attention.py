"""Lean attention against flax's: compiled memory and step time of the gradient.

One attention layer shaped like RoBERTa-base's (batch 8, sequence 128, 12
heads of 64, a padding mask, attention dropout 0.1, float32), differentiated
with respect to q, k and v (``dot_product_attention``) or to the parameters
(``nn.MultiHeadDotProductAttention``, whose ``attention_fn`` is swapped).
Rows: flax; ``fb.dot_product_attention`` (keeps the probabilities);
``recompute_block`` (keeps none); flax under
``fb.patch_activations(softmax=True)``. For each: what the backward keeps
(`fewbit_jax.memory.saved_residuals`, arrays made inside the function),
XLA's compiled temp bytes of the gradient, and the step time against
flax's (median of interleaved runs, so background load hits every row alike).
``--layers N`` chains N attention calls (each one's output is the next
one's q, k and v), where what each layer keeps adds up.

Usage (from the repository root):
  python -m benchmarks.bench_attention
  python -m benchmarks.bench_attention --layers 4 --runs 30 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import fewbit_jax as fb
from fewbit_jax import memory

MiB = 2**20


def rows(block: int):
  """name -> (attention_fn, patch softmax?)."""
  return {
      "flax": (nn.dot_product_attention, False),
      "fb.dot_product_attention": (fb.dot_product_attention, False),
      f"fb recompute_block={block}": (
          functools.partial(fb.dot_product_attention, recompute_block=block), False),
      "flax + patch_activations(softmax=True)": (nn.dot_product_attention, True),
  }


def function_case(attn, layers):
  """The loss of `layers` chained calls (differentiated in q, k, v)."""
  def loss(q, k, v, mask, key):
    x = None
    for i, kk in enumerate(jax.random.split(key, layers)):
      q, k, v = (q, k, v) if x is None else (x, x, x)
      x = attn(q, k, v, mask=mask, dropout_rng=kk, dropout_rate=0.1)
    return jnp.sum(x * x)
  return loss, (0, 1, 2)


def module_case(attn, x, mask, layers):
  """The loss of `layers` MultiHeadDotProductAttention layers, its parameters."""
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
      for _ in range(layers):
        x = nn.MultiHeadDotProductAttention(num_heads=12, dropout_rate=0.1,
                                            deterministic=False, attention_fn=attn)(x, mask=mask)
      return x

  model = Stack()
  params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, mask)

  def loss(params, x, mask, key):
    out = model.apply(params, x, mask, rngs={"dropout": key})
    return jnp.sum(out * out)
  return loss, params


def run(layers: int, runs: int, block: int) -> dict:
  b, t, h, d = 8, 128, 12, 64
  ks = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in ks[:3])
  lengths = jax.random.randint(ks[3], (b,), t // 2, t + 1)
  valid = jnp.arange(t)[None] < lengths[:, None]
  mask = nn.make_attention_mask(valid, valid)               # [b, 1, t, t] padding mask
  x = jax.random.normal(ks[4], (b, t, h * d))
  key = jax.random.key(1)
  out = {"config": dict(batch=b, seq=t, heads=h, head_dim=d, dropout=0.1, layers=layers,
                        dtype="float32")}
  for kind in ("dot_product_attention", "MultiHeadDotProductAttention"):
    table, steps = {}, {}
    for name, (attn, patch) in rows(block).items():
      if kind == "dot_product_attention":
        loss, argnums = function_case(attn, layers)
        args = (q, k, v, mask, key)
      else:
        loss, params = module_case(attn, x, mask, layers)
        args, argnums = (params, x, mask, key), 0
      if patch:  # the patch is on whenever the function is traced
        loss = fb.patch_activations(softmax=True)(loss)
      rep = memory.saved_residuals(loss, *args)
      step = jax.jit(jax.grad(loss, argnums=argnums))
      temp = memory.compiled(step, *args).temp
      jax.block_until_ready(step(*args))
      table[name] = dict(kept_MiB=rep.saved_bytes / MiB, temp_MiB=temp / MiB)
      steps[name] = (step, args)
    times = {n: [] for n in steps}
    for _ in range(runs):
      for n, (step, args) in steps.items():
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        times[n].append(time.perf_counter() - t0)
    base = statistics.median(times["flax"])
    for n in table:
      table[n]["time_ratio"] = statistics.median(times[n]) / base
    out[kind] = table
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=1)
  p.add_argument("--runs", type=int, default=20)
  p.add_argument("--block", type=int, default=32, help="recompute_block of the third row")
  p.add_argument("--json", help="also write the results here")
  a = p.parse_args(argv)
  res = run(a.layers, a.runs, a.block)
  c = res["config"]
  print(f"attention, batch {c['batch']} x {c['seq']}, {c['heads']} heads x {c['head_dim']}, "
        f"padding mask, dropout {c['dropout']}, {c['layers']} layer(s), {c['dtype']}, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}")
  for kind in ("dot_product_attention", "MultiHeadDotProductAttention"):
    print(f"\n{kind}: gradient step")
    print(f"  {'':42s} {'kept (MiB)':>11s} {'temp (MiB)':>11s} {'vs flax':>8s} {'time':>6s}")
    base = res[kind]["flax"]["temp_MiB"]
    for name, r in res[kind].items():
      print(f"  {name:42s} {r['kept_MiB']:11.2f} {r['temp_MiB']:11.2f} "
            f"{100 * (r['temp_MiB'] / base - 1):+7.1f}% {r['time_ratio']:5.2f}x")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
