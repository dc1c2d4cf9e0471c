"""fewbit_jax._order: exact 1s and 0s tied to data."""

import jax
import jax.numpy as jnp
import numpy as np

from fewbit_jax import _order


def test_values_are_exact():
  a = jnp.array([1.5, -0.0, jnp.inf, jnp.nan])
  for dep in (jnp.full((2, 3), jnp.nan), jnp.array(-0.0), jnp.ones((3,), jnp.bfloat16)):
    out = _order.after(a, dep)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), np.asarray(a).view(np.uint32))
    assert int(_order.zero_of(dep)) == 0 and _order.zero_of(dep).dtype == jnp.uint32
  assert _order.after(a, jnp.zeros((0, 2))) is a


def test_the_dependence_survives_jit():
  # XLA cannot fold the 1 away: the program reads dep.
  hlo = jax.jit(_order.after).lower(jnp.ones(3), jnp.ones(2)).compile().as_text()
  assert "bitcast-convert" in hlo or "minimum" in hlo
