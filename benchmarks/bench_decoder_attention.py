"""Decoder attention: compiled memory of the gradient, grouped heads and causal masks.

One attention call shaped like a decoder's (default batch 4 x 1024 tokens,
8 query heads sharing 2 key/value heads of 64, float32), differentiated
with respect to q, k and v, under several masks: ``is_causal``; causal with a
sliding window; a boolean padding mask with ``is_causal``; causal with a
Gemma 2 logit soft-cap. For each, XLA's compiled temp bytes of
``jit(grad)`` of:

- ``jax.nn.dot_product_attention(implementation="xla")`` with its own
  ``is_causal`` / ``local_window_size`` (no soft-cap: that row says n/a);
- the einsum way gemma / llama code writes it: k and v repeated to the
  query heads, ``einsum``, (``tanh`` soft-cap), ``jnp.where`` with the
  boolean mask broadcast to the scores, ``jax.nn.softmax``, ``einsum``;
- ``fb.dot_product_attention`` (keeps the probabilities, no mask);
- ``fb.dot_product_attention(..., recompute_block=B)`` (no score-sized
  array: tiles of B x B, the wholly masked ones skipped; the last column
  is the fraction of the tiles it computes, forward and backward).

Compiled only (nothing runs), so it is quick on a CPU.

Usage (from the repository root):
  python -m benchmarks.bench_decoder_attention
  python -m benchmarks.bench_decoder_attention --seq 2048 --block 256 --json out.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import fewbit_jax as fb
from fewbit_jax import attention, memory

MiB = 2**20


def einsum_way(q, k, v, mask, soft_cap=None):
  """Attention as gemma / llama code writes it (k, v repeated, where, softmax)."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  w = jnp.einsum("btnh,bsnh->bnts", q * q.shape[-1] ** -0.5, k)
  if soft_cap is not None:
    w = jnp.tanh(w / soft_cap) * soft_cap
  w = jnp.where(mask, w, jnp.finfo(w.dtype).min)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(w, axis=-1), v)


def cases(t: int, pad, window: int, cap: float):
  """name -> (fb / jax.nn keyword arguments, the explicit [B, 1, T, S] mask, soft_cap)."""
  pos = jnp.arange(t)
  causal = pos[None] <= pos[:, None]
  near = pos[:, None] <= pos[None] + window
  return {
      "is_causal": (dict(is_causal=True), None, causal, None),
      f"causal, window ({window}, 0)": (dict(is_causal=True, local_window_size=(window, 0)),
                                        None, causal & near, None),
      "padding [B,1,T,S] + is_causal": (dict(is_causal=True), pad, pad & causal, None),
      f"is_causal, soft_cap {cap:g}": (dict(is_causal=True), None, causal, cap),
  }


def run(batch: int, seq: int, heads: int, kv_heads: int, depth: int, block: int,
        window: int, cap: float, dtype: str) -> dict:
  dt = jnp.dtype(dtype)
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (batch, seq, heads, depth), dt)
  k, v = (jax.random.normal(kk, (batch, seq, kv_heads, depth), dt) for kk in ks[1:3])
  lengths = jax.random.randint(ks[3], (batch,), seq // 2, seq + 1)
  pad = jnp.broadcast_to((jnp.arange(seq)[None] < lengths[:, None])[:, None, None],
                         (batch, 1, seq, seq))
  grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(jnp.square(f(q, k, v))), argnums=(0, 1, 2))
  temp = lambda f: memory.compiled(grad(f), q, k, v).temp / MiB
  out = {"config": dict(batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, depth=depth,
                        block=block, dtype=dtype, jax=jax.__version__,
                        platform=jax.devices()[0].platform,
                        scores_MiB=batch * heads * seq * seq * dt.itemsize / MiB),
         "rows": {}}
  for name, (kw, mask, full, soft_cap) in cases(seq, pad, window, cap).items():
    row = {}
    if soft_cap is None:
      row["jax.nn (xla)"] = temp(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, mask=mask, implementation="xla", **kw))
    else:
      row["jax.nn (xla)"] = None   # jax.nn.dot_product_attention has no soft-cap
    row["einsum + where"] = temp(lambda q, k, v: einsum_way(q, k, v, full, soft_cap))
    row["fb"] = temp(lambda q, k, v: fb.dot_product_attention(q, k, v, mask=mask,
                                                              soft_cap=soft_cap, **kw))
    row[f"fb recompute_block={block}"] = temp(lambda q, k, v: fb.dot_product_attention(
        q, k, v, mask=mask, soft_cap=soft_cap, recompute_block=block, **kw))
    row["tiles"] = attention.tile_fraction(
        seq, seq, block, is_causal=kw.get("is_causal", False),
        local_window_size=kw.get("local_window_size"))
    out["rows"][name] = row
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--depth", type=int, default=64)
  p.add_argument("--block", type=int, default=128, help="recompute_block of the last row")
  p.add_argument("--window", type=int, default=256, help="left sliding window")
  p.add_argument("--soft-cap", type=float, default=50.0)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--json", help="also write the results here")
  a = p.parse_args(argv)
  res = run(a.batch, a.seq, a.heads, a.kv_heads, a.depth, a.block, a.window, a.soft_cap,
            a.dtype)
  c = res["config"]
  print(f"decoder attention, batch {c['batch']} x {c['seq']}, {c['heads']} query heads, "
        f"{c['kv_heads']} key/value heads x {c['depth']}, {c['dtype']}, jax {c['jax']}, "
        f"{c['platform']}; one score-sized array: {c['scores_MiB']:.0f} MiB")
  print("compiled temp of jit(grad) w.r.t. q, k, v (MiB)\n")
  cols = [n for n in next(iter(res["rows"].values())) if n != "tiles"]
  print("| mask | " + " | ".join(cols) + " | tiles computed |")
  print("|---" * (len(cols) + 2) + "|")
  for name, row in res["rows"].items():
    cells = ["n/a" if row[c] is None else f"{row[c]:.1f}" for c in cols]
    print(f"| {name} | " + " | ".join(cells) + f" | {100 * row['tiles']:.1f}% |")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
