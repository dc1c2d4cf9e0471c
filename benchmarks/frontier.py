"""The memory-compute frontier: the library's one-call conversion against JAX's remat policies.

Two models written without the library: the Gemma/Llama-style decoder of
`fewbit_jax._models.decoder` (NNX; hand-written pre-RMSNorm, GQA with RoPE, inline
gated GELU MLP, vocabulary 32k) and the RoBERTa encoder of
`benchmarks.roberta` (linen). Rows, in three families:

* JAX: the vanilla model, and ``nnx.remat``/``nn.remat`` around each block
  with ``nothing_saveable``, ``dots_with_no_batch_dims_saveable`` and
  ``checkpoint_dots`` (a user's one line of ``jax.checkpoint``);
* exact: ``fb.nnx.convert(model, exact=True)`` / ``fb.linen.convert(exact=True)``
  without remat, and with ``remat=True`` under each of the library's
  `fewbit_jax.remat.FRONTIER` policies (``lean`` is JAX's
  ``save_only_these_names`` of the library's names, ``lean_without_probs``
  the same but for the attention probabilities; ``dots_and_probs`` keeps
  the non-batch dots and the attention probabilities);
* approximate: the same with ``exact=False`` (3-bit activations, randomized
  dense layers at 20%).

The JAX rows keep the model's loss as users write it (optax's cross-entropy
of the tied logits). The decoder's library rows but the first of each
family compute it with the fused loss head instead: the model returns its
last hidden state (``return_hidden=True``, the one change) and
``fb.linear_softmax_cross_entropy(h, embedding, labels, kernel_layout="vd")``
gives the loss with no logits and no transposed table
(`fewbit_jax._models.decoder.fused_loss_fn`): either per token, the backward
recomputing the logits ("fused loss"), or reduced to the mean with the
gradients formed in the forward pass (``gradient="forward"``, "grad in
fwd": optax's flops); ``gated=False`` rows leave the gated
MLP to the activation patch instead of `fewbit_jax.gated`. XLA's
``cost_analysis`` counts a loop's body once, so the flops of the fused rows
are those of the same step with the vocabulary in one block plus the
backward's recomputation of the logits (`fused_head_recompute_flops`), and
of the "grad in fwd" rows those of the same step with the tokens in one
block (no loop, nothing recomputed).

Columns: the compiled temp memory of ``jax.value_and_grad`` of the loss
(``memory_analysis().temp_size_in_bytes``), the saving against vanilla, the
flops as a ratio to vanilla (``cost_analysis()``), the gradient's error
against vanilla relative to its norm (one step, one sketch), and with
``--time`` the step time as a ratio to vanilla (median of alternated runs).
``--figure PATH`` draws memory against flops with each family's frontier.

On the CPU, XLA's ``cse_barrier_expander`` pass merges every recomputation
of ``jax.checkpoint`` back into the forward pass (undoing remat, and the
recomputation inside the library's lean backward passes too), so this script
sets ``XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander`` before JAX
starts; GPU and TPU pipelines keep the barriers without it.

Usage::

  python -m benchmarks.frontier                    # small sizes, both models
  python -m benchmarks.frontier --model decoder --full --time --figure frontier.png
  python -m benchmarks.frontier --model roberta --full --peak "nn.remat nothing"   # what its peak holds

The NNX rows are measured in flax's functional loop (``nnx.split`` /
``nnx.merge`` inside ``jax.value_and_grad``, sketch keys by
``fb.nnx.step_keys``), except the approximate rows with remat, measured
under ``nnx.jit`` (the functional loop runs them too since the layers'
key streams pass ``nnx.remat``; these rows were measured before that).
"""

from __future__ import annotations

import os
import sys

KEEP_REMAT_FLAG = "--xla_disable_hlo_passes=cse_barrier_expander"


def keep_remat_on_cpu() -> bool:
  """Adds KEEP_REMAT_FLAG to XLA_FLAGS; False if JAX's backends already started without it."""
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      return KEEP_REMAT_FLAG in os.environ.get("XLA_FLAGS", "")
  flags = os.environ.get("XLA_FLAGS", "")
  if KEEP_REMAT_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {KEEP_REMAT_FLAG}".strip()
  return True


if __name__ == "__main__":
  keep_remat_on_cpu()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import fewbit_jax as fb  # noqa: E402
