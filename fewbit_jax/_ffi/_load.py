"""Loading the compiled extension and registering its FFI targets with XLA.

``fewbit_jax._xla_ext`` is optional. Where it is importable, every target of
its ``registrations()`` is registered at import for the platform it was
built for (and marked batch-partitionable), and `REGISTERED` names the
targets of each platform.
"""

from __future__ import annotations

import jax

try:  # pragma: no cover - depends on how the package was installed
  from fewbit_jax import _xla_ext  # type: ignore[attr-defined]
  IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
  _xla_ext = None
  IMPORT_ERROR = e

# Lower-case platform ('cpu', 'cuda') -> the FFI target names registered for it.
REGISTERED: dict[str, set[str]] = {}


def _register() -> None:
  if _xla_ext is None:
    return
  for platform, table in _xla_ext.registrations().items():
    for name, capsule in table.items():
      jax.ffi.register_ffi_target(name, capsule, platform=platform)
      REGISTERED.setdefault(platform.lower(), set()).add(name)
  # XLA partitions a call over its leading axes (see _prim.frontend_and_rule).
  for name in sorted(set().union(*REGISTERED.values())):
    jax.ffi.register_ffi_target_as_batch_partitionable(name)


_register()


def available() -> bool:
  """Whether the compiled extension was imported and registered.

  Example:
    >>> from fewbit_jax import ext       # available exactly when kernels were registered
    >>> ext.available() == ("cpu" in ext.platforms())
    True
  """
  return _xla_ext is not None


def platforms() -> tuple[str, ...]:
  """Platforms ('cpu', 'cuda') the extension registered FFI targets for.

  Example:
    >>> from fewbit_jax import ext
    >>> set(ext.platforms()) <= {"cpu", "cuda"}
    True
  """
  return tuple(sorted(REGISTERED))


def canonical(platform: str | None = None) -> str:
  """'cpu', 'cuda' or 'rocm' for `platform` (default: the default backend).

  jax calls both GPU platforms 'gpu'; the extension registers 'cuda'.
  """
  platform = (platform or jax.default_backend()).lower()
  if platform != "gpu":
    return platform
  try:
    version = jax.devices("gpu")[0].client.platform_version.lower()
  except RuntimeError:
    version = ""
  return "rocm" if "rocm" in version else "cuda"


def platform_of(a) -> str:
  """The canonical platform ('cpu', 'cuda', ...) of the devices array `a` lives on.

  A concrete array names its devices; a traced one those of the mesh its type
  carries where that mesh knows them; else (a trace not yet placed) the
  default device's platform, where ``jax.jit`` runs it.
  """
  if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
    try:
      return canonical(next(iter(a.devices())).platform)
    except (RuntimeError, StopIteration):  # pragma: no cover - a deleted array
      pass
  mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
  devices = getattr(mesh, "_internal_device_list", None)
  if devices:
    return canonical(devices[0].platform)
  device = jax.config.jax_default_device
  return canonical(device if isinstance(device, str) else getattr(device, "platform", None))


def why_missing(platform: str) -> str:
  """Why there are no kernels for `platform`, for error messages."""
  if _xla_ext is None:
    return f"the extension failed to import ({IMPORT_ERROR})"
  return f"it has no kernels for {platform!r} (built for {platforms()})"
