"""Hybrid ResNet + ViT (Dosovitskiy et al., 2020, section 3.1): a ViT on a ResNet's feature map.

The ResNet is the post-activation stem of the original code (``resnet.py``), stored under
``resnet/`` with the checkpoint names (``conv_root``, ``gn_root``, ``block{s}/unit{u}/...``); the
transformer is ``vit.VisionTransformer`` itself (same ``embedding``, ``cls``, ``Transformer``,
``head``) with the feature map as its input image: patch size 1 for the R50 and R26 hybrids,
8 for the stem-only "R+ViT-Ti/16".

Names are the published ones: ResNet depth, ViT variant and "/N", which for the R50 and R26
hybrids is the total stride (ResNet stride x patch size): "R50+ViT-B/16" (3 stages of (3, 4, 9)
units), "R50+ViT-L/32" ((3, 4, 6, 3)), "R26+ViT-{S,B}/32" ((2, 2, 2, 2)); "R+ViT-Ti/16" (timm's
``vit_tiny_r_s16_p8``) is the root alone (stride 4) with patches 8. Any ViT variant combines with
these backbones (``BACKBONES``); ``resnet_layers=...`` with ``patch_size=...`` give any other.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from flax import nnx

from vit_jax.models import patches, registry
from vit_jax.models.conv import CONV_RULES
from vit_jax.models.resnet import HYBRID_DEFAULTS, RESNET_TYPES, ResNet, ResNetConfig, resnet_flops
from vit_jax.models.vit import OPTIONS as VIT_OPTIONS
from vit_jax.models.vit import VARIANTS, ViTConfig, VisionTransformer, vit_flops

# (ResNet depth in the name, "/N" of the name) -> (units per stage, patch size on the feature map).
BACKBONES: dict[tuple[str, int], tuple[tuple[int, ...], int]] = {
    ("50", 16): ((3, 4, 9), 1),
    ("50", 32): ((3, 4, 6, 3), 1),
    ("26", 32): ((2, 2, 2, 2), 1),
    ("", 16): ((), 8),
}
# Options of the ResNet part; every other option goes to the ViT part (see vit.ViTConfig).
RESNET_OPTIONS = {"resnet_layers": "layers", "resnet_width": "width", "ws_style": "ws_style",
                  "ws_eps": "ws_eps", "gn_eps": "gn_eps", "gn_groups": "gn_groups",
                  "resnet_padding": "padding"}
OPTIONS = {**VIT_OPTIONS, **{key: RESNET_TYPES[field] for key, field in RESNET_OPTIONS.items()}}


class HybridViT(VisionTransformer):
  """``model(images)``: ResNet features -> patch embedding -> ViT, as ``VisionTransformer``.

  ``config`` is the ViT part's config, whose ``image_size`` and ``channels`` are those of the
  ResNet's feature map; ``resnet.config`` is the ResNet's; ``image_size`` is the input size.
  """

  def __init__(self, resnet_cfg: ResNetConfig, vit_cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.resnet = ResNet(resnet_cfg, rngs=rngs)
    super().__init__(vit_cfg, rngs=rngs)
    self.image_size = resnet_cfg.image_size

  def check_images(self, images: jax.Array) -> None:
    patches.check_images(images, self.image_size, self.resnet.config.channels)

  def embed(self, images: jax.Array) -> jax.Array:
    """ResNet features, then the ViT patch embedding: [B, H, W, C] -> [B, tokens, hidden]."""
    return super().embed(self.resnet.features(images))


def build_hybrid(depth: str, variant: str, stride: int, *, num_classes: int, image_size: int,
                 rngs: nnx.Rngs, overrides: dict[str, Any]) -> HybridViT:
  registry.check_options("hybrid", overrides, OPTIONS)
  overrides = dict(overrides)
  if "resnet_layers" in overrides:
    layers, patch = tuple(overrides["resnet_layers"]), overrides.get("patch_size", 1)
  elif (depth, stride) in BACKBONES:
    layers, patch = BACKBONES[(depth, stride)]
  else:
    known = ", ".join(f"R{d}+ViT-*/{s}" for d, s in BACKBONES)
    raise ValueError(f"no hybrid backbone R{depth}+ViT-*/{stride}; known: {known} "
                     f"(or give resnet_layers=... and patch_size=...)")
  resnet_kwargs = {**HYBRID_DEFAULTS, "layers": layers,
                   "channels": overrides.pop("channels", 3),
                   "dtype": overrides.get("dtype", "float32")}
  for key, field in RESNET_OPTIONS.items():
    if key in overrides:
      resnet_kwargs[field] = overrides.pop(key)
  resnet_cfg = ResNetConfig(image_size=image_size, **resnet_kwargs)
  feature = resnet_cfg.feature_size()
  vit_kwargs = {**VARIANTS[variant], "patch_size": patch, **overrides}
  if feature % vit_kwargs["patch_size"]:
    raise ValueError(f"image_size {image_size} gives a {feature}x{feature} ResNet feature map, "
                     f"not a multiple of the patch size {vit_kwargs['patch_size']}")
  vit_cfg = ViTConfig(num_classes=num_classes, image_size=feature,
                      channels=resnet_cfg.out_channels, **vit_kwargs)
  return HybridViT(resnet_cfg, vit_cfg, rngs=rngs)


def hybrid_flops(model: HybridViT) -> int:
  """2 x multiply-adds per image: the ResNet stem, then the ViT on its feature map."""
  return resnet_flops(model.resnet.config) + vit_flops(model)


def _build(match: re.Match, **kwargs) -> HybridViT:
  return build_hybrid(match["depth"] or "", match["variant"], int(match["stride"]), **kwargs)


registry.register_family(
    "Hybrid",
    pattern=r"R(?P<depth>\d*)\+ViT-(?P<variant>Ti|S|B|L|H|g)[/_](?P<stride>\d+)",
    build=_build,
    examples=("R50+ViT-B/16", "R50+ViT-L/32", "R26+ViT-S/32", "R26+ViT-B/32", "R+ViT-Ti/16"),
    help="R50+ViT-<variant>/{16,32}, R26+ViT-<variant>/32, R+ViT-<variant>/16: ResNet stem + ViT",
    sizes=BACKBONES,  # the ViT part takes its sizes from vit.VARIANTS
    flops=hybrid_flops,
    sharding_rules=CONV_RULES,
    options=OPTIONS,
    checkpoint_family="Hybrid",
)
