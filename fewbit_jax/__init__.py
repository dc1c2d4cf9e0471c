"""fewbit-jax: memory-efficient training for JAX and Flax.

Few-bit activations (drop-in for ``jax.nn`` functions, saving only b-bit codes
for backward) and randomized dense layers (saving only a random sketch of the
input), with tools to convert existing models and to see the saving.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import fewbit_jax as fb
  >>> x = jnp.ones((4, 8))
  >>> fb.gelu(x).shape                      # as jax.nn.gelu, 3-bit backward
  (4, 8)
  >>> act = fb.gelu(bits=2)                 # a callable for activation= fields
  >>> act(x).shape
  (4, 8)
"""

# Modules that are a documented face of their own (fb.memory.saved_residuals,
# fb.remat.FRONTIER, fb.ext.mode, fb.dense.sketch_blocks_default, ...). The
# building blocks under them (bit codes, counter hash, per-shard sketches,
# mesh helpers) are private modules or left out of __all__.
from fewbit_jax import (activations, attention, dense, dense_general, ext, linen, losses, memory,
                        nnx, norms, patch, remat, sketch, tables)
from fewbit_jax.activations import (
    fewbit,
    # piecewise, exact 1-bit gradient
    relu, relu6, leaky_relu, hard_tanh, hard_sigmoid, threshold, hard_shrink, soft_shrink,
    # continuous, bits 1..8
    celu, elu, gelu, hard_swish, log_sigmoid, mish, selu, sigmoid, silu, softplus,
    soft_sign, tanh, tanhshrink,
    # the original library's spellings
    hardtanh, hardsigmoid, hardshrink, softshrink, hardswish, hard_silu, logsigmoid,
    softsign, swish,
)
from fewbit_jax.tables import Table, optimal_table, table
from fewbit_jax.dense import randomized_dense
from fewbit_jax.dense_general import randomized_dot_general, randomized_einsum
from fewbit_jax.attention import softmax, dot_product_attention
from fewbit_jax.linen import RandomizedDense, LayerNorm, RMSNorm, Dropout, GatedMLP
from fewbit_jax.norms import layer_norm, rms_norm
from fewbit_jax._dropout import dropout
from fewbit_jax.losses import linear_softmax_cross_entropy
from fewbit_jax.gated import gated
from fewbit_jax.patch import patch_activations
from fewbit_jax.remat import checkpoint_policy

__version__ = "0.1.0"

__all__ = [
    # modules
    "activations", "attention", "dense", "dense_general", "ext", "linen", "losses", "memory",
    "nnx", "norms", "patch", "remat", "sketch", "tables",
    # few-bit activations
    "fewbit", "relu", "relu6", "leaky_relu", "hard_tanh", "hard_sigmoid", "threshold",
    "hard_shrink", "soft_shrink", "celu", "elu", "gelu", "hard_swish", "log_sigmoid", "mish",
    "selu", "sigmoid", "silu", "softplus", "soft_sign", "tanh", "tanhshrink", "hardtanh",
    "hardsigmoid", "hardshrink", "softshrink", "hardswish", "hard_silu", "logsigmoid",
    "softsign", "swish", "Table", "optimal_table", "table",
    # randomized dense
    "randomized_dense", "randomized_dot_general", "randomized_einsum", "RandomizedDense",
    # lean exact residuals
    "layer_norm", "rms_norm", "dropout", "softmax", "dot_product_attention", "LayerNorm",
    "RMSNorm", "Dropout",
    # decoder LLMs
    "linear_softmax_cross_entropy", "gated", "GatedMLP",
    # conversion and remat
    "patch_activations", "checkpoint_policy",
]
