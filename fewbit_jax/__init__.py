"""fewbit-jax: memory-efficient training for JAX and Flax."""

from fewbit_jax import codes, ext, rng

__version__ = "0.1.0"