import fewbit_jax.linen  # noqa: E402,F401
import fewbit_jax.nnx  # noqa: E402,F401
from fewbit_jax._models import decoder as dec  # noqa: E402
from benchmarks import roberta as rob  # noqa: E402

MiB = 2.0 ** 20
CP = jax.checkpoint_policies
JAX_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "checkpoint_dots")
SHORT = {"nothing_saveable": "nothing", "dots_with_no_batch_dims_saveable": "dots_no_batch",
         "checkpoint_dots": "checkpoint_dots", "lean": "lean (fb names)",
         "dots_and_probs": "dots_and_probs", "lean_without_probs": "lean_without_probs",
         None: "-"}


@dataclasses.dataclass
class Row:
  """One configuration's measurements."""
  family: str  # 'jax', 'exact' or 'approximate'
  name: str
  temp_bytes: int
  flops: float
  grad_error: float = float("nan")
  saving: float = 0.0
  flops_ratio: float = 1.0
  time_ratio: float | None = None


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def _flat(tree):
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def _rel_error(reference, grads) -> float:
  a, b = _flat(reference), _flat(grads)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))


@dataclasses.dataclass
class Case:
  """A configuration ready to run: ``run()`` gives grads; ``compiled`` its executable.

  ``flops_compiled``, ``flops_extra``: where ``compiled`` loops (the fused
  loss head scans over vocabulary blocks, and XLA's ``cost_analysis``
  counts a loop's body once, not once per trip), the flops are those of
  ``flops_compiled`` (the same step with the vocabulary in one block) plus
  ``flops_extra`` (see `fused_head_recompute_flops`); None: ``compiled``'s own.
  """
  compiled: object
  run: Callable[[], object]
  flops_compiled: object = None
  flops_extra: float = 0.0
  lowered: object = None  # what ``compiled`` was compiled from (``--peak`` compiles it again)


def fused_head_recompute_flops(tokens: int, dim: int, vocab: int) -> float:
  """The flops the fused loss head's backward spends recomputing the logits: ``2 N D V``.

  With the vocabulary in one block, XLA's CSE merges that recomputation
  with the forward's logits (the same dot of the same operands), so the
  one-block step's ``cost_analysis`` misses it; blocked, the backward does
  it. (On a head alone, N 256, D 64, V 4096: one block counts 3.06 x 2NDV,
  blocks of V/2 and V/4 count 2.03 and 1.02, the loop's body once: so the
  blocked head is 3 x 2.03 - 2 x 1.02 = 4.06 x 2NDV = one block + 2NDV.)
  """
  return 2.0 * tokens * dim * vocab


# --------------------------------------------------------------------------
# The decoder (NNX).

def decoder_config(full) -> tuple[dec.DecoderConfig, int, int]:
  """The decoder's sizes and (batch, seq): small by default, Gemma-2B-like with `full`."""
  if full == "tiny":
    return dec.DecoderConfig.tiny(), 2, 16
  if full:
    return dec.DecoderConfig.full(), 2, 1024
  return dec.DecoderConfig(embed_dim=512, hidden_dim=2048, num_layers=4, num_heads=4,
                           num_kv_heads=1, head_dim=128), 4, 256


def _decoder_functional(model, tokens, loss_fn=dec.loss_fn) -> Case:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, tokens):
    return loss_fn(nnx.merge(graphdef, params, rest), tokens)

  def step(params, rest, tokens, key):
    with fb.nnx.step_keys(key):
      return jax.value_and_grad(loss)(params, rest, tokens)

  key = jax.random.key(1)
  lowered = jax.jit(step).lower(params, rest, tokens, key)
  compiled = lowered.compile()
  return Case(compiled, lambda: nnx.to_pure_dict(compiled(params, rest, tokens, key)[1]),
              lowered=lowered)


def _decoder_nnx_jit(model, tokens, loss_fn=dec.loss_fn) -> Case:
  def step(model, tokens):
    return nnx.value_and_grad(loss_fn)(model, tokens)

  jitted = nnx.jit(step)
  lowered = jitted.lower(model, tokens)
  compiled = lowered.compile()
  return Case(compiled, lambda: nnx.to_pure_dict(jitted(model, tokens)[1]), lowered=lowered)


