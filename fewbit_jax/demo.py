"""The main demonstration: memory and time of a small transformer training step.

``python -m fewbit_jax bench`` builds the benchmarks' RoBERTa classifier
(`fewbit_jax._models.roberta`, the one definition the memory table measures
at roberta-base sizes) small and without dropout (defaults: 2 layers, hidden
256, 4 heads, FFN 1024, exact GELU, batch 32 x sequence 128, padded as a GLUE
batch is), trains it with ``optax.adamw``, and prints for six variants
(vanilla; 3-bit GELU; randomized dense at ratio 0.2 in every dense layer of the
blocks, one sketch block per sequence; both; lean exact residuals with
exact-mode GELU; both with lean):

- XLA's compiled memory of the jitted training step (arguments + outputs -
  aliased + temporaries; exact and deterministic on CPU, no run needed) and
  the temporaries alone;
- the step time as a ratio to vanilla (median of several steps, same process).

``--full`` uses RoBERTa-base sizes (12 layers, hidden 768, batch 128 x 128)
for memory only (compiling it takes a few minutes on a laptop CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from typing import Any

import jax
import numpy as np
import flax.linen as nn

try:  # the `demo` extra: the main job trains with optax's AdamW
  import optax
except ImportError as e:  # pragma: no cover - depends on the install
  raise ImportError("fewbit-jax bench trains with optax.adamw, which the library itself does "
                    "not need: install it with pip install \"fewbit-jax[demo]\" (or pip "
                    "install optax).") from e

import fewbit_jax as fb
from fewbit_jax._models.roberta import RobertaClassifier, RobertaConfig, make_batch
from fewbit_jax.linen import RandomizedDense

__all__ = ["Config", "FULL", "encoder", "variants", "measure", "run", "format_table", "main"]


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the demonstration's encoder and batch (the defaults: the small main job)."""
  layers: int = 2
  hidden: int = 256
  heads: int = 4
  ffn: int = 1024
  vocab: int = 1000
  seq: int = 128
  batch: int = 32
  classes: int = 2


# RoBERTa-base sizes, for ``--full``.
FULL = Config(layers=12, hidden=768, heads=12, ffn=3072, vocab=50265, seq=128, batch=128)


def encoder(cfg: Config, **fields) -> RobertaClassifier:
  """The demonstration's model: the benchmarks' RoBERTa classifier at `cfg`'s sizes.

  The one definition of `fewbit_jax._models.roberta` (post-LayerNorm encoder,
  exact GELU, learned positions, a tanh head on the first token), with no
  dropout: every variant computes the same function, so the table compares
  only what each keeps. `fields` are the classifier's (``activation``,
  ``dense``, ...); ``dense`` replaces the blocks' dense layers, the head
  stays ``nn.Dense``.

  Example:
    >>> from fewbit_jax import demo
    >>> cfg = demo.Config(layers=1, hidden=32, heads=2, ffn=64, vocab=50, seq=8, batch=2)
    >>> m = demo.encoder(cfg)
    >>> (m.cfg.num_layers, m.cfg.hidden_size, m.cfg.dropout_rate)
    (1, 32, 0.0)
  """
  rcfg = RobertaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_layers=cfg.layers,
                       num_heads=cfg.heads, intermediate_size=cfg.ffn,
                       max_position_embeddings=cfg.seq + 2, dropout_rate=0.0,
                       num_labels=cfg.classes)
  return RobertaClassifier(rcfg, **{"head_dense": nn.Dense, **fields})


def variants(ratio: float = 0.2, bits: int = 3,
             blocks: int | None = None) -> dict[str, dict[str, Any]]:
  """The variants; the randomized layers take `blocks` sketch blocks.

  A variant is `encoder`'s fields, and ``lean=True`` to trace the step
  inside ``fb.linen.lean()`` and ``fb.patch_activations(softmax=True)``: the
  unedited model's LayerNorms and inline softmax run their lean twins (the
  same output, exact gradients, less kept).
  """
  rd = functools.partial(RandomizedDense, proj_dim_ratio=ratio, sketch_blocks=blocks)
  gelu = fb.gelu(approximate=False, bits=bits)
  return {
      "vanilla": {},
      f"{bits}-bit GELU": {"activation": gelu},
      f"randomized dense {ratio:g}": {"dense": rd},
      "both": {"activation": gelu, "dense": rd},
      "lean (exact)": {"activation": fb.gelu(approximate=False, exact=True), "lean": True},
      "both + lean": {"activation": gelu, "dense": rd, "lean": True},
  }


