"""The README's install and test commands, pyproject.toml and .ci/run agree."""

import os
import re

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
  with open(os.path.join(_ROOT, *path), encoding="utf-8") as f:
    return f.read()


def _two_commands() -> list[str]:
  section = _read("README.md").split("## Two commands", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_the_test_extra_and_the_test_group_list_the_same_requirements():
  tomllib = pytest.importorskip("tomllib")
  meta = tomllib.loads(_read("pyproject.toml"))
  assert meta["project"]["optional-dependencies"]["test"] == meta["dependency-groups"]["test"]


def test_ci_runs_the_readme_commands():
  first, test = _two_commands()
  assert first.startswith('pip install ".[demo]" && ')
  # The test command installs the package itself, so it works alone on a fresh machine.
  assert test.startswith('pip install ".[test]" && pytest'), test
  assert "-n " in test
  ci = [line.strip() for line in _read(".ci", "run").splitlines()]
  assert test in ci, f".ci/run does not run the README's test command {test!r}"


def test_optax_is_needed_by_the_demo_alone():
  tomllib = pytest.importorskip("tomllib")
  meta = tomllib.loads(_read("pyproject.toml"))
  assert not any(d.startswith("optax") for d in meta["project"]["dependencies"])
  for extra in ("demo", "test", "examples"):
    assert any(d.startswith("optax") for d in meta["project"]["optional-dependencies"][extra])
  # The library imports it nowhere but in the main job.
  package = os.path.join(_ROOT, "fewbit_jax")
  importers = sorted(os.path.relpath(os.path.join(d, f), _ROOT)
                     for d, _, files in os.walk(package) for f in files if f.endswith(".py")
                     and re.search(r"^\s*(import optax|from optax)", _read(d, f), re.M))
  assert importers == [os.path.join("fewbit_jax", "demo.py")], importers


def test_readme_names_the_group_install_that_skips_the_rebuild():
  section = _read("README.md").split("## Two commands", 1)[1].split("\n## ", 1)[0]
  assert "pip install --group test" in section
