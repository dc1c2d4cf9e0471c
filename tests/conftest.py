import os
import sys

import pytest

# benchmarks/ and examples/ are imported by their smoke tests. The repository
# root goes at the *end* of sys.path so that an installed fewbit_jax (with its
# compiled kernels) still wins over the source tree.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.append(_ROOT)


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="also run tests marked slow (long benchmarks and examples)")
  parser.addoption("--xla-optimized", action="store_true", default=False,
                   help="compile every test with XLA's full optimisation (by default only "
                        "the tests marked xla_optimized do; the rest compile at a low level)")


# The suite compiles at XLA's low optimisation level (``jax_disable_most_optimizations``):
# LLVM's expensive passes are skipped (a third of most CPU compilations here) while
# XLA's HLO passes, hence fusion, buffer assignment and every byte count and
# collective a test reads, stay as they are. Tests of last-ulp numerics against
# eager references (transcendental functions differ between the levels) are marked
# `xla_optimized`; ``--xla-optimized`` runs everything at the full level.
_LOW_LEVEL = "JAX_DISABLE_MOST_OPTIMIZATIONS"


def pytest_configure(config):
  config.addinivalue_line("markers", "xla_optimized: compiled with XLA's full optimisation "
                          "(numerics checked to the last bits against eager references)")
  if not config.getoption("--xla-optimized"):
    os.environ[_LOW_LEVEL] = "1"  # this process and the children it starts
    if "jax" in sys.modules:
      sys.modules["jax"].config.update("jax_disable_most_optimizations", True)
  # Under pytest-xdist (`-n 2`) the tests of a module run on one worker, so
  # that its module-scoped fixtures (compiled programs, a child's results)
  # are made once: `--dist load` (what `-n` implies) becomes `loadfile`. Each
  # worker that runs an 8-device test keeps its own 8-device child.
  if getattr(config.option, "dist", "no") == "load":
    config.option.dist = "loadfile"


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


# Whether jax is at the full level with caches holding nothing compiled at the
# low level since they were cleared: consecutive `xla_optimized` tests (a
# marked module) then share their compilations (eager ops included).
_AT_FULL_LEVEL = False


@pytest.fixture(autouse=True)
def _xla_optimized(request):
  """Tests marked `xla_optimized` compile with XLA's full optimisation.

  The flag is not part of jax's compilation cache keys, so the caches are
  cleared first: an executable (an eager op included) compiled at the low level
  by an earlier test must not be reused. The level stays full after the test
  until an unmarked one starts (what was compiled in between is at the full
  level too), so the next marked test needs no clearing; an unmarked test
  reusing what was compiled at the full level is harmless.
  """
  global _AT_FULL_LEVEL
  if os.environ.get(_LOW_LEVEL) != "1":
    yield
    return
  marked = request.node.get_closest_marker("xla_optimized") is not None
  if marked != _AT_FULL_LEVEL:
    import jax
    jax.config.update("jax_disable_most_optimizations", not marked)
    if marked:
      jax.clear_caches()
    _AT_FULL_LEVEL = marked
  yield


def _child_env(**extra: str) -> dict[str, str]:
  """The environment for a `python -P` child that imports what this process did.

  The child imports the fewbit_jax this process imported (an installed one,
  with its compiled kernels, ahead of the source tree), then finds
  benchmarks/ and examples/ in the repository. `-P` keeps `-c`/`-m` from
  putting the working directory (a source checkout without kernels) first.
  """
  from examples import _common
  env = dict(os.environ, PYTHONPATH=_common.child_pythonpath(_ROOT))
  env.update(extra)
  return env


@pytest.fixture(scope="session")
def child_env():
  """`child_env(**extra)`: the environment for a `python -P` test subprocess."""
  return _child_env


# Variables read when JAX or fewbit_jax starts: a script that sets one gets a
# child of its own, since the shared child has started already.
_STARTUP_ENV = ("XLA_FLAGS", "JAX_", "FEWBIT_JAX_FFI", "TF_CPP", "XLA_")


