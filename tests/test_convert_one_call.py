"""fb.nnx.convert and fb.linen.convert on models written without the library.

The NNX model is the repository's Gemma-style decoder (fewbit_jax/_models/decoder.py:
hand-written RMSNorm, GQA with RoPE, inline gated GELU, an nnx.List of
layers); the linen model below is written in the style of flax's lm1b example
(pre-LayerNorm blocks named ``encoderdecoderblock_<i>``, flax's attention with
a causal mask, dropout, an MLP with an inline activation). Each is trained in
its own loop pattern: nnx.jit + nnx.value_and_grad, the functional jax.jit
with nnx.split/merge and fb.nnx.step_keys, and linen's apply.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fewbit_jax as fb
from fewbit_jax._models import decoder as D

CFG = D.DecoderConfig.tiny()
TOKENS = D.make_tokens(CFG, 2, 16)


def _model(**kw):
  return D.Decoder(CFG, rngs=nnx.Rngs(0), **kw)


def _flat(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _rel(a, b):
  a, b = _flat(a), _flat(b)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))


@nnx.jit
def _nnx_jit_step(model, tokens):
  return nnx.value_and_grad(D.loss_fn)(model, tokens)


def _nnx_jit_grads(model, tokens):
  loss, grads = _nnx_jit_step(model, tokens)
  return loss, nnx.to_pure_dict(grads)


def _functional(model):
  """The functional loop's step (jax.jit over nnx.split), and the split state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, tokens):
    return D.loss_fn(nnx.merge(graphdef, params, rest), tokens)

  @jax.jit
  def step(params, rest, tokens, key):
    with fb.nnx.step_keys(key):
      loss_value, grads = jax.value_and_grad(loss)(params, rest, tokens)
    return loss_value, nnx.to_pure_dict(grads)
  return step, params, rest


def _saved_bytes(model, tokens):
  """What the model's backward keeps (fb.memory.saved_residuals), without compiling."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda params: D.loss_fn(nnx.merge(graphdef, params, rest), tokens)
  return fb.memory.saved_residuals(loss, params).saved_bytes


@pytest.fixture(scope="module")
def vanilla():
  """The vanilla model's loss and gradients (the functional loop)."""
  step, params, rest = _functional(_model())
  return step(params, rest, TOKENS, jax.random.key(0))


def test_nnx_exact_remat_nnx_jit_same_variables_forward_and_gradients(vanilla):
  model = _model()
  kernel = model.layers[0].mlp.up_proj.kernel
  out = fb.nnx.convert(model, exact=True, remat=True)
  assert out is model and model.layers[0].mlp.up_proj.kernel is kernel  # the same Variables
  assert isinstance(model.layers[0], D.Block)
  done = fb.nnx.conversion(model)
  assert done.blocks == ["/layers/0", "/layers/1"]
  assert "/final_norm" in done.cheap and "/layers/0/pre_ffw_norm" in done.cheap
  assert done.activations["gelu"] == "exact" and done.activations["softmax"] is True
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(_model(), nnx.Param)),
               nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  loss, grads = _nnx_jit_grads(model, TOKENS)
  np.testing.assert_allclose(loss, vanilla[0], rtol=1e-6)  # the forward
  assert _rel(vanilla[1], grads) < 1e-5


def test_nnx_exact_functional_loop_equal_gradients_and_keeps_less(vanilla):
  model = fb.nnx.convert(_model(), exact=True)
  step, params, rest = _functional(model)
  loss, grads = step(params, rest, TOKENS, jax.random.key(3))
  np.testing.assert_allclose(loss, vanilla[0], rtol=1e-6)
  assert _rel(vanilla[1], grads) < 1e-5
  # What the backward keeps (the compiled memory on CPU needs the CSE flag for the
  # recomputed norms: benchmarks/frontier.py measures it).
  assert _saved_bytes(model, TOKENS) < 0.8 * _saved_bytes(_model(), TOKENS)


def _unbiased(reference, samples):
  single = np.mean([_rel(reference, g) for g in samples])
  mean = jax.tree.map(lambda *g: sum(g) / len(g), *samples)
  assert 0 < single and _rel(reference, mean) < 0.6 * single  # the average approaches it
  assert _rel(samples[0], samples[1]) > 0  # fresh sketches every step


