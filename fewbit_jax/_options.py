"""The sketch options of the randomized flax layers, checked once, in one record.

`RandomizedDense`, the NNX layers, ``fewbit_jax.linen.intercept`` and
``fewbit_jax.nnx.convert_linear`` all take the same six sketch options
(``proj_dim_ratio``, ``proj_dim``, ``proj_dim_min``, ``proj_dim_max``,
``sketch``, ``sketch_blocks``). `SketchOptions` holds them, checks them when
it is made (so a bad option raises where the layer is built, not at its
first call) and gives them to `fewbit_jax.dense.randomized_dense` and its
general twins as keyword arguments. The checks are the array functions' own
validators, imported here only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from fewbit_jax._projection import check_blocks_arg
from fewbit_jax.dense import projection_dim
from fewbit_jax.sketch import check_kind

__all__ = ["SketchOptions", "check_no_dot_general"]


@dataclasses.dataclass(frozen=True)
class SketchOptions:
  """The sketch of a randomized layer: its size, kind and row blocks.

  The fields and defaults are those of the layers (see
  `fewbit_jax.dense.randomized_dense` for their meaning). Making one checks
  them: an unknown kind, a bad size or bad blocks raise the ValueError of the
  validator that knows the option.

  Example:
    >>> from fewbit_jax._options import SketchOptions
    >>> SketchOptions(proj_dim=8, sketch="countsketch").kwargs()["proj_dim_ratio"] is None
    True
    >>> SketchOptions(proj_dim_ratio=2.0)
    Traceback (most recent call last):
    ValueError: proj_dim_ratio=2.0 must be a number in (0, 1]: ...
  """

  proj_dim_ratio: float | None = 0.2
  proj_dim: int | None = None
  proj_dim_min: int | None = None
  proj_dim_max: int | None = None
  sketch: str = "gaussian"
  sketch_blocks: int | str | tuple[str, ...] | None = None

  def __post_init__(self):
    check_kind(self.sketch)
    projection_dim(1, proj_dim_ratio=self.proj_dim_ratio, proj_dim=self.proj_dim,
                   proj_dim_min=self.proj_dim_min, proj_dim_max=self.proj_dim_max)
    check_blocks_arg(self.sketch_blocks)

  @classmethod
  def of(cls, layer: Any) -> SketchOptions:
    """The options a layer holds as attributes of the same names.

    Example:
      >>> import types
      >>> from fewbit_jax._options import SketchOptions
      >>> layer = types.SimpleNamespace(**vars(SketchOptions(proj_dim=4)))
      >>> SketchOptions.of(layer).proj_dim
      4
    """
    return cls(**{f.name: getattr(layer, f.name) for f in dataclasses.fields(cls)})

  @classmethod
  def among(cls, kwargs: Mapping[str, Any]) -> SketchOptions:
    """The options among a layer's keyword arguments; those not there take the defaults.

    Example:
      >>> from fewbit_jax._options import SketchOptions
      >>> SketchOptions.among(dict(sketch="dct", use_bias=False)).sketch
      'dct'
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})

  def kwargs(self) -> dict[str, Any]:
    """The keyword arguments of `fewbit_jax.dense.randomized_dense` and its general twins.

    ``proj_dim`` takes precedence over the ratio, so the ratio is dropped
    when both are given.

    Example:
      >>> from fewbit_jax._options import SketchOptions
      >>> SketchOptions(sketch_blocks=2).kwargs()
      {'proj_dim_ratio': 0.2, 'proj_dim': None, 'proj_dim_min': None,
       'proj_dim_max': None, 'sketch': 'gaussian', 'sketch_blocks': 2}
    """
    return dict(proj_dim_ratio=None if self.proj_dim is not None else self.proj_dim_ratio,
                proj_dim=self.proj_dim, proj_dim_min=self.proj_dim_min,
                proj_dim_max=self.proj_dim_max, sketch=self.sketch,
                sketch_blocks=self.sketch_blocks)


def check_no_dot_general(owner: str, dot_general) -> None:
  """Raises unless `dot_general` is None: a randomized layer computes its own matmuls.

  Example:
    >>> from fewbit_jax._options import check_no_dot_general
    >>> check_no_dot_general("RandomizedDense", None)
    >>> check_no_dot_general("RandomizedDense", print)
    Traceback (most recent call last):
    ValueError: RandomizedDense does not take a custom dot_general: ...
  """
  if dot_general is not None:
    raise ValueError(
        f"{owner} does not take a custom dot_general: its backward pass computes the "
        "gradients with its own matmuls, which would not match yours. Keep the plain "
        "layer (nn.Dense / nnx.Linear) where you need a custom dot_general.")
