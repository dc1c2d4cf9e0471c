"""Small transformers written the plain way, for converting without editing them.

An NNX one (``nnx.Linear`` everywhere, ``nnx.gelu`` called inline) and a
linen one (``nn.Dense``, ``nn.gelu`` inline, ``@nn.compact``), pre-LN,
with what converting and measuring them needs: data, the loss, the
blocks' module-path patterns, per-layer kernel gradients and their cosine
similarities, and the remat rows (the linen transformer's gradient step with
each remat choice). ``benchmarks/bench_convert.py`` measures them;
tests/test_linen_convert.py, tests/test_nnx_convert.py and tests/test_remat.py
check the same models.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fewbit_jax as fb
import fewbit_jax.linen  # noqa: F401
import fewbit_jax.nnx  # noqa: F401
from fewbit_jax.patch import patch_activations
from fewbit_jax.remat import checkpoint_policy

# The blocks' layers, not the head: a regular expression on module paths.
NNX_BLOCKS = r"^/layers/\d+/"
LINEN_BLOCKS = r"^/Block_\d+/"


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the transformer and its batch."""
  d_model: int = 256
  heads: int = 4
  hidden: int = 1024
  layers: int = 4
  out: int = 16
  batch: int = 8
  seq: int = 128

  @classmethod
  def tiny(cls) -> "Config":
    return cls(d_model=32, heads=2, hidden=128, layers=2, out=4, batch=2, seq=32)


class NnxAttention(nnx.Module):
  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.q = nnx.Linear(d, d, rngs=rngs)
    self.k = nnx.Linear(d, d, rngs=rngs)
    self.v = nnx.Linear(d, d, rngs=rngs)
    self.o = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d // self.heads).astype(np.float32)
    a = nnx.softmax(s, axis=-1)
    return self.o(jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, d))


class NnxMlp(nnx.Module):
  def __init__(self, d: int, hidden: int, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(d, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, d, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)))


class NnxBlock(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.attn = NnxAttention(cfg.d_model, cfg.heads, rngs=rngs)
    self.ln2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.mlp = NnxMlp(cfg.d_model, cfg.hidden, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class NnxTransformer(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.layers = nnx.List([NnxBlock(cfg, rngs=rngs) for _ in range(cfg.layers)])
    self.head = nnx.Linear(cfg.d_model, cfg.out, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.head(x)


class LinenBlock(nn.Module):
  heads: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm()(x)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = (split(nn.Dense(d, name=n)(h)) for n in ("q", "k", "v"))
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d // self.heads).astype(np.float32)
    a = nn.softmax(s, axis=-1)
    x = x + nn.Dense(d, name="o")(jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, d))
    h = nn.LayerNorm()(x)
    return x + nn.Dense(d, name="down")(nn.gelu(nn.Dense(self.hidden, name="up")(h)))


class LinenTransformer(nn.Module):
  cfg: Config
  remat_policy: object = None  # None: no remat; "plain": keep nothing; or a policy

  @nn.compact
  def __call__(self, x):
    block = LinenBlock
    if self.remat_policy is not None:
      policy = None if self.remat_policy == "plain" else self.remat_policy
      block = nn.remat(LinenBlock, policy=policy)
    for i in range(self.cfg.layers):
      x = block(self.cfg.heads, self.cfg.hidden, name=f"Block_{i}")(x)
    return nn.Dense(self.cfg.out, name="head")(x)


def data(cfg: Config, seed: int = 0):
  """(x, target): normal inputs (batch, seq, d_model) and targets (batch, seq, out)."""
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (cfg.batch, cfg.seq, cfg.d_model))
  y = jax.random.normal(ky, (cfg.batch, cfg.seq, cfg.out))
  return x, y


def mse(pred, y):
  """The mean squared error, the models' loss."""
  return jnp.mean((pred - y) ** 2)


def cosine(a, b) -> float:
  """The cosine similarity of two arrays (in float64)."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def kernels(tree) -> dict[str, jax.Array]:
  """'/layers/0/mlp/up' -> the kernel (or its gradient) in an nnx.State or linen params."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if keys and keys[-1] == "value":  # nnx.Variable
      keys = keys[:-1]
    if keys and keys[0] == "params":  # linen
      keys = keys[1:]
    if keys and keys[-1] == "kernel":
      out["/" + "/".join(keys[:-1])] = leaf
  return out


def convert_nnx(model: NnxTransformer, ratio: float, sketch: str = "gaussian", seed: int = 0):
  """The blocks' linear layers as randomized linear layers, in place."""
  rngs = nnx.Rngs(sketch=seed)
  return fb.nnx.map_module(
      model, lambda m, path: fb.nnx.convert_linear(m, fb.nnx.RandomizedLinear,
                                                   proj_dim_ratio=ratio, sketch=sketch,
                                                   rngs=rngs),
      pattern=NNX_BLOCKS)


def nnx_grads(model, x, y):
  """The parameter gradients of the loss of `model` (an ``nnx.State``)."""
  return nnx.grad(lambda m: mse(m(x), y))(model)


def cosines(g_vanilla: dict, samples: list[dict]) -> dict[str, tuple[float, float]]:
  """Per layer, the cosine of `g_vanilla` with the first sample and with the samples' mean."""
  out = {}
  for path, g in g_vanilla.items():
    one = cosine(g, samples[0][path])
    mean = cosine(g, np.mean([np.asarray(s[path]) for s in samples], axis=0))
    out[path] = (one, mean)
  return out


# The remat rows: (name, few-bit?, remat choice) of the linen transformer's step.
REMAT_ROWS = (
    ("vanilla", False, None),
    ("few-bit (3-bit GELU + randomized 20%)", True, None),
    ("jax.checkpoint each block (keep nothing)", False, "plain"),
    ("jax.checkpoint each block (keep dots)", False, "dots"),
    ("few-bit + jax.checkpoint (keep nothing)", True, "plain"),
    ("few-bit + fb.checkpoint_policy()", True, "fewbit"),
)


def remat_step(cfg: Config, fewbit: bool, remat: str | None, ratio: float = 0.2,
               bits: int = 3):
  """(jitted grad step, abstract params, (x, y, key), model): one remat choice of the linen
  transformer (`REMAT_ROWS`), few-bit by 3-bit GELU and randomized dense in the blocks."""
  policy = {None: None, "plain": "plain", "fewbit": checkpoint_policy(),
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[remat]
  model = LinenTransformer(cfg, remat_policy=policy)
  x, y = data(cfg)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

  def loss(params, x, y, key):
    return mse(model.apply({"params": params}, x, rngs={"sketch": key}), y)

  def step(params, x, y, key):
    if not fewbit:
      return jax.grad(loss)(params, x, y, key)
    with patch_activations(gelu=bits), fb.linen.intercept(LINEN_BLOCKS, proj_dim_ratio=ratio):
      return jax.grad(loss)(params, x, y, key)

  return jax.jit(step), params, (x, y, jax.random.key(1)), model