def test_nnx_approximate_remat_nnx_jit_unbiased(vanilla):
  model = fb.nnx.convert(_model(), exact=False, remat=True, rngs=nnx.Rngs(sketch=1))
  done = fb.nnx.conversion(model)
  assert "/layers/0/mlp/up_proj" in done.linear and done.activations["gelu"] == 3
  runs = [_nnx_jit_grads(model, TOKENS) for _ in range(6)]
  np.testing.assert_allclose(runs[0][0], vanilla[0], rtol=1e-5)
  _unbiased(vanilla[1], [g for _, g in runs])


def test_nnx_approximate_functional_loop_step_keys_unbiased(vanilla):
  step, params, rest = _functional(fb.nnx.convert(_model(), exact=False))
  runs = [step(params, rest, TOKENS, jax.random.key(k)) for k in range(6)]
  np.testing.assert_allclose(runs[0][0], vanilla[0], rtol=1e-5)
  _unbiased(vanilla[1], [g for _, g in runs])


def test_nnx_convert_options_and_errors():
  model = fb.nnx.convert(_model(), remat=True, blocks=r"^/layers/1$", cheap=False,
                         policy="dots_with_no_batch_dims_saveable")
  done = fb.nnx.conversion(model)
  assert done.blocks == ["/layers/1"] and done.cheap == [] and done.policy.startswith("dots")
  assert fb.nnx.conversion(fb.nnx.convert(_model(), remat=True, blocks=D.Attention)).blocks == [
      "/layers/0/attn", "/layers/1/attn"]
  with pytest.raises(ValueError, match="converted already"):
    fb.nnx.convert(model)
  with pytest.raises(ValueError, match="no block"):
    fb.nnx.convert(_model(), remat=True, blocks=r"^/nothing$")
  with pytest.raises(ValueError, match="exact=True does not use"):
    fb.nnx.convert(_model(), sketch="countsketch")
  with pytest.raises(ValueError, match="unknown frontier policy"):
    fb.nnx.convert(_model(), remat=True, policy="dots")
  with pytest.raises(TypeError, match="blocks must be"):
    fb.nnx.convert(_model(), remat=True, blocks=3)


def test_nnx_cheap_module_keeps_less_than_its_autodiff():
  x = jax.random.normal(jax.random.key(0), (8, 64))

  def kept(model):
    return fb.memory.saved_residuals(lambda x: model(x).sum(), x).saved_bytes  # closed over

  holder = nnx.Sequential(D.RMSNorm(64, rngs=nnx.Rngs(0)))
  before = kept(holder)
  fb.nnx.convert(holder, activations=False, cheap=r"^/layers/0$")
  assert fb.nnx.conversion(holder).cheap == ["/layers/0"]
  assert kept(holder) < before


def test_nnx_elementwise_soft_capped_attention_keeps_its_matmuls_outputs_only(vanilla):
  # Gemma 2's inline soft-cap, tanh(logits / cap) * cap, keeps its tanh beside
  # the softmax's output; elementwise=True recomputes both from the logits.
  cfg = D.DecoderConfig.tiny(attn_logits_soft_cap=2.0)
  make = lambda: D.Decoder(cfg, rngs=nnx.Rngs(0))
  plain, ew = fb.nnx.convert(make()), fb.nnx.convert(make(), elementwise=True)
  assert fb.nnx.conversion(ew).elementwise == ["/layers/0/attn", "/layers/1/attn"]
  loss, ref = _nnx_jit_grads(make(), TOKENS)
  got_loss, got = _nnx_jit_grads(ew, TOKENS)
  step, params, rest = _functional(ew)
  f_loss, f_got = step(params, rest, TOKENS, jax.random.key(0))
  assert _rel(ref, got) < 1e-5 and _rel(ref, f_got) < 1e-5
  np.testing.assert_allclose([got_loss, f_loss], [loss, loss], rtol=1e-6)
  # The capped model differs from the uncapped one (the cap is applied).
  assert abs(float(loss) - float(vanilla[0])) > 1e-4
  scores = 2 * cfg.num_heads * 16 * 16 * 4  # one float32 [B, heads, L, L] array, per layer
  assert _saved_bytes(ew, TOKENS) <= _saved_bytes(plain, TOKENS) - cfg.num_layers * scores


