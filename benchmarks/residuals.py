"""Which residuals the backward of the RoBERTa step keeps, by op and module.

For each array the forward pass hands to the backward pass (a residual), the
report gives its shape, its bytes, the op and module that produced it, and
the modules whose backward reads it (the *keepers*: an array stays alive
while any of them still needs it). This is what explains the memory table:
a randomized dense stops keeping its input, but the memory only goes if no
other module keeps the same array, or an array of the same size, as well.

The list is ``fewbit_jax.memory.residual_keepers`` of the step's loss (from
JAX's jaxpr of the vjp, before XLA); the compiled step can keep a little
more (copies for layouts) or less (fused broadcasts).

Usage (from the repository root):
  python -m benchmarks.residuals                          # vanilla
  python -m benchmarks.residuals "randomized dense 20%" --compare vanilla
  python -m benchmarks.residuals "3-bit GELU" --min-mib 0
"""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks import memory_table, roberta
from benchmarks.memory_table import layer_of, step_residuals, totals
from fewbit_jax import memory

__all__ = ["step_residuals", "totals", "format_report", "main"]

MiB = 2.0 ** 20


def _kind(r: memory.Residual) -> str:
  return f"{r.dtype}[{','.join(map(str, r.shape))}]"


def format_report(res: memory.ResidualReport, min_mib: float, layer: str | None = None) -> str:
  """A Markdown table of the residuals of one layer (or all), largest first."""
  rows = [r for r in res.residuals if r.nbytes >= min_mib * MiB and r.kind != "argument"
          and (layer is None or layer_of(r.scope) == layer)]
  lines = ["| array | MiB | made by | in module | kept for the backward of |",
           "|---|---|---|---|---|"]
  for r in rows:
    keep = ", ".join(k.replace(f"{layer}/", "") if layer else k for k in r.keepers)
    keep = keep or "nobody (dead: XLA drops it)"
    mod = (r.scope.replace(f"{layer}/", "").replace(layer, ".") if layer else r.scope) or "."
    lines.append(f"| {_kind(r)} | {r.nbytes / MiB:.1f} | {r.origin} | {mod} | {keep} |")
  return "\n".join(lines)


def _row(name: str) -> memory_table.Row:
  for r in memory_table.ROWS:
    if r.name == name:
      return r
  raise SystemExit(f"unknown row {name!r}; one of {[r.name for r in memory_table.ROWS]}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("Usage")[1])
  p.add_argument("row", nargs="?", default="vanilla", help="a memory_table row name")
  p.add_argument("--compare", help="another row to total against")
  p.add_argument("--layers", type=int, default=2,
                 help="encoder layers (>= 2: the first is reported, as a middle layer)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--min-mib", type=float, default=1.0, help="hide smaller arrays")
  p.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests)")
  args = p.parse_args(argv)
  base = roberta.RobertaConfig.tiny() if args.tiny else roberta.RobertaConfig.base()
  cfg = dataclasses.replace(base, num_layers=args.layers)
  layer = "layer_0"  # its output feeds the next layer, as a middle layer's does

  names = [args.row] + ([args.compare] if args.compare else [])
  results = {n: step_residuals(_row(n), cfg, args.batch, args.seq) for n in names}
  for n in names:
    res = results[n]
    print(f"\n## {n}: residuals of one encoder layer ({layer}), batch {args.batch} x "
          f"{args.seq}, arrays >= {args.min_mib:g} MiB\n")
    print(format_report(res, args.min_mib, layer))
  print("\n| configuration | residual MiB per layer | outside layers | arrays >= 1 MiB per layer |")
  print("|---|---|---|---|")
  for n in names:
    t = totals(results[n])
    big = sum(1 for r in results[n].residuals
              if layer_of(r.scope) == layer and r.nbytes >= MiB and r.keepers)
    print(f"| {n} | {t.get(layer, 0) / MiB:.0f} | {t.get('outside layers', 0) / MiB:.0f} "
          f"| {big} |")


if __name__ == "__main__":
  main()
