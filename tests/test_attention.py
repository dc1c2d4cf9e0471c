"""fb.softmax and fb.dot_product_attention against jax.nn.softmax and flax's attention.

Drop-in: the same forward output bitwise (dropout with the same key
included), gradients equal up to float rounding (float32, bfloat16,
float16), and what the backward keeps: one score-sized array (the
probabilities), or none with ``recompute_block``, never a dropout mask.
The 8-device sharding test is in tests/test_attention_sharding.py.
"""

from __future__ import annotations

import functools

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
  with pytest.raises(ValueError, match="Grouped-query"):
    fb.dot_product_attention(q, k[..., :1, :], v[..., :1, :])
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
