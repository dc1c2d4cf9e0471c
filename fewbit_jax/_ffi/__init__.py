"""The XLA FFI kernels of ``xla_ext`` as JAX primitives, and the rule that picks their path.

- `_load`: importing ``fewbit_jax._xla_ext`` and registering its targets;
- `_path`: the mode (``FEWBIT_JAX_FFI``, `set_mode`) and the path rule per
  op and platform, with the measured defaults;
- `_prim`: primitive plumbing (eager impl, lowerings, partitioning, types);
- `_codes_op`: `quantize_pack`, `pack`, `unpack_scale`;
- `_sketch_op`: `sketch_kernel` (its pure lowering draws from `fewbit_jax._hash`).

`fewbit_jax.ext` is the public face of this package.
"""

from fewbit_jax._ffi._load import available, platforms
from fewbit_jax._ffi._path import MODES, OPS, get_mode, mode, path, set_mode
from fewbit_jax._ffi._codes_op import pack, quantize_pack, unpack_scale
from fewbit_jax._ffi._sketch_op import SKETCH_KINDS, sketch_kernel

__all__ = ["available", "platforms", "MODES", "OPS", "get_mode", "mode", "path", "set_mode",
           "pack", "quantize_pack", "unpack_scale", "SKETCH_KINDS", "sketch_kernel"]
