"""CUDA kernels: the same codes and products as the CPU kernels and pure JAX.

Skipped unless jax runs on a GPU and the extension was built with CUDA
(tests/gpu/run.sh does both). tests/test_ffi_*.py also run on the GPU then,
comparing the CUDA kernels with the pure-JAX path; this file adds what needs
two platforms or a large GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewbit_jax import codes, ext, _rng as rng

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu" or "cuda" not in ext.platforms(),
    reason="needs a GPU and fewbit_jax built with CUDA (tests/gpu/run.sh)")

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _on(device, fn, *args):
  """fn jitted on `device` (its arguments placed there) with the kernels."""
  args = [jax.device_put(a, device) for a in args]
  with ext.mode("ffi"):
    return np.asarray(jax.jit(fn)(*args))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_kernels(bits, dtype):
  cpu, gpu = jax.devices("cpu")[0], jax.devices("gpu")[0]
  r = np.random.default_rng(bits)
  borders = jnp.asarray(np.sort(r.normal(size=2**bits - 1)).astype(np.float32))
  levels = jnp.asarray(r.normal(size=2**bits).astype(np.float32))
  for shape in [(1,), (31,), (33,), (3, 5, 97), (64, 1024), (2, 3, 4, 1)]:
    x = jnp.asarray(r.normal(size=shape).astype(np.float32)).astype(dtype)
    g = jnp.asarray(r.normal(size=shape).astype(np.float32)).astype(dtype)
    qp = lambda x: ext.quantize_pack(x, borders, bits)
    p_cpu, p_gpu = _on(cpu, qp, x), _on(gpu, qp, x)
    np.testing.assert_array_equal(p_cpu, p_gpu)
    us = lambda p, g: ext.unpack_scale(p, levels, g, bits)
    np.testing.assert_array_equal(_on(cpu, us, p_cpu, g).astype(np.float32),
                                  _on(gpu, us, p_gpu, g).astype(np.float32))


@pytest.mark.parametrize("kind", ext.SKETCH_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_sketch_matches_cpu(kind, dtype):
  cpu, gpu = jax.devices("cpu")[0], jax.devices("gpu")[0]
  x = jax.random.normal(jax.random.key(0), (1000, 130)).astype(dtype)
  k0, k1 = rng.key_words(jax.random.key(1))
  f = lambda x: ext.sketch_kernel(kind)(x, k0, k1, 77)
  a, b = _on(cpu, f, x), _on(gpu, f, x)
  np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(a).max())


def test_more_than_2_to_31_elements():
  """64-bit indexing in quantize_pack and unpack_scale (about 26 GB of GPU memory)."""
  n = 2**31 + 96
  x = jnp.full((n,), -1.0, jnp.float32).at[-70:].set(1.0).at[5].set(1.0)
  borders = jnp.zeros((1,), jnp.float32)
  with ext.mode("ffi"):
    p = jax.jit(lambda x: ext.quantize_pack(x, borders, 1))(x)
    p_host = np.asarray(p[0, -4:])
    y = jax.jit(lambda p, g: ext.unpack_scale(p, jnp.array([0.0, 2.0]), g, 1))(p, x)
    tail = np.asarray(y[-128:])
    head = float(y[5])
  last = np.zeros(128, np.uint8)
  last[-70:] = 1
  np.testing.assert_array_equal(p_host, np.asarray(codes.pack(jnp.asarray(last), 1))[0])
  np.testing.assert_array_equal(tail, np.where(last == 1, 2.0, 0.0).astype(np.float32))
  assert head == 2.0
