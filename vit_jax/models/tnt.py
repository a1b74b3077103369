"""Transformer iN Transformer (Han et al., 2021, arXiv 2103.00112), as timm's current TNT.

Each 16x16 patch is embedded separately by a 7x7 stride-4 convolution into a 4x4 grid of
"pixel" tokens (``pixel_embed``, plus ``pixel_pos``). Every block runs an inner pre-norm
transformer over the pixels of each patch, adds a projection of them to the patch tokens (not
to the cls token), then an outer pre-norm transformer over the patch tokens. LayerNorm eps 1e-5,
no qkv bias. Attention is the shared ``attention.MultiHeadAttention``; timm's fused ``qk`` and
``v`` weights are split into query/key/value at conversion time. Names follow timm's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.models import patches, registry
from vit_jax.models.attention import MultiHeadAttention, attention_flops
from vit_jax.models.conv import Conv
from vit_jax.models.layers import DTYPES, Dense, LayerNorm, Mlp, drop_path, dropout, mlp_flops, param

trunc_normal = jax.nn.initializers.truncated_normal(stddev=0.02)

# Outer width, inner (pixel) width, depth, outer heads, inner heads (timm tnt_{s,b}_patch16_224).
VARIANTS: dict[str, dict[str, int]] = {
    "S": dict(hidden_size=384, inner_size=24, num_layers=12, num_heads=6, inner_heads=4),
    "B": dict(hidden_size=640, inner_size=40, num_layers=12, num_heads=10, inner_heads=4),
}


@dataclasses.dataclass(frozen=True)
class TNTConfig(patches.PatchConfig):
  num_classes: int
  patch_size: int = 16
  image_size: int = 224
  hidden_size: int = 384
  inner_size: int = 24
  num_layers: int = 12
  num_heads: int = 6
  inner_heads: int = 4
  mlp_ratio: float = 4.0
  inner_mlp_ratio: float = 4.0
  pixel_stride: int = 4
  channels: int = 3
  qkv_bias: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: str = "float32"
  gelu_approximate: bool = False
  attention: str = "explicit"
  layernorm_eps: float = 1e-5

  @property
  def pixel_grid(self) -> int:
    """Pixel tokens per patch side: the 7x7 conv (padding 3) with stride ``pixel_stride``."""
    return (self.patch_size + 6 - 7) // self.pixel_stride + 1

  @property
  def num_pixels(self) -> int:
    return self.pixel_grid ** 2


class TNTBlock(nnx.Module):
  """Inner transformer on pixels, pixel->patch projection, outer transformer on patches."""

  def __init__(self, cfg: TNTConfig, drop_path_rate: float, *, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    d_in, d_out, eps = cfg.inner_size, cfg.hidden_size, cfg.layernorm_eps
    attn = dict(rngs=rngs, qkv_bias=cfg.qkv_bias, dropout_rate=cfg.attention_dropout_rate,
                dtype=dtype, implementation=cfg.attention)
    mlp = dict(rngs=rngs, dropout_rate=cfg.dropout_rate, gelu_approximate=cfg.gelu_approximate,
               dtype=dtype)
    self.norm_in = LayerNorm(d_in, eps=eps, rngs=rngs, dtype=dtype)
    self.attn_in = MultiHeadAttention(d_in, cfg.inner_heads, **attn)
    self.norm_mlp_in = LayerNorm(d_in, eps=eps, rngs=rngs, dtype=dtype)
    self.mlp_in = Mlp(d_in, int(d_in * cfg.inner_mlp_ratio), **mlp)
    self.norm1_proj = LayerNorm(d_in * cfg.num_pixels, eps=eps, rngs=rngs, dtype=dtype)
    self.proj = Dense(d_in * cfg.num_pixels, d_out, axes=("mlp", "embed"), rngs=rngs,
                      kernel_init=trunc_normal, use_bias=False, dtype=dtype)
    self.norm2_proj = LayerNorm(d_out, eps=eps, rngs=rngs, dtype=dtype)
    self.norm_out = LayerNorm(d_out, eps=eps, rngs=rngs, dtype=dtype)
    self.attn_out = MultiHeadAttention(d_out, cfg.num_heads, **attn)
    self.norm_mlp = LayerNorm(d_out, eps=eps, rngs=rngs, dtype=dtype)
    self.mlp = Mlp(d_out, int(d_out * cfg.mlp_ratio), **mlp)
    self.dropout_rate = cfg.dropout_rate
    self.drop_path_rate = drop_path_rate

  def _residual(self, x, y, train, rngs):
    y = dropout(y, self.dropout_rate, train=train, rngs=rngs)
    return x + drop_path(y, self.drop_path_rate, train=train, rngs=rngs)

  def __call__(self, pixels: jax.Array, patches: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    # pixels: [B*N, P, d_in]; patches: [B, 1+N, d_out] (cls first)
    pixels = self._residual(pixels, self.attn_in(self.norm_in(pixels), train=train, rngs=rngs),
                            train, rngs)
    pixels = pixels + drop_path(self.mlp_in(self.norm_mlp_in(pixels), train=train, rngs=rngs),
                                self.drop_path_rate, train=train, rngs=rngs)
    b, t, _ = patches.shape
    flat = pixels.reshape(b, t - 1, -1)
    update = self.norm2_proj(self.proj(self.norm1_proj(flat)))
    patches = jnp.concatenate([patches[:, :1], patches[:, 1:] + update.astype(patches.dtype)], axis=1)
    patches = self._residual(patches, self.attn_out(self.norm_out(patches), train=train, rngs=rngs),
                             train, rngs)
    patches = patches + drop_path(self.mlp(self.norm_mlp(patches), train=train, rngs=rngs),
                                  self.drop_path_rate, train=train, rngs=rngs)
    return pixels, patches


class PixelEmbed(nnx.Module):
  """Per-patch 7x7 conv (stride ``pixel_stride``, padding 3) into pixel tokens."""

  def __init__(self, cfg: TNTConfig, *, rngs: nnx.Rngs):
    self.proj = Conv(cfg.channels, cfg.inner_size, 7, stride=cfg.pixel_stride, padding=3,
                     use_bias=True, rngs=rngs, dtype=DTYPES[cfg.dtype],
                     kernel_init=jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                     axes=(None, None, "channels", "embed"))


class TNT(nnx.Module):
  """TNT classifier: ``model(images, train=False)`` maps NHWC images in [-1, 1] to logits."""

  def __init__(self, cfg: TNTConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    dtype = DTYPES[cfg.dtype]
    d_in, d, eps, n = cfg.inner_size, cfg.hidden_size, cfg.layernorm_eps, cfg.num_pixels
    self.pixel_embed = PixelEmbed(cfg, rngs=rngs)
    self.pixel_pos = param(rngs, trunc_normal, (1, cfg.pixel_grid, cfg.pixel_grid, d_in),
                           (None, None, None, "embed"))
    self.norm1_proj = LayerNorm(n * d_in, eps=eps, rngs=rngs, dtype=dtype)
    self.proj = Dense(n * d_in, d, axes=("mlp", "embed"), rngs=rngs, kernel_init=trunc_normal,
                      dtype=dtype)
    self.norm2_proj = LayerNorm(d, eps=eps, rngs=rngs, dtype=dtype)
    self.cls_token = param(rngs, trunc_normal, (1, 1, d), (None, None, "embed"))
    self.patch_pos = param(rngs, trunc_normal, (1, cfg.grid ** 2 + 1, d), (None, None, "embed"))
    rates = np.linspace(0.0, cfg.stochastic_depth, cfg.num_layers)
    self.blocks = nnx.List([TNTBlock(cfg, float(r), rngs=rngs) for r in rates])
    self.norm = LayerNorm(d, eps=eps, rngs=rngs, dtype=dtype)
    self.head = Dense(d, cfg.num_classes, axes=("embed", "classes"), rngs=rngs,
                      kernel_init=trunc_normal, dtype=dtype)

  def check_images(self, images: jax.Array) -> None:
    patches.check_images(images, self.config.image_size, self.config.channels)

  def encode(self, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """All patch tokens (cls first) after the final norm: [B, 1+grid*grid, hidden]."""
    cfg = self.config
    self.check_images(images)
    b, p, g = images.shape[0], cfg.patch_size, cfg.grid
    x = patches.patchify(images, p).reshape(b * g * g, p, p, cfg.channels)
    pixels = self.pixel_embed.proj(x) + self.pixel_pos[...].astype(x.dtype)
    pixels = pixels.reshape(b * g * g, cfg.num_pixels, cfg.inner_size)
    tokens = self.norm2_proj(self.proj(self.norm1_proj(pixels.reshape(b, g * g, -1))))
    cls = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype), (b, 1, cfg.hidden_size))
    tokens = jnp.concatenate([cls, tokens], axis=1) + self.patch_pos[...].astype(tokens.dtype)
    tokens = dropout(tokens, cfg.dropout_rate, train=train, rngs=rngs)
    for block in self.blocks:
      pixels, tokens = block(pixels, tokens, train=train, rngs=rngs)
    return self.norm(tokens)

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.head(self.encode(images, train=train, rngs=rngs)[:, 0]).astype(jnp.float32)


# Every option of ``models.create`` for a TNT (the config's fields but the class count and size).
OPTIONS = registry.config_options(TNTConfig)


def tnt_flops(model: TNT) -> int:
  """2 x multiply-adds per image: per-patch pixel conv, pixel->patch projections, inner and
  outer transformers, head."""
  c = model.config
  n, p, d_in, d = c.grid ** 2, c.num_pixels, c.inner_size, c.hidden_size
  tokens = n + 1
  flops = 2 * n * p * 49 * c.channels * d_in + 2 * n * p * d_in * d  # pixel embed, first proj
  inner = n * (attention_flops(p, p, d_in, c.inner_heads, d_in // c.inner_heads)
               + mlp_flops(p, d_in, int(d_in * c.inner_mlp_ratio)))
  outer = (attention_flops(tokens, tokens, d, c.num_heads, d // c.num_heads)
           + mlp_flops(tokens, d, int(d * c.mlp_ratio)))
  flops += c.num_layers * (inner + 2 * n * p * d_in * d + outer)
  return flops + 2 * d * c.num_classes


registry.register_family(
    "TNT",
    pattern=r"TNT-(?P<variant>S|B)[/_](?P<patch>\d+)",
    build=registry.patch_model_builder("TNT", TNT, TNTConfig, VARIANTS, OPTIONS),
    examples=("TNT-S/16", "TNT-B/16"),
    help="TNT-{S,B}/<patch>: Transformer iN Transformer (timm tnt_{s,b}_patch16_224)",
    sizes=VARIANTS,
    flops=tnt_flops,
    options=OPTIONS,
    checkpoint_family="TNT",
)
