"""Optimal tables: the DP is optimal, the shipped tables are what it computes."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fewbit_jax as fb
from fewbit_jax import tables as T


def test_shipped_tables_cover_everything():
  with open(T.TABLES_PATH) as f:
    data = json.load(f)
  assert len(data) == 14  # 13 continuous activations, gelu in both forms
  for key, by_bits in data.items():
    assert sorted(by_bits, key=int) == [str(b) for b in range(1, 9)], key
    for b, t in by_bits.items():
      assert len(t["levels"]) == 2 ** int(b) and len(t["borders"]) == 2 ** int(b) - 1
      assert np.all(np.diff(t["borders"]) >= 0)


@pytest.mark.xla_optimized  # float64 tables to 1e-9: the erf of the full level
@pytest.mark.parametrize("name,params", [("gelu", {"approximate": False}), ("sigmoid", {}),
                                         ("silu", {})])
def test_shipped_tables_recompute(name, params):
  fresh = T.optimal_tables(T.builtin_derivative(name, **params), [1, 2, 3],
                           name=name)
  for bits, t in fresh.items():
    shipped = fb.table(name, bits, **params)
    np.testing.assert_allclose(t.borders, shipped.borders, rtol=0, atol=1e-12)
    np.testing.assert_allclose(t.levels, shipped.levels, rtol=1e-9, atol=1e-12)


def test_dp_is_globally_optimal_against_brute_force():
  # A small grid where every placement of 3 borders can be enumerated.
  deriv = jax.vmap(jax.grad(lambda x: jax.nn.gelu(x, approximate=False)))
  cells = 40
  t = T.optimal_table(deriv, 2, cells=cells, lim=4.0)
  edges = np.linspace(-4.0, 4.0, cells + 1)
  centres = 0.5 * (edges[1:] + edges[:-1])
  w = T.default_weight(centres)
  w = w / w.sum()
  d = np.asarray(deriv(jnp.asarray(centres, jnp.float32)), np.float64)

  def sse(cuts):
    total = 0.0
    for s, e in zip((0,) + cuts, cuts + (cells,)):
      m = np.sum(w[s:e] * d[s:e]) / np.sum(w[s:e])
      total += np.sum(w[s:e] * (d[s:e] - m) ** 2)
    return total

  best = min(sse(c) for c in itertools.combinations(range(1, cells), 3))
  assert t.error == pytest.approx(best, rel=1e-9)


def test_one_bit_sigmoid_beats_local_search():
  deriv = jax.vmap(jax.grad(jax.nn.sigmoid))
  err = T.relative_error(fb.table("sigmoid", 1), deriv, 1.0)
  assert err < 0.25  # the original library's 1-bit sigmoid table: 0.96


def test_custom_weight_moves_borders_out():
  deriv = T.builtin_derivative("tanh")
  narrow = T.optimal_table(deriv, 2, weight=T.normal_weight(0.5))
  wide = T.optimal_table(deriv, 2, weight=T.normal_weight(3.0))
  assert np.max(np.abs(narrow.borders)) < np.max(np.abs(wide.borders))


def test_table_validation():
  with pytest.raises(ValueError, match="levels"):
    fb.Table(borders=np.zeros(2), levels=np.zeros(3), bits=2)
  with pytest.raises(ValueError, match="ascending"):
    fb.Table(borders=np.array([1.0, 0.0, 2.0]), levels=np.zeros(4), bits=2)
  with pytest.raises(ValueError, match="2 \\*\\* bits|2\\*\\*bits|needs 4"):
    fb.Table(borders=np.zeros(1), levels=np.zeros(2), bits=2)
  with pytest.raises(ValueError, match="weight"):
    T.optimal_table(T.builtin_derivative("tanh"), 1, weight=lambda x: -np.ones_like(x))
  with pytest.raises(ValueError, match="1..8"):
    T.optimal_table(T.builtin_derivative("tanh"), 9)


def test_error_table_cli(capsys):
  from fewbit_jax.__main__ import main
  assert main(["errors", "--max-bits", "2"]) == 0
  out = capsys.readouterr().out
  assert "gelu(approximate=True)" in out and "N(0,4)" in out
  assert out.count("\n| ") >= 28