def decoder_rows(full: bool, log) -> list[tuple[str, str, Callable[[], Case]]]:
  """(family, name, build) for every row of the decoder."""
  cfg, batch, seq = decoder_config(full)
  tokens = dec.make_tokens(cfg, batch, seq)
  log(f"decoder: {cfg}, batch {batch} x {seq}")
  model = lambda **kw: dec.Decoder(cfg, rngs=nnx.Rngs(0), **kw)
  rows = [("jax", "vanilla", lambda: _decoder_functional(model(), tokens))]
  for p in JAX_POLICIES:
    rows.append(("jax", f"nnx.remat {SHORT[p]}", functools.partial(
        lambda p: _decoder_functional(model(remat_policy=getattr(CP, p)), tokens), p)))
  fused = dec.fused_loss_fn  # the backward recomputes the logits
  fused_fwd = functools.partial(dec.fused_loss_fn, gradient="forward")  # gradients in the forward
  for exact in (True, False):
    family = "exact" if exact else "approximate"
    # The conversion with optax's loss on the logits, the fused loss head
    # (recompute, then gradient in the forward pass), the gated MLP left to
    # the activation patch or recognised, then remat under each policy.
    variants = [(None, dec.loss_fn, False), (None, fused, False), (None, fused, True),
                (None, fused_fwd, False), (None, fused_fwd, True)]
    variants += [(policy, fused, True) for policy in ("lean", "nothing_saveable")]
    variants += [(policy, fused_fwd, True)
                 for policy in ("lean", "lean_without_probs", *JAX_POLICIES, "dots_and_probs")]
    for policy, loss_fn, gated in variants:
      def build(exact=exact, policy=policy, loss_fn=loss_fn, gated=gated):
        def case(loss_fn):
          converted = fb.nnx.convert(model(), exact=exact, remat=policy is not None,
                                     policy=policy, gated=gated, rngs=nnx.Rngs(sketch=0))
          if policy is not None and not exact:
            return _decoder_nnx_jit(converted, tokens, loss_fn)
          return _decoder_functional(converted, tokens, loss_fn)
        out = case(loss_fn)
        if loss_fn is fused:  # the flops with the vocabulary in one block
          whole = functools.partial(dec.fused_loss_fn, block_size=cfg.vocab_size)
          out.flops_compiled = case(whole).compiled
          out.flops_extra = fused_head_recompute_flops(batch * seq, cfg.embed_dim,
                                                       cfg.vocab_size)
        elif loss_fn is fused_fwd:  # the flops with the tokens in one block: no loop
          whole = functools.partial(fused_fwd, token_block_size=batch * seq)
          out.flops_compiled = case(whole).compiled
        return out
      opts = "" if gated else ", gated=False"
      opts += "" if policy is None else f", remat=True, policy={SHORT[policy]}"
      head = {fused: "fused loss", fused_fwd: "fused loss (grad in fwd)"}.get(loss_fn,
                                                                          "optax loss")
      rows.append((family, f"fb.nnx.convert(exact={exact}{opts}) + {head}", build))
  return rows


# --------------------------------------------------------------------------
# RoBERTa (linen).

def roberta_config(full) -> tuple[rob.RobertaConfig, int, int]:
  if full == "tiny":
    return rob.RobertaConfig.tiny(), 2, 16
  if full:
    return rob.RobertaConfig.base(), 128, 128
  return rob.RobertaConfig.base(num_layers=4, hidden_size=256, num_heads=4,
                                intermediate_size=1024), 16, 128


def _roberta_case(model, params, batch, context=None) -> Case:
  def loss(params, batch, key):
    k_drop, k_sketch = jax.random.split(key)
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         deterministic=False, rngs={"dropout": k_drop, "sketch": k_sketch})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  key = jax.random.key(1)
  with context if context is not None else _nothing():
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, batch, key)
    compiled = lowered.compile()
  return Case(compiled, lambda: compiled(params, batch, key)[1], lowered=lowered)


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def roberta_rows(full: bool, log) -> list[tuple[str, str, Callable[[], Case]]]:
  cfg, b, s = roberta_config(full)
  log(f"roberta: {cfg}, batch {b} x {s}")
  batch = rob.make_batch(cfg, b, s)
  base = rob.RobertaClassifier(cfg)
  ids = jnp.ones((2, 8), jnp.int32)
  params = jax.jit(lambda k: base.init({"params": k, "dropout": k}, ids, jnp.ones_like(ids))[
      "params"])(jax.random.key(0))
  rows = [("jax", "vanilla", lambda: _roberta_case(base, params, batch))]
  for p in JAX_POLICIES:
    rows.append(("jax", f"nn.remat {SHORT[p]}", functools.partial(
        lambda p: _roberta_case(rob.RobertaClassifier(cfg, remat=("block",),
                                                      remat_policy=getattr(CP, p)),
                                params, batch), p)))
  for exact in (True, False):
    family = "exact" if exact else "approximate"
    for policy in (None, "lean", "lean_without_probs", *JAX_POLICIES, "dots_and_probs"):
      def build(exact=exact, policy=policy):
        ctx = fb.linen.convert(exact=exact, remat=policy is not None, policy=policy)
        return _roberta_case(base, params, batch, ctx)
      name = f"fb.linen.convert(exact={exact}" + (
          ")" if policy is None else f", remat=True, policy={SHORT[policy]})")
      rows.append((family, name, build))
  return rows


