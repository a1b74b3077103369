"""Detection data in COCO format: an annotation file (`instances_*.json`) and a folder of its images.

Dataset names (`open_source`):
  * `coco:/path/instances.json,/path/images`: one file that serves every split name asked for (`train`,
    `validation`, ...), so train and eval read the same images; its `DatasetInfo.num_examples` is empty.
    The image folder is optional and defaults to the annotation file's folder.
  * `coco:train=/a/train.json,/a/train_images;val=/a/val.json,/a/val_images`: named splits, each its own
    file (and optional image folder); all files must have the same categories.
  Paths cannot contain ',' or ';'. Slices (`train[:10%]`) and unions (`train+val`) are not supported. A name
  like `coco:1.0.0` (a version) is TFDS's `coco` dataset, not a file.

The file is read with the json module: `images` (id, file_name, height, width), `annotations` (image_id,
bbox [x, y, width, height] in pixels, category_id, optional iscrowd) and `categories` (id, name). Category
ids in ascending order become labels 0..K-1 (`DatasetInfo.class_names` keeps the names, `category_ids` the
ids). Images are read in ascending id order, including images without annotations. Each box becomes
normalised (ymin, xmin, ymax, xmax) using the image's height and width from the file, clipped to [0, 1];
boxes that stick out of their image are clipped and boxes with no area after clipping are dropped, and both
are counted in one warning per file. Crowd annotations (iscrowd=1) are kept with `is_crowd` True.

Records: `image` (uint8 [h, w, 3]), `image/id` (int64, the file's id), `image/filename` (the file's
`file_name`), `objects` {`bbox` float32 [n, 4], `label` int64 [n], `is_crowd` bool [n]}.

Bad input raises ValueError when the source is built, naming the file and the problem: a missing or
non-JSON annotation file, missing lists or fields, unknown category or image ids, duplicate ids, and image
files that do not exist. Image contents are only read when decoded: a file that is not a JPEG, PNG, GIF or
BMP fails the pipeline with an error naming the file; a file damaged past its header fails with
TensorFlow's decode error (`InvalidArgumentError: ... Invalid JPEG data`), which does not name it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable

from absl import logging
import numpy as np

from vit_jax.data.sources import DETECTION, DatasetInfo, Source
from vit_jax.data.tf_runtime import import_tf

COCO_PREFIX = "coco:"
_SPLIT_NAME = re.compile(r"^([A-Za-z_][\w-]*)=(.*)$")
_VERSION = re.compile(r"^[\d*]+\.[\d*]+\.[\d*]+$")
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")
_FORMAT_HINT = ("expected a COCO annotation file: a JSON object with lists 'images', 'annotations' and "
                "'categories'")


def is_coco_format(dataset: str) -> bool:
  """Whether `dataset` names a COCO annotation file (`coco:...`) rather than TFDS's `coco:VERSION`."""
  return dataset.startswith(COCO_PREFIX) and not _VERSION.match(dataset[len(COCO_PREFIX):].strip())


def parse_spec(spec: str) -> dict[str | None, tuple[str, str]]:
  """`FILE[,IMAGE_DIR]` -> {None: (file, dir)}; `NAME=FILE[,DIR];...` -> {name: (file, dir)}."""
  parts = [p.strip() for p in spec.split(";") if p.strip()]
  if not parts:
    raise ValueError(f"empty COCO dataset {COCO_PREFIX + spec!r}; expected 'coco:/path/instances.json"
                     "[,/path/images]' or 'coco:train=/a/train.json,/a/images;val=/a/val.json,...'")
  named = [_SPLIT_NAME.match(p) for p in parts]
  if len(parts) == 1 and not named[0]:
    return {None: _file_and_dir(parts[0])}
  if not all(named):
    raise ValueError(f"COCO dataset {COCO_PREFIX + spec!r}: with several ';'-separated parts, each must be "
                     "NAME=/path/instances.json[,/path/images], e.g. 'coco:train=/a/t.json;val=/a/v.json'")
  out = {}
  for match in named:
    name = match.group(1)
    if name in out:
      raise ValueError(f"COCO dataset {COCO_PREFIX + spec!r} names split {name!r} twice")
    out[name] = _file_and_dir(match.group(2))
  return out


