"""`sklearn_digits`: the real handwritten digits that scikit-learn ships, as a TFDS dataset.

`sklearn.datasets.load_digits()` holds 1,797 grey 8x8 images (values 0..16) of the digits 0..9. This builder
stores them as uint8 images (value v becomes round(v * 255 / 16), so 16 -> 255) with a fixed stratified split,
drawn once with `train_test_split(..., test_size=300, stratify=labels, random_state=0)`: 1,497 `train` and
300 `test` examples; `train_0to4`, `test_0to4`, `train_5to9` and `test_5to9` hold the same examples of
the digits 0..4 and 5..9 alone (labels unchanged), for pre-training on half the classes and transferring
to the other half (configs/sweeps/digits.py). Examples are stored in ascending order of their index in `load_digits()` (also their
TFDS key), so the order is the same on every machine.

Everything ships with scikit-learn, so `download_and_prepare()` needs no network. Importing this module
registers the builder with TFDS (and imports `tensorflow_datasets`); `vit_jax.data` imports it lazily.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 300
SPLIT_SEED = 0


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as (uint8 images [N, 8, 8, 1] scaled to 0..255, int64 labels [N])."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """The fixed stratified split: {'train': sorted indices (1,497), 'test': sorted indices (300)},
  and each restricted to the digits 0..4 and 5..9 ('train_0to4', ..., 'test_5to9')."""
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  train, test = train_test_split(np.arange(len(labels)), test_size=NUM_TEST, stratify=labels,
                                 random_state=SPLIT_SEED)
  out = {"train": np.sort(train), "test": np.sort(test)}
  for name, indices in list(out.items()):
    out[f"{name}_0to4"] = indices[labels[indices] <= 4]
    out[f"{name}_5to9"] = indices[labels[indices] >= 5]
  return out


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """The scikit-learn handwritten digits (8x8 grey images, 10 classes), prepared offline."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 1,497 / 300 train / test split with seed 0.",
                   "1.1.0": "The same split, also restricted to the digits 0..4 and 5..9."}
  # Read by vit_jax.data: the data ships with a Python package, so preparing it never downloads.
  PREPARES_OFFLINE = True

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
    del dl_manager  # Nothing to download.
    images, labels = digits_arrays()
    return {split: self._generate_examples(images, labels, indices)
            for split, indices in split_indices(labels).items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray) -> Iterator[tuple[int, dict]]:
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}


def write_pngs(out: str, split: str = "test", start: int = 0, count: int = 4) -> list[str]:
  """Writes digits ``start .. start+count-1`` of ``split`` as 8x8 grey PNGs named
  ``<split>_<index>_label<label>.png`` into ``out``; returns their paths."""
  import os  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  images, labels = digits_arrays()
  indices = split_indices(labels)[split]
  if not 0 <= start < len(indices) or count < 1:
    raise ValueError(f"--start {start} --count {count}: the {split} split has {len(indices)} digits")
  os.makedirs(out, exist_ok=True)
  paths = []
  for k in range(start, min(start + count, len(indices))):
    i = indices[k]
    path = os.path.join(out, f"{split}_{k}_label{labels[i]}.png")
    Image.fromarray(images[i][..., 0]).save(path)
    paths.append(path)
  return paths


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(
      description="Write digits of the embedded split as PNG files, e.g. to try predict.py or "
                  "visualize.py: python -m vit_jax.data.digits --out digits --count 4")
  parser.add_argument("--out", required=True, help="folder to write")
  parser.add_argument("--split", default="test", choices=("train", "test", "train_0to4", "test_0to4",
                                                           "train_5to9", "test_5to9"))
  parser.add_argument("--start", type=int, default=0, help="first digit of the split")
  parser.add_argument("--count", type=int, default=4, help="how many digits")
  a = parser.parse_args()
  try:
    print("\n".join(write_pngs(a.out, a.split, a.start, a.count)))
  except ValueError as e:
    parser.error(str(e))
