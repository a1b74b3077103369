"""Checkpoint names of MLP-Mixer (``models/mixer.py``): timm and the original npz.

The original npz names are ours with ``MixerBlock_{i}`` for ``blocks/{i}``; timm's are
``stem.proj``, ``blocks.{i}.{norm1, mlp_tokens.fc{1,2}, norm2, mlp_channels.fc{1,2}}``, ``norm``,
``head``.
"""

from __future__ import annotations

import re

from vit_jax.checkpoints.name_rules import Rule, dense, layer_norm, patch_conv, renamed, same
from vit_jax.models.mixer import MlpMixer


def mixer_npz_rules(model: MlpMixer) -> list[Rule]:
  return renamed(model, lambda p: re.sub(r"^blocks/(\d+)/", r"MixerBlock_\1/", p))


def mixer_timm_rules(model: MlpMixer) -> list[Rule]:
  rules = [patch_conv("stem/kernel", "stem.proj.weight"), same("stem/bias", "stem.proj.bias")]
  for i in range(model.config.num_layers):
    o, t = f"blocks/{i}/", f"blocks.{i}."
    rules += layer_norm(f"{o}LayerNorm_0", f"{t}norm1")
    rules += dense(f"{o}token_mixing/Dense_0", f"{t}mlp_tokens.fc1")
    rules += dense(f"{o}token_mixing/Dense_1", f"{t}mlp_tokens.fc2")
    rules += layer_norm(f"{o}LayerNorm_1", f"{t}norm2")
    rules += dense(f"{o}channel_mixing/Dense_0", f"{t}mlp_channels.fc1")
    rules += dense(f"{o}channel_mixing/Dense_1", f"{t}mlp_channels.fc2")
  rules += layer_norm("pre_head_layer_norm", "norm")
  rules += dense("head", "head")
  return rules
