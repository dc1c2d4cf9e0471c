"""The path setting and the one rule that picks a path per op and platform.

An op is a group of kernels that one path decision covers:

* ``codes``: ``quantize_pack``, ``pack`` and ``unpack_scale``, one choice:
  an activation's forward packs the codes its backward unpacks, and the
  memory a path costs is that of the pair inside the step (what XLA fuses
  around them), not that of either kernel alone;
* ``sketch_gaussian``, ``sketch_rademacher``, ``sketch_countsketch``: the
  sketch ``S^T x`` of each kind with a kernel.

`path` answers 'ffi' (the kernel) or 'jax' (the pure-JAX code, the same
results): in mode 'jax' always 'jax'; in mode 'ffi' the kernel, or an error
where the platform has none; in mode 'auto' the measured default of
`MEASURED` where the platform has kernels, else 'jax'.
"""

from __future__ import annotations

import contextlib
import os

from fewbit_jax._ffi import _load

MODES = ("auto", "ffi", "jax")
_ENV_TO_MODE = {"": "auto", "auto": "auto", "1": "ffi", "ffi": "ffi", "0": "jax", "jax": "jax"}

OPS = ("codes", "sketch_gaussian", "sketch_rademacher", "sketch_countsketch")

# The default path of each op on each platform, chosen by measurement: memory
# first (the compiled temp bytes of the op's forward and backward), then time
# (a tie within noise goes to the pure path). `python benchmarks/bench_paths.py`
# prints the table this is copied from. A platform missing here takes the
# pure-JAX path: CUDA until `tests/gpu/run.sh` has passed on a GPU and its
# numbers are in the README (its kernels compile but have not run on one).
MEASURED: dict[str, dict[str, str]] = {
    "cpu": {"codes": "jax", "sketch_gaussian": "ffi", "sketch_rademacher": "ffi",
            "sketch_countsketch": "ffi"},
}


def _mode_from_env() -> str:
  raw = os.environ.get("FEWBIT_JAX_FFI", "auto").strip().lower()
  if raw not in _ENV_TO_MODE:
    raise ValueError(f"FEWBIT_JAX_FFI={raw!r}: expected auto, 1 (ffi) or 0 (jax)")
  return _ENV_TO_MODE[raw]


_mode = _mode_from_env()


def set_mode(new_mode: str) -> None:
  """Sets the path: 'auto' (the measured default), 'ffi' (require the kernels) or 'jax'.

  Read when a function is traced: set it before ``jax.jit`` traces.

  Example:
    >>> from fewbit_jax import ext
    >>> old = ext.get_mode()
    >>> ext.set_mode("jax"); ext.active_path("cpu")
    'jax'
    >>> ext.set_mode(old)
  """
  global _mode
  if new_mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {new_mode!r}")
  _mode = new_mode


def get_mode() -> str:
  """The current path setting ('auto', 'ffi' or 'jax').

  Example:
    >>> import os
    >>> from fewbit_jax import ext       # FEWBIT_JAX_FFI unless set_mode changed it
    >>> raw = os.environ.get("FEWBIT_JAX_FFI", "auto").strip().lower()
    >>> ext.get_mode() == {"1": "ffi", "0": "jax", "": "auto"}.get(raw, raw)
    True
  """
  return _mode


@contextlib.contextmanager
def mode(new_mode: str):
  """Context manager form of `set_mode`; restores the previous mode on exit.

  Example:
    >>> from fewbit_jax import ext
    >>> with ext.mode("jax"):
    ...   ext.get_mode()
    'jax'
  """
  old = _mode
  set_mode(new_mode)
  try:
    yield
  finally:
    set_mode(old)


def default(op: str, platform: str) -> str:
  """The measured default path of `op` on `platform` (a canonical name), kernels permitting."""
  if platform not in _load.REGISTERED:
    return "jax"
  return MEASURED.get(platform, {}).get(op, "jax")


def path(op: str, platform: str | None = None) -> str:
  """'ffi' or 'jax': the path of `op` for arrays on `platform` (default backend).

  Raises:
    ValueError: for an op not in `OPS`.
    RuntimeError: in mode 'ffi' when there are no kernels for the platform.
  """
  if op not in OPS:
    raise ValueError(f"op must be one of {OPS}; got {op!r}")
  platform = _load.canonical(platform)
  if _mode == "jax":
    return "jax"
  if _mode == "ffi":
    if platform not in _load.REGISTERED:
      raise RuntimeError(
          f"FFI kernels were required (FEWBIT_JAX_FFI=1 or ext.set_mode('ffi')) but "
          f"{_load.why_missing(platform)}. Reinstall with `pip install .` (with nvcc on PATH "
          "for CUDA) or use mode 'auto'.")
    return "ffi"
  return default(op, platform)
