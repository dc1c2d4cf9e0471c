"""Memory and time of a RoBERTa-base training step under each fewbit option.

The original library's table (PyTorch, RoBERTa-base on MRPC, batch 128,
sequence 128, peak GPU memory) reports savings of 13.8% for 3-bit GELU,
18.6% for randomized linear layers at 20% and 32.7% for both. This script
prints the same rows for the Flax model in ``benchmarks/roberta.py`` trained
with ``optax.adamw``, plus rows the original lacks.

Memory is XLA's compiled memory analysis of the jitted training step
(argument + output - alias + temp bytes): it needs no run and no memory, and
on CPU it is exact and deterministic. With ``--real`` each row also runs two
steps in a fresh process and reports the device's ``peak_bytes_in_use``
(a GPU or TPU; CPU devices keep no such statistic).

The last memory column is what the backward pass keeps for one encoder
layer according to JAX's jaxpr, before XLA (``benchmarks/residuals.py``
lists the arrays): the same on every backend. XLA's CPU compiler computes
much bfloat16 arithmetic in float32, so the compiled bf16 rows overstate
what a GPU would allocate; that column does not.

Time is the wall time of a step on a smaller configuration that runs on a
laptop CPU (``--time-layers`` layers, ``--time-batch`` x ``--seq``), as the
ratio of its median to that of vanilla steps alternated with it in the same
process, so that load from other processes hits both alike.

Usage (from the repository root):
  python -m benchmarks.memory_table            # the original's four rows
  python -m benchmarks.memory_table --full     # every row
  python -m benchmarks.memory_table --rows bits,ratio --layers 4
  python -m benchmarks.memory_table --rows main,lean --figure examples/figures/memory.png
  python -m benchmarks.memory_table --full --real   # on a GPU machine
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from benchmarks import roberta
from fewbit_jax import memory

GiB = 2.0 ** 30

# XLA's CPU pipeline expands optimization barriers before its last CSE pass,
# which merges jax.checkpoint's recomputation back into the forward pass and
# so undoes every remat (remat of each layer saved 4% instead of 73%); the
# GPU and TPU pipelines keep the barriers. On CPU we compile without that pass
# (fb.memory.KEEP_REMAT), so the remat rows show what they do on an
# accelerator; programs without jax.checkpoint have no barriers and do not
# change. Memory-only compiles skip LLVM's optimisation (fb.memory.MEMORY_ONLY:
# the same analysis, two to three times faster).


def compiler_options(memory_only: bool) -> dict:
  """Compile options for the CPU measurements (none on other platforms)."""
  if jax.devices()[0].platform != "cpu":
    return {}
  return memory.compiler_options(keep_remat=True, memory_only=memory_only)


# --------------------------------------------------------------------------
# The rows.


def fewbit_gelu(bits: int = 3) -> Callable:
  """Few-bit exact-erf GELU (RoBERTa's activation)."""
  from fewbit_jax import activations
  return activations.gelu(approximate=False, bits=bits)


def randomized_dense(ratio: float = 0.2, sketch: str = "gaussian") -> Callable:
  """The randomized dense class for every dense layer of the model."""
  from fewbit_jax import linen
  return functools.partial(linen.RandomizedDense, proj_dim_ratio=ratio, sketch=sketch)


def lean_attention(q, k, v, mask_bias, key, rate: float):
  """`roberta.attention_core` as `fewbit_jax.dot_product_attention` (keeps no dropout mask)."""
  import fewbit_jax as fb
  return fb.dot_product_attention(q, k, v, bias=mask_bias, dropout_rng=key,
                                  dropout_rate=rate if key is not None else 0.0,
                                  broadcast_dropout=False, deterministic=key is None)


def lean(bits: int | None = None, ratio: float | None = None) -> Callable[[], dict]:
  """Lean norms, dropout and attention; a `bits`-bit GELU (else exact mode) and
  randomized dense layers at `ratio` (else plain ones)."""
  def model():
    import fewbit_jax as fb
    act = fb.gelu(approximate=False, exact=True) if bits is None else fewbit_gelu(bits)
    parts = dict(layer_norm=fb.LayerNorm, dropout=fb.Dropout, attention=lean_attention,
                 activation=act)
    if ratio is not None:
      parts["dense"] = randomized_dense(ratio)
    return parts
  return model


def fewbit_policy(dots: bool = False):
  """Remat policy keeping few-bit codes and sketches (and matmul outputs if `dots`)."""
  from fewbit_jax import remat
  return remat.checkpoint_policy(dots=dots)


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration of the model: a name, a group and its model fields."""
  name: str
  group: str
  model: Callable[[], dict]  # -> keyword arguments of RobertaClassifier
  original: tuple[float, float] | None = None  # the original's (GiB, saving %)


def _both(bits=3, ratio=0.2, **extra):
  return lambda: dict(activation=fewbit_gelu(bits), dense=randomized_dense(ratio), **extra)


# The original's vanilla peak (PyTorch, RoBERTa-base, MRPC, batch 128, GPU).
ORIGINAL_VANILLA_GIB = 11.30
SKETCHES = ("gaussian", "rademacher", "dct", "dft", "countsketch")

ROWS: tuple[Row, ...] = (
    Row("vanilla", "main", lambda: {}),
    Row("3-bit GELU", "main", lambda: dict(activation=fewbit_gelu(3)), (9.75, 13.8)),
    Row("randomized dense 20%", "main", lambda: dict(dense=randomized_dense(0.2)),
        (9.20, 18.6)),
    Row("3-bit GELU + randomized 20%", "main", _both(), (7.60, 32.7)),
    # What a JAX user would try instead, and the two combined.
    Row("jax.checkpoint(gelu)", "remat", lambda: dict(remat=("activation",))),
    Row("jax.checkpoint(each layer)", "remat", lambda: dict(remat=("block",))),
    Row("jax.checkpoint(each layer) keeping dots", "remat",
        lambda: dict(remat=("block",),
                     remat_policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)),
    Row("3-bit GELU + checkpoint(each layer) keeping dots+codes", "remat",
        lambda: dict(activation=fewbit_gelu(3), remat=("block",),
                     remat_policy=fewbit_policy(dots=True))),
    Row("both + checkpoint(each layer) keeping codes+sketches", "remat",
        lambda: dict(_both()(), remat=("block",), remat_policy=fewbit_policy())),
    # Closing the randomized-dense gap: flax's LayerNorm and the softmax keep
    # full-size arrays of their own (see benchmarks/residuals.py); remat of
    # just those keeps only their inputs. Each pair: without, then with.
    Row("jax.checkpoint(LayerNorm)", "gap", lambda: dict(remat=("layer_norm",))),
    Row("randomized 20% + checkpoint(LayerNorm)", "gap",
        lambda: dict(dense=randomized_dense(0.2), remat=("layer_norm",))),
    Row("jax.checkpoint(LayerNorm+attention)", "gap",
        lambda: dict(remat=("layer_norm", "attention"))),
    Row("randomized 20% + checkpoint(LayerNorm+attention)", "gap",
        lambda: dict(dense=randomized_dense(0.2), remat=("layer_norm", "attention"))),
    Row("both + checkpoint(LayerNorm+attention)", "gap",
        _both(remat=("layer_norm", "attention"))),
    # Lean exact residuals: norms, softmax/attention and dropout keep the least
    # their exact gradients need, alone and with the two approximations.
    Row("lean", "lean", lean()),
    Row("3-bit GELU + lean", "lean", lean(bits=3)),
    Row("randomized 20% + lean", "lean", lean(ratio=0.2)),
    Row("3-bit GELU + randomized 20% + lean", "lean", lean(bits=3, ratio=0.2)),
    # Mixed precision: bf16 compute, f32 parameters and optimizer state.
    Row("bf16", "bf16", lambda: dict(dtype=jnp.bfloat16)),
    Row("bf16 + 3-bit GELU", "bf16", lambda: dict(dtype=jnp.bfloat16,
                                                   activation=fewbit_gelu(3))),
    Row("bf16 + both", "bf16", _both(dtype=jnp.bfloat16)),
    *(Row(f"{b}-bit GELU", "bits", lambda b=b: dict(activation=fewbit_gelu(b)))
      for b in (1, 2, 4)),
    *(Row(f"randomized dense {int(r * 100)}%", "ratio",
          lambda r=r: dict(dense=randomized_dense(r))) for r in (0.1, 0.5)),
    *(Row(f"randomized 20% {s}", "sketch", lambda s=s: dict(dense=randomized_dense(0.2, s)))
      for s in SKETCHES[1:]),
)

GROUPS = ("main", "remat", "gap", "lean", "bf16", "bits", "ratio", "sketch")


def select_rows(spec: str | None, full: bool) -> list[Row]:
  """Rows by comma-separated groups or names; vanilla always comes first."""
  if full:
    return list(ROWS)
  wanted = [w.strip() for w in (spec or "main").split(",") if w.strip()]
  bad = [w for w in wanted if w not in GROUPS and w not in {r.name for r in ROWS}]
  if bad:
    raise SystemExit(f"unknown rows {bad}; use groups {GROUPS} or row names "
                     f"{[r.name for r in ROWS]}")
  rows = [r for r in ROWS if r.group in wanted or r.name in wanted]
  return [ROWS[0]] + [r for r in rows if r is not ROWS[0]]


# --------------------------------------------------------------------------
# Measuring.


def build(row: Row, cfg: roberta.RobertaConfig):
  """The model and optimizer of a row."""
  return roberta.RobertaClassifier(cfg, **row.model()), optax.adamw(2e-5)


def compiled_memory(row: Row, cfg: roberta.RobertaConfig, batch: int, seq: int) -> dict:
  """XLA's compiled memory analysis of the row's training step, in bytes."""
  model, tx = build(row, cfg)
  params, opt_state = roberta.init_shapes(model, tx)
  step = roberta.make_train_step(model, tx)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  t0 = time.perf_counter()
  m = memory.compiled(step, params, opt_state, roberta.batch_shapes(batch, seq), key,
                      compiler_options=compiler_options(memory_only=True))
  return dict(argument=m.argument, output=m.output, alias=m.alias, temp=m.temp, total=m.total,
              compile_s=time.perf_counter() - t0)


def residuals_per_layer(row: Row, cfg: roberta.RobertaConfig, batch: int, seq: int) -> int:
  """Bytes the backward keeps for one encoder layer, from JAX's jaxpr (no XLA).

  Platform-independent: what any backend must keep unless it recomputes.
  Measured on the first layer of a two-layer copy of `cfg`, whose output,
  as a middle layer's, feeds another layer (arrays count in the layer that
  makes them).
  """
  two = dataclasses.replace(cfg, num_layers=2)
  return totals(step_residuals(row, two, batch, seq)).get("layer_0", 0)


def step_residuals(row: Row, cfg: roberta.RobertaConfig, batch: int,
                   seq: int) -> memory.ResidualReport:
  """The residuals of the loss of the row's training step, with their keepers."""
  model, _ = build(row, cfg)
  params, _ = roberta.init_shapes(model, optax.adamw(1e-3))

  def loss(params, data, key):
    k_drop, k_sketch = jax.random.split(key)
    logits = model.apply({"params": params}, data["input_ids"], data["attention_mask"],
                         deterministic=False, rngs={"dropout": k_drop, "sketch": k_sketch})
    return optax.softmax_cross_entropy_with_integer_labels(logits, data["labels"]).mean()

  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  return memory.residual_keepers(loss, params, roberta.batch_shapes(batch, seq), key)


