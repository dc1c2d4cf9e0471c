"""A small GPT on characters of real text: vanilla, few-bit, randomized.

The text is the Python reference documentation that ships with every
CPython (``pydoc_data.topics``, about 465k characters of English and code),
so the example runs offline. The same Flax NNX model (pre-LayerNorm, causal
attention, GELU MLP) is trained from the same initialisation on the same
batches four ways:

* vanilla: ``nnx.Linear`` and ``jax.nn.gelu``;
* 3-bit GELU: ``fewbit_jax.gelu(bits=3)`` in place of ``jax.nn.gelu``;
* randomized: every ``nnx.Linear`` a ``fewbit_jax.nnx.RandomizedLinear``
  keeping a sketch of 20% of the rows (``--ratio``; same parameters, drawn
  from the same rngs), one
  sketch block per sequence (``sketch_blocks=batch``): a single Gaussian
  sketch over all 4096 positions of a batch would cost more than the layers'
  matmuls (k * B * N multiply-adds for k = 0.2 B), per-sequence blocks cost
  a batch-size-th of that and keep the estimate unbiased;
* both.

It prints the final validation loss (nats per character) of each and the
memory of its jitted training step, and writes the loss curves to
``examples/figures/char_gpt.png``.

Usage (from the repository root):
  python -m examples.char_gpt                         # 4 x 500 steps
  python -m examples.char_gpt --steps 100 --layers 1  # a quick look
  python -m examples.char_gpt --finetune-from 500 --steps 200 --lr 5e-4  # fine-tuning
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from examples import _common


def fewbit_gelu(bits: int = 3) -> Callable:
  from fewbit_jax import activations
  return activations.gelu(bits=bits)


def randomized(ratio: float = 0.2, blocks: int | None = None, kind: str = "gaussian") -> Callable:
  """RandomizedLinear keeping a `ratio` sketch of kind `kind` in `blocks` blocks, called like nnx.Linear."""
  from fewbit_jax import nnx as fb_nnx
  return functools.partial(fb_nnx.RandomizedLinear, proj_dim_ratio=ratio, sketch_blocks=blocks,
                           sketch=kind)


# Each variant: (sequences per batch = sketch blocks, sketch ratio, sketch
# kind) -> keyword arguments of CharGPT.
VARIANTS: dict[str, Callable[[int | None, float, str], dict]] = {
    "vanilla": lambda batch, ratio, kind: {},
    "3-bit GELU": lambda batch, ratio, kind: dict(activation=fewbit_gelu(3)),
    "randomized": lambda batch, ratio, kind: dict(linear=randomized(ratio, batch, kind)),
    "both": lambda batch, ratio, kind: dict(activation=fewbit_gelu(3),
                                            linear=randomized(ratio, batch, kind)),
}


def load_text() -> str:
  """The Python reference documentation shipped with CPython, one topic after another."""
  from pydoc_data import topics
  return "\n".join(topics.topics[k] for k in sorted(topics.topics))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, dim: int, heads: int, activation: Callable, linear: Callable, *,
               rngs: nnx.Rngs):
    self.heads = heads
    self.activation = activation
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = linear(dim, 3 * dim, rngs=rngs)
    self.proj = linear(dim, dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc = linear(dim, 4 * dim, rngs=rngs)
    self.out = linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3 * self.heads, -1), 3, axis=2)
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(att.reshape(b, t, d))
    return x + self.out(self.activation(self.fc(self.ln2(x))))


class CharGPT(nnx.Module):
  """Token and position embeddings, `layers` blocks, a final LayerNorm and a head.

  `activation` is the MLP's activation and `linear` the class of every dense
  layer (called like ``nnx.Linear``): the two injection points of the example.
  """

  def __init__(self, vocab: int, *, context: int = 128, dim: int = 128, heads: int = 4,
               layers: int = 2, activation: Callable = jax.nn.gelu,
               linear: Callable = nnx.Linear, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, dim)))
    self.blocks = nnx.List([Block(dim, heads, activation, linear, rngs=rngs)
                            for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(dim, rngs=rngs)
    self.head = linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def build(variant: str, vocab: int, seed: int = 0, batch: int | None = None,
          ratio: float = 0.2, kind: str = "gaussian", **sizes) -> CharGPT:
  """The model of a variant for batches of `batch` sequences.

  Every variant starts from the same parameters: they come from the
  ``params`` stream, the sketches of the randomized layers from the separate
  ``sketch`` stream. The randomized layers keep `ratio` of the rows, with
  one sketch block per sequence, or with ``batch=None`` the rule of
  ``fewbit_jax.dense.sketch_blocks_default`` (one sketch without a mesh).
  """
  return CharGPT(vocab, rngs=nnx.Rngs(params=seed, sketch=seed + 1),
                 **VARIANTS[variant](batch, ratio, kind), **sizes)


def make_step(graphdef, tx):
  """Jitted train step ``(state, opt_state, x, y) -> (state, opt_state, loss)`` and
  evaluation ``(state, x, y) -> loss``, on the split NNX state."""
  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  def step(state, opt_state, x, y):
    model = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    params = nnx.state(model, nnx.Param)
    updates, opt_state = tx.update(grads, opt_state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    return nnx.state(model), opt_state, loss

  def evaluate(state, x, y):
    return loss_fn(nnx.merge(graphdef, state), x, y)

  return jax.jit(step, donate_argnums=(0, 1)), jax.jit(evaluate)


def batches(data: np.ndarray, batch: int, context: int, rng: np.random.Generator):
  """Random windows of `context` + 1 characters: inputs and next-character targets."""
  starts = rng.integers(0, len(data) - context - 1, batch)
  win = np.stack([data[s:s + context + 1] for s in starts])
  return win[:, :-1], win[:, 1:]


def train(variant: str, train_data, val_batches, vocab: int, *, steps: int = 500,
          batch: int = 32, context: int = 128, dim: int = 128, heads: int = 4,
          layers: int = 2, lr: float = 3e-3, seed: int = 0, eval_every: int = 50,
          ratio: float = 0.2, kind: str = "gaussian", params=None,
          data_seed: int | None = None, bar=None) -> dict:
  """Trains one variant; returns train and validation losses, memory and parameters.

  `params` (an ``nnx.State`` of ``nnx.Param``, e.g. another run's ``params``)
  replaces the initial parameters: fine-tuning. Batches come from
  `data_seed` (default `seed`).
  """
  model = build(variant, vocab, seed, batch, ratio, kind, context=context, dim=dim,
                heads=heads, layers=layers)
  if params is not None:  # copies: the step donates its state
    nnx.update(model, jax.tree.map(jnp.copy, params))
  graphdef, state = nnx.split(model)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps),
                   weight_decay=0.01)
  opt_state = tx.init(nnx.state(model, nnx.Param))
  step, evaluate = make_step(graphdef, tx)

  tokens = np.zeros((batch, context), np.int32)
  step, memory = _common.compile_with_memory(step, state, opt_state, tokens, tokens)

  rng = np.random.default_rng(seed if data_seed is None else data_seed)  # same for all
  losses, val, val_at = [], [], []
  for i in range(steps):
    x, y = batches(train_data, batch, context, rng)
    state, opt_state, loss = step(state, opt_state, x, y)
    losses.append(float(loss))
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      val.append(float(np.mean([evaluate(state, vx, vy) for vx, vy in val_batches])))
      val_at.append(i + 1)
    if bar is not None:
      bar.update(1)
      if i % 10 == 0:
        bar.set_postfix_str(f"{variant}, loss {losses[-1]:.3f}", refresh=False)
  return dict(losses=losses, val=val, val_at=val_at, final_val=val[-1], memory=memory,
              params=nnx.state(nnx.merge(graphdef, state), nnx.Param))


def run(variants=tuple(VARIANTS), *, steps: int = 500, batch: int = 32, context: int = 128,
        dim: int = 128, heads: int = 4, layers: int = 2, seed: int = 0, eval_batches: int = 8,
        eval_every: int = 50, text_chars: int | None = None, plot: str | None = None,
        ratio: float = 0.2, kind: str = "gaussian", finetune_from: int = 0,
        lr: float = 3e-3, progress: bool = True) -> dict:
  """Trains every variant; returns {variant: result}.

  With ``finetune_from=N`` the variants do not start from scratch: a vanilla
  model is trained for N steps first, and every variant continues from its
  parameters for `steps` steps (a fresh optimizer, later batches), as when
  fine-tuning a pre-trained model. `lr` is the variants' peak learning rate
  (the vanilla pre-training keeps 3e-3).
  """
  text = load_text()[:text_chars]
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  data = np.fromiter((lookup[c] for c in text), np.int32, len(text))
  split = int(0.9 * len(data))
  train_data, val_data = data[:split], data[split:]
  vrng = np.random.default_rng(1234)
  val_batches = [batches(val_data, batch, context, vrng) for _ in range(eval_batches)]
  results, start = {}, None
  common = dict(batch=batch, context=context, dim=dim, heads=heads, layers=layers, seed=seed,
                eval_every=eval_every, ratio=ratio, kind=kind)
  with tqdm(total=steps * len(variants) + finetune_from, disable=not progress, unit="step",
            desc="char GPT", mininterval=0.5) as bar:
    if finetune_from:
      start = train("vanilla", train_data, val_batches, len(chars), steps=finetune_from,
                    bar=bar, **common)["params"]
    for v in variants:
      results[v] = train(v, train_data, val_batches, len(chars), steps=steps, params=start,
                         data_seed=None if start is None else seed + 1, lr=lr, bar=bar,
                         **common)
  if plot:
    title = "char GPT on pydoc_data.topics, train loss"
    if finetune_from:
      title = f"char GPT, after {finetune_from} vanilla steps, train loss"
    _common.plot_curves(
        {v: r["losses"] for v, r in results.items()}, plot,
        title=title, ylabel="nats / char",
        window=max(1, steps // 30),
        second={v: r["val"] for v, r in results.items()}, second_label="validation loss",
        second_x={v: r["val_at"] for v, r in results.items()})
  return results


def format_results(results: dict) -> str:
  """Markdown table: final validation loss and memory per variant."""
  base = results.get("vanilla")
  lines = ["| variant | validation loss (nats/char) | vs vanilla | step memory (compiled) | "
           "vs vanilla |", "|---|---|---|---|---|"]
  for v, r in results.items():
    rel = mem = "-"
    if base is not None and v != "vanilla":
      rel = f"{100 * (r['final_val'] / base['final_val'] - 1):+.2f}%"
      mem = f"{100 * (r['memory'] / base['memory'] - 1):+.1f}%"
    lines.append(f"| {v} | {r['final_val']:.4f} | {rel} | {r['memory'] / 2**20:.1f} MiB | "
                 f"{mem} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("Usage")[1])
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--context", type=int, default=128)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ratio", type=float, default=0.2,
                 help="proj_dim_ratio of the randomized layers")
  p.add_argument("--kind", default="gaussian",
                 help="sketch kind of the randomized layers (fewbit_jax.sketch.ALL_KINDS)")
  p.add_argument("--finetune-from", type=int, default=0, metavar="N",
                 help="train vanilla for N steps, then every variant from there")
  p.add_argument("--lr", type=float, default=3e-3, help="the variants' peak learning rate")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"comma-separated, among {list(VARIANTS)}")
  p.add_argument("--plot", default=os.path.join(_common.FIGURES, "char_gpt.png"))
  p.add_argument("--no-plot", action="store_true")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  results = run([v.strip() for v in args.variants.split(",")], steps=args.steps,
                batch=args.batch, context=args.context, dim=args.dim, heads=args.heads,
                layers=args.layers, seed=args.seed, ratio=args.ratio, kind=args.kind,
                finetune_from=args.finetune_from, lr=args.lr,
                plot=None if args.no_plot else args.plot)
  print(f"\nchar GPT ({args.layers} layers, dim {args.dim}, {args.heads} heads, context "
        f"{args.context}) on pydoc_data.topics, batch {args.batch}, {args.steps} steps at "
        f"peak learning rate {args.lr:g} "
        f"({time.perf_counter() - t0:.0f}s); randomized: every linear layer keeps "
        f"{args.ratio:.0%} of the rows ({args.kind} sketch), one sketch block per sequence"
        + (f"; every variant fine-tunes the model of {args.finetune_from} vanilla steps"
           if args.finetune_from else "") + "\n")
  print(format_results(results))
  if not args.no_plot:
    print(f"\nloss curves: {os.path.relpath(args.plot)}")


if __name__ == "__main__":
  main()
