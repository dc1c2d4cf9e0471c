"""fewbit_jax.memory: the residual report agrees with JAX's, the compiled one with XLA's."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src import ad_checkpoint

import fewbit_jax as fb
from fewbit_jax import memory
from fewbit_jax.activations import CODES_NAME


def _mlp(act):
  def f(w1, w2, x):
    return (act(x @ w1) @ w2).sum()
  return f


W1 = jax.random.normal(jax.random.key(0), (64, 256)) * 0.1
W2 = jax.random.normal(jax.random.key(1), (256, 64)) * 0.1
X = jax.random.normal(jax.random.key(2), (128, 64))


def _jax_multiset(f, *args):
  return collections.Counter((tuple(a.shape), str(a.dtype))
                             for a, _ in ad_checkpoint.saved_residuals(f, *args))


@pytest.mark.parametrize("act", [jax.nn.gelu, jax.nn.silu, lambda x: fb.gelu(x, bits=3),
                                 jnp.tanh])
def test_same_arrays_as_jax(act):
  f = _mlp(act)
  rep = memory.saved_residuals(f, W1, W2, X)
  ours = collections.Counter()
  for r in rep.residuals:
    ours[(r.shape, r.dtype)] += r.count
  assert ours == _jax_multiset(f, W1, W2, X)
  assert rep.total_bytes == sum(r.nbytes for r in rep.residuals)
  assert rep.saved_bytes == rep.total_bytes - rep.input_bytes
  assert [r.nbytes for r in rep.residuals] == sorted((r.nbytes for r in rep.residuals),
                                                     reverse=True)


def test_fewbit_gelu_keeps_codes_not_floats():
  vanilla = memory.saved_residuals(_mlp(lambda x: jax.nn.gelu(x, approximate=False)),
                                   W1, W2, X)
  fewbit = memory.saved_residuals(_mlp(lambda x: fb.gelu(x, approximate=False, bits=3)),
                                  W1, W2, X)
  n = 128 * 256
  # 3 bit planes of 256 / 32 = 8 words per row.
  assert fewbit.named_bytes(CODES_NAME) == 128 * 3 * 8 * 4
  assert fewbit.by_dtype()["uint32"] == 128 * 3 * 8 * 4
  # The exact-erf GELU keeps several f32 arrays of the hidden size; few-bit
  # keeps the hidden activation (for w2's gradient) and the codes.
  assert vanilla.by_dtype()["float32"] >= 3 * n * 4
  assert fewbit.by_dtype()["float32"] == n * 4
  assert fewbit.saved_bytes < vanilla.saved_bytes / 2


def test_sources_through_jit_and_arguments_named():
  f = jax.jit(_mlp(lambda x: fb.gelu(x, bits=2)))
  rep = memory.saved_residuals(f, W1, W2, X)
  kinds = {r.origin for r in rep.residuals}
  assert f"named {CODES_NAME!r}" in kinds
  args = {r.label for r in rep.residuals if r.kind == "argument"}
  assert args and args <= {"w1", "w2", "x"}
  named = [r for r in rep.residuals if r.kind == "named"][0]
  assert "activations.py" in named.source


def test_duplicates_counted_once():
  def f(x):
    s = jnp.sin(x)
    return (s * s).sum()       # the backward of s * s keeps s twice
  rep = memory.saved_residuals(f, jnp.ones((4, 8)))
  jax_list = ad_checkpoint.saved_residuals(f, jnp.ones((4, 8)))
  assert sum(r.count for r in rep.residuals) == len(jax_list)
  assert rep.total_bytes == sum(r.nbytes for r in rep.residuals)
  assert len({(r.label, r.source) for r in rep.residuals}) == len(rep.residuals)


def test_report_dict_and_text():
  rep = memory.saved_residuals(_mlp(jax.nn.gelu), W1, W2, X)
  d = rep.as_dict()
  assert d["saved_bytes"] == rep.saved_bytes
  assert sum(d["by_dtype"].values()) == rep.saved_bytes
  assert sum(d["by_source"].values()) == rep.saved_bytes
  assert len(d["residuals"]) == len(rep.residuals)
  assert set(d["residuals"][0]) >= {"shape", "dtype", "nbytes", "kind", "label", "source"}
  text = str(rep)
  assert memory.format_bytes(rep.saved_bytes) in text
  assert text.count("\n") == len(rep.residuals) + 2


def test_shape_dtype_structs_and_kwargs():
  s = jax.ShapeDtypeStruct((32, 16), jnp.bfloat16)
  rep = memory.saved_residuals(lambda x, *, y: jnp.exp(x * y).sum(), s, y=s)
  assert rep.by_dtype(include_inputs=True) == {"bfloat16": 3 * 32 * 16 * 2}


def test_compiled_matches_xla_and_lower_temp_for_fewbit():
  def step(act):
    return jax.grad(_mlp(act), argnums=(0, 1))
  v = memory.compiled(step(lambda x: jax.nn.gelu(x, approximate=False)), W1, W2, X)
  f = memory.compiled(step(lambda x: fb.gelu(x, approximate=False, bits=3)), W1, W2, X)
  ma = jax.jit(step(jax.nn.gelu)).lower(W1, W2, X).compile().memory_analysis()
  g = memory.compiled(step(jax.nn.gelu), W1, W2, X)
  assert (g.argument, g.output, g.alias, g.temp) == (
      ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
      ma.temp_size_in_bytes)
  assert g.total == g.argument + g.output - g.alias + g.temp
  assert v.argument == f.argument == (64 * 256 * 2 + 128 * 64) * 4
  assert f.temp < v.temp
  d = f.as_dict()
  assert d["total"] == f.total and d["temp"] == f.temp
  assert "temp" in str(f) and memory.format_bytes(f.total) in str(f)


def test_compiled_keeps_jit_options_and_takes_nnx_jit():
  x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
  donated = memory.compiled(jax.jit(lambda x: x * 2, donate_argnums=0), x)
  assert donated.alias == 256 * 256 * 4
  assert donated.total == donated.argument + donated.output - donated.alias + donated.temp

  model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
  m = memory.compiled(nnx.jit(lambda m, x: m(x)), model, jnp.ones((4, 16)))
  assert m.argument == (16 * 8 + 8 + 4 * 16) * 4
  assert m.output >= 4 * 8 * 4   # nnx.jit also returns the module's state


def test_compiled_rejects_non_functions():
  with pytest.raises(TypeError, match="needs a function"):
    memory.compiled(3, jnp.ones(2))


def test_format_bytes():
  assert memory.format_bytes(0) == "0 B"
  assert memory.format_bytes(1023) == "1023 B"
  assert memory.format_bytes(1024) == "1.00 KiB"
  assert memory.format_bytes(150 * 2 ** 20) == "150 MiB"
  assert memory.format_bytes(np.int64(5 * 2 ** 30)) == "5.00 GiB"


def test_typed_keys_count_their_key_data():
  key = jax.random.key(0)
  f = jax.checkpoint(lambda x, k: jnp.sin(x * jax.random.normal(k, x.shape)))
  rep = memory.saved_residuals(lambda x, k: f(x, k).sum(), jnp.ones(4), key)
  keys = [r for r in rep.residuals if r.dtype.startswith("key")]
  assert keys and keys[0].nbytes == jax.random.key_data(key).nbytes


def test_names_survive_a_checkpoint_policy():
  # Under jax.checkpoint(policy=...) (and nnx.remat / nn.remat) the arrays the policy
  # saves are outputs of the checkpoint call: the report looks inside it for their names.
  import fewbit_jax as fb
  x = jnp.ones((8, 64))
  exact = lambda x: jnp.sum(fb.gelu(jnp.sin(x), exact=True) * 2.0)
  codes = lambda x: jnp.sum(fb.gelu(jnp.sin(x)) * 2.0)
  for f, name, nbytes in ((exact, "fewbit_exact_input", 8 * 64 * 4),
                          (codes, "fewbit_codes", 8 * 64 * 3 // 8)):
    plain = memory.saved_residuals(f, x)
    remat = memory.saved_residuals(jax.checkpoint(f, policy=fb.checkpoint_policy()), x)
    assert plain.named_bytes(name) == remat.named_bytes(name) == nbytes
    assert remat.by_source() == {f"named '{name}'": nbytes}, remat.by_source()
  # Nested inside a jit and a remat'ed NNX block alike.
  layer = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  block = nnx.remat(lambda m, x: fb.gelu(m(x), exact=True), policy=fb.checkpoint_policy())
  rep = memory.saved_residuals(
      jax.jit(lambda s, x: jnp.sum(block(nnx.merge(graphdef, s), x) ** 2)), state, x)
  assert rep.named_bytes("fewbit_exact_input") == 8 * 64 * 4, rep.by_source()
  # Unnamed arrays a policy saves keep their op's name.
  dots = jax.checkpoint(lambda x: jnp.sum(jnp.sin(x @ x.T)),
                        policy=jax.checkpoint_policies.dots_saveable)
  assert memory.saved_residuals(dots, x).by_source() == {"op dot_general": 256}
