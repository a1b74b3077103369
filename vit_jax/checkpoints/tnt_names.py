"""Checkpoint names of TNT (``models/tnt.py``) in timm's ``tnt_{s,b}_patch16_224``.

Our names are timm's; the layouts differ: timm's attention fuses query and key (``qk``) and
keeps ``v`` apart, which map to the shared attention's ``query``/``key``/``value``; ``pixel_pos``
is channels-first there.
"""

from __future__ import annotations

from vit_jax.checkpoints.name_rules import Rule, conv, dense, fused_heads, heads_out, layer_norm, same
from vit_jax.models.tnt import TNT


def _attention(ours: str, theirs: str, heads: int, qkv_bias: bool) -> list[Rule]:
  rules = [fused_heads([f"{ours}/query/kernel", f"{ours}/key/kernel"], f"{theirs}.qk.weight", heads),
           fused_heads([f"{ours}/value/kernel"], f"{theirs}.v.weight", heads),
           heads_out(f"{ours}/out/kernel", f"{theirs}.proj.weight"),
           same(f"{ours}/out/bias", f"{theirs}.proj.bias")]
  if qkv_bias:
    rules += [fused_heads([f"{ours}/query/bias", f"{ours}/key/bias"], f"{theirs}.qk.bias", heads, bias=True),
              fused_heads([f"{ours}/value/bias"], f"{theirs}.v.bias", heads, bias=True)]
  return rules


def tnt_timm_rules(model: TNT) -> list[Rule]:
  cfg = model.config
  rules = [conv("pixel_embed/proj/kernel", "pixel_embed.proj.weight"),
           same("pixel_embed/proj/bias", "pixel_embed.proj.bias"),
           Rule(("pixel_pos",), "pixel_pos", lambda a: (a.transpose(0, 2, 3, 1),),
                lambda t: t[0].transpose(0, 3, 1, 2)),
           same("cls_token", "cls_token"), same("patch_pos", "patch_pos")]
  rules += layer_norm("norm1_proj", "norm1_proj")
  rules += dense("proj", "proj")
  rules += layer_norm("norm2_proj", "norm2_proj")
  for i in range(cfg.num_layers):
    o, t = f"blocks/{i}/", f"blocks.{i}."
    rules += layer_norm(f"{o}norm_in", f"{t}norm_in")
    rules += _attention(f"{o}attn_in", f"{t}attn_in", cfg.inner_heads, cfg.qkv_bias)
    rules += layer_norm(f"{o}norm_mlp_in", f"{t}norm_mlp_in")
    rules += dense(f"{o}mlp_in/Dense_0", f"{t}mlp_in.fc1")
    rules += dense(f"{o}mlp_in/Dense_1", f"{t}mlp_in.fc2")
    rules += layer_norm(f"{o}norm1_proj", f"{t}norm1_proj")
    rules += dense(f"{o}proj", f"{t}proj", use_bias=False)
    rules += layer_norm(f"{o}norm2_proj", f"{t}norm2_proj")
    rules += layer_norm(f"{o}norm_out", f"{t}norm_out")
    rules += _attention(f"{o}attn_out", f"{t}attn_out", cfg.num_heads, cfg.qkv_bias)
    rules += layer_norm(f"{o}norm_mlp", f"{t}norm_mlp")
    rules += dense(f"{o}mlp/Dense_0", f"{t}mlp.fc1")
    rules += dense(f"{o}mlp/Dense_1", f"{t}mlp.fc2")
  rules += layer_norm("norm", "norm")
  rules += dense("head", "head")
  return rules
