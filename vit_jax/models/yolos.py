"""YOLOS (Fang et al., 2021, arXiv 2106.00666): a plain ViT detector, as hustvl/YOLOS and
transformers' ``YolosForObjectDetection``.

The tokens are ``[CLS] + patches + num_det_tokens`` learnable detection tokens, run through the
ViT's own encoder blocks (``vit.EncoderBlock``); after the final norm, the detection tokens go
through two 3-layer MLP heads (ReLU): classes plus "no object", and boxes (sigmoid, normalised
cx, cy, w, h). Position embeddings are stored for the training grid ``image_size // patch_size``
(class, grid and detection positions, HF's layout) and the grid part is resized to the input's
grid with PyTorch's bicubic ``F.interpolate(align_corners=False)`` (``resize_positions``); the
optional mid position embeddings are added after every block but the last, resized the same way.
An input of any height and width is cut into whole patches; the remainder is dropped, as the
strided patch convolution of the reference does.

Parameter names follow the ViT's: ``embedding``, ``cls``, ``det_tokens``,
``Transformer/{posembed_input/pos_embedding, mid_pos_embedding, blocks/{i}/..., encoder_norm}``,
``class_head/Dense_{0,1,2}``, ``box_head/Dense_{0,1,2}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.models import patches, registry, vit
from vit_jax.models.patches import ImageSize, image_hw
from vit_jax.models.attention import attention_flops
from vit_jax.models.layer_stack import REMAT_POLICIES, apply_blocks, make_blocks
from vit_jax.models.layers import (DTYPES, Dense, LayerNorm, MLPHead, check_dtype, dropout, lecun_normal,
                                   mlp_flops, param, zeros)

VARIANTS = vit.VARIANTS


@dataclasses.dataclass(frozen=True)
class YOLOSConfig:
  """Everything that defines a YOLOS. ``image_size`` (an int or (height, width)) is the training
  size the position embeddings are stored for, as HF's ``YolosConfig.image_size``; inputs may
  have any size. The encoder fields are ``vit.ViTConfig``'s, which ``vit.EncoderBlock`` reads."""
  num_classes: int
  image_size: ImageSize = (800, 1333)
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  channels: int = 3
  num_det_tokens: int = 100
  use_mid_position_embeddings: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: str = "float32"
  gelu_approximate: bool = False
  attention: str = "explicit"
  layernorm_eps: float = 1e-6  # the original's; HF's configs say 1e-12
  scan: bool = False
  remat: str = "none"

  def __post_init__(self):
    check_dtype(self.dtype)
    object.__setattr__(self, "image_size", image_hw(self.image_size))
    h, w = self.image_size
    if self.patch_size < 1 or min(h, w) < self.patch_size:
      raise ValueError(f"image_size {self.image_size} must be at least one patch "
                       f"(patch_size {self.patch_size}) high and wide")
    if self.num_det_tokens < 1:
      raise ValueError(f"num_det_tokens must be at least 1, got {self.num_det_tokens}")
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")
    if self.use_mid_position_embeddings and (h % self.patch_size or w % self.patch_size):
      # HF stores 1 + h*w // p**2 + det mid positions, which are no grid unless p divides both.
      raise ValueError(f"use_mid_position_embeddings needs an image_size that is a multiple of "
                       f"the patch size {self.patch_size} in both dimensions, got {self.image_size}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat policy {self.remat!r} is not one of {tuple(REMAT_POLICIES)}")

  @property
  def grid(self) -> tuple[int, int]:
    """Patches per column and per row of the stored position embeddings."""
    return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Tokens at the stored grid: [CLS], the patches, the detection tokens."""
    return 1 + self.grid[0] * self.grid[1] + self.num_det_tokens


def cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's 1-D bicubic resize (``align_corners=False``, a = -0.75,
  half-pixel centres, taps clamped at the borders, no antialiasing).

  The source coordinates and weights are computed as PyTorch's CPU kernel does, in float32 with
  fused multiply-adds (one rounding each, as its compiled x86 code): in float64 the weights of
  an 83 -> 54 resize lie up to 1.3e-6 from PyTorch's, these within 1.4e-7.
  """
  f32 = np.float32
  fma = lambda x, y, z: (np.float64(x) * np.float64(y) + np.float64(z)).astype(f32)
  a = f32(-0.75)
  near = lambda x: fma(fma(a + 2, x, -(a + 3)) * x, x, f32(1))        # |x| <= 1
  far = lambda x: fma(fma(fma(a, x, -5 * a), x, 8 * a), x, -4 * a)  # 1 < |x| < 2
  src = fma(f32(n_in) / f32(n_out), np.arange(n_out, dtype=f32) + f32(0.5), f32(-0.5))
  base = np.minimum(np.floor(src), n_in - 1).astype(int)
  t = np.clip(src - base.astype(f32), f32(0), f32(1))
  rest = f32(1) - t
  taps = (far(t + f32(1)), near(t), near(rest), far(rest + f32(1)))
  w = np.zeros((n_out, n_in))
  for offset, weight in zip(range(-1, 3), taps):
    np.add.at(w, (np.arange(n_out), np.clip(base + offset, 0, n_in - 1)), weight.astype(np.float64))
  return w


