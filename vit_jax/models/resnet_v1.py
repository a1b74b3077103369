"""The ResNet v1.5 backbone of DETR: torchvision's ``resnet50``/``resnet101`` (timm's too) with
frozen batch norm. Not a model family (``models/resnet.py`` is BiT's ResNet-v2).

v1.5: post-activation bottlenecks with the stride on the 3x3 conv; a 7x7/2 root conv, frozen batch
norm, ReLU and a 3x3/2 max pool; PyTorch zero padding. ``dilation`` replaces the last stage's stride
by dilation 2 (DETR's DC5, torchvision's ``replace_stride_with_dilation=[False, False, True]``): its
first unit keeps dilation 1, the others take 2.

Frozen batch norm is ``x * scale + shift`` with ``scale = w * rsqrt(var + 1e-5)`` and
``shift = b - mean * scale``; its four arrays are ``FrozenStat`` variables, model state and not
parameters (PyTorch buffers: no gradient, no optimizer state, not in the parameter count).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models.conv import Conv, conv_out_size, max_pool

BN_EPS = 1e-5
he_normal_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class FrozenStat(nnx.Variable):
  """One array of a frozen batch norm: model state that no optimizer updates."""


class FrozenBatchNorm(nnx.Module):
  """Batch norm with fixed statistics and affine arrays (``scale``, ``bias``, ``mean``, ``var``)."""

  def __init__(self, channels: int, *, eps: float = BN_EPS):
    self.eps = eps
    stat = lambda init: FrozenStat(init((channels,), jnp.float32), out_sharding=("norm",))
    self.scale, self.bias = stat(jnp.ones), stat(jnp.zeros)
    self.mean, self.var = stat(jnp.zeros), stat(jnp.ones)

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
    shift = self.bias[...] - self.mean[...] * scale
    return (x.astype(jnp.float32) * scale + shift).astype(x.dtype)


class DilatedConv(Conv):
  """``conv.Conv`` with PyTorch's zero padding ``dilation * (kernel - 1) // 2`` and a dilation."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, *, rngs: nnx.Rngs,
               stride: int = 1, dilation: int = 1, dtype=jnp.float32):
    super().__init__(in_channels, out_channels, kernel, rngs=rngs, stride=stride,
                     padding=dilation * (kernel - 1) // 2, kernel_init=he_normal_fan_out,
                     dtype=dtype)
    self.padding = tuple(tuple(pair) for pair in self.padding)  # hashable: a static attribute
    self.dilation = dilation

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride),
        self.padding, rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Downsample(nnx.Module):
  """The projection shortcut: 1x1 conv (with the unit's stride) and frozen batch norm."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv = DilatedConv(cin, cout, 1, stride=stride, rngs=rngs, dtype=dtype)
    self.bn = FrozenBatchNorm(cout)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


class Bottleneck(nnx.Module):
  """relu(shortcut(x) + bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))), stride on conv2."""

  def __init__(self, cin: int, planes: int, stride: int, dilation: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.conv1 = DilatedConv(cin, planes, 1, rngs=rngs, dtype=dtype)
    self.bn1 = FrozenBatchNorm(planes)
    self.conv2 = DilatedConv(planes, planes, 3, stride=stride, dilation=dilation, rngs=rngs,
                             dtype=dtype)
    self.bn2 = FrozenBatchNorm(planes)
    self.conv3 = DilatedConv(planes, 4 * planes, 1, rngs=rngs, dtype=dtype)
    self.bn3 = FrozenBatchNorm(4 * planes)
    needs_proj = stride != 1 or cin != 4 * planes
    self.downsample = (Downsample(cin, 4 * planes, stride, rngs=rngs, dtype=dtype) if needs_proj
                       else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    return jax.nn.relu(shortcut + self.bn3(self.conv3(y)))


def stage_strides(num_stages: int, dilation: bool) -> list[tuple[int, int, int]]:
  """(stride, first unit's dilation, other units' dilation) of each stage."""
  out = [(1 if s == 0 else 2, 1, 1) for s in range(num_stages)]
  if dilation and num_stages > 1:
    out[-1] = (1, 1, 2)
  return out


class ResNetV1(nnx.Module):
  """``model(images)`` -> the last stage's features [B, h, w, 4 * width * 2**(stages - 1)].

  Submodules carry torchvision's names: ``conv1``, ``bn1``, ``layer{s}`` (lists of units with
  ``conv{1,2,3}``, ``bn{1,2,3}`` and ``downsample`` holding ``conv`` and ``bn``).
  """

  def __init__(self, layers: tuple[int, ...], *, width: int = 64, channels: int = 3,
               dilation: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
    self.layers = tuple(layers)
    self.conv1 = DilatedConv(channels, width, 7, stride=2, rngs=rngs, dtype=dtype)
    self.bn1 = FrozenBatchNorm(width)
    cin = width
    for s, ((stride, first, rest), units) in enumerate(zip(stage_strides(len(layers), dilation),
                                                            layers)):
      planes = width * 2 ** s
      blocks = []
      for u in range(units):
        blocks.append(Bottleneck(cin, planes, stride if u == 0 else 1, first if u == 0 else rest,
                                 rngs=rngs, dtype=dtype))
        cin = 4 * planes
      setattr(self, f"layer{s + 1}", nnx.List(blocks))
    self.out_channels = cin

  def __call__(self, images: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.bn1(self.conv1(images)))
    x = max_pool(x, 3, 2, 1)  # zero padding is -inf padding here: x >= 0 after the ReLU
    for s in range(len(self.layers)):
      for unit in getattr(self, f"layer{s + 1}"):
        x = unit(x)
    return x


def feature_size(size: int, num_stages: int, dilation: bool) -> int:
  """The feature map's side for an input side ``size``."""
  size = conv_out_size(conv_out_size(size, 7, 2, 3), 3, 2, 1)
  for stride, _, _ in stage_strides(num_stages, dilation):
    size = conv_out_size(size, 3, stride, 1)
  return size


def resnet_v1_flops(layers: tuple[int, ...], width: int, channels: int, height: int, width_px: int,
                    dilation: bool = False) -> int:
  """2 x multiply-adds of ``ResNetV1`` on one [height, width_px] image (every tap counted)."""
  h, w = conv_out_size(height, 7, 2, 3), conv_out_size(width_px, 7, 2, 3)
  flops = 2 * h * w * 49 * channels * width
  h, w = conv_out_size(h, 3, 2, 1), conv_out_size(w, 3, 2, 1)
  cin = width
  for s, ((stride, _, _), units) in enumerate(zip(stage_strides(len(layers), dilation), layers)):
    f = width * 2 ** s
    for u in range(units):
      st = stride if u == 0 else 1
      oh, ow = conv_out_size(h, 3, st, 1), conv_out_size(w, 3, st, 1)
      flops += 2 * (h * w * cin * f + oh * ow * 9 * f * f + oh * ow * f * 4 * f)
      if st != 1 or cin != 4 * f:
        flops += 2 * oh * ow * cin * 4 * f
      h, w, cin = oh, ow, 4 * f
  return flops
