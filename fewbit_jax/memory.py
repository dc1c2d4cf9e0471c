"""Seeing the saving: what the backward pass keeps, and what XLA allocates.

Two reports, each printable (``print(report)``) and a plain dict
(``report.as_dict()``):

* `saved_residuals` lists the arrays the forward pass hands to the backward
  pass of ``jax.vjp(f, *args)`` (the *residuals*), from JAX's jaxpr before
  XLA, with their bytes by dtype and by source: an argument of `f` (kept
  anyway), a named array (``checkpoint_name``: few-bit codes are
  ``'fewbit_codes'``, randomized dense sketches ``'randomized_dense_sketch'``)
  or the output of an operation (``mul``, ``exp``, ``dot_general``, ...) at a
  source line. This wraps ``jax.ad_checkpoint.print_saved_residuals``: the
  same arrays, as data, each array once even when the jaxpr lists it twice,
  and looking through ``jax.jit`` boundaries to the operation that made it.
* `compiled` is XLA's compiled memory analysis of a jitted function:
  argument, output, alias (outputs that reuse donated arguments), temp
  (everything else live at some point, activations and residuals included)
  and ``total = argument + output - alias + temp``. On CPU it is exact and
  needs no run; ``peak_memory_in_bytes`` is reported as XLA gives it, but on
  CPU it excludes temps, so compare ``temp`` and ``total``.
  `CompiledMemory.of` reads the same from an executable compiled elsewhere,
  and `compiler_options` gives the XLA options the benchmarks compile with:
  ``KEEP_REMAT`` (the CPU's CSE barrier pass off, so that a remat's
  recomputation is not merged back) and ``MEMORY_ONLY`` (LLVM's lowest
  optimisation level: the same buffers, compiled faster, for memory alone).
* `collectives` counts the collective operations (and their bytes) in a
  compiled program, `residual_keepers` says which modules' backward reads
  each residual.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import fewbit_jax as fb
  >>> from fewbit_jax import memory
  >>> w, x = jnp.ones((64, 64)), jnp.ones((32, 64))
  >>> vanilla = memory.saved_residuals(lambda w: jax.nn.gelu(x @ w).sum(), w)
  >>> fewbit = memory.saved_residuals(lambda w: fb.gelu(x @ w, bits=3).sum(), w)
  >>> fewbit.saved_bytes < vanilla.saved_bytes
  True
  >>> fewbit.by_source()["named 'fewbit_codes'"]     # 3 bits per element
  768
  >>> memory.compiled(jax.grad(lambda w: jnp.tanh(x @ w).sum()), w).argument
  16384
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import os
import re
import tempfile
from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as _jex_core
from jax.extend import source_info_util as _source_info

__all__ = ["Residual", "ResidualReport", "saved_residuals", "residual_keepers", "CompiledMemory",
           "compiled", "compiler_options", "KEEP_REMAT", "MEMORY_ONLY", "collectives",
           "COLLECTIVES", "format_bytes", "PeakBuffers", "peak_buffers"]

# XLA options for one compile (``.compile(compiler_options)``, or `compiled`'s
# `compiler_options`): on the CPU, XLA's ``cse_barrier_expander`` pass merges
# every ``jax.checkpoint`` recomputation back into the forward pass, so a
# remat'ed step measures as the plain one unless the pass is off (the flag
# ``XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander`` does the same
# for a whole process). GPUs keep the recomputation without it.
KEEP_REMAT = {"xla_disable_hlo_passes": "cse_barrier_expander"}
# LLVM's lowest optimisation level: XLA assigns the same buffers (the same
# memory analysis) and compiles faster; for programs measured, not timed.
MEMORY_ONLY = {"xla_backend_optimization_level": 0}
# The collective operations `collectives` counts, as HLO names them.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def format_bytes(n: float) -> str:
  """``1536 -> '1.5 KiB'``: bytes in binary units, 3 significant digits.

  Example:
    >>> from fewbit_jax.memory import format_bytes
    >>> format_bytes(512), format_bytes(3 * 2**20), format_bytes(-2048)
    ('512 B', '3.00 MiB', '-2.00 KiB')
  """
  sign, n = ("-" if n < 0 else ""), abs(float(n))
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.3g} {unit}" if n >= 100 \
          else f"{sign}{n:.2f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


# --------------------------------------------------------------------------
# Residuals.


# Residual kinds that are alive whether or not the backward keeps them.
_INPUT_KINDS = ("argument", "constant", "literal")


@dataclasses.dataclass(frozen=True)
class Residual:
  """One array kept from the forward pass for the backward pass.

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import memory
    >>> r = memory.saved_residuals(lambda x: jnp.sin(x).sum(), jnp.ones(8)).residuals[0]
    >>> r.shape, r.dtype, r.nbytes, r.origin          # cos(x), for sin's derivative
    ((8,), 'float32', 32, 'op cos')
  """
  shape: tuple[int, ...]
  dtype: str
  nbytes: int
  kind: str  # 'argument', 'named', 'op', 'literal' or 'constant'
  label: str  # argument name, checkpoint name, or primitive name
  source: str  # 'file.py:line (function)' of the operation, '' for arguments
  scope: str  # JAX name stack of the operation (module path under Flax)
  count: int = 1  # times the jaxpr lists this array as a residual
  keepers: tuple[str, ...] = ()  # scopes whose backward reads it (`residual_keepers` only)

  @property
  def origin(self) -> str:
    """The key of `ResidualReport.by_source`: 'argument', "named 'x'" or 'op mul'."""
    if self.kind == "named":
      return f"named {self.label!r}"
    if self.kind == "op":
      return f"op {self.label}"
    return self.kind

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ResidualReport:
  """The residuals of ``jax.vjp(f, *args)``, largest first, and their totals.

  Attributes:
    residuals: one `Residual` per distinct array.
    total_bytes: bytes of all of them.
    input_bytes: bytes of those that are arguments of f (parameters,
      inputs) or arrays it closes over (kinds 'argument', 'constant' and
      'literal'): alive anyway, so they cost the backward nothing extra.
    saved_bytes: ``total_bytes - input_bytes``, what the backward adds.

  Example:
    >>> import jax.numpy as jnp
    >>> from fewbit_jax import memory
    >>> rep = memory.saved_residuals(lambda w, x: jnp.tanh(x @ w).sum(),
    ...                              jnp.ones((4, 4)), jnp.ones((2, 4)))
    >>> rep.input_bytes, rep.saved_bytes      # w and x are arguments, kept anyway
    (96, 64)
    >>> sorted(rep.as_dict()["by_source"].items())  # tanh(x @ w) and 1 - tanh(x @ w)**2
    [('op sub', 32), ('op tanh', 32)]
  """
  residuals: tuple[Residual, ...]

  @property
  def total_bytes(self) -> int:
    return sum(r.nbytes for r in self.residuals)

  @property
  def input_bytes(self) -> int:
    return sum(r.nbytes for r in self.residuals if r.kind in _INPUT_KINDS)

  @property
  def saved_bytes(self) -> int:
    return self.total_bytes - self.input_bytes

  def by_dtype(self, include_inputs: bool = False) -> dict[str, int]:
    """Bytes per dtype, largest first (arguments and constants left out unless asked)."""
    out = collections.Counter()
    for r in self.residuals:
      if include_inputs or r.kind not in _INPUT_KINDS:
        out[r.dtype] += r.nbytes
    return dict(out.most_common())

  def by_source(self, include_inputs: bool = False) -> dict[str, int]:
    """Bytes per origin (``"named 'fewbit_codes'"``, ``'op mul'``, ...), largest first.

    Arguments and constants are left out unless asked.
    """
    out = collections.Counter()
    for r in self.residuals:
      if include_inputs or r.kind not in _INPUT_KINDS:
        out[r.origin] += r.nbytes
    return dict(out.most_common())

  def named_bytes(self, name: str) -> int:
    """Bytes of the residuals named `name` with ``checkpoint_name``."""
    return sum(r.nbytes for r in self.residuals if r.kind == "named" and r.label == name)

  def as_dict(self) -> dict[str, Any]:
    """Totals, breakdowns and every residual, as plain Python values."""
    return dict(total_bytes=self.total_bytes, input_bytes=self.input_bytes,
                saved_bytes=self.saved_bytes, by_dtype=self.by_dtype(),
                by_source=self.by_source(), residuals=[r.as_dict() for r in self.residuals])

  def __str__(self) -> str:
    lines = [f"residuals kept for the backward pass: {format_bytes(self.saved_bytes)} "
             f"(+ {format_bytes(self.input_bytes)} of arguments and constants, alive anyway)"]
    lines.append("  by dtype:  " + ", ".join(f"{k} {format_bytes(v)}"
                                             for k, v in self.by_dtype().items()))
    lines.append("  by source: " + ", ".join(f"{k} {format_bytes(v)}"
                                             for k, v in self.by_source().items()))
    for r in self.residuals:
      shape = f"{r.dtype}[{','.join(map(str, r.shape))}]"
      what = r.origin if r.kind != "argument" else f"argument {r.label}"
      where = f"  {r.source}" if r.source else ""
      times = f" (x{r.count})" if r.count > 1 else ""
      lines.append(f"  {format_bytes(r.nbytes):>10}  {shape:<24} {what}{times}{where}")
    return "\n".join(lines)


def _nbytes(aval) -> int:
  if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):  # typed keys: their key data
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(aval.shape, aval.dtype))
    return int(np.prod(data.shape, dtype=np.int64)) * np.dtype(data.dtype).itemsize
  return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _summarize(source_info) -> str:
  src = _source_info.summarize(source_info)
  return src.replace(os.getcwd() + os.sep, "")


def _scope(source_info) -> str:
  parts = str(source_info.name_stack).split("/")
  return "/".join(p for p in parts if p and "(" not in p)


def _inner_jaxpr(eqn):
  j = eqn.params.get("jaxpr")
  if j is None:
    return None
  return getattr(j, "jaxpr", j)


# Calls whose outputs are their inner jaxpr's: jit, and jax.checkpoint's
# (``remat2``), whose forward under a policy hands out the arrays the policy
# saves (``checkpoint_name``'d ones included) as its outputs.
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint")


def _resolve(var, jaxpr, producers) -> tuple:
  """Who made `var` in `jaxpr`: ('input', i) for its i-th input, or
  (kind, label, source, scope), looking into jit and checkpoint calls."""
  while True:
    if isinstance(var, _jex_core.Literal):
      return "literal", "", "", ""
    if var in jaxpr.invars:
      return "input", jaxpr.invars.index(var)
    if var in jaxpr.constvars or var not in producers:
      return "constant", "", "", ""
    eqn = producers[var]
    name = eqn.primitive.name
    if name == "name":
      return "named", eqn.params["name"], _summarize(eqn.source_info), _scope(eqn.source_info)
    if name == "reduce_precision":  # as jax's report: look through it
      var = eqn.invars[0]
      continue
    inner = _inner_jaxpr(eqn) if name in _CALLS else None
    if inner is None:
      return "op", name, _summarize(eqn.source_info), _scope(eqn.source_info)
    found = _resolve(inner.outvars[eqn.outvars.index(var)], inner,
                     {v: e for e in inner.eqns for v in e.outvars})
    if found[0] != "input":  # inner scopes are relative to the call's
      kind, label, src, scope = found
      scope = "/".join(p for p in (_scope(eqn.source_info), scope) if p)
      return kind, label, src or _summarize(eqn.source_info), scope
    var = eqn.invars[found[1]]  # passed straight through: the caller's value


def saved_residuals(f: Callable, *args, **kwargs) -> ResidualReport:
  """What the backward pass of ``jax.vjp(f, *args, **kwargs)`` keeps.

  The same arrays as ``jax.ad_checkpoint.print_saved_residuals(f, *args)``,
  each once, with its bytes and origin, largest first. Computed from the
  jaxpr, before XLA: the compiled program can keep a little more (layout
  copies) or less (fused broadcasts, dead zeros); `compiled` gives XLA's
  totals. Call it on the un-jitted loss where you can; inside a ``jax.jit``
  the origin is still found by looking into the call.

  Args:
    f: a function of arrays (pytrees; concrete or ``jax.ShapeDtypeStruct``)
      to an output pytree. For an NNX model, pass ``nnx.split`` state and
      merge it inside f.
    *args, **kwargs: its arguments, all differentiated (non-float leaves are
      fine: they get no residuals of their own).

  Returns:
    A `ResidualReport`: ``print`` it, or use ``.saved_bytes``,
    ``.by_dtype()``, ``.by_source()``, ``.named_bytes(name)``,
    ``.as_dict()``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import memory
    >>> x = jnp.ones((16, 32))
    >>> rep = memory.saved_residuals(lambda x: jnp.exp(jnp.sin(x)).sum(), x)
    >>> rep.saved_bytes, rep.by_source()      # cos(x) and exp(sin(x))
    (4096, {'op cos': 2048, 'op exp': 2048})
    >>> print(rep)                            # doctest: +ELLIPSIS
    residuals kept for the backward pass: 4.00 KiB (+ 0 B of arguments and constants, alive anyway)
    ...
  """
  return _report(f, args, kwargs, keepers=False)


def residual_keepers(f: Callable, *args, **kwargs) -> ResidualReport:
  """`saved_residuals`, with each residual's `Residual.keepers` filled in.

  The keepers of a residual are the scopes (Flax module paths below the
  model, or ``jax.named_scope`` names below the outermost, as
  `Residual.scope`; ``'(top)'`` outside them) of the backward
  operations that read it: an array stays alive while any of them still
  needs it, so a layer that stops keeping its input saves memory only if no
  other keeper reads the same array. A residual that no operation reads has
  no keepers (XLA drops it). It traces the backward pass too, so it takes
  about twice as long as `saved_residuals`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import memory
    >>> def f(x):                  # as a Flax model's modules name their scopes
    ...   with jax.named_scope("model"):
    ...     with jax.named_scope("act"):
    ...       y = jnp.sin(x)
    ...     with jax.named_scope("square"):
    ...       return (y * y).sum()
    >>> rep = memory.residual_keepers(f, jnp.ones(4))
    >>> sorted((r.origin, r.scope, r.keepers) for r in rep.residuals)   # sin(x) kept for y * y
    [('op cos', 'act', ('act',)), ('op sin', 'act', ('square',))]
  """
  return _report(f, args, kwargs, keepers=True)


def _arg_names(f: Callable, args, kwargs) -> list[str]:
  """A label per array leaf of (args, kwargs): ``'x'``, ``"params['dense']['kernel']"``."""
  try:
    params = list(inspect.signature(f).parameters.values())
  except (TypeError, ValueError):  # no signature: labels by position
    params = []
  positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  var = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), "args")
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]:
    if path[0].idx == 0:
      i = path[1].idx
      head = positional[i] if i < len(positional) else f"{var}[{i - len(positional)}]"
    else:
      head = str(path[1].key)
    names.append(head + jax.tree_util.keystr(tuple(path[2:])))
  return names


def _keepers(vjp_shape, out_shape, res_vars) -> list[set]:
  """For each residual, the scopes of the backward operations that read it."""
  vjp_tree = jax.tree.structure(vjp_shape)
  res = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in res_vars]
  ct = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), out_shape)
  bwd = jax.make_jaxpr(lambda res, ct: jax.tree.unflatten(vjp_tree, res)(ct))(res, ct).jaxpr
  index = {v: i for i, v in enumerate(bwd.invars[:len(res_vars)])}
  out = [set() for _ in res_vars]
  for eqn in bwd.eqns:
    for v in eqn.invars:
      if not isinstance(v, _jex_core.Literal) and v in index:
        out[index[v]].add(_scope(eqn.source_info) or "(top)")
  return out


def _report(f: Callable, args, kwargs, keepers: bool) -> ResidualReport:
  leaves, tree = jax.tree.flatten((args, kwargs))
  names = _arg_names(f, args, kwargs)
  if len(names) != len(leaves):  # the names are only labels
    names = [f"#{i}" for i in range(len(leaves))]

  def flat(*xs):
    a, kw = jax.tree.unflatten(tree, xs)
    return f(*a, **kw)

  closed, (out_shape, vjp_shape) = jax.make_jaxpr(lambda *xs: jax.vjp(flat, *xs),
                                                  return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  n_res = jax.tree.structure(vjp_shape).num_leaves
  res_vars = jaxpr.outvars[len(jaxpr.outvars) - n_res:]
  producers = {v: e for e in jaxpr.eqns for v in e.outvars}

  read_by = _keepers(vjp_shape, out_shape, res_vars) if keepers else None
  counts: dict[Any, int] = collections.Counter()
  kept_by: dict[Any, set] = collections.defaultdict(set)
  order: list[Any] = []
  literals = []
  for i, v in enumerate(res_vars):
    if isinstance(v, _jex_core.Literal):
      literals.append(v)
      continue
    if v not in counts:
      order.append(v)
    counts[v] += 1
    if read_by is not None:
      kept_by[v] |= read_by[i]
  out = []
  for v in order + literals:
    found = _resolve(v, jaxpr, producers)
    kind, label, src, scope = (("argument", names[found[1]], "", "") if found[0] == "input"
                               else found)
    aval = v.aval
    literal = isinstance(v, _jex_core.Literal)
    out.append(Residual(tuple(int(d) for d in aval.shape), str(aval.dtype), _nbytes(aval),
                        kind, label, src, scope, 1 if literal else counts[v],
                        () if literal else tuple(sorted(kept_by[v]))))
  out.sort(key=lambda r: -r.nbytes)
  return ResidualReport(tuple(out))


# --------------------------------------------------------------------------
# Compiled memory.


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """XLA's memory analysis of one compiled function, in bytes.

  ``total = argument + output - alias + temp``: what the function needs at
  its peak if every temp were live at once (XLA's buffer assignment already
  reuses temps, so this is its planned high-water mark). Compare ``temp``
  between variants of a training step: residuals live there.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import memory
    >>> m = memory.compiled(lambda x: x + 1, jax.ShapeDtypeStruct((1024,), jnp.float32))
    >>> m.as_dict()["total"] == m.total == m.argument + m.output - m.alias + m.temp
    True
  """
  argument: int
  output: int
  alias: int
  temp: int
  generated_code: int
  peak: int | None  # XLA's peak_memory_in_bytes (on CPU it excludes temps)
  platform: str

  @classmethod
  def of(cls, executable) -> "CompiledMemory":
    """The memory of an executable compiled elsewhere (``jax.jit(f).lower(...).compile()``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fewbit_jax import memory
      >>> exe = jax.jit(jnp.sin).lower(jnp.ones(256)).compile(memory.MEMORY_ONLY)
      >>> memory.CompiledMemory.of(exe).argument
      1024
    """
    ma = executable.memory_analysis()
    if ma is None:
      raise RuntimeError("this backend gives no compiled memory analysis "
                         f"({jax.default_backend()}); use a CPU, GPU or TPU backend.")
    peak = getattr(ma, "peak_memory_in_bytes", None)
    try:
      platform = executable.runtime_executable().devices()[0].platform
    except Exception:  # an executable without devices: the default backend's
      platform = jax.default_backend()
    return cls(int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
               int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes),
               int(ma.generated_code_size_in_bytes), None if peak is None else int(peak),
               platform)

  @property
  def total(self) -> int:
    """``argument + output - alias + temp``."""
    return self.argument + self.output - self.alias + self.temp

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["total"] = self.total
    return d

  def __str__(self) -> str:
    parts = [f"{k} {format_bytes(getattr(self, k))}"
             for k in ("argument", "output", "alias", "temp")]
    return (f"compiled memory ({self.platform}): total {format_bytes(self.total)} = "
            + " + ".join(parts[:2]) + f" - {parts[2]} + {parts[3]}")


def compiler_options(*, keep_remat: bool = False, memory_only: bool = False) -> dict:
  """XLA options for one compile: `KEEP_REMAT`, `MEMORY_ONLY`, both or neither.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import memory
    >>> opts = memory.compiler_options(keep_remat=True, memory_only=True)
    >>> sorted(opts)
    ['xla_backend_optimization_level', 'xla_disable_hlo_passes']
    >>> f = jax.jit(jax.grad(lambda x: jax.checkpoint(jnp.sin)(x).sum()))
    >>> exe = f.lower(jnp.ones(8)).compile(opts)    # as jax takes them
    >>> memory.compiled(f, jnp.ones(8), compiler_options=opts).temp >= 0
    True
  """
  out = {}
  if keep_remat:
    out.update(KEEP_REMAT)
  if memory_only:
    out.update(MEMORY_ONLY)
  return out


def compiled(f: Callable, *args, compiler_options: dict | None = None,
             **kwargs) -> CompiledMemory:
  """XLA's compiled memory of ``jax.jit(f)(*args, **kwargs)``, without running it.

  Args:
    f: a function, or an already jitted one (``jax.jit(f, donate_argnums=...)``,
      ``nnx.jit(f)``: anything with ``.lower``), whose options are kept.
    *args, **kwargs: arrays or ``jax.ShapeDtypeStruct``s (pytrees).
    compiler_options: XLA options for this compile (`compiler_options`,
      `KEEP_REMAT`, `MEMORY_ONLY`); not passed to `f`.

  Returns:
    A `CompiledMemory`: ``print`` it, or use ``.temp``, ``.total``,
    ``.as_dict()``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import memory
    >>> x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    >>> m = memory.compiled(lambda x: jnp.sin(x) @ jnp.cos(x), x)
    >>> m.argument, m.output                   # 256 KiB in, 256 KiB out
    (262144, 262144)
    >>> m.total == m.argument + m.output - m.alias + m.temp
    True
  """
  lower = getattr(f, "lower", None)
  if lower is None:
    if not callable(f):
      raise TypeError(f"compiled needs a function; got {type(f).__name__}")
    lower = jax.jit(f).lower
  return CompiledMemory.of(lower(*args, **kwargs).compile(compiler_options))


@dataclasses.dataclass(frozen=True)
class PeakBuffers:
  """Buffers of one kind live at a compiled program's peak: `count` of them, `nbytes` in all.

  `kind` is the HLO type (``u32[128,12,128,128]``; ``tuple`` for a loop's
  state) and `op` the JAX name stack of the operation that made them, with
  numbered module names folded (``layer_3`` -> ``layer_N``), so the same
  array of every layer is one line.

  Example:
    >>> from fewbit_jax import memory
    >>> print(memory.PeakBuffers(3 << 20, 3, "f32[512,512]", "jit(f)/layer_N/add"))
      3.00 MiB    3 x f32[512,512]  jit(f)/layer_N/add
  """
  nbytes: int
  count: int
  kind: str
  op: str

  def __str__(self) -> str:
    return f"{format_bytes(self.nbytes):>10}  {self.count:3d} x {self.kind}  {self.op}"


def _peak_from_dump(directory: str) -> list[tuple[int, str, str]]:
  """(bytes, HLO type, op_name) of each buffer live at the peak, from XLA's dump in `directory`."""
  best: list[tuple[int, str, str]] = []
  for name in os.listdir(directory):
    if not name.endswith("-live-range.txt"):
      continue
    with open(os.path.join(directory, name)) as f:
      lines = f.read().split("\n")
    with open(os.path.join(directory, name.replace("-live-range", ""))) as f:
      hlo = f.read()
    defs = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\(|[^\s(]+)([^\n]*)$", hlo, re.M):
      op = re.search(r'op_name="([^"]*)"', m.group(3))
      defs[m.group(1)] = (m.group(2), op.group(1).replace("\\'", "'") if op else m.group(1))
    at = next((i for i, line in enumerate(lines) if "(peak):" in line), None)
    if at is None:
      continue
    live = []
    for line in lines[at + 1:]:
      m = re.match(r"^\s+(\S+?)\{[^}]*\}: (\d+) bytes", line)
      if not m:
        break
      kind, op = defs.get(m.group(1), ("?", m.group(1)))
      live.append((int(m.group(2)), "tuple" if kind == "(" else kind.split("{")[0], op))
    if sum(b for b, _, _ in live) > sum(b for b, _, _ in best):
      best = live
  return best


def peak_buffers(f: Callable, *args, compiler_options: dict | None = None,
                 top: int | None = 10, **kwargs) -> list[PeakBuffers]:
  """What ``jax.jit(f)(*args, **kwargs)`` holds at its memory peak, largest first.

  Compiles `f` once with XLA's buffer dump (``xla_dump_to``, a temporary
  directory) and reads the buffers its schedule holds live at the peak:
  parameters, temporaries and outputs, grouped by type and by the operation
  that made them. This names what `compiled`'s totals are made of, after
  XLA's buffer reuse and scheduling (`saved_residuals` names the residuals
  of the jaxpr, before them).

  Args:
    f: a function, an already jitted one, or a ``jax.stages.Lowered`` (then
      no `args`).
    *args, **kwargs: arrays or ``jax.ShapeDtypeStruct``s.
    compiler_options: more XLA options for this compile (`KEEP_REMAT`, ...).
    top: how many groups to return (None: all).

  Returns:
    `PeakBuffers`, the largest groups first.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import memory
    >>> x = jax.ShapeDtypeStruct((512, 512), jnp.float32)
    >>> top = memory.peak_buffers(lambda x: jnp.sin(x) @ jnp.cos(x), x, top=1)[0]
    >>> top.kind, top.nbytes                    # one 1 MiB array of these
    ('f32[512,512]', 1048576)
  """
  if isinstance(f, jax.stages.Lowered):
    lowered = f
  else:
    lowered = (getattr(f, "lower", None) or jax.jit(f).lower)(*args, **kwargs)
  with tempfile.TemporaryDirectory() as directory:
    options = dict(compiler_options or {}, xla_dump_to=directory, xla_dump_hlo_as_text=True)
    lowered.compile(options)
    live = _peak_from_dump(directory)
  groups: dict[tuple[str, str], list[int]] = {}
  for nbytes, kind, op in live:
    g = groups.setdefault((kind, re.sub(r"_\d+(?=/|\.|$)", "_N", op)), [0, 0])
    g[0] += nbytes
    g[1] += 1
  out = sorted((PeakBuffers(b, n, kind, op) for (kind, op), (b, n) in groups.items()),
               key=lambda p: -p.nbytes)
  return out if top is None else out[:top]


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}


def collectives(program) -> dict[str, tuple[int, int]]:
  """{op: (count, bytes)} of the collective operations in a compiled program.

  Args:
    program: an executable (``jax.jit(f).lower(...).compile()``) or its HLO
      text (``.as_text()``).

  Returns:
    For each of `COLLECTIVES`, how many the program runs and the bytes of
    their results (an asynchronous start/done pair counts once).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fewbit_jax import memory
    >>> exe = jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile()
    >>> memory.collectives(exe)["all-reduce"]    # one device: none
    (0, 0)
    >>> memory.collectives("%r = f32[8,4] all-reduce(f32[8,4] %x), to_apply=%add")["all-reduce"]
    (1, 128)
  """
  text = program if isinstance(program, str) else program.as_text()
  out = {op: [0, 0] for op in COLLECTIVES}
  pattern = re.compile(r"= (.*?) (%s)(-start)?\(" % "|".join(COLLECTIVES))
  for line in text.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    shapes = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
    nbytes = sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(v) for v in dims.split(",") if v)
                 for dt, dims in shapes)
    if m.group(3):  # an async start returns (operand, result, ...): the result once
      nbytes //= 2
    out[m.group(2)][0] += 1
    out[m.group(2)][1] += nbytes
  return {op: (n, b) for op, (n, b) in out.items()}
