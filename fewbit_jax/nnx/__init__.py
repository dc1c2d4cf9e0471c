"""Flax NNX layers of fewbit_jax, and converting existing NNX models.

`RandomizedLinear` is a drop-in for ``flax.nnx.Linear``: the same arguments,
the same ``Param``s and the same forward output, but its weight gradient is
estimated from a random sketch of the input (`fewbit_jax.dense`), so the
backward pass keeps ``proj_dim_ratio`` of the input instead of all of it.
`RandomizedLinearGeneral` and `RandomizedEinsum` do the same for
``nnx.LinearGeneral`` and ``nnx.Einsum`` (`fewbit_jax.dense_general`).

A model someone else wrote is converted in place, keeping its ``Param``
objects (so its optimizer state and checkpoints): `map_module` walks it,
`convert_linear` swaps linear layers, `convert_activations` swaps
activation-valued attributes, and `fewbit_jax.patch_activations` covers
activations called inline::

  rngs = nnx.Rngs(sketch=0)
  fb.nnx.map_module(model, lambda m, path: fb.nnx.convert_linear(
      m, fb.nnx.RandomizedLinear, proj_dim_ratio=0.2, rngs=rngs))
  with fb.patch_activations(gelu=3):
    grads = nnx.grad(loss)(model)

Trained with ``nnx.jit`` and ``nnx.value_and_grad``, each layer draws its
sketch keys from its own rng stream. In flax's functional loop (``nnx.split``
inside ``jax.jit``, ``nnx.merge`` inside ``jax.value_and_grad``), where no
stream may advance, the step enters `step_keys` with a fresh key and each
layer derives its own key from it.

`LayerNorm`, `RMSNorm` and `Dropout` are drop-ins for flax's with exact
gradients and a leaner backward (the norm keeps its input and per-row
statistics, dropout flax's mask and no more); `convert_lean` turns flax's into them for
`map_module`, keeping the same Variables.

`convert` does all of it in one call (and rematerialises the repeated
blocks with ``remat=True``)::

  model = fb.nnx.convert(model, exact=True, remat=True)

The layers live in `fewbit_jax.nnx._layers`, the lean ones and
`convert_lean` in `fewbit_jax.nnx._lean`, the conversions in
`fewbit_jax.nnx._convert`, `step_keys` in `fewbit_jax._sketch_stream`;
import them from here.

Example:
  >>> from flax import nnx
  >>> import fewbit_jax as fb
  >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.gelu)
  >>> rngs = nnx.Rngs(sketch=0)
  >>> model = fb.nnx.map_module(model, lambda m, path: fb.nnx.convert_linear(
  ...     m, fb.nnx.RandomizedLinear, proj_dim_ratio=0.2, rngs=rngs))
  >>> type(model.layers[0]).__name__
  'RandomizedLinear'
"""

from fewbit_jax._sketch_stream import step_keys
from fewbit_jax.nnx._convert import convert_activations, convert_linear, map_module
from fewbit_jax.nnx._gated import GatedMLP
from fewbit_jax.nnx._layers import RandomizedEinsum, RandomizedLinear, RandomizedLinearGeneral
from fewbit_jax.nnx._lean import Dropout, LayerNorm, RMSNorm, convert_lean
from fewbit_jax.nnx._one_call import conversion, convert

__all__ = ["RandomizedLinear", "RandomizedLinearGeneral", "RandomizedEinsum", "map_module",
           "convert_linear", "convert_activations", "step_keys", "LayerNorm", "RMSNorm",
           "Dropout", "convert_lean", "GatedMLP", "convert", "conversion"]
