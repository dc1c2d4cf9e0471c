"""Conformance of the few-bit activations, as users call them.

Every activation kind (piecewise, continuous, a user table, `fb.fewbit`,
exact mode) over shapes (0-size, scalar, last axis 1, 16, 31, 32, 33, 100,
1000), dtypes (float16, bfloat16, float32, float64 under x64), both paths
(``ext.mode`` "jax" and "ffi"), transforms (jit, vmap incl. size 0, scan,
remat with ``fb.checkpoint_policy()``, grad, grad of grad, jvp,
linear_transpose) and shardings (1-, 2-, 3-D inputs sharded on each axis over
8 simulated devices, Auto and Explicit meshes, in one subprocess). Each case
is equal to its reference or raises a clear error:

* forward: bitwise the ``jax.nn`` function (or the torch definition in jnp);
* gradient of a few-bit activation: bitwise the levels-based reference
  ``levels[code] * g`` (0 where the level is 0), computed here from the
  table (continuous, user table, fb.fewbit) or the registry's predicate and
  levels (piecewise); piecewise ones also equal ``jax.vjp`` of the reference
  to a rounding of the level;
* exact mode: ``jax.vjp`` of the reference within float rounding;
* sharded: bitwise the one-device result (exact mode: within rounding, as
  jax's own gradient of the reference once sharded);
* forward mode (``jax.jvp``) of a few-bit activation: JAX's TypeError for a
  ``custom_vjp`` (exact mode: ``jax.jvp`` of the reference).

Cases are tallied; the tally is printed at the end of the module (with
``-rA`` or ``-s``). A larger sweep (more shapes and every activation on
every shape) is marked slow.
"""

import functools
import os
import textwrap

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fewbit_jax as fb
from fewbit_jax import _registry
from fewbit_jax import activations as A
from fewbit_jax import tables

PATHS = ["jax"] + (["ffi"] if fb.ext.available() else [])
DTYPES = ["float16", "bfloat16", "float32", "float64"]
SHAPES = [(), (0,), (3, 0), (4, 1), (2, 16), (31,), (2, 32), (3, 33), (2, 3, 100), (1000,)]
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-6, "float64": 1e-12}

# A few-bit activation's torch-only forwards, in jnp (the others are jax.nn's).
_TORCH = {
    "threshold": lambda x: jnp.where(x > 0.5, x, jnp.asarray(-2.0, x.dtype)),
    "hard_shrink": lambda x: jnp.where(jnp.abs(x) > 0.5, x, jnp.zeros_like(x)),
    "soft_shrink": lambda x: jnp.where(x > 0.5, x - 0.5, jnp.where(x < -0.5, x + 0.5,
                                                                 jnp.zeros_like(x))),
    "tanhshrink": lambda x: x - jnp.tanh(x),
    "tanh": jnp.tanh,
}
_PARAMS = {"threshold": dict(threshold=0.5, value=-2.0), "hard_shrink": dict(lambd=0.5),
           "soft_shrink": dict(lambd=0.5)}
_USER = dict(borders=[-1.0, 0.0, 1.0], levels=[0.0, 0.25, 0.75, 1.0])


class Kind:
  """One activation as called: its few-bit function, reference and gradient reference."""

  def __init__(self, label, fn, ref, *, levels=None, borders=None, predicate=None,
               exact=False, second_order="error"):
    self.label, self.fn, self.ref = label, fn, ref
    self.levels, self.borders, self.predicate = levels, borders, predicate
    self.exact = exact
    self.second_order = second_order  # "error", "zero" or "exact"

  def __repr__(self):
    return self.label

  def grad_reference(self, x, g):
    """The gradient the activation must give for cotangent g at x."""
    if self.exact:
      return jax.vjp(self.ref, x)[1](g)[0]
    if self.predicate is not None:
      code = self.predicate(x).astype(jnp.int32)
    else:
      xf = x.astype(jnp.float32)
      code = sum((jnp.float32(b) < xf).astype(jnp.int32) for b in self.borders)
      code = jnp.asarray(code, jnp.int32)
    level = jnp.asarray(np.asarray(self.levels, np.float64).astype(g.dtype))[code]
    return jnp.where(level == 0, jnp.zeros((), g.dtype), level * g)


