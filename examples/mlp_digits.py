"""An MLP on scikit-learn's handwritten digits: vanilla, few-bit, randomized.

Trains the same GELU MLP (same initialisation, same batches) four ways and
prints the test accuracy of each (mean and spread over seeds) and the
memory of its jitted training step:

* vanilla: ``flax.linen.Dense`` and ``jax.nn.gelu``;
* 3-bit GELU: ``fewbit_jax.gelu(bits=3)`` in place of ``jax.nn.gelu``;
* randomized 20%: every dense layer a ``RandomizedDense`` keeping a 20% sketch;
* both.

The loss curves go to ``examples/figures/mlp_digits.png``.

Usage (from the repository root):
  python -m examples.mlp_digits                  # 3 seeds x 40 epochs, ~1 min
  python -m examples.mlp_digits --seeds 1 --epochs 5 --no-plot
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from examples import _common


def fewbit_gelu(bits: int = 3) -> Callable:
  from fewbit_jax import activations
  return activations.gelu(bits=bits)


def randomized(ratio: float = 0.2) -> Callable:
  from fewbit_jax import linen
  return functools.partial(linen.RandomizedDense, proj_dim_ratio=ratio)


VARIANTS: dict[str, Callable[[], dict]] = {
    "vanilla": lambda: {},
    "3-bit GELU": lambda: dict(activation=fewbit_gelu(3)),
    "randomized 20%": lambda: dict(dense=randomized(0.2)),
    "both": lambda: dict(activation=fewbit_gelu(3), dense=randomized(0.2)),
}


class MLP(nn.Module):
  """``depth`` hidden GELU layers of width ``hidden``, then a linear classifier."""
  hidden: int = 256
  depth: int = 2
  classes: int = 10
  activation: Callable = jax.nn.gelu
  dense: Callable[..., nn.Module] = nn.Dense

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth):
      x = self.activation(self.dense(self.hidden, name=f"hidden_{i}")(x))
    return self.dense(self.classes, name="logits")(x)


def load_digits(seed: int = 0, test_fraction: float = 0.2):
  """Standardised 8x8 digits as float32 (x_train, y_train, x_test, y_test)."""
  from sklearn.datasets import load_digits as _load
  from sklearn.model_selection import train_test_split
  x, y = _load(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                            stratify=y)
  mean, std = x_tr.mean(0), x_tr.std(0) + 1.0
  f = lambda a: ((a - mean) / std).astype(np.float32)
  return f(x_tr), y_tr.astype(np.int32), f(x_te), y_te.astype(np.int32)


def make_step(model: MLP, tx: optax.GradientTransformation):
  """Jitted ``(params, opt_state, x, y, key) -> (params, opt_state, loss)``."""
  def loss_fn(params, x, y, key):
    logits = model.apply({"params": params}, x, rngs={"sketch": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def train(variant: str, data, *, seed: int = 0, epochs: int = 40, batch: int = 128,
          hidden: int = 256, depth: int = 2, lr: float = 2e-3, bar=None) -> dict:
  """Trains one variant; returns its losses, per-epoch test accuracy and memory."""
  x_tr, y_tr, x_te, y_te = data
  model = MLP(hidden=hidden, depth=depth, **VARIANTS[variant]())
  tx = optax.adamw(optax.cosine_decay_schedule(lr, epochs * (len(x_tr) // batch)),
                   weight_decay=1e-4)
  key = jax.random.key(seed)
  params = model.init({"params": key, "sketch": key}, x_tr[:batch])["params"]
  opt_state = tx.init(params)
  step = make_step(model, tx)
  # The forward pass is the same with or without a sketch; RandomizedDense
  # still asks for its rng stream outside of training.
  predict = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                             rngs={"sketch": key}).argmax(-1))

  step, memory = _common.compile_with_memory(
      step, params, opt_state, x_tr[:batch], y_tr[:batch], jax.random.key(0))

  rng = np.random.default_rng(seed)  # the same batches for every variant
  losses, accuracy = [], []
  n = 0
  for epoch in range(epochs):
    order = rng.permutation(len(x_tr))
    for i in range(len(x_tr) // batch):
      idx = order[i * batch:(i + 1) * batch]
      params, opt_state, loss = step(params, opt_state, x_tr[idx], y_tr[idx],
                                     jax.random.fold_in(key, n))
      losses.append(float(loss))
      n += 1
      if bar is not None:
        bar.update(1)
        if n % 20 == 0:
          bar.set_postfix_str(f"{variant}, seed {seed}, loss {losses[-1]:.3f}", refresh=False)
    accuracy.append(float((np.asarray(predict(params, x_te)) == y_te).mean()))
  return dict(losses=losses, accuracy=accuracy, final_accuracy=accuracy[-1], memory=memory)


def run(variants=tuple(VARIANTS), seeds: int = 3, epochs: int = 40, batch: int = 128,
        hidden: int = 256, depth: int = 2, lr: float = 2e-3, plot: str | None = None,
        progress: bool = True):
  """Trains every variant for every seed; returns {variant: [result per seed]}."""
  data = load_digits(0)
  steps = epochs * (len(data[0]) // batch)
  results = {v: [] for v in variants}
  with tqdm(total=steps * seeds * len(variants), disable=not progress, unit="step",
            desc="digits", mininterval=0.5) as bar:
    for seed in range(seeds):
      for v in variants:
        results[v].append(train(v, data, seed=seed, epochs=epochs, batch=batch,
                                hidden=hidden, depth=depth, lr=lr, bar=bar))
  if plot:
    _common.plot_curves(
        {v: np.mean([r["losses"] for r in rs], 0) for v, rs in results.items()}, plot,
        title=f"digits MLP, train loss (mean of {seeds} seeds)", ylabel="cross-entropy",
        window=max(1, steps // 40),
        second={v: 100 * np.mean([r["accuracy"] for r in rs], 0) for v, rs in results.items()},
        second_label="test accuracy, %",
        second_x={v: np.arange(1, epochs + 1) * (steps // epochs) for v in results}, logy=True)
  return results


def format_results(results: dict) -> str:
  """Markdown table: accuracy (mean and range over seeds) and memory per variant."""
  base = results.get("vanilla")
  lines = ["| variant | test accuracy | vs vanilla | step memory (compiled) | vs vanilla |",
           "|---|---|---|---|---|"]
  for v, rs in results.items():
    acc = np.array([r["final_accuracy"] for r in rs]) * 100
    diff = mem = "-"
    if base is not None and v != "vanilla":
      diff = f"{acc.mean() - np.mean([r['final_accuracy'] for r in base]) * 100:+.2f} pt"
      mem = f"{100 * (rs[0]['memory'] / base[0]['memory'] - 1):+.1f}%"
    spread = f" ({acc.min():.2f}-{acc.max():.2f})" if len(acc) > 1 else ""
    lines.append(f"| {v} | {acc.mean():.2f}%{spread} | {diff} | "
                 f"{rs[0]['memory'] / 2**20:.2f} MiB | {mem} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("Usage")[1])
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--epochs", type=int, default=40)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"comma-separated, among {list(VARIANTS)}")
  p.add_argument("--plot", default=os.path.join(_common.FIGURES, "mlp_digits.png"))
  p.add_argument("--no-plot", action="store_true")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  results = run([v.strip() for v in args.variants.split(",")], seeds=args.seeds,
                epochs=args.epochs, batch=args.batch, hidden=args.hidden, depth=args.depth,
                plot=None if args.no_plot else args.plot)
  print(f"\nscikit-learn digits, MLP {args.depth} x {args.hidden} GELU, batch {args.batch}, "
        f"{args.epochs} epochs, {args.seeds} seed(s) ({time.perf_counter() - t0:.0f}s)\n")
  print(format_results(results))
  if not args.no_plot:
    print(f"\nloss curves: {os.path.relpath(args.plot)}")


if __name__ == "__main__":
  main()
