"""fewbit_jax._mesh: reading meshes and PartitionSpecs from types."""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from fewbit_jax import _mesh


class _Mesh:
  def __init__(self, names, sizes, types):
    self.axis_names, self.axis_sizes, self.axis_types = names, sizes, types


def test_entries_and_shards():
  assert _mesh.axes(None) == () and _mesh.axes(P.UNCONSTRAINED) == ()
  assert _mesh.axes("data") == ("data",) and _mesh.axes(("a", "b")) == ("a", "b")
  assert _mesh.entry(()) is None and _mesh.entry(("a",)) == "a"
  assert _mesh.entry(("a", "b")) == ("a", "b")
  assert _mesh.padded(P("data"), 3) == ("data", None, None)
  mesh = _Mesh(("data", "model"), (4, 2), (AxisType.Explicit, AxisType.Auto))
  sizes = _mesh.sizes(mesh)
  assert sizes == {"data": 4, "model": 2}
  assert _mesh.shards(sizes, ("data", "model")) == 8 and _mesh.shards(sizes, None) == 1
  assert _mesh.if_divides(sizes, "data", 12) == "data"
  assert _mesh.if_divides(sizes, "data", 6) is None
  assert _mesh.explicit_axes(mesh) == {"data"}


def test_no_mesh():
  a = jnp.ones((4, 3))
  assert _mesh.explicit_spec(a) is None and _mesh.explicit_mesh(a) is None
  assert _mesh.type_mesh(a, None) is None
  assert _mesh.context_mesh() is None
  assert _mesh.mesh_axis_sizes(a) == {}
  assert _mesh.last_axis_shards(a) == 1


def test_context_mesh():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    assert _mesh.context_mesh() is not None
    assert _mesh.mesh_axis_sizes(jnp.ones(2)) == {"data": 1}
    assert _mesh.explicit_spec(jnp.ones(2)) is None  # an Auto mesh types nothing