def _file_and_dir(text: str) -> tuple[str, str]:
  fields = [f.strip() for f in text.split(",")]
  if len(fields) > 2 or not fields[0]:
    raise ValueError(f"COCO dataset part {text!r}: expected '/path/instances.json' or "
                     "'/path/instances.json,/path/images' (paths cannot contain ',')")
  path = os.path.expanduser(fields[0])
  image_dir = os.path.expanduser(fields[1]) if len(fields) == 2 and fields[1] else os.path.dirname(path)
  return path, image_dir


@dataclasses.dataclass(frozen=True)
class Categories:
  """A file's categories: label i is category `ids[i]` named `names[i]`."""
  ids: list[int]
  names: list[str]


@dataclasses.dataclass(frozen=True)
class CocoSplit:
  """One annotation file's images (ascending id) and their objects, flat with row splits."""
  path: str
  file_names: list[str]
  image_paths: list[str]
  image_ids: np.ndarray  # int64 [N]
  image_sizes: np.ndarray  # int64 [N, 2]: (height, width) as the file gives them
  row_splits: np.ndarray  # int64 [N + 1]: objects of image i are rows row_splits[i]:row_splits[i + 1]
  boxes: np.ndarray  # float32 [M, 4] normalised yxyx
  labels: np.ndarray  # int64 [M]
  is_crowd: np.ndarray  # bool [M]
  num_clipped: int
  num_dropped: int


def load_annotations(path: str, image_dir: str) -> tuple[Categories, CocoSplit]:
  """Reads and checks a COCO annotation file (ValueError naming the file and the problem)."""
  content = _read_json(path)
  categories = _categories(content["categories"], path)
  images = _images(content["images"], path)
  by_image = _objects_by_image(content["annotations"], path, images, categories)
  order = sorted(images)
  row_splits = np.zeros(len(order) + 1, np.int64)
  boxes, labels, crowd = [], [], []
  clipped = dropped = 0
  for i, image_id in enumerate(order):
    _, height, width = images[image_id]
    for bbox, label, is_crowd in by_image.get(image_id, []):
      box, was_clipped = _normalised_box(bbox, height, width)
      clipped += was_clipped
      if box is None:
        dropped += 1
        continue
      boxes.append(box)
      labels.append(label)
      crowd.append(is_crowd)
    row_splits[i + 1] = len(boxes)
  file_names = [images[i][0] for i in order]
  split = CocoSplit(
      path=path, file_names=file_names, image_paths=[os.path.join(image_dir, f) for f in file_names],
      image_ids=np.asarray(order, np.int64),
      image_sizes=np.maximum(1, np.round([images[i][1:] for i in order])).astype(np.int64).reshape(-1, 2),
      row_splits=row_splits,
      boxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=np.asarray(labels, np.int64),
      is_crowd=np.asarray(crowd, bool), num_clipped=clipped, num_dropped=dropped)
  _check_image_files(split, image_dir)
  return categories, split


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise ValueError(f"COCO annotation file {path!r} does not exist (or is not a file); {_FORMAT_HINT}")
  try:
    with open(path, "rb") as f:
      content = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"COCO annotation file {path!r} is not valid JSON ({e}); {_FORMAT_HINT}") from None
  if not isinstance(content, dict):
    raise ValueError(f"COCO annotation file {path!r} holds a JSON {type(content).__name__}; {_FORMAT_HINT}")
  for key in ("images", "annotations", "categories"):
    if not isinstance(content.get(key), list):
      found = "is missing" if key not in content else f"is a {type(content[key]).__name__}"
      raise ValueError(f"COCO annotation file {path!r}: {key!r} {found}; {_FORMAT_HINT}")
  return content


def _field(entry: Any, key: str, kind: str, index: int, path: str, expect: str) -> Any:
  """`entry[key]`, or ValueError naming the entry if it is missing."""
  if not isinstance(entry, dict) or key not in entry:
    raise ValueError(f"COCO annotation file {path!r}: {kind} at index {index} has no {key!r}; "
                     f"each of its {kind}s needs {expect}")
  return entry[key]


