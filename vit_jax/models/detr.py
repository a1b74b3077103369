"""DETR (Carion et al., 2020, arXiv 2005.12872), as facebookresearch/detr and transformers'
``DetrForObjectDetection``.

A ResNet v1.5 with frozen batch norm (``resnet_v1.py``; DC5: the last stage dilated) gives a
feature map; a 1x1 projection maps it to the transformer width; a sine position encoding is
computed from the padding mask downsampled to the feature grid (nearest, as HF and the original).
Post-norm encoder and decoder layers (``normalize_before``: pre-norm, which adds a final encoder
norm) add the positions to the queries and keys of attention, never to the values; padded
feature positions are masked out of every attention over them. The decoder starts from zeros
with the learned object queries as query positions, and its final norm is applied to every
layer's output: the last gives ``logits`` (classes plus "no object") and ``boxes`` (a 3-layer
MLP, sigmoid: normalised cx, cy, w, h); the others give ``aux_logits`` and ``aux_boxes`` through
the same heads, for the auxiliary losses (the original's semantics: the norm is not written
back into the decoder's residual stream, which HF's ``auxiliary_loss=True`` does).

Parameter names follow the original: ``backbone/{conv1, bn1, layer{s}/{u}/...}``, ``input_proj``,
``query_embed``, ``encoder/layers/{i}/{self_attn, linear1, linear2, norm1, norm2}``,
``decoder/layers/{i}/{self_attn, multihead_attn, linear1, linear2, norm1, norm2, norm3}``,
``decoder/norm``, ``class_embed``, ``bbox_embed/Dense_{0,1,2}``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.models import registry
from vit_jax.models.patches import ImageSize, image_hw
from vit_jax.models.attention import IMPLEMENTATIONS, MultiHeadAttention, attention_flops
from vit_jax.models.conv import CONV_RULES
from vit_jax.models.layers import (DTYPES, Dense, LayerNorm, MLPHead, check_dtype, dropout, param,
                                   xavier_uniform)
from vit_jax.models.resnet import DEPTHS
from vit_jax.models.resnet_v1 import ResNetV1, feature_size, resnet_v1_flops

POSITION_TEMPERATURE = 10_000.0
POSITION_SCALE = 2 * math.pi
POSITION_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DETRConfig:
  """Everything that defines a DETR. Defaults: the paper's (DETR-R50). ``image_size`` (an int or
  (height, width)) only sets the size the FLOPs are counted at: the parameters do not depend on
  it and inputs may have any size."""
  num_classes: int
  image_size: ImageSize = 800
  resnet_layers: tuple[int, ...] = DEPTHS[50]
  resnet_width: int = 64
  dilation: bool = False
  channels: int = 3
  hidden_size: int = 256
  encoder_layers: int = 6
  decoder_layers: int = 6
  num_heads: int = 8
  mlp_dim: int = 2048
  num_queries: int = 100
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1  # the original's nn.MultiheadAttention(dropout=0.1)
  normalize_before: bool = False
  layernorm_eps: float = 1e-5
  dtype: str = "float32"
  attention: str = "explicit"

  def __post_init__(self):
    object.__setattr__(self, "image_size", image_hw(self.image_size))
    object.__setattr__(self, "resnet_layers", tuple(int(n) for n in self.resnet_layers))
    check_dtype(self.dtype)
    if not self.resnet_layers or min(self.resnet_layers) < 1:
      raise ValueError(f"resnet_layers {self.resnet_layers}: give units per stage, each at least 1")
    if self.hidden_size % 4 or self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (sine positions) "
                       f"and by num_heads {self.num_heads}")
    if self.decoder_layers < 1 or self.encoder_layers < 0 or self.num_queries < 1:
      raise ValueError(f"need decoder_layers >= 1, encoder_layers >= 0 and num_queries >= 1; got "
                       f"{self.decoder_layers}, {self.encoder_layers}, {self.num_queries}")
    if self.attention not in IMPLEMENTATIONS:
      raise ValueError(f"attention {self.attention!r} is not one of {IMPLEMENTATIONS}")


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PyTorch's ``F.interpolate(mode="nearest")`` (float32 arithmetic)."""
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


