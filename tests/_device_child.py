"""The one child process that runs every `on_8_devices` script of a test session.

Started by tests/conftest.py as ``python -P tests/_device_child.py`` with 8
simulated CPU devices (the device count is fixed when JAX starts). It reads
one JSON request a line from stdin, ``{"script", "args", "cwd", "env"}``,
runs the script as ``python -c script *args`` would (``__name__ ==
"__main__"``, ``sys.argv[1:] == args``, in `cwd`, with `env` added to the
environment), and answers one JSON line, ``{"ok", "stdout", "error"}``, on
the stdout it was started with. Importing JAX and compiling what several
scripts share then happens once per session instead of once per script.

Between scripts it restores the working directory, the environment,
``sys.path``, the kernel path setting (``fewbit_jax.ext`` mode) and drops the
modules a script imported from the tests directory, so that a script sees the
state a fresh child would (JAX's compilation caches aside).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
import traceback

_TESTS = os.path.dirname(os.path.abspath(__file__))


def _run(request: dict) -> dict:
  from fewbit_jax import ext
  cwd, path, argv, mode = os.getcwd(), list(sys.path), sys.argv, ext.get_mode()
  modules = set(sys.modules)
  old_env = {k: os.environ.get(k) for k in request["env"]}
  out = io.StringIO()
  try:
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["-c", *request["args"]]
    code = compile(request["script"], "<on_8_devices script>", "exec")
    with contextlib.redirect_stdout(out):
      try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # pylint: disable=exec-used
      except SystemExit as e:
        if e.code not in (None, 0):
          raise
    return {"ok": True, "stdout": out.getvalue(), "error": ""}
  except BaseException:  # pylint: disable=broad-except
    return {"ok": False, "stdout": out.getvalue(), "error": traceback.format_exc()}
  finally:
    os.chdir(cwd)
    sys.path[:], sys.argv = path, argv
    for k, v in old_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    for name in set(sys.modules) - modules:
      f = getattr(sys.modules[name], "__file__", None) or ""
      if os.path.abspath(f).startswith(_TESTS + os.sep):
        del sys.modules[name]
    ext.set_mode(mode)
    gc.collect()


def main() -> None:
  # Answers go to the stdout this process was started with; anything else
  # written to file descriptor 1 (by C++ or a stray print) goes to stderr.
  answers = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  sys.stdout = os.fdopen(1, "w", buffering=1)
  import jax
  import fewbit_jax  # pylint: disable=unused-import
  assert jax.device_count() == 8, jax.devices()
  for line in sys.stdin:
    if not line.strip():
      continue
    answers.write(json.dumps(_run(json.loads(line))) + "\n")
    answers.flush()


if __name__ == "__main__":
  main()
