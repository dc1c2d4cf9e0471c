"""fewbit_jax.remat: the policy keeps codes and sketches only, and beats plain remat."""

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

import fewbit_jax as fb
from fewbit_jax import memory
from fewbit_jax._models import plain as models
from fewbit_jax.activations import CODES_NAME
from fewbit_jax.dense import SKETCH_NAME, randomized_dense
from fewbit_jax.remat import checkpoint_policy

B, D, F = 64, 32, 128
KEY = jax.random.key(0)
W1 = jax.random.normal(jax.random.key(1), (D, F)) * 0.1
W2 = jax.random.normal(jax.random.key(2), (F, D)) * 0.1
X = jax.random.normal(jax.random.key(3), (B, D))


def _block(fewbit: bool):
  def block(w1, w2, x, key):
    k1, k2 = jax.random.split(key)
    h = x - x.mean(-1, keepdims=True)
    h = h * jax.lax.rsqrt((h ** 2).mean(-1, keepdims=True) + 1e-6)  # a LayerNorm
    h = checkpoint_name(h, "normed")
    if fewbit:
      h = randomized_dense(h, w1, None, k1, proj_dim_ratio=0.25)
      h = fb.gelu(h, bits=3)
      return x + randomized_dense(h, w2, None, k2, proj_dim_ratio=0.25)
    return x + jax.nn.gelu(h @ w1) @ w2
  return block


def _saved(block, policy="none"):
  if policy == "plain":
    block = jax.checkpoint(block)
  elif policy != "none":
    block = jax.checkpoint(block, policy=policy)
  return memory.saved_residuals(lambda w1, w2, x: block(w1, w2, x, KEY).sum(), W1, W2, X)


def test_policy_keeps_only_codes_and_sketches():
  alone = _saved(_block(True))
  ours = _saved(_block(True), checkpoint_policy())
  # k = 16 rows of D and of F, float32; codes: 3 planes of F / 32 words per row.
  sketch = 16 * (D + F) * 4
  codes = B * 3 * (F // 32) * 4
  assert ours.by_source() == {f"named {SKETCH_NAME!r}": sketch, f"named {CODES_NAME!r}": codes}
  assert ours.saved_bytes == sketch + codes
  assert alone.saved_bytes > 2 * ours.saved_bytes  # the LayerNorm's arrays, x for the key, ...
  assert _saved(_block(True), "plain").saved_bytes == 0  # keeps nothing but the inputs


def test_policy_options():
  block = _block(True)
  extra = _saved(_block(False), checkpoint_policy("normed"))  # h @ w1 needs h for dW
  assert extra.by_source() == {"named 'normed'": B * D * 4}
  only_codes = _saved(block, checkpoint_policy(sketches=False))
  assert set(only_codes.by_source()) == {f"named {CODES_NAME!r}"}
  dots = _saved(_block(False), checkpoint_policy(dots=True))
  assert dots.by_source()["op dot_general"] == B * F * 4  # h @ w1; the output is not needed
  with pytest.raises(TypeError, match="non-empty strings"):
    checkpoint_policy(3)
  with pytest.raises(TypeError, match="non-empty strings"):
    checkpoint_policy("")
  with pytest.raises(ValueError, match="keeps nothing"):
    checkpoint_policy(codes=False, sketches=False, lean=False)
  assert checkpoint_policy(codes=False, sketches=False, lean=False, dots=True) is \
      jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def test_policy_gradient_is_the_unremat_gradient():
  block = _block(True)
  loss = lambda f: lambda w1, w2, x: f(w1, w2, x, KEY).sum()
  g0 = jax.jit(jax.grad(loss(block), argnums=(0, 1, 2)))(W1, W2, X)
  g1 = jax.jit(jax.grad(loss(jax.checkpoint(block, policy=checkpoint_policy())),
                        argnums=(0, 1, 2)))(W1, W2, X)
  for a, b in zip(g0, g1):  # the same sketches (same key), the same codes
    assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)


_ROWS = ("few-bit (3-bit GELU + randomized 20%)", "jax.checkpoint each block (keep nothing)",
         "few-bit + fb.checkpoint_policy()")


