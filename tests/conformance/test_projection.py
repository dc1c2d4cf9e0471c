"""Conformance of the randomized layers: every entry point, as users call them.

Each case runs one randomized projection (the functions `randomized_dense`,
`randomized_dot_general` and `randomized_einsum`, the linen
`RandomizedDense`, the NNX `RandomizedLinear`, `RandomizedLinearGeneral` and
`RandomizedEinsum`) on a shape, dtype, sketch kind and path (pure JAX or the
FFI kernels) and checks it against the exact layer:

* the forward output is bitwise the plain layer's (the same ops as flax);
* ``dx`` is bitwise the plain layer's gradient, ``db`` up to the order of its sum;
* ``dW`` has the kernel's shape and dtype and is finite, and is the sketch's
  estimate ``(S^T x)^T (S^T g)`` for ``S = sketch_matrix(kind, key, B, k)``
  (whose unbiasedness tests/test_sketch.py checks, over many keys);

or raises an error that says what to do. Shapes include empty batches, one
row and sizes around a word (1, 16, 31, 32, 33, 100); transforms jit, vmap
(also over a size-0 axis), scan, remat with `fewbit_jax.checkpoint_policy`,
grad, jvp, linear_transpose and grad-of-grad. The sharded cases (8 simulated
CPU devices, Auto and Explicit meshes, data, tensor and both parallelisms,
inputs sharded on each axis, kernels placed and not placed on the mesh) run
in one subprocess; there ``dW`` equals one device's block-diagonal estimate.
A wider sweep of everything is marked slow.
"""

from __future__ import annotations

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax import lax

import fewbit_jax as fb
from fewbit_jax import ext, _rng as rng, sketch
from fewbit_jax.dense import projection_dim, randomized_dense
from fewbit_jax.dense_general import randomized_dot_general, randomized_einsum

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATHS = ["jax", "ffi"] if ext.available() else ["jax"]
KEY = jax.random.key(7)
RATIO = 0.3


# --- entry points --------------------------------------------------------------------
# Each: (randomized(x, w, b, key, **opts), plain(x, w, b)); b may be None.

def _dims(x):
  return (((x.ndim - 1,), (0,)), ((), ()))


def _plain_dense(x, w, b):
  y = lax.dot_general(x, w, _dims(x))
  return y if b is None else y + jnp.reshape(b, (1,) * (y.ndim - 1) + (-1,))


def _linen(x, w, b, key, **opts):
  layer = fb.RandomizedDense(w.shape[1], use_bias=b is not None, **opts)
  params = {"kernel": w} if b is None else {"kernel": w, "bias": b}
  return layer.apply({"params": params}, x, rngs={"sketch": key})


def _nnx(cls, make):
  def f(x, w, b, key, **opts):
    layer = make(cls, x, w, b, opts)
    layer.kernel[...] = w.reshape(layer.kernel[...].shape)
    if b is not None:
      layer.bias[...] = b
    return layer(x, rngs=key)
  return f


def _make_linear(cls, x, w, b, opts):  # RandomizedLinear and RandomizedLinearGeneral
  return cls(w.shape[0], w.shape[1], use_bias=b is not None, param_dtype=w.dtype,
             rngs=nnx.Rngs(0), **opts)


def _make_einsum(cls, x, w, b, opts):
  return cls("...n,nm->...m", w.shape, (w.shape[1],) if b is not None else None,
             param_dtype=w.dtype, rngs=nnx.Rngs(0), **opts)


ENTRIES = {
    "dense": (lambda x, w, b, key, **o: randomized_dense(x, w, b, key, **o), _plain_dense),
    "dot_general": (lambda x, w, b, key, **o: randomized_dot_general(x, w, key, _dims(x), **o),
                    lambda x, w, b: lax.dot_general(x, w, _dims(x))),
    "einsum": (lambda x, w, b, key, **o: randomized_einsum("...n,nm->...m", x, w, key, **o),
               lambda x, w, b: jnp.einsum("...n,nm->...m", x, w)),
    "linen": (_linen, _plain_dense),
    "nnx_linear": (_nnx(fb.nnx.RandomizedLinear, _make_linear), _plain_dense),
    "nnx_general": (_nnx(fb.nnx.RandomizedLinearGeneral, _make_linear), _plain_dense),
    "nnx_einsum": (_nnx(fb.nnx.RandomizedEinsum, _make_einsum),
                   lambda x, w, b: _plain_dense(x, w, None) if b is None
                   else jnp.einsum("...n,nm->...m", x, w) + b),
}
_BIASED = ("dense", "linen", "nnx_linear", "nnx_general", "nnx_einsum")

