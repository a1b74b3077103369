"""The hybrids (``models/vit_hybrid.py``): the original npz format and timm's names.

* Original npz (google-research/vision_transformer): the ResNet at the top level
  (``conv_root``, ``gn_root``, ``block{s}/unit{u}/...``; ours under ``resnet/``), then the ViT's
  original names (``npz_vit.RULES``). Written back by ``export_npz(model, path)``.
* timm ``vit_{tiny,small,base,large}_r*``: the post-activation ResNetV2 under
  ``patch_embed.backbone.`` (stages renumbered from 1 by ``prepare``), then timm's ViT names
  (``timm_names.RULES``).
"""

from __future__ import annotations

import re
from typing import Collection

from vit_jax.checkpoints import npz_vit, timm_names
from vit_jax.checkpoints.mapping import Arrays, Family, Format, ModelSpec, register_family, register_format, rename, strip_prefix
from vit_jax.checkpoints.resnet_names import postact_timm_rules, renumber_stages
from vit_jax.models.vit_hybrid import BACKBONES, HybridViT

RESNET = "resnet/"


def infer_hybrid(arrays: Arrays) -> ModelSpec:
  """The hybrid a checkpoint (in model names) holds: ResNet depth, ViT variant, stride, classes."""
  if f"{RESNET}conv_root/kernel" not in arrays:
    raise ValueError("not a hybrid checkpoint: it has no 'conv_root/kernel'")
  layers = []
  while units := {m[1] for k in arrays
                  if (m := re.match(rf"{RESNET}block{len(layers) + 1}/unit(\d+)/", k))}:
    layers.append(len(units))
  _, _, channels, width = arrays[f"{RESNET}conv_root/kernel"].shape
  vit = npz_vit.infer_vit({k: v for k, v in arrays.items() if not k.startswith(RESNET)})
  variant, patch = re.fullmatch(r"ViT-(\w+)/(\d+)", vit.name).groups()
  resnet_stride = 4 * 2 ** max(len(layers) - 1, 0)
  overrides = {k: v for k, v in vit.overrides.items() if k != "channels"}
  depth, stride = next(((d, s) for (d, s), (l, p) in BACKBONES.items()
                        if l == tuple(layers) and p == int(patch)), (None, None))
  if depth is None:  # no published name: any name with the layers and patch size spelled out
    depth, stride = "", resnet_stride * int(patch)
    overrides.update(resnet_layers=tuple(layers), patch_size=int(patch))
  if width != 64:
    overrides["resnet_width"] = int(width)
  if channels != 3:
    overrides["channels"] = int(channels)
  return ModelSpec(f"R{depth}+ViT-{variant}/{stride}", vit.num_classes,
                   vit.image_size * resnet_stride, overrides)


register_family(Family(
    name="Hybrid",
    model_type=HybridViT,
    layer_lists=(npz_vit.BLOCKS,),
    posemb=(npz_vit.POSEMB,),
    head="head",
    infer=infer_hybrid,
))

NPZ_RULES = (
    rename("conv_root/{rest:*}", RESNET + "conv_root/{rest:*}"),
    rename("gn_root/{rest:*}", RESNET + "gn_root/{rest:*}"),
    rename("block{s}/{rest:*}", RESNET + "block{s}/{rest:*}"),
    *npz_vit.RULES,
)


def detect_npz(keys: Collection[str]) -> bool:
  return "conv_root/kernel" in keys and "embedding/kernel" in keys


register_format(Format(family="Hybrid", name="vit", rules=NPZ_RULES, detect=detect_npz,
                       containers=("npz",),
                       prepare=lambda arrays: strip_prefix(arrays, npz_vit.PREFIXES)))

TIMM_RULES = (*postact_timm_rules("patch_embed.backbone.", RESNET), *timm_names.RULES)


def detect_timm(keys: Collection[str]) -> bool:
  return any(k.startswith("patch_embed.backbone.") for k in keys)


register_format(Format(family="Hybrid", name="timm", rules=TIMM_RULES, detect=detect_timm,
                       containers=("safetensors", "torch"), prepare=renumber_stages))
