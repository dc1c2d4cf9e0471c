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


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


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


def _on_8_devices(script: str, *args: str, timeout: int = 900, cwd: str | None = _ROOT,
                  **extra_env: str):
  """The JSON that a child with 8 simulated CPU devices printed last.

  Runs ``python -P -c script *args`` with 8 CPU devices (the
  device count is fixed when JAX starts) and `extra_env`; fails the test
  with the child's stderr unless it exits 0.
  """
  import json
  import subprocess
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env = _child_env(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", **extra_env)
  proc = subprocess.run([sys.executable, "-P", "-c", script, *args], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def on_8_devices():
  """`on_8_devices(script, *args, timeout=, cwd=, **env)`: the JSON a child with 8 devices prints last."""
  return _on_8_devices