COUNTS = {"run": 0, "fine": 0}


def _inputs(shape, m, dtype, bias=True, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], shape, jnp.float32).astype(dtype)
  w = (jax.random.normal(ks[1], (shape[-1], m), jnp.float32) / 4).astype(dtype)
  b = jax.random.normal(ks[2], (m,), jnp.float32).astype(dtype) if bias else None
  c = jax.random.normal(ks[3], (*shape[:-1], m), jnp.float32).astype(dtype)
  return x, w, b, c


def check_case(entry, x, w, b, c, *, kind="gaussian", path="jax", **opts):
  """Forward and dx bitwise the plain layer's, db up to summation order; dW finite."""
  COUNTS["run"] += 1
  f, plain = ENTRIES[entry]
  opts = dict(proj_dim_ratio=RATIO, sketch=kind, **opts)

  def both(fn):  # the output and the gradients, in one compiled program
    def out(x, w, b):
      y = fn(x, w, b)
      return jnp.sum((y * c).astype(jnp.float32)), y
    argnums = (0, 1, 2) if b is not None else (0, 1)
    return jax.jit(jax.value_and_grad(out, argnums=argnums, has_aux=True))

  with ext.mode(path):
    (_, y), grads = both(lambda x, w, b: f(x, w, b, KEY, **opts))(x, w, b)
  (_, y_ref), ref = both(plain)(x, w, b)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  assert y.dtype == y_ref.dtype
  np.testing.assert_array_equal(np.asarray(grads[0]), np.asarray(ref[0]))  # dx
  if b is not None:  # db: the same sum, which XLA may split in another order
    db, db_ref = np.asarray(grads[2], np.float64), np.asarray(ref[2], np.float64)
    scale = np.abs(np.asarray(c, np.float64)).reshape(-1, c.shape[-1]).sum(0)
    assert np.all(np.abs(db - db_ref) <= 8 * np.finfo(b.dtype).eps * scale + 1e-30)
  dw = grads[1]
  assert dw.shape == w.shape and dw.dtype == w.dtype
  assert np.all(np.isfinite(np.asarray(dw, np.float32)))
  if x.size == 0:
    np.testing.assert_array_equal(np.asarray(dw), np.zeros(w.shape))
  COUNTS["fine"] += 1
  return dw


# --- table: shapes x entry points x paths ------------------------------------------------

SHAPES = [((0, 16), 8), ((1, 1), 1), ((16, 31), 33), ((31, 32), 16), ((33, 16), 1),
          ((100, 33), 31), ((2, 0, 16), 8), ((4, 25, 16), 8), ((3, 1, 32), 100)]


# Every entry point reaches the sketch through the same core, and the path
# matters only there: the table crosses shapes with a few entry points on the
# pure path, all entry points on one shape, and the kernels on the dense one;
# the slow sweep crosses everything.
_TABLE = ([(s, e, "jax") for s in SHAPES for e in ("dense", "einsum", "nnx_linear")]
          + [(((4, 25, 16), 8), e, "jax") for e in ENTRIES if e not in ("dense", "einsum",
                                                                     "nnx_linear")]
          + [(s, "dense", "ffi") for s in SHAPES if "ffi" in PATHS])


@pytest.mark.parametrize("case,entry,path", _TABLE)
def test_shapes(case, entry, path):
  shape, m = case
  x, w, b, c = _inputs(shape, m, jnp.float32, bias=entry in _BIASED)
  check_case(entry, x, w, b, c, path=path)


@pytest.mark.slow
def test_shapes_full():
  for (shape, m), entry, path, kind in itertools.product(SHAPES, ENTRIES, PATHS, sketch.KINDS):
    x, w, b, c = _inputs(shape, m, jnp.float32, bias=entry in _BIASED)
    check_case(entry, x, w, b, c, kind=kind, path=path)