RESIDUAL_CASES = (
    ("exact, no remat", dict(exact=True)),
    ("exact, remat dots_no_batch", dict(exact=True, remat=True,
                                        policy="dots_with_no_batch_dims_saveable")),
    ("exact, remat nothing", dict(exact=True, remat=True, policy="nothing_saveable")),
    ("approximate, no remat", dict(exact=False)),
)


def decoder_residuals(full: bool, top: int = 8) -> list[str]:
  """The largest arrays the converted decoder's backward still keeps, with the fused loss.

  The loss forms its gradients in the forward pass (``gradient="forward"``,
  the rows at flops <= 1.02x).

  For each of `RESIDUAL_CASES` (``fb.nnx.convert`` options), by
  ``fb.memory.saved_residuals`` of `fewbit_jax._models.decoder.fused_loss_fn`
  (jaxpr level: before XLA's buffer reuse): one line per array, largest
  first, the same array of every layer on one line (total size, count x
  shape, op or name, source line).
  """
  cfg, batch, seq = decoder_config(full)
  tokens = dec.make_tokens(cfg, batch, seq)
  lines = []
  for title, options in RESIDUAL_CASES:
    model = fb.nnx.convert(dec.Decoder(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(sketch=0),
                           **options)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    def loss(p, key):
      with fb.nnx.step_keys(key):
        return dec.fused_loss_fn(nnx.merge(graphdef, p, rest), tokens, gradient="forward")
    report = fb.memory.saved_residuals(loss, params, jax.random.key(1))
    groups: dict[tuple, list] = {}  # the same array in every layer: one line, counted
    for r in report.residuals:
      if r.origin == "argument":
        continue  # the parameters and tokens, held anyway
      where = r.source.split("/")[-1] if r.source else "-"
      groups.setdefault((r.origin, where, r.dtype, tuple(r.shape)), []).append(r.nbytes)
    lines.append(f"{title} ({options}): kept in all {report.saved_bytes / MiB:.1f} MiB")
    for (origin, where, dtype, shape), sizes in sorted(groups.items(),
                                                      key=lambda kv: -sum(kv[1]))[:top]:
      lines.append(f"  {sum(sizes) / MiB:7.1f} MiB  {len(sizes)} x {dtype}{list(shape)}  "
                   f"{origin}  {where}")
  return lines


def mlp_rows(batch: int = 4, seq: int = 256, dim: int = 512, hidden: int = 2048):
  """(treatment, bytes kept) for the decoder's MLP alone (`fewbit_jax._models.decoder.FeedForward`).

  By ``fb.memory.saved_residuals`` of ``mlp(x).sum()`` with respect to the
  MLP's parameters and x, f32 ``[batch, seq, dim]``: as written (autodiff),
  with the exact GELU patch alone (what the conversion did before it
  recognised the gated MLP), and recognised by ``fb.nnx.convert`` (exact,
  and approximate: 3 bits with randomized projections).
  """
  cfg = dec.DecoderConfig(embed_dim=dim, hidden_dim=hidden)
  x = jax.random.normal(jax.random.key(0), (batch, seq, dim))

  def kept(mlp, patch=None) -> int:
    graphdef, params, rest = nnx.split(mlp, nnx.Param, ...)

    def f(p, x, key):
      ctx = fb.patch_activations(warn_unused=False, **patch) if patch else _nothing()
      with ctx, fb.nnx.step_keys(key):
        return nnx.merge(graphdef, p, rest)(x).sum()
    return fb.memory.saved_residuals(f, params, x, jax.random.key(1)).saved_bytes

  class Holder(nnx.Module):  # convert wants a model; the MLP is its only child
    def __init__(self):
      self.mlp = dec.FeedForward(cfg, rngs=nnx.Rngs(0))

  def converted(**kw):
    return fb.nnx.convert(Holder(), activations=False, rngs=nnx.Rngs(sketch=0), **kw).mlp

  exact_gelu = {"gelu": "exact"}
  return [
      ("as written (autodiff)", kept(dec.FeedForward(cfg, rngs=nnx.Rngs(0)))),
      ("exact GELU patch only (gated=False)",
       kept(converted(exact=True, gated=False), exact_gelu)),
      ("recognised: fb.gated exact", kept(converted(exact=True))),
      ("approximate, gated=False: 3-bit GELU, randomized 20%",
       kept(converted(exact=False, gated=False), {"gelu": 3})),
      ("approximate, recognised: fb.gated, randomized 20%", kept(converted(exact=False))),
  ]


# --------------------------------------------------------------------------
# A model's own norms: recognised (the lean twin) or recomputed (remat of the module).

def norm_rows(batch: int = 8, seq: int = 256, dim: int = 512) -> list[tuple[str, str, int]]:
  """(norm, treatment, bytes its backward keeps) for a norm between two linear maps.

  ``h = 2 x; y = norm(h) @ W``: the backward keeps what the norm keeps plus
  ``norm(h)`` for ``W``'s gradient (the same in every row), by
  ``fb.memory.saved_residuals`` (jaxpr level, f32 ``[batch, seq, dim]``).
  """
  x = jax.random.normal(jax.random.key(0), (batch, seq, dim))
  w = jnp.ones((dim, 8))
  out = []

  def kept(norm) -> int:
    return fb.memory.saved_residuals(lambda x, w: (norm(2.0 * x) @ w).sum(), x, w).saved_bytes

  recompute = lambda f: jax.checkpoint(f, policy=CP.nothing_saveable)
  cases = [
      ("nnx.RMSNorm (flax's)", lambda: nnx.RMSNorm(dim, rngs=nnx.Rngs(0)), True),
      ("nnx.LayerNorm (flax's)", lambda: nnx.LayerNorm(dim, rngs=nnx.Rngs(0)), True),
      ("gemma-style RMSNorm (hand-written)", lambda: dec.RMSNorm(dim, rngs=nnx.Rngs(0)), False),
  ]
  for name, make, known in cases:
    out.append((name, "autodiff", kept(make())))
    if known:  # flax's class: the library recognises it
      out.append((name, "recognised: the lean twin", kept(fb.nnx.convert_lean(make()))))
    out.append((name, "recomputed: remat of the module alone", kept(recompute(make()))))
  return out


# --------------------------------------------------------------------------
# Attention's inline elementwise work (soft-cap, mask, RoPE): recomputed or recognised.

class _RecognisedAttention(dec.Attention):
  """The decoder's attention with its core as `fb.dot_product_attention` (for comparison only).

  What recognising the inline core would give: the same function (causal,
  GQA, the soft-cap) through the library's op, with the model's RoPE kept.
  """

  def __call__(self, x, positions, mask):
    del mask  # causal, as the decoder's
    cfg = self.cfg
    b, l, _ = x.shape
    q = self.q_proj(x).reshape(b, l, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
    q = dec.apply_rope(q, positions, cfg.rope_base)
    k = dec.apply_rope(k, positions, cfg.rope_base)
    ctx = fb.dot_product_attention(q, k, v, is_causal=True, soft_cap=cfg.attn_logits_soft_cap)
    return self.o_proj(ctx.reshape(b, l, -1))


def attention_rows(full, caps=(None, 50.0)) -> list[tuple[str, str, float, float]]:
  """(model, treatment, temp MiB, flops ratio) of the decoder step, its attention treated.

  The decoder with its fused loss (gradients in the forward pass), without
  remat, compiled with the CSE barriers kept (``fb.memory.KEEP_REMAT``): vanilla;
  ``fb.nnx.convert(exact=True)``; the same with ``elementwise=True`` (each
  attention module rematerialised alone, its matmuls' outputs kept); and its
  core replaced by `fb.dot_product_attention` (`_RecognisedAttention`: what
  recognising the inline code would reach). ``caps``: without and with
  Gemma 2's logit soft-cap (50).
  """
  base, batch, seq = decoder_config(full)
  out = []
  for cap in caps:
    cfg = dataclasses.replace(base, attn_logits_soft_cap=cap)
    tokens = dec.make_tokens(cfg, batch, seq)
    loss_fn = functools.partial(dec.fused_loss_fn, gradient="forward")

    def measure_one(model):
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      step = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), tokens))
      c = jax.jit(step).lower(params).compile(fb.memory.KEEP_REMAT)  # also when imported
      return c.memory_analysis().temp_size_in_bytes / MiB, _flops(c)

    def recognised():
      model = dec.Decoder(cfg, rngs=nnx.Rngs(0))
      for layer in model.layers:
        layer.attn.__class__ = _RecognisedAttention
      return fb.nnx.convert(model)

    title = "decoder" + ("" if cap is None else f", soft-cap {cap:g}")
    cases = [("vanilla", lambda: dec.Decoder(cfg, rngs=nnx.Rngs(0))),
             ("fb.nnx.convert(exact=True)", lambda: fb.nnx.convert(dec.Decoder(
                 cfg, rngs=nnx.Rngs(0)))),
             ("... elementwise=True", lambda: fb.nnx.convert(dec.Decoder(
                 cfg, rngs=nnx.Rngs(0)), elementwise=True)),
             ("... core as fb.dot_product_attention", recognised)]
    vanilla_flops = None
    for name, make in cases:
      mib, flops = measure_one(make())
      vanilla_flops = vanilla_flops or flops
      out.append((title, name, mib, flops / vanilla_flops))
  return out


