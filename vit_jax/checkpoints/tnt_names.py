"""TNT (``models/tnt.py``) in timm's ``tnt_{s,b}_patch16_224`` names.

Our names are timm's; the layouts differ: timm's attention fuses query and key (``qk``) and
keeps ``v`` apart, which map to the shared attention's ``query``/``key``/``value``;
``pixel_pos`` is channels-first there.
"""

from __future__ import annotations

import re
from typing import Collection

from vit_jax.checkpoints.mapping import Arrays, Family, Format, ModelSpec, Rule, register_family, register_format, rename
from vit_jax.checkpoints.timm_names import linear, split_bias, split_linear
from vit_jax.checkpoints.torch_layouts import channels_last, conv_kernel, dense, norm
from vit_jax.models.tnt import VARIANTS, TNT

BLOCKS = "blocks"


def _attention(src: str, dst: str) -> tuple[Rule, ...]:
  return (Rule(f"{src}.qk.weight", (f"{dst}/query/kernel", f"{dst}/key/kernel"),
               load=split_linear(2), save=None),
          Rule(f"{src}.qk.bias", (f"{dst}/query/bias", f"{dst}/key/bias"), load=split_bias(2), save=None),
          Rule(f"{src}.v.weight", f"{dst}/value/kernel", load=linear, save=None),
          Rule(f"{src}.v.bias", f"{dst}/value/bias", load=split_bias(1), save=None),
          *dense(f"{src}.proj", f"{dst}/out"))


def infer_tnt(arrays: Arrays) -> ModelSpec:
  """The TNT a checkpoint (in model names) holds (head counts from the variant's width)."""
  if "pixel_embed/proj/kernel" not in arrays:
    raise ValueError("not a TNT checkpoint: it has no 'pixel_embed/proj/kernel'")
  _, _, channels, inner = arrays["pixel_embed/proj/kernel"].shape
  width = arrays["cls_token"].shape[-1]
  depth = 1 + max(int(m[1]) for k in arrays if (m := re.match(rf"{BLOCKS}/(\d+)/", k)))
  grid = int(round((arrays["patch_pos"].shape[1] - 1) ** 0.5))
  variant = next((v for v, s in VARIANTS.items() if s["hidden_size"] == width), "S")
  found = dict(hidden_size=int(width), inner_size=int(inner), num_layers=int(depth))
  overrides = {k: v for k, v in found.items() if VARIANTS[variant][k] != v}
  if "blocks/0/attn_in/query/bias" in arrays:
    overrides["qkv_bias"] = True
  if channels != 3:
    overrides["channels"] = int(channels)
  num_classes = int(arrays["head/bias"].shape[0]) if "head/bias" in arrays else 0
  return ModelSpec(f"TNT-{variant}/16", num_classes, grid * 16, overrides)


register_family(Family(name="TNT", model_type=TNT, layer_lists=(BLOCKS,), posemb=("patch_pos",),
                       head="head", infer=infer_tnt))

_BLOCK, _OURS = "blocks.{i}", BLOCKS + "/{i}"
TIMM_RULES = (
    conv_kernel("pixel_embed.proj.weight", "pixel_embed/proj/kernel"),
    rename("pixel_embed.proj.bias", "pixel_embed/proj/bias"),
    Rule("pixel_pos", "pixel_pos", load=channels_last, save=None),
    rename("cls_token", "cls_token"),
    rename("patch_pos", "patch_pos"),
    *norm("norm1_proj", "norm1_proj"),
    *dense("proj", "proj"),
    *norm("norm2_proj", "norm2_proj"),
    *norm(f"{_BLOCK}.norm_in", f"{_OURS}/norm_in"),
    *_attention(f"{_BLOCK}.attn_in", f"{_OURS}/attn_in"),
    *norm(f"{_BLOCK}.norm_mlp_in", f"{_OURS}/norm_mlp_in"),
    *dense(f"{_BLOCK}.mlp_in.fc1", f"{_OURS}/mlp_in/Dense_0"),
    *dense(f"{_BLOCK}.mlp_in.fc2", f"{_OURS}/mlp_in/Dense_1"),
    *norm(f"{_BLOCK}.norm1_proj", f"{_OURS}/norm1_proj"),
    *dense(f"{_BLOCK}.proj", f"{_OURS}/proj", use_bias=False),
    *norm(f"{_BLOCK}.norm2_proj", f"{_OURS}/norm2_proj"),
    *norm(f"{_BLOCK}.norm_out", f"{_OURS}/norm_out"),
    *_attention(f"{_BLOCK}.attn_out", f"{_OURS}/attn_out"),
    *norm(f"{_BLOCK}.norm_mlp", f"{_OURS}/norm_mlp"),
    *dense(f"{_BLOCK}.mlp.fc1", f"{_OURS}/mlp/Dense_0"),
    *dense(f"{_BLOCK}.mlp.fc2", f"{_OURS}/mlp/Dense_1"),
    *norm("norm", "norm"),
    *dense("head", "head"),
    Rule("{name:*}", "{name:*}", save=None),  # anything else is reported as unexpected
)


def detect_timm(keys: Collection[str]) -> bool:
  return "pixel_embed.proj.weight" in keys


register_format(Format(family="TNT", name="timm", rules=TIMM_RULES, detect=detect_timm,
                       containers=("safetensors", "torch")))