def _kind(name: str, *, exact: bool = False) -> Kind:
  rec = _registry.ACTIVATIONS[name]
  params = _PARAMS.get(name, {})
  ref = _TORCH.get(name) or getattr(jax.nn, rec.jax_name)
  fn = functools.partial(getattr(fb, name), **params)
  if exact:
    return Kind(f"{name}(exact)", functools.partial(fn, exact=True), ref, exact=True,
                second_order="exact")
  if rec.kind == _registry.KIND_PIECEWISE:
    parsed = rec.parse({p.name: params.get(p.name, p.default) for p in rec.params})
    return Kind(name, fn, ref, levels=rec.levels_for(parsed),
                predicate=functools.partial(rec.predicate, **parsed), second_order="zero")
  t = tables.table(name, 3)
  return Kind(name, fn, ref, levels=t.levels, borders=t.borders)


def _fewbit_kind() -> Kind:
  fn = fb.fewbit(jnp.sin, bits=2)
  t = A._fewbit_tables[(jnp.sin, 2, None)]
  return Kind("fb.fewbit(sin)", fn, jnp.sin, levels=t.levels, borders=t.borders)


def all_kinds() -> list[Kind]:
  names = list(_registry.ACTIVATIONS)
  kinds = [_kind(n) for n in names] + [_kind(n, exact=True) for n in names]
  kinds.append(Kind("gelu(user table)", fb.gelu(**_USER), jax.nn.gelu, **_USER))
  kinds.append(_fewbit_kind())
  return kinds


def representative_kinds(full: bool = True) -> list[Kind]:
  """One or two of each kind (one of each unless `full`): for shapes, transforms, shardings."""
  kinds = [_kind("relu"), _kind("gelu"), _fewbit_kind(), _kind("gelu", exact=True)]
  if full:
    kinds += [_kind("hard_sigmoid"), _kind("leaky_relu"),
              Kind("gelu(user table)", fb.gelu(**_USER), jax.nn.gelu, **_USER),
              _kind("relu", exact=True)]
  return kinds


def _combos(ci):
  """(dtype, path) pairs, those not in `ci` marked slow (CI time)."""
  return [pytest.param(d, p, marks=() if (d, p) in ci or (d, "*") in ci else pytest.mark.slow)
          for d in DTYPES for p in PATHS]


# --------------------------------------------------------------------------
# The tally of cases.

TALLY = {"run": 0, "fine": 0}


class Cases:
  """Runs checks, counting each, and collects what failed."""

  def __init__(self):
    self.failed = []

  def check(self, what, fn):
    TALLY["run"] += 1
    try:
      problem = fn()
    except Exception as e:  # pylint: disable=broad-except
      problem = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if problem:
      self.failed.append(f"{what}: {problem}")
    else:
      TALLY["fine"] += 1

  def done(self):
    assert not self.failed, "\n".join(self.failed[:30]) + f"\n({len(self.failed)} failed)"


@pytest.fixture(scope="module", autouse=True)
def _report_tally(request):
  yield
  tr = request.config.pluginmanager.get_plugin("terminalreporter")
  if tr is not None and TALLY["run"]:
    tr.write_line(f"\nconformance/test_activations: {TALLY['run']} cases run, "
                  f"{TALLY['fine']} fine")


def _differ(got, want, tol=0.0) -> str | None:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    return f"shape {got.shape} != {want.shape}"
  same_nan = np.isnan(got) == np.isnan(want)
  ok = same_nan & ((got == want) | np.isnan(want) |
                   (np.abs(got - want) <= tol * (np.abs(want) + 1e-30)))
  if tol and want.size:  # relative to the largest magnitude too
    scale = np.nanmax(np.abs(np.where(np.isfinite(want), want, 0)), initial=0.0)
    ok |= same_nan & (np.abs(got - want) <= tol * scale)
  if not np.all(ok):
    i = np.argwhere(~ok)[0]
    return f"at {tuple(i)}: {got[tuple(i)]!r} != {want[tuple(i)]!r}"
  return None


def value_and_vjp(k: Kind, x, g):
  """(k.fn(x), its vjp at g)."""
  y, vjp = jax.vjp(k.fn, x)
  return y, vjp(g)[0]


