"""Which residuals the backward of the RoBERTa step keeps, by op and module.

For each array the forward pass hands to the backward pass (a residual), the
report gives its shape, its bytes, the op and module that produced it, and
the modules whose backward reads it (the *keepers*: an array stays alive
while any of them still needs it). This is what explains the memory table:
a randomized dense stops keeping its input, but the memory only goes if no
other module keeps the same array, or an array of the same size, as well.

The list comes from JAX's jaxpr of the vjp (what ``jax.ad_checkpoint.
print_saved_residuals`` prints), before XLA; the compiled step can keep a
little more (copies for layouts) or less (fused broadcasts).

Usage (from the repository root):
  python -m benchmarks.residuals                          # vanilla
  python -m benchmarks.residuals "randomized dense 20%" --compare vanilla
  python -m benchmarks.residuals "3-bit GELU" --min-mib 0
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
from typing import Callable

import jax
import numpy as np
import optax
from jax._src import core, source_info_util

from benchmarks import memory_table, roberta

MiB = 2.0 ** 20


@dataclasses.dataclass(frozen=True)
class Residual:
  """One array saved for the backward pass."""
  shape: tuple[int, ...]
  dtype: str
  nbytes: int
  producer: str  # primitive name, "argument" or "literal"
  module: str  # module path of the producer ("" for arguments)
  source: str  # file:line of the producer
  keepers: tuple[str, ...]  # module paths whose backward reads it

  @property
  def kind(self) -> str:
    return f"{self.dtype}[{','.join(map(str, self.shape))}]"


def _module_path(name_stack) -> str:
  """'transpose(jvp(RobertaClassifier))/layer_0/attention' -> 'layer_0/attention'."""
  parts = str(name_stack).split("/")
  return "/".join(p for p in parts[1:] if "(" not in p) if parts else ""


def _nbytes(aval) -> int:
  if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):  # typed keys: their key data
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(aval.shape, aval.dtype))
    return int(np.prod(data.shape, dtype=np.int64)) * np.dtype(data.dtype).itemsize
  return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def saved_residuals(f: Callable, *args) -> list[Residual]:
  """The residuals of ``jax.vjp(f, *args)``, with their producers and keepers.

  Args:
    f: a function of arrays (concrete or ``jax.ShapeDtypeStruct``) to one output.
    *args: its arguments (pytrees).

  Returns:
    One Residual per distinct saved array, largest first.
  """
  leaves, tree = jax.tree.flatten(args)
  flat = lambda *xs: f(*jax.tree.unflatten(tree, xs))
  closed, shapes = jax.make_jaxpr(lambda *xs: jax.vjp(flat, *xs), return_shape=True)(*leaves)
  out_shape, vjp_shape = shapes
  n_res = len(jax.tree.leaves(vjp_shape))
  fwd = closed.jaxpr
  res_vars = fwd.outvars[len(fwd.outvars) - n_res:]

  # Who reads each residual in the backward pass.
  _, vjp_tree = jax.tree.flatten(vjp_shape)
  res_avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in res_vars]

  def backward(res, ct):
    return jax.tree.unflatten(vjp_tree, res)(ct)

  bwd = jax.make_jaxpr(backward)(res_avals, jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), out_shape)).jaxpr
  keepers = collections.defaultdict(set)
  bwd_in = bwd.invars[:n_res]
  for eqn in bwd.eqns:
    for v in eqn.invars:
      if not isinstance(v, core.Literal) and v in bwd_in:
        keepers[bwd_in.index(v)].add(_module_path(eqn.source_info.name_stack) or "(top)")

  producers = {}
  for eqn in fwd.eqns:
    for v in eqn.outvars:
      producers[v] = eqn
  arg_names = list(range(len(fwd.invars)))
  out, seen = [], {}
  for i, v in enumerate(res_vars):
    if isinstance(v, core.Literal):
      continue
    if v in seen:  # the same array saved twice is kept once
      keepers[seen[v]] |= keepers[i]
      continue
    seen[v] = i
  for v, i in seen.items():
    eqn = producers.get(v)
    if eqn is None:
      producer, module, src = "argument", "", f"argument {arg_names[fwd.invars.index(v)]}" \
          if v in fwd.invars else "constant"
    else:
      producer = eqn.primitive.name
      if producer in ("jit", "pjit"):
        producer = f"jit:{eqn.params.get('name', '?')}"
      module = _module_path(eqn.source_info.name_stack)
      src = source_info_util.summarize(eqn.source_info)
      src = re.sub(r"^.*/(?=[^/]+\.py)", "", src)
    out.append(Residual(tuple(v.aval.shape), str(v.aval.dtype), _nbytes(v.aval), producer,
                        module, src, tuple(sorted(keepers[i]))))
  return sorted(out, key=lambda r: -r.nbytes)


def step_residuals(row: memory_table.Row, cfg: roberta.RobertaConfig, batch: int,
                   seq: int) -> list[Residual]:
  """The residuals of the loss of a memory-table row's training step."""
  model, _ = memory_table.build(row, cfg)
  params, _ = roberta.init_shapes(model, optax.adamw(1e-3))

  def loss(params, data, key):
    k_drop, k_sketch = jax.random.split(key)
    logits = model.apply({"params": params}, data["input_ids"], data["attention_mask"],
                         deterministic=False, rngs={"dropout": k_drop, "sketch": k_sketch})
    return optax.softmax_cross_entropy_with_integer_labels(logits, data["labels"]).mean()

  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  return saved_residuals(loss, params, roberta.batch_shapes(batch, seq), key)


def _layer_of(module: str) -> str:
  m = re.match(r"layer_(\d+)", module)
  return f"layer_{m.group(1)}" if m else "outside layers"


def format_report(res: list[Residual], min_mib: float, layer: str | None = None) -> str:
  """A Markdown table of the residuals of one layer (or all), largest first."""
  rows = [r for r in res if r.nbytes >= min_mib * MiB and r.producer != "argument"
          and (layer is None or _layer_of(r.module) == layer)]
  lines = ["| array | MiB | made by | in module | kept for the backward of |",
           "|---|---|---|---|---|"]
  for r in rows:
    keep = ", ".join(k.replace(f"{layer}/", "") if layer else k for k in r.keepers)
    keep = keep or "nobody (dead: XLA drops it)"
    mod = (r.module.replace(f"{layer}/", "").replace(layer, ".") if layer else r.module) or "."
    lines.append(f"| {r.kind} | {r.nbytes / MiB:.1f} | {r.producer} | {mod} | {keep} |")
  return "\n".join(lines)


def totals(res: list[Residual]) -> dict[str, int]:
  """Bytes of live residuals per layer ('outside layers': embeddings and head).

  Residuals that no backward op reads (zeros that JAX's partial evaluation
  saves for a select) are left out: XLA removes them.
  """
  out = collections.Counter()
  for r in res:
    if r.producer != "argument" and r.keepers:
      out[_layer_of(r.module)] += r.nbytes
  return dict(out)


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
    big = sum(1 for r in results[n]
              if _layer_of(r.module) == layer and r.nbytes >= MiB and r.keepers)
    print(f"| {n} | {t.get(layer, 0) / MiB:.0f} | {t.get('outside layers', 0) / MiB:.0f} "
          f"| {big} |")


if __name__ == "__main__":
  main()
