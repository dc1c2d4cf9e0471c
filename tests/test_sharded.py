"""fewbit_jax._sharded on one device: the shard-by-shard sketch and ordering.

On 8 devices (meshes of both axis types, data and tensor parallelism) they
are exercised through the randomized layers in tests/test_sharding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewbit_jax import _mesh, _sharded as sharded, ext, sketch


@pytest.fixture(autouse=True)
def pure_jax():
  with ext.mode("jax"):
    yield


def test_after_is_the_identity():
  a = jnp.array([1.5, -0.0, jnp.inf])
  out = sharded.after(a, jnp.full((2, 3), jnp.nan))
  np.testing.assert_array_equal(out, a)
  assert str(out[1]) == "-0.0"


@pytest.mark.parametrize("kind", sketch.KINDS)
def test_project_blocks_without_a_mesh_is_the_plain_one(kind):
  x = jax.random.normal(jax.random.key(0), (3, 8, 5))
  keys = sketch.block_keys(jax.random.key(1), 3)
  ours = jax.jit(lambda x: sharded.project_blocks(kind, x, keys, 4))(x)
  plain = jax.jit(lambda x: sketch.project_blocks(kind, x, keys, 4))(x)
  np.testing.assert_array_equal(ours, plain)
  with pytest.raises(ValueError, match="3-D"):
    sharded.project_blocks(kind, x[0], keys, 4)
  with pytest.raises(ValueError, match="unknown sketch"):
    sharded.project_blocks("gauss", x, keys, 4)


def test_type_helpers_without_a_mesh():
  a = jnp.ones((8, 3))
  assert _mesh.explicit_spec(a) is None
  assert _mesh.type_mesh(a, None) is None
  assert sharded.reshape(a, (2, 4, 3), ("data", None, None)).shape == (2, 4, 3)
  np.testing.assert_array_equal(sharded.after(a, jnp.zeros((0,))), a)