def layer_of(scope: str) -> str:
  """'layer_3/attention' -> 'layer_3'; 'outside layers' for embeddings and head."""
  m = re.match(r"layer_(\d+)", scope)
  return f"layer_{m.group(1)}" if m else "outside layers"


def totals(report: memory.ResidualReport) -> dict[str, int]:
  """Bytes of live residuals per layer ('outside layers': embeddings and head).

  Arguments are left out, and so are residuals that no backward op reads
  (zeros that JAX's partial evaluation saves for a select): XLA removes them.
  """
  out: dict[str, int] = {}
  for r in report.residuals:
    if r.kind != "argument" and r.keepers:
      out[layer_of(r.scope)] = out.get(layer_of(r.scope), 0) + r.nbytes
  return out


def _runner(row: Row, cfg: roberta.RobertaConfig, batch: int, seq: int, optimize: bool):
  """A function timing one training step of `row` (compiled and warmed up)."""
  model, tx = build(row, cfg)
  params, opt_state = roberta.init_params(model, tx, jax.random.key(0))
  data = roberta.make_batch(cfg, batch, seq)
  key = jax.random.key(1)
  step = roberta.make_train_step(model, tx).lower(params, opt_state, data, key).compile(
      compiler_options(memory_only=not optimize))
  state = [params, opt_state]

  def sample() -> float:
    t0 = time.perf_counter()
    state[0], state[1], loss = step(state[0], state[1], data, key)
    jax.block_until_ready(loss)
    return time.perf_counter() - t0

  sample()  # warm up
  return sample


