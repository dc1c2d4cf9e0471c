"""The public face of the kernels: fewbit_jax.ext (mode, availability, paths)."""

import importlib.util

import pytest

from fewbit_jax import _ffi, ext
from fewbit_jax._ffi import _path


def test_available_is_whether_the_compiled_module_imports():
  spec = importlib.util.find_spec("fewbit_jax._xla_ext")
  assert ext.available() == (spec is not None), ("the extension is built but did not import: "
                                                 f"{_ffi._load.IMPORT_ERROR}")
  assert ext.available() == ("cpu" in ext.platforms())


def test_mode_and_path_follow_the_environment():
  # What FEWBIT_JAX_FFI forces (unset: auto, each op its measured CPU default).
  mode = _path._mode_from_env()  # pylint: disable=protected-access
  assert ext.get_mode() == mode
  per_op = {op: {"jax": "jax", "ffi": "ffi", "auto": _path.MEASURED["cpu"][op]}[mode]
            for op in ext.OPS}
  if not ext.available():
    per_op = {op: "jax" for op in ext.OPS}
  if mode == "ffi" and not ext.available():
    with pytest.raises(RuntimeError, match="FFI kernels were required"):
      ext.active_path("cpu")
    return
  assert {op: ext.active_path("cpu", op) for op in ext.OPS} == per_op
  assert ext.active_path("cpu") == ("ffi" if "ffi" in per_op.values() else "jax")


@pytest.mark.skipif(not ext.available(), reason="fewbit_jax._xla_ext not built")
def test_reports_active_path():
  assert "cpu" in ext.platforms()
  with ext.mode("ffi"):
    assert ext.active_path("cpu") == "ffi"
  with ext.mode("jax"):
    assert ext.active_path("cpu") == "jax"
    assert ext.sketch_kernel("gaussian") is None
  with ext.mode("ffi"):
    assert callable(ext.sketch_kernel("countsketch"))
    assert ext.sketch_kernel("dct") is None


def test_active_path_without_op_is_ffi_where_any_op_takes_a_kernel():
  for platform in ("cpu", "cuda"):
    for m in _ffi.MODES:
      with ext.mode(m):
        try:
          per_op = [ext.active_path(platform, op) for op in ext.OPS]
        except RuntimeError:  # mode 'ffi' without kernels: the summary raises too
          with pytest.raises(RuntimeError, match="FFI kernels were required"):
            ext.active_path(platform)
          continue
        assert ext.active_path(platform) == ("ffi" if "ffi" in per_op else "jax")


def test_active_path_names_the_ops():
  with pytest.raises(ValueError, match="op must be one of"):
    ext.active_path("cpu", "dct")


def test_set_mode_checks_its_argument():
  with pytest.raises(ValueError, match="mode must be one of"):
    ext.set_mode("kernels")
  old = ext.get_mode()
  with ext.mode("jax"):
    assert ext.get_mode() == "jax"
  assert ext.get_mode() == old


def test_facade_names():
  assert set(ext.__all__) == {"available", "platforms", "active_path", "set_mode", "get_mode",
                              "mode", "OPS", "pack", "quantize_pack", "unpack_scale",
                              "sketch_kernel", "SKETCH_KINDS"}
  assert ext.OPS == ("codes",) + tuple(f"sketch_{k}" for k in ext.SKETCH_KINDS)
  # The examples of the functions that live in fewbit_jax._ffi run with ext's.
  assert {"pack", "quantize_pack", "unpack_scale", "sketch_kernel", "mode"} <= set(ext.__test__)
