"""Detections drawn on their image (PIL), for predict.py's ``--out``."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Distinct colours, one per class (cycled).
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))
MIN_DRAWN_SIDE = 256


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str] | None = None):
  """A PIL RGB image of ``image`` (HWC uint8, 1 or 3 channels) with each pixel box (x0, y0,
  x1, y1) outlined and captioned "name score". Small images are enlarged (nearest neighbour)
  to at least 256 pixels on their shorter side so the captions stay legible."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  pil = Image.fromarray(image.astype(np.uint8)).convert("RGB")
  scale = max(1, -(-MIN_DRAWN_SIDE // min(pil.size)))
  if scale > 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  draw = ImageDraw.Draw(pil)
  for box, score, label in zip(np.asarray(boxes), np.asarray(scores), np.asarray(labels)):
    colour = PALETTE[int(label) % len(PALETTE)]
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    draw.rectangle([x0, y0, x1, y1], outline=colour, width=max(1, scale // 2))
    name = class_names[int(label)] if class_names else str(int(label))
    caption = f"{name} {float(score):.2f}"
    left, top, right, bottom = draw.textbbox((x0, y0), caption)
    y = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y1 + 1
    draw.rectangle([x0, y, x0 + (right - left) + 2, y + (bottom - top) + 2], fill=colour)
    draw.text((x0 + 1, y), caption, fill=(0, 0, 0))
  return pil
