"""ResNets with weight-standardised convolutions and GroupNorm, in the two forms the references use.

* Post-activation (``preact=False``): the ResNet stem of the original ViT hybrids
  (google-research/vision_transformer ``models_resnet.py``): TensorFlow SAME padding, weight
  standardisation ``(w - mean) / (std + 1e-5)``, GroupNorm eps 1e-6. Parameter names follow its
  checkpoints: ``conv_root``, ``gn_root``, ``block{s}/unit{u}/{conv,gn}{1,2,3}``, ``conv_proj``,
  ``gn_proj``.
* Pre-activation (``preact=True``): BiT, as timm's ``resnetv2_*_bit``: PyTorch symmetric padding,
  the "fixed" stem pool (zero pad 1, max pool 3/2), weight standardisation
  ``(w - mean) / sqrt(var + 1e-8)``, GroupNorm eps 1e-5, a final GroupNorm+ReLU, global average
  pooling and a (zero-initialised) linear ``head``.

Every epsilon and the standardisation formula are options (``ws_style``, ``ws_eps``, ``gn_eps``),
so each form can also reproduce the other reference's numerics.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import registry
from vit_jax.models.conv import CONV_RULES, WS_STYLES, Conv, GroupNorm, conv_out_size, max_pool
from vit_jax.models.layers import DTYPES, Dense, check_dtype, lecun_normal, zeros

PADDINGS = ("same", "symmetric")
he_normal_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Units per stage of the bottleneck ResNets.
DEPTHS: dict[int, tuple[int, ...]] = {
    26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """A bottleneck ResNet: root conv + pool, then ``layers[i]`` units per stage.

  Stage ``i`` outputs ``4 * width * 2**i`` channels (``width`` is the root width: 64 times the
  BiT width factor). ``layers=()`` keeps only the root (the "R+ViT-Ti" stem).
  """
  layers: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  channels: int = 3
  preact: bool = True
  padding: str = "symmetric"
  ws_style: str = "var"
  ws_eps: float = 1e-8
  gn_eps: float = 1e-5
  gn_groups: int = 32
  dtype: str = "float32"
  num_classes: int | None = None
  image_size: int = 224

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
    if self.padding not in PADDINGS:
      raise ValueError(f"padding {self.padding!r} is not one of {PADDINGS}")
    if self.ws_style not in WS_STYLES:
      raise ValueError(f"ws_style {self.ws_style!r} is not one of {WS_STYLES}")
    check_dtype(self.dtype)
    if any(n < 1 for n in self.layers):
      raise ValueError(f"layers {self.layers}: every stage needs at least one unit")

  @property
  def out_channels(self) -> int:
    return 4 * self.width * 2 ** (len(self.layers) - 1) if self.layers else self.width

  def conv_padding(self, kernel: int) -> str | int:
    """Padding of a ``kernel`` x ``kernel`` conv or pool: TensorFlow "SAME" or symmetric pixels."""
    return "SAME" if self.padding == "same" else (kernel - 1) // 2

  def feature_size(self, image_size: int | None = None) -> int:
    """Spatial size of the output feature map for square inputs of ``image_size``."""
    size = image_size or self.image_size
    size = conv_out_size(size, 7, 2, self.conv_padding(7))
    size = conv_out_size(size, 3, 2, self.conv_padding(3))
    for i in range(1, len(self.layers)):
      size = conv_out_size(size, 3, 2, self.conv_padding(3))
    return size


def _conv(cfg: ResNetConfig, cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs) -> Conv:
  return Conv(cin, cout, kernel, stride=stride, padding=cfg.conv_padding(kernel),
              ws_style=cfg.ws_style, ws_eps=cfg.ws_eps, rngs=rngs, dtype=DTYPES[cfg.dtype],
              kernel_init=he_normal_fan_out if cfg.preact else lecun_normal)


def _gn(cfg: ResNetConfig, channels: int, rngs: nnx.Rngs, zero_scale: bool = False) -> GroupNorm:
  return GroupNorm(channels, groups=cfg.gn_groups, eps=cfg.gn_eps, rngs=rngs, dtype=DTYPES[cfg.dtype],
                   scale_init=zeros if zero_scale else jax.nn.initializers.ones)


class BottleneckUnit(nnx.Module):
  """Post-activation bottleneck (original ViT hybrid): relu(proj(x) + gn3(conv3(...)))."""

  def __init__(self, cfg: ResNetConfig, cin: int, features: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(cfg, cin, features, 1, 1, rngs)
    self.gn1 = _gn(cfg, features, rngs)
    self.conv2 = _conv(cfg, features, features, 3, stride, rngs)
    self.gn2 = _gn(cfg, features, rngs)
    self.conv3 = _conv(cfg, features, 4 * features, 1, 1, rngs)
    self.gn3 = _gn(cfg, 4 * features, rngs, zero_scale=True)
    if cin != 4 * features or stride != 1:
      self.conv_proj = _conv(cfg, cin, 4 * features, 1, stride, rngs)
      self.gn_proj = _gn(cfg, 4 * features, rngs)
    else:
      self.conv_proj = self.gn_proj = None

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
    y = jax.nn.relu(self.gn1(self.conv1(x)))
    y = jax.nn.relu(self.gn2(self.conv2(y)))
    y = self.gn3(self.conv3(y))
    return jax.nn.relu(residual + y)


class PreActUnit(nnx.Module):
  """Pre-activation bottleneck (BiT / timm ``PreActBottleneck``): x + conv3(relu(gn3(...)))."""

  def __init__(self, cfg: ResNetConfig, cin: int, features: int, stride: int, *, rngs: nnx.Rngs):
    self.gn1 = _gn(cfg, cin, rngs)
    self.conv1 = _conv(cfg, cin, features, 1, 1, rngs)
    self.gn2 = _gn(cfg, features, rngs)
    self.conv2 = _conv(cfg, features, features, 3, stride, rngs)
    self.gn3 = _gn(cfg, features, rngs)
    self.conv3 = _conv(cfg, features, 4 * features, 1, 1, rngs)
    needs_proj = cin != 4 * features or stride != 1
    self.conv_proj = _conv(cfg, cin, 4 * features, 1, stride, rngs) if needs_proj else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x_pre = jax.nn.relu(self.gn1(x))
    shortcut = x if self.conv_proj is None else self.conv_proj(x_pre)
    y = self.conv1(x_pre)
    y = self.conv2(jax.nn.relu(self.gn2(y)))
    y = self.conv3(jax.nn.relu(self.gn3(y)))
    return y + shortcut


class ResNetStage(nnx.Module):
  """``num_units`` units named ``unit1``, ``unit2``, ... (the checkpoint names)."""

  def __init__(self, cfg: ResNetConfig, cin: int, features: int, num_units: int, stride: int, *,
               rngs: nnx.Rngs):
    unit = PreActUnit if cfg.preact else BottleneckUnit
    self.num_units = num_units
    for u in range(num_units):
      setattr(self, f"unit{u + 1}", unit(cfg, cin if u == 0 else 4 * features, features,
                                         stride if u == 0 else 1, rngs=rngs))

  def __call__(self, x: jax.Array) -> jax.Array:
    for u in range(self.num_units):
      x = getattr(self, f"unit{u + 1}")(x)
    return x


class ResNet(nnx.Module):
  """A weight-standardised ResNet; with ``num_classes`` a classifier (BiT), else a feature stem.

  ``features(images)`` gives the last stage's feature map [B, h, w, out_channels] (for BiT after
  the final GroupNorm+ReLU); ``model(images)`` gives logits (needs ``num_classes``).
  """

  def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.conv_root = _conv(cfg, cfg.channels, cfg.width, 7, 2, rngs)
    self.gn_root = None if cfg.preact else _gn(cfg, cfg.width, rngs)
    cin = cfg.width
    for s, num_units in enumerate(cfg.layers):
      features = cfg.width * 2 ** s
      setattr(self, f"block{s + 1}", ResNetStage(cfg, cin, features, num_units, 1 if s == 0 else 2,
                                                 rngs=rngs))
      cin = 4 * features
    self.gn_final = _gn(cfg, cin, rngs) if cfg.preact else None
    if cfg.num_classes:
      self.head = Dense(cin, cfg.num_classes, axes=("embed", "classes"), rngs=rngs,
                        kernel_init=zeros, dtype=DTYPES[cfg.dtype])
    else:
      self.head = None

  def check_images(self, images: jax.Array) -> None:
    c = self.config.channels
    if images.ndim != 4 or images.shape[-1] != c:
      raise ValueError(f"images of shape {tuple(images.shape)} do not fit this ResNet: it takes NHWC "
                       f"batches with {c} channels")

  def features(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    self.check_images(images)
    x = self.conv_root(images)
    if self.gn_root is not None:
      x = jax.nn.relu(self.gn_root(x))
    x = max_pool(x, 3, 2, cfg.conv_padding(3))
    for s in range(len(cfg.layers)):
      x = getattr(self, f"block{s + 1}")(x)
    if self.gn_final is not None:
      x = jax.nn.relu(self.gn_final(x))
    return x

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del train, rngs  # no dropout in these ResNets
    if self.head is None:
      raise ValueError("this ResNet was built without num_classes (a feature stem): call .features()")
    x = jnp.mean(self.features(images).astype(jnp.float32), axis=(1, 2))
    return self.head(x).astype(jnp.float32)


BIT_DEFAULTS = dict(preact=True, padding="symmetric", ws_style="var", ws_eps=1e-8, gn_eps=1e-5)
HYBRID_DEFAULTS = dict(preact=False, padding="same", ws_style="std", ws_eps=1e-5, gn_eps=1e-6)
# Option name -> type of every ResNetConfig field (the BiT and hybrid options are some of them).
RESNET_TYPES = registry.config_options(ResNetConfig, exclude=())
BIT_OPTIONS = {name: RESNET_TYPES[name] for name in ("layers", "width", "channels", "padding",
                                                      "ws_style", "ws_eps", "gn_eps", "gn_groups",
                                                      "dtype")}


def resnet_flops(cfg: ResNetConfig) -> int:
  """2 x multiply-adds per image of a bottleneck ResNet (BiT or a hybrid's stem): the
  convolutions as in ``ResNet`` (every tap, padding included), then the head if any."""
  size = conv_out_size(cfg.image_size, 7, 2, cfg.conv_padding(7))
  flops = 2 * size * size * 49 * cfg.channels * cfg.width
  size = conv_out_size(size, 3, 2, cfg.conv_padding(3))  # max pool
  cin = cfg.width
  for s, units in enumerate(cfg.layers):
    f = cfg.width * 2 ** s
    for u in range(units):
      stride = 2 if (s > 0 and u == 0) else 1
      out = conv_out_size(size, 3, stride, cfg.conv_padding(3))
      flops += 2 * (size * size * cin * f + out * out * 9 * f * f + out * out * f * 4 * f)
      if cin != 4 * f or stride != 1:
        flops += 2 * out * out * cin * 4 * f
      size, cin = out, 4 * f
  return flops + (2 * cin * cfg.num_classes if cfg.num_classes else 0)


def _build_bit(match: re.Match, *, num_classes: int, image_size: int, rngs: nnx.Rngs,
               overrides: dict[str, Any]) -> ResNet:
  depth, factor = int(match["depth"]), int(match["factor"])
  if depth not in DEPTHS:
    raise ValueError(f"BiT-R{depth}x{factor}: depth {depth} is not one of {sorted(DEPTHS)}")
  registry.check_options("BiT", overrides, BIT_OPTIONS,
                         " (a ReLU ResNet has no GELU, dropout or attention options)")
  kwargs = {**BIT_DEFAULTS, "layers": DEPTHS[depth], "width": 64 * factor, **overrides}
  cfg = ResNetConfig(num_classes=num_classes, image_size=image_size, **kwargs)
  return ResNet(cfg, rngs=rngs)


registry.register_family(
    "BiT",
    pattern=r"BiT-R(?P<depth>\d+)x(?P<factor>\d+)",
    build=_build_bit,
    examples=("BiT-R50x1", "BiT-R50x3", "BiT-R101x1", "BiT-R101x3", "BiT-R152x2"),
    help="BiT-R{26,50,101,152}x<width factor>: pre-activation ResNetV2 (timm resnetv2_*_bit)",
    sizes=DEPTHS,
    flops=lambda model: resnet_flops(model.config),
    sharding_rules=CONV_RULES,
    options=BIT_OPTIONS,
    checkpoint_family="BiT",
)
