"""The activation registry: one record per activation, everything else derived from it."""

import doctest
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fewbit_jax as fb
from fewbit_jax import _registry as R
from fewbit_jax import activations as A
from fewbit_jax import patch as P
from fewbit_jax import tables as T

RECORDS = list(R.ACTIVATIONS.values())
NAMES = [r.name for r in RECORDS]


def test_records_are_unique_and_complete():
  assert len(NAMES) == len(set(NAMES)) == 21
  assert {r.kind for r in RECORDS} == {R.KIND_PIECEWISE, R.KIND_CONTINUOUS}
  assert not set(R.ALIASES) & set(NAMES)
  for r in RECORDS:
    assert (r.predicate is not None) == (r.kind == R.KIND_PIECEWISE), r.name
    assert r.formula and r.reference, r.name
    if r.jax_name:
      assert r.reference == f"jax.nn.{r.jax_name}"
    with pytest.raises(AttributeError):
      r.name = "other"  # frozen


@pytest.mark.parametrize("rec", RECORDS, ids=NAMES)
def test_public_function_is_generated_from_the_record(rec):
  f = getattr(A, rec.name)
  assert getattr(fb, rec.name) is f
  assert (f.__name__, f.__qualname__, f.__module__) == (rec.name, rec.name,
                                                        "fewbit_jax.activations")
  sig = inspect.signature(f)
  params = list(sig.parameters.values())
  assert params[0].name == "x" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
  after_x = [p for p in params[1:] if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
  assert [(p.name, p.default, p.annotation) for p in after_x] == [
      (p.name, p.default, p.annotation) for p in rec.params]
  keyword = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
  assert keyword == (["bits", "exact"] if rec.kind == R.KIND_PIECEWISE
                     else ["bits", "borders", "levels", "exact"])
  assert sig.parameters["bits"].annotation == "int | None"
  assert f"``{rec.formula}``" in f.__doc__ and f"``{rec.reference}``" in f.__doc__
  assert ">>>" in f.__doc__
  assert inspect.getsource(f).startswith(f"def {rec.name}(x=_NO_X")
  table = A.PIECEWISE if rec.kind == R.KIND_PIECEWISE else A.CONTINUOUS
  assert table[rec.name] is f
  for alias in rec.aliases:
    assert getattr(A, alias) is f and getattr(fb, alias) is f and A.ALIASES[alias] == rec.name


def test_doctest_finds_the_generated_examples():
  tests = {t.name: t for t in doctest.DocTestFinder().find(A)}
  for name in NAMES:
    assert tests[f"fewbit_jax.activations.{name}"].examples, name


def test_argument_errors_are_pythons_own():
  x = jnp.ones(3)
  with pytest.raises(TypeError, match=r"gelu\(\) got an unexpected keyword argument 'alpha'"):
    fb.gelu(x, alpha=1.0)
  with pytest.raises(TypeError, match=r"relu\(\) takes from 0 to 1 positional"):
    fb.relu(x, 1)
  with pytest.raises(TypeError, match="unexpected keyword argument 'borders'"):
    fb.relu(x, borders=[0.0], levels=[0.0, 1.0])


def test_tables_derive_from_the_registry():
  continuous = R.of_kind(R.KIND_CONTINUOUS)
  assert list(T.FORWARDS) == [r.name for r in continuous]
  for r in continuous:
    fn, defaults = T.FORWARDS[r.name]
    assert fn is r.forward and defaults == r.defaults
    assert T.BUILTIN_PARAMS[r.name][0] == r.defaults
    for alias in r.aliases:
      assert T.table(alias, 2) is T.table(r.name, 2)
  assert T.BUILTIN_PARAMS["gelu"] == [{"approximate": True}, {"approximate": False}]
  with pytest.raises(ValueError, match="no table for 'hardtanh'"):
    T.table("hardtanh", 2)  # a piecewise alias: no table, named as given


def test_patchable_names_derive_from_the_registry():
  assert P.PATCHABLE == tuple(r.name for r in RECORDS if r.jax_name)
  assert set(NAMES) - set(P.PATCHABLE) == {"threshold", "hard_shrink", "soft_shrink",
                                           "tanhshrink"}
  for r in RECORDS:
    if r.jax_name:
      assert P.original(r.name) is getattr(jax.nn, r.jax_name)
      for alias in r.aliases:
        assert P.original(alias) is P.original(r.name)


def test_forwards_are_jax_functions_even_while_patched():
  assert R.ACTIVATIONS["gelu"].forward is P.original("gelu")
  x = jnp.linspace(-3.0, 3.0, 16)
  with P.patch_activations(gelu=2, leaky_relu=1, warn_unused=False) as p:
    y = fb.gelu(x) * fb.leaky_relu(x, 0.1)  # direct calls: not through the patched names
    assert p.calls() == {"gelu": 0, "leaky_relu": 0}
  np.testing.assert_array_equal(y, jax.nn.gelu(x) * jax.nn.leaky_relu(x, 0.1))


def test_parse_checks_in_order():
  thr = R.ACTIVATIONS["threshold"]
  with pytest.raises(TypeError, match="threshold= and value="):
    thr.parse({"threshold": "not a float", "value": None})  # missing is reported first
  ht = R.ACTIVATIONS["hard_tanh"]
  assert ht.parse({"min_val": -2, "max_val": 3}) == {"min_val": -2.0, "max_val": 3.0}
  with pytest.raises(ValueError, match="min_val < max_val"):
    ht.parse({"min_val": 1, "max_val": 1})
  lr = R.ACTIVATIONS["leaky_relu"]
  # The level is the float slope, rounded to the cotangent's dtype when applied (float64: 0.3).
  assert lr.levels_for(lr.parse({"negative_slope": 0.3})) == (0.3, 1.0)
  assert R.ACTIVATIONS["relu"].levels_for({}) == (0.0, 1.0)
