"""`digit_scenes`: detection scenes made of the real scikit-learn digits, as a TFDS dataset.

Each scene is a 64x64 grey canvas (uint8, 0 background) holding 1 to 6 digits (uniform). Each
digit is one of scikit-learn's 8x8 images (`sklearn_digits`' values 0..255), resized bilinearly to
a random square of 12 to 24 pixels (uniform) and pasted at a uniform random position inside the
canvas; a placement whose box IoU with an earlier digit's box exceeds 0.1 is redrawn. Where digits
overlap a pixel takes the maximum. A digit's box is tight around its nonzero pixels on the
canvas; its label is the digit, 0..9.

`train` scenes use only the digits of `sklearn_digits`' `train` split, `test` scenes only those of
its `test` split (the digits dataset's own stratified split), so no test digit image is ever
seen in training. Scene s of a split is a pure function of (split seed, s): the splits are fixed
by this definition and built offline, the same on every machine.

Features, laid out as TFDS's `coco/2017` so that one detection pipeline reads both: `image`
(64, 64, 1) uint8; `image/id` int64 (the scene index); `objects`: a sequence of `bbox`
(tfds BBox: normalised ymin, xmin, ymax, xmax), `label` (ClassLabel '0'..'9'), `is_crowd`
(always False) and `area` (box area in pixels).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from vit_jax.data import digits

CANVAS = 64
MIN_DIGITS, MAX_DIGITS = 1, 6
MIN_SIZE, MAX_SIZE = 12, 24
MAX_IOU = 0.1
SPLIT_SIZES = {"train": 20_000, "test": 1_000}
SPLIT_SEEDS = {"train": 1, "test": 2}
_MAX_REDRAWS = 1_000


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """[h, w] uint8 -> [size, size] uint8, bilinear with half-pixel centres (edge-clamped)."""
  h, w = image.shape

  def weights(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = (np.arange(size) + 0.5) * (n_in / size) - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, x - lo

  y0, y1, fy = weights(h)
  x0, x1, fx = weights(w)
  img = image.astype(np.float64)
  top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
  bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
  out = top * (1 - fy)[:, None] + bottom * fy[:, None]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two (y0, x0, y1, x1) pixel boxes."""
  ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ih * iw
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