def test_nnx_elementwise_options_and_errors():
  done = fb.nnx.conversion(fb.nnx.convert(_model(), elementwise=r"^/layers/1/attn$"))
  assert done.elementwise == ["/layers/1/attn"]
  assert fb.nnx.conversion(fb.nnx.convert(_model())).elementwise == []
  with pytest.raises(ValueError, match="remat=True"):
    fb.nnx.convert(_model(), remat=True, elementwise=True)
  with pytest.raises(ValueError, match="matches no module path"):
    fb.nnx.convert(_model(), elementwise=r"^/nothing$")
  with pytest.raises(TypeError, match="elementwise must be"):
    fb.nnx.convert(_model(), elementwise=3)


# --------------------------------------------------------------------------
# The gated MLP, recognised by structure and verified by tracing.

class LlamaMLP(nnx.Module):
  """Llama's names (w1 gate, w3 up, w2 down), SiLU, zero-initialised as gemma's."""

  def __init__(self, rngs, act=nnx.silu, zeros=True):
    init = nnx.initializers.zeros_init() if zeros else nnx.initializers.lecun_normal()
    self.w1 = nnx.Linear(16, 48, use_bias=False, kernel_init=init, rngs=rngs)
    self.w3 = nnx.Linear(16, 48, use_bias=False, kernel_init=init, rngs=rngs)
    self.w2 = nnx.Linear(48, 16, use_bias=False, kernel_init=init, rngs=rngs)
    self.act = act

  def __call__(self, x):
    return self.w2(self.act(self.w1(x)) * self.w3(x))


class LooksGated(LlamaMLP):
  """The same three projections, but not the gated form: a sum, not a product."""

  def __call__(self, x):
    return self.w2(nnx.silu(self.w1(x)) + self.w3(x))


class Holder(nnx.Module):
  def __init__(self, mlp):
    self.mlp = mlp


def _mlp_grads(mlp, x):
  graphdef, params = nnx.split(mlp, nnx.Param)
  f = lambda p, x: (nnx.merge(graphdef, p)(x) ** 2).sum()
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("act, name", [(nnx.silu, "silu"),
                                       (functools.partial(jax.nn.gelu, approximate=False),
                                        "gelu (approximate=False)")])
def test_gated_mlp_recognised_same_params_forward_and_gradients(act, name):
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  reference = LlamaMLP(nnx.Rngs(0), act, zeros=False)
  (value, grads) = _mlp_grads(reference, x)
  holder = Holder(LlamaMLP(nnx.Rngs(0), act, zeros=False))
  kernel = holder.mlp.w1.kernel
  fb.nnx.convert(holder, exact=True)
  assert fb.nnx.conversion(holder).gated == [f"/mlp: {name}"]
  assert isinstance(holder.mlp, LlamaMLP) and holder.mlp.w1.kernel is kernel  # same Variables
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(reference, nnx.Param)),
               nnx.to_pure_dict(nnx.state(holder.mlp, nnx.Param)))
  np.testing.assert_array_equal(holder.mlp(x), reference(x))  # the forward, bitwise
  value2, grads2 = _mlp_grads(holder.mlp, x)
  np.testing.assert_allclose(value2, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), grads,
               grads2)
  # The product now keeps gate and up only (fb.gated's names).
  graphdef, params = nnx.split(holder.mlp, nnx.Param)
  report = fb.memory.saved_residuals(lambda p: nnx.merge(graphdef, p)(x).sum(), params)
  assert {"named 'gated_gate'", "named 'gated_up'"} <= set(report.by_source())


def test_gated_mlp_zero_initialised_decided_on_random_parameters():
  # gemma's FeedForward starts from zero kernels: every activation would match on
  # them; the probe's random parameters tell tanh GELU from erf GELU from SiLU.
  holder = Holder(LlamaMLP(nnx.Rngs(0), nnx.gelu, zeros=True))
  fb.nnx.convert(holder, exact=True, activations=False)
  assert fb.nnx.conversion(holder).gated == ["/mlp: gelu (approximate=True)"]


def test_gated_lookalike_and_gated_false_left_alone():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  holder = Holder(LooksGated(nnx.Rngs(0), zeros=False))
  y = holder.mlp(x)
  cls = type(holder.mlp)
  fb.nnx.convert(holder, exact=True, activations=False)
  assert fb.nnx.conversion(holder).gated == [] and type(holder.mlp) is cls
  np.testing.assert_array_equal(holder.mlp(x), y)
  off = Holder(LlamaMLP(nnx.Rngs(0), zeros=False))
  fb.nnx.convert(off, exact=True, gated=False)
  assert fb.nnx.conversion(off).gated == [] and type(off.mlp) is LlamaMLP