def resize_positions(posemb: Any, grid: tuple[int, int], new_grid: tuple[int, int],
                     num_det_tokens: int) -> Any:
  """[..., 1 + gh*gw + det, D] -> [..., 1 + gh'*gw' + det, D]: the grid part resized as
  PyTorch's bicubic ``F.interpolate``; the class and detection positions kept. Works on numpy
  arrays (float64 inside) and on jax arrays (float32, highest matmul precision)."""
  (gh, gw), (nh, nw) = grid, new_grid
  if posemb.shape[-2] != 1 + gh * gw + num_det_tokens:
    raise ValueError(f"position embeddings of shape {tuple(posemb.shape)} do not hold a "
                     f"{gh}x{gw} grid, a class and {num_det_tokens} detection positions")
  if (gh, gw) == (nh, nw):
    return posemb
  lead, d = posemb.shape[:-2], posemb.shape[-1]
  cls, det = posemb[..., :1, :], posemb[..., posemb.shape[-2] - num_det_tokens:, :]
  cells = posemb[..., 1:1 + gh * gw, :].reshape(*lead, gh, gw, d)
  rows, cols = cubic_matrix(gh, nh), cubic_matrix(gw, nw)
  if isinstance(posemb, np.ndarray):
    out = np.einsum("ij,...jkd,lk->...ild", rows, cells.astype(np.float64), cols).astype(posemb.dtype)
    concat = np.concatenate
  else:
    out = jnp.einsum("ij,...jkd,lk->...ild", jnp.asarray(rows, posemb.dtype), cells,
                     jnp.asarray(cols, posemb.dtype), precision=jax.lax.Precision.HIGHEST)
    concat = jnp.concatenate
  return concat([cls, out.reshape(*lead, nh * nw, d), det], axis=-2)


class MidPositions(nnx.Module):
  """A block followed by the addition of its layer's mid position embeddings. ``apply_blocks``
  runs a stack of these as it runs the blocks (a scanned stack: ``addend`` with a leading
  layer axis too), so the mid embeddings need no loop of their own."""

  def __init__(self, block: nnx.Module, addend: jax.Array):
    self.block = block
    self.addend = nnx.Variable(addend)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None,
               drop_path_rate: float | jax.Array | None = None) -> jax.Array:
    y = self.block(x, train=train, rngs=rngs, drop_path_rate=drop_path_rate)
    return y + self.addend[...].astype(y.dtype)


