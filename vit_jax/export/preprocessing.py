"""timm's eval transform in JAX, to bake into an exported model: uint8 images of one fixed size
-> resized (shorter side to size / crop_pct), centre-cropped to the model's size, normalised."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos3")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """uint8 [b, *input_size, C] -> the model's float32 input [b, *size, C].

  As timm's ``transforms_factory`` eval path: resize the shorter side to
  ``floor(size / crop_pct)`` (the longer in proportion, truncated), centre-crop ``size``, then
  (pixels / 255 - mean) / std. The resize is ``jax.image.resize`` in float32 (antialiased when
  shrinking), not PIL's, so results differ from timm's by resampling details.
  """
  input_size: tuple[int, int]
  size: tuple[int, int]
  crop_pct: float = 1.0
  interpolation: str = "bilinear"
  mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  std: tuple[float, ...] = (0.5, 0.5, 0.5)

  def __post_init__(self):
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
    if not 0 < self.crop_pct <= 1:
      raise ValueError(f"crop_pct {self.crop_pct} is not in (0, 1]")
    if min(self.input_size) < 1:
      raise ValueError(f"input size {self.input_size} is not positive")

  @classmethod
  def for_model(cls, size: tuple[int, int], crop_pct: float | None, interpolation: str,
                mean, std, input_size: tuple[int, int] | None = None) -> "Preprocessing":
    """The preprocessing of a model of ``size``; ``input_size`` defaults to size / crop_pct."""
    crop_pct = 1.0 if crop_pct is None else float(crop_pct)
    if input_size is None:
      input_size = tuple(math.floor(s / crop_pct) for s in size)
    return cls(tuple(input_size), tuple(size), crop_pct, interpolation, tuple(mean), tuple(std))

  @property
  def resized_size(self) -> tuple[int, int]:
    """(height, width) after the resize: the shorter side floor(size / crop_pct)."""
    scale = math.floor(self.size[0] / self.crop_pct)  # timm's models are square
    h, w = self.input_size
    if h <= w:
      return scale, int(scale * w / h)
    return int(scale * h / w), scale

  @property
  def crop_box(self) -> tuple[int, int]:
    """(top, left) of the centre crop, as torchvision's ``CenterCrop``."""
    (rh, rw), (th, tw) = self.resized_size, self.size
    if rh < th or rw < tw:
      raise ValueError(f"input {self.input_size[0]}x{self.input_size[1]} resized to {rh}x{rw} is "
                       f"smaller than the model's {th}x{tw}")
    return int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))

  def __call__(self, images: jax.Array) -> jax.Array:
    if tuple(images.shape[1:3]) != tuple(self.input_size):
      raise ValueError(f"images of shape {tuple(images.shape)}: this preprocessing takes "
                       f"(batch, {self.input_size[0]}, {self.input_size[1]}, channels) uint8")
    x = images.astype(jnp.float32)
    rh, rw = self.resized_size
    if (rh, rw) != tuple(self.input_size):
      x = jax.image.resize(x, (x.shape[0], rh, rw, x.shape[3]), self.interpolation)
    top, left = self.crop_box
    x = x[:, top:top + self.size[0], left:left + self.size[1]]
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (x / 255.0 - mean) / std

  def to_json(self) -> dict[str, Any]:
    return {"input_size": list(self.input_size), "input_dtype": "uint8",
            "resize_to": list(self.resized_size), "crop_top_left": list(self.crop_box),
            "crop_pct": self.crop_pct, "interpolation": self.interpolation,
            "mean": list(self.mean), "std": list(self.std)}