def _inputs(shape, dtype, seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=shape) * 3
  g = r.normal(size=shape)
  return jnp.asarray(x, dtype), jnp.asarray(g, dtype)


def _x64(dtype):
  return jax.enable_x64(dtype == "float64")


# --------------------------------------------------------------------------
# Forward and gradient: every kind, shape, dtype and path.


def _forward_and_gradient(cases, kinds, shapes, dtype, path):
  """One jit per (dtype, path): every kind on every shape, forward and vjp."""
  with _x64(dtype), fb.ext.mode(path):
    xs = {s: _inputs(s, dtype, seed=len(s) + sum(s)) for s in shapes}

    @jax.jit
    def run(xs):
      # The references in the same compilation: XLA's fusions may round a
      # function differently from its eager, unfused run (and compiling each
      # eager op of the references for every shape costs more than this).
      return {(k.label, s): (*value_and_vjp(k, x, g), k.ref(x), k.grad_reference(x, g),
                             jax.vjp(k.ref, x)[1](g)[0] if k.predicate is not None else None)
              for k in kinds for s, (x, g) in xs.items()}

    got = run(xs)
    for k in kinds:
      for s, (x, g) in xs.items():
        def one(k=k, s=s, x=x, g=g):
          y, dx, ref, grad_ref, jax_grad = got[k.label, s]
          if y.dtype != x.dtype or dx.dtype != g.dtype:
            return f"dtypes {y.dtype}, {dx.dtype} for {x.dtype}"
          bad = _differ(y, ref)
          if bad:
            return "forward " + bad
          tol = TOL[dtype] if k.exact else 0.0
          bad = _differ(dx, grad_ref, tol)
          if bad:
            return "gradient " + bad
          if k.predicate is not None:  # piecewise: jax's own gradient, to the level's rounding
            return _differ(dx, jax_grad, TOL[dtype])
          return None
        cases.check(f"{k.label} {s} {dtype} {path}", one)


@pytest.mark.parametrize("dtype, path", _combos({("float32", "*")}))
def test_every_kind(dtype, path):
  cases = Cases()
  _forward_and_gradient(cases, all_kinds(), [(3, 33)], dtype, path)
  cases.done()


@pytest.mark.parametrize("dtype, path", _combos({("float32", "*"), ("bfloat16", "ffi")}))
def test_every_shape(dtype, path):
  cases = Cases()
  _forward_and_gradient(cases, representative_kinds(full=False), SHAPES, dtype, path)
  cases.done()


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kind_on_every_shape(dtype, path):  # the larger sweep
  cases = Cases()
  _forward_and_gradient(cases, all_kinds(),
                        SHAPES + [(1,), (5, 31), (2, 2, 64), (7, 65), (4, 1000)], dtype, path)
  cases.done()


def test_non_finite_inputs_and_cotangents():
  # x: nan, +-inf, the kinks; g: inf, -inf, nan, finite.
  x = jnp.repeat(jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.0, -3.0, 3.0, 6.0, -1.0, 1.0, 0.5]),
                 4)
  g = jnp.tile(jnp.array([jnp.inf, -jnp.inf, jnp.nan, 2.0]), 10)
  cases = Cases()
  for path in PATHS:
    with fb.ext.mode(path):
      for k in all_kinds():
        def one(k=k):
          bad = _differ(k.fn(x), k.ref(x))
          if bad:
            return "forward " + bad
          if k.predicate is None:
            return None
          finite = jnp.isfinite(x)  # piecewise: jax's vjp where x is finite
          return _differ(jax.vjp(k.fn, x)[1](g)[0][finite], jax.vjp(k.ref, x)[1](g)[0][finite],
                         TOL["float32"])
        cases.check(f"{k.label} non-finite {path}", one)
  cases.done()


# --------------------------------------------------------------------------
# Transforms.