# --------------------------------------------------------------------------

def _median_time_ratio(case: Case, vanilla: Case, repeats: int) -> float:
  def once(c):
    t = time.perf_counter()
    jax.block_until_ready(c.run())
    return time.perf_counter() - t
  once(case), once(vanilla)
  ratios = [once(case) / once(vanilla) for _ in range(repeats)]
  return statistics.median(ratios)


def measure(rows, *, timing: bool, repeats: int, log, run: bool = True) -> list[Row]:
  """Each row's compiled memory and flops; with `run`, its gradient error (and `timing`)."""
  out: list[Row] = []
  vanilla_case = reference = None
  for family, name, build in rows:
    case = build()
    mem = fb.memory.CompiledMemory.of(case.compiled).temp
    row = Row(family, name, mem, _flops(case.flops_compiled or case.compiled) + case.flops_extra)
    if run:
      grads = case.run()
      if vanilla_case is None:
        vanilla_case, reference = case, grads
      row.grad_error = _rel_error(reference, grads)
    row.saving = 1 - mem / out[0].temp_bytes if out else 0.0
    row.flops_ratio = row.flops / out[0].flops if out else 1.0
    if timing:
      row.time_ratio = _median_time_ratio(case, vanilla_case, repeats) if out else 1.0
    out.append(row)
    log(format_row(row))
  return out


