"""Variance of the randomized layers' weight gradient on a real model's layers, per sketch kind.

The char GPT of ``examples.char_gpt`` (vanilla) is trained on its text; at a
few steps of training (``--steps``) the input x (B x N) and the output
gradient g (B x M) of every dense layer are captured for one training batch
(B = batch x context positions). For each layer and each sketch kind the
estimate of ``dW = x^T g`` is drawn with many keys, as the randomized layer
of the example draws it: one sketch block per sequence (``sketch_blocks =
batch``), ``k = ceil(ratio B)`` rows over the batch, ``ceil(k / batch)``
per block, so every kind keeps the same number of rows of N values (the
sampled kinds also keep one int32 index per row: 1/N more; ``quantized``
keeps every row at the bits those bytes allow, a float32 scale a row
included: 6 bits an element at ratio 0.2 here). Reported: the
relative variance ``E|dW_est - dW|^2 / |dW|^2`` (mean over keys) and its
ratio to the Gaussian sketch's on the same layer.

Usage (from the repository root):
  python -m benchmarks.bench_sketch_variance                 # a few minutes on 2 CPU cores
  python -m benchmarks.bench_sketch_variance --steps 0,30 --keys 64 --layers 1   # a quick look
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples import char_gpt
from fewbit_jax import _quantized, _rng, _sampling, ext, sketch


class Probe(nnx.Variable):
  """A zero added to a layer's output: its gradient is the output gradient g."""


class ProbeLinear(nnx.Linear):
  """nnx.Linear that records its input and adds a Probe (set by `set_probes`) to its output."""

  record = False  # set by `capture`: training steps keep no intermediates

  def __call__(self, x):
    if ProbeLinear.record:
      with warnings.catch_warnings():  # sow outside nnx.capture: fine for a plain eager call
        warnings.simplefilter("ignore", DeprecationWarning)
        self.sow(nnx.Intermediate, "x", x)
    y = super().__call__(x)
    probe = getattr(self, "probe", None)
    return y if probe is None else y + probe[...]


def _layers(model):
  return [(".".join(map(str, path)), m) for path, m in nnx.iter_graph(model)
          if isinstance(m, ProbeLinear)]


def set_probes(model, batch: int, context: int) -> None:
  for _, m in _layers(model):
    m.probe = Probe(jnp.zeros((batch, context, m.out_features), jnp.float32))


def capture(model, x, y) -> dict:
  """{layer name: (x (B, N), g (B, M))} float32 of one batch."""
  def loss_fn(model):
    loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    return loss

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, Probe))(model)
  ProbeLinear.record = True
  try:
    model(x)  # once more, for the inputs
  finally:
    ProbeLinear.record = False
  inter = nnx.pop(model, nnx.Intermediate)
  flat_x = {".".join(map(str, p[:-1])): v for p, v in nnx.to_flat_state(inter)}
  flat_g = {".".join(map(str, p[:-1])): v for p, v in nnx.to_flat_state(grads)}
  out = {}
  for name, m in _layers(model):
    xs = np.asarray(flat_x[name], np.float32)
    gs = np.asarray(flat_g[name], np.float32)
    out[name] = (xs.reshape(-1, xs.shape[-1]), gs.reshape(-1, gs.shape[-1]))
  return out


def estimates(kind: str, x, g, blocks: int, k: int, keys) -> jax.Array:
  """dW estimates (keys, N, M) of `kind` with `blocks` blocks of k rows each."""
  x3, g3 = x.reshape(blocks, -1, x.shape[1]), g.reshape(blocks, -1, g.shape[1])

  def one(key):
    words = sketch.block_keys(key, blocks)
    if kind in sketch.SAMPLED_KINDS:
      rows, idx = sketch.sample_rows_blocks(kind, x3, words, k)
      sg = sketch.take_rows(g3, idx)
    elif kind in sketch.QUANTIZED_KINDS:  # every row, at the bits k rows' bytes allow
      bits = _quantized.bits_for(k, x3.shape[1], x3.shape[2], 4)
      rows = sketch.dequantize_rows(*sketch.quantize_rows(x3, words, bits), bits, x3.shape[2])
      sg = g3
    else:
      rows, sg = (sketch.project_blocks(kind, a, words, k) for a in (x3, g3))
    return jnp.einsum("ckn,ckm->nm", rows, sg)

  return jax.vmap(one)(keys)


_est_chunk = jax.jit(estimates, static_argnums=(0, 3, 4))


def _est(kind, x, g, blocks, k, keys, chunk: int = 16):
  # Chunks of keys from Python rather than lax.map, and small ones for the
  # orthogonal sketch: a loop around its batched QR, or 16 keys of it at
  # N = 512, did not finish on the CPU here (the threads all waiting).
  if kind == "orthogonal":
    chunk = 4
  return jnp.concatenate([_est_chunk(kind, x, g, blocks, k, keys[i:i + chunk])
                          for i in range(0, keys.shape[0], chunk)])