def _int_id(value: Any, what: str, path: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
    raise ValueError(f"COCO annotation file {path!r}: {what} is {value!r}, not an integer")
  return int(value)


def _categories(entries: list, path: str) -> Categories:
  expect = "'id' and 'name'"
  named = {}
  for i, entry in enumerate(entries):
    cat_id = _int_id(_field(entry, "id", "category", i, path, expect), f"the id of category {i}", path)
    if cat_id in named:
      raise ValueError(f"COCO annotation file {path!r}: category id {cat_id} appears twice")
    named[cat_id] = str(_field(entry, "name", "category", i, path, expect))
  if not named:
    raise ValueError(f"COCO annotation file {path!r} has no categories; {_FORMAT_HINT}")
  ids = sorted(named)
  return Categories(ids=ids, names=[named[i] for i in ids])


def _images(entries: list, path: str) -> dict[int, tuple[str, float, float]]:
  """image id -> (file_name, height, width)."""
  expect = "'id', 'file_name', 'height' and 'width'"
  images = {}
  for i, entry in enumerate(entries):
    image_id = _int_id(_field(entry, "id", "image", i, path, expect), f"the id of image {i}", path)
    if image_id in images:
      raise ValueError(f"COCO annotation file {path!r}: image id {image_id} appears twice")
    file_name = _field(entry, "file_name", "image", i, path, expect)
    size = [_field(entry, k, "image", i, path, expect) for k in ("height", "width")]
    if not all(_positive_number(v) for v in size) or not isinstance(file_name, str) or not file_name:
      raise ValueError(f"COCO annotation file {path!r}: image {image_id} has file_name {file_name!r}, "
                       f"height {size[0]!r}, width {size[1]!r}; expected a file name and positive sizes")
    images[image_id] = (file_name, float(size[0]), float(size[1]))
  if not images:
    raise ValueError(f"COCO annotation file {path!r} has no images; {_FORMAT_HINT}")
  return images


def _positive_number(value: Any) -> bool:
  return _finite_number(value) and value > 0


def _objects_by_image(entries: list, path: str, images: dict, categories: Categories
                      ) -> dict[int, list[tuple[list[float], int, bool]]]:
  """image id -> [(bbox xywh pixels, label, is_crowd)], in file order."""
  expect = "'image_id', 'category_id' and 'bbox' [x, y, width, height]"
  label_of = {cat_id: label for label, cat_id in enumerate(categories.ids)}
  out: dict[int, list] = {}
  for i, entry in enumerate(entries):
    image_id = _field(entry, "image_id", "annotation", i, path, expect)
    cat_id = _field(entry, "category_id", "annotation", i, path, expect)
    bbox = _field(entry, "bbox", "annotation", i, path, expect)
    name = f"annotation {entry['id']}" if "id" in entry else f"annotation at index {i}"
    if cat_id not in label_of:
      raise ValueError(f"COCO annotation file {path!r}: category id {cat_id!r} of {name} is not in the "
                       f"file's categories {categories.ids}")
    if image_id not in images:
      raise ValueError(f"COCO annotation file {path!r}: image id {image_id!r} of {name} is not among the "
                       f"file's {len(images)} images (ids {min(images)}..{max(images)})")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite_number(v) for v in bbox)):
      raise ValueError(f"COCO annotation file {path!r}: {name} has bbox {bbox!r}; expected [x, y, width, "
                       "height] in pixels, four finite numbers")
    out.setdefault(image_id, []).append((bbox, label_of[cat_id], bool(entry.get("iscrowd", 0))))
  return out


def _finite_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _normalised_box(bbox: list[float], height: float, width: float) -> tuple[list[float] | None, bool]:
  """(normalised yxyx clipped to [0, 1], or None if it has no area; whether clipping changed it)."""
  x, y, w, h = (float(v) for v in bbox)
  box = [y / height, x / width, (y + h) / height, (x + w) / width]
  clipped = [min(max(v, 0.0), 1.0) for v in box]
  was_clipped = clipped != box
  if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
    return None, was_clipped
  return clipped, was_clipped


