"""Sharded and multi-process training with every fewbit feature on.

The transformer stack of ``benchmarks/bench_sharding.py``
(`fewbit_jax._models.sharded`: few-bit GELU and randomized dense layers) is
differentiated on 8 simulated CPU devices, data parallel, tensor parallel and
both, under ``AxisType.Auto`` and ``AxisType.Explicit`` meshes, on the FFI
kernels (where built) and on the pure-JAX path. For each it checks that

* the loss and the gradients equal those of one device running the same
  block-diagonal sketch (up to float32 summation order), and the few-bit
  activation's gradient is bitwise that of one device;
* the compiled program holds no collective beyond the vanilla model's (count
  and bytes of all-reduce, all-gather, reduce-scatter, all-to-all and
  collective-permute);
* the per-device compiled memory saves what one device running a data shard
  saves (the same fraction of the step's temp bytes, within 6 points: the
  programs are scheduled apart, and under tensor parallelism the parts of
  the step that stay replicated differ from one device's).

The device count is fixed when JAX starts, so those run in one subprocess.
The last test trains the example GPT over two processes joined by
``jax.distributed`` (examples/distributed_lm.py). The first tests check the
blocked layer on one device; the block-diagonal sketch itself is tested in
tests/test_sketch.py, `fewbit_jax._sharded` in tests/test_sharded.py and the
General and Einsum layers on 8 devices in tests/test_dense_general.py.
"""

from __future__ import annotations

import json
import math
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewbit_jax import ext
from fewbit_jax.dense import randomized_dense, sketch_blocks_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def pure_jax_unless_sharded(request):
  if "sharded_results" in request.fixturenames:
    yield
    return
  with ext.mode("jax"):
    yield


# --- the blocked layer, one device ---------------------------------------------------

def test_blocked_weight_gradient_is_unbiased():
  # The mean of the block-diagonal estimate over many keys approaches x^T g.
  x = jax.random.normal(jax.random.key(0), (4, 8, 6)) + 0.5
  w = jax.random.normal(jax.random.key(1), (6, 3)) / 3
  c = jax.random.normal(jax.random.key(2), (4, 8, 3))
  exact = jnp.einsum("btn,btm->nm", x, c)

  def dw(key):
    f = lambda w: jnp.sum(randomized_dense(x, w, None, key, proj_dim=8, sketch_blocks=4) * c)
    return jax.grad(f)(w)

  keys = jax.random.split(jax.random.key(5), 1000)
  est = jax.jit(jax.vmap(dw))(keys)
  mean, sem = est.mean(0), est.std(0) / math.sqrt(len(keys))
  assert np.all(np.abs(mean - exact) < 5 * sem + 1e-4), (mean, exact, sem)
  assert float(est.std(0).max()) > 0.1  # a real estimate, not the exact gradient


def test_one_block_matches_the_plain_layer():
  x = jax.random.normal(jax.random.key(0), (4, 8, 6))
  w = jax.random.normal(jax.random.key(1), (6, 3))
  b = jnp.zeros(3)
  grads = [jax.grad(lambda w, s=s: jnp.sum(randomized_dense(
      x, w, b, jax.random.key(3), proj_dim_ratio=0.25, sketch_blocks=s) ** 2))(w)
           for s in (None, 1)]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_sketch_blocks_options_and_errors():
  x = jnp.ones((6, 4, 3))
  w, key = jnp.ones((3, 2)), jax.random.key(0)
  f = lambda s: jax.grad(lambda w: randomized_dense(x, w, None, key, proj_dim=6,
                                                    sketch_blocks=s).sum())(w)
  assert f(3).shape == (3, 2)
  with pytest.raises(ValueError, match="do not divide"):
    f(5)
  with pytest.raises(ValueError, match="must be None"):
    f(0)
  with pytest.raises(ValueError, match="mesh axes"):
    f("data")  # no mesh here
  with pytest.raises(ValueError, match="must be None"):
    with sketch_blocks_default(2.5):
      pass
  # The context sets the default, the argument overrides it: 2 blocks of 12
  # rows at proj_dim=2 keep 1 row each, while 3 blocks keep 3 x 1 rows.
  def kept(default, arg):
    with sketch_blocks_default(default):
      res = jax._src.ad_checkpoint.saved_residuals(
          lambda w: randomized_dense(x, w, None, key, proj_dim=2, sketch_blocks=arg).sum(), w)
    return [r[0].shape for r in res if len(r[0].shape) == 3]
  assert kept(2, None) == [(2, 1, 3)]
  assert kept(2, 3) == [(3, 1, 3)]


# --- 8 devices: data, tensor and both parallelisms ------------------------------------