class Encoder(nnx.Module):
  """Position embeddings (resized to the input's grid), the ViT blocks with the optional mid
  position embeddings, and the final norm."""

  def __init__(self, cfg: YOLOSConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.posembed_input = vit.PosEmbed(cfg.num_tokens, cfg.hidden_size, rngs=rngs)
    if cfg.use_mid_position_embeddings:
      self.mid_pos_embedding = param(
          rngs, jax.nn.initializers.truncated_normal(stddev=0.02),
          (cfg.num_layers - 1, 1, cfg.num_tokens, cfg.hidden_size), (None, None, None, "embed"))
    else:
      self.mid_pos_embedding = None
    self.drop_path_rates = tuple(float(r) for r in np.linspace(0.0, cfg.stochastic_depth, cfg.num_layers))
    self.blocks = make_blocks(lambda r: vit.EncoderBlock(cfg, 0.0, rngs=r), cfg.num_layers,
                              rngs=rngs, scan=cfg.scan)
    self.encoder_norm = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, rngs=rngs,
                                  dtype=DTYPES[cfg.dtype])

  def __call__(self, x: jax.Array, grid: tuple[int, int], *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    cfg = self.config
    resize = lambda pe: resize_positions(pe, cfg.grid, grid, cfg.num_det_tokens).astype(x.dtype)
    x = x + resize(self.posembed_input.pos_embedding[...])
    x = dropout(x, cfg.dropout_rate, train=train, rngs=rngs)
    blocks = self.blocks
    if self.mid_pos_embedding is not None:
      mid = resize(self.mid_pos_embedding[...])
      mid = jnp.concatenate([mid, jnp.zeros_like(mid[:1])])  # nothing after the last block
      if isinstance(blocks, nnx.List):
        blocks = nnx.List([MidPositions(b, mid[i]) for i, b in enumerate(blocks)])
      else:
        blocks = MidPositions(blocks, mid)
    x = apply_blocks(blocks, x, num_layers=cfg.num_layers, train=train, rngs=rngs,
                     remat=cfg.remat, drop_path_rates=self.drop_path_rates)
    return self.encoder_norm(x)


class YOLOS(nnx.Module):
  """YOLOS detector: ``model(images)`` maps NHWC images of any size to a dict of ``logits``
  [B, num_det_tokens, num_classes + 1] (the last class is "no object") and ``boxes``
  [B, num_det_tokens, 4] (sigmoid cx, cy, w, h relative to the input), both float32."""

  def __init__(self, cfg: YOLOSConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    dtype = DTYPES[cfg.dtype]
    p, d = cfg.patch_size, cfg.hidden_size
    self.embedding = Dense((p, p, cfg.channels), d, axes=("patch", "patch", "channels", "embed"),
                           rngs=rngs, kernel_init=lecun_normal, dtype=dtype)
    self.cls = param(rngs, zeros, (1, 1, d), (None, None, "embed"))
    self.det_tokens = param(rngs, jax.nn.initializers.truncated_normal(stddev=0.02),
                            (1, cfg.num_det_tokens, d), (None, None, "embed"))
    self.Transformer = Encoder(cfg, rngs=rngs)
    self.class_head = MLPHead(d, cfg.num_classes + 1, "classes", rngs=rngs, dtype=dtype)
    self.box_head = MLPHead(d, 4, None, rngs=rngs, dtype=dtype)

  def check_images(self, images: jax.Array, pixel_mask: jax.Array | None = None) -> tuple[int, int]:
    """Raises a ValueError unless ``images`` is an NHWC batch of at least one patch per side
    (and ``pixel_mask``, if given, is [B, H, W]); returns the input's patch grid."""
    cfg = self.config
    if (images.ndim != 4 or images.shape[-1] != cfg.channels
        or min(images.shape[1:3]) < cfg.patch_size):
      raise ValueError(f"images of shape {tuple(images.shape)} do not fit this model: it takes NHWC "
                       f"batches (batch, height, width, {cfg.channels}) of at least "
                       f"{cfg.patch_size} x {cfg.patch_size} pixels")
    if pixel_mask is not None and tuple(pixel_mask.shape) != tuple(images.shape[:3]):
      raise ValueError(f"pixel_mask of shape {tuple(pixel_mask.shape)} does not match images of "
                       f"shape {tuple(images.shape)}: expected {tuple(images.shape[:3])}")
    return images.shape[1] // cfg.patch_size, images.shape[2] // cfg.patch_size

  def encode(self, images: jax.Array, *, pixel_mask: jax.Array | None = None, train: bool = False,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """All tokens after the final norm: [B, 1 + patches + num_det_tokens, hidden]."""
    cfg = self.config
    gh, gw = self.check_images(images, pixel_mask)
    p, b = cfg.patch_size, images.shape[0]
    x = self.embedding(patches.patchify(images[:, :gh * p, :gw * p], p)).reshape(b, gh * gw, -1)
    expand = lambda t: jnp.broadcast_to(t[...].astype(x.dtype), (b,) + t.shape[1:])
    x = jnp.concatenate([expand(self.cls), x, expand(self.det_tokens)], axis=1)
    return self.Transformer(x, (gh, gw), train=train, rngs=rngs)

  def __call__(self, images: jax.Array, *, pixel_mask: jax.Array | None = None, train: bool = False,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """``pixel_mask`` ([B, H, W], 1 on real pixels) is accepted for the detection contract and
    ignored: YOLOS, like the original and HF's, attends over padding too."""
    x = self.encode(images, pixel_mask=pixel_mask, train=train, rngs=rngs)
    x = x[:, -self.config.num_det_tokens:]
    logits = self.class_head(x).astype(jnp.float32)
    boxes = jax.nn.sigmoid(self.box_head(x).astype(jnp.float32))
    return {"logits": logits, "boxes": boxes}


# Every option of ``models.create`` for a YOLOS (the config's fields but the class count and size).
OPTIONS = registry.config_options(YOLOSConfig)


def build_yolos(match: Any, *, num_classes: int, image_size: ImageSize, rngs: nnx.Rngs,
                overrides: dict[str, Any]) -> YOLOS:
  """``YOLOS-{variant}[/patch]``: the ViT variant's sizes, patch 16 unless named."""
  kwargs = {**VARIANTS[match["variant"]], "patch_size": int(match["patch"] or 16), **overrides}
  registry.check_options("YOLOS", kwargs, OPTIONS)
  return YOLOS(YOLOSConfig(num_classes=num_classes, image_size=image_size, **kwargs), rngs=rngs)


def yolos_flops(model: YOLOS) -> int:
  """2 x multiply-adds per image at the stored grid: patch embedding, encoder blocks, the two
  heads on the detection tokens (the position-embedding resize is not counted)."""
  c = model.config
  gh, gw = c.grid
  d, det = c.hidden_size, c.num_det_tokens
  flops = 2 * gh * gw * c.patch_size ** 2 * c.channels * d
  block = (attention_flops(c.num_tokens, c.num_tokens, d, c.num_heads, d // c.num_heads)
           + mlp_flops(c.num_tokens, d, c.mlp_dim))
  heads = 2 * det * (2 * d * d + d * (c.num_classes + 1)) + 2 * det * (2 * d * d + d * 4)
  return flops + c.num_layers * block + heads


registry.register_family(
    "YOLOS",
    pattern=r"YOLOS-(?P<variant>Ti|S|B|L|H|g)(?:[/_](?P<patch>\d+))?",
    build=build_yolos,
    examples=("YOLOS-Ti", "YOLOS-S", "YOLOS-B"),
    help="YOLOS-{Ti,S,B,L,H,g}[/<patch>]: ViT detector with detection tokens (patch 16 by default)",
    sizes=VARIANTS,
    flops=yolos_flops,
    options=OPTIONS,
    checkpoint_family="YOLOS",
)