def _check_image_files(split: CocoSplit, image_dir: str) -> None:
  if not os.path.isdir(image_dir):
    raise ValueError(f"image folder {image_dir!r} of COCO annotation file {split.path!r} does not exist; "
                     "pass it as 'coco:/path/instances.json,/path/images'")
  missing = [p for p in split.image_paths if not os.path.isfile(p)]
  if missing:
    shown = ", ".join(repr(p) for p in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise ValueError(f"{len(missing)} of the {len(split.image_paths)} images of COCO annotation file "
                     f"{split.path!r} are missing from {image_dir!r}: {shown}{more}; the images' "
                     "'file_name's are read relative to the image folder")


class CocoFormatSource(Source):
  """A COCO-format annotation file (or one per split) and its images; see the module docstring."""

  def __init__(self, spec: str):
    self.spec = COCO_PREFIX + spec
    self._splits: dict[str | None, CocoSplit] = {}
    categories = None
    for name, (path, image_dir) in parse_spec(spec).items():
      cats, split = load_annotations(path, image_dir)
      if categories is not None and cats != categories:
        raise ValueError(f"COCO annotation file {path!r} has other categories than "
                         f"{next(iter(self._splits.values())).path!r} ({cats.ids} vs {categories.ids}); "
                         "all splits must share their categories")
      categories = cats
      self._splits[name] = split
      if split.num_clipped or split.num_dropped:
        logging.warning("COCO annotation file %r: clipped %d boxes to their image, dropped %d boxes with "
                        "no area (after clipping), of %d annotations", path, split.num_clipped,
                        split.num_dropped, len(split.labels) + split.num_dropped)
    self.info = DatasetInfo(
        num_classes=len(categories.ids),
        num_examples={} if None in self._splits else {n: len(s.image_ids) for n, s in self._splits.items()},
        class_names=categories.names, image_shape=(None, None, 3), task=DETECTION,
        category_ids=categories.ids)

  def _split(self, split: str) -> CocoSplit:
    if None in self._splits:
      if any(c in split for c in "[]+"):
        raise ValueError(f"{self.spec!r}: split {split!r} is a slice or union, which COCO files do not "
                         "support; any plain name reads the whole file")
      return self._splits[None]
    if split not in self._splits:
      raise ValueError(f"{self.spec!r} has no split {split!r}; its splits are {sorted(self._splits)} "
                       "(slices like 'train[:10%]' are not supported here)")
    return self._splits[split]

  def shard_sizes(self, split: str, num_shards: int) -> list[int]:
    n = len(self._split(split).image_ids)
    return [n // num_shards + (1 if s < n % num_shards else 0) for s in range(num_shards)]

  def image_sizes(self, split: str, shard: int, num_shards: int) -> np.ndarray:
    """The images' height and width as the annotation file gives them."""
    sizes = self.shard_sizes(split, num_shards)
    start = sum(sizes[:shard])
    return self._split(split).image_sizes[start:start + sizes[shard]]

  def read(self, split: str, shard: int, num_shards: int) -> tuple[Any, Callable | None, bool]:
    tf = import_tf()
    data = self._split(split)
    sizes = self.shard_sizes(split, num_shards)
    start = sum(sizes[:shard])
    stop = start + sizes[shard]
    rows = data.row_splits[start:stop + 1]

    def objects(values: np.ndarray) -> Any:
      return tf.RaggedTensor.from_row_splits(values[rows[0]:rows[-1]], rows - rows[0])

    ds = tf.data.Dataset.from_tensor_slices({
        "image/path": tf.constant(data.image_paths[start:stop], tf.string, shape=[stop - start]),
        "image/filename": tf.constant(data.file_names[start:stop], tf.string, shape=[stop - start]),
        "image/id": tf.constant(data.image_ids[start:stop], tf.int64),
        "objects": {
            "bbox": objects(data.boxes),
            "label": objects(data.labels),
            "is_crowd": objects(data.is_crowd),
        },
    })
    return ds, _decode, False


def _decode(example: dict) -> dict:
  """Reads and decodes `image/path` into `image` (uint8 [h, w, 3])."""
  tf = import_tf()
  example = dict(example)
  path = example.pop("image/path")
  contents = tf.io.read_file(path)
  known = tf.reduce_any([tf.strings.substr(contents, 0, len(s)) == s for s in _IMAGE_SIGNATURES])
  check = tf.debugging.Assert(known, ["image file", path, "is not a JPEG, PNG, GIF or BMP file"])
  with tf.control_dependencies([check]):
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return {**example, "image": image}