@pytest.mark.parametrize("kind", sketch.KINDS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_kinds_and_dtypes(kind, dtype):
  x, w, b, c = _inputs((5, 7, 33), 16, dtype)
  for path in PATHS:
    check_case("dense", x, w, b, c, kind=kind, path=path)


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_float64(entry):
  with jax.enable_x64(True):
    x, w, b, c = _inputs((6, 17), 5, jnp.float64, bias=entry in _BIASED)
    dw = check_case(entry, x, w, b, c)
  assert dw.dtype == jnp.float64


@settings(max_examples=8, deadline=None)
@given(lead=st.lists(st.sampled_from([0, 1, 2, 3, 16, 31, 32, 33]), min_size=1, max_size=2),
       n=st.sampled_from([1, 16, 31, 32, 33]), m=st.sampled_from([1, 16, 33]),
       entry=st.sampled_from(list(ENTRIES)), kind=st.sampled_from(sketch.KINDS),
       dtype=st.sampled_from(["float16", "bfloat16", "float32"]), path=st.sampled_from(PATHS),
       ratio=st.floats(0.01, 1.0))
def test_random_cases(lead, n, m, entry, kind, dtype, path, ratio):
  x, w, b, c = _inputs((*lead, n), m, jnp.dtype(dtype), bias=entry in _BIASED)
  global RATIO
  old, RATIO = RATIO, ratio
  try:
    check_case(entry, x, w, b, c, kind=kind, path=path)
  finally:
    RATIO = old


# --- the weight gradient is the sketch's estimate --------------------------------------------

# Unbiasedness and variance are statistical properties of the sketch, tested
# once, over thousands of keys, where the sketch is defined
# (tests/test_sketch.py, test_unbiased_and_variance_matches_theory, every
# kind). A layer has only to apply that very sketch: for each key its dW is
# ``(S^T x2d)^T (S^T g2d)`` with ``S = sketch.sketch_matrix(kind, key, B, k)``.
# (The estimate of 600 keys that stood here checked the same, by statistics.)

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", sketch.KINDS)
def test_weight_gradient_is_the_sketch_estimate(kind, path):
  x, w, _, c = _inputs((4, 8, 6), 3, jnp.float32, bias=False)
  x = x + 0.5
  x2, g2 = np.asarray(x, np.float64).reshape(32, 6), np.asarray(c, np.float64).reshape(32, 3)
  exact = x2.T @ g2

  def dw_and_sketch(key):  # one compiled program for all keys
    f = lambda w: jnp.sum(randomized_dense(x, w, None, key, proj_dim=8, sketch=kind) * c)
    return jax.grad(f)(w), sketch.sketch_matrix(kind, key, 32, 8)

  keys = jax.random.split(jax.random.key(5), 3)
  with ext.mode(path):
    dws, sketches = jax.jit(jax.vmap(dw_and_sketch))(keys)
  for got, s in zip(np.asarray(dws, np.float64), np.asarray(sketches, np.float64)):
    np.testing.assert_allclose(got, (s.T @ x2).T @ (s.T @ g2), rtol=1e-4, atol=1e-4)
    assert np.abs(got - exact).max() > 0.05  # an estimate, not the exact gradient


# --- transforms ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,path", [("gaussian", "jax"), ("countsketch", PATHS[-1])])
def test_transforms(kind, path):
  x, w, b, c = _inputs((6, 5, 16), 4, jnp.float32)
  f = lambda x, w, b: randomized_dense(x, w, b, KEY, proj_dim_ratio=RATIO, sketch=kind)
  loss = lambda fn: (lambda x, w, b: jnp.sum(fn(x, w, b) * c))
  dx_ref = jax.grad(loss(_plain_dense))(x, w, b)
  with ext.mode(path):
    # vmap: each example its own sketch of its own positions.
    y = jax.jit(jax.vmap(f, in_axes=(0, None, None)))(x, w, b)
    np.testing.assert_array_equal(y, jax.vmap(_plain_dense, in_axes=(0, None, None))(x, w, b))
    dxv = jax.grad(lambda x: jnp.sum(jax.vmap(f, in_axes=(0, None, None))(x, w, b) * c))(x)
    np.testing.assert_array_equal(dxv, dx_ref)
    # vmap over a size-0 axis (defect 7), forward and grad.
    x0, c0 = jnp.zeros((0, 5, 16)), jnp.zeros((0, 5, 4))
    y0 = jax.vmap(f, in_axes=(0, None, None))(x0, w, b)
    assert y0.shape == (0, 5, 4)
    g0 = jax.grad(lambda w: jnp.sum(jax.vmap(f, in_axes=(0, None, None))(x0, w, b) * c0))(w)
    np.testing.assert_array_equal(g0, np.zeros(w.shape))
    # scan over the leading axis, as a stack of layers would.
    def body(carry, xc):
      return carry + jnp.sum(f(xc[0], w, b) * xc[1]), None
    dx_scan = jax.grad(lambda x: lax.scan(body, 0.0, (x, c))[0])(x)
    np.testing.assert_allclose(dx_scan, dx_ref, rtol=1e-6, atol=1e-6)
    # remat with the library's policy keeps the sketch, not x.
    remat = jax.checkpoint(f, policy=fb.checkpoint_policy())
    dx_r, dw_r = jax.jit(jax.grad(loss(remat), argnums=(0, 1)))(x, w, b)
    dx_p, dw_p = jax.jit(jax.grad(loss(f), argnums=(0, 1)))(x, w, b)
    np.testing.assert_array_equal(dx_r, dx_ref)
    np.testing.assert_allclose(dw_r, dw_p, rtol=1e-5, atol=1e-5)
    # jvp: forward mode keeps no sketch, so it is the plain layer's tangent.
    _, t = jax.jvp(lambda x, w, b: f(x, w, b), (x, w, b), (c[..., :1] * x, w, b))
    _, t_ref = jax.jvp(_plain_dense, (x, w, b), (c[..., :1] * x, w, b))
    np.testing.assert_array_equal(t, t_ref)
    # linear_transpose in x: the forward is exactly x @ w, so its transpose is g w^T.
    (ct,) = jax.linear_transpose(lambda x: f(x, w, None), x)(c)
    (ct_ref,) = jax.linear_transpose(lambda x: _plain_dense(x, w, None), x)(c)
    np.testing.assert_array_equal(ct, ct_ref)
    # grad-of-grad in x: dx is exact, so its derivative is the exact one.
    gg = jax.grad(lambda x: jnp.sum(jax.grad(loss(f))(x, w, b) ** 2))(x)
    gg_ref = jax.grad(lambda x: jnp.sum(jax.grad(loss(_plain_dense))(x, w, b) ** 2))(x)
    np.testing.assert_allclose(gg, gg_ref, rtol=1e-6, atol=1e-6)
    hess = jax.hessian(lambda x: jnp.sum(f(x, w, b) ** 2))(x[0, 0])
    hess_ref = jax.hessian(lambda x: jnp.sum(_plain_dense(x, w, b) ** 2))(x[0, 0])
    np.testing.assert_allclose(hess, hess_ref, rtol=1e-6, atol=1e-6)


# --- keys ------------------------------------------------------------------------------------

def test_keys_differing_in_one_word_give_unrelated_sketches():
  # hash4 XORs key word 0 with the row counter: unmixed, keys (0, 7) and (1, 7)
  # gave the same rows of S in another order.
  base = np.array([0, 7], np.uint32)
  x = jnp.eye(64)  # S^T x = S^T: the sketch itself
  for kind in ("gaussian", "rademacher", "countsketch"):
    rows = {}
    for name, key in (("base", base), ("word0", base ^ np.array([1, 0], np.uint32)),
                      ("word1", base ^ np.array([0, 1], np.uint32))):
      with ext.mode("jax"):
        pure = np.asarray(sketch.project(kind, x, jnp.asarray(key), 32))
      if "ffi" in PATHS:
        with ext.mode("ffi"):
          kern = np.asarray(sketch.project(kind, x, jnp.asarray(key), 32))
        if kind == "gaussian":  # float32 sums in another order
          np.testing.assert_allclose(kern, pure, rtol=1e-6, atol=1e-6)
        else:
          np.testing.assert_array_equal(kern, pure)
      rows[name] = {tuple(np.round(r, 5)) for r in pure.T}  # the rows of S
    for other in ("word0", "word1"):
      shared = len(rows["base"] & rows[other])
      # countsketch rows are one +-1 in k columns: 2k possible, so some agree by chance.
      assert shared <= (40 if kind == "countsketch" else 0), (kind, other, shared)


def test_block_keys_differing_in_one_word():
  a = np.asarray(sketch.block_keys(jnp.array([0, 7], jnp.uint32), 8))
  b = np.asarray(sketch.block_keys(jnp.array([1, 7], jnp.uint32), 8))
  assert not set(map(tuple, a)) & set(map(tuple, b))


# --- options and errors ------------------------------------------------------------------

def test_ratio_as_numpy_and_jax_scalars():
  for ratio in (np.float32(0.3), jnp.float32(0.3), np.float64(0.3), jnp.asarray(0.25)):
    assert projection_dim(40, proj_dim_ratio=ratio) == projection_dim(40, proj_dim_ratio=float(ratio))
    fb.RandomizedDense(3, proj_dim_ratio=ratio)  # the layers take it too
  x, w, b, c = _inputs((8, 4), 3, jnp.float32)
  y = randomized_dense(x, w, b, KEY, proj_dim_ratio=jnp.float32(0.3))
  np.testing.assert_array_equal(y, _plain_dense(x, w, b))
  with pytest.raises(TypeError, match="traced"):
    jax.jit(lambda r: randomized_dense(x, w, b, KEY, proj_dim_ratio=r))(0.3)
  for bad in (True, 1.5, 0.0, "0.2", jnp.ones(2)):
    with pytest.raises(ValueError, match=r"must be a number in \(0, 1\]"):
      projection_dim(40, proj_dim_ratio=bad)


def test_estimate_variance_small_b():
  x, g = np.ones((1, 2)), np.ones((1, 3))
  for kind in sketch.KINDS:
    v = sketch.estimate_variance(kind, x, g, 1)
    assert v.shape == (2, 3) and np.all(np.isfinite(v))
  np.testing.assert_array_equal(sketch.estimate_variance("dct", x, g, 1), 0.0)  # k = B: exact
  with pytest.raises(ValueError, match=r"k=2 must be in \[1, B=1\]"):
    sketch.estimate_variance("dft", x, g, 2)


def test_estimate_variance_is_the_variance_at_k_equal_b():
  # k = B: dct/dft use every basis vector, S S^T = I: zero variance, as measured.
  x = np.random.RandomState(0).randn(6, 2)
  g = np.random.RandomState(1).randn(6, 2)
  for kind in ("dct", "dft"):
    sx = [np.asarray(sketch.project(kind, jnp.asarray(x, jnp.float32), jax.random.key(s), 6))
          for s in range(3)]
    sg = [np.asarray(sketch.project(kind, jnp.asarray(g, jnp.float32), jax.random.key(s), 6))
          for s in range(3)]
    for a, b in zip(sx, sg):
      np.testing.assert_allclose(a.T @ b, x.T @ g, atol=1e-4)
    np.testing.assert_array_equal(sketch.estimate_variance(kind, x, g, 6), 0.0)


# --- sharded: one subprocess -----------------------------------------------------------

_SHARDED = r'''
import functools, itertools, json, math, os, sys
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from flax import nnx
import fewbit_jax as fb
from fewbit_jax import ext, _rng as rng, sketch
from fewbit_jax.dense import randomized_dense, projection_dim
from fewbit_jax.dense_general import randomized_dot_general, randomized_einsum

FULL = os.environ.get("CONFORMANCE_FULL") == "1"
PATHS = ["jax", "ffi"] if ext.available() else ["jax"]
N, M, KEY = 16, 8, jax.random.key(3)
dims = lambda x: (((x.ndim - 1,), (0,)), ((), ()))


def linen(x, w, b, key, **o):
  return fb.RandomizedDense(M, **o).apply({"params": {"kernel": w, "bias": b}}, x,
                                          rngs={"sketch": key})


def nnx_linear(x, w, b, key, **o):
  layer = fb.nnx.RandomizedLinear(N, M, rngs=nnx.Rngs(0), **o)
  layer.kernel[...] = w
  layer.bias[...] = b
  return layer(x, rngs=key)


ENTRIES = {
  "dense": lambda x, w, b, key, **o: randomized_dense(x, w, b, key, **o),
  "dot_general": lambda x, w, b, key, **o: randomized_dot_general(x, w, key, dims(x), **o) + b,
  "einsum": lambda x, w, b, key, **o: randomized_einsum("...n,nm->...m", x, w, key, **o) + b,
  "linen": linen,
  "nnx_linear": nnx_linear,
}


def one_device_dw(kind, x, c, key, k, xspec, sizes, explicit):
  # dW as one device computes it: on an Explicit mesh one block per device's
  # shard of the position axes (rows in the shard's order); on an Auto mesh
  # gcd(devices, x.shape[0]) contiguous blocks along the first axis, whatever
  # the sharding.
  x, c = np.asarray(x, np.float32), np.asarray(c, np.float32)
  n_lead = x.ndim - 1
  if explicit:
    shards = [math.prod(sizes[a] for a in ((e,) if isinstance(e, str) else (e or ())))
              for e in list(xspec)[:n_lead]]
  else:
    shards = [math.gcd(math.prod(sizes.values()), x.shape[0])] + [1] * (n_lead - 1)
  def blocks(a):
    split = []
    for i, s in enumerate(shards):
      split += [s, a.shape[i] // s]
    a = a.reshape(*split, a.shape[-1])
    front = tuple(range(0, 2 * n_lead, 2))
    rest = tuple(range(1, 2 * n_lead, 2))
    a = a.transpose(*front, *rest, 2 * n_lead)
    d = math.prod(shards)
    return a.reshape(d, -1, a.shape[-1])
  d = math.prod(shards)
  keys = sketch.block_keys(key, d)
  kc = -(-k // d)
  xb, cb = blocks(x), blocks(c)
  with ext.mode("jax"):  # one compilation for both, not each op of the sketch on its own
    sx, sg = _project_both(kind, jnp.asarray(xb), jnp.asarray(cb), keys, kc)
  return np.einsum("ckn,ckm->nm", np.asarray(sx, np.float64), np.asarray(sg, np.float64))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _project_both(kind, xb, cb, keys, k):
  return sketch.project_blocks(kind, xb, keys, k), sketch.project_blocks(kind, cb, keys, k)


ROT = [0]


def cases():
  layouts = [((8,), ("data",)), ((4, 2), ("data", "model"))]
  for atype, (mshape, names), shape in itertools.product(
      ("Auto", "Explicit"), layouts, [(16, N), (8, 8, N)]):
    xspecs = []
    for ax in range(len(shape)):
      for nm in names:
        s = [None] * len(shape); s[ax] = nm; xspecs.append(P(*s))
    if len(names) == 2:
      s = [None] * len(shape); s[0], s[-1] = "data", "model"; xspecs.append(P(*s))
      s = [None] * len(shape); s[0], s[1] = "data", "model"; xspecs.append(P(*s))
    tp = names[-1]
    wspecs = [None, P(), P(tp, None), P(None, tp)]
    if FULL:  # every x sharding, kernel placement and entry point; kinds in rotation
      combos = [(xs, ws, e, sketch.KINDS[i % len(sketch.KINDS)]) for i, (xs, ws, e)
                in enumerate(itertools.product(xspecs, wspecs, ENTRIES))]
    elif len(shape) == 2:  # 3-D inputs cover the 2-D ones' shardings
      continue
    else:  # every x sharding; entry points, kernels and kinds in rotation
      nk, ne = len(sketch.KINDS), len(ENTRIES)
      combos = [(xs, wspecs[(i + ROT[0]) % 4], list(ENTRIES)[(i + ROT[0]) % ne],
                 sketch.KINDS[(i + ROT[0] // ne) % nk]) for i, xs in enumerate(xspecs)]
      ROT[0] += len(xspecs)
    for i, (xspec, wspec, entry, kind) in enumerate(combos):
      for path in (PATHS if FULL else PATHS[i % len(PATHS):][:1]):  # CI: paths in rotation
        yield atype, mshape, names, shape, xspec, wspec, entry, path, kind


counts = {"run": 0, "fine": 0, "plain_fails": 0}
failures = []
rs = np.random.RandomState(0)
for atype, mshape, names, shape, xspec, wspec, entry, path, kind in cases():
  mesh = jax.make_mesh(mshape, names, axis_types=(getattr(AxisType, atype),) * len(names))
  xs = rs.randn(*shape).astype(np.float32)
  ws = (rs.randn(N, M) / 4).astype(np.float32)
  bs = rs.randn(M).astype(np.float32)
  cs = rs.randn(*shape[:-1], M).astype(np.float32)
  name = f"{path} {atype} {mshape} x{shape} {xspec} w {wspec} {entry} {kind}"
  with ext.mode(path), jax.set_mesh(mesh):
    x = jax.device_put(xs, NamedSharding(mesh, xspec))
    c = jax.device_put(cs, NamedSharding(mesh, P(*list(xspec)[:-1], None)))
    if wspec is None:  # made before the mesh: not placed on it
      w, b = jnp.asarray(ws), jnp.asarray(bs)
    else:
      w = jax.device_put(ws, NamedSharding(mesh, wspec))
      b = jax.device_put(bs, NamedSharding(mesh, P()))
    plain = lambda x, w, b: jnp.sum((x @ w + b) * c)
    try:
      ref = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(x, w, b)
    except Exception:
      counts["plain_fails"] += 1  # the plain layer refuses this layout too
      continue
    counts["run"] += 1
    f = ENTRIES[entry]
    def loss(x, w, b):
      y = f(x, w, b, KEY, proj_dim_ratio=0.3, sketch=kind)
      return jnp.sum(y * c), y
    try:
      (_, y), (dx, dw, db) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, b)
      assert np.allclose(y, xs @ ws + bs, atol=1e-5), "forward"
      assert np.allclose(dx, ref[0], atol=1e-5), "dx"
      assert np.allclose(db, ref[2], atol=1e-4), "db"
      assert dw.shape == (N, M), "dw shape"
      if entry == "dense":  # the layers draw their keys from their rng streams
        sizes = dict(zip(names, mshape))
        k = projection_dim(math.prod(shape[:-1]), proj_dim_ratio=0.3)
        want = one_device_dw(kind, xs, cs, KEY, k, xspec, sizes, atype == "Explicit")
        err = np.abs(np.asarray(dw, np.float64) - want).max() / max(np.abs(want).max(), 1e-6)
        assert err < 1e-4, f"dW differs from one device's estimate by {err:.2e}"
      counts["fine"] += 1
    except Exception as e:
      failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")

# The defects found by the sweep of issue 11.
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
with jax.set_mesh(mesh):
  # 2: the default layer on a data-parallel Auto mesh, k (103) above one shard's rows (64).
  x = jax.device_put(jnp.ones((16, 32, 64)), NamedSharding(mesh, P("data")))
  layer = fb.RandomizedDense(8, proj_dim_ratio=0.2)
  params = layer.init({"params": jax.random.key(0)}, x[:1])
  counts["run"] += 1
  try:
    g = jax.jit(jax.grad(lambda p, x: layer.apply(p, x, rngs={"sketch": KEY}).sum()))(params, x)
    assert np.all(np.isfinite(g["params"]["kernel"]))
    counts["fine"] += 1
  except Exception as e:
    failures.append(f"defect 2: {type(e).__name__}: {str(e)[:300]}")
emesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
w = jnp.ones((64, 8))  # made before the mesh is set: not placed on it
with jax.set_mesh(emesh):
  # 3: an Explicit mesh, the kernel not placed on it.
  x = jax.device_put(jnp.ones((64, 64)), NamedSharding(emesh, P("data")))
  counts["run"] += 1
  try:
    g = jax.jit(jax.grad(lambda w, x: randomized_dense(x, w, None, KEY, proj_dim_ratio=0.2).sum()))(w, x)
    assert g.shape == w.shape
    counts["fine"] += 1
  except Exception as e:
    failures.append(f"defect 3: {type(e).__name__}: {str(e)[:300]}")
print(json.dumps({"counts": counts, "failures": failures}))
'''


def _run_sharded(on_8_devices, full: bool):
  out = on_8_devices(_SHARDED, timeout=3000, CONFORMANCE_FULL="1" if full else "0")
  print(out["counts"])
  assert not out["failures"], "\n".join(out["failures"])
  assert out["counts"]["run"] == out["counts"]["fine"] > 0
  return out


def test_sharded(on_8_devices):
  _run_sharded(on_8_devices, full=False)


@pytest.mark.slow
def test_sharded_full_sweep(on_8_devices):
  _run_sharded(on_8_devices, full=True)


def test_counts():
  # Runs last in this module: every case that ran here was fine.
  print(COUNTS)
  assert COUNTS["run"] == COUNTS["fine"], COUNTS
