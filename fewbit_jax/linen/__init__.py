"""Flax linen layers of fewbit_jax, and converting existing linen models.

`RandomizedDense` is a drop-in for ``flax.linen.Dense``: the same fields, the
same parameter tree and the same forward output, but its weight gradient is
estimated from a random sketch of the input (`fewbit_jax.dense`), so the
backward pass keeps ``proj_dim_ratio`` of the input instead of all of it.

Linen models are immutable and build their layers in ``@compact`` bodies,
so existing ones are converted without editing them by interception:
inside `intercept` their ``nn.Dense`` (and ``nn.DenseGeneral``) calls run
randomized with the same parameters; `swap_activations` clones a model with
its activation-valued fields few-bit; `fewbit_jax.patch_activations` covers
activations called inline::

  with fb.linen.intercept(proj_dim_ratio=0.2), fb.patch_activations(gelu=3):
    grads = jax.grad(loss)(params, batch, key)   # loss applies with rngs={'sketch': key}

`LayerNorm`, `RMSNorm` and `Dropout` are drop-ins for flax's with exact
gradients and a leaner backward (the norm keeps its input and per-row
statistics, dropout flax's mask and no more); `lean` runs an existing model's flax norms and
dropout as these, as `intercept` does for dense layers.

`convert` does all of it as one context (and rematerialises the repeated
blocks with ``remat=True``)::

  with fb.linen.convert(exact=True, remat=True):
    grads = jax.grad(loss)(params, batch)

The layer lives in `fewbit_jax.linen._layers`, the lean ones and `lean` in
`fewbit_jax.linen._lean`, the conversions in `fewbit_jax.linen._convert`;
import them from here.

Example:
  >>> import fewbit_jax as fb
  >>> fb.linen.RandomizedDense is fb.RandomizedDense
  True
"""

from fewbit_jax.linen._convert import Interception, intercept, swap_activations
from fewbit_jax.linen._gated import GatedMLP
from fewbit_jax.linen._layers import RandomizedDense
from fewbit_jax.linen._lean import Dropout, LayerNorm, RMSNorm, lean
from fewbit_jax.linen._one_call import convert

__all__ = ["RandomizedDense", "intercept", "Interception", "swap_activations", "LayerNorm",
           "RMSNorm", "Dropout", "lean", "GatedMLP", "convert"]