def step_times(rows: list[Row], cfg: roberta.RobertaConfig, batch: int, seq: int,
               repeats: int, progress=None, optimize: bool = True) -> dict[str, dict]:
  """Seconds per training step of each row, and the ratio to the first row's.

  Rows are timed one after another; each of the `repeats` rounds times one
  step of the first row (vanilla) and then one of the row, and the ratio is
  that of the medians, so load from other processes hits both alike and only
  two models are in memory at a time. `optimize=False` compiles without LLVM
  optimisation (quicker to build, slower to run: for smoke tests only).

  Returns:
    ``{name: {"seconds": median seconds, "ratio": to the first row}}``.
  """
  base = _runner(rows[0], cfg, batch, seq, optimize)
  out = {}
  for i, row in enumerate(rows):
    run = base if i == 0 else _runner(row, cfg, batch, seq, optimize)
    b, s = [], []
    for _ in range(repeats):
      b.append(base())
      s.append(run() if i else b[-1])
    out[row.name] = dict(seconds=statistics.median(s),
                         ratio=statistics.median(s) / statistics.median(b))
    del run
    if progress:
      progress(f"time {i + 1}/{len(rows)}: {row.name}: {out[row.name]['ratio']:.2f}x")
  return out


def real_peak(row: Row, cfg: roberta.RobertaConfig, batch: int, seq: int) -> int | None:
  """Device peak_bytes_in_use after two real steps (None where not tracked)."""
  model, tx = build(row, cfg)
  params, opt_state = roberta.init_params(model, tx, jax.random.key(0))
  step = roberta.make_train_step(model, tx)
  data = roberta.make_batch(cfg, batch, seq)
  for i in range(2):
    params, opt_state, loss = step(params, opt_state, data, jax.random.key(i))
  jax.block_until_ready(loss)
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats["peak_bytes_in_use"])


