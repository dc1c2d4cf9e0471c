"""Which path the kernels take: the XLA FFI kernels of ``xla_ext`` or pure JAX.

The compiled extension ``fewbit_jax._xla_ext`` is optional. Where it is
importable its FFI targets are registered with XLA at import. Each op below
then runs either its kernel or the pure-JAX reference (``fewbit_jax.codes``,
``fewbit_jax.rng``), which gives the same codes bit for bit (the sketches up
to float32 summation order). The ops (`OPS`) are ``codes`` (`quantize_pack`,
`pack` and `unpack_scale`: one choice, since an activation's backward unpacks
what its forward packed) and ``sketch_<kind>`` for each of `SKETCH_KINDS`.

Choose the path with the environment variable ``FEWBIT_JAX_FFI`` (``auto``,
the default; ``1`` to require the kernels, which raises if they are missing;
``0`` for pure JAX) or with `set_mode` / the `mode` context manager. In mode
``auto`` each op takes the path measured to be the better one on its
platform (memory first, then time; ``python benchmarks/bench_paths.py``
prints the measurement), and a platform without a measurement takes the
pure-JAX path: on a GPU that is every op until ``tests/gpu/run.sh`` has
passed on one (the CUDA kernels compile but have not run on a GPU yet).
`active_path` tells which path an op takes. The choice is read when a
function is traced, so it is part of what ``jax.jit`` caches: change it
before tracing.

A kernel enters a computation as a JAX primitive (``fewbit_quantize_pack``,
``fewbit_unpack_scale``, ``fewbit_pack``, ``fewbit_sketch``) that batches
under ``jax.vmap``, partitions under a sharded ``jax.jit`` (its FFI call is
batch-partitionable and carries a Shardy rule, so XLA runs it shard by
shard instead of gathering the activations), types its result under
``AxisType.Explicit`` meshes and inside ``jax.shard_map``, and
differentiates where it makes sense (codes have zero tangents;
`unpack_scale` is linear in the cotangent). The activation output itself is
never computed by a kernel: it stays the ``jax.nn`` expression, computed by
XLA, so the forward pass is bitwise that of ``jax.nn``.

Example:
  >>> import importlib.util
  >>> from fewbit_jax import ext
  >>> ext.available() == (importlib.util.find_spec("fewbit_jax._xla_ext") is not None)
  True
  >>> with ext.mode("jax"):
  ...   ext.active_path("cpu")
  'jax'
"""

from __future__ import annotations

from fewbit_jax import _ffi
from fewbit_jax._ffi import (OPS, SKETCH_KINDS, available, get_mode, mode, pack, platforms,
                             quantize_pack, set_mode, sketch_kernel, unpack_scale)

__all__ = ["available", "platforms", "active_path", "set_mode", "get_mode", "mode", "OPS",
           "pack", "quantize_pack", "unpack_scale", "sketch_kernel", "SKETCH_KINDS"]


def active_path(platform: str | None = None, op: str | None = None) -> str:
  """'ffi' or 'jax': the path of `op` for arrays on `platform` (default backend).

  Args:
    platform: 'cpu', 'gpu', 'cuda', ...; None for the default backend.
    op: one of `OPS`; None for any op: 'ffi' where at least one op takes
      its kernel on the platform, else 'jax'.

  Returns:
    'jax' in mode 'jax'; 'ffi' in mode 'ffi'; in mode 'auto' the measured
    default where the platform has kernels (the pure-JAX path on a GPU
    until the CUDA kernels have been validated on one), else 'jax'.

  Raises:
    ValueError: for an op not in `OPS`.
    RuntimeError: in mode 'ffi' when there are no kernels for the platform.

  Example:
    >>> from fewbit_jax import ext
    >>> with ext.mode("auto"):           # GPUs take the pure-JAX path by default
    ...   ext.active_path("cuda", "codes")
    'jax'
    >>> with ext.mode("jax"):
    ...   [ext.active_path("cpu", op) for op in ext.OPS] == ["jax"] * len(ext.OPS)
    True
  """
  if op is not None:
    return _ffi.path(op, platform)
  return "ffi" if any(_ffi.path(o, platform) == "ffi" for o in OPS) else "jax"


# The examples of the functions defined in fewbit_jax._ffi run with this module's.
__test__ = {name: globals()[name] for name in __all__ if callable(globals()[name])}