# The decoder's goals (issues of the frontier and the decoder ops): (goal,
# families, no remat only, flops bound, target saving).
DECODER_GOALS = (
    ("exact, no remat", ("exact",), True, None, 0.45),
    ("everything, no remat", ("exact", "approximate"), True, None, 0.65),
    ("exact, flops <= 1.02x", ("exact",), False, 1.02, 0.60),
    ("approximate, flops <= 1.02x", ("exact", "approximate"), False, 1.02, 0.72),
    ("any configuration, flops <= 1.35x", ("jax", "exact", "approximate"), False, 1.35, 0.80),
)
# RoBERTa-base's (batch 128 x 128, ``--full``; the frontier issue's table).
ROBERTA_GOALS = (
    ("exact, flops <= 1.02x", ("exact",), False, 1.02, 0.65),
    ("approximate, flops <= 1.02x", ("exact", "approximate"), False, 1.02, 0.82),
    ("any configuration, flops <= 1.35x", ("jax", "exact", "approximate"), False, 1.35, 0.89),
)


def goal_table(rows: list[Row], goals=DECODER_GOALS) -> list[str]:
  """The goals (`DECODER_GOALS`, `ROBERTA_GOALS`): the best saving of the rows each admits.

  "no remat" admits the rows without ``remat=True``/``nnx.remat``; the
  approximate goals admit exact rows too (an exact configuration is one
  the approximate family may use).
  """
  lines = ["| goal | target | reached | by | flops |", "|---|---|---|---|---|"]
  for goal, families, no_remat, bound, target in goals:
    ok = [r for r in rows if r.family in families and (not no_remat or "remat" not in r.name)
          and (bound is None or r.flops_ratio <= bound)]
    best = max(ok, key=lambda r: r.saving, default=None)
    if best is None:
      lines.append(f"| {goal} | >= {target:.0%} | - | no row | - |")
      continue
    verdict = "met" if best.saving >= target else f"missed by {target - best.saving:.1%}"
    lines.append(f"| {goal} | >= {target:.0%} | {best.saving:.1%} ({verdict}) | {best.name} | "
                 f"{best.flops_ratio:.3f}x |")
  return lines


