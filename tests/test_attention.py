"""fb.softmax and fb.dot_product_attention against jax.nn.softmax and flax's attention.

Drop-in: the same forward output bitwise (dropout with the same key
included), gradients equal up to float rounding (float32, bfloat16,
float16), and what the backward keeps: one score-sized array (the
probabilities), or none with ``recompute_block``, never a dropout mask.
The 8-device sharding test is in tests/test_attention_sharding.py.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fewbit_jax as fb
from fewbit_jax import attention, memory
from fewbit_jax.patch import original, patch_activations

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _tol(dtype):
  return {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}[dtype]


def _err(a, b):
  """max |a - b| relative to the largest |b|."""
  a, b = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (a, b))
  return float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1e-6)


def _close(a, b, dtype, what="", exact=None):
  """`a` equals `b` (vanilla, same dtype) up to rounding.

  In float32 within `_tol`. In 16-bit both round differently: `a` must be as
  close to `exact` (vanilla's float32 result) as `b` is (1.5x), or within `_tol`.
  """
  if exact is None or dtype == jnp.float32:
    err = _err(a, b)
    assert err <= _tol(dtype), f"{what}: relative error {err:.3g} > {_tol(dtype)}"
    return
  err, ref_err = _err(a, exact), _err(b, exact)
  assert err <= max(1.5 * ref_err, _tol(dtype)), (
      f"{what}: relative error {err:.3g} against float32, vanilla's {ref_err:.3g}")


def _close_tree(a, b, what=""):
  """Two gradient trees equal up to float32 rounding, relative to the largest entry.

  (A key projection's bias has a zero gradient, all rounding: compared alone,
  its relative error means nothing.)
  """
  flat = lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(t)])
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  _close(flat(a), flat(b), jnp.float32, what)


def _bitwise(a, b, what=""):
  assert a.dtype == b.dtype and a.shape == b.shape, what
  assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), what


def _score_sized(report, n_scores):
  return [r for r in report.residuals if r.kind not in ("argument", "constant", "literal")
          and int(np.prod(r.shape)) >= n_scores]


# --- softmax ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_forward_bitwise_and_gradients(dtype):
  x = (jax.random.normal(jax.random.key(0), (3, 4, 8)) * 3).astype(dtype)
  where = jax.random.bernoulli(jax.random.key(1), 0.7, (3, 4, 8)).at[0, 1].set(False)
  ct = jax.random.normal(jax.random.key(2), x.shape).astype(dtype)
  cases = ((-1, where), ((1, 2), None), (None, where), (-1, None))
  for axis, w in cases if dtype == jnp.float32 else cases[:1]:
    args = dict(axis=axis, where=w)
    _bitwise(jax.jit(functools.partial(fb.softmax, **args))(x),
             jax.nn.softmax(x, **args), f"{args}")
    loss = lambda sm: jax.jit(jax.grad(lambda x: (sm(x, **args) * ct).sum()))
    g, g_ref = loss(fb.softmax)(x), loss(jax.nn.softmax)(x)
    assert g.dtype == dtype
    exact = loss(jax.nn.softmax)(x.astype(jnp.float32))
    _close(g, g_ref, dtype, f"softmax grad {args}", exact)
  # A fully masked row is 0 with a zero gradient, as jax's.
  y = fb.softmax(x, where=where)
  assert not np.asarray(y[0, 1]).any()
  g = jax.grad(lambda x: (fb.softmax(x, where=where) * ct).sum())(x)
  assert not np.asarray(g[0, 1]).any()


def test_softmax_non_float_goes_to_jax():
  x = jnp.arange(6).reshape(2, 3)
  _bitwise(fb.softmax(x), jax.nn.softmax(x))


def test_softmax_keeps_one_score_sized_array_before_a_matmul():
  s = jax.random.normal(jax.random.key(0), (2, 4, 32, 32))
  v = jax.random.normal(jax.random.key(1), (2, 32, 4, 8))
  where = jnp.arange(32) < 20

  def loss(sm):
    return lambda s, v: jnp.einsum("bhqk,bkhd->bqhd", sm(s, where=where), v).sum()

  n = s.size
  vanilla = _score_sized(memory.saved_residuals(loss(jax.nn.softmax), s, v), n)
  lean = memory.saved_residuals(loss(fb.softmax), s, v)
  assert len(vanilla) >= 3, vanilla
  assert f"named '{attention.SOFTMAX_NAME}'" in lean.by_source()
  # XLA's compiled temp: an f32 score-sized array fewer than jax.nn.softmax.
  temps = [memory.compiled(jax.grad(loss(sm)), s, v).temp for sm in (fb.softmax, jax.nn.softmax)]
  assert temps[0] <= temps[1] - 0.9 * s.nbytes, temps


def test_softmax_masked_gradient_is_zero_in_a_nan_row():
  # Issue 17, defect 8: jax.nn.softmax gives the masked positions 0.
  x = jnp.array([[jnp.nan, 1.0, 2.0], [1.0, 2.0, 3.0]])
  where, c = jnp.array([True, False, True]), jnp.array([1.0, 2.0, 3.0])
  grads = [jax.grad(lambda x: (sm(x, where=where) * c).sum())(x)
           for sm in (fb.softmax, jax.nn.softmax)]
  assert grads[0][0, 1] == grads[1][0, 1] == 0.0
  np.testing.assert_array_equal(np.isnan(grads[0]), np.isnan(grads[1]))


def test_softmax_forward_mode_is_jax_nn():
  # Issue 17, defect 5: jvp, jacfwd, linearize, jvp of grad.
  x = jax.random.normal(jax.random.key(0), (3, 5))
  t = jax.random.normal(jax.random.key(1), (3, 5))
  where = jnp.arange(5) < 4
  for kw in ({}, {"where": where}, {"axis": 0}):
    ours, theirs = (functools.partial(sm, **kw) for sm in (fb.softmax, jax.nn.softmax))
    for a, b in ((jax.jvp(ours, (x,), (t,)), jax.jvp(theirs, (x,), (t,))),
                 (jax.jacfwd(ours)(x), jax.jacfwd(theirs)(x)),
                 (jax.linearize(ours, x)[1](t), jax.linearize(theirs, x)[1](t))):
      for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-6)
    hvp = lambda sm: jax.jvp(jax.grad(lambda x: jnp.sum(sm(x) ** 3)), (x,), (t,))[1]
    np.testing.assert_allclose(hvp(ours), hvp(theirs), rtol=1e-5, atol=1e-6)


SOFTMAX_PROGRAMS = {
    "tanh(softmax(sin s))": lambda sm, s, v: jnp.tanh(sm(jnp.sin(s))).sum(),
    "softmax(s) @ v": lambda sm, s, v: jnp.tanh(sm(s) @ v).sum(),
    "softmax(s, where) @ v": lambda sm, s, v: jnp.tanh(sm(s, where=SOFTMAX_WHERE) @ v).sum(),
    "sum(softmax(s) * s)": lambda sm, s, v: (sm(s) * s).sum(),
    "sum(softmax(s, where) * s)": lambda sm, s, v: (sm(s, where=SOFTMAX_WHERE) * s).sum(),
    "softmax(s, axis=0) @ v": lambda sm, s, v: jnp.tanh(sm(jnp.sin(s), axis=0) @ v).sum(),
    "softmax(sin s) @ v": lambda sm, s, v: jnp.tanh(sm(jnp.sin(s)) @ v).sum(),
}
SOFTMAX_WHERE = jnp.arange(1024) < 700


def _softmax_temps(program):
  s = jax.random.normal(jax.random.key(0), (128, 1024))
  v = jax.random.normal(jax.random.key(1), (1024, 128))
  body = SOFTMAX_PROGRAMS[program]
  return [memory.compiled(jax.grad(functools.partial(body, sm)), s, v).temp
          for sm in (fb.softmax, jax.nn.softmax)], s


@pytest.mark.parametrize("program", [p for p in SOFTMAX_PROGRAMS if p != "sum(softmax(s) * s)"])
def test_softmax_never_keeps_more_than_jax_nn(program):
  # Issue 17, defect 6: compiled temp of jit(grad) against jax.nn.softmax's.
  (ours, theirs), s = _softmax_temps(program)
  assert ours <= theirs, (ours, theirs)


def test_softmax_in_attention_keeps_one_score_sized_array_fewer():
  # softmax(q k^T) @ v at attention's shapes: jax keeps the exponentials
  # beside the y that the matmul keeps (32.0 against 16.0 MiB here).
  q, k, v = (jax.random.normal(jax.random.key(i), (8, 4, 256, 32)) for i in range(3))
  f = lambda sm: lambda q, k, v: jnp.sum(jnp.sin(sm(jnp.einsum("bhqd,bhkd->bhqk", q, k)) @ v))
  ours, theirs = (memory.compiled(jax.grad(f(sm), argnums=(0, 1, 2)), q, k, v).temp
                  for sm in (fb.softmax, jax.nn.softmax))
  scores = 8 * 4 * 256 * 256 * 4
  assert ours <= theirs - scores, (ours, theirs)


def test_softmax_of_the_argument_times_the_argument_keeps_y():
  # The documented exception: XLA recomputes autodiff's exponentials from the
  # step's argument and keeps nothing; the lean softmax keeps y.
  (ours, theirs), s = _softmax_temps("sum(softmax(s) * s)")
  assert theirs < 4096 and ours <= theirs + s.nbytes, (ours, theirs)


# --- dot-product attention -----------------------------------------------------------

B, L, H, D = 2, 16, 3, 8


def _inputs(dtype=jnp.float32, length=L):
  ks = jax.random.split(jax.random.key(3), 6)
  q, k, v = (jax.random.normal(kk, (B, length, H, D)).astype(dtype) for kk in ks[:3])
  bias = jax.random.normal(ks[3], (1, H, length, length)).astype(dtype)
  mask = jnp.broadcast_to(jnp.arange(length) < length - 5, (B, 1, length, length))
  mask = mask.at[1, 0, 2].set(False)          # a fully masked row
  ct = jax.random.normal(ks[4], q.shape).astype(dtype)
  return (q, k, v, bias), mask, ct, ks[5]


def _grads(attn, args, ct, **kw):
  def loss(q, k, v, bias):
    return (attn(q, k, v, bias=bias, **kw).astype(jnp.float32) * ct).sum()
  return jax.grad(loss, argnums=(0, 1, 2, 3))(*args)


CASES = {
    "dropout": dict(dropout_rate=0.1),
    "dropout per head": dict(dropout_rate=0.3, broadcast_dropout=False),
    "deterministic": dict(dropout_rate=0.1, deterministic=True),
    "no dropout": dict(),
    "fp32 softmax": dict(dropout_rate=0.1, force_fp32_for_softmax=True),
}


SLOW = pytest.mark.slow


@pytest.mark.parametrize("case,dtype", [
    ("dropout", jnp.float32), ("dropout", jnp.bfloat16),
    pytest.param("dropout", jnp.float16, marks=SLOW),
    pytest.param("dropout per head", jnp.float32, marks=SLOW),
    pytest.param("deterministic", jnp.bfloat16, marks=SLOW),
    pytest.param("no dropout", jnp.float32, marks=SLOW), ("fp32 softmax", jnp.float16)])
def test_attention_matches_linen(case, dtype):
  args, mask, ct, rng = _inputs(dtype)
  kw = dict(CASES[case], mask=mask, dropout_rng=rng)
  ref_out = jax.jit(lambda q, k, v, b: nn.dot_product_attention(q, k, v, b, **kw))(*args)
  ref = _grads(nn.dot_product_attention, args, ct, **kw)
  exact = ref if dtype == jnp.float32 else _grads(
      nn.dot_product_attention, [a.astype(jnp.float32) for a in args], ct, **kw)
  for block in (None, 4):
    fb_kw = dict(kw, recompute_block=block)
    out = jax.jit(lambda q, k, v, b: fb.dot_product_attention(q, k, v, b, **fb_kw))(*args)
    _bitwise(out, ref_out, f"{case} forward, block {block}")
    grads = _grads(fb.dot_product_attention, args, ct, **fb_kw)
    for name, g, r, e, a in zip(("q", "k", "v", "bias"), grads, ref, exact, args):
      assert g.shape == a.shape and g.dtype == a.dtype
      _close(g, r, dtype, f"{case} d{name}, block {block}", e)


@SLOW
def test_attention_options_match_linen():
  (q, k, v, bias), mask, ct, rng = _inputs()
  cases = [
      dict(mask=None, bias=None),                                  # neither
      dict(mask=mask[:, :, :1], bias=bias[0, :, :1]),              # broadcast rows
      dict(mask=mask.astype(jnp.float32), bias=None),              # a float mask
      dict(mask=mask, bias=None, dtype=jnp.bfloat16),              # computation dtype
      dict(mask=mask, bias=bias, precision=jax.lax.Precision.HIGHEST),
  ]
  for kw in cases:
    kw = dict(kw, dropout_rng=rng, dropout_rate=0.2)
    for block in (None, 8):
      f = lambda q, k, v: fb.dot_product_attention(q, k, v, recompute_block=block, **kw)
      f_ref = lambda q, k, v: nn.dot_product_attention(q, k, v, **kw)
      _bitwise(f(q, k, v), f_ref(q, k, v), f"{kw}")
      dtype = kw.get("dtype", jnp.float32)
      g = jax.grad(lambda *a: (f(*a) * ct).sum(), argnums=(0, 1, 2))(q, k, v)
      g_ref = jax.grad(lambda *a: (f_ref(*a) * ct).sum(), argnums=(0, 1, 2))(q, k, v)
      for a, b in zip(g, g_ref):
        _close(a, b, dtype, f"{kw} block {block}")
  # Leading dims beyond one batch dim, and none at all.
  for shape in ((2, 2, L, H, D), (L, H, D)):
    x = jax.random.normal(jax.random.key(7), shape)
    _bitwise(fb.dot_product_attention(x, x, x), nn.dot_product_attention(x, x, x))


def test_attention_matches_nnx_causal_and_sow():
  (q, k, v, _), mask, ct, rng = _inputs()
  kw = dict(mask=mask, dropout_rng=rng, dropout_rate=0.1, is_causal=True)
  out = fb.dot_product_attention(q, k, v, **kw)
  _bitwise(out, nnx.dot_product_attention(q, k, v, **kw), "nnx causal")
  # Without dropout nnx calls jax.nn.dot_product_attention (logits scaled, not q).
  kw = dict(mask=mask, is_causal=True)
  np.testing.assert_allclose(fb.dot_product_attention(q, k, v, **kw),
                             nnx.dot_product_attention(q, k, v, **kw), atol=1e-6)

  # Sowing: linen's 'intermediates' and nnx.Intermediate get the same weights.
  class Sow(nn.Module):
    fn: object

    @nn.compact
    def __call__(self, q):
      return self.fn(q, k, v, mask=mask, module=self)

  weights = {}
  for name, fn in (("flax", nn.dot_product_attention), ("fb", fb.dot_product_attention)):
    out, state = Sow(fn).apply({}, q, mutable=["intermediates"])
    weights[name] = state["intermediates"]["attention_weights"][0]
  _bitwise(weights["fb"], weights["flax"], "sown weights")

  class NSow(nnx.Module):
    def __call__(self, q, fn):
      return fn(q, k, v, mask=mask, module=self)

  _, captured = nnx.capture(NSow(), nnx.Intermediate)(q, fb.dot_product_attention)
  _bitwise(captured["attention_weights"][0], weights["flax"], "nnx sown weights")
  # A loss of the output and of the sown weights differentiates through both.
  def loss(fn, q):
    out, state = Sow(fn).apply({}, q, mutable=["intermediates"])
    return (out * ct).sum() + (state["intermediates"]["attention_weights"][0] ** 2).sum()
  _close(jax.grad(functools.partial(loss, fb.dot_product_attention))(q),
         jax.grad(functools.partial(loss, nn.dot_product_attention))(q), jnp.float32, "sow grad")


def test_attention_keeps_one_score_sized_array_or_none():
  (q, k, v, bias), mask, ct, rng = _inputs()
  kw = dict(mask=mask, bias=bias, dropout_rng=rng, dropout_rate=0.1, broadcast_dropout=False)
  n = B * H * L * L

  def kept(block=None, fn=fb.dot_product_attention):
    extra = {} if fn is nn.dot_product_attention else dict(recompute_block=block)
    rep = memory.saved_residuals(lambda q, k, v: fn(q, k, v, **kw, **extra).sum(), q, k, v)
    return [(r.origin, r.dtype) for r in _score_sized(rep, n)], rep

  vanilla, _ = kept(fn=nn.dot_product_attention)
  assert len(vanilla) >= 3, vanilla            # including the dropout mask
  probs, _ = kept()
  assert probs == [(f"named '{attention.PROBS_NAME}'", "float32")]
  none, rep = kept(block=4)
  assert none == []
  assert set(rep.by_source()) == {f"named '{attention.STATS_NAME}'",
                                  f"named '{attention.OUTPUT_NAME}'"}


def test_multi_head_attention_modules():
  x = jax.random.normal(jax.random.key(0), (2, 16, 24))
  mask = nn.make_attention_mask(jnp.arange(16)[None] < jnp.array([[12], [16]]),
                                jnp.ones((2, 16)))
  for attn in (fb.dot_product_attention,
               functools.partial(fb.dot_product_attention, recompute_block=8)):
    kw = dict(num_heads=4, dropout_rate=0.1, deterministic=False)
    ref, lean = nn.MultiHeadDotProductAttention(**kw), nn.MultiHeadDotProductAttention(
        **kw, attention_fn=attn)
    params = ref.init(jax.random.key(1), x)
    assert jax.tree.structure(lean.init(jax.random.key(1), x)) == jax.tree.structure(params)
    rngs = {"dropout": jax.random.key(2)}
    loss = lambda m: lambda p: (m.apply(p, x, mask=mask, rngs=rngs) ** 2).sum()
    _bitwise(lean.apply(params, x, mask=mask, rngs=rngs),
             ref.apply(params, x, mask=mask, rngs=rngs), "linen module")
    _close_tree(jax.grad(loss(lean))(params), jax.grad(loss(ref))(params), "linen module")

    def nnx_model(fn):
      return nnx.MultiHeadAttention(num_heads=4, in_features=24, decode=False, deterministic=False,
                                    dropout_rate=0.1, attention_fn=fn, rngs=nnx.Rngs(0))
    if attn is not fb.dot_product_attention:
      continue  # recompute_block on nnx: the same function, checked above on linen
    outs, grads = [], []
    for fn in (nnx.dot_product_attention, attn):
      model = nnx_model(fn)
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      def nloss(params):
        m = nnx.merge(graphdef, params, rest)
        return (m(x, mask=mask, rngs=nnx.Rngs(dropout=5)) ** 2).sum()
      outs.append(nnx.merge(graphdef, params, rest)(x, mask=mask, rngs=nnx.Rngs(dropout=5)))
      grads.append(jax.grad(nloss)(params))
    _bitwise(outs[1], outs[0], "nnx module")
    _close_tree(grads[1], grads[0], "nnx module")


def test_checkpoint_policy_keeps_attention_residuals():
  (q, k, v, _), mask, ct, rng = _inputs()
  for block, names in ((None, {attention.PROBS_NAME}),
                       (8, {attention.STATS_NAME, attention.OUTPUT_NAME})):
    f = lambda q: fb.dot_product_attention(q, k, v, mask=mask, recompute_block=block)
    g = jax.checkpoint(lambda q: jnp.sin(f(q)), policy=fb.checkpoint_policy())
    rep = memory.saved_residuals(lambda q: g(q).sum(), q)
    # The named arrays, and only they (inside the block those of the
    # checkpointed tangent are labelled 'op remat2' by the report).
    allowed = {f"named '{n}'" for n in names} | {"op remat2"}
    assert set(rep.by_source()) <= allowed, rep.by_source()
    b, length, h = q.shape[0], q.shape[1], q.shape[2]
    want = (b * h * length * length * 4 if block is None
            else q.nbytes + 2 * b * h * length * 4)
    assert rep.saved_bytes == want, (rep.by_source(), want)
    _close(jax.grad(lambda q: g(q).sum())(q), jax.grad(lambda q: jnp.sin(f(q)).sum())(q),
           jnp.float32, "remat grad")


def test_patch_softmax_makes_flax_attention_lean():
  (q, k, v, _), mask, ct, _ = _inputs()
  loss = lambda q: (nn.dot_product_attention(q, k, v, mask=mask) * ct).sum()
  g_ref = jax.grad(loss)(q)
  with patch_activations(softmax=True) as p:
    assert nn.softmax is not original("softmax") and jax.nn.softmax is not original("softmax")
    rep = memory.saved_residuals(loss, q)
    g = jax.grad(loss)(q)
    assert p.calls() == {"softmax": 2}
  assert jax.nn.softmax is original("softmax")
  assert f"named '{attention.SOFTMAX_NAME}'" in rep.by_source()
  temps = [memory.compiled(jax.grad(loss), q).temp]
  with patch_activations(softmax=True):
    temps.append(memory.compiled(jax.grad(loss), q).temp)
  assert temps[1] <= temps[0], temps
  _close(g, g_ref, jnp.float32, "patched softmax")
  with pytest.raises(ValueError, match="softmax=True"):
    patch_activations(softmax=3)


def test_recompute_block_takes_numpy_integers():
  # Issue 17, defect 8: np.int64(3) is an integer that divides 6.
  q = k = v = jax.random.normal(jax.random.key(0), (1, 6, 2, 4))
  want = fb.dot_product_attention(q, k, v, recompute_block=3)
  for block in (np.int64(3), np.int32(3), np.array(3)):
    np.testing.assert_array_equal(fb.dot_product_attention(q, k, v, recompute_block=block), want)
    g = jax.grad(lambda q: fb.dot_product_attention(q, k, v, recompute_block=block).sum())(q)
    assert g.shape == q.shape


def test_attention_errors():
  (q, k, v, _), mask, _, _ = _inputs()
  with pytest.raises(ValueError, match="needs a dropout_rng"):
    fb.dot_product_attention(q, k, v, dropout_rate=0.1)
  with pytest.raises(ValueError, match="dividing kv_length 16"):
    fb.dot_product_attention(q, k, v, recompute_block=5)
  for bad in (np.int64(5), 4.0, True, "4"):
    with pytest.raises(ValueError, match="positive integer dividing kv_length 16"):
      fb.dot_product_attention(q, k, v, recompute_block=bad)
  with pytest.raises(ValueError, match="module= sows"):
    fb.dot_product_attention(q, k, v, recompute_block=8, module=nnx.Dropout(0.1))
  with pytest.raises(ValueError, match="must divide the query heads"):
    fb.dot_product_attention(q, k[..., :2, :], v[..., :2, :])
  with pytest.raises(ValueError, match="same rank"):
    fb.dot_product_attention(q, k[0], v)
  with pytest.raises(NotImplementedError, match="einsum_dot_general instead"):
    fb.dot_product_attention(q, k, v, qk_attn_weights_einsum=jnp.einsum,
                             attn_weights_value_einsum=jnp.einsum)


@pytest.mark.parametrize("block", [None, 8])
def test_attention_forward_mode_is_flax(block):
  # Issue 17, defect 5: jvp, jacfwd, linearize, jvp of grad and vmap of grad
  # (in q and in the bias) equal autodiff of flax's attention.
  (q, k, v, bias), mask, _, rng = _inputs()
  kw = dict(mask=mask, dropout_rng=rng, dropout_rate=0.1)
  ours = lambda q, b: fb.dot_product_attention(q, k, v, b, recompute_block=block, **kw)
  theirs = lambda q, b: nn.dot_product_attention(q, k, v, b, **kw)
  t, tb = k * 0.5, bias * 0.5
  close = lambda a, b: [np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-5)
                        for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  close(jax.jvp(ours, (q, bias), (t, tb)), jax.jvp(theirs, (q, bias), (t, tb)))
  close(jax.linearize(ours, q, bias)[1](t, tb), jax.jvp(theirs, (q, bias), (t, tb))[1])
  first = lambda f: lambda q: f(q, bias)[0, 0, 0]
  close(jax.jacfwd(first(ours))(q), jax.jacfwd(first(theirs))(q))
  loss = lambda f: lambda q, b: jnp.sum(jnp.sin(f(q, b)))
  close(jax.jvp(jax.grad(loss(ours), (0, 1)), (q, bias), (t, tb)),
        jax.jvp(jax.grad(loss(theirs), (0, 1)), (q, bias), (t, tb)))
  close(jax.vmap(jax.grad(loss(ours)), (0, None))(q[None], bias),
        jax.vmap(jax.grad(loss(theirs)), (0, None))(q[None], bias))


# --- decoder attention: grouped-query heads, causal / window / boolean masks, soft-cap ----

DN, DT, DH = 4, 16, 8          # query heads, length, depth of the decoder cases


def _decoder_inputs(dtype, kv_heads, length=DT, batch=B):
  ks = jax.random.split(jax.random.key(11), 4)
  q = jax.random.normal(ks[0], (batch, length, DN, DH)) * 2
  k, v = (jax.random.normal(kk, (batch, length, kv_heads, DH)) for kk in ks[1:3])
  ct = jax.random.normal(ks[3], q.shape)
  return tuple(x.astype(dtype) for x in (q, k, v, ct))


def _position_mask(t, s, causal, window):
  """The [t, s] mask that is_causal / local_window_size mean (jax.nn's)."""
  qpos, kpos = np.arange(t)[:, None], np.arange(s)[None]
  keep = np.ones((t, s), bool)
  if causal:
    keep &= kpos <= qpos
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    keep &= (qpos <= kpos + left) & (qpos >= kpos - right)
  return jnp.asarray(keep)


def _einsum_attention(q, k, v, mask=None, soft_cap=None):
  """Attention as gemma / llama code writes it: k, v repeated, einsum, where, softmax."""
  groups = q.shape[-2] // k.shape[-2]
  k, v = jnp.repeat(k, groups, axis=-2), jnp.repeat(v, groups, axis=-2)
  w = jnp.einsum("btnh,bsnh->bnts", q * (q.shape[-1] ** -0.5), k)
  if soft_cap is not None:
    w = jnp.tanh(w / soft_cap) * soft_cap
  if mask is not None:
    w = jnp.where(mask, w, jnp.finfo(w.dtype).min)
  p = jax.nn.softmax(w, axis=-1)

  return jnp.einsum("bnts,bsnh->btnh", p, v)


def _padding_mask(length):
  """A [B, 1, T, S] boolean mask: padded keys at the end of row 1, no row fully masked."""
  lengths = jnp.array([length, length - 5])
  return jnp.broadcast_to((jnp.arange(length)[None] < lengths[:, None])[:, None, None],
                          (B, 1, length, length))


# (kv heads, mask, is_causal, window, soft_cap): mask is None, "bts" ([B, 1, T, S]) or "ts".
DECODER_CASES = [
    (2, None, True, None, None),            # GQA, causal
    (1, None, True, None, 5.0),             # MQA, causal, soft-cap
    (2, "bts", True, (3, 0), None),         # GQA, padding + causal + sliding window
    (1, "ts", False, (2, 1), 3.0),          # MQA, a [T, S] mask, two-sided window, soft-cap
    (2, "bts", False, None, 4.0),           # GQA, padding, soft-cap
    (DN, None, True, 4, None),              # all heads, causal + window
]


def _decoder_call(case, block):
  kv, mask_kind, causal, window, cap = case
  def call(q, k, v, fn=fb.dot_product_attention):
    mask = {None: None, "bts": _padding_mask(q.shape[1]),
            "ts": _position_mask(q.shape[1], q.shape[1], True, None)}[mask_kind]
    return fn(q, k, v, mask=mask, is_causal=causal, local_window_size=window, soft_cap=cap,
              recompute_block=block)
  def reference(q, k, v):
    mask = {None: None, "bts": _padding_mask(q.shape[1]),
            "ts": _position_mask(q.shape[1], q.shape[1], True, None)}[mask_kind]
    full = _position_mask(q.shape[1], k.shape[1], causal, window)
    full = full if mask is None else jnp.logical_and(mask, full)
    if cap is None and q.dtype == jnp.float32:  # jax.nn's causal / window, k, v not repeated
      return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else (
          mask if mask.ndim == 4 else mask[None, None]), is_causal=causal,
          local_window_size=window, implementation="xla")
    return _einsum_attention(q, k, v, full, cap)
  return call, reference


def _out_and_grads(f, ct):
  """jit(q, k, v -> (f's output, its gradients for the cotangent ct)): one compile."""
  def run(q, k, v):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct.astype(out.dtype))
  return jax.jit(run)


