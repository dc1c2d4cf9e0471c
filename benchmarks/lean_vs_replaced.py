"""Compiled temp of jax.jit(jax.grad(f)) on this backend: each lean op against the op it replaces.

The programs of issue 17 (defect 6) and a grid around the norms. Run:

  python -m benchmarks.lean_vs_replaced

Prints one line per program: the lean op's temp, the replaced op's, MiB.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

import fewbit_jax as fb
from fewbit_jax import memory

MiB = 2 ** 20


def _temp(body, op, *args):
  return memory.compiled(jax.grad(functools.partial(body, op)), *args).temp / MiB


def _line(name, lean, replaced):
  print(f"{name:42s} lean {lean:8.3f}  replaced {replaced:8.3f}  "
        f"{'ok' if lean <= replaced else 'MORE'}")


def main():
  x = jax.random.normal(jax.random.key(0), (256, 2048))
  key = {"dropout": jax.random.key(1)}
  drops = [lambda h, c=c: c(0.3, deterministic=False).apply({}, h, rngs=key)
           for c in (fb.Dropout, nn.Dropout)]
  w1 = jax.random.normal(jax.random.key(2), (2048, 512)) / 45
  w2 = jax.random.normal(jax.random.key(3), (512, 2048)) / 22
  for name, body in {
      "dropout: tanh(drop(sin x)), 256x2048": lambda d, x: jnp.tanh(d(jnp.sin(x))).sum(),
      "dropout: sum(drop(x) * x)": lambda d, x: (d(x) * x).sum(),
      "dropout: 2-layer MLP": lambda d, x: jnp.sum(
          d(jax.nn.gelu(d(jax.nn.gelu(x @ w1)) @ w2)) ** 2),
  }.items():
    _line(name, *(_temp(body, d, x) for d in drops))
  v = jax.random.normal(jax.random.key(4), (2048, 256))
  for name, body in {
      "softmax: tanh(softmax(sin s)), 256x2048": lambda sm, s, v: jnp.tanh(sm(jnp.sin(s))).sum(),
      "softmax: softmax(s) @ v": lambda sm, s, v: jnp.sum(sm(s) @ v),
      "softmax: softmax(s, where) @ v": lambda sm, s, v: jnp.sum(
          sm(s, where=jnp.arange(2048) < 1500) @ v),
  }.items():
    _line(name, *(_temp(body, sm, x, v) for sm in (fb.softmax, jax.nn.softmax)))
  h = jax.random.normal(jax.random.key(5), (1024, 1024))
  w = jax.random.normal(jax.random.key(6), (1024, 1024)) / 32
  s, b = jnp.ones(1024), jnp.zeros(1024)
  norms = [lambda t: fb.layer_norm(t, s, b),
           lambda t: nn.LayerNorm().apply({"params": {"scale": s, "bias": b}}, t)]
  for name, body in {
      "layer_norm: tanh(norm(sin x)), 1024x1024": lambda n, x, w: jnp.sum(jnp.tanh(n(jnp.sin(x)))),
      "layer_norm: norm(x @ w) @ w": lambda n, x, w: jnp.sum(jnp.sin(n(x @ w) @ w)),
      "layer_norm: pre-LN residual": lambda n, x, w: jnp.sum(
          jnp.tanh(x + jax.nn.gelu(n(x) @ w) @ w)),
      "layer_norm: norm(norm(x))": lambda n, x, w: jnp.sum(jnp.tanh(n(n(jnp.sin(x))))),
  }.items():
    _line(name, *(_temp(body, n, h, w) for n in norms))


if __name__ == "__main__":
  main()
