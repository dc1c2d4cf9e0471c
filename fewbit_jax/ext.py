"""Dispatch between the XLA FFI kernels of ``xla_ext`` and the pure-JAX path.

The compiled extension ``fewbit_jax._xla_ext`` is optional. Where it is
importable its FFI targets are registered with XLA at import, and the
functions here call them on the platforms they were built for; elsewhere they
run the pure-JAX reference (``fewbit_jax.codes``), which gives the same codes
bit for bit.

Choose the path with the environment variable ``FEWBIT_JAX_FFI`` (``auto``,
the default; ``1`` to require the kernels, which raises if they are missing;
``0`` for pure JAX) or with `set_mode` / the `mode` context manager. The
choice is read when a function is traced, so it is part of what ``jax.jit``
caches: change it before tracing.

Example:
  >>> from fewbit_jax import ext
  >>> ext.available() in (True, False)
  True
  >>> with ext.mode("jax"):
  ...   ext.active_path("cpu")
  'jax'
"""

from __future__ import annotations

import contextlib
import os

import jax

from fewbit_jax import codes as _codes

__all__ = ["available", "platforms", "active_path", "set_mode", "get_mode", "mode",
           "pack", "quantize_pack", "unpack_scale", "sketch_kernel"]

_MODES = ("auto", "ffi", "jax")
_ENV_TO_MODE = {"": "auto", "auto": "auto", "1": "ffi", "ffi": "ffi", "0": "jax", "jax": "jax"}

try:  # pragma: no cover - depends on how the package was installed
  from fewbit_jax import _xla_ext  # type: ignore[attr-defined]
  _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
  _xla_ext = None
  _IMPORT_ERROR = e

_REGISTERED: dict[str, set[str]] = {}


def _register() -> None:
  if _xla_ext is None:
    return
  for platform, table in _xla_ext.registrations().items():
    for name, capsule in table.items():
      jax.ffi.register_ffi_target(name, capsule, platform=platform)
      _REGISTERED.setdefault(platform.lower(), set()).add(name)


_register()


def _mode_from_env() -> str:
  raw = os.environ.get("FEWBIT_JAX_FFI", "auto").strip().lower()
  if raw not in _ENV_TO_MODE:
    raise ValueError(f"FEWBIT_JAX_FFI={raw!r}: expected auto, 1 (ffi) or 0 (jax)")
  return _ENV_TO_MODE[raw]


_mode = _mode_from_env()


def available() -> bool:
  """Whether the compiled extension was imported and registered."""
  return _xla_ext is not None


def platforms() -> tuple[str, ...]:
  """Platforms ('cpu', 'cuda') the extension registered FFI targets for."""
  return tuple(sorted(_REGISTERED))


def set_mode(new_mode: str) -> None:
  """Sets the path: 'auto' (kernels where registered), 'ffi' (require them) or 'jax'."""
  global _mode
  if new_mode not in _MODES:
    raise ValueError(f"mode must be one of {_MODES}; got {new_mode!r}")
  _mode = new_mode


def get_mode() -> str:
  """The current path setting ('auto', 'ffi' or 'jax')."""
  return _mode


@contextlib.contextmanager
def mode(new_mode: str):
  """Context manager form of `set_mode`; restores the previous mode on exit."""
  old = _mode
  set_mode(new_mode)
  try:
    yield
  finally:
    set_mode(old)


def active_path(platform: str | None = None) -> str:
  """'ffi' or 'jax': the path used for arrays on `platform` (default backend)."""
  platform = (platform or jax.default_backend()).lower()
  has = platform in _REGISTERED
  if _mode == "jax":
    return "jax"
  if _mode == "ffi" and not has:
    why = (f"the extension failed to import ({_IMPORT_ERROR})" if _xla_ext is None
           else f"it has no kernels for {platform!r} (built for {platforms()})")
    raise RuntimeError(
        f"FFI kernels were required (FEWBIT_JAX_FFI=1 or ext.set_mode('ffi')) but {why}. "
        "Reinstall with `pip install .` (with nvcc on PATH for CUDA) or use mode 'auto'.")
  return "ffi" if has else "jax"


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs uint8 codes (..., n) into bit planes (..., bits, ceil(n/32))."""
  return _codes.pack(codes, bits)


def quantize_pack(x: jax.Array, borders: jax.Array, bits: int) -> jax.Array:
  """Codes of x against `borders`, packed into bit planes (see fewbit_jax.codes)."""
  return _codes.pack(_codes.compute_codes(x, borders, bits), bits)


def unpack_scale(packed: jax.Array, levels: jax.Array, g: jax.Array, bits: int) -> jax.Array:
  """``levels[code] * g`` in g's dtype, from packed codes of g's shape."""
  n = g.shape[-1] if g.ndim else 1
  code = _codes.unpack(packed, bits, n).reshape(g.shape)
  return levels.astype(g.dtype)[code] * g


def sketch_kernel(kind: str):
  """The FFI implementation of ``S^T x`` for a sketch kind, or None.

  Where it returns a callable ``f(x2d, k0, k1, k) -> (k, N)``, fewbit_jax.sketch
  uses it in place of its pure-JAX projection; it must give the same result.
  """
  del kind
  return None