@contextlib.contextmanager
def _lean(on: bool):
  """The lean conversions of an unedited model while its step is traced."""
  if not on:
    yield
    return
  with fb.linen.lean(warn_unused=False), fb.patch_activations(softmax=True, warn_unused=False):
    yield


def make_step(model: nn.Module, tx: optax.GradientTransformation):
  def loss_fn(params, batch, key):
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         rngs={"sketch": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  @jax.jit
  def step(params, opt_state, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def measure(cfg: Config, variant: dict, *, time_steps: int = 0, seed: int = 0) -> dict:
  """{'total', 'temp'} compiled bytes of one variant's step, and 'time', 'loss' if timed."""
  variant = dict(variant)
  lean = variant.pop("lean", False)
  model = encoder(cfg, **variant)
  key = jax.random.key(seed)
  batch = make_batch(model.cfg, cfg.batch, cfg.seq, key)  # padded rows, as a GLUE batch
  ids, mask = batch["input_ids"], batch["attention_mask"]
  params = jax.eval_shape(lambda: model.init({"params": key, "sketch": key}, ids, mask)["params"])
  tx = optax.adamw(1e-4)
  opt_state = jax.eval_shape(tx.init, params)
  step = make_step(model, tx)
  with _lean(lean):
    compiled = step.lower(params, opt_state, batch, key).compile()
  m = fb.memory.CompiledMemory.of(compiled)  # argument + output - alias + temp
  out = {"total": m.total, "temp": m.temp}
  if time_steps:
    params = model.init({"params": key, "sketch": key}, ids, mask)["params"]
    opt_state = tx.init(params)
    times = []
    for i in range(time_steps + 1):
      t0 = time.perf_counter()
      params, opt_state, loss = compiled(params, opt_state, batch, jax.random.fold_in(key, i))
      loss.block_until_ready()
      times.append(time.perf_counter() - t0)
    out["time"] = float(np.median(times[1:]))
    out["loss"] = float(loss)
  return out


def run(cfg: Config, *, time_steps: int, log=print) -> list[tuple[str, dict]]:
  """(variant name, `measure`'s dict) for every variant, one sketch block per sequence."""
  rows = []
  vs = variants(blocks=cfg.batch)  # one sketch per sequence: see RandomizedDense
  for i, (name, v) in enumerate(vs.items()):
    log(f"[{i + 1}/{len(vs)}] {name} ...")
    rows.append((name, measure(cfg, v, time_steps=time_steps)))
  return rows


def format_table(cfg: Config, rows) -> str:
  """The Markdown table the main job prints (the README's rows)."""
  base = rows[0][1]
  gib = 2.0 ** 30
  lines = [f"config: {cfg}", "",
           "| variant | compiled memory (GiB) | saving | temp (GiB) |"
           + (" step time vs vanilla |" if "time" in base else ""),
           "|---|---|---|---|" + ("---|" if "time" in base else "")]
  for name, r in rows:
    saving = 1.0 - r["total"] / base["total"]
    line = f"| {name} | {r['total'] / gib:.3f} | {100 * saving:.1f}% | {r['temp'] / gib:.3f} |"
    if "time" in r:
      line += f" {r['time'] / base['time']:.2f}x |"
    lines.append(line)
  return "\n".join(lines)


def main(args=None) -> int:
  """``fewbit-jax bench [--full]``: print the table."""
  full = bool(getattr(args, "full", False))
  cfg = FULL if full else Config()
  paths = ", ".join(f"{op} {fb.ext.active_path(op=op)}" for op in fb.ext.OPS)
  print(f"fewbit-jax demo on {jax.default_backend()} (path of each op: {paths}); "
        "memory from XLA's compiled memory analysis", flush=True)
  rows = run(cfg, time_steps=0 if full else 5,
             log=lambda s: print(s, file=sys.stderr, flush=True))
  print(format_table(cfg, rows))
  print("randomized dense: every dense layer of the blocks keeps a sketch of 20% of its "
        "input rows, one per sequence (sketch_blocks=batch)")
  return 0