def test_policy_beats_plain_remat_and_fewbit_alone_in_compiled_temp():
  # XLA's CPU pipeline undoes remat unless its CSE barrier pass is off (see
  # fewbit_jax.remat): off for these compiles alone (fb.memory.KEEP_REMAT),
  # which measures as XLA_FLAGS set before JAX starts does.
  cfg = models.Config.tiny()  # the rows of benchmarks/bench_convert.py's remat table
  temp = {}
  for name, fewbit, remat in models.REMAT_ROWS:
    if name in _ROWS:
      step, params, args, _ = models.remat_step(cfg, fewbit, remat)
      temp[name] = memory.compiled(step, params, *args, compiler_options=memory.KEEP_REMAT).temp
  ours = temp["few-bit + fb.checkpoint_policy()"]
  assert ours < temp["few-bit (3-bit GELU + randomized 20%)"]
  assert ours < temp["jax.checkpoint each block (keep nothing)"]
  assert set(temp) == set(_ROWS)


def _attention(norm: bool):
  """Self-attention with the lean softmax (after a lean LayerNorm if `norm`), and its arguments."""
  wq, wk, wv = (jax.random.normal(jax.random.key(i), (D, D)) * 0.2 for i in range(3))
  x = jax.random.normal(KEY, (4, 16, D))
  scale, bias = jnp.ones((D,)), jnp.zeros((D,))

  def attend(wq, wk, wv, x):
    if norm:
      x = fb.layer_norm(x, scale, bias)
    q, k, v = x @ wq, x @ wk, x @ wv
    p = fb.softmax(jnp.einsum("bqd,bkd->bqk", q, k), axis=-1)
    return jnp.einsum("bqk,bkd->bqd", p, v)
  return attend, (wq, wk, wv, x)


def _saved_by_policy(f, args, kind):
  """What ``jax.checkpoint(f, policy=frontier_policy(kind))`` keeps, by source."""
  from fewbit_jax.remat import frontier_policy
  g = jax.checkpoint(f, policy=frontier_policy(kind))
  return memory.saved_residuals(lambda *a: g(*a).sum(), *args).by_source()


def _assert_remat_gradient_equal(f, args, kind, argnums):
  """The gradient under ``frontier_policy(kind)`` equals the one without remat."""
  from fewbit_jax.remat import frontier_policy
  loss = lambda f: lambda *a: f(*a).sum()
  g0 = jax.grad(loss(f), argnums=argnums)(*args)
  g1 = jax.grad(loss(jax.checkpoint(f, policy=frontier_policy(kind))), argnums=argnums)(*args)
  for a, b in zip(g0, g1):
    assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dots_and_probs_keeps_the_probabilities_instead_of_the_scores():
  # Self-attention with the lean softmax: 'dots_and_probs' keeps the
  # projections (non-batch dots) and the softmax's output, not the batched
  # q.k scores (checkpoint_dots keeps those) and nothing the softmax needs
  # recomputing (dots_with_no_batch_dims keeps no score-sized array).
  from fewbit_jax.attention import SOFTMAX_NAME
  attend, args = _attention(norm=False)
  saved = lambda kind: _saved_by_policy(attend, args, kind)

  scores = 4 * 16 * 16 * 4
  probs = saved("dots_and_probs")
  assert probs[f"named {SOFTMAX_NAME!r}"] == scores
  assert probs["op dot_general"] == 3 * 4 * 16 * D * 4  # q, k, v; no score-sized dot
  assert f"named {SOFTMAX_NAME!r}" not in saved("dots_with_no_batch_dims_saveable")
  assert saved("checkpoint_dots")["op dot_general"] > probs["op dot_general"]  # + q.k, p @ v
  _assert_remat_gradient_equal(attend, args, "dots_and_probs", argnums=(0, 1, 2))


def test_lean_without_probs_keeps_no_probabilities_and_the_same_gradient():
  # 'lean_without_probs' is 'lean' but for the softmax's output: with the
  # lean softmax and a lean LayerNorm, it keeps the norm's residuals and not
  # the score-sized probabilities that 'lean' keeps.
  from fewbit_jax.attention import SOFTMAX_NAME
  from fewbit_jax.norms import NORM_STATS_NAME
  attend, args = _attention(norm=True)
  saved = lambda kind: _saved_by_policy(attend, args, kind)

  lean, without = saved("lean"), saved("lean_without_probs")
  assert lean[f"named {SOFTMAX_NAME!r}"] == 4 * 16 * 16 * 4
  assert f"named {SOFTMAX_NAME!r}" not in without
  assert without[f"named {NORM_STATS_NAME!r}"] == lean[f"named {NORM_STATS_NAME!r}"] > 0
  _assert_remat_gradient_equal(attend, args, "lean_without_probs", argnums=(0, 1, 2, 3))
