"""RoBERTa for sequence classification, and its optax training step.

The model is `fewbit_jax._models.roberta`'s (the architecture of Hugging
Face's ``RobertaForSequenceClassification``, with its injection points:
``activation``, ``dense``, ``layer_norm``, ``dropout``, ``attention``,
``remat`` / ``remat_policy``, ``dtype``, ``head_dense``), the one definition
that the main job (``fewbit-jax bench``) builds too; it is re-exported here.
This module adds what the benchmarks train it with: abstract and concrete
parameters with optax state, and the jitted training step.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from benchmarks import roberta
  >>> cfg = roberta.RobertaConfig.tiny()
  >>> model = roberta.RobertaClassifier(cfg)
  >>> params, opt_state = roberta.init_shapes(model, optax.adamw(1e-4))
  >>> batch = roberta.make_batch(cfg, 2, 8)
  >>> step = roberta.make_train_step(model, optax.adamw(1e-4), donate=False)
  >>> params, opt_state = roberta.init_params(model, optax.adamw(1e-4), jax.random.key(0))
  >>> step(params, opt_state, batch, jax.random.key(1))[2].shape
  ()
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fewbit_jax import memory
from fewbit_jax._models.roberta import (REMAT_PARTS, Parts, RobertaClassifier, RobertaConfig,
                                        attention_core, batch_shapes, exact_gelu, make_batch)

__all__ = ["RobertaConfig", "RobertaClassifier", "exact_gelu", "attention_core", "Parts",
           "REMAT_PARTS", "init_shapes", "init_params", "make_batch", "batch_shapes",
           "make_train_step"]

Array = jax.Array


def init_shapes(model: RobertaClassifier, tx: optax.GradientTransformation,
                batch: int = 2, seq: int = 8):
  """Abstract (params, opt_state) of `model`, built without allocating them."""
  def init(key):
    ids = jnp.ones((batch, seq), jnp.int32)
    params = model.init({"params": key, "sketch": key, "dropout": key}, ids,
                        jnp.ones_like(ids))["params"]
    return params, tx.init(params)
  return jax.eval_shape(init, jax.random.key(0))


def init_params(model: RobertaClassifier, tx: optax.GradientTransformation, key: Array,
                batch: int = 2, seq: int = 8):
  """Concrete (params, opt_state) of `model`."""
  ids = jnp.ones((batch, seq), jnp.int32)
  init = jax.jit(lambda k: model.init({"params": k, "sketch": k, "dropout": k}, ids,
                                      jnp.ones_like(ids))["params"])
  # It runs once: compiled without LLVM optimisation (faster than op by op too).
  params = init.lower(key).compile(memory.MEMORY_ONLY)(key)
  return params, tx.init(params)


def make_train_step(model: RobertaClassifier, tx: optax.GradientTransformation,
                    *, deterministic: bool = False, donate: bool = True):
  """The jitted step ``(params, opt_state, batch, key) -> (params, opt_state, loss)``.

  Uses the rng streams ``dropout`` and ``sketch`` (the randomized dense
  layers' stream). Parameters and optimizer state are donated, so XLA updates
  them in place as a PyTorch optimizer does.
  """
  def loss_fn(params, batch, key):
    k_drop, k_sketch = jax.random.split(key)
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         deterministic=deterministic,
                         rngs={"dropout": k_drop, "sketch": k_sketch})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  def step(params, opt_state, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())
