"""The ViT family, and the original ViT ``.npz`` format (imagenet21k, imagenet21k+imagenet2012
and augreg releases of google-research/vision_transformer).

The original keys are our model's names except for the blocks: ``Transformer/encoderblock_{i}``
is ``Transformer/blocks/{i}``. Very old (pre-Linen) files may carry an ``opt/target/`` prefix.
"""

from __future__ import annotations

import re
from typing import Collection

import numpy as np

from vit_jax.checkpoints import posemb
from vit_jax.checkpoints.mapping import Arrays, Family, Format, ModelSpec, register_family, register_format, rename, strip_prefix
from vit_jax.models import vit

POSEMB = "Transformer/posembed_input/pos_embedding"
BLOCKS = "Transformer/blocks"
TOP_LEVEL = ("embedding", "cls", "Transformer", "MAPHead_0", "pre_logits", "head")


def infer_vit(arrays: Arrays) -> ModelSpec:
  """The ViT a checkpoint (in model names) holds: variant, patch, classes, resolution, options."""
  if "embedding/kernel" not in arrays:
    raise ValueError("not a ViT checkpoint: it has no patch embedding 'embedding/kernel'")
  foreign = sorted(k for k in arrays if k.split("/")[0] not in TOP_LEVEL)
  if foreign:  # A hybrid's stem, for example: another family's checkpoint.
    raise ValueError(f"not a plain ViT checkpoint: it also holds {foreign[:3]}")
  patch, _, channels, width = arrays["embedding/kernel"].shape
  depth = 1 + max((int(m[1]) for k in arrays if (m := re.match(BLOCKS + r"/(\d+)/", k))), default=-1)
  mlp = arrays.get(f"{BLOCKS}/0/MlpBlock_3/Dense_0/kernel", np.zeros((0, 4 * width))).shape[-1]
  query = arrays.get(f"{BLOCKS}/0/MultiHeadDotProductAttention_1/query/kernel")
  classifier = "token" if "cls" in arrays else "map" if "MAPHead_0/probe" in arrays else "gap"
  overrides: dict = {}
  if POSEMB in arrays:
    _, side = posemb.split_tokens(arrays[POSEMB].shape[1])
    image_size = side * patch
  else:
    overrides["posemb"] = "sincos2d"
    image_size = 224  # Not recorded by a fixed position embedding.
  variant = next((v for v, s in vit.VARIANTS.items()
                  if s["hidden_size"] == width and s["num_layers"] == depth), None)
  heads = query.shape[1] if query is not None and query.ndim == 3 else None
  if variant is None:
    variant = next((v for v, s in vit.VARIANTS.items() if s["hidden_size"] == width), "B")
    overrides.update(hidden_size=int(width), num_layers=int(depth))
  spec = vit.VARIANTS[variant]
  if heads is not None and heads != spec["num_heads"]:
    overrides["num_heads"] = int(heads)
  elif heads is None and width != spec["hidden_size"]:
    overrides["num_heads"] = max(1, int(width) // 64)
  if mlp != spec["mlp_dim"]:
    overrides["mlp_dim"] = int(mlp)
  if classifier != "token":
    overrides["classifier"] = classifier
  if "pre_logits/kernel" in arrays:
    overrides["representation_size"] = int(arrays["pre_logits/kernel"].shape[-1])
  if channels != 3:
    overrides["channels"] = int(channels)
  num_classes = int(arrays["head/bias"].shape[0]) if "head/bias" in arrays else 0
  return ModelSpec(f"ViT-{variant}/{patch}", num_classes, int(image_size), overrides)


register_family(Family(
    name="ViT",
    model_type=vit.VisionTransformer,
    layer_lists=(BLOCKS,),
    posemb=(POSEMB,),
    head="head",
    infer=infer_vit,
))

# The rules of the original format, usable by other families (a hybrid adds its stem's rules).
RULES = (
    rename("Transformer/encoderblock_{i}/{rest:*}", BLOCKS + "/{i}/{rest:*}"),
    rename("{name:*}", "{name:*}"),
)
PREFIXES = ("opt/target/",)


def detect(keys: Collection[str]) -> bool:
  """Original names: unscanned blocks with ``MultiHeadDotProductAttention_1``."""
  return any(re.fullmatch(r"Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1/.+", k)
             for k in keys) or (POSEMB in keys and "embedding/kernel" in keys)


register_format(Format(
    family="ViT", name="vit", rules=RULES, detect=detect, containers=("npz",),
    prepare=lambda arrays: strip_prefix(arrays, PREFIXES)))
