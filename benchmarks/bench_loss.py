"""The loss head's memory and step time: fused linear cross-entropy against optax.

For each vocabulary size V, the gradient (w.r.t. the last hidden state x and the
output kernel) of the mean per-token loss of ``T`` tokens of ``D`` features:

* optax: ``optax.softmax_cross_entropy_with_integer_labels(x @ kernel, labels)``,
  which holds the T x V logits and their gradient;
* fused: ``fb.linear_softmax_cross_entropy(x, kernel, labels)``, blocks over the
  vocabulary, keeps one float32 log-sum-exp per token.

Memory is XLA's compiled temp bytes of ``jax.jit(jax.grad(loss, (0, 1)))``
(exact and deterministic on CPU; arguments and the gradients returned are the
same for both and not counted). Time is the median of ``--repeats`` alternated
runs of the two compiled steps in this process, at ``--time-tokens`` tokens
(the memory rows are compiled only, never run). ``--blocks`` times the fused
step over several block sizes instead (how the default was chosen).

Usage (from the repository root):
  python -m benchmarks.bench_loss                       # V = 32768 and 262144
  python -m benchmarks.bench_loss --vocab 32768 --tokens 1024 --time-tokens 256
  python -m benchmarks.bench_loss --blocks 1024 2048 4096 8192 --vocab 32768
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import fewbit_jax as fb
from fewbit_jax import memory


def optax_loss(x, kernel, labels):
  logits = x @ kernel
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def fused_loss(x, kernel, labels, block_size=None):
  return fb.linear_softmax_cross_entropy(x, kernel, labels, block_size=block_size).mean()


def step(loss, **kw):
  return jax.jit(jax.grad(lambda x, k, y: loss(x, k, y, **kw), argnums=(0, 1)))


def shapes(tokens, d, vocab, dtype):
  return (jax.ShapeDtypeStruct((tokens, d), dtype), jax.ShapeDtypeStruct((d, vocab), dtype),
          jax.ShapeDtypeStruct((tokens,), jnp.int32))


def arrays(tokens, d, vocab, dtype):
  k = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(k[0], (tokens, d), dtype),
          (jax.random.normal(k[1], (d, vocab)) / d ** 0.5).astype(dtype),
          jax.random.randint(k[2], (tokens,), 0, vocab))


def times(fns: dict, args, repeats: int) -> dict:
  """Median seconds per call of each compiled fn, runs alternated."""
  compiled = {n: f.lower(*args).compile() for n, f in fns.items()}
  for c in compiled.values():
    jax.block_until_ready(c(*args))
  out = {n: [] for n in compiled}
  for _ in range(repeats):
    for n, c in compiled.items():
      t = time.perf_counter()
      jax.block_until_ready(c(*args))
      out[n].append(time.perf_counter() - t)
  return {n: statistics.median(v) for n, v in out.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab", type=int, nargs="+", default=[32768, 262144])
  p.add_argument("--tokens", type=int, default=2048, help="tokens for the memory rows")
  p.add_argument("--d", type=int, default=512)
  p.add_argument("--time-tokens", type=int, default=256, help="tokens for the timed runs "
                 "(0: no timing)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--blocks", type=int, nargs="*", default=None,
                 help="time the fused step at these block sizes (and the default)")
  a = p.parse_args(argv)
  dtype = jnp.dtype(a.dtype)
  print(f"loss head: {a.tokens} tokens x D {a.d}, {dtype.name}, jit(grad) w.r.t. x and "
        f"kernel, {jax.devices()[0].platform}")
  if a.blocks is not None:
    for v in a.vocab:
      args = arrays(a.time_tokens, a.d, v, dtype)
      fns = {f"block {b}": step(fused_loss, block_size=b) for b in a.blocks}
      fns["default"] = step(fused_loss)
      fns["optax"] = step(optax_loss)
      t = times(fns, args, a.repeats)
      print(f"V {v}, {a.time_tokens} tokens: " + ", ".join(
          f"{n} {s * 1e3:.0f} ms" for n, s in t.items()))
    return
  print(f"| V | optax temp | fused temp | fused / optax | step time fused / optax "
        f"({a.time_tokens} tokens) |")
  print("|---|---|---|---|---|")
  for v in a.vocab:
    sds = shapes(a.tokens, a.d, v, dtype)
    mo = memory.compiled(step(optax_loss), *sds).temp
    mf = memory.compiled(step(fused_loss), *sds).temp
    ratio = "-"
    if a.time_tokens:
      t = times({"optax": step(optax_loss), "fused": step(fused_loss)},
                arrays(a.time_tokens, a.d, v, dtype), a.repeats)
      ratio = f"{t['fused'] / t['optax']:.2f}x ({t['fused'] * 1e3:.0f} / {t['optax'] * 1e3:.0f} ms)"
    print(f"| {v} | {memory.format_bytes(mo)} | {memory.format_bytes(mf)} | "
          f"{100 * mf / mo:.1f}% | {ratio} |")


if __name__ == "__main__":
  main()
