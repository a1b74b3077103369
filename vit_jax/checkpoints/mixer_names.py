"""MLP-Mixer (``models/mixer.py``): the original npz format and timm's names.

The original npz names (google-research/vision_transformer ``models_mixer.py``) are ours with
``MixerBlock_{i}`` for ``blocks/{i}``; written back by ``export_npz(model, path)``. timm's are
``stem.proj``, ``blocks.{i}.{norm1, mlp_tokens.fc{1,2}, norm2, mlp_channels.fc{1,2}}``,
``norm``, ``head``.
"""

from __future__ import annotations

import math
import re
from typing import Collection

from vit_jax.checkpoints.mapping import (Arrays, Family, Format, ModelSpec, Rule, register_family, register_format,
                                         rename, strip_prefix)
from vit_jax.checkpoints.npz_vit import PREFIXES
from vit_jax.checkpoints.torch_layouts import conv_kernel, dense, norm
from vit_jax.models.mixer import VARIANTS, MlpMixer

BLOCKS = "blocks"


def infer_mixer(arrays: Arrays) -> ModelSpec:
  """The Mixer a checkpoint (in model names) holds."""
  if "stem/kernel" not in arrays or f"{BLOCKS}/0/token_mixing/Dense_0/kernel" not in arrays:
    raise ValueError("not a Mixer checkpoint: it has no 'stem/kernel' and token-mixing MLP")
  patch, _, channels, width = arrays["stem/kernel"].shape
  depth = 1 + max(int(m[1]) for k in arrays if (m := re.match(rf"{BLOCKS}/(\d+)/", k)))
  tokens, tokens_mlp = arrays[f"{BLOCKS}/0/token_mixing/Dense_0/kernel"].shape
  channels_mlp = arrays[f"{BLOCKS}/0/channel_mixing/Dense_0/kernel"].shape[-1]
  found = dict(hidden_size=int(width), num_layers=int(depth), tokens_mlp_dim=int(tokens_mlp),
               channels_mlp_dim=int(channels_mlp))
  variant = next((v for v, s in VARIANTS.items() if s["hidden_size"] == width), "B")
  overrides = {k: v for k, v in found.items() if VARIANTS[variant][k] != v}
  if channels != 3:
    overrides["channels"] = int(channels)
  num_classes = int(arrays["head/bias"].shape[0]) if "head/bias" in arrays else 0
  return ModelSpec(f"Mixer-{variant}/{patch}", num_classes, math.isqrt(tokens) * patch, overrides)


register_family(Family(name="Mixer", model_type=MlpMixer, layer_lists=(BLOCKS,), head="head",
                       infer=infer_mixer))

NPZ_RULES = (
    rename("MixerBlock_{i}/{rest:*}", BLOCKS + "/{i}/{rest:*}"),
    rename("{name:*}", "{name:*}"),
)


def detect_npz(keys: Collection[str]) -> bool:
  return any(k.startswith("MixerBlock_") for k in keys)


register_format(Format(family="Mixer", name="vit", rules=NPZ_RULES, detect=detect_npz,
                       containers=("npz",), prepare=lambda arrays: strip_prefix(arrays, PREFIXES)))

_BLOCK, _OURS = "blocks.{i}", BLOCKS + "/{i}"
TIMM_RULES = (
    conv_kernel("stem.proj.weight", "stem/kernel"),
    rename("stem.proj.bias", "stem/bias"),
    *norm(f"{_BLOCK}.norm1", f"{_OURS}/LayerNorm_0"),
    *dense(f"{_BLOCK}.mlp_tokens.fc1", f"{_OURS}/token_mixing/Dense_0"),
    *dense(f"{_BLOCK}.mlp_tokens.fc2", f"{_OURS}/token_mixing/Dense_1"),
    *norm(f"{_BLOCK}.norm2", f"{_OURS}/LayerNorm_1"),
    *dense(f"{_BLOCK}.mlp_channels.fc1", f"{_OURS}/channel_mixing/Dense_0"),
    *dense(f"{_BLOCK}.mlp_channels.fc2", f"{_OURS}/channel_mixing/Dense_1"),
    *norm("norm", "pre_head_layer_norm"),
    *dense("head", "head"),
    Rule("{name:*}", "{name:*}", save=None),  # anything else is reported as unexpected
)


def detect_timm(keys: Collection[str]) -> bool:
  return "stem.proj.weight" in keys and any(".mlp_tokens." in k for k in keys)


register_format(Format(family="Mixer", name="timm", rules=TIMM_RULES, detect=detect_timm,
                       containers=("safetensors", "torch")))
