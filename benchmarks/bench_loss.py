"""The loss head's memory, flops and step time: fused linear cross-entropy against optax.

For each vocabulary size V, the gradient (w.r.t. the last hidden state x and the
output kernel) of the mean per-token loss of ``T`` tokens of ``D`` features:

* optax: ``optax.softmax_cross_entropy_with_integer_labels(x @ kernel, labels)``,
  which holds the T x V logits and their gradient;
* recompute: ``fb.linear_softmax_cross_entropy(x, kernel, labels).mean()``, blocks
  over the vocabulary, keeps one float32 log-sum-exp per token, and its backward
  recomputes the logits (four matmuls of 2 T D V flops against optax's three);
* forward: ``fb.linear_softmax_cross_entropy(x, kernel, labels, reduction="mean")``
  (``gradient="forward"``, the default for a reduced loss): blocks of tokens
  against the whole vocabulary, the gradients formed in the forward pass and
  kept (x's and the kernel's sizes), optax's three matmuls.

Memory is XLA's compiled temp bytes of ``jax.jit(jax.grad(loss, (0, 1)))``
(exact and deterministic on CPU; arguments and the gradients returned are the
same for all and not counted). Flops are ``cost_analysis()``'s as a ratio to
optax's; it counts a loop's body once, so the recompute mode is compiled with
the vocabulary in one block plus the backward's recomputation ``2 T D V``
(merged with the forward's logits by XLA's CSE in one block), the forward mode
with the tokens in one block (no loop). Time is the median of ``--repeats``
alternated runs of the compiled steps in this process, at ``--time-tokens``
tokens (the memory rows are compiled only, never run). ``--blocks`` times the
recompute mode over several block sizes instead (how its default was chosen),
``--token-blocks`` the forward mode over several token blocks.

Usage (from the repository root):
  python -m benchmarks.bench_loss                       # V = 32768 and 262144
  python -m benchmarks.bench_loss --vocab 32768 --tokens 1024 --time-tokens 256
  python -m benchmarks.bench_loss --blocks 1024 2048 4096 8192 --vocab 32768
  python -m benchmarks.bench_loss --token-blocks 16 32 64 128 --vocab 32768
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


def forward_loss(x, kernel, labels, token_block_size=None):
  return fb.linear_softmax_cross_entropy(x, kernel, labels, reduction="mean",
                                         gradient="forward", token_block_size=token_block_size)


def flops(fn, *args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


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
                 help="time the recompute mode at these vocabulary blocks (and the default)")
  p.add_argument("--token-blocks", type=int, nargs="*", default=None,
                 help="time the forward mode at these token blocks (and the default)")
  a = p.parse_args(argv)
  dtype = jnp.dtype(a.dtype)
  print(f"loss head: {a.tokens} tokens x D {a.d}, {dtype.name}, jit(grad) w.r.t. x and "
        f"kernel, {jax.devices()[0].platform}")
  if a.blocks is not None or a.token_blocks is not None:
    for v in a.vocab:
      args = arrays(a.time_tokens, a.d, v, dtype)
      if a.blocks is not None:
        fns = {f"block {b}": step(fused_loss, block_size=b) for b in a.blocks}
        fns["default"] = step(fused_loss)
      else:
        fns = {f"tokens {b}": step(forward_loss, token_block_size=b) for b in a.token_blocks}
        fns["default"] = step(forward_loss)
      fns["optax"] = step(optax_loss)
      t = times(fns, args, a.repeats)
      print(f"V {v}, {a.time_tokens} tokens: " + ", ".join(
          f"{n} {s * 1e3:.0f} ms" for n, s in t.items()))
    return
  print(f"| V | optax temp | recompute temp | forward temp | flops recompute / optax | "
        f"flops forward / optax | step time recompute / optax | step time forward / optax "
        f"({a.time_tokens} tokens) |")
  print("|---|---|---|---|---|---|---|---|")
  for v in a.vocab:
    sds = shapes(a.tokens, a.d, v, dtype)
    mo = memory.compiled(step(optax_loss), *sds).temp
    mr = memory.compiled(step(fused_loss), *sds).temp
    mf = memory.compiled(step(forward_loss), *sds).temp
    fo = flops(step(optax_loss), *sds)
    fr = flops(step(fused_loss, block_size=v), *sds) + 2.0 * a.tokens * a.d * v
    ff = flops(step(forward_loss, token_block_size=a.tokens), *sds)
    tr = tf = "-"
    if a.time_tokens:
      t = times({"optax": step(optax_loss), "recompute": step(fused_loss),
                 "forward": step(forward_loss)}, arrays(a.time_tokens, a.d, v, dtype), a.repeats)
      tr, tf = (f"{t[n] / t['optax']:.2f}x ({t[n] * 1e3:.0f} / {t['optax'] * 1e3:.0f} ms)"
                for n in ("recompute", "forward"))
    fmt = memory.format_bytes
    print(f"| {v} | {fmt(mo)} | {fmt(mr)} ({100 * mr / mo:.1f}%) | {fmt(mf)} "
          f"({100 * mf / mo:.1f}%) | {fr / fo:.3f}x | {ff / fo:.3f}x | {tr} | {tf} |")


if __name__ == "__main__":
  main()
