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
