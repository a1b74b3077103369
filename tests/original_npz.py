"""Writes the original (google-research/vision_transformer) npz formats from timm state dicts.

Written from the original code's module names, independently of ``vit_jax.checkpoints``, so
that tests check our npz reader against a format we did not produce ourselves. The hybrid
output is also readable by timm's own npz reader (``vision_transformer._load_weights``).
"""

from __future__ import annotations

import numpy as np


def _hwio(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)


def _vit_part(sd: dict, out: dict, num_heads: int) -> None:
  """The ViT names of models_vit.py (flax linen) from timm's VisionTransformer names."""
  out["embedding/kernel"] = _hwio(sd["patch_embed.proj.weight"])
  out["embedding/bias"] = sd["patch_embed.proj.bias"]
  out["cls"] = sd["cls_token"]
  out["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  for i in range(depth):
    t, o = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    dim = sd[f"{t}norm1.weight"].shape[0]
    hd = dim // num_heads
    out[f"{o}LayerNorm_0/scale"] = sd[f"{t}norm1.weight"]
    out[f"{o}LayerNorm_0/bias"] = sd[f"{t}norm1.bias"]
    qkv_w, qkv_b = sd[f"{t}attn.qkv.weight"], sd[f"{t}attn.qkv.bias"]
    for j, name in enumerate(("query", "key", "value")):
      w = qkv_w[j * dim:(j + 1) * dim]                       # (out=heads*hd, in)
      out[f"{o}MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(dim, num_heads, hd)
      out[f"{o}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(num_heads, hd)
    proj = sd[f"{t}attn.proj.weight"]                        # (out, in=heads*hd)
    out[f"{o}MultiHeadDotProductAttention_1/out/kernel"] = proj.T.reshape(num_heads, hd, dim)
    out[f"{o}MultiHeadDotProductAttention_1/out/bias"] = sd[f"{t}attn.proj.bias"]
    out[f"{o}LayerNorm_2/scale"] = sd[f"{t}norm2.weight"]
    out[f"{o}LayerNorm_2/bias"] = sd[f"{t}norm2.bias"]
    for r in range(2):
      out[f"{o}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{t}mlp.fc{r + 1}.weight"].T
      out[f"{o}MlpBlock_3/Dense_{r}/bias"] = sd[f"{t}mlp.fc{r + 1}.bias"]
  out["Transformer/encoder_norm/scale"] = sd["norm.weight"]
  out["Transformer/encoder_norm/bias"] = sd["norm.bias"]
  out["head/kernel"] = sd["head.weight"].T
  out["head/bias"] = sd["head.bias"]


def hybrid_npz(sd: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """A timm ``vit_*_r*`` state dict (numpy) in the original hybrid npz format."""
  out: dict[str, np.ndarray] = {}
  bb = "patch_embed.backbone."
  stem = f"{bb}stem." if f"{bb}stem.conv.weight" in sd else bb
  out["conv_root/kernel"] = _hwio(sd[f"{stem}conv.weight"])
  out["gn_root/scale"] = sd[f"{stem}norm.weight"]
  out["gn_root/bias"] = sd[f"{stem}norm.bias"]
  for key in sd:
    if not key.startswith(f"{bb}stages.") or not key.endswith(".weight"):
      continue
    parts = key[len(bb):].split(".")                  # stages s blocks u <layer...> weight
    s, u, layer = int(parts[1]), int(parts[3]), parts[4:-1]
    o = f"block{s + 1}/unit{u + 1}/"
    t = key[:-len("weight")]
    if layer[0].startswith("conv"):
      out[f"{o}{layer[0]}/kernel"] = _hwio(sd[key])
    elif layer[0].startswith("norm"):
      gn = "gn" + layer[0][len("norm"):]
      out[f"{o}{gn}/scale"], out[f"{o}{gn}/bias"] = sd[key], sd[f"{t}bias"]
    elif layer == ["downsample", "conv"]:
      out[f"{o}conv_proj/kernel"] = _hwio(sd[key])
    elif layer == ["downsample", "norm"]:
      out[f"{o}gn_proj/scale"], out[f"{o}gn_proj/bias"] = sd[key], sd[f"{t}bias"]
  _vit_part(sd, out, num_heads)
  return out


def mixer_npz(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A timm ``mixer_*`` state dict (numpy) in the original Mixer npz format (models_mixer.py)."""
  out = {"stem/kernel": _hwio(sd["stem.proj.weight"]), "stem/bias": sd["stem.proj.bias"]}
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  for i in range(depth):
    t, o = f"blocks.{i}.", f"MixerBlock_{i}/"
    for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
      out[f"{o}{ln}/scale"], out[f"{o}{ln}/bias"] = sd[f"{t}{norm}.weight"], sd[f"{t}{norm}.bias"]
    for mix, mlp in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
      for r in range(2):
        out[f"{o}{mix}/Dense_{r}/kernel"] = sd[f"{t}{mlp}.fc{r + 1}.weight"].T
        out[f"{o}{mix}/Dense_{r}/bias"] = sd[f"{t}{mlp}.fc{r + 1}.bias"]
  out["pre_head_layer_norm/scale"] = sd["norm.weight"]
  out["pre_head_layer_norm/bias"] = sd["norm.bias"]
  out["head/kernel"] = sd["head.weight"].T
  out["head/bias"] = sd["head.bias"]
  return out