def test_gated_approximate_exact_product_with_randomized_down():
  model = fb.nnx.convert(_model(), exact=False, rngs=nnx.Rngs(sketch=1))
  done = fb.nnx.conversion(model)
  assert done.gated == ["/layers/0/mlp: gelu (approximate=True)",
                        "/layers/1/mlp: gelu (approximate=True)"]
  assert "/layers/0/mlp/down_proj" in done.linear


def test_gated_mlp_recognised_keeps_no_more_compiled_than_gated_false():
  """XLA's temp bytes of two stacked gated MLPs' gradient: recognised <= left to the patch.

  The exact backward recomputes act(gate) and act'(gate) from gate; without
  a barrier XLA merged that recomputation with the forward's act(gate) and
  kept it and the tanh GELU's tanh from the forward pass (one to two
  hidden-sized arrays per MLP more than ``gated=False``). With the remat
  barriers kept (the CSE barrier pass off, as for every remat row on the CPU).
  """
  exact = True
  cfg = D.DecoderConfig(embed_dim=64, hidden_dim=512)

  class Two(nnx.Module):
    def __init__(self):
      self.mlps = nnx.List([D.FeedForward(cfg, rngs=nnx.Rngs(i)) for i in range(2)])

    def __call__(self, x):
      for mlp in self.mlps:
        x = x + mlp(x)
      return x

  x = jax.random.normal(jax.random.key(0), (4, 128, 64))
  keep_barriers = {"xla_disable_hlo_passes": "cse_barrier_expander"}

  def temp(gated):
    model = fb.nnx.convert(Two(), exact=exact, gated=gated, rngs=nnx.Rngs(sketch=0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, x, key):
      with fb.nnx.step_keys(key):
        return (nnx.merge(graphdef, p, rest)(x) ** 2).sum()
    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(params, x, jax.random.key(1)).compile(
        compiler_options=keep_barriers)
    return compiled.memory_analysis().temp_size_in_bytes

  recognised, patched = temp(True), temp(False)
  assert recognised <= patched, (recognised, patched)


def test_decoder_fused_loss_equal_and_keeps_less_than_optax():
  """The one change (return the hidden state) and fb.linear_softmax_cross_entropy."""
  # 128 tokens x 8192 logits: more than the op's default block (2**19 logits).
  cfg = D.DecoderConfig.tiny(vocab_size=8192, num_layers=1)
  tokens = D.make_tokens(cfg, 2, 64)
  model = D.Decoder(cfg, rngs=nnx.Rngs(0))
  assert model(tokens, return_hidden=True).shape == (2, 65, cfg.embed_dim)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  results = {}
  for name, loss_fn in (("optax", D.loss_fn), ("fused", D.fused_loss_fn)):
    f = lambda p: loss_fn(nnx.merge(graphdef, p, rest), tokens)
    compiled = jax.jit(jax.value_and_grad(f)).lower(params).compile()
    results[name] = compiled.memory_analysis().temp_size_in_bytes, compiled(params)
  (optax_temp, (loss, grads)), (fused_temp, (loss2, grads2)) = results["optax"], results["fused"]
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)
  assert _rel(grads, grads2) < 1e-5
  # The logits [2, 64, 8192] are 4 MiB (their exp kept by optax's loss), the
  # transposed table [32, 8192] 1 MiB.
  assert fused_temp < optax_temp - 4 * 2**20


# --------------------------------------------------------------------------
# linen, in the style of flax's lm1b example.

class MlpBlock(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d = x.shape[-1]
    y = nn.relu(nn.Dense(self.mlp_dim)(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return nn.Dense(d)(y)


class EncoderDecoder1DBlock(nn.Module):
  num_heads: int = 2
  mlp_dim: int = 64
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=0.0,
                                        deterministic=deterministic)(y, y, mask=mask)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    z = nn.LayerNorm()(x)
    return x + MlpBlock(self.mlp_dim, self.dropout_rate)(z, deterministic)


class TransformerLM(nn.Module):
  vocab: int = 64
  emb_dim: int = 32
  num_layers: int = 2

  @nn.compact
  def __call__(self, tokens, deterministic: bool = True):
    x = nn.Embed(self.vocab, self.emb_dim)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, tokens.shape[1],
                                                                      self.emb_dim))
    x = x + pos
    mask = nn.make_causal_mask(tokens)
    for i in range(self.num_layers):
      x = EncoderDecoder1DBlock(name=f"encoderdecoderblock_{i}")(x, mask, deterministic)
    x = nn.LayerNorm(name="encoderdecoder_norm")(x)
    return nn.Dense(self.vocab, name="logitdense")(x)


