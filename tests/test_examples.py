"""Smoke runs of the examples and benchmarks, and (slow) their README claims.

The fast tests use tiny sizes and a few steps each; they check that every
script runs end to end and that what it measures points the right way
(losses fall, few-bit memory is below vanilla). The slow ones rerun the
documented configurations and check the numbers the README reports.

The benchmark modules imported here (memory_table, residuals) are the subject
of their tests: their functions (a row's compiled memory, the table, the
figure, the residual report) are what is checked, faster in this process
than through their command lines. The model they measure is imported from
where it is defined, `fewbit_jax._models.roberta`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import memory_table, residuals
from fewbit_jax._models import roberta
from examples import char_gpt, mlp_digits, plot_activations

ROWS = {r.name: r for r in memory_table.ROWS}


@functools.cache
def _compiled_memory(name: str, cfg: roberta.RobertaConfig, batch: int, seq: int) -> dict:
  """`memory_table.compiled_memory` of a table row: exact and deterministic, so
  the tests that measure the same row at the same sizes compile it once."""
  return memory_table.compiled_memory(ROWS[name], cfg, batch=batch, seq=seq)


# --------------------------------------------------------------------------
# benchmarks/


def test_memory_table_both_below_vanilla():
  # The sizes of the lean rows' test below, which measures these rows too.
  cfg = dataclasses.replace(roberta.RobertaConfig.tiny(), num_layers=2)
  names = ["vanilla", "3-bit GELU + randomized 20%"]
  results = [dict(name=n, original=ROWS[n].original, **_compiled_memory(n, cfg, 4, 32))
             for n in names]
  vanilla, both = (r["total"] for r in results)
  assert both < vanilla
  for r in results:
    assert r["total"] == r["argument"] + r["output"] - r["alias"] + r["temp"]
    assert r["alias"] > 0  # parameters and optimizer state are donated
  table = memory_table.format_table(results, with_time=False, with_real=False)
  assert "| 3-bit GELU + randomized 20% |" in table and "32.7% (3.70 GiB)" in table


def test_memory_table_lean_rows_save_with_vanillas_gradient():
  # The lean row is vanilla's math (the same params, dropout keys and exact
  # gradients) with less kept; on top of the approximations it saves more.
  cfg = dataclasses.replace(roberta.RobertaConfig.tiny(), num_layers=2)
  mem = {n: _compiled_memory(n, cfg, 4, 32)["total"]
         for n in ("vanilla", "lean", "3-bit GELU + randomized 20%",
                   "3-bit GELU + randomized 20% + lean")}
  assert mem["lean"] < mem["vanilla"]
  assert mem["3-bit GELU + randomized 20% + lean"] < mem["3-bit GELU + randomized 20%"]
  batch = roberta.make_batch(cfg, 4, 32, jax.random.key(3))
  key = jax.random.key(4)
  grads = []
  for n in ("vanilla", "lean"):
    model = roberta.RobertaClassifier(cfg, **ROWS[n].model())
    params = model.init({"params": jax.random.key(0)}, batch["input_ids"],
                        batch["attention_mask"])["params"]

    def loss(params, model=model):
      logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           deterministic=False, rngs={"dropout": key})
      return jnp.mean(logits ** 2)
    grads.append(jax.jit(jax.value_and_grad(loss))(params))
  (l0, g0), (l1, g1) = grads
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6 * float(jnp.max(jnp.abs(a))) + 1e-9)


def test_memory_table_figure(tmp_path):
  results = [dict(name="vanilla", total=2 * memory_table.GiB),
             dict(name="lean", total=1.5 * memory_table.GiB)]
  memory_table.plot(results, str(tmp_path / "m.png"))
  assert (tmp_path / "m.png").stat().st_size > 1000


def test_memory_table_keeps_remat_on_cpu():
  # Without the compile options XLA's CPU pipeline undoes jax.checkpoint.
  cfg = dataclasses.replace(roberta.RobertaConfig.tiny(), num_layers=2)
  plain = _compiled_memory("vanilla", cfg, 4, 32)
  remat = memory_table.compiled_memory(ROWS["jax.checkpoint(each layer)"], cfg, batch=4,
                                       seq=32)
  assert remat["temp"] < 0.9 * plain["temp"]


def test_lean_parts_compiled_saving():
  # What XLA's compiled step holds, not only the jaxpr residuals: left alone,
  # XLA merges the lean backward's mask draws and recomputations with the
  # forward's and keeps their results (random bits, dropout multipliers, a
  # broadcast scale) from the forward to the backward. Measured: per norm 1.85
  # input-sized arrays fewer (0.66 before), per attention 2.5 score-sized
  # arrays (1.5 before). fb.Dropout keeps flax's boolean mask (drawing it again
  # in the backward raised the peak of programs whose peak is in the
  # backward), so it keeps exactly what flax's does.
  import fewbit_jax as fb
  cfg = roberta.RobertaConfig.tiny(hidden_size=64, intermediate_size=128, num_layers=2,
                                   max_position_embeddings=130)
  batch, seq = 8, 128
  temp = lambda parts: memory_table.compiled_memory(
      memory_table.Row("x", "x", lambda: parts), cfg, batch, seq)["temp"]
  vanilla = temp({})
  hidden = batch * seq * cfg.hidden_size * 4
  scores = batch * cfg.num_heads * seq * seq * 4
  norms = 2 * cfg.num_layers + 1  # two per layer, one after the embeddings
  assert vanilla - temp(dict(layer_norm=fb.LayerNorm)) > 1.5 * norms * hidden
  assert temp(dict(dropout=fb.Dropout)) <= vanilla
  assert (vanilla - temp(dict(attention=memory_table.lean_attention))
          > 2.0 * cfg.num_layers * scores)


def test_step_times_run():
  cfg = dataclasses.replace(roberta.RobertaConfig.tiny(), num_layers=1)
  times = memory_table.step_times([ROWS["vanilla"], ROWS["3-bit GELU"]], cfg, batch=2, seq=8,
                                  repeats=2, optimize=False)
  assert times["vanilla"]["ratio"] == 1.0 and times["vanilla"]["seconds"] > 0
  assert times["3-bit GELU"]["ratio"] > 0


@pytest.mark.slow
def test_real_peak_runs():
  cfg = dataclasses.replace(roberta.RobertaConfig.tiny(), num_layers=1)
  peak = memory_table.real_peak(ROWS["vanilla"], cfg, batch=2, seq=8)
  if jax.devices()[0].platform == "cpu":
    assert peak is None  # CPU devices keep no memory statistics
  else:
    assert peak > 0


def test_select_rows():
  rows = memory_table.select_rows("bits", full=False)
  assert rows[0].name == "vanilla"
  assert [r.name for r in rows[1:]] == ["1-bit GELU", "2-bit GELU", "4-bit GELU"]
  assert len(memory_table.select_rows(None, full=True)) == len(memory_table.ROWS)
  with pytest.raises(SystemExit, match="unknown rows"):
    memory_table.select_rows("no such row", full=False)


def test_residual_report_names_who_keeps_what():
  cfg = dataclasses.replace(roberta.RobertaConfig.tiny(), num_layers=1)
  b, s = 4, 32
  ffn = (b, s, cfg.intermediate_size)

  def ffn_arrays(res, module):
    return [r for r in res.residuals if r.scope == module and r.shape == ffn and r.keepers]

  vanilla = residuals.step_residuals(ROWS["vanilla"], cfg, b, s)
  fewbit = residuals.step_residuals(ROWS["3-bit GELU"], cfg, b, s)
  rand = residuals.step_residuals(ROWS["randomized dense 20%"], cfg, b, s)
  # Exact GELU keeps several full-size float arrays; the few-bit one keeps
  # packed codes instead (its output is still kept for the next dense).
  assert len(ffn_arrays(vanilla, "layer_0/activation")) >= 3
  assert len(ffn_arrays(fewbit, "layer_0/activation")) <= 1
  codes = [r for r in fewbit.residuals if r.dtype == "uint32" and r.scope.startswith("layer_0")]
  assert codes and all(r.keepers == ("layer_0/activation",) for r in codes)
  # The randomized output dense keeps a sketch, not the GELU output.
  kept_for_output = [r for r in rand.residuals
                     if any(k.startswith("layer_0/output") for k in r.keepers)
                     and r.shape == ffn]
  assert not kept_for_output
  t = residuals.totals
  assert t(fewbit)["layer_0"] < t(vanilla)["layer_0"]
  assert t(rand)["layer_0"] < t(vanilla)["layer_0"]
  report = residuals.format_report(vanilla, 0.0, "layer_0")
  assert "activation" in report and "output_norm" in report
  # Remat of each layer keeps its inputs, the dropout key among them.
  remat = residuals.step_residuals(ROWS["jax.checkpoint(each layer)"], cfg, b, s)
  assert t(remat).get("layer_0", 0) < t(vanilla)["layer_0"] / 4
  assert any(r.dtype.startswith("key") and r.nbytes == 8 for r in remat.residuals)


# --------------------------------------------------------------------------
# examples/


def test_mlp_digits_smoke():
  res = mlp_digits.run(["vanilla", "both"], seeds=1, epochs=3, hidden=64, lr=1e-2,
                       progress=False)
  for v, (r,) in res.items():
    assert np.mean(r["losses"][-5:]) < 0.5 * r["losses"][0], v
    assert r["final_accuracy"] > 0.8, v
  assert res["both"][0]["memory"] < res["vanilla"][0]["memory"]
  assert "| both |" in mlp_digits.format_results(res)


def test_char_gpt_smoke(tmp_path):
  # "both": few-bit GELU in NNX RandomizedLinear layers, the longest path.
  path = str(tmp_path / "gpt.png")
  res = char_gpt.run(["both"], steps=12, batch=4, context=32, dim=32, heads=2, layers=1,
                     eval_batches=1, eval_every=6, text_chars=30000, plot=path,
                     progress=False)
  r = res["both"]
  assert np.mean(r["losses"][-3:]) < r["losses"][0] - 0.5
  assert r["val"][-1] < r["val"][0]
  assert r["memory"] > 0
  assert 0 < os.path.getsize(path) < 200_000
  assert "validation loss" in char_gpt.format_results(res)


def test_char_gpt_finetunes_from_vanilla():
  # Every variant starts from the parameters of the vanilla pre-training run.
  kw = dict(batch=4, context=32, dim=32, heads=2, layers=1, eval_batches=1, eval_every=3,
            text_chars=30000, progress=False)
  pre = char_gpt.run(["vanilla"], steps=6, **kw)["vanilla"]
  res = char_gpt.run(["vanilla", "both"], steps=3, finetune_from=6, **kw)
  assert res["vanilla"]["losses"][0] < pre["losses"][0] - 0.5  # not from scratch
  assert abs(res["both"]["losses"][0] - res["vanilla"]["losses"][0]) < 1e-3  # same start
  assert res["both"]["val"][-1] < pre["val"][0]


def test_plot_activations(tmp_path):
  x = np.linspace(-4, 4, 801)
  c = plot_activations.curves("gelu", [1, 2, 3, 4], x)
  errors = [np.mean(np.abs(c[b] - c["derivative"])) for b in (1, 2, 3, 4)]
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert len(np.unique(c[3])) <= 8
  path = plot_activations.plot(str(tmp_path / "act.png"), (1, 3), ["gelu", "tanh"])
  assert 0 < os.path.getsize(path) < 200_000


# --------------------------------------------------------------------------
# The README's numbers (slow: minutes each).


@pytest.mark.slow
def test_roberta_base_savings_beat_the_original():
  cfg = roberta.RobertaConfig.base()
  mem = {n: memory_table.compiled_memory(ROWS[n], cfg, 128, 128)["total"]
         for n in ["vanilla", "3-bit GELU", "3-bit GELU + randomized 20%"]}
  saving = {n: 100 * (1 - m / mem["vanilla"]) for n, m in mem.items()}
  assert saving["3-bit GELU"] >= 13.8
  assert saving["3-bit GELU + randomized 20%"] >= 32.7


@pytest.mark.slow
def test_mlp_digits_accuracy():
  res = mlp_digits.run(seeds=3, progress=False)
  acc = {v: 100 * np.mean([r["final_accuracy"] for r in rs]) for v, rs in res.items()}
  assert abs(acc["3-bit GELU"] - acc["vanilla"]) <= 1.0
  assert acc["randomized 20%"] >= acc["vanilla"] - 3.0
  assert acc["both"] >= acc["vanilla"] - 3.0


@pytest.mark.slow
def test_char_gpt_validation_loss():
  res = char_gpt.run(progress=False)
  base = res["vanilla"]["final_val"]
  assert res["3-bit GELU"]["final_val"] <= 1.01 * base
  assert res["randomized"]["final_val"] <= 1.25 * base  # see the README: from scratch
  assert res["both"]["final_val"] <= 1.25 * base
  assert res["3-bit GELU"]["memory"] < res["vanilla"]["memory"]
  assert res["both"]["memory"] < res["vanilla"]["memory"]


@pytest.mark.slow
def test_char_gpt_finetuned_randomized_within_a_few_percent():
  res = char_gpt.run(steps=200, finetune_from=500, lr=5e-4, progress=False)
  base = res["vanilla"]["final_val"]
  assert res["3-bit GELU"]["final_val"] <= 1.01 * base
  assert res["randomized"]["final_val"] <= 1.05 * base
  assert res["both"]["final_val"] <= 1.05 * base