@jax.jit
def _weighted_wta(x3, g3, weights, keys):
  """wta's estimates with rows drawn by `weights` (C, R) in place of |x_i|: still unbiased."""
  k_block = _weighted_wta.k

  def one(key):
    words = jax.vmap(lambda kb: jnp.stack(_rng.sketch_words(kb)))(sketch.block_keys(key, x3.shape[0]))
    idx, w = jax.vmap(lambda a, kw: _sampling.choose("wta", a, kw[0], kw[1], k_block))(weights, words)
    rows = sketch.take_rows(x3, idx) * w[..., None]
    return jnp.einsum("ckn,ckm->nm", rows, sketch.take_rows(g3, idx))

  return jax.vmap(one)(keys)


def rel_variance_weighted(x, g, weights, blocks, k, keys) -> float:
  exact = x.astype(np.float64).T @ g.astype(np.float64)
  _weighted_wta.k = k
  x3, g3 = x.reshape(blocks, -1, x.shape[1]), g.reshape(blocks, -1, g.shape[1])
  w = jnp.asarray(weights.reshape(blocks, -1))
  est = np.concatenate([np.asarray(_weighted_wta(x3, g3, w, keys[i:i + 16]), np.float64)
                        for i in range(0, keys.shape[0], 16)])
  return float(((est - exact) ** 2).sum(axis=(1, 2)).mean() / (exact ** 2).sum())


def rel_variance(kind, x, g, blocks, k, keys) -> float:
  exact = x.astype(np.float64).T @ g.astype(np.float64)
  est = np.asarray(_est(kind, jnp.asarray(x), jnp.asarray(g), blocks, k, keys), np.float64)
  return float(((est - exact) ** 2).sum(axis=(1, 2)).mean() / (exact ** 2).sum())


def step_times(kinds, *, rounds: int, batch: int, context: int, dim: int, layers: int,
               ratio: float, vocab: int = 96) -> dict:
  """Median step time of the example's randomized training step per kind, over alternated rounds."""
  tx = optax.adamw(1e-3)
  steps = {}
  tokens = np.zeros((batch, context), np.int32)
  for kind in kinds:
    model = char_gpt.build("randomized", vocab, 0, batch, ratio, kind, context=context, dim=dim,
                           layers=layers)
    graphdef, state = nnx.split(model)
    opt_state = tx.init(nnx.state(model, nnx.Param))
    step = char_gpt.make_step(graphdef, tx)[0]
    state, opt_state, loss = step(state, opt_state, tokens, tokens)  # compile
    jax.block_until_ready(loss)
    steps[kind] = [step, state, opt_state]
  times = {kind: [] for kind in kinds}
  for _ in range(rounds):
    for kind in kinds:
      step, state, opt_state = steps[kind]
      t = time.perf_counter()
      state, opt_state, loss = step(state, opt_state, tokens, tokens)
      jax.block_until_ready(loss)
      times[kind].append(time.perf_counter() - t)
      steps[kind][1:] = [state, opt_state]
  return {kind: float(np.median(t)) for kind, t in times.items()}


# Rows not yet a layer's option: wta drawing by |x_i| times an estimate of |g_i|.
PREV = "wta by norm(x_i) times the mean norm(g) at i's position in another batch*"
ORACLE = "wta by norm(x_i) norm(g_i), this batch's g (a bound)*"