def downsample_mask(pixel_mask: jax.Array, height: int, width: int) -> jax.Array:
  """[B, H, W] pixel mask -> [B, height, width] bool, nearest (HF's and the original's)."""
  rows = nearest_indices(pixel_mask.shape[1], height)
  cols = nearest_indices(pixel_mask.shape[2], width)
  return pixel_mask[:, rows[:, None], cols[None, :]] != 0


def sine_positions(mask: jax.Array, dim: int) -> jax.Array:
  """DETR's sine position encoding of a [B, h, w] mask (True: real) -> [B, h, w, dim] float32:
  ``dim / 2`` features of the row (sin, cos interleaved), then ``dim / 2`` of the column, from
  cumulative counts of real positions normalised to (0, 2 pi]."""
  features = dim // 2
  m = mask.astype(jnp.float32)
  y, x = jnp.cumsum(m, axis=1), jnp.cumsum(m, axis=2)
  y = y / (y[:, -1:, :] + POSITION_EPS) * POSITION_SCALE
  x = x / (x[:, :, -1:] + POSITION_EPS) * POSITION_SCALE
  exponent = (2 * (np.arange(features) // 2)).astype(np.float32) / np.float32(features)
  dim_t = jnp.asarray(np.float32(POSITION_TEMPERATURE) ** exponent)

  def encode(e):
    p = e[..., None] / dim_t
    return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(p.shape)

  return jnp.concatenate([encode(y), encode(x)], axis=-1)


class _Layer(nnx.Module):
  """What encoder and decoder layers share: the feed-forward block (``linear1``, ReLU, dropout,
  ``linear2``) and residual dropout."""

  def _init_ffn(self, cfg: DETRConfig, rngs: nnx.Rngs) -> None:
    dtype = DTYPES[cfg.dtype]
    self.linear1 = Dense(cfg.hidden_size, cfg.mlp_dim, axes=("embed", "mlp"), rngs=rngs,
                         kernel_init=xavier_uniform, dtype=dtype)
    self.linear2 = Dense(cfg.mlp_dim, cfg.hidden_size, axes=("mlp", "embed"), rngs=rngs,
                         kernel_init=xavier_uniform, dtype=dtype)
    self.pre_norm, self.dropout_rate = cfg.normalize_before, cfg.dropout_rate

  def _ffn(self, x: jax.Array, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    y = self._drop(jax.nn.relu(self.linear1(x)), train, rngs)
    return self.linear2(y)

  def _drop(self, x: jax.Array, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    return dropout(x, self.dropout_rate, train=train, rngs=rngs)


def _attention(cfg: DETRConfig, rngs: nnx.Rngs) -> MultiHeadAttention:
  return MultiHeadAttention(cfg.hidden_size, cfg.num_heads, rngs=rngs,
                            dropout_rate=cfg.attention_dropout_rate, dtype=DTYPES[cfg.dtype],
                            implementation=cfg.attention)


def _norm(cfg: DETRConfig, rngs: nnx.Rngs) -> LayerNorm:
  return LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, rngs=rngs, dtype=DTYPES[cfg.dtype])


class EncoderLayer(_Layer):
  """Self-attention (positions on queries and keys) and the feed-forward block."""

  def __init__(self, cfg: DETRConfig, *, rngs: nnx.Rngs):
    self.self_attn = _attention(cfg, rngs)
    self._init_ffn(cfg, rngs)
    self.norm1, self.norm2 = _norm(cfg, rngs), _norm(cfg, rngs)

  def __call__(self, x: jax.Array, pos: jax.Array, mask: jax.Array, *, train: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    attend = lambda y: self._drop(self.self_attn(y + pos, value=y, mask=mask, train=train,
                                                 rngs=rngs), train, rngs)
    ffn = lambda y: self._drop(self._ffn(y, train, rngs), train, rngs)
    if self.pre_norm:
      x = x + attend(self.norm1(x))
      return x + ffn(self.norm2(x))
    x = self.norm1(x + attend(x))
    return self.norm2(x + ffn(x))


class DecoderLayer(_Layer):
  """Self-attention over the queries, cross-attention to the encoder output, feed-forward."""

  def __init__(self, cfg: DETRConfig, *, rngs: nnx.Rngs):
    self.self_attn = _attention(cfg, rngs)
    self.multihead_attn = _attention(cfg, rngs)
    self._init_ffn(cfg, rngs)
    self.norm1, self.norm2, self.norm3 = _norm(cfg, rngs), _norm(cfg, rngs), _norm(cfg, rngs)

  def __call__(self, x: jax.Array, memory: jax.Array, pos: jax.Array, query_pos: jax.Array,
               mask: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    keys = memory + pos
    attend = lambda y: self._drop(self.self_attn(y + query_pos, value=y, train=train, rngs=rngs),
                                  train, rngs)
    cross = lambda y: self._drop(self.multihead_attn(y + query_pos, keys, value=memory, mask=mask,
                                                     train=train, rngs=rngs), train, rngs)
    ffn = lambda y: self._drop(self._ffn(y, train, rngs), train, rngs)
    if self.pre_norm:
      x = x + attend(self.norm1(x))
      x = x + cross(self.norm2(x))
      return x + ffn(self.norm3(x))
    x = self.norm1(x + attend(x))
    x = self.norm2(x + cross(x))
    return self.norm3(x + ffn(x))


class Encoder(nnx.Module):
  def __init__(self, cfg: DETRConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.encoder_layers)])
    self.norm = _norm(cfg, rngs) if cfg.normalize_before else None

  def __call__(self, x, pos, mask, *, train, rngs):
    for layer in self.layers:
      x = layer(x, pos, mask, train=train, rngs=rngs)
    return x if self.norm is None else self.norm(x)


class Decoder(nnx.Module):
  def __init__(self, cfg: DETRConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.decoder_layers)])
    self.norm = _norm(cfg, rngs)

  def __call__(self, memory, pos, query_pos, mask, *, train, rngs) -> jax.Array:
    """Every layer's output through the final norm: [layers, B, queries, hidden]."""
    x = jnp.zeros_like(query_pos)
    outputs = []
    for layer in self.layers:
      x = layer(x, memory, pos, query_pos, mask, train=train, rngs=rngs)
      outputs.append(self.norm(x))
    return jnp.stack(outputs)


class DETR(nnx.Module):
  """``model(images, pixel_mask=None, train=False, rngs=None)`` -> dict of float32 arrays:
  ``logits`` [B, Q, num_classes + 1], ``boxes`` [B, Q, 4] (sigmoid cx, cy, w, h), and
  ``aux_logits``, ``aux_boxes`` [decoder_layers - 1, B, Q, ...] of the earlier decoder layers.

  ``images``: NHWC floats of any size; ``pixel_mask`` [B, H, W]: 1 for real pixels, 0 for
  padding (None: all real).
  """

  def __init__(self, cfg: DETRConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    dtype = DTYPES[cfg.dtype]
    d = cfg.hidden_size
    self.backbone = ResNetV1(cfg.resnet_layers, width=cfg.resnet_width, channels=cfg.channels,
                             dilation=cfg.dilation, rngs=rngs, dtype=dtype)
    self.input_proj = Dense(self.backbone.out_channels, d, axes=("conv_in", "embed"), rngs=rngs,
                            kernel_init=xavier_uniform, dtype=dtype)
    self.query_embed = param(rngs, jax.nn.initializers.normal(1.0), (cfg.num_queries, d),
                             (None, "embed"))
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.class_embed = Dense(d, cfg.num_classes + 1, axes=("embed", "classes"), rngs=rngs,
                             dtype=dtype)
    self.bbox_embed = MLPHead(d, 4, None, rngs=rngs, dtype=dtype)

  def check_inputs(self, images: jax.Array, pixel_mask: jax.Array | None) -> None:
    c = self.config.channels
    if images.ndim != 4 or images.shape[-1] != c:
      raise ValueError(f"images of shape {tuple(images.shape)} do not fit this DETR: it takes NHWC "
                       f"batches with {c} channels")
    if pixel_mask is not None and tuple(pixel_mask.shape) != tuple(images.shape[:3]):
      raise ValueError(f"pixel_mask of shape {tuple(pixel_mask.shape)} does not fit images of "
                       f"shape {tuple(images.shape)}: expected {tuple(images.shape[:3])}")

  def __call__(self, images: jax.Array, *, pixel_mask: jax.Array | None = None,
               train: bool = False, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    self.check_inputs(images, pixel_mask)
    b = images.shape[0]
    if pixel_mask is None:
      pixel_mask = jnp.ones(images.shape[:3], jnp.float32)
    features = self.backbone(images)
    _, h, w, _ = features.shape
    mask = downsample_mask(pixel_mask, h, w)
    x = self.input_proj(features).reshape(b, h * w, -1)
    pos = sine_positions(mask, self.config.hidden_size).reshape(b, h * w, -1).astype(x.dtype)
    mask = mask.reshape(b, h * w)
    memory = self.encoder(x, pos, mask, train=train, rngs=rngs)
    queries = self.query_embed[...].astype(x.dtype)
    query_pos = jnp.broadcast_to(queries, (b, *queries.shape))
    hs = self.decoder(memory, pos, query_pos, mask, train=train, rngs=rngs)
    logits = self.class_embed(hs).astype(jnp.float32)
    boxes = jax.nn.sigmoid(self.bbox_embed(hs).astype(jnp.float32))
    return {"logits": logits[-1], "boxes": boxes[-1], "aux_logits": logits[:-1],
            "aux_boxes": boxes[:-1]}


OPTIONS = registry.config_options(DETRConfig)


def detr_flops(model: DETR) -> int:
  """2 x multiply-adds of one image at ``config.image_size``: backbone convolutions, input
  projection, encoder and decoder (attention and feed-forward), and the heads on every decoder
  layer's output (the auxiliary outputs are computed too)."""
  cfg = model.config
  height, width = cfg.image_size
  n = len(cfg.resnet_layers)
  tokens = feature_size(height, n, cfg.dilation) * feature_size(width, n, cfg.dilation)
  d, f, q, heads = cfg.hidden_size, cfg.mlp_dim, cfg.num_queries, cfg.num_heads
  channels = 4 * cfg.resnet_width * 2 ** (n - 1)
  flops = resnet_v1_flops(cfg.resnet_layers, cfg.resnet_width, cfg.channels, height, width,
                          cfg.dilation)
  flops += 2 * tokens * channels * d
  flops += cfg.encoder_layers * (attention_flops(tokens, tokens, d, heads, d // heads)
                                 + 2 * 2 * tokens * d * f)
  flops += cfg.decoder_layers * (attention_flops(q, q, d, heads, d // heads)
                                 + attention_flops(q, tokens, d, heads, d // heads)
                                 + 2 * 2 * q * d * f)
  flops += cfg.decoder_layers * 2 * q * (d * (cfg.num_classes + 1) + 2 * d * d + 4 * d)
  return flops


def build_detr(match: re.Match, *, num_classes: int, image_size: ImageSize, rngs: nnx.Rngs,
               overrides: dict[str, Any]) -> DETR:
  depth = int(match["depth"])
  registry.check_options("DETR", overrides, OPTIONS)
  if depth not in DEPTHS and "resnet_layers" not in overrides:
    raise ValueError(f"DETR-R{depth}: depth {depth} is not one of {sorted(DEPTHS)} "
                     f"(or give resnet_layers=...)")
  kwargs = {"resnet_layers": DEPTHS.get(depth), "dilation": bool(match["dc5"]), **overrides}
  return DETR(DETRConfig(num_classes=num_classes, image_size=image_size, **kwargs), rngs=rngs)


registry.register_family(
    "DETR",
    pattern=r"DETR-R(?P<depth>\d+)(?P<dc5>-DC5)?",
    build=build_detr,
    examples=("DETR-R50", "DETR-R101", "DETR-R50-DC5", "DETR-R101-DC5"),
    help="DETR-R{50,101}[-DC5]: ResNet v1.5 + transformer encoder-decoder detector "
         "(-DC5: dilated last stage)",
    sizes=DEPTHS,
    flops=detr_flops,
    sharding_rules=CONV_RULES,
    options=OPTIONS,
    checkpoint_family="DETR",
)