def _transform_checks(k: Kind):
  """{name: check} for one kind, in float32 on a (4, 33) input."""
  x, g = _inputs((4, 33), "float32", seed=3)
  t = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)
  want = k.grad_reference(x, g)
  tol = TOL["float32"] if k.exact else 0.0
  vjp = lambda x, g: jax.vjp(k.fn, x)[1](g)[0]
  policy = fb.checkpoint_policy()

  def second_order():
    first = jax.grad(lambda v: (k.fn(v) * g).sum())
    if k.second_order == "error":
      try:
        jax.grad(lambda v: first(v).sum())(x)
      except TypeError as e:
        return None if "exact=True" in str(e) else f"unclear error: {e}"
      return "no error for a second derivative through codes"
    h = jax.jvp(first, (x,), (t,))[1]
    ref = jax.jvp(jax.grad(lambda v: (k.ref(v) * g).sum()), (x,), (t,))[1]
    if k.second_order == "zero":
      return _differ(h, jnp.zeros_like(h)) or _differ(h, ref)
    return _differ(h, ref, 1e-5)

  def scan():
    def body(c, row):
      return c, k.fn(row)
    return _differ(jax.vjp(lambda v: jax.lax.scan(body, 0.0, v)[1], x)[1](g)[0], want, tol)

  return {
      "jit": lambda: (_differ(jax.jit(vjp)(x, g), want, tol)
                      or _differ(jax.jit(k.fn)(x), jax.jit(k.ref)(x))),
      "vmap": lambda: _differ(jax.vmap(vjp)(x, g), want, tol),
      "vmap axis 1": lambda: _differ(jax.vmap(vjp, 1, 1)(x, g), want, tol),
      "vmap size 0": lambda: _differ(jax.vmap(vjp)(x[:0], g[:0]), want[:0]),
      "scan": scan,
      "remat policy": lambda: _differ(
          jax.vjp(jax.checkpoint(k.fn, policy=policy), x)[1](g)[0], want, tol),
      "grad": lambda: _differ(jax.grad(lambda v: (k.fn(v) * g).sum())(x), want, tol),
      "second order": second_order,
      "jvp": lambda: (_differ(jax.jvp(k.fn, (x,), (t,))[1], k.grad_reference(x, t), tol)
                      if k.exact else _raises(lambda: jax.jvp(k.fn, (x,), (t,)), TypeError,
                                              "forward-mode", "custom_vjp")()),
      "linear_transpose": lambda: _differ(
          jax.linear_transpose(lambda gg: vjp(x, gg), g)(t)[0], k.grad_reference(x, t), tol),
  }


# Gradients to a few ulps against eager references: at XLA's full optimisation
# (exact mode's jitted and scanned gradients round differently at the low level).
@pytest.mark.xla_optimized
@pytest.mark.parametrize("path", PATHS)
def test_transforms(path):
  cases = Cases()
  with fb.ext.mode(path):
    for k in representative_kinds(full=False):
      for name, check in _transform_checks(k).items():
        cases.check(f"{k.label} {name} {path}", check)
  cases.done()


# --------------------------------------------------------------------------
# Clear errors.


def _raises(call, error, *words):
  def check():
    try:
      call()
    except error as e:
      missing = [w for w in words if w not in str(e)]
      return f"message lacks {missing}: {e}" if missing else None
    return f"no {error.__name__}"
  return check


def test_clear_errors():
  x = jnp.linspace(-2.0, 2.0, 8)
  cases = Cases()
  bad = {
      "int input": (lambda: fb.gelu(jnp.arange(4)), TypeError, "floating-point", "astype"),
      "bits 9": (lambda: fb.gelu(x, bits=9), ValueError, "1..8"),
      "bits True (continuous)": (lambda: fb.gelu(x, bits=True), TypeError, "int"),
      "bits True (piecewise)": (lambda: fb.relu(x, bits=True), TypeError, "int"),
      "bits 1.0 (piecewise)": (lambda: fb.relu(x, bits=1.0), TypeError, "int"),
      "bits 3 (piecewise)": (lambda: fb.relu(x, bits=3), ValueError, "exact", "bits"),
      "exact with bits": (lambda: fb.gelu(x, bits=3, exact=True), ValueError, "exact=True"),
      "exact not a bool": (lambda: fb.gelu(x, exact=1), TypeError, "True or False"),
      "traced table": (lambda: jax.jit(lambda l: fb.gelu(x, borders=[0.0], levels=l))(
          jnp.array([0.0, 1.0])), TypeError, "levels=", "concrete", "outside"),
      "celu alpha 0": (lambda: fb.celu(x, alpha=0.0), ValueError, "alpha != 0"),
      "half a table": (lambda: fb.gelu(x, borders=[0.0]), ValueError, "levels="),
      "threshold missing": (lambda: fb.threshold(x), TypeError, "threshold=", "value="),
      "lambd < 0": (lambda: fb.hard_shrink(x, lambd=-1.0), ValueError, "lambd >= 0"),
      "not callable": (lambda: fb.fewbit(3), TypeError, "callable"),
      "second order": (lambda: jax.hessian(lambda v: fb.silu(v).sum())(x), TypeError,
                       "exact=True", "jax.nn"),
  }
  for name, (call, error, *words) in bad.items():
    cases.check(f"error: {name}", _raises(call, error, *words))
  cases.done()


