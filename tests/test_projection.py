"""fewbit_jax._projection: the one randomized projection core and its block resolver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from fewbit_jax import _projection, ext


@pytest.fixture(autouse=True)
def pure_jax():
  with ext.mode("jax"):
    yield


def _spec(x_ndim=3, **kw):
  lead = tuple(range(x_ndim))
  return _projection.Spec("dot_general", _projection.dense_dims(x_ndim), None, None, None,
                          lead, lead, (0, 1), **kw)


def test_resolve_blocks():
  x = jnp.ones((6, 4, 3))
  resolve = lambda x, v: _projection.resolve_blocks(x, v, (0, 1))
  assert resolve(x, None) == (0, False)  # no mesh: one sketch
  assert resolve(x, 3) == (3, False)
  with _projection.blocks_default(2):
    assert resolve(x, None) == (2, False)
    assert resolve(x, 4) == (4, False)
  with pytest.raises(ValueError, match="mesh axes"):
    resolve(x, "data")
  with pytest.raises(ValueError, match="must be None"):
    resolve(x, 0)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    assert resolve(x, None) == (1, False)  # a mesh: one block, whatever the projection
    assert resolve(x, "data") == (1, True)


def _batch_axes(spec):
  return spec.x_perm[:spec.n_batch]


def test_check_blocks_fit():
  x = jnp.ones((6, 4, 3))
  _projection.check_blocks_fit(x, 3, False, _batch_axes(_spec()))
  with pytest.raises(ValueError, match="do not divide the B=24 leading positions"):
    _projection.check_blocks_fit(x, 5, False, _batch_axes(_spec()))
  with pytest.raises(ValueError, match=r"do not divide x's first axis \(6\)"):
    _projection.check_blocks_fit(x, 4, True, _batch_axes(_spec()))
  moved = _projection.Spec("einsum", "tbd,df->btf", None, None, None, (1, 0, 2), (0, 1, 2),
                           (0, 1))
  with pytest.raises(ValueError, match="leading axes"):
    _projection.check_blocks_fit(x, 2, False, _batch_axes(moved))
  _projection.check_blocks_fit(x, 1, False, _batch_axes(moved))  # one block: any axes


def test_spec_shapes():
  spec = _projection.Spec("einsum", "dbt,dnh->bhnt", None, None, None, (1, 2, 0), (0, 3, 2, 1),
                          (0, 1, 2))
  assert spec.n_batch == 2
  assert spec.x_shape((4, 8, 2, 16), (32, 2, 8)) == (32, 4, 16)
  assert _spec().n_batch == 2 and _spec().x_shape((6, 4, 5), (3, 5)) == (6, 4, 3)


@pytest.mark.parametrize("c", [0, 1, 2])
def test_core_forward_is_the_spec_forward(c):
  x = jax.random.normal(jax.random.key(0), (4, 8, 6))
  w = jax.random.normal(jax.random.key(1), (6, 5))
  b = jax.random.normal(jax.random.key(2), (5,))
  spec = _spec(k=-(-4 // c) if c else 4, kind="countsketch", blocks=c)  # k = 4 in all
  words = jnp.array([1, 2], jnp.uint32)
  y = _projection.project(x, w, b, words, spec)
  np.testing.assert_array_equal(y, spec.forward(x, w, b))
  np.testing.assert_array_equal(y, _projection.dense_forward(x, w, b, None, None, None))
  dx, db = jax.grad(lambda x, b: _projection.project(x, w, b, words, spec).sum(),
                    argnums=(0, 1))(x, b)
  np.testing.assert_allclose(dx, jnp.broadcast_to(w.sum(1), x.shape), rtol=1e-6)
  np.testing.assert_array_equal(db, jnp.full(5, 32.0))


def test_check_array():
  _projection.check_array("x", jnp.ones(2))
  with pytest.raises(TypeError, match="x has dtype int32"):
    _projection.check_array("x", jnp.ones(2, jnp.int32))
  with pytest.raises(TypeError, match="must be an array"):
    _projection.check_array("x", [1.0])
