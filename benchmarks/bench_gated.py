"""What a gated MLP keeps for its backward pass, in bytes per token, by mode.

The MLP of Gemma and Llama, ``down_proj(act(gate_proj(x)) * up_proj(x))``
(D -> H -> D, no biases), written the flax way (``nn.gelu(gate) * up``) and as
`fewbit_jax.linen.GatedMLP` in each mode: exact lean product, few-bit product,
and either with randomized gate/up/down projections (``proj_dim_ratio``).
For each, the gradient w.r.t. the parameters and the input of
``sum(mlp(x) * ct)`` gives:

* kept / token: the residuals the backward keeps beyond the parameters and
  the loss's ``ct`` (the input x included), from the jaxpr (`fewbit_jax.memory.saved_residuals`), per
  token, and in units of one hidden-sized row (H elements of the dtype);
* temp / token: XLA's compiled temp bytes of the jitted gradient, per token.

Usage (from the repository root):
  python -m benchmarks.bench_gated
  python -m benchmarks.bench_gated --activation silu --dtype bfloat16
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

import fewbit_jax as fb
from fewbit_jax import memory


class FlaxMLP(nn.Module):
  """The MLP as written in flax (the reference)."""
  hidden: int
  act: object = nn.gelu

  @nn.compact
  def __call__(self, x):
    gate = nn.Dense(self.hidden, use_bias=False, name="gate_proj")(x)
    up = nn.Dense(self.hidden, use_bias=False, name="up_proj")(x)
    return nn.Dense(x.shape[-1], use_bias=False, name="down_proj")(self.act(gate) * up)


ACTS = {"gelu": nn.gelu, "silu": nn.silu, "relu": nn.relu}


def modes(hidden: int, activation: str, bits: int, ratio: float) -> dict:
  g = lambda **kw: fb.linen.GatedMLP(hidden, activation=activation, **kw)
  return {
      "flax (nn.Dense, act(gate) * up)": FlaxMLP(hidden, ACTS[activation]),
      "GatedMLP exact": g(),
      f"GatedMLP bits={bits}": g(bits=bits),
      f"GatedMLP exact + randomized {ratio}": g(proj_dim_ratio=ratio),
      f"GatedMLP bits={bits} + randomized {ratio}": g(bits=bits, proj_dim_ratio=ratio),
  }


def measure(model, x, ct) -> tuple[int, int]:
  """(residual bytes beyond the parameters and ct, compiled temp bytes) of the gradient."""
  params = model.init(jax.random.key(0), x)
  key = jax.random.key(1)

  def loss(params, x):  # ct a constant of the loss: kept by it, not by the MLP
    return (model.apply(params, x, rngs={"sketch": key}) * ct).sum()

  res = memory.saved_residuals(loss, params, x)
  kept = res.total_bytes - sum(a.nbytes for a in jax.tree.leaves(params)) - ct.nbytes
  temp = memory.compiled(jax.grad(loss, (0, 1)), params, x).temp
  return kept, temp


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=1024)
  p.add_argument("--d", type=int, default=256)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--activation", default="gelu", choices=sorted(ACTS))
  p.add_argument("--bits", type=int, default=None, help="default 3 (1 for relu)")
  p.add_argument("--ratio", type=float, default=0.2)
  p.add_argument("--dtype", default="float32")
  a = p.parse_args(argv)
  bits = a.bits or (1 if a.activation == "relu" else 3)
  dtype = jnp.dtype(a.dtype)
  x = jax.random.normal(jax.random.key(2), (a.tokens, a.d), dtype)
  ct = jax.random.normal(jax.random.key(3), (a.tokens, a.d), dtype)
  row = a.hidden * dtype.itemsize
  print(f"gated MLP {a.d} -> {a.hidden} -> {a.d}, {a.activation}, {a.tokens} tokens, "
        f"{dtype.name}; one hidden row = {row} B")
  print("| mode | kept / token | in hidden rows | temp / token |")
  print("|---|---|---|---|")
  for name, model in modes(a.hidden, a.activation, bits, a.ratio).items():
    kept, temp = measure(model, x, ct)
    print(f"| {name} | {kept / a.tokens:.0f} B | {kept / a.tokens / row:.2f} | "
          f"{temp / a.tokens:.0f} B |")


if __name__ == "__main__":
  main()
