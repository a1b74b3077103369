"""BiT ResNets (``models/resnet.py``) in timm's ``resnetv2_*_bit`` names, and the ResNet rules
that the hybrids' timm format reuses.

Ours follow the original npz names, numbered from 1 (``block{s}/unit{u}/{gn,conv}{1,2,3}``,
``conv_proj``, ``gn_proj``); timm numbers ``stages.{s}.blocks.{u}`` from 0, so ``prepare``
renumbers those keys from 1 first (``stages.1.blocks.1`` is ``block1/unit1``).
"""

from __future__ import annotations

import re
from typing import Collection

from vit_jax.checkpoints.mapping import Arrays, Family, Format, ModelSpec, Rule, register_family, register_format
from vit_jax.checkpoints.torch_layouts import conv1x1_as_dense, conv_kernel, norm
from vit_jax.checkpoints.timm_names import bias
from vit_jax.models.resnet import DEPTHS, ResNet

_STAGE = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")


def renumber_stages(arrays: Arrays) -> Arrays:
  """timm's 0-based ``stages.{s}.blocks.{u}.`` -> 1-based, as our ``block{s}/unit{u}``."""
  return {_STAGE.sub(lambda m: f"stages.{int(m[1]) + 1}.blocks.{int(m[2]) + 1}.", k): v
          for k, v in arrays.items()}


def unit_timm_rules(theirs: str, ours: str) -> tuple[Rule, ...]:
  """timm ResNetV2 units (pre- or post-activation) under ``theirs`` -> ours under ``ours``."""
  unit, o = f"{theirs}stages.{{s}}.blocks.{{u}}.", f"{ours}block{{s}}/unit{{u}}/"
  return (
      conv_kernel(f"{unit}conv{{k}}.weight", f"{o}conv{{k}}/kernel"),
      *norm(f"{unit}norm{{k}}", f"{o}gn{{k}}"),
      conv_kernel(f"{unit}downsample.conv.weight", f"{o}conv_proj/kernel"),
      *norm(f"{unit}downsample.norm", f"{o}gn_proj"),
  )


def postact_timm_rules(theirs: str, ours: str) -> tuple[Rule, ...]:
  """timm's post-activation ResNetV2 backbone of the hybrids (or its stem alone) -> ours."""
  return (
      conv_kernel(f"{theirs}stem.conv.weight", f"{ours}conv_root/kernel"),
      *norm(f"{theirs}stem.norm", f"{ours}gn_root"),
      conv_kernel(f"{theirs}conv.weight", f"{ours}conv_root/kernel"),  # a stem-only backbone
      *norm(f"{theirs}norm", f"{ours}gn_root"),
      *unit_timm_rules(theirs, ours),
  )


def infer_bit(arrays: Arrays) -> ModelSpec:
  """The BiT ResNet a checkpoint (in model names) holds."""
  if "conv_root/kernel" not in arrays or "gn_final/scale" not in arrays:
    raise ValueError("not a BiT checkpoint: it has no 'conv_root/kernel' and 'gn_final/scale'")
  layers = []
  while units := {m[1] for k in arrays if (m := re.match(rf"block{len(layers) + 1}/unit(\d+)/", k))}:
    layers.append(len(units))
  _, _, channels, width = arrays["conv_root/kernel"].shape
  depth = next((d for d, l in DEPTHS.items() if l == tuple(layers)), 50)
  overrides: dict = {} if DEPTHS.get(depth) == tuple(layers) else {"layers": tuple(layers)}
  if width % 64:
    overrides["width"] = int(width)
  if channels != 3:
    overrides["channels"] = int(channels)
  num_classes = int(arrays["head/bias"].shape[0]) if "head/bias" in arrays else 0
  return ModelSpec(f"BiT-R{depth}x{max(1, width // 64)}", num_classes, 224, overrides)


register_family(Family(name="BiT", model_type=ResNet, head="head", infer=infer_bit))

TIMM_RULES = (
    conv_kernel("stem.conv.weight", "conv_root/kernel"),
    *unit_timm_rules("", ""),
    *norm("norm", "gn_final"),
    Rule("head.fc.weight", "head/kernel", load=conv1x1_as_dense, save=None),
    Rule("head.fc.bias", "head/bias", load=bias, save=None),
    Rule("{name:*}", "{name:*}", save=None),  # anything else is reported as unexpected
)


def detect_timm(keys: Collection[str]) -> bool:
  return "stem.conv.weight" in keys and any(k.startswith("stages.") for k in keys)


register_format(Format(family="BiT", name="timm", rules=TIMM_RULES, detect=detect_timm,
                       containers=("safetensors", "torch"), prepare=renumber_stages))
