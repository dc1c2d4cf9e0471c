"""``jax.checkpoint`` policies that keep only few-bit codes and sketches.

Few-bit activations and randomized dense layers shrink what the backward
pass keeps, but other layers (LayerNorm, softmax attention, residual adds)
still keep full-size arrays. ``jax.checkpoint`` (remat) trades those for
recomputation; its default keeps nothing and recomputes the whole block,
including the activations and matmuls whose residuals few-bit had already
made small. `checkpoint_policy` keeps exactly the small residuals (arrays
named ``'fewbit_codes'`` by the activations and ``'randomized_dense_sketch'``
by the randomized dense layers, plus any names you add) and recomputes the
rest, so a block's backward does not recompute its MLP at all and the peak
of the recomputation is lower than plain remat's.

Use it wherever jax takes a policy: ``jax.checkpoint(f, policy=...)``,
``flax.linen.remat(Block, policy=...)``, ``flax.nnx.remat(f, policy=...)``.

Measured by ``python -m benchmarks.bench_convert --remat`` (a 4-layer
pre-LN transformer, d_model 256, MLP 1024, batch 8 x 128, f32, ``nn.remat``
around each block; XLA's compiled temp bytes of the gradient step, CPU,
jax 0.10.2): vanilla 120.1 MiB; few-bit alone (3-bit GELU + randomized
dense at 20%) 71.9; plain ``jax.checkpoint`` 40.0; plain checkpoint of the
few-bit model 33.6; few-bit with this policy 23.3 (-81% against vanilla,
-42% against plain checkpoint). The price is the recomputation: on a 2-core
CPU the policy's step took 1.25x few-bit alone's (0.94x plain checkpoint of
the few-bit model, which also recomputes the MLP). ``tests/test_remat.py``
checks the ordering.

On CPU, XLA's ``cse_barrier_expander`` pass merges any recomputation back
into the forward pass (undoing every remat, this policy's and plain
``jax.checkpoint``'s alike), so compare remat variants there with
``XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander`` set before JAX
starts; GPU and TPU pipelines keep the barriers.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import fewbit_jax as fb
  >>> from fewbit_jax.remat import checkpoint_policy
  >>> def block(w, x):
  ...   return fb.gelu(jnp.sin(x) @ w, bits=3)
  >>> f = jax.checkpoint(block, policy=checkpoint_policy())
  >>> w, x = jnp.ones((32, 32)), jnp.ones((8, 32))
  >>> from fewbit_jax import memory
  >>> rep = memory.saved_residuals(lambda w, x: f(w, x).sum(), w, x)
  >>> rep.by_source()          # the codes; sin(x) and cos(x) are recomputed
  {"named 'fewbit_codes'": 96}
"""

from __future__ import annotations

from typing import Callable

import jax

from fewbit_jax.activations import CODES_NAME, EXACT_NAME
from fewbit_jax.attention import NAMES as ATTENTION_NAMES
from fewbit_jax.attention import PROBS_NAME, SOFTMAX_NAME
from fewbit_jax.dense import SKETCH_NAME
from fewbit_jax.norms import NORM_INPUT_NAME, NORM_STATS_NAME

__all__ = ["checkpoint_policy", "frontier_policy", "FRONTIER", "SMALL_NAMES", "CODES_NAME", "EXACT_NAME",
           "SKETCH_NAME"]


def checkpoint_policy(*names: str, codes: bool = True, sketches: bool = True,
                      lean: bool = True, dots: bool = False) -> Callable[..., bool]:
  """A ``jax.checkpoint`` policy keeping few-bit codes, sketches and `names`.

  Everything else inside the checkpointed function is recomputed in the
  backward pass from the function's inputs and the kept arrays.

  Args:
    *names: more ``jax.ad_checkpoint.checkpoint_name`` names to keep (e.g.
      the attention probabilities of your model, if you name them).
    codes: keep what few-bit activations keep: their codes
      (``'fewbit_codes'``) and exact mode's inputs (``'fewbit_exact_input'``);
      default True.
    sketches: keep randomized dense sketches ``S^T x``
      (``'randomized_dense_sketch'``; default True).
    lean: keep what the lean ops keep, so their backward recomputes nothing
      (default True): the norms' input (``'lean_norm_input'``) and per-row
      mean and rstd (``'lean_norm_stats'``; `fewbit_jax.norms`), and the
      residuals of `fewbit_jax.softmax` and `fewbit_jax.dot_product_attention`
      (``fewbit_jax.attention.NAMES``).
    dots: also keep the outputs of matmuls without batch dimensions (jax's
      ``dots_with_no_batch_dims_saveable``): less recomputation, more memory.

  Returns:
    A policy for ``jax.checkpoint(..., policy=)``, ``flax.linen.remat`` or
    ``flax.nnx.remat``.

  Raises:
    TypeError: a name that is not a non-empty string.
    ValueError: nothing to keep at all (use ``jax.checkpoint`` without a
      policy for that).

  A name that no array carries keeps nothing and is not an error (the
  policy cannot see the function); check with
  ``fewbit_jax.memory.saved_residuals`` that the arrays you expect are named.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.ad_checkpoint import checkpoint_name
    >>> from fewbit_jax.remat import checkpoint_policy
    >>> policy = checkpoint_policy("attn_probs")
    >>> f = jax.checkpoint(lambda x: checkpoint_name(jnp.sin(x), "attn_probs") ** 2,
    ...                    policy=policy)
    >>> jax.grad(lambda x: f(x).sum())(jnp.ones(3)).shape
    (3,)
  """
  for n in names:
    if not isinstance(n, str) or not n:
      raise TypeError(f"checkpoint_policy names must be non-empty strings (the names given "
                      f"to jax.ad_checkpoint.checkpoint_name); got {n!r}")
  keep = list(names)
  if codes:
    keep += [CODES_NAME, EXACT_NAME]
  if sketches:
    keep.append(SKETCH_NAME)
  if lean:
    keep += [NORM_INPUT_NAME, NORM_STATS_NAME, *ATTENTION_NAMES]
  cp = jax.checkpoint_policies
  if not keep:
    if dots:
      return cp.dots_with_no_batch_dims_saveable
    raise ValueError("checkpoint_policy with codes=False, sketches=False, lean=False and no "
                     "names keeps nothing: that is jax.checkpoint's default policy, use it "
                     "without a policy.")
  policy = cp.save_only_these_names(*dict.fromkeys(keep))
  if dots:
    policy = cp.save_from_both_policies(policy, cp.dots_with_no_batch_dims_saveable)
  return policy