# --------------------------------------------------------------------------
# Property-based: random shapes, dtypes, values and kinds.

_KINDS = all_kinds()


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(
    kind=st.sampled_from(_KINDS),
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    scale=st.sampled_from([1e-3, 1.0, 4.0, 100.0]),
    seed=st.integers(0, 2**16),
    path=st.sampled_from(PATHS))
def test_property_forward_and_gradient(kind, shape, dtype, scale, seed, path):
  x, g = _inputs(shape, dtype, seed)
  x = (x.astype(jnp.float32) * scale).astype(dtype)
  cases = Cases()

  def one():
    with fb.ext.mode(path):
      y, dx = value_and_vjp(kind, x, g)
    return (_differ(y, kind.ref(x)) or
            _differ(dx, kind.grad_reference(x, g), TOL[dtype] if kind.exact else 0.0))
  cases.check(f"{kind.label} {shape} {dtype} x{scale} {path}", one)
  cases.done()


# --------------------------------------------------------------------------
# Shardings: one subprocess for every case.

_SHARDED = textwrap.dedent(r"""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import fewbit_jax as fb
  sys.path.insert(0, sys.argv[1])
  import test_activations as C

  assert jax.device_count() == 8
  out = {"run": 0, "failed": []}
  shapes = [((256,), 0), ((16, 100), 0), ((8, 1), 0), ((16, 40), 1), ((8, 16, 48), 1),
            ((8, 16, 48), 2)]
  kinds = C.representative_kinds(full=False)
  paths = ["jax", "ffi"] if fb.ext.available() else ["jax"]
  meshes = {t: jax.make_mesh((8,), ("d",), axis_types=(getattr(AxisType, t),))
            for t in ("Auto", "Explicit")}
  for path in paths:
    with fb.ext.mode(path):
      for shape, axis in shapes:
        x, g = C._inputs(shape, "float32", seed=len(shape) + axis)
        spec = P(*([None] * axis + ["d"]))

        @jax.jit
        def step(x, g):
          return {k.label: C.value_and_vjp(k, x, g) for k in kinds}

        ref = step(x, g)  # one device, for both meshes
        for axis_type, mesh in meshes.items():
          with jax.set_mesh(mesh):
            xs, gs = (jax.device_put(a, NamedSharding(mesh, spec)) for a in (x, g))
            try:
              got = step(xs, gs)
            except Exception as e:
              out["run"] += len(kinds)
              out["failed"].append(f"{axis_type} {path} {shape} axis {axis}: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
              continue
          for k in kinds:
            out["run"] += 1
            # Exact mode is jax's own derivative, which XLA may round
            # differently once sharded (jax.nn.gelu's gradient does too).
            tol = C.TOL["float32"] if k.exact else 0.0
            bad = [C._differ(a, b, tol) for a, b in zip(got[k.label], ref[k.label])]
            if any(bad):
              out["failed"].append(f"{axis_type} {path} {shape} axis {axis} {k.label}: {bad}")
  print(json.dumps(out))
""")


def test_sharded(on_8_devices):
  here = os.path.dirname(os.path.abspath(__file__))
  out = on_8_devices(_SHARDED, here, cwd=None)
  TALLY["run"] += out["run"]
  TALLY["fine"] += out["run"] - len(out["failed"])
  assert not out["failed"], out["failed"]
