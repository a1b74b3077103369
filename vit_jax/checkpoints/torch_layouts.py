"""Rules for PyTorch module layouts shared by the timm formats of the hybrid, BiT, Mixer and TNT
families and the transformers/original formats of YOLOS and DETR: LayerNorm/GroupNorm
(``weight`` is our ``scale``), Linear, convolutions."""

from __future__ import annotations

import numpy as np

from vit_jax.checkpoints.mapping import Rule, rename
from vit_jax.checkpoints.timm_names import bias, conv, fit, linear


def norm(src: str, dst: str) -> tuple[Rule, ...]:
  """torch LayerNorm/GroupNorm ``src`` -> our ``dst/{scale,bias}``."""
  return (rename(f"{src}.weight", f"{dst}/scale"), rename(f"{src}.bias", f"{dst}/bias"))


def dense(src: str, dst: str, use_bias: bool = True) -> tuple[Rule, ...]:
  """torch Linear ``src`` [out, in] -> our Dense ``dst`` [in, out] (reshaped to the model's)."""
  rules = (Rule(f"{src}.weight", f"{dst}/kernel", load=linear, save=None),)
  return rules + ((Rule(f"{src}.bias", f"{dst}/bias", load=bias, save=None),) if use_bias else ())


def to_torch_linear(n_in: int):
  """Save function: our Dense kernel (its first ``n_in`` axes the input) -> a torch Linear weight
  [out, in]."""
  def save(arrays):
    k = arrays[0]
    return [k.reshape(int(np.prod(k.shape[:n_in])), -1).T]
  return save


def flat(arrays):
  """Save function: an array -> its flat copy (a torch bias)."""
  return [arrays[0].reshape(-1)]


def to_torch_conv(arrays):
  """Save function: our conv kernel HWIO -> a torch Conv2d weight OIHW."""
  return [arrays[0].transpose(3, 2, 0, 1)]


def dense_both_ways(src: str, dst: str, n_in: int = 1) -> tuple[Rule, ...]:
  """torch Linear ``src`` <-> our Dense ``dst`` (``n_in`` input axes), loaded and exported."""
  return (Rule(f"{src}.weight", f"{dst}/kernel", load=linear, save=to_torch_linear(n_in)),
          Rule(f"{src}.bias", f"{dst}/bias", load=bias, save=flat))


def conv_kernel(src: str, dst: str) -> Rule:
  """torch Conv2d weight OIHW -> our kernel HWIO."""
  return Rule(src, dst, load=conv, save=None)


def conv1x1_as_dense(arrays, shapes):
  """A torch 1x1 Conv2d weight [out, in, 1, 1] -> our Dense kernel [in, out]."""
  a = arrays[0]
  return [fit(a.reshape(a.shape[0], -1).T, shapes[0])]


def channels_last(arrays, shapes):
  """A torch [1, C, H, W] parameter -> ours [1, H, W, C]."""
  a = arrays[0]
  return [fit(np.moveaxis(a, 1, -1), shapes[0]) if a.ndim == 4 else a]
