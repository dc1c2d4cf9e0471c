"""Helpers shared by the examples: memory of a jitted step, smoothing, plots."""

from __future__ import annotations

import os

import jax
import numpy as np

from fewbit_jax import memory

FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")


def child_pythonpath(root: str) -> str:
  """PYTHONPATH for a ``python -P`` child process that imports what this one does.

  The fewbit_jax this process imported (an installed one, with its compiled
  kernels) comes first, then `root` (for ``benchmarks`` and ``examples``),
  then the inherited PYTHONPATH. ``-P`` keeps ``-c`` / ``-m`` from putting
  the working directory, a source checkout without kernels, in front.
  """
  import fewbit_jax
  package_parent = os.path.dirname(os.path.dirname(os.path.abspath(fewbit_jax.__file__)))
  inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  return os.pathsep.join(dict.fromkeys([package_parent, root, *inherited]))


def compile_with_memory(jitted, *args):
  """Compiles `jitted` for `args`; returns (executable, bytes of memory).

  Memory is argument + output - alias + temp bytes of XLA's compiled memory
  analysis. `args` may be arrays or ``jax.ShapeDtypeStruct``s. Train with
  the returned executable so the step is compiled only once.
  """
  compiled = jitted.lower(*args).compile()
  return compiled, memory.CompiledMemory.of(compiled).total


def smooth(values, window: int) -> np.ndarray:
  """Moving average over `window` points (shorter at the start)."""
  v = np.asarray(values, np.float64)
  if window <= 1 or len(v) == 0:
    return v
  c = np.cumsum(np.insert(v, 0, 0.0))
  idx = np.arange(1, len(v) + 1)
  lo = np.maximum(0, idx - window)
  return (c[idx] - c[lo]) / (idx - lo)


def plot_curves(curves: dict, path: str, *, title: str, ylabel: str, xlabel: str = "step",
                window: int = 1, second: dict | None = None, second_label: str = "",
                second_x: dict | None = None, logy: bool = False) -> str:
  """Plots one line per variant (and an optional second panel) to a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ncols = 2 if second else 1
  fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.6), dpi=100)
  axes = np.atleast_1d(axes)
  for name, ys in curves.items():
    axes[0].plot(smooth(ys, window), label=name, linewidth=1.2)
  axes[0].set(title=title, xlabel=xlabel, ylabel=ylabel)
  if logy:
    axes[0].set_yscale("log")
  axes[0].grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  if second:
    for name, ys in second.items():
      xs = (second_x or {}).get(name, np.arange(1, len(ys) + 1))
      axes[1].plot(xs, ys, label=name, linewidth=1.2, marker=".")
    axes[1].set(title=second_label, xlabel=xlabel, ylabel=second_label)
    axes[1].grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path
