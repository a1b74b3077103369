"""Images cut into patches: the checks and the patchify step that the patch-based families share
(ViT and the hybrids' ViT part, MLP-Mixer, TNT, YOLOS), and the (height, width) input sizes of
the detectors."""

from __future__ import annotations

import jax
import numpy as np

from vit_jax.models.layers import check_dtype


class PatchConfig:
  """Base of a frozen config dataclass with ``image_size``, ``patch_size`` and ``dtype`` fields:
  checks them on construction and gives the patch ``grid`` (patches per side). Adds no fields."""

  def __post_init__(self):
    check_dtype(self.dtype)
    check_patch_size(self.image_size, self.patch_size)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


def check_patch_size(image_size: int, patch_size: int) -> None:
  """Raises a ValueError unless ``patch_size`` divides ``image_size``."""
  if image_size % patch_size:
    raise ValueError(f"image_size {image_size} is not a multiple of patch size {patch_size}")


def check_images(images: jax.Array, image_size: int, channels: int) -> None:
  """Raises a ValueError unless ``images`` is an NHWC batch of ``image_size`` squares."""
  want = (image_size, image_size, channels)
  if images.ndim != 4 or tuple(images.shape[1:]) != want:
    raise ValueError(f"images of shape {tuple(images.shape)} do not fit this model: it takes NHWC "
                     f"batches of shape (batch, {want[0]}, {want[1]}, {want[2]})")


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, p, p, C]: the pixels of each patch together, patches in
  raster order (a strided p x p conv is then a matmul over the last three axes)."""
  b, h, w, c = images.shape
  p = patch_size
  return images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)


# An input size: an int (squares) or (height, width).
ImageSize = int | tuple[int, int]


def image_hw(image_size: ImageSize) -> tuple[int, int]:
  """An int (a square) or a (height, width) pair -> (height, width)."""
  if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
    image_size = (image_size, image_size)
  if (isinstance(image_size, (tuple, list)) and len(image_size) == 2
      and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
              for s in image_size)):
    return int(image_size[0]), int(image_size[1])
  raise ValueError(f"image_size {image_size!r} is neither a positive int nor a (height, width) "
                   f"pair of them")