class _Resized:
  """``resized(index, size)``: digit ``index`` resized to ``size`` and its nonzero extent, cached."""

  def __init__(self, images: np.ndarray):
    self.images, self.cache = images, {}

  def __call__(self, index: int, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    key = (index, size)
    if key not in self.cache:
      digit = resize_bilinear(self.images[index], size)
      rows, cols = np.nonzero(digit)
      self.cache[key] = digit, (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
    return self.cache[key]


def make_scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
               resized: _Resized | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One scene from the digit ``images`` [N, 8, 8] and ``labels`` [N]: (canvas [64, 64] uint8,
  pixel boxes [n, 4] (y0, x0, y1, x1) float32 with exclusive ends, labels [n] int64)."""
  resized = resized or _Resized(images)
  canvas = np.zeros((CANVAS, CANVAS), np.uint8)
  count = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
  placed: list[np.ndarray] = []  # the pasted squares, for the overlap test
  boxes, out_labels = [], []
  for _ in range(count):
    index = int(rng.integers(len(images)))
    for _ in range(_MAX_REDRAWS):
      size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
      y, x = (int(v) for v in rng.integers(0, CANVAS - size + 1, size=2))
      digit, (r0, c0, r1, c1) = resized(index, size)
      box = np.array([y + r0, x + c0, y + r1, x + c1], np.float32)
      if all(_iou(box, other) <= MAX_IOU for other in placed):
        break
    else:
      raise RuntimeError("could not place a digit without overlap")  # never with these sizes
    placed.append(box)
    np.maximum(canvas[y:y + size, x:x + size], digit, out=canvas[y:y + size, x:x + size])
    boxes.append(box)
    out_labels.append(int(labels[index]))
  return canvas, np.stack(boxes), np.asarray(out_labels, np.int64)


def split_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The 8x8 digits (uint8 [N, 8, 8]) and labels a split's scenes are made of."""
  images, labels = digits.digits_arrays()
  indices = digits.split_indices(labels)[split]
  return images[indices, :, :, 0], labels[indices]


def scenes(split: str, start: int = 0, stop: int | None = None
           ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
  """Scenes ``start..stop`` of ``split`` as (index, canvas, pixel boxes, labels)."""
  if split not in SPLIT_SIZES:
    raise ValueError(f"digit_scenes has no split {split!r}; its splits are {sorted(SPLIT_SIZES)}")
  images, labels = split_digits(split)
  resized = _Resized(images)
  stop = SPLIT_SIZES[split] if stop is None else stop
  for s in range(start, stop):
    rng = np.random.default_rng([SPLIT_SEEDS[split], s])
    yield (s, *make_scene(rng, images, labels, resized))


class DigitScenes(tfds.core.GeneratorBasedBuilder):
  """Detection scenes of scikit-learn digits (64x64 grey, 1-6 boxes, 10 classes), offline."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "20,000 train and 1,000 test scenes."}
  PREPARES_OFFLINE = True  # Read by vit_jax.data: preparing it never downloads.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(CANVAS, CANVAS, 1), dtype=np.uint8),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
                "is_crowd": np.bool_,
                "area": np.int64,
            }),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    for s, canvas, boxes, labels in scenes(split):
      yield s, {
          "image": canvas[..., None],
          "image/id": s,
          "objects": {
              "bbox": [tfds.features.BBox(*(b / CANVAS)) for b in boxes.astype(np.float64)],
              "label": labels,
              "is_crowd": np.zeros(len(labels), np.bool_),
              "area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.int64),
          },
      }


def write_coco_folder(folder: str, split: str = "test", start: int = 0, count: int = 8) -> str:
  """Writes scenes ``start..start+count`` of ``split`` as a COCO-format folder: ``images/`` (one
  PNG per scene, ``scene{index}.png``) and ``instances.json`` (boxes [x, y, w, h] in pixels,
  category ids 0..9 named '0'..'9'); returns the annotation file's path."""
  import json
  import os

  from PIL import Image  # pylint: disable=g-import-not-at-top

  if count < 1 or start < 0 or start + count > SPLIT_SIZES.get(split, 0):
    raise ValueError(f"scenes {start}..{start + count - 1} of {split!r}: digit_scenes has "
                     f"{SPLIT_SIZES} scenes per split")
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  images, annotations = [], []
  for s, canvas, boxes, labels in scenes(split, start, start + count):
    name = f"scene{s}.png"
    Image.fromarray(canvas).save(os.path.join(folder, "images", name))
    images.append({"id": s, "file_name": name, "height": CANVAS, "width": CANVAS})
    for (y0, x0, y1, x1), label in zip(boxes.tolist(), labels.tolist()):
      annotations.append({"id": len(annotations) + 1, "image_id": s, "category_id": label,
                          "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                          "iscrowd": 0})
  path = os.path.join(folder, "instances.json")
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": annotations,
               "categories": [{"id": i, "name": str(i)} for i in range(10)]}, f)
  return path


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(
      description="Write digit scenes as a COCO-format folder (images/ and instances.json), e.g. "
                  "to try predict.py or a COCO-format config: python -m vit_jax.data.digit_scenes "
                  "--out scenes --split test --count 4")
  parser.add_argument("--out", required=True, help="folder to write")
  parser.add_argument("--split", default="test", choices=sorted(SPLIT_SIZES))
  parser.add_argument("--start", type=int, default=0, help="first scene index")
  parser.add_argument("--count", type=int, default=8, help="how many scenes")
  a = parser.parse_args()
  try:
    print(write_coco_folder(a.out, a.split, a.start, a.count))
  except ValueError as e:
    parser.error(str(e))
