"""What flax's LayerNorm and Dropout keep for the backward pass, and what the lean ones keep.

A pre-LN MLP block as a flax user writes it (``nn.LayerNorm -> nn.Dense ->
gelu -> nn.Dense -> nn.Dropout``, plus the residual; ``--post``: the
post-LN block of BERT and RoBERTa, the norm after the residual add), stacked
`--layers` times, batch 32 x 128 x 256 (MLP 1024) by default, f32 (``--dtype``). The
same model is differentiated plain and inside ``fewbit_jax.linen.lean()``
(the norms and dropout run lean, with the same parameters), alone and with
``fewbit_jax.linen.intercept`` and ``fewbit_jax.patch_activations(gelu=3)``
on top. For each it prints the residuals (from the jaxpr, by source: the
norm's ``sub``/``mul`` arrays, dropout's ``lt`` mask) and XLA's compiled temp
bytes of the gradient step (exact on CPU).

Usage (from the repository root):
  python -m benchmarks.bench_lean
  python -m benchmarks.bench_lean --post --layers 2
  python -m benchmarks.bench_lean --dtype bfloat16 --layers 3
"""

from __future__ import annotations

import argparse
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

import fewbit_jax as fb
from fewbit_jax import memory


class Block(nn.Module):
  """Pre-LN: x + Dropout(Dense(gelu(Dense(LayerNorm(x))))); post-LN (RoBERTa's):
  LayerNorm(x + Dropout(Dense(gelu(Dense(x))))). Written without fewbit in mind."""
  hidden: int = 1024
  post: bool = False
  rate: float = 0.1
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    h = x if self.post else nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.Dense(self.hidden, dtype=self.dtype)(h)
    h = jax.nn.gelu(h)
    h = nn.Dense(x.shape[-1], dtype=self.dtype)(h)
    x = x + nn.Dropout(self.rate, deterministic=False)(h)
    return nn.LayerNorm(dtype=self.dtype)(x) if self.post else x


class Stack(nn.Module):
  layers: int = 1
  hidden: int = 1024
  post: bool = False
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    for _ in range(self.layers):
      x = Block(self.hidden, self.post, dtype=self.dtype)(x)
    return x


CONFIGS = {
    "flax": contextlib.nullcontext,
    "lean": fb.linen.lean,
    "randomized 20% + 3-bit GELU": lambda: _both(False),
    "randomized 20% + 3-bit GELU + lean": lambda: _both(True),
}


@contextlib.contextmanager
def _both(lean: bool):
  with contextlib.ExitStack() as stack:
    stack.enter_context(fb.linen.intercept(proj_dim_ratio=0.2))
    stack.enter_context(fb.patch_activations(gelu=3))
    if lean:
      stack.enter_context(fb.linen.lean())
    yield


def measure(config: str, layers: int = 1, batch=(32, 128), dim: int = 256, hidden: int = 1024,
            dtype=jnp.float32, post: bool = False):
  """(residual report, compiled temp bytes) of the gradient of one configuration."""
  model = Stack(layers, hidden, post, dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (*batch, dim), dtype)
  params = model.init(jax.random.key(1), x)
  rngs = {"dropout": jax.random.key(2), "sketch": jax.random.key(3)}

  def loss(params, x):
    return jnp.sum(model.apply(params, x, rngs=rngs).astype(jnp.float32) ** 2)

  with CONFIGS[config]():
    report = memory.saved_residuals(loss, params, x)
    compiled = memory.compiled(jax.grad(loss), params, x)
  return report, compiled.temp


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=1)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--batch", type=int, nargs=2, default=(32, 128))
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--post", action="store_true", help="post-LN blocks (RoBERTa's)")
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  block = (f"Dense {args.hidden} -> gelu -> Dense -> Dropout 0.1, + residual -> LayerNorm"
           if args.post else
           f"LayerNorm -> Dense {args.hidden} -> gelu -> Dense -> Dropout 0.1, + residual")
  print(f"{args.layers} x [{block}], x {tuple(args.batch) + (args.dim,)} {dtype}, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}")
  base = None
  for config in CONFIGS:
    report, temp = measure(config, args.layers, tuple(args.batch), args.dim, args.hidden, dtype,
                           args.post)
    base = base or temp
    print(f"\n== {config}: compiled temp {memory.format_bytes(temp)} "
          f"({100 * (1 - temp / base):+.1f}% saved vs flax), residuals "
          f"{memory.format_bytes(report.saved_bytes)}")
    for source, nbytes in sorted(report.by_source().items(), key=lambda kv: -kv[1]):
      print(f"  {memory.format_bytes(nbytes):>10}  {source}")


if __name__ == "__main__":
  main()