# The default path (the kernels where built) on every layout; the pure-JAX
# path, where it is not the default, on the layout that has both parallelisms.
PATHS = ["auto", "jax"] if ext.available() else ["jax"]
MESHES = ["Auto", "Explicit"]
LAYOUTS = ["dp", "tp", "dp+tp"]
CASES = [f"{p}-{m}-{l}" for p in PATHS for m in MESHES
         for l in (LAYOUTS if p == PATHS[0] else ["dp+tp"])]

_SCRIPT = textwrap.dedent(r"""
  import dataclasses, json, sys, traceback
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import fewbit_jax as fb
  from fewbit_jax import ext
  from fewbit_jax._models import sharded as bs

  assert jax.device_count() == 8, jax.devices()
  cases = [c.split("-", 2) for c in json.loads(sys.argv[1])]
  cfg = bs.Config(layers=2, batch=32, seq=32, dim=64, heads=8)
  fast = {"xla_backend_optimization_level": 0}  # the same buffers, compiled faster
  params = bs.init(cfg, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (cfg.batch, cfg.seq, cfg.dim))
  key = jax.random.key(2)

  def rel_err(a, b):
    # Relative to the largest gradient: some (a key projection's bias) are 0
    # up to rounding, where a per-array relative error means nothing.
    err = max(float(jnp.abs(u - v).max()) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return err / max(float(jnp.abs(v).max()) for v in jax.tree.leaves(b))

  def gelu_check(path, mesh_name, layout):
    # The few-bit GELU's vjp on an activation sharded over both mesh axes
    # (batch over 'data', hidden over 'model'): bitwise the one-device result.
    dp, tp = bs.LAYOUTS[layout]
    mesh = bs.mesh_for(layout, getattr(AxisType, mesh_name))
    h = jax.random.normal(jax.random.key(4), (16, 32, 256))
    ct = jax.random.normal(jax.random.key(5), h.shape)
    spec = P("data" if dp > 1 else None, None, "model" if tp > 1 else None)
    f = jax.jit(lambda h, ct: jax.vjp(fb.gelu, h)[1](ct)[0])
    with jax.set_mesh(mesh):
      hs, cs = (jax.device_put(a, NamedSharding(mesh, spec)) for a in (h, ct))
      compiled = f.lower(hs, cs).compile(fast)
      out = compiled(hs, cs)
    return dict(exact=bool(jnp.all(out == f(h, ct))),
                collectives=bs.collectives(compiled.as_text()))

  def measure(cfg, layout, axis_type=AxisType.Auto, fewbit=True, x=x, run=False):
    return bs.measure(cfg, layout, axis_type, fewbit=fewbit, params=params, x=x, key=key,
                      run=run, compiler_options=fast)

  def shard_map_check(path, use_gelu):
    # A user's own shard_map (manual axes, check_vma on): per-device loss,
    # gradients averaged by hand. At full size the dct sketch is exact, so
    # the gradients equal the plain layer's.
    mesh = bs.mesh_for("dp", AxisType.Auto)
    h = jax.random.normal(jax.random.key(6), (16, 8, 64))
    w = jax.random.normal(jax.random.key(7), (64, 64)) / 8
    b = jnp.ones(64)
    act = fb.gelu if use_gelu else (lambda y: y)

    def loss(fewbit, w, b, h):
      y = (fb.randomized_dense(h, w, b, jax.random.key(8), proj_dim_ratio=1.0, sketch="dct")
           if fewbit else h @ w + b)
      return jnp.sum(act(y) ** 2)

    grads = []
    for fewbit in (False, True):
      local = lambda w, b, h, fewbit=fewbit: jax.lax.pmean(
          jax.grad(loss, argnums=(1, 2))(fewbit, w, b, h), "data")
      with jax.set_mesh(mesh):
        hs = jax.device_put(h, NamedSharding(mesh, P("data")))
        f = jax.jit(jax.shard_map(local, in_specs=(P(), P(), P("data")), out_specs=P()))
        grads.append(f(w, b, hs))
    return rel_err(grads[1], grads[0])

  results, refs, vanilla, shard_temp = {}, {}, {}, {}
  for path in dict.fromkeys(c[0] for c in cases):
    with ext.mode(path):
      for use_gelu, name in ((False, "dense"), (True, "gelu")):
        r = results[f"{path}-shard_map-{name}"] = {}
        try:
          r["grad_err"] = shard_map_check(path, use_gelu)
        except Exception as e:
          r["error"] = f"{type(e).__name__}: {e}"[:2000]

  first_path = cases[0][0]
  for path, mesh_name, layout in cases:
    dp, tp = bs.LAYOUTS[layout]
    r = results[f"{path}-{mesh_name}-{layout}"] = {}
    axis_type = getattr(AxisType, mesh_name)
    with ext.mode(path):
      try:
        if (path, dp) not in refs:  # one device, the sharded run's blocks
          refs[path, dp] = measure(dataclasses.replace(cfg, sketch_blocks=dp), "single", run=True)
        if path == first_path and dp not in shard_temp:  # one device holding one data shard
          shard = dataclasses.replace(cfg, batch=cfg.batch // dp, sketch_blocks=1)
          xs = x[:shard.batch]
          shard_temp[dp] = {
              "vanilla": measure(shard, "single", fewbit=False, x=xs)["temp"],
              "fewbit": (refs[path, 1] if dp == 1 else measure(shard, "single", x=xs))["temp"]}
        r["gelu"] = gelu_check(path, mesh_name, layout)
        if (mesh_name, layout) not in vanilla:  # the same program on either path
          vanilla[mesh_name, layout] = measure(cfg, layout, axis_type, fewbit=False)
        v = vanilla[mesh_name, layout]
        f = measure(cfg, layout, axis_type, run=True)
        r["collectives"] = {"vanilla": v["collectives"], "fewbit": f["collectives"]}
        r["temp"] = {"vanilla": v["temp"], "fewbit": f["temp"]}
        loss, grads = f["result"]
        r["loss"] = [float(loss), float(refs[path, dp]["result"][0])]
        r["grad_err"] = rel_err(grads, refs[path, dp]["result"][1])
        if path == first_path:
          r["shard_temp"] = shard_temp[dp]
      except Exception as e:
        r["error"] = f"{type(e).__name__}: {e}"[:2000]
  results["kernels"] = ext.available()
  print(json.dumps(results))
""")