def _fmt(v: float, digits: int) -> str:
  """`v` with `digits` decimals, or in scientific notation where those would show 0."""
  return f"{v:.{digits}f}" if v >= 10 ** -digits else f"{v:.1e}"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("Usage")[1])
  p.add_argument("--steps", default="0,100,300",
                 help="comma-separated training steps at which to capture (vanilla training)")
  p.add_argument("--ratio", type=float, default=0.2)
  p.add_argument("--keys", type=int, default=64, help="keys per estimate of the variance")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--context", type=int, default=128)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--kinds", default=",".join(sketch.ALL_KINDS))
  p.add_argument("--time-rounds", type=int, default=20,
                 help="alternated rounds of the step-time comparison (0: none)")
  args = p.parse_args(argv)
  steps = sorted({int(s) for s in args.steps.split(",")})
  kinds = [k.strip() for k in args.kinds.split(",")]
  if "gaussian" not in kinds:
    kinds = ["gaussian"] + kinds
  t0 = time.perf_counter()

  text = char_gpt.load_text()
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  data = np.fromiter((lookup[c] for c in text), np.int32, len(text))
  model = char_gpt.CharGPT(len(chars), context=args.context, dim=args.dim, layers=args.layers,
                           linear=ProbeLinear, rngs=nnx.Rngs(params=0))
  set_probes(model, args.batch, args.context)
  # The example's optimizer and schedule (500 steps at 3e-3), so that the
  # layers at step s are those of the example's run at step s.
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, 500), weight_decay=0.01)
  graphdef, state = nnx.split(model)
  opt_state = tx.init(nnx.state(model, nnx.Param))
  step, _ = char_gpt.make_step(graphdef, tx)
  rng = np.random.default_rng(0)
  probe_rng = np.random.default_rng(99)
  b = args.batch * args.context
  k = math.ceil(args.ratio * b)
  k_block = -(-k // args.batch)
  keys = jax.random.split(jax.random.key(0), args.keys)

  results = {}  # (step, layer) -> {kind: relvar}
  done = 0
  for target in steps:
    while done < target:
      xb, yb = char_gpt.batches(data, args.batch, args.context, rng)
      state, opt_state, _ = step(state, opt_state, xb, yb)
      done += 1
    model = nnx.merge(graphdef, state)  # read only: training goes on from `state`
    xb, yb = char_gpt.batches(data, args.batch, args.context, probe_rng)
    # Another batch: its per-position gradient norms stand for what a layer
    # could carry from its previous steps.
    other = capture(model, *char_gpt.batches(data, args.batch, args.context, probe_rng))
    with ext.mode("jax"):
      for name, (x, g) in capture(model, xb, yb).items():
        r = results[target, name] = {kind: rel_variance(kind, x, g, args.batch, k_block, keys)
                                     for kind in kinds}
        xn = np.linalg.norm(x, axis=1)
        g_prev = np.linalg.norm(other[name][1], axis=1).reshape(args.batch, -1).mean(0)
        r[PREV] = rel_variance_weighted(x, g, xn * np.tile(g_prev, args.batch), args.batch,
                                        k_block, keys)
        r[ORACLE] = rel_variance_weighted(x, g, xn * np.linalg.norm(g, axis=1), args.batch,
                                          k_block, keys)

  print(f"\nchar GPT ({args.layers} layers, dim {args.dim}), vanilla training; dW of every dense "
        f"layer on one batch of {args.batch} x {args.context} positions, ratio {args.ratio:g}: "
        f"{k_block} rows per sequence block ({args.batch} blocks), {args.keys} keys "
        f"({time.perf_counter() - t0:.0f}s)\n")
  print("Relative variance E|dW_est - dW|^2 / |dW|^2 against the Gaussian sketch's "
        "(geometric mean over the layers [min, max]):\n")
  head = "| kind | " + " | ".join(f"step {s}" for s in steps) + " |"
  print(head)
  print("|---" * (len(steps) + 1) + "|")
  for kind in kinds + [PREV, ORACLE]:
    cells = []
    for s in steps:
      r = [results[s, n][kind] / results[s, n]["gaussian"] for (t, n) in results if t == s]
      gm = math.exp(np.mean(np.log(r)))
      cells.append(f"{_fmt(gm, 3)} [{_fmt(min(r), 2)}, {_fmt(max(r), 2)}]")
    print(f"| {kind} | " + " | ".join(cells) + " |")
  print("\n*: not a sketch kind of the layers (yet): the rows are drawn by wta's rule with "
        "|x_i| times a gradient norm, which a layer would have to carry between steps as state.")
  last = steps[-1]
  print(f"\nPer layer at step {last}: the Gaussian sketch's relative variance, and every "
        "kind's against it:\n")
  print("| layer | gaussian | " + " | ".join(k for k in kinds if k != "gaussian") + " |")
  print("|---" * (len(kinds) + 1) + "|")
  for (t, n), r in results.items():
    if t != last:
      continue
    print(f"| {n} | {r['gaussian']:.3g} | "
          + " | ".join(_fmt(r[k] / r['gaussian'], 3) for k in kinds if k != "gaussian") + " |")

  if args.time_rounds:
    times = step_times(kinds, rounds=args.time_rounds, batch=args.batch, context=args.context,
                       dim=args.dim, layers=args.layers, ratio=args.ratio)
    print(f"\nStep time of the example's randomized training step (batch {args.batch} x "
          f"{args.context}; the default path, here {ext.active_path()!r}: the kernels of "
          f"{', '.join(ext.SKETCH_KINDS)} where built), median of {args.time_rounds} alternated "
          "rounds in this process, against the Gaussian sketch's:\n")
    print("| kind | step time | vs gaussian |\n|---|---|---|")
    for kind in kinds:
      print(f"| {kind} | {1e3 * times[kind]:.1f} ms | {times[kind] / times['gaussian']:.2f}x |")


if __name__ == "__main__":
  main()
