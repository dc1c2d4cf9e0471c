"""The randomized NNX layers (fewbit_jax.nnx._layers).

RandomizedLinear's drop-in tests (against nnx.Linear and linen's
RandomizedDense) are in test_dense.py, beside randomized_dense's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fewbit_jax as fb


def test_general_layers_take_the_nnx_params_and_refuse_what_they_cannot_sketch():
  # Constructed directly: the same Params as the nnx layer from the same rngs.
  ref = nnx.LinearGeneral(16, (2, 8), rngs=nnx.Rngs(3))
  ours = fb.nnx.RandomizedLinearGeneral(16, (2, 8), rngs=nnx.Rngs(3, sketch=0))
  assert bool(jnp.all(ours.kernel[...] == ref.kernel[...])) and ours.kernel.shape == (16, 2, 8)
  with pytest.raises(ValueError, match="batch_axis"):
    fb.nnx.RandomizedLinearGeneral(16, 4, batch_axis={0: 2}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="einsum_op"):
    fb.nnx.RandomizedEinsum("bd,dh->bh", (4, 2), einsum_op=lambda *a, **k: 0,
                            rngs=nnx.Rngs(0))


_X = jax.random.normal(jax.random.key(0), (4, 5, 8))
_KEY = jax.random.key(7)
_DIMS = (((2,), (0,)), ((), ()))


@pytest.mark.parametrize("cfg", [dict(), dict(sketch="countsketch", proj_dim=3),
                                 dict(sketch_blocks=2, proj_dim_ratio=0.5)], ids=repr)
@pytest.mark.parametrize("kind", ["LinearGeneral", "Einsum"])
def test_general_layers_compute_the_array_function(kind, cfg):
  if kind == "LinearGeneral":
    layer = fb.nnx.RandomizedLinearGeneral(8, (2, 3), rngs=nnx.Rngs(0), **cfg)
    ref = nnx.LinearGeneral(8, (2, 3), rngs=nnx.Rngs(0))
    project = lambda x, w, key, **o: fb.randomized_dot_general(x, w, key, _DIMS, **o)
  else:
    layer = fb.nnx.RandomizedEinsum("btd,dnh->btnh", (8, 2, 3), (2, 3), rngs=nnx.Rngs(0),
                                    **cfg)
    ref = nnx.Einsum("btd,dnh->btnh", (8, 2, 3), (2, 3), rngs=nnx.Rngs(0))
    project = lambda x, w, key, **o: fb.randomized_einsum("btd,dnh->btnh", x, w, key, **o)
  assert bool(jnp.all(layer.kernel[...] == ref.kernel[...]))
  assert bool(jnp.all(layer(_X, rngs=_KEY) == ref(_X)))  # forward bitwise that of nnx

  options = {"proj_dim_ratio": 0.2, **cfg}
  if "proj_dim" in cfg:
    options["proj_dim_ratio"] = None
  bias = layer.bias[...].reshape(1, 1, 2, 3)
  want = jax.grad(lambda w: jnp.sum((project(_X, w, _KEY, **options) + bias) ** 2))(
      layer.kernel[...])
  got = nnx.grad(lambda m: jnp.sum(m(_X, rngs=_KEY) ** 2))(layer)["kernel"][...]
  np.testing.assert_array_equal(got, want)

  exact = nnx.grad(lambda m: jnp.sum(m(_X) ** 2))(ref)["kernel"][...]
  layer.eval()  # deterministic: the plain layer, exact gradient, no rng needed
  np.testing.assert_array_equal(nnx.grad(lambda m: jnp.sum(m(_X) ** 2))(layer)["kernel"][...],
                                exact)
  layer.train()
  assert not layer.deterministic
  assert not bool(jnp.all(nnx.grad(lambda m: jnp.sum(m(_X) ** 2))(layer)["kernel"][...]
                          == exact))
