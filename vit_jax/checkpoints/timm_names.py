"""timm's ViT state-dict names (``.safetensors`` from the model hubs, or torch state-dict files).

PyTorch layouts: linear weights are [out, in] (ours [in, out], split into heads for attention),
the patch embedding is a conv weight [D, C, p, p] (ours [p, p, C, D]), and attention's query,
key and value come fused as ``qkv`` [3D, D]. Reading only: this library writes npz.
"""

from __future__ import annotations

from typing import Collection

import numpy as np

from vit_jax.checkpoints.mapping import Format, Rule, register_format, rename
from vit_jax.checkpoints.npz_vit import BLOCKS, POSEMB


def fit(a: np.ndarray, shape) -> np.ndarray:
  """``a`` reshaped to the model's ``shape`` when the sizes agree (else unchanged, so the
  mismatch is reported with the checkpoint's shape)."""
  if shape is not None and a.size == int(np.prod(shape)):
    return a.reshape(shape)
  return a


def linear(arrays, shapes):
  """A torch Linear weight [out, in] -> our kernel [in, out] (reshaped to the model's kernel)."""
  return [fit(arrays[0].T, shapes[0])]


def bias(arrays, shapes):
  return [fit(arrays[0], shapes[0])]


def conv(arrays, shapes):
  return [fit(arrays[0].transpose(2, 3, 1, 0), shapes[0])]


def split_linear(n: int):
  """A fused Linear weight [n*out, in] -> n kernels [in, out]."""
  def load(arrays, shapes):
    return [fit(w.T, s) for w, s in zip(np.split(arrays[0], n, axis=0), shapes)]
  return load


def split_bias(n: int):
  def load(arrays, shapes):
    return [fit(b, s) for b, s in zip(np.split(arrays[0], n, axis=0), shapes)]
  return load


def _norm(src: str, dst: str) -> tuple[Rule, ...]:
  return (rename(f"{src}.weight", f"{dst}/scale"), rename(f"{src}.bias", f"{dst}/bias"))


def _dense(src: str, dst: str) -> tuple[Rule, ...]:
  return (Rule(f"{src}.weight", f"{dst}/kernel", load=linear, save=None),
          Rule(f"{src}.bias", f"{dst}/bias", load=bias, save=None))


def _attention(src: str, dst: str, fused: tuple[str, ...], qkv: str) -> tuple[Rule, ...]:
  """timm attention ``src`` (``qkv`` fusing ``fused``) -> our MultiHeadAttention ``dst``."""
  n = len(fused)
  return (Rule(f"{src}.{qkv}.weight", tuple(f"{dst}/{f}/kernel" for f in fused),
               load=split_linear(n), save=None),
          Rule(f"{src}.{qkv}.bias", tuple(f"{dst}/{f}/bias" for f in fused),
               load=split_bias(n), save=None),
          *_dense(f"{src}.proj", f"{dst}/out"))


_BLOCK = "blocks.{i}"
_OURS = BLOCKS + "/{i}"
RULES = (
    Rule("patch_embed.proj.weight", "embedding/kernel", load=conv, save=None),
    rename("patch_embed.proj.bias", "embedding/bias"),
    rename("cls_token", "cls"),
    rename("pos_embed", POSEMB),
    *_norm(f"{_BLOCK}.norm1", f"{_OURS}/LayerNorm_0"),
    *_attention(f"{_BLOCK}.attn", f"{_OURS}/MultiHeadDotProductAttention_1",
                ("query", "key", "value"), "qkv"),
    *_norm(f"{_BLOCK}.norm2", f"{_OURS}/LayerNorm_2"),
    *_dense(f"{_BLOCK}.mlp.fc1", f"{_OURS}/MlpBlock_3/Dense_0"),
    *_dense(f"{_BLOCK}.mlp.fc2", f"{_OURS}/MlpBlock_3/Dense_1"),
    *_norm("norm", "Transformer/encoder_norm"),
    rename("attn_pool.latent", "MAPHead_0/probe"),
    *_dense("attn_pool.q", "MAPHead_0/MultiHeadDotProductAttention_0/query"),
    *_attention("attn_pool", "MAPHead_0/MultiHeadDotProductAttention_0", ("key", "value"), "kv"),
    *_norm("attn_pool.norm", "MAPHead_0/LayerNorm_0"),
    *_dense("attn_pool.mlp.fc1", "MAPHead_0/MlpBlock_0/Dense_0"),
    *_dense("attn_pool.mlp.fc2", "MAPHead_0/MlpBlock_0/Dense_1"),
    *_dense("head", "head"),
    # Anything else (fc_norm, layer scale, register tokens, ...) keeps its name and is
    # reported as unexpected: our ViT has no such parameter.
    Rule("{name:*}", "{name:*}", save=None),
)


def detect(keys: Collection[str]) -> bool:
  return "patch_embed.proj.weight" in keys


register_format(Format(family="ViT", name="timm", rules=RULES, detect=detect,
                       containers=("safetensors", "torch")))
