"""fb.softmax and fb.dot_product_attention on 8 simulated CPU devices.

Batch- and head-sharded inputs (a 2 x 4 ``('data', 'model')`` mesh), under
``AxisType.Auto`` and ``AxisType.Explicit``: the gradients keep the inputs'
sharding, the compiled program holds no collective beyond flax's (none:
attention is local to a batch row and a head), and the results equal one
device's. The device count is fixed when JAX starts: one subprocess runs all.
"""

from __future__ import annotations

import os
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent(r"""
  import functools, json
  import jax, jax.numpy as jnp, numpy as np
  import flax.linen as nn
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import fewbit_jax as fb

  assert jax.device_count() == 8, jax.devices()
  ks = jax.random.split(jax.random.key(0), 6)
  q, k, v, ct = (jax.random.normal(kk, (8, 32, 8, 16)) for kk in ks[:4])
  mask = (jnp.arange(32)[None, None, None] < jnp.arange(20, 28)[:, None, None, None])
  scores = jax.random.normal(ks[5], (8, 8, 32, 32))
  qkv_spec, mask_spec, score_spec = P("data", None, "model"), P("data"), P("data", "model")
  fast = fb.memory.MEMORY_ONLY

  def attention_grads(fn, **kw):
    def loss(q, k, v, mask, key):
      return (fn(q, k, v, mask=mask, dropout_rng=key, dropout_rate=0.1, **kw) * ct).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  def softmax_grads(fn):
    return jax.jit(jax.value_and_grad(
        lambda s, m: (fn(s, where=m) * scores[..., ::-1]).sum()))

  cases = {
      "flax": lambda: attention_grads(nn.dot_product_attention),
      "fb": lambda: attention_grads(fb.dot_product_attention),
      "fb per-head dropout": lambda: attention_grads(fb.dot_product_attention,
                                                     broadcast_dropout=False),
      "fb blocks": lambda: attention_grads(fb.dot_product_attention, recompute_block=8),
      "jax softmax": lambda: softmax_grads(jax.nn.softmax),
      "fb softmax": lambda: softmax_grads(fb.softmax),
  }
  smask = jnp.broadcast_to(mask, scores.shape)
  args = {"attention": (q, k, v, mask, ks[4]), "softmax": (scores, smask)}
  specs = {"attention": (qkv_spec,) * 3 + (mask_spec, P()), "softmax": (score_spec,) * 2}

  out, fns, one_device = {}, {}, {}
  for name, make in cases.items():
    kind = "softmax" if "softmax" in name else "attention"
    fns[name] = make()
    one_device[name] = fns[name](*args[kind])
  for mesh_name in ("Auto", "Explicit"):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(getattr(AxisType, mesh_name),) * 2)
    for name, f in fns.items():
      kind = "softmax" if "softmax" in name else "attention"
      one_loss, one_grads = one_device[name]
      with jax.set_mesh(mesh):
        sharded = [jax.device_put(a, NamedSharding(mesh, s))
                   for a, s in zip(args[kind], specs[kind])]
        compiled = f.lower(*sharded).compile(fast)
        loss, grads = compiled(*sharded)
      grads = grads if isinstance(grads, tuple) else (grads,)
      one_grads = one_grads if isinstance(one_grads, tuple) else (one_grads,)
      out[f"{mesh_name} {name}"] = dict(
          collectives=fb.memory.collectives(compiled),
          loss=[float(loss), float(one_loss)],
          grad_err=max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                       for a, b in zip(grads, one_grads)),
          same_sharding=all(g.sharding.is_equivalent_to(a.sharding, a.ndim)
                            for g, a in zip(grads, sharded)))
  print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def results(on_8_devices):
  return on_8_devices(_SCRIPT)


@pytest.mark.parametrize("mesh", ["Auto", "Explicit"])
@pytest.mark.parametrize("name", ["fb", "fb per-head dropout", "fb blocks", "fb softmax"])
def test_lean_attention_sharded_like_one_device(results, mesh, name):
  r = results[f"{mesh} {name}"]
  vanilla = results[f"{mesh} {'jax softmax' if 'softmax' in name else 'flax'}"]
  assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5)
  assert r["grad_err"] < 1e-5
  assert r["same_sharding"]
  # No collective beyond the vanilla op's (count and bytes of each kind).
  for kind, (count, nbytes) in r["collectives"].items():
    assert count <= vanilla["collectives"].get(kind, (0, 0))[0], (kind, r, vanilla)


# Decoder attention: 8 query heads sharing 4 key/value heads (grouped), a
# padding mask [B, 1, 1, S] with is_causal, a sliding window and a soft-cap,
# against the einsum way (the query heads grouped, the mask broadcast). Heads sharded
# over 'model' (4 key/value heads, one per device), batch over 'data'.
_DECODER_SCRIPT = textwrap.dedent(r"""
  import json
  import jax, jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import fewbit_jax as fb

  assert jax.device_count() == 8, jax.devices()
  ks = jax.random.split(jax.random.key(0), 4)
  q, ct = (jax.random.normal(kk, (4, 32, 8, 16)) for kk in ks[:2])
  k, v = (jax.random.normal(kk, (4, 32, 4, 16)) for kk in ks[2:])
  pad = (jnp.arange(32)[None] < jnp.array([32, 28, 24, 30])[:, None])[:, None, None]
  pos = jnp.arange(32)
  near = (pos[None] <= pos[:, None]) & (pos[:, None] <= pos[None] + 8)
  fast = {"xla_backend_optimization_level": 0}

  def einsum_way(q, k, v, mask):  # grouped (jnp.repeat needs an out_sharding when Explicit)
    w = jnp.einsum("btkgh,bskh->bkgts", q.reshape(4, 32, 4, 2, 16) / 4.0, k)
    w = jnp.tanh(w / 20.0) * 20.0
    w = jnp.where((mask & near)[:, None], w, jnp.finfo(w.dtype).min)
    return jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(w), v).reshape(q.shape)

  def grads(fn):
    loss = lambda q, k, v, mask: (fn(q, k, v, mask) * ct).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  kw = dict(is_causal=True, local_window_size=(8, 0), soft_cap=20.0)
  fns = {
      "einsum": grads(einsum_way),
      "fb": grads(lambda q, k, v, m: fb.dot_product_attention(q, k, v, mask=m, **kw)),
      "fb blocks": grads(lambda q, k, v, m: fb.dot_product_attention(
          q, k, v, mask=m, recompute_block=8, **kw)),
  }
  args = (q, k, v, pad)
  specs = (P("data", None, "model"),) * 3 + (P("data"),)
  one_device = {name: f(*args) for name, f in fns.items()}
  out = {}
  for mesh_name in ("Auto", "Explicit"):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(getattr(AxisType, mesh_name),) * 2)
    for name, f in fns.items():
      with jax.set_mesh(mesh):
        sharded = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
        compiled = f.lower(*sharded).compile(fast)
        loss, g = compiled(*sharded)
      one_loss, one_grads = one_device[name]
      ref_loss, ref_grads = one_device["einsum"]
      out[f"{mesh_name} {name}"] = dict(
          collectives=fb.memory.collectives(compiled),
          loss=[float(loss), float(one_loss), float(ref_loss)],
          grad_err=max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                       for a, b in zip(g, one_grads)),
          ref_err=max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                      for a, b in zip(g, ref_grads)),
          same_sharding=all(x.sharding.is_equivalent_to(a.sharding, a.ndim)
                            for x, a in zip(g, sharded[:3])))
  print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def decoder_results(on_8_devices):
  return on_8_devices(_DECODER_SCRIPT)


@pytest.mark.parametrize("mesh", ["Auto", "Explicit"])
@pytest.mark.parametrize("name", ["fb", "fb blocks"])
def test_decoder_attention_sharded_like_one_device(decoder_results, mesh, name):
  r, vanilla = decoder_results[f"{mesh} {name}"], decoder_results[f"{mesh} einsum"]
  assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5)
  assert r["loss"][0] == pytest.approx(r["loss"][2], rel=1e-5)   # the einsum way's
  assert r["grad_err"] < 1e-5 and r["ref_err"] < 1e-4, r
  assert r["same_sharding"]
  for kind, (count, nbytes) in r["collectives"].items():
    assert count <= vanilla["collectives"].get(kind, (0, 0))[0], (kind, r, vanilla)
