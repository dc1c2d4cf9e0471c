"""Bit-plane packing and code computation (pure-JAX reference)."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fewbit_jax import codes

# The property tests draw a new shape per example: one jitted program per
# example compiles once, where the eager ops would each compile for it (255
# compares at 8 bits in compute_codes). The same operations, the same results.
_pack = jax.jit(codes.pack, static_argnums=1)
_unpack = jax.jit(codes.unpack, static_argnums=(1, 2))
_compute_codes = jax.jit(codes.compute_codes, static_argnums=2)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_unpack_roundtrip(bits, data):
  shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=70))
  c = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2 ** bits - 1)))
  p = _pack(jnp.asarray(c), bits)
  assert p.dtype == jnp.uint32
  assert p.shape == codes.packed_shape(shape, bits)
  np.testing.assert_array_equal(np.asarray(_unpack(p, bits, shape[-1])), c)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 100])
def test_layout_matches_definition(bits, n):
  rng = np.random.default_rng(bits * 1000 + n)
  c = rng.integers(0, 2 ** bits, size=(2, n)).astype(np.uint8)
  p = np.asarray(codes.pack(jnp.asarray(c), bits))
  words = -(-n // 32)
  assert p.shape == (2, bits, words)
  expect = np.zeros((2, bits, words), np.uint64)
  for r in range(2):
    for i in range(n):
      for b in range(bits):
        expect[r, b, i // 32] |= ((int(c[r, i]) >> b) & 1) << (i % 32)
  np.testing.assert_array_equal(p, expect.astype(np.uint32))


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_nbytes_is_bits_per_element(bits):
  shape = (4, 3072)
  assert codes.packed_nbytes(shape, bits) * 8 == bits * 4 * 3072
  assert codes.packed_nbytes((5,), bits) == 4 * bits  # padding of the last axis to a word


def test_scalar_packs_as_one_element():
  p = codes.pack(jnp.uint8(3), 2)
  assert p.shape == (2, 1)
  assert int(codes.unpack(p, 2, 1)[0]) == 3


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_compute_codes_is_searchsorted(bits, data):
  borders = np.sort(data.draw(hnp.arrays(np.float32, 2 ** bits - 1,
                                         elements=st.floats(-4, 4, width=32,
                                                                   allow_subnormal=False))))
  x = data.draw(hnp.arrays(np.float32, st.integers(0, 50),
                           elements=st.floats(-6, 6, width=32, allow_subnormal=False)))
  # Subnormals are left out: XLA flushes them to zero before comparing.
  # Include the borders themselves: ties go left (borders < x is strict).
  x = np.concatenate([x, borders, [np.inf, -np.inf]]).astype(np.float32)
  got = np.asarray(_compute_codes(jnp.asarray(x), jnp.asarray(borders), bits))
  np.testing.assert_array_equal(got, np.searchsorted(borders, x, side="left"))


def test_compute_codes_nan_and_low_precision():
  borders = jnp.array([-1.0, 0.0, 1.0])
  x = jnp.array([jnp.nan, -jnp.inf, jnp.inf, 0.5])
  np.testing.assert_array_equal(codes.compute_codes(x, borders, 2), [0, 0, 3, 2])
  xb = x.astype(jnp.bfloat16)
  np.testing.assert_array_equal(codes.compute_codes(xb, borders, 2), [0, 0, 3, 2])


def test_unpack_checks_sizes():
  p = codes.pack(jnp.zeros((3, 40), jnp.uint8), 2)
  with pytest.raises(ValueError, match="planes"):
    codes.unpack(p, 3, 40)
  with pytest.raises(ValueError, match="cannot hold"):
    codes.unpack(p, 2, 70)


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_check_bits_range(bad):
  with pytest.raises(ValueError, match="1..8"):
    codes.check_bits(bad)


@pytest.mark.parametrize("bad", [2.0, "3", True, None])
def test_check_bits_type(bad):
  with pytest.raises(TypeError, match="int"):
    codes.check_bits(bad)


def test_pack_under_jit_and_vmap():
  c = jnp.asarray(np.random.default_rng(0).integers(0, 8, (5, 3, 45)), jnp.uint8)
  p1 = jax.jit(lambda c: codes.pack(c, 3))(c)
  p2 = jax.vmap(lambda c: codes.pack(c, 3))(c)
  np.testing.assert_array_equal(p1, p2)


@pytest.mark.parametrize("bits", [3, 8])
def test_pure_path_keeps_only_the_codes(bits):
  # jit(grad) of a few-bit activation between elementwise ops: on the pure
  # path the step's temp is the packed codes and nothing activation-sized
  # beside them (a binary search by table lookups held 25 MiB at 8 bits here).
  import fewbit_jax as fb
  from fewbit_jax import ext
  x = jnp.ones((512, 2048))
  f = lambda x: jnp.sum(jnp.sin(fb.gelu(jnp.cos(x), bits=bits)))
  with ext.mode("jax"):
    temp = jax.jit(jax.grad(f)).lower(x).compile().memory_analysis().temp_size_in_bytes
  assert temp <= codes.packed_nbytes(x.shape, bits) + 64 * 1024, temp