def _case_id(c):
  return f"kv{c[0]}-{c[1]}-causal{c[2]}-window{c[3]}-cap{c[4]}".replace(" ", "")


# Every case in float32; in bfloat16 half of them by default, all with --runslow.
@pytest.mark.parametrize("case,dtype", [
    pytest.param(c, d, id=f"{_case_id(c)}-{d.__name__}",
                 marks=SLOW if d == jnp.bfloat16 and i % 2 else ())
    for d in (jnp.float32, jnp.bfloat16) for i, c in enumerate(DECODER_CASES)])
def test_decoder_attention_matches_jax_nn(case, dtype):
  # float32: against jax.nn.dot_product_attention's own is_causal /
  # local_window_size (k, v not repeated), or the einsum way with a soft-cap.
  # bfloat16: as close to the float32 result as the einsum way in bfloat16
  # (2x), or within 4e-2 (a few bfloat16 roundings of the largest entry).
  q, k, v, ct = _decoder_inputs(dtype, case[0])
  _, reference = _decoder_call(case, None)
  ref_out, ref_g = _out_and_grads(reference, ct)(q, k, v)
  if dtype == jnp.float32:
    exact_out, exact_g = ref_out, ref_g
  else:
    exact_out, exact_g = _out_and_grads(reference, ct)(
        *[x.astype(jnp.float32) for x in (q, k, v)])
  def close(a, b, e, what):
    if dtype == jnp.float32:
      _close(a, b, dtype, what)
    else:
      err, ref_err = _err(a, e), _err(b, e)
      assert err <= max(2 * ref_err, 4e-2), (
          f"{what}: {err:.3g} against float32, vanilla's {ref_err:.3g}")
  for block in (None, 4):
    call, _ = _decoder_call(case, block)
    out, g = _out_and_grads(call, ct)(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    close(out, ref_out, exact_out, f"{case} forward, block {block}")
    for name, a, b, e, x in zip("qkv", g, ref_g, exact_g, (q, k, v)):
      assert a.shape == x.shape and a.dtype == x.dtype
      close(a, b, e, f"{case} d{name}, block {block}")


def test_decoder_attention_equals_repeated_heads():
  # Grouped heads are the query heads of repeated k, v: the same forward
  # (the same products) and gradients, dk and dv summed over each group.
  q, k, v, ct = _decoder_inputs(jnp.float32, 2)
  for block in (None, 8):
    kw = dict(is_causal=True, soft_cap=7.0, recompute_block=block)
    def loss(q, k, v, groups):
      k, v = jnp.repeat(k, groups, axis=-2), jnp.repeat(v, groups, axis=-2)
      return (fb.dot_product_attention(q, k, v, **kw) * ct).sum()
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    g, g_rep = grads(q, k, v, 1), grads(q, k, v, DN // 2)
    for a, b in zip(g, g_rep):
      _close(a, b, jnp.float32, f"block {block}")


def test_causal_mask_forms_agree_and_old_is_causal_is_bitwise():
  q, k, v, _ = _decoder_inputs(jnp.float32, DN)
  causal = _position_mask(DT, DT, True, None)
  pad = _padding_mask(DT)
  # is_causal, a [T, S] mask and a [B, 1, T, S] mask: the same numbers.
  a = fb.dot_product_attention(q, k, v, is_causal=True)
  b = fb.dot_product_attention(q, k, v, mask=causal)
  c = fb.dot_product_attention(q, k, v, mask=jnp.broadcast_to(causal, (B, 1, DT, DT)))
  _bitwise(a, b), _bitwise(a, c)
  # is_causal with a mask: nnx's forward, bitwise, as before.
  kw = dict(mask=pad, dropout_rng=jax.random.key(0), dropout_rate=0.1, is_causal=True)
  _bitwise(fb.dot_product_attention(q, k, v, **kw), nnx.dot_product_attention(q, k, v, **kw))
  # A window given as one int is (int, int).
  _bitwise(fb.dot_product_attention(q, k, v, local_window_size=3),
           fb.dot_product_attention(q, k, v, local_window_size=(3, 3)))


@pytest.mark.parametrize("block", [None, 4])
def test_decoder_attention_with_dropout_bias_and_fp32_softmax(block):
  # The decoder options compose with flax's: dropout (the same mask as
  # without blocks), a bias, a float32 softmax of bfloat16 inputs.
  q, k, v, ct = _decoder_inputs(jnp.bfloat16, 2)
  bias = jax.random.normal(jax.random.key(5), (1, DN, DT, DT)).astype(jnp.bfloat16)
  kw = dict(bias=bias, is_causal=True, local_window_size=(5, 0), soft_cap=6.0,
            dropout_rng=jax.random.key(2), dropout_rate=0.2, force_fp32_for_softmax=True)
  def loss(q, k, v, bias, block, dtype=jnp.bfloat16):
    args = [x.astype(dtype) for x in (q, k, v)]
    out = fb.dot_product_attention(*args, **dict(kw, bias=bias.astype(dtype)),
                                   recompute_block=block)
    return (out.astype(jnp.float32) * ct.astype(jnp.float32)).sum()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=(4, 5))
  g = grads(q, k, v, bias, block)
  g_full = grads(q, k, v, bias, None)                # no blocks: the lean path
  g_exact = grads(q, k, v, bias, None, jnp.float32)  # float32
  for a, b, e in zip(g, g_full, g_exact):
    assert a.dtype == jnp.bfloat16
    _close(a, b, jnp.bfloat16, f"block {block}", e)


def test_decoder_attention_keeps_no_mask_and_no_scores_with_blocks():
  q, k, v, _ = _decoder_inputs(jnp.float32, 2, length=64)
  n_scores = B * DN * 64 * 64
  pad = _padding_mask(64)
  for mask, kw in ((None, dict(is_causal=True, soft_cap=5.0)),
                   (pad, dict(is_causal=True, local_window_size=(16, 0))),
                   (pad[0, 0], dict())):
    for block in (None, 16):
      f = lambda q, k, v: fb.dot_product_attention(q, k, v, mask=mask, recompute_block=block,
                                                   **kw).sum()
      rep = memory.saved_residuals(f, q, k, v)
      made = [r for r in rep.residuals if r.kind not in ("argument", "constant", "literal")]
      # No mask at all (the causal / window one comes from iota, a given
      # one is kept as given: an argument), and the probabilities or nothing.
      assert not [r for r in made if r.dtype == "bool"], rep.by_source()
      big = [(r.origin, r.dtype) for r in _score_sized(rep, n_scores // DN)]
      want = [] if block else [(f"named '{attention.PROBS_NAME}'", "float32")]
      assert big == want, (kw, block, rep.by_source())


def test_decoder_attention_compiled_memory():
  # Compiled temp of jit(grad): less than jax.nn.dot_product_attention's
  # and the einsum way's (both materialise the mask at the scores' size or
  # repeat k, v); with blocks, less than one float32 score-sized array.
  q, k, v, _ = _decoder_inputs(jnp.float32, 2, length=256, batch=2)
  scores = 2 * DN * 256 * 256 * 4
  pad = _padding_mask(256)
  causal = _position_mask(256, 256, True, (64, 0))
  loss = lambda f: jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2))
  temp = lambda f: memory.compiled(loss(f), q, k, v).temp
  kw = dict(is_causal=True, local_window_size=(64, 0))
  jax_nn = temp(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=pad, implementation="xla", **kw))
  einsum = temp(lambda q, k, v: _einsum_attention(q, k, v, jnp.logical_and(pad, causal)))
  lean = temp(lambda q, k, v: fb.dot_product_attention(q, k, v, mask=pad, **kw))
  blocks = temp(lambda q, k, v: fb.dot_product_attention(q, k, v, mask=pad, recompute_block=64,
                                                         **kw))
  assert lean < min(jax_nn, einsum), (lean, jax_nn, einsum)
  assert blocks < scores / 2, (blocks, scores)