class _DeviceChild:
  """A `python -P tests/_device_child.py` process with 8 CPU devices, kept for the session.

  Runs the scripts handed to `run` one after another; see tests/_device_child.py.
  """

  def __init__(self, startup_env: dict[str, str]):
    import subprocess
    import tempfile
    flags = (startup_env.pop("XLA_FLAGS", None) or os.environ.get("XLA_FLAGS", ""))
    env = _child_env(XLA_FLAGS=(flags + " --xla_force_host_platform_device_count=8").strip(),
                     JAX_PLATFORMS="cpu", **startup_env)
    fd, self.stderr = tempfile.mkstemp(prefix="fewbit_8_devices_", suffix=".stderr")
    os.close(fd)
    with open(self.stderr, "ab") as err:  # append: the offsets are the child's alone
      self.proc = subprocess.Popen(
          [sys.executable, "-P", os.path.join(_ROOT, "tests", "_device_child.py")],
          env=env, cwd=_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
          text=True)

  def _stderr_size(self) -> int:
    return os.path.getsize(self.stderr)

  def _stderr_since(self, pos: int) -> str:
    with open(self.stderr, errors="replace") as f:
      f.seek(pos)
      return f.read()

  def run(self, script: str, args, cwd: str, env: dict[str, str], timeout: float) -> str:
    """The script's stdout; fails the calling test with its traceback and stderr."""
    import json
    import select
    pos = self._stderr_size()
    request = {"script": script, "args": list(args), "cwd": cwd, "env": env}
    try:
      self.proc.stdin.write(json.dumps(request) + "\n")
      self.proc.stdin.flush()
    except BrokenPipeError:
      pass
    ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
    line = self.proc.stdout.readline() if ready else ""
    if not line:
      stderr = self._stderr_since(pos)
      self.close()
      why = (f"did not answer within {timeout} s" if not ready else
             f"exited with status {self.proc.returncode}")
      pytest.fail(f"the 8-device child {why}; its stderr:\n{stderr[-4000:]}", pytrace=False)
    answer = json.loads(line)
    if not answer["ok"]:
      pytest.fail(f"the 8-device script failed:\n{answer['error'][-4000:]}\n"
                  f"stderr:\n{self._stderr_since(pos)[-4000:]}", pytrace=False)
    return answer["stdout"]

  def alive(self) -> bool:
    return self.proc.poll() is None

  def close(self) -> None:
    import subprocess
    if self.proc.poll() is None:
      try:
        self.proc.stdin.close()  # the child ends at the end of its input
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()
    if os.path.exists(self.stderr):
      os.unlink(self.stderr)


_CHILDREN: dict[tuple, _DeviceChild] = {}


def _on_8_devices(script: str, *args: str, timeout: int = 900, cwd: str | None = _ROOT,
                  **extra_env: str):
  """The JSON that `script` printed last, run on 8 simulated CPU devices.

  Runs `script` as ``python -P -c script *args`` would, in `cwd` (None: this
  process's working directory) with `extra_env` added to the environment, in
  the child process with 8 CPU devices that this session shares (the device
  count is fixed when JAX starts; one child saves an interpreter start, a JAX
  import and the compilations the scripts share per script). Fails the test
  with the script's traceback unless it runs through; a child that dies or
  exceeds `timeout` seconds is replaced for the next script.
  """
  import json
  startup = {k: v for k, v in extra_env.items() if k.startswith(_STARTUP_ENV)}
  key = tuple(sorted(startup.items()))
  child = _CHILDREN.get(key)
  if child is None or not child.alive():
    child = _CHILDREN[key] = _DeviceChild(dict(startup))
  rest = {k: v for k, v in extra_env.items() if k not in startup}
  out = child.run(script, args, os.path.abspath(cwd or os.getcwd()), rest, timeout)
  lines = out.strip().splitlines()
  assert lines, "the 8-device script printed nothing"
  return json.loads(lines[-1])


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  while _CHILDREN:
    _CHILDREN.popitem()[1].close()


@pytest.fixture(scope="session")
def on_8_devices():
  """`on_8_devices(script, *args, timeout=, cwd=, **env)`: the JSON an 8-device script prints last.

  Every script of the session runs in one child process with 8 CPU devices,
  one after another, each as if it were ``python -P -c script *args``.
  """
  return _on_8_devices


def _assert_matches_theory(est, truth, var, n_keys: int) -> None:
  """Sketched estimates `est` (one per key) unbiased for `truth`, with variance `var` (theory's).

  Unbiased: each entry's mean is within 5 standard errors of the truth, and
  the squared standardized errors average about 1 (their expectation).
  Variance: the summed squared deviation per key has mean sum(var); it is
  compared with its own standard error, and within 15%.
  """
  import math
  import numpy as np
  z = (est.mean(0) - truth) / np.sqrt(var / n_keys)
  assert np.abs(z).max() < 5.0, z
  assert (z ** 2).mean() < 3.0, (z ** 2).mean()
  q = ((est - est.mean(0)) ** 2).sum(axis=(1, 2)) * n_keys / (n_keys - 1)
  zq = (q.mean() - var.sum()) / (q.std() / math.sqrt(n_keys))
  assert abs(zq) < 5.0, (q.mean(), var.sum(), zq)
  assert abs(q.mean() / var.sum() - 1) < 0.15


@pytest.fixture
def matches_theory():
  """`_assert_matches_theory`: the sketch tests' check of unbiasedness and variance."""
  return _assert_matches_theory
