"""Convolutions, weight standardisation, GroupNorm and max pooling (NHWC, HWIO kernels).

Used by the ResNets (``resnet.py``: the hybrids' stem and BiT) and by TNT's pixel embedding.
Kernels are (kh, kw, in, out) with logical axes (None, None, "conv_in", "conv_out").
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models.layers import Initializer, lecun_normal, param, zeros

# "std": (w - mean) / (std + eps), the original ViT hybrid code (eps 1e-5).
# "var": (w - mean) / sqrt(var + eps), timm's StdConv2d / StdConv2dSame (eps 1e-8 for BiT and hybrids).
WS_STYLES = ("std", "var")
CONV_AXES = (None, None, "conv_in", "conv_out")
# Sharding of those axes (``vit_jax.train.sharding``): FSDP splits the output channels.
CONV_RULES = (("conv_in", None), ("conv_out", "fsdp"))


def weight_standardize(w: jax.Array, style: str, eps: float) -> jax.Array:
  """Standardises a HWIO kernel per output channel over (h, w, in)."""
  w = w.astype(jnp.float32)
  mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  w = w - mean
  var = jnp.mean(jnp.square(w), axis=(0, 1, 2), keepdims=True)
  if style == "std":
    return w / (jnp.sqrt(var) + eps)
  if style == "var":
    return w * jax.lax.rsqrt(var + eps)
  raise ValueError(f"weight standardisation style {style!r} is not one of {WS_STYLES}")


def _padding(padding: str | int, kernel: int) -> str | tuple[tuple[int, int], ...]:
  if padding == "SAME":  # TensorFlow SAME: the extra pixel (if any) goes after
    return "SAME"
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))  # a tuple: the graph definition stays hashable
  raise ValueError(f"conv padding {padding!r} must be 'SAME' or an int (symmetric pixels); "
                   f"kernel {kernel}")


class Conv(nnx.Module):
  """2D convolution on NHWC inputs, optionally with weight standardisation (``ws_style``).

  ``padding``: "SAME" (TensorFlow, as the original ViT hybrid) or an int of symmetric
  zero padding (PyTorch, as timm's BiT ResNets and TNT).
  """

  def __init__(self, in_channels: int, out_channels: int, kernel: int, *, rngs: nnx.Rngs,
               stride: int = 1, padding: str | int = "SAME", use_bias: bool = False,
               ws_style: str | None = None, ws_eps: float = 1e-5,
               kernel_init: Initializer = lecun_normal, dtype=jnp.float32,
               axes: Sequence[str | None] = CONV_AXES):
    if ws_style is not None and ws_style not in WS_STYLES:
      raise ValueError(f"weight standardisation style {ws_style!r} is not one of {WS_STYLES}")
    self.stride = stride
    self.padding = _padding(padding, kernel)
    self.ws_style, self.ws_eps = ws_style, ws_eps
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, (kernel, kernel, in_channels, out_channels), tuple(axes))
    self.bias = param(rngs, zeros, (out_channels,), (axes[-1],)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel[...]
    if self.ws_style is not None:
      w = weight_standardize(w, self.ws_style, self.ws_eps)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), w.astype(self.dtype), (self.stride, self.stride), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class GroupNorm(nnx.Module):
  """GroupNorm over (H, W, channels of a group); statistics in float32."""

  def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-6, rngs: nnx.Rngs,
               dtype=jnp.float32, scale_init: Initializer = jax.nn.initializers.ones):
    if channels % groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups; "
                       f"set gn_groups to a divisor of the ResNet widths")
    self.groups, self.eps, self.dtype = groups, eps, dtype
    self.scale = nnx.Param(scale_init(rngs.params(), (channels,), jnp.float32), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x32 = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 4), keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def max_pool(x: jax.Array, window: int, stride: int, padding: str | int) -> jax.Array:
  """Max pooling. "SAME": TensorFlow SAME (pads with -inf); an int pads with that many zeros
  on every side first (timm's BiT "fixed" stem: ``ConstantPad2d(1, 0)`` + ``MaxPool2d(3, 2)``)."""
  if padding == "SAME":
    pad = "SAME"
  elif isinstance(padding, int):
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    pad = "VALID"
  else:
    raise ValueError(f"max_pool padding {padding!r} must be 'SAME' or an int")
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                               (1, window, window, 1), (1, stride, stride, 1), pad)


def conv_out_size(size: int, kernel: int, stride: int, padding: str | int) -> int:
  """Spatial size after a conv or pool with this padding."""
  if padding == "SAME":
    return -(-size // stride)
  return (size + 2 * padding - kernel) // stride + 1