def format_header(timing: bool) -> str:
  cols = "| family | configuration | temp MiB | saving | flops | grad error |"
  sep = "|---|---|---|---|---|---|"
  if timing:
    cols, sep = cols + " time |", sep + "---|"
  return cols + "\n" + sep


def format_row(r: Row) -> str:
  s = (f"| {r.family} | {r.name} | {r.temp_bytes / MiB:.1f} | {r.saving:.1%} | "
       f"{r.flops_ratio:.3f}x | {r.grad_error:.1e} |")
  if r.time_ratio is not None:
    s += f" {r.time_ratio:.2f}x |"
  return s


def frontier(rows: list[Row]) -> list[Row]:
  """The rows no other row of the list beats in both memory and flops."""
  pts = sorted(rows, key=lambda r: (r.flops_ratio, r.temp_bytes))
  out, best = [], float("inf")
  for r in pts:
    if r.temp_bytes < best:
      out.append(r)
      best = r.temp_bytes
  return out


def draw(results: dict[str, list[Row]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
  colors = {"jax": "tab:gray", "exact": "tab:blue", "approximate": "tab:orange"}
  for ax, (model, rows) in zip(axes[0], results.items()):
    for family, color in colors.items():
      fam = [r for r in rows if r.family == family]
      if family != "jax":
        fam = fam + [rows[0]]  # every family starts from vanilla
      ax.scatter([r.flops_ratio for r in fam], [r.saving * 100 for r in fam], color=color,
                 label=family)
      front = frontier(fam)
      ax.step([r.flops_ratio for r in front], [r.saving * 100 for r in front], where="post",
              color=color, alpha=0.7)
    ax.set_xlabel("flops / vanilla (cost_analysis)")
    ax.set_ylabel("memory saving vs vanilla (%)")
    ax.set_title(model)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def peak_lines(rows, texts, top: int = 8) -> list[str]:
  """What each row whose name contains one of `texts` holds at its memory peak.

  `fewbit_jax.memory.peak_buffers` of the row's step (XLA's buffer dump:
  parameters, temporaries and outputs live at the peak, after XLA's buffer
  reuse and scheduling), the `top` largest groups; the same array of every
  layer is one line.
  """
  out = []
  for _, name, build in rows:
    if not any(t in name for t in texts):
      continue
    case = build()
    groups = fb.memory.peak_buffers(case.lowered, top=None)
    out.append(f"\n{name}: {fb.memory.format_bytes(sum(g.nbytes for g in groups))} live at the "
               f"peak (temp {fb.memory.format_bytes(case.compiled.memory_analysis().temp_size_in_bytes)})")
    out += [f"  {g}" for g in groups[:top]]
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=("decoder", "roberta", "both", "none"), default="both")
  parser.add_argument("--full", action="store_true",
                      help="Gemma-2B-like decoder width / RoBERTa-base at batch 128 x 128")
  parser.add_argument("--tiny", action="store_true", help="test sizes (a smoke test)")
  parser.add_argument("--time", action="store_true", help="step-time ratios (slow)")
  parser.add_argument("--no-run", action="store_true",
                      help="compile only: memory and flops, no gradient error (for --full on "
                           "a CPU, where a RoBERTa-base step at batch 128 takes minutes)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--figure", help="write the memory-flops figure here (.png)")
  parser.add_argument("--json", help="write the rows here")
  parser.add_argument("--residuals", action="store_true",
                      help="also: the largest arrays the converted decoder still keeps")
  parser.add_argument("--mlp", action="store_true",
                      help="also: what the decoder's gated MLP keeps, recognised or not")
  parser.add_argument("--norms", action="store_true",
                      help="also: what a norm keeps, recognised or recomputed")
  parser.add_argument("--attention", action="store_true",
                      help="also: the decoder's inline attention (soft-cap, mask, RoPE) "
                           "recomputed (elementwise=True) or recognised")
  parser.add_argument("--peak", action="append", default=[], metavar="TEXT",
                      help="only print what the rows whose name contains TEXT hold at their "
                           "memory peak (fb.memory.peak_buffers); repeatable")
  args = parser.parse_args(argv)
  log = lambda s: print(s, flush=True)
  if not keep_remat_on_cpu():
    log(f"warning: JAX started before {KEEP_REMAT_FLAG} could be set: remat rows on the CPU "
        "are undone by XLA's CSE; run this as a script")
  else:
    log(f"XLA_FLAGS has {KEEP_REMAT_FLAG}: on the CPU that XLA pass merges jax.checkpoint's "
        "recomputation back into the forward pass, which would undo every remat row.")
  log(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; temp memory of "
      "jax.value_and_grad(loss), f32")
  size = "tiny" if args.tiny else args.full
  if args.peak:
    for model in ("decoder", "roberta"):
      if args.model in (model, "both"):
        rows = decoder_rows(size, log) if model == "decoder" else roberta_rows(size, log)
        for line in peak_lines(rows, args.peak):
          log(line)
    return
  results = {}
  for model in ("decoder", "roberta"):
    if args.model not in (model, "both", "none") or args.model == "none":
      continue
    rows = decoder_rows(size, log) if model == "decoder" else roberta_rows(size, log)
    log(format_header(args.time))
    results[model] = measure(rows, timing=args.time and not args.no_run, repeats=args.repeats,
                             log=log, run=not args.no_run)
  for model, rows in results.items():
    log(f"\n{model}: frontier of each family (configuration: saving at flops)")
    for family in ("jax", "exact", "approximate"):
      fam = [r for r in rows if r.family == family] + ([rows[0]] if family != "jax" else [])
      log(f"  {family}: " + "; ".join(f"{r.name}: {r.saving:.1%} at {r.flops_ratio:.3f}x"
                                       for r in frontier(fam)))
  if "decoder" in results:
    log("\ndecoder goals (best saving among the rows each goal admits)")
    for line in goal_table(results["decoder"]):
      log(line)
  if "roberta" in results:
    where = ("RoBERTa-base, batch 128 x 128" if size is True else
             "stated for RoBERTa-base at batch 128 x 128 (--full); here at these sizes")
    log(f"\nroberta goals ({where})")
    for line in goal_table(results["roberta"], ROBERTA_GOALS):
      log(line)
  if args.residuals:
    log("\ndecoder with the fused loss, converted: the largest arrays its backward keeps "
        "(fb.memory.saved_residuals, jaxpr level)")
    for line in decoder_residuals(size):
      log(line)
  if args.mlp:
    log("\nthe decoder's gated MLP alone, f32 x [4, 256, 512], FFN 2048: what its backward "
        "keeps (fb.memory.saved_residuals)")
    log("| MLP | kept MiB |\n|---|---|")
    for name, nbytes in mlp_rows():
      log(f"| {name} | {nbytes / MiB:.2f} |")
  if args.norms:
    log("\nnorms: what the backward keeps for h = 2x; norm(h) @ W, f32 [8, 256, 512] "
        "(fb.memory.saved_residuals)")
    log("| norm | treatment | kept MiB |\n|---|---|---|")
    for name, how, nbytes in norm_rows():
      log(f"| {name} | {how} | {nbytes / MiB:.2f} |")
  if args.attention:
    log("\nthe decoder's attention, written inline (RoPE, jnp.where mask, optional soft-cap): "
        "temp memory of the step with the fused loss, no remat")
    log("| model | attention | temp MiB | flops |\n|---|---|---|---|")
    for title, name, mib, ratio in attention_rows(size):
      log(f"| {title} | {name} | {mib:.1f} | {ratio:.3f}x |")
  if args.figure:
    draw(results, args.figure)
    log(f"figure: {args.figure}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({m: [dataclasses.asdict(r) for r in rows] for m, rows in results.items()}, f,
                indent=1)


if __name__ == "__main__":
  main()