def test_tile_fraction_counts_the_skipped_tiles():
  assert attention.tile_fraction(64, 64, 16) == 1.0
  assert attention.tile_fraction(64, 64, 16, is_causal=True) == 10 / 16
  assert attention.tile_fraction(64, 64, 16, local_window_size=(16, 0)) == 7 / 16
  assert attention.tile_fraction(64, 64, 16, is_causal=True, local_window_size=(100, 100)) \
      == 10 / 16
  # The compiled forward and backward loops run exactly these tiles (XLA's
  # trip counts; its cost analysis counts a loop body once).
  q, k, v, _ = _decoder_inputs(jnp.float32, 2, length=64)
  def trips(**kw):
    g = jax.grad(lambda q: fb.dot_product_attention(q, k, v, recompute_block=16, **kw).sum())
    text = jax.jit(g).lower(q).compile().as_text()
    return sorted(int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', text))
  assert trips(soft_cap=50.0) == [4, 4]        # nothing to skip: all queries per tile
  assert trips(is_causal=True) == [10, 10]
  assert trips(is_causal=True, local_window_size=(16, 0)) == [7, 7]


@pytest.mark.parametrize("block", [None, 4])
def test_decoder_attention_transforms(block):
  # jit, vmap, scan, jax.checkpoint, forward mode (jvp, linearize, jvp of grad).
  q, k, v, ct = _decoder_inputs(jnp.float32, 2)
  kw = dict(is_causal=True, local_window_size=(4, 0), soft_cap=5.0, mask=_padding_mask(DT)[0])
  ours = lambda q, k, v: fb.dot_product_attention(q, k, v, recompute_block=block, **kw)
  full = jnp.logical_and(kw["mask"], _position_mask(DT, DT, True, (4, 0)))
  theirs = lambda q, k, v: _einsum_attention(q, k, v, full, 5.0)
  close = lambda a, b: [np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-5)
                        for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)) * ct)
  t = (q * 0.2, k * 0.5, v * 0.3)

  def everything(f):
    grads = jax.grad(loss(f), (0, 1, 2))(q, k, v)
    # vmap over an extra batch axis (a per-example call).
    per = jax.vmap(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q[None], k[None], v[None])))))
    # scan over two layers, each checkpointed.
    step = lambda x, _: (jax.checkpoint(lambda x: f(x, k, v))(x), None)
    stack = jax.grad(lambda q: jnp.sum(jnp.sin(jax.lax.scan(step, q, None, length=2)[0])))(q)
    # Forward mode: jvp, linearize, jvp of grad.
    return (grads, per(q, k, v), stack, jax.jvp(f, (q, k, v), t),
            jax.linearize(f, q, k, v)[1](*t), jax.jvp(jax.grad(loss(f)), (q, k, v), t))

  close(jax.jit(everything, static_argnums=0)(ours), jax.jit(everything, static_argnums=0)(theirs))