LM_TOKENS = jax.random.randint(jax.random.key(5), (2, 17), 0, 64)


def _lm_loss(params, tokens, key, deterministic=False):
  k1, k2 = jax.random.split(key)
  logits = TransformerLM().apply({"params": params}, tokens[:, :-1], deterministic,
                                 rngs={"dropout": k1, "sketch": k2})
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _lm_init():
  return jax.jit(TransformerLM().init)(jax.random.key(0), LM_TOKENS[:, :-1])["params"]


@pytest.fixture(scope="module")
def lm_params():
  return _lm_init()


def test_linen_exact_remat_same_params_forward_gradients_memory(lm_params):
  with fb.linen.convert(exact=True, remat=True):
    inside = _lm_init()
  jax.tree.map(np.testing.assert_array_equal, inside, lm_params)  # the same parameters
  key = jax.random.key(2)
  # On the CPU, XLA's cse_barrier_expander merges remat's recomputation back
  # into the forward pass (GPU pipelines keep it): the memory is compared with
  # that pass off, for both programs.
  keep_remat = {"xla_disable_hlo_passes": "cse_barrier_expander"}
  plain = jax.jit(jax.value_and_grad(_lm_loss)).lower(lm_params, LM_TOKENS, key).compile(
      compiler_options=keep_remat)
  l0, g0 = plain(lm_params, LM_TOKENS, key)
  with fb.linen.convert(exact=True, remat=True) as done:
    compiled = jax.jit(jax.value_and_grad(_lm_loss)).lower(lm_params, LM_TOKENS, key).compile(
        compiler_options=keep_remat)
  l1, g1 = compiled(lm_params, LM_TOKENS, key)
  assert done.blocks == ["/encoderdecoderblock_0", "/encoderdecoderblock_1"]
  assert "/encoderdecoderblock_0/LayerNorm_0" in done.lean
  assert any(p.endswith("Dropout_0") for p in done.lean)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)  # forward (with dropout) equal
  assert _rel(g0, g1) < 1e-5
  assert compiled.memory_analysis().temp_size_in_bytes < \
      plain.memory_analysis().temp_size_in_bytes


def test_linen_approximate_unbiased(lm_params):
  loss = functools.partial(_lm_loss, deterministic=True)
  _, g0 = jax.jit(jax.value_and_grad(loss))(lm_params, LM_TOKENS, jax.random.key(0))
  with fb.linen.convert(exact=False) as done:
    step = jax.jit(jax.value_and_grad(loss))
    grads = [step(lm_params, LM_TOKENS, jax.random.key(k))[1] for k in range(6)]
  assert "/encoderdecoderblock_0/MlpBlock_0/Dense_0" in done.linear
  _unbiased(g0, grads)


