"""Command line: ``python -m fewbit_jax {tables,errors,bench,info}``.

- ``tables``: recompute the built-in optimal tables into fewbit_jax/data/tables.json.
- ``errors``: print the relative RMS gradient error of every continuous
  activation for bits 1..8 under x ~ N(0, 1) and N(0, 4).
- ``bench``: the small default memory/time demonstration.
- ``info``: versions, the compiled kernels, and the path (kernel or pure JAX)
  each op takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _cmd_tables(args) -> int:
  from fewbit_jax import tables
  t0 = time.time()
  data = tables.build_builtin_tables(range(1, args.max_bits + 1), cells=args.cells,
                                     progress=lambda k: print(f"  {k}", file=sys.stderr, flush=True))
  with open(args.out, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
  print(f"wrote {len(data)} tables x {args.max_bits} bit widths to {args.out} "
        f"in {time.time() - t0:.0f}s")
  return 0


def error_table(bits_list=range(1, 9), sigmas=(1.0, 2.0)) -> list[tuple[str, int, tuple[float, ...]]]:
  """Rows (table key, bits, relative RMS error under each N(0, sigma**2))."""
  from fewbit_jax import tables
  rows = []
  for name in sorted(tables.FORWARDS):
    for params in tables.BUILTIN_PARAMS[name]:
      deriv = tables.builtin_derivative(name, **params)
      for b in bits_list:
        t = tables.table(name, b, **params)
        rows.append((t.name, b, tuple(tables.relative_error(t, deriv, s) for s in sigmas)))
  return rows


def _cmd_errors(args) -> int:
  bits = list(range(1, args.max_bits + 1))
  rows = error_table(bits)
  by_name: dict[str, dict[int, tuple[float, float]]] = {}
  for key, b, errs in rows:
    by_name.setdefault(key, {})[b] = errs
  head = "| activation | x ~ | " + " | ".join(f"{b} bit" for b in bits) + " |"
  print("Relative RMS gradient error sqrt(E[(f'(x)-q(x))^2] / E[f'(x)^2])")
  print()
  print(head)
  print("|" + "---|" * (len(bits) + 2))
  for key, errs in by_name.items():
    for i, label in enumerate(("N(0,1)", "N(0,4)")):
      cells = " | ".join(f"{errs[b][i]:.4f}" for b in bits)
      print(f"| {key if i == 0 else ''} | {label} | {cells} |")
  return 0


def info_lines() -> list[str]:
  """What ``info`` prints: versions, the kernels, and the path of each op."""
  import jax
  import fewbit_jax as fb
  from fewbit_jax import ext
  backend = jax.default_backend()
  lines = [f"fewbit_jax {fb.__version__}, jax {jax.__version__}, backend {backend}",
           f"compiled kernels: {'available' if ext.available() else 'not available'}; "
           f"platforms {list(ext.platforms())}; mode {ext.get_mode()} (FEWBIT_JAX_FFI)",
           f"path of each op on {backend} (the default is measured: "
           "python -m benchmarks.bench_paths):"]
  lines += [f"  {op:<20} {ext.active_path(op=op)}" for op in ext.OPS]
  return lines


def _cmd_info(args) -> int:
  del args
  print("\n".join(info_lines()))
  return 0


def _cmd_bench(args) -> int:
  from fewbit_jax import demo
  return demo.main(args)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fewbit_jax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("tables", help="recompute the built-in tables")
  p.add_argument("--out", default=None, help="output JSON (default: the package's tables.json)")
  p.add_argument("--max-bits", type=int, default=8)
  p.add_argument("--cells", type=int, default=4096)
  p.set_defaults(func=_cmd_tables)
  p = sub.add_parser("errors", help="print the gradient error table")
  p.add_argument("--max-bits", type=int, default=8)
  p.set_defaults(func=_cmd_errors)
  p = sub.add_parser("info", help="versions and active kernel path")
  p.set_defaults(func=_cmd_info)
  p = sub.add_parser("bench", help="the small memory/time demonstration")
  p.add_argument("--full", action="store_true", help="the full-size configuration")
  p.set_defaults(func=_cmd_bench)
  args = parser.parse_args(argv)
  if getattr(args, "out", "") is None:
    from fewbit_jax.tables import TABLES_PATH
    args.out = TABLES_PATH
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
