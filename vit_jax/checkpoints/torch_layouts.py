"""Rules for PyTorch module layouts shared by the timm formats of the hybrid, BiT, Mixer and TNT
families: LayerNorm/GroupNorm (``weight`` is our ``scale``), Linear, convolutions."""

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
