"""The path rule: one choice per op and platform, measured defaults, overrides."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from fewbit_jax import ext
from fewbit_jax import __main__ as cli
from fewbit_jax._ffi import _load, _path

needs_kernels = pytest.mark.skipif(not ext.available(), reason="fewbit_jax._xla_ext not built")


@pytest.fixture
def with_cuda(monkeypatch):
  """The extension as if it had also registered CUDA kernels."""
  monkeypatch.setitem(_load.REGISTERED, "cuda", {"fewbit_pack"})


@needs_kernels
def test_auto_takes_the_measured_default_on_the_cpu():
  with ext.mode("auto"):
    for op in ext.OPS:
      assert _path.path(op, "cpu") == _path.MEASURED["cpu"][op], op
      assert ext.active_path("cpu", op) == _path.MEASURED["cpu"][op], op


def test_every_op_has_a_measured_cpu_default():
  assert set(_path.MEASURED["cpu"]) == set(ext.OPS)
  assert set(_path.MEASURED["cpu"].values()) <= {"ffi", "jax"}


@pytest.mark.parametrize("platform", ["cuda", "gpu", "rocm", "tpu"])
def test_gpu_and_unmeasured_platforms_default_to_pure_jax(platform, with_cuda):
  # CUDA kernels are registered (the fixture) but have not been validated on a
  # GPU: mode 'auto' keeps them off until tests/gpu/run.sh has passed on one.
  assert "cuda" not in _path.MEASURED
  with ext.mode("auto"):
    for op in ext.OPS:
      assert _path.path(op, platform) == "jax", (platform, op)


def test_ffi_mode_opts_in_on_a_gpu(with_cuda):
  with ext.mode("ffi"):
    assert [_path.path(op, "cuda") for op in ext.OPS] == ["ffi"] * len(ext.OPS)


def test_ffi_mode_without_kernels_says_why():
  with ext.mode("ffi"):
    with pytest.raises(RuntimeError, match="FFI kernels were required.*'tpu'|failed to import"):
      _path.path("codes", "tpu")


def test_jax_mode_forces_pure_everywhere(with_cuda):
  with ext.mode("jax"):
    for platform in ("cpu", "cuda", "tpu"):
      assert [_path.path(op, platform) for op in ext.OPS] == ["jax"] * len(ext.OPS)


def test_set_mode_is_read_by_the_rule():
  old = ext.get_mode()
  try:
    ext.set_mode("jax")
    assert _path.path("sketch_gaussian", "cpu") == "jax"
    ext.set_mode("auto")
    assert _path.path("sketch_gaussian", "cpu") == _path.default("sketch_gaussian", "cpu")
  finally:
    ext.set_mode(old)


@pytest.mark.parametrize("raw,want", [("", "auto"), ("auto", "auto"), ("1", "ffi"), ("FFI", "ffi"),
                                      ("0", "jax"), (" jax ", "jax")])
def test_env_var_spellings(raw, want, monkeypatch):
  monkeypatch.setenv("FEWBIT_JAX_FFI", raw)
  assert _path._mode_from_env() == want  # pylint: disable=protected-access


def test_env_var_rejects_other_values(monkeypatch):
  monkeypatch.setenv("FEWBIT_JAX_FFI", "yes")
  with pytest.raises(ValueError, match="expected auto, 1 .ffi. or 0 .jax."):
    _path._mode_from_env()  # pylint: disable=protected-access


def test_unknown_op_is_an_error():
  with pytest.raises(ValueError, match="op must be one of"):
    _path.path("quantize_pack", "cpu")


@needs_kernels
def test_both_callers_follow_the_rule():
  """The code functions and sketch_kernel emit the kernels exactly where the rule says."""
  x = jnp.ones((4, 40))
  borders = jnp.array([-1.0, 0.0, 1.0])
  for m in _path.MODES:
    with ext.mode(m):
      hlo = jax.jit(lambda x: ext.quantize_pack(x, borders, 2)).lower(x).as_text()
      assert ("fewbit_quantize_pack" in hlo) == (ext.active_path(None, "codes") == "ffi"), m
      for kind in ext.SKETCH_KINDS:
        want = ext.active_path(None, f"sketch_{kind}") == "ffi"
        assert (ext.sketch_kernel(kind) is not None) == want, (m, kind)


def test_info_shows_the_path_of_each_op(capsys):
  assert cli.main(["info"]) == 0
  out = capsys.readouterr().out.splitlines()
  backend = jax.default_backend()
  assert out[0].startswith("fewbit_jax ") and f"backend {backend}" in out[0]
  assert f"mode {ext.get_mode()}" in out[1]
  assert out[2].startswith(f"path of each op on {backend}")
  rows = dict(line.split() for line in out[3:])
  assert rows == {op: ext.active_path(op=op) for op in ext.OPS}


@needs_kernels
@pytest.mark.parametrize("env,want", [("0", "jax"), ("1", "ffi")])
def test_env_var_sets_every_op(env, want, child_env):
  proc = subprocess.run([sys.executable, "-P", "-m", "fewbit_jax", "info"],
                        env=child_env(FEWBIT_JAX_FFI=env, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert f"mode {want}" in lines[1]
  assert dict(line.split() for line in lines[3:]) == {op: want for op in ext.OPS}


def test_bench_paths_rule():
  # The subject is the benchmark's own rule (it writes _path.MEASURED), so the
  # benchmark module is imported here, not a model of it.
  from benchmarks import bench_paths  # pylint: disable=g-import-not-at-top
  mib = 2**20
  assert bench_paths.choose(10 * mib, 12 * mib, 1.5) == "ffi"     # memory first
  assert bench_paths.choose(12 * mib, 10 * mib, 0.5) == "jax"
  assert bench_paths.choose(10 * mib, 10 * mib, 0.8) == "ffi"     # then time
  assert bench_paths.choose(10 * mib, 10 * mib, 0.95) == "jax"    # a tie within noise
  assert bench_paths.choose(1000 * mib, 1005 * mib, 0.95) == "jax"  # within 1% is a tie


@needs_kernels
@pytest.mark.slow
def test_bench_paths_prints_a_choice_per_op(capsys):
  from benchmarks import bench_paths  # pylint: disable=g-import-not-at-top
  assert bench_paths.main(["--quick", "--runs", "2"]) == 0
  out = capsys.readouterr().out
  for op in ext.OPS:
    assert f"| {op} |" in out
  assert "MEASURED['cpu'] = {" in out