def real_peak_subprocess(row: Row, args) -> int | None:
  """`real_peak` in a fresh process, so each row's peak is its own."""
  cmd = [sys.executable, "-m", "benchmarks.memory_table", "--real-one", row.name,
         "--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)]
  if args.tiny:
    cmd.append("--tiny")
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"real run of {row.name!r} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


# --------------------------------------------------------------------------
# The table.


def format_table(results: list[dict], with_time: bool, with_real: bool) -> str:
  """A Markdown table of measured results (the first one is the baseline)."""
  base = results[0]
  unit, scale = ("GiB", GiB) if base["total"] >= GiB / 4 else ("MiB", 2.0 ** 20)
  head = ["configuration", f"compiled {unit}", "saving", f"saved {unit}",
          "original's saving"]
  with_layer = all("layer" in r for r in results)
  if with_layer:
    head += ["kept / layer (jaxpr)"]
  if with_real:
    head += [f"peak {unit} (real)", "saving (real)"]
  if with_time:
    head += ["time / step"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    cells = [r["name"], f"{r['total'] / scale:.2f}",
             "-" if r is base else f"{100 * (1 - r['total'] / base['total']):.1f}%",
             "-" if r is base else f"{(base['total'] - r['total']) / scale:.2f}",
             "-" if r["original"] is None else
             f"{r['original'][1]:.1f}% ({ORIGINAL_VANILLA_GIB - r['original'][0]:.2f} GiB)"]
    if with_layer:
      mib = r["layer"] / 2**20
      cells += [f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.2f} MiB"]
    if with_real:
      if r.get("peak") is None:
        cells += ["n/a", "n/a"]
      else:
        cells += [f"{r['peak'] / scale:.2f}",
                  "-" if r is base else f"{100 * (1 - r['peak'] / base['peak']):.1f}%"]
    if with_time:
      cells += [f"{r['time']['ratio']:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
  """A horizontal bar chart of each row's compiled memory (GiB), saving annotated."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  base = results[0]["total"]
  names = [r["name"] for r in results][::-1]
  gib = [r["total"] / GiB for r in results][::-1]
  colors = ["#888888" if r is results[0] else "#3b75af" if "lean" not in r["name"]
            else "#e1812c" for r in results][::-1]
  fig, ax = plt.subplots(figsize=(8, 0.42 * len(results) + 1.2))
  ax.barh(names, gib, color=colors)
  for y, (g, r) in enumerate(zip(gib, results[::-1])):
    label = "" if r is results[0] else f" -{100 * (1 - r['total'] / base):.1f}%"
    ax.text(g, y, f" {g:.2f}{label}", va="center", fontsize=8)
  ax.set_xlabel("compiled memory of the AdamW step (GiB)")
  ax.set_xlim(0, max(gib) * 1.25)
  ax.set_title("RoBERTa-base, batch 128 x 128: memory by configuration (lean rows orange)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("Usage")[1])
  p.add_argument("--full", action="store_true", help="every row (about 25 compiles)")
  p.add_argument("--rows", help=f"comma-separated groups {GROUPS} or row names "
                                "(default: main)")
  p.add_argument("--layers", type=int, default=12, help="encoder layers for memory")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--time-layers", type=int, default=2)
  p.add_argument("--time-batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=7, help="timed steps per row (0: no timing)")
  p.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests)")
  p.add_argument("--real", action="store_true",
                 help="also run each row on the device and report peak_bytes_in_use")
  p.add_argument("--json", help="also write the results to this file")
  p.add_argument("--figure", help="also draw the rows' memory as a bar chart to this PNG")
  p.add_argument("--real-one", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  base_cfg = roberta.RobertaConfig.tiny() if args.tiny else roberta.RobertaConfig.base()
  cfg = dataclasses.replace(base_cfg, num_layers=args.layers)
  if args.real_one:
    row = next(r for r in ROWS if r.name == args.real_one)
    print(json.dumps({"peak": real_peak(row, cfg, args.batch, args.seq)}))
    return

  rows = select_rows(args.rows, args.full)
  t_start = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr,
                          flush=True)
  print(f"RoBERTa ({cfg.num_layers} layers, hidden {cfg.hidden_size}), batch {args.batch} x "
        f"{args.seq}, optax.adamw step, {jax.devices()[0].platform}, jax {jax.__version__}",
        flush=True)
  results = []
  for i, row in enumerate(rows):
    mem = compiled_memory(row, cfg, args.batch, args.seq)
    res = dict(name=row.name, group=row.group, original=row.original, **mem,
               layer=residuals_per_layer(row, cfg, args.batch, args.seq))
    if args.real:
      res["peak"] = real_peak_subprocess(row, args)
    results.append(res)
    saving = 100 * (1 - mem["total"] / results[0]["total"])
    log(f"memory {i + 1}/{len(rows)}: {row.name}: {mem['total'] / 2**20:.1f} MiB "
        f"({saving:+.1f}% saved; compiled in {mem['compile_s']:.0f}s)")

  if args.repeats > 0:
    tcfg = dataclasses.replace(base_cfg, num_layers=args.time_layers)
    times = step_times(rows, tcfg, args.time_batch, args.seq, args.repeats, progress=log)
    for res in results:
      res["time"] = times[res["name"]]
  print()
  print(format_table(results, with_time=args.repeats > 0, with_real=args.real))
  if args.repeats > 0:
    print(f"\ntime / step: ratio of medians of {args.repeats} steps, each row's alternated "
          f"with vanilla's, {args.time_layers} layers, batch {args.time_batch} x {args.seq}, "
          f"{jax.devices()[0].platform} (vanilla {results[0]['time']['seconds'] * 1e3:.0f} ms).")
  if args.real and results[0].get("peak") is None:
    print("peak GiB (real): n/a, this device keeps no peak_bytes_in_use (run on a GPU).")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  if args.figure:
    plot(results, args.figure)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
  main()
