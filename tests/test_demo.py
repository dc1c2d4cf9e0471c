"""The main job (`fewbit-jax bench`): it runs, its savings point the right way, and the
README's table is the one it prints."""

import os
import re

import pytest

from fewbit_jax import demo, ext
from fewbit_jax._ffi import _path

_README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_HEADER = "| variant | compiled memory (GiB) | saving | temp (GiB) |"


@pytest.fixture(scope="module")
def rows():
  # The default configuration, as `fewbit-jax bench` runs it (one timed step,
  # not five: the times are only checked to be there).
  cfg = demo.Config()
  return cfg, demo.run(cfg, time_steps=1, log=lambda s: None)


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


def _readme_table() -> list[str]:
  with open(_README, encoding="utf-8") as f:
    lines = f.read().splitlines()
  start = lines.index(_HEADER)
  table = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    table.append(line)
  return table


def test_readme_table_is_what_the_main_job_prints(rows):
  # Memory is exact and deterministic on the CPU; the README's figures are
  # the default run's, each op on its measured default path.
  defaults = {op: _path.MEASURED["cpu"][op] for op in ext.OPS}
  paths = {op: ext.active_path("cpu", op) for op in ext.OPS}
  if paths != defaults:
    pytest.skip(f"the README's figures are for the default kernel paths {defaults}; "
                f"here {paths} (FEWBIT_JAX_FFI, or no compiled kernels)")
  cfg, rs = rows
  printed = demo.format_table(cfg, [(n, {k: r[k] for k in ("total", "temp")}) for n, r in rs])
  want = [line for line in printed.splitlines() if line.startswith("| ")][1:]
  assert _readme_table() == want, (
      "README.md's main-job table differs from what `fewbit-jax bench` prints; "
      "paste these rows:\n" + "\n".join(want))


def test_readme_states_the_default_configuration():
  with open(_README, encoding="utf-8") as f:
    text = f.read()
  c = demo.Config()
  m = re.search(r"`fewbit-jax bench` \((\d+) layers, hidden (\d+), FFN (\d+), exact GELU, "
                r"batch (\d+) x\s+(\d+)", text)
  assert m, "README.md no longer describes the main job's configuration"
  assert tuple(map(int, m.groups())) == (c.layers, c.hidden, c.ffn, c.batch, c.seq)


def test_randomized_layers_sketch_per_sequence():
  rd = demo.variants(blocks=8)["randomized dense 0.2"]["dense"]
  assert rd.keywords["sketch_blocks"] == 8 and rd.keywords["proj_dim_ratio"] == 0.2
