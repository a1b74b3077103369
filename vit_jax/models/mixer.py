"""MLP-Mixer (Tolstikhin et al., 2021), structured as the original code.

Parameter names follow the released checkpoints (google-research/vision_transformer
``models_mixer.py``): ``stem`` (conv patchify, kernel (p, p, C, D)),
``MixerBlock_{i}/{LayerNorm_0, token_mixing/Dense_{0,1}, LayerNorm_1, channel_mixing/Dense_{0,1}}``
(stored as the list ``blocks``), ``pre_head_layer_norm`` and the zero-initialised ``head``.
LayerNorm eps 1e-6 as the original; GELU exact by default (timm), tanh with
``gelu_approximate=True`` (the original code).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.models import patches, registry
from vit_jax.models.layers import DTYPES, Dense, LayerNorm, Mlp, drop_path, lecun_normal, mlp_flops, zeros


# Width, depth, token-mixing MLP width, channel-mixing MLP width (Mixer paper Table 1).
VARIANTS: dict[str, dict[str, int]] = {
    "S": dict(hidden_size=512, num_layers=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "B": dict(hidden_size=768, num_layers=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "L": dict(hidden_size=1024, num_layers=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "H": dict(hidden_size=1280, num_layers=32, tokens_mlp_dim=640, channels_mlp_dim=5120),
}


@dataclasses.dataclass(frozen=True)
class MixerConfig(patches.PatchConfig):
  num_classes: int
  patch_size: int = 16
  image_size: int = 224
  hidden_size: int = 768
  num_layers: int = 12
  tokens_mlp_dim: int = 384
  channels_mlp_dim: int = 3072
  channels: int = 3
  dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: str = "float32"
  gelu_approximate: bool = False
  layernorm_eps: float = 1e-6


class MixerBlock(nnx.Module):
  """x + token_mixing(LN(x)^T)^T, then x + channel_mixing(LN(x))."""

  def __init__(self, cfg: MixerConfig, drop_path_rate: float, *, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    mlp = dict(rngs=rngs, dropout_rate=cfg.dropout_rate, gelu_approximate=cfg.gelu_approximate,
               dtype=dtype)
    self.LayerNorm_0 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, rngs=rngs, dtype=dtype)
    self.token_mixing = Mlp(cfg.grid ** 2, cfg.tokens_mlp_dim, axes=("tokens", "mlp"), **mlp)
    self.LayerNorm_1 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, rngs=rngs, dtype=dtype)
    self.channel_mixing = Mlp(cfg.hidden_size, cfg.channels_mlp_dim, **mlp)
    self.drop_path_rate = drop_path_rate

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    y = jnp.swapaxes(self.LayerNorm_0(x), 1, 2)
    y = jnp.swapaxes(self.token_mixing(y, train=train, rngs=rngs), 1, 2)
    x = x + drop_path(y, self.drop_path_rate, train=train, rngs=rngs)
    y = self.channel_mixing(self.LayerNorm_1(x), train=train, rngs=rngs)
    return x + drop_path(y, self.drop_path_rate, train=train, rngs=rngs)


class MlpMixer(nnx.Module):
  """Mixer classifier: ``model(images, train=False)`` maps NHWC images in [-1, 1] to logits."""

  def __init__(self, cfg: MixerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    dtype = DTYPES[cfg.dtype]
    p, d = cfg.patch_size, cfg.hidden_size
    self.stem = Dense((p, p, cfg.channels), d, axes=("patch", "patch", "channels", "embed"),
                      rngs=rngs, kernel_init=lecun_normal, dtype=dtype)
    rates = np.linspace(0.0, cfg.stochastic_depth, cfg.num_layers)
    self.blocks = nnx.List([MixerBlock(cfg, float(r), rngs=rngs) for r in rates])
    self.pre_head_layer_norm = LayerNorm(d, eps=cfg.layernorm_eps, rngs=rngs, dtype=dtype)
    self.head = Dense(d, cfg.num_classes, axes=("embed", "classes"), rngs=rngs, kernel_init=zeros,
                      dtype=dtype)

  def check_images(self, images: jax.Array) -> None:
    patches.check_images(images, self.config.image_size, self.config.channels)

  def encode(self, images: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """All tokens after the final norm: [B, grid*grid, hidden]."""
    cfg = self.config
    self.check_images(images)
    b, g = images.shape[0], cfg.grid
    x = self.stem(patches.patchify(images, cfg.patch_size)).reshape(b, g * g, cfg.hidden_size)
    for block in self.blocks:
      x = block(x, train=train, rngs=rngs)
    return self.pre_head_layer_norm(x)

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    x = jnp.mean(self.encode(images, train=train, rngs=rngs), axis=1)
    return self.head(x).astype(jnp.float32)


# Every option of ``models.create`` for a Mixer (the config's fields but the class count and size).
OPTIONS = registry.config_options(MixerConfig)


def mixer_flops(model: MlpMixer) -> int:
  """2 x multiply-adds per image: patch embedding, token- and channel-mixing MLPs, head."""
  c = model.config
  n, d = c.grid ** 2, c.hidden_size
  block = mlp_flops(d, n, c.tokens_mlp_dim) + mlp_flops(n, d, c.channels_mlp_dim)
  return 2 * n * c.patch_size ** 2 * c.channels * d + c.num_layers * block + 2 * d * c.num_classes


registry.register_family(
    "Mixer",
    pattern=r"Mixer-(?P<variant>S|B|L|H)[/_](?P<patch>\d+)",
    build=registry.patch_model_builder("Mixer", MlpMixer, MixerConfig, VARIANTS, OPTIONS),
    examples=("Mixer-S/16", "Mixer-B/16", "Mixer-B/32", "Mixer-L/16"),
    help="Mixer-{S,B,L,H}/<patch>: MLP-Mixer; 'Mixer-B_16' spelling accepted",
    sizes=VARIANTS,
    flops=mixer_flops,
    # The token-mixing MLP's input and output (the number of patches) stay whole.
    sharding_rules=(("tokens", None),),
    options=OPTIONS,
    checkpoint_family="Mixer",
)
