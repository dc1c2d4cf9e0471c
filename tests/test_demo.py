"""The main job (`fewbit-jax bench`): it runs, and its savings point the right way."""

import dataclasses

import pytest

from fewbit_jax import demo


@pytest.fixture(scope="module")
def rows():
  cfg = dataclasses.replace(demo.Config(), layers=1, hidden=64, heads=2, ffn=256, seq=32,
                            batch=8)
  return cfg, demo.run(cfg, time_steps=2, log=lambda s: None)


def test_every_variant_saves_and_both_saves_most(rows):
  _, rows = rows
  total = {name: r["total"] for name, r in rows}
  names = list(total)
  assert names == ["vanilla", "3-bit GELU", "randomized dense 0.2", "both", "lean (exact)",
                   "both + lean"]
  assert total["both"] < min(total["3-bit GELU"], total["randomized dense 0.2"])
  assert max(total["3-bit GELU"], total["randomized dense 0.2"]) < total["vanilla"]
  # Lean exact residuals save on their own and on top of both approximations.
  assert total["lean (exact)"] < total["vanilla"] and total["both + lean"] < total["both"]
  for _, r in rows:
    assert r["time"] > 0 and r["temp"] <= r["total"]


def test_table(rows):
  cfg, rs = rows
  table = demo.format_table(cfg, rs)
  assert "| vanilla | " in table and "| both | " in table and "step time vs vanilla" in table
  assert table.count("\n| ") == 7  # header and six variants


def test_randomized_layers_sketch_per_sequence():
  rd = demo.variants(blocks=8)["randomized dense 0.2"]["dense"]
  assert rd.keywords["sketch_blocks"] == 8 and rd.keywords["proj_dim_ratio"] == 0.2