# JAX's standard policy -> how the library's counterpart is built from it:
# the library's small residuals, plus what JAX's policy keeps.
# The library's small residuals: kept by every frontier policy.
SMALL_NAMES = (CODES_NAME, SKETCH_NAME, NORM_STATS_NAME)

# The names the lean ops give their residuals, but the attention probabilities.
_LEAN_BUT_PROBS = tuple(n for n in (NORM_INPUT_NAME, NORM_STATS_NAME, *ATTENTION_NAMES)
                        if n not in (SOFTMAX_NAME, PROBS_NAME))

FRONTIER = ("lean", "nothing_saveable", "dots_with_no_batch_dims_saveable", "checkpoint_dots",
            "dots_and_probs", "lean_without_probs")


def frontier_policy(kind: str = "lean") -> Callable[..., bool]:
  """The library's counterpart of one of JAX's standard ``jax.checkpoint`` policies.

  Each keeps what JAX's policy of that name keeps plus the library's small
  residuals (few-bit codes ``'fewbit_codes'``, sketches
  ``'randomized_dense_sketch'``, the lean norms' per-row statistics
  ``'lean_norm_stats'``: `SMALL_NAMES`), so the converted model's backward
  recomputes no few-bit activation, randomized projection or norm
  statistic; ``'lean'`` keeps every residual the library names
  (`checkpoint_policy`) and recomputes the matmuls. Chosen by
  ``python -m benchmarks.frontier``: with the library's ops in the model
  (`fewbit_jax.nnx.convert`, `fewbit_jax.linen.convert`) each pair kept
  less than JAX's policy alone (or as much) at flops within 0.3% of it (the
  lean backward passes recompute a few elementwise ops); keeping the
  exact-mode inputs, the lean norms' inputs or the softmax outputs as well
  kept more at these flops.

  ``'dots_and_probs'`` has no JAX twin: ``dots_with_no_batch_dims_saveable``
  plus the small residuals plus the attention probabilities (the lean
  softmax's output ``'softmax_output'`` and `fewbit_jax.dot_product_attention`'s
  ``'attention_probs'``), so the backward recomputes ``probs @ v`` only, not
  the scores and their softmax: between ``checkpoint_dots`` and
  ``dots_with_no_batch_dims_saveable`` in flops, and measured on RoBERTa-base
  (batch 128, ``python -m benchmarks.frontier --model roberta --full
  --no-run``) at 66.9% saving and 1.018x flops where JAX's policies give
  61.4% at 1.014x (checkpoint_dots) and 67.8% at 1.023x.

  ``'lean_without_probs'``: ``'lean'`` but for the attention probabilities
  (``'softmax_output'``, ``'attention_probs'``), recomputed in the backward
  from q and k, which ``'lean'`` recomputes anyway (it keeps no matmul
  output): one batched matmul and a softmax more, for the largest array of
  a layer. With the approximate conversion of RoBERTa-base (batch 128, the
  command above) it keeps 83.1% less than no remat at 0.835x flops, where
  ``'lean'`` keeps 78.8% less at 0.831x.

  Args:
    kind: ``'lean'`` (the default), ``'nothing_saveable'``,
      ``'dots_with_no_batch_dims_saveable'``, ``'checkpoint_dots'``,
      ``'dots_and_probs'`` or ``'lean_without_probs'``.

  Returns:
    A policy for ``jax.checkpoint``, ``flax.linen.remat``, ``flax.nnx.remat``.

  Raises:
    ValueError: an unknown `kind`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import fewbit_jax as fb
    >>> from fewbit_jax.remat import frontier_policy
    >>> f = jax.checkpoint(lambda w, x: fb.gelu(x @ w, exact=True),
    ...                    policy=frontier_policy("dots_with_no_batch_dims_saveable"))
    >>> jax.grad(lambda w, x: f(w, x).sum())(jnp.ones((4, 4)), jnp.ones((2, 4))).shape
    (4, 4)
  """
  cp = jax.checkpoint_policies
  small = cp.save_only_these_names(*SMALL_NAMES)
  if kind == "lean":
    return checkpoint_policy()
  if kind == "nothing_saveable":
    return small
  if kind == "dots_with_no_batch_dims_saveable":
    return cp.save_from_both_policies(small, cp.dots_with_no_batch_dims_saveable)
  if kind == "checkpoint_dots":
    return cp.save_from_both_policies(small, cp.checkpoint_dots)
  if kind == "lean_without_probs":
    return checkpoint_policy(lean=False, *_LEAN_BUT_PROBS)
  if kind == "dots_and_probs":
    probs = cp.save_only_these_names(*SMALL_NAMES, SOFTMAX_NAME, PROBS_NAME)
    return cp.save_from_both_policies(probs, cp.dots_with_no_batch_dims_saveable)
  raise ValueError(f"unknown frontier policy {kind!r}: choose one of {', '.join(FRONTIER)}, "
                   "or pass a jax.checkpoint policy itself")
