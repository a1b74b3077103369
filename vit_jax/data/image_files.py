"""Image files as model inputs (predict.py, visualize.py): PIL and numpy only."""

from __future__ import annotations

import numpy as np


def load_image(path: str, size: int, channels: int) -> np.ndarray:
  """An image file resized to size x size (bilinear), values in [-1, 1], HWC."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im = im.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
      x = np.asarray(im, np.float32)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read the image {path!r}: {e}") from None
  x = x.reshape(size, size, channels)
  return x / 127.5 - 1.0


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def fit_to_canvas(path: str, canvas: tuple[int, int], channels: int, normalize: str):
  """(the decoded image HWC uint8, the model input [H, W, C] fitted into ``canvas`` keeping the
  aspect ratio and zero-padded at the bottom and right, its pixel mask [H, W])."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im = im.convert("RGB" if channels == 3 else "L")
      original = np.asarray(im, np.uint8).reshape(im.height, im.width, channels)
      scale = min(canvas[0] / im.height, canvas[1] / im.width)
      size = (max(1, min(canvas[1], round(im.width * scale))),
              max(1, min(canvas[0], round(im.height * scale))))
      x = np.asarray(im.resize(size, Image.BILINEAR), np.float32).reshape(size[1], size[0], channels)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read the image {path!r}: {e}") from None
  if normalize == "imagenet":
    x = (x / 255.0 - np.asarray(IMAGENET_MEAN[:channels])) / np.asarray(IMAGENET_STD[:channels])
  else:
    x = x / 127.5 - 1.0
  padded = np.zeros((*canvas, channels), np.float32)
  padded[:x.shape[0], :x.shape[1]] = x
  mask = np.zeros(canvas, np.float32)
  mask[:x.shape[0], :x.shape[1]] = 1.0
  return original, padded, mask
