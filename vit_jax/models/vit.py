"""The Vision Transformer (Dosovitskiy et al., 2020), structured as the original code.

Parameter names and layouts follow google-research/vision_transformer so that the released
checkpoints load unchanged: ``embedding`` (conv patchify), ``cls``,
``Transformer/posembed_input/pos_embedding``, ``Transformer/encoderblock_{i}/...``,
``Transformer/encoder_norm``, optional ``pre_logits`` and the zero-initialised ``head``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.models import patches, registry
from vit_jax.models.attention import MultiHeadAttention, attention_flops
from vit_jax.models.layer_stack import apply_blocks, make_blocks
from vit_jax.models.layers import (DTYPES, Dense, LayerNorm, Mlp, drop_path, dropout, lecun_normal,
                                   mlp_flops, param, zeros)

CLASSIFIERS = ("token", "gap", "map")
POSEMBS = ("learn", "sincos2d")

# Width, depth, MLP width, heads (ViT paper Table 1; g from "Scaling Vision Transformers").
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(hidden_size=192, num_layers=12, mlp_dim=768, num_heads=3),
    "S": dict(hidden_size=384, num_layers=12, mlp_dim=1536, num_heads=6),
    "B": dict(hidden_size=768, num_layers=12, mlp_dim=3072, num_heads=12),
    "L": dict(hidden_size=1024, num_layers=24, mlp_dim=4096, num_heads=16),
    "H": dict(hidden_size=1280, num_layers=32, mlp_dim=5120, num_heads=16),
    "g": dict(hidden_size=1408, num_layers=40, mlp_dim=6144, num_heads=16),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig(patches.PatchConfig):
  """Everything that defines a ViT; ``models.create`` fills it from a name and overrides."""
  num_classes: int
  patch_size: int = 16
  image_size: int = 224
  hidden_size: int = 768
  num_layers: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  channels: int = 3
  classifier: str = "token"
  representation_size: int | None = None
  posemb: str = "learn"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: str = "float32"
  gelu_approximate: bool = False
  attention: str = "explicit"
  layernorm_eps: float = 1e-6
  scan: bool = False
  remat: str = "none"

  def __post_init__(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"classifier {self.classifier!r} is not one of {CLASSIFIERS}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"posemb {self.posemb!r} is not one of {POSEMBS}")
    super().__post_init__()


def sincos2d(grid: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2D sine-cosine position embedding (as in big_vision), shape [grid*grid, dim]."""
  if dim % 4:
    raise ValueError(f"sincos2d needs a width divisible by 4, got {dim}")
  y, x = np.mgrid[:grid, :grid]
  omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1))
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class EncoderBlock(nnx.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, cfg: ViTConfig, drop_path_rate: float, *, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    self.LayerNorm_0 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, rngs=rngs, dtype=dtype)
    self.MultiHeadDotProductAttention_1 = MultiHeadAttention(
        cfg.hidden_size, cfg.num_heads, rngs=rngs, dropout_rate=cfg.attention_dropout_rate,
        dtype=dtype, implementation=cfg.attention)
    self.LayerNorm_2 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, rngs=rngs, dtype=dtype)
    self.MlpBlock_3 = Mlp(cfg.hidden_size, cfg.mlp_dim, rngs=rngs, dropout_rate=cfg.dropout_rate,
                          gelu_approximate=cfg.gelu_approximate, dtype=dtype)
    self.dropout_rate = cfg.dropout_rate
    self.drop_path_rate = drop_path_rate

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None,
               drop_path_rate: float | jax.Array | None = None) -> jax.Array:
    rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
    y = self.MultiHeadDotProductAttention_1(self.LayerNorm_0(x), train=train, rngs=rngs)
    y = dropout(y, self.dropout_rate, train=train, rngs=rngs)
    x = x + drop_path(y, rate, train=train, rngs=rngs)
    y = self.MlpBlock_3(self.LayerNorm_2(x), train=train, rngs=rngs)
    return x + drop_path(y, rate, train=train, rngs=rngs)


class PosEmbed(nnx.Module):
  def __init__(self, num_tokens: int, dim: int, *, rngs: nnx.Rngs):
    self.pos_embedding = param(rngs, jax.nn.initializers.normal(stddev=0.02), (1, num_tokens, dim),
                               (None, None, "embed"))


class Transformer(nnx.Module):
  """Position embedding, the stack of blocks and the final norm."""

  def __init__(self, cfg: ViTConfig, num_tokens: int, *, rngs: nnx.Rngs):
    if cfg.posemb == "learn":
      self.posembed_input = PosEmbed(num_tokens, cfg.hidden_size, rngs=rngs)
    else:
      self.posembed_input = None
    self.drop_path_rates = tuple(float(r) for r in np.linspace(0.0, cfg.stochastic_depth, cfg.num_layers))
    self.blocks = make_blocks(lambda r: EncoderBlock(cfg, 0.0, rngs=r), cfg.num_layers, rngs=rngs,
                              scan=cfg.scan)
    self.num_layers, self.remat = cfg.num_layers, cfg.remat
    self.encoder_norm = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, rngs=rngs,
                                  dtype=DTYPES[cfg.dtype])
    self.dropout_rate = cfg.dropout_rate

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    if self.posembed_input is not None:
      x = x + self.posembed_input.pos_embedding[...].astype(x.dtype)
    x = dropout(x, self.dropout_rate, train=train, rngs=rngs)
    x = apply_blocks(self.blocks, x, num_layers=self.num_layers, train=train, rngs=rngs,
                     remat=self.remat, drop_path_rates=self.drop_path_rates)
    return self.encoder_norm(x)


