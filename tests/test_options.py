"""The one sketch-options record of the flax layers and converters (fewbit_jax._options)."""

import dataclasses
import inspect

import flax.linen as nn
import pytest
from flax import nnx

import fewbit_jax as fb
from fewbit_jax._options import SketchOptions, check_no_dot_general
from fewbit_jax._projection import check_blocks_arg
from fewbit_jax.dense import projection_dim
from fewbit_jax.sketch import check_kind

NAMES = [f.name for f in dataclasses.fields(SketchOptions)]
DEFAULTS = {f.name: f.default for f in dataclasses.fields(SketchOptions)}

# Every entry point that takes the sketch options, as a function of them.
ENTRIES = {
    "RandomizedDense": lambda **o: fb.RandomizedDense(4, **o),
    "RandomizedLinear": lambda **o: fb.nnx.RandomizedLinear(3, 4, rngs=nnx.Rngs(0), **o),
    "RandomizedLinearGeneral": lambda **o: fb.nnx.RandomizedLinearGeneral(
        3, (2, 2), rngs=nnx.Rngs(0), **o),
    "RandomizedEinsum": lambda **o: fb.nnx.RandomizedEinsum("bd,dh->bh", (3, 4),
                                                            rngs=nnx.Rngs(0), **o),
    "convert_linear": lambda **o: fb.nnx.convert_linear(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), **o),
    "intercept": lambda **o: fb.linen.intercept(**o).__enter__(),
}

BAD = [
    dict(sketch="fft"),
    dict(proj_dim_ratio=2.0),
    dict(proj_dim_ratio=None),
    dict(proj_dim=0),
    dict(proj_dim_min=5, proj_dim_max=2),
    dict(sketch_blocks=0),
    dict(sketch_blocks=2.5),
    dict(sketch_blocks=("data", 1)),
]


def _validators_error(options: dict) -> str:
  """The message the array functions' own validators give for `options`."""
  o = dict(DEFAULTS, **options)
  with pytest.raises(ValueError) as e:
    check_kind(o["sketch"])
    projection_dim(1, proj_dim_ratio=o["proj_dim_ratio"], proj_dim=o["proj_dim"],
                   proj_dim_min=o["proj_dim_min"], proj_dim_max=o["proj_dim_max"])
    check_blocks_arg(o["sketch_blocks"])
  return str(e.value)


def _defaults(f) -> dict:
  params = inspect.signature(f).parameters
  return {n: params[n].default for n in NAMES}


def test_defaults_are_the_layers_and_converters_defaults():
  fields = {f.name: f.default for f in dataclasses.fields(fb.RandomizedDense)}
  assert {n: fields[n] for n in NAMES} == DEFAULTS
  for f in (fb.nnx.RandomizedLinear.__init__, fb.nnx.RandomizedLinearGeneral.__init__,
            fb.nnx.RandomizedEinsum.__init__, fb.linen.intercept):
    assert _defaults(f) == DEFAULTS, f


@pytest.mark.parametrize("options", BAD, ids=repr)
def test_bad_options_raise_the_validators_error(options):
  want = _validators_error(options)
  with pytest.raises(ValueError) as e:
    SketchOptions(**options)
  assert str(e.value) == want


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("options", BAD, ids=repr)
def test_every_entry_point_checks_at_construction(entry, options):
  with pytest.raises(ValueError) as e:
    ENTRIES[entry](**options)
  assert str(e.value) == _validators_error(options)


def test_kwargs_give_proj_dim_precedence():
  assert SketchOptions().kwargs() == dict(DEFAULTS)
  kw = SketchOptions(proj_dim_ratio=0.5, proj_dim=3, sketch="dct", sketch_blocks="data").kwargs()
  assert kw == dict(DEFAULTS, proj_dim_ratio=None, proj_dim=3, sketch="dct", sketch_blocks="data")
  assert list(kw) == NAMES


def test_of_and_among_read_layers_and_keyword_arguments():
  layer = fb.nnx.RandomizedLinear(3, 4, proj_dim=2, sketch="countsketch", sketch_blocks=2,
                                  rngs=nnx.Rngs(0))
  assert SketchOptions.of(layer) == SketchOptions(proj_dim=2, sketch="countsketch",
                                                  sketch_blocks=2)
  assert SketchOptions.of(fb.RandomizedDense(4, proj_dim_min=3)) == SketchOptions(proj_dim_min=3)
  assert SketchOptions.among(dict(use_bias=False, sketch="dft")) == SketchOptions(sketch="dft")
  with pytest.raises(ValueError, match="unknown sketch"):
    SketchOptions.among(dict(sketch="fft", dtype=None))


def test_record_is_frozen():
  options = SketchOptions()
  with pytest.raises(dataclasses.FrozenInstanceError):
    options.sketch = "dct"


def test_check_no_dot_general():
  check_no_dot_general("RandomizedDense", None)
  with pytest.raises(ValueError, match="RandomizedDense does not take a custom dot_general.*"
                     r"\(nn.Dense / nnx.Linear\)"):
    check_no_dot_general("RandomizedDense", nn.Dense)