class HandRMSNorm(nn.Module):
  """A Llama RMSNorm written by hand (not flax's class)."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


class LlamaLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(x.shape[-1])(nn.silu(nn.Dense(16)(HandRMSNorm()(x))))


class Llama(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = LlamaLayer(name=f"layers_{i}")(x)
    return HandRMSNorm(name="norm")(x)


def test_linen_own_norms_recomputed_and_blocks_by_pattern():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  v = Llama().init(jax.random.key(1), x)
  loss = lambda v: (Llama().apply(v, x) ** 2).sum()
  ref = jax.grad(loss)(v)
  with fb.linen.convert(remat=True, blocks=r"^/layers_1$") as done:
    got = jax.grad(loss)(v)
    kept = fb.memory.saved_residuals(loss, v).saved_bytes
  assert done.blocks == ["/layers_1"]
  assert done.cheap == ["/layers_0/HandRMSNorm_0", "/layers_1/HandRMSNorm_0", "/norm"]
  assert done.activations["silu"] == "exact"
  assert _rel(ref, got) < 1e-5
  assert kept < fb.memory.saved_residuals(loss, v).saved_bytes


class CappedSelfAttention(nn.Module):
  """Single-head attention with an inline logit soft-cap, written by hand."""

  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.Dense(x.shape[-1], use_bias=False)(x) for _ in range(3))
    logits = jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(x.shape[-1])
    logits = jnp.tanh(logits / 3.0) * 3.0
    return nn.Dense(x.shape[-1])(jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(logits), v))


class CappedLM(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = x + CappedSelfAttention()(x)
    return x


def test_linen_elementwise_soft_capped_attention_keeps_less():
  x = jax.random.normal(jax.random.key(0), (2, 16, 8))
  v = CappedLM().init(jax.random.key(1), x)
  loss = lambda v: (CappedLM().apply(v, x) ** 2).sum()
  ref = jax.grad(loss)(v)
  with fb.linen.convert(warn_unused=False):  # softmax patched, nothing else
    kept_plain = fb.memory.saved_residuals(loss, v).saved_bytes
  with fb.linen.convert(elementwise=True) as done:
    got = jax.grad(loss)(v)
    kept = fb.memory.saved_residuals(loss, v).saved_bytes
  assert done.elementwise == ["/CappedSelfAttention_0", "/CappedSelfAttention_1"]
  assert _rel(ref, got) < 1e-5
  assert kept <= kept_plain - 2 * (2 * 16 * 16 * 4)  # a [2, 16, 16] float32 per layer less
  with pytest.raises(ValueError, match="remat=True"):
    with fb.linen.convert(remat=True, elementwise=True):
      pass


def test_linen_convert_errors():
  with pytest.raises(ValueError, match="exact=True does not use"):
    with fb.linen.convert(sketch="countsketch"):
      pass
  with pytest.raises(TypeError, match="cheap must be"):
    with fb.linen.convert(cheap=3):
      pass
  with pytest.warns(UserWarning, match="converted no layer"):
    with fb.linen.convert():
      pass


# --------------------------------------------------------------------------
# benchmarks/frontier.py's helpers.

def test_frontier_keeps_the_pareto_rows_and_norms_recomputed_keep_least():
  from benchmarks import frontier
  rows = [frontier.Row("jax", n, m, 0.0, flops_ratio=f)
          for n, m, f in [("a", 10, 1.0), ("b", 6, 1.1), ("c", 8, 1.2), ("d", 3, 1.3)]]
  assert [r.name for r in frontier.frontier(rows)] == ["a", "b", "d"]
  kept = {(n, how.split(":")[0]): b for n, how, b in frontier.norm_rows(2, 8, 16)}
  for name in ("nnx.RMSNorm (flax's)", "nnx.LayerNorm (flax's)",
               "gemma-style RMSNorm (hand-written)"):
    assert kept[(name, "recomputed")] < kept[(name, "autodiff")]
  assert kept[("nnx.RMSNorm (flax's)", "recomputed")] <= \
      kept[("nnx.RMSNorm (flax's)", "recognised")]


def test_frontier_attention_rows_soft_cap_recomputed_keeps_less():
  from benchmarks import frontier
  rows = {name: (mib, ratio) for _, name, mib, ratio in frontier.attention_rows("tiny", (50.0,))}
  plain, ew = rows["fb.nnx.convert(exact=True)"], rows["... elementwise=True"]
  assert ew[0] < plain[0] and ew[1] < 1.02 * plain[1]  # a few elementwise flops more
  assert plain[0] < rows["vanilla"][0]


@pytest.mark.slow
def test_frontier_benchmark_runs_at_test_sizes(tmp_path):
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "benchmarks.frontier", "--tiny", "--time",
                        "--repeats", "1", "--figure", str(tmp_path / "f.png"), "--attention"],
                       capture_output=True, text=True, timeout=1800,
                       cwd=__import__("os").path.dirname(__import__("os").path.dirname(
                           __file__)))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "cse_barrier_expander" in out.stdout and (tmp_path / "f.png").exists()
  assert "| decoder, soft-cap 50 | ... elementwise=True |" in out.stdout  # --attention


def test_the_packaged_models_are_users_models():
  # The demo's and benchmarks' models live in fewbit_jax._models: the
  # conversions must find their blocks as in any user's model (a RoBERTa
  # layer taken for a library layer was never rematerialised).
  from flax import linen as nn
  from fewbit_jax._models import roberta
  from fewbit_jax._one_call import is_library_class
  assert not is_library_class(roberta.RobertaLayer)
  assert not is_library_class(roberta.RobertaClassifier)
  assert is_library_class(nn.Dense) and is_library_class(fb.linen.RandomizedDense)