class MAPHead(nnx.Module):
  """Multihead attention pooling (big_vision): a learned probe attends over the tokens."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    self.probe = param(rngs, jax.nn.initializers.xavier_uniform(), (1, 1, cfg.hidden_size),
                       (None, None, "embed"))
    self.MultiHeadDotProductAttention_0 = MultiHeadAttention(
        cfg.hidden_size, cfg.num_heads, rngs=rngs, dtype=dtype, implementation=cfg.attention)
    self.LayerNorm_0 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, rngs=rngs, dtype=dtype)
    self.MlpBlock_0 = Mlp(cfg.hidden_size, cfg.mlp_dim, rngs=rngs,
                          gelu_approximate=cfg.gelu_approximate, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = self.MultiHeadDotProductAttention_0(probe, x)
    return (x + self.MlpBlock_0(self.LayerNorm_0(x)))[:, 0]


class VisionTransformer(nnx.Module):
  """ViT classifier. ``model(images, train=False)`` maps NHWC images in [-1, 1] to logits."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    dtype = DTYPES[cfg.dtype]
    p, d = cfg.patch_size, cfg.hidden_size
    self.embedding = Dense((p, p, cfg.channels), d, axes=("patch", "patch", "channels", "embed"),
                           rngs=rngs, kernel_init=lecun_normal, dtype=dtype)
    num_tokens = cfg.grid ** 2
    if cfg.classifier == "token":
      self.cls = param(rngs, zeros, (1, 1, d), (None, None, "embed"))
      num_tokens += 1
    else:
      self.cls = None
    self.Transformer = Transformer(cfg, num_tokens, rngs=rngs)
    self.MAPHead_0 = MAPHead(cfg, rngs=rngs) if cfg.classifier == "map" else None
    if cfg.representation_size:
      self.pre_logits = Dense(d, cfg.representation_size, axes=("embed", "mlp"), rngs=rngs,
                              dtype=dtype)
    else:
      self.pre_logits = None
    head_in = cfg.representation_size or d
    self.head = Dense(head_in, cfg.num_classes, axes=("embed", "classes"), rngs=rngs,
                      kernel_init=zeros, dtype=dtype)

  def check_images(self, images: jax.Array) -> None:
    patches.check_images(images, self.config.image_size, self.config.channels)

  def embed(self, images: jax.Array) -> jax.Array:
    """Patchify and project: [B, H, W, C] -> [B, grid*grid, hidden] (a strided conv as a matmul)."""
    cfg = self.config
    b, g = images.shape[0], cfg.grid
    x = self.embedding(patches.patchify(images, cfg.patch_size))
    x = x.reshape(b, g * g, cfg.hidden_size)
    if cfg.posemb == "sincos2d":
      x = x + jnp.asarray(sincos2d(g, cfg.hidden_size), x.dtype)[None]
    return x

  def encode(self, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """All tokens after the final norm: [B, T, hidden]."""
    self.check_images(images)
    x = self.embed(images)
    if self.cls is not None:
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    return self.Transformer(x, train=train, rngs=rngs)

  def pool(self, x: jax.Array) -> jax.Array:
    """The pre-logits representation of each image."""
    cfg = self.config
    if cfg.classifier == "token":
      x = x[:, 0]
    elif cfg.classifier == "gap":
      x = jnp.mean(x, axis=1)
    else:
      x = self.MAPHead_0(x)
    if self.pre_logits is not None:
      x = jnp.tanh(self.pre_logits(x))
    return x

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    x = self.pool(self.encode(images, train=train, rngs=rngs))
    return self.head(x).astype(jnp.float32)


# Every option of ``models.create`` for a ViT (the config's fields but the class count and size).
OPTIONS = registry.config_options(ViTConfig)


def vit_flops(model: Any) -> int:
  """2 x multiply-adds per image: patch embedding, encoder blocks, pooling (token, gap or MAP
  head), pre-logits, head. ``model.config`` is a ``ViTConfig`` (a hybrid's ViT part too)."""
  c = model.config
  num_patches = c.grid ** 2
  tokens = num_patches + (1 if c.classifier == "token" else 0)
  d, head_dim = c.hidden_size, c.hidden_size // c.num_heads
  flops = 2 * num_patches * c.patch_size ** 2 * c.channels * d
  block = attention_flops(tokens, tokens, d, c.num_heads, head_dim) + mlp_flops(tokens, d, c.mlp_dim)
  flops += c.num_layers * block
  if c.classifier == "map":
    flops += attention_flops(1, tokens, d, c.num_heads, head_dim) + mlp_flops(1, d, c.mlp_dim)
  width = d
  if c.representation_size:
    flops += 2 * d * c.representation_size
    width = c.representation_size
  return flops + 2 * width * c.num_classes


registry.register_family(
    "ViT",
    pattern=r"ViT-(?P<variant>Ti|S|B|L|H|g)[/_](?P<patch>\d+)",
    build=registry.patch_model_builder("ViT", VisionTransformer, ViTConfig, VARIANTS, OPTIONS),
    examples=("ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-B/32", "ViT-L/16", "ViT-H/14", "ViT-g/14"),
    help="ViT-{Ti,S,B,L,H,g}/<patch>, any patch size; 'ViT-B_16' spelling accepted",
    sizes=VARIANTS,
    flops=vit_flops,
    options=OPTIONS,
    checkpoint_family="ViT",
)
