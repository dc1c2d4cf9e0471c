"""Each continuous activation's derivative against its 1-4 bit approximations.

The few-bit backward replaces ``f'(x)`` by a step function with ``2**bits``
levels, ``levels[searchsorted(borders, x)]``, chosen to minimise the squared
error weighted by a standard normal density of x. This draws those step
functions, read from ``fewbit_jax.tables.table(name, bits)``, over the true
derivative, one panel per activation (the original FewBit's
``activations.svg``, from our tables).

Usage (from the repository root):
  python -m examples.plot_activations            # examples/figures/activations.png
  python -m examples.plot_activations --bits 1,3 --out /tmp/act.png
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

from examples import _common


def curves(name: str, bits_list, x: np.ndarray) -> dict:
  """The derivative and each bit width's step function of `name` on `x`."""
  from fewbit_jax import tables
  out = {"derivative": np.asarray(tables.builtin_derivative(name)(np.asarray(x, np.float32)))}
  for b in bits_list:
    t = tables.table(name, b)
    out[b] = t.levels[np.searchsorted(t.borders, x, side="left")]
  return out


def plot(path: str, bits_list=(1, 2, 3, 4), names=None, xlim: float = 4.0) -> str:
  """Draws every continuous activation's panel to `path` (PNG)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from fewbit_jax import tables

  names = list(names or tables.FORWARDS)
  x = np.linspace(-xlim, xlim, 1601)
  cols = 4
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.3 * rows), dpi=72,
                           sharex=True)
  colors = plt.get_cmap("viridis")(np.linspace(0.05, 0.85, len(bits_list)))
  for ax, name in zip(axes.flat, names):
    c = curves(name, bits_list, x)
    for b, color in zip(bits_list, colors):
      ax.step(x, c[b], where="post", color=color, linewidth=1.0, label=f"{b} bit")
    ax.plot(x, c["derivative"], color="black", linewidth=1.1, linestyle="--", label="f'(x)")
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower right", fontsize=9, ncol=1,
             bbox_to_anchor=(0.98, 0.03))
  fig.suptitle("Derivatives and their few-bit approximations (fewbit_jax.tables)", fontsize=11)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("Usage")[1])
  p.add_argument("--bits", default="1,2,3,4", help="comma-separated bit widths")
  p.add_argument("--names", help="comma-separated activations (default: all continuous)")
  p.add_argument("--out", default=os.path.join(_common.FIGURES, "activations.png"))
  args = p.parse_args(argv)
  bits = [int(b) for b in args.bits.split(",")]
  names = args.names.split(",") if args.names else None
  path = plot(args.out, bits, names)
  print(f"{path} ({os.path.getsize(path) / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
