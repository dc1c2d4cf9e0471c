"""Every example in the public docstrings runs and prints what it says."""

import doctest
import importlib

import pytest

MODULES = ["fewbit_jax", "fewbit_jax.codes", "fewbit_jax._rng", "fewbit_jax.tables",
           "fewbit_jax.sketch", "fewbit_jax.dense", "fewbit_jax.dense_general",
           "fewbit_jax.linen", "fewbit_jax.linen._layers", "fewbit_jax.linen._convert",
           "fewbit_jax.nnx", "fewbit_jax.nnx._layers", "fewbit_jax.nnx._convert",
           "fewbit_jax._options", "fewbit_jax._sketch_stream", "fewbit_jax.patch",
           "fewbit_jax.remat", "fewbit_jax.attention", "fewbit_jax.norms", "fewbit_jax._dropout",
           "fewbit_jax.linen._lean", "fewbit_jax.nnx._lean",
           "fewbit_jax.activations", "fewbit_jax.ext", "fewbit_jax.memory",
           "fewbit_jax._sharded", "fewbit_jax.losses", "fewbit_jax.gated",
           "fewbit_jax.linen._gated", "fewbit_jax.nnx._gated",
           "fewbit_jax._one_call", "fewbit_jax.nnx._one_call", "fewbit_jax.linen._one_call"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  mod = importlib.import_module(name)
  result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                           verbose=False)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_has_an_example(name):
  import inspect
  mod = importlib.import_module(name)
  public = getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")])
  missing = []
  for n in public:
    obj = getattr(mod, n)
    if inspect.ismodule(obj) or isinstance(obj, (str, int, float, tuple, dict, frozenset)):
      continue  # constants are documented in their module's docstring
    if ">>>" not in (inspect.getdoc(obj) or ""):
      missing.append(n)
  assert not missing, f"{name}: no docstring example for {missing}"