@pytest.fixture(scope="module")
def sharded_results(on_8_devices):
  results = on_8_devices(_SCRIPT, json.dumps(CASES))
  # The cases (and their expected failures) follow this process's kernels.
  assert results.pop("kernels") == ext.available(), "the child imported another fewbit_jax"
  return results


def _get(results, case, *fields):
  r = results[case]
  assert "error" not in r, r["error"]
  for f in fields:
    r = r[f]
  return r


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_equal_one_device(sharded_results, case):
  loss, ref = _get(sharded_results, case, "loss")
  assert loss == pytest.approx(ref, rel=1e-5)
  assert _get(sharded_results, case, "grad_err") < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_gelu_gradient_bitwise_with_no_collective(sharded_results, case):
  r = _get(sharded_results, case, "gelu")
  assert r["exact"]
  assert all(n == 0 for n, _ in r["collectives"].values()), r["collectives"]


@pytest.mark.parametrize("case", CASES)
def test_no_collective_beyond_vanilla(sharded_results, case):
  c = _get(sharded_results, case, "collectives")
  for op, (n, nbytes) in c["fewbit"].items():
    vn, vbytes = c["vanilla"][op]
    assert n <= vn and nbytes <= vbytes, (op, c)
  assert c["vanilla"]["all-reduce"][0] > 0  # the gradient all-reduce is counted


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(PATHS[0])])
def test_per_device_saving_matches_one_device(sharded_results, case):
  temp = _get(sharded_results, case, "temp")
  shard = _get(sharded_results, case, "shard_temp")
  saving = 1 - temp["fewbit"] / temp["vanilla"]
  reference = 1 - shard["fewbit"] / shard["vanilla"]
  assert reference > 0.1, shard
  assert saving > reference - 0.06, (saving, reference, temp, shard)


@pytest.mark.parametrize("case", [pytest.param(f"{p}-shard_map-{n}", id=f"{p}-{n}")
                                  for p in PATHS for n in ("dense", "gelu")])
def test_inside_a_users_shard_map(sharded_results, case):
  # The plain layer's gradients: the randomized one sums its weight gradient
  # over the devices as autodiff does for an invariant weight.
  assert _get(sharded_results, case, "grad_err") < 1e-5


# --- two processes ------------------------------------------------------------------

def test_two_processes_train_with_no_extra_collective():
  from examples import distributed_lm
  results = distributed_lm.launch(["--steps=3", "--layers=1", "--context=32"], timeout=300)
  assert [r["process"] for r in results] == [0, 1]
  for r in results:
    assert r["devices"] == 8 and r["local_devices"] == 4
    assert all(math.isfinite(l) for l in r["losses"])
  assert results[0]["losses"] == results[1]["losses"]  # one program over both processes
  losses = results[0]["losses"]
  assert losses[-1] < losses[0]
  # Data parallel, so all vanilla training communicates is the gradient (and
  # the loss): one all-reduce of the parameters' size. (The example's
  # --compare-vanilla compiles the vanilla step too and shows the same.)
  c = results[0]["collectives"]["fewbit"]
  assert all(n == 0 for op, (n, _) in c.items() if op != "all-reduce"), c
  n, nbytes = c["all-reduce"]
  assert n >= 1 and results[0]["param_bytes"] <= nbytes <= results[0]["param_bytes"] + 1024, c