def test_decoder_attention_errors():
  q, k, v, _ = _decoder_inputs(jnp.float32, 2)
  with pytest.raises(ValueError, match=r"key/value heads \(3\) must divide the query heads \(4\)"):
    fb.dot_product_attention(q, k[..., :1, :].repeat(3, -2), v[..., :1, :].repeat(3, -2))
  with pytest.raises(ValueError, match="key and value must have the same number of heads"):
    fb.dot_product_attention(q, k, v[..., :1, :])
  with pytest.raises(ValueError, match=r"mask of shape \(16, 15\) does not broadcast"):
    fb.dot_product_attention(q, k, v, mask=jnp.ones((DT, DT - 1), bool))
  with pytest.raises(ValueError, match=r"mask of shape \(2, 2, 16, 16\) does not broadcast"):
    fb.dot_product_attention(q, k, v, mask=jnp.ones((B, 2, DT, DT), bool))
  with pytest.raises(ValueError, match=r"bias of shape \(3, 1, 16, 16\) does not broadcast"):
    fb.dot_product_attention(q, k, v, bias=jnp.ones((3, 1, DT, DT)))
  for bad in ((1, 2, 3), (-1, 0), "4", 2.5, (True, 1)):
    with pytest.raises(ValueError, match="local_window_size"):
      fb.dot_product_attention(q, k, v, local_window_size=bad)
  for bad in (0.0, -1.0, float("inf"), "30", True):
    with pytest.raises(ValueError, match="soft_cap must be a positive finite number"):
      fb.dot_product_attention(q, k, v, soft_cap=bad)


def test_blocked_rows_with_no_visible_key_are_flax_s():
  # Queries past the keys' end see nothing through a causal window (no
  # tile at all for the last query block): flax's answer, uniform over the
  # keys (as without blocks), not NaN; and cross-attention lengths.
  ks = jax.random.split(jax.random.key(4), 4)
  q, ct = (jax.random.normal(kk, (B, 16, DN, DH)) for kk in ks[:2])
  k, v = (jax.random.normal(kk, (B, 8, 2, DH)) for kk in ks[2:])
  kw = dict(is_causal=True, local_window_size=(2, 0), soft_cap=9.0)
  run = lambda block: _out_and_grads(lambda q, k, v: fb.dot_product_attention(
      q, k, v, recompute_block=block, **kw), ct)(q, k, v)
  (out, g), (ref, g_ref) = run(4), run(None)
  assert np.isfinite(np.asarray(out)).all()
  _close(out, ref, jnp.float32, "forward")
  for name, a, b in zip("qkv", g, g_ref):
    _close(a, b, jnp.float32, f"d{name}")
