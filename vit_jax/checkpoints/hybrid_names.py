"""Checkpoint names of the hybrids (``models/vit_hybrid.py``): timm and the original npz.

* Original npz (google-research/vision_transformer): the ResNet at the top level (``conv_root``,
  ``gn_root``, ``block{s}/unit{u}/...``; ours under ``resnet/``) and the ViT names, with
  ``Transformer/encoderblock_{i}`` for our ``Transformer/blocks/{i}``.
* timm ``vit_*_r*_s*``: ``patch_embed.backbone.`` (the ResNetV2 without pre-activation),
  ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}`` with a fused ``qkv``,
  ``norm``, ``head``.
"""

from __future__ import annotations

import re

from vit_jax.checkpoints.name_rules import (Rule, dense, fused_heads, heads_out, layer_norm, patch_conv,
                                            renamed, same)
from vit_jax.checkpoints.resnet_names import resnet_npz_rules, resnet_timm_rules
from vit_jax.models.vit_hybrid import HybridViT


def hybrid_npz_rules(model: HybridViT) -> list[Rule]:
  """Original npz <-> ours."""
  vit = renamed(model, lambda p: re.sub(r"^Transformer/blocks/(\d+)/", r"Transformer/encoderblock_\1/", p),
                skip=lambda p: p.startswith("resnet/"))
  return resnet_npz_rules(model) + vit


def vit_timm_rules(model, heads: int, num_layers: int) -> list[Rule]:
  """timm VisionTransformer names of our ViT part (token classifier, learned posemb)."""
  cfg = model.config
  if cfg.classifier != "token" or cfg.representation_size or cfg.posemb != "learn":
    raise ValueError("timm's hybrids have a cls token, learned position embeddings and no "
                     f"pre-logits layer; this model has classifier={cfg.classifier!r}, "
                     f"posemb={cfg.posemb!r}, representation_size={cfg.representation_size}")
  rules = [patch_conv("embedding/kernel", "patch_embed.proj.weight"),
           same("embedding/bias", "patch_embed.proj.bias"),
           same("cls", "cls_token"),
           same("Transformer/posembed_input/pos_embedding", "pos_embed")]
  for i in range(num_layers):
    o, t = f"Transformer/blocks/{i}/", f"blocks.{i}."
    attn = f"{o}MultiHeadDotProductAttention_1/"
    rules += layer_norm(f"{o}LayerNorm_0", f"{t}norm1")
    rules.append(fused_heads([f"{attn}{n}/kernel" for n in ("query", "key", "value")],
                             f"{t}attn.qkv.weight", heads))
    rules.append(fused_heads([f"{attn}{n}/bias" for n in ("query", "key", "value")],
                             f"{t}attn.qkv.bias", heads, bias=True))
    rules.append(heads_out(f"{attn}out/kernel", f"{t}attn.proj.weight"))
    rules.append(same(f"{attn}out/bias", f"{t}attn.proj.bias"))
    rules += layer_norm(f"{o}LayerNorm_2", f"{t}norm2")
    rules += dense(f"{o}MlpBlock_3/Dense_0", f"{t}mlp.fc1")
    rules += dense(f"{o}MlpBlock_3/Dense_1", f"{t}mlp.fc2")
  rules += layer_norm("Transformer/encoder_norm", "norm")
  rules += dense("head", "head")
  return rules


def hybrid_timm_rules(model: HybridViT) -> list[Rule]:
  """timm ``vit_base_r50_s16_224`` etc. <-> ours."""
  cfg = model.config
  return (resnet_timm_rules(model.resnet.config, "resnet/", "patch_embed.backbone.")
          + vit_timm_rules(model, cfg.num_heads, cfg.num_layers))
