"""Checkpoint names of the ResNets (``models/resnet.py``): timm's ResNetV2 and the original npz.

Our names: ``conv_root``, ``gn_root`` (post-activation), ``block{s}/unit{u}/{conv,gn}{1,2,3}``,
``conv_proj``, ``gn_proj`` (post-activation), ``gn_final`` and ``head`` (BiT).
"""

from __future__ import annotations

from flax import nnx

from vit_jax.checkpoints.name_rules import Rule, conv, conv_as_linear, layer_norm, renamed, same
from vit_jax.models.resnet import ResNet, ResNetConfig


def _units(cfg: ResNetConfig):
  """(stage index from 0, unit index from 0, has projection) for every unit: the first unit of
  each stage projects (it widens the input 4x in stage 1 and strides in the others)."""
  for s, n in enumerate(cfg.layers):
    for u in range(n):
      yield s, u, u == 0


def resnet_timm_rules(cfg: ResNetConfig, ours: str = "", theirs: str = "") -> list[Rule]:
  """timm ResNetV2 (``preact`` as BiT, or the hybrids' post-activation backbone) <-> ours.

  ``ours``/``theirs`` prefix the names (e.g. "resnet/" and "patch_embed.backbone.").
  """
  rules: list[Rule] = []
  if cfg.preact:
    rules.append(conv(f"{ours}conv_root/kernel", f"{theirs}stem.conv.weight"))
  else:
    stem = f"{theirs}stem." if cfg.layers else theirs  # timm's stem-only backbone is the stem itself
    rules.append(conv(f"{ours}conv_root/kernel", f"{stem}conv.weight"))
    rules += layer_norm(f"{ours}gn_root", f"{stem}norm")
  for s, u, proj in _units(cfg):
    o, t = f"{ours}block{s + 1}/unit{u + 1}/", f"{theirs}stages.{s}.blocks.{u}."
    for k in (1, 2, 3):
      rules.append(conv(f"{o}conv{k}/kernel", f"{t}conv{k}.weight"))
      rules += layer_norm(f"{o}gn{k}", f"{t}norm{k}")
    if proj:
      rules.append(conv(f"{o}conv_proj/kernel", f"{t}downsample.conv.weight"))
      if not cfg.preact:
        rules += layer_norm(f"{o}gn_proj", f"{t}downsample.norm")
  if cfg.preact:
    rules += layer_norm(f"{ours}gn_final", f"{theirs}norm")
    if cfg.num_classes:
      rules.append(conv_as_linear(f"{ours}head/kernel", f"{theirs}head.fc.weight"))
      rules.append(same(f"{ours}head/bias", f"{theirs}head.fc.bias"))
  return rules


def bit_timm_rules(model: ResNet) -> list[Rule]:
  """timm ``resnetv2_*_bit`` state dict <-> a "BiT-R..." model."""
  return resnet_timm_rules(model.config)


def resnet_npz_rules(model: nnx.Module, ours: str = "resnet/") -> list[Rule]:
  """The original hybrid npz names of the ResNet part: ours minus the ``resnet/`` prefix."""
  return renamed(model, lambda p: p[len(ours):], skip=lambda p: not p.startswith(ours))
