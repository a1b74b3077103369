"""Where examples come from (TFDS, image folders, COCO files), read as ordered, sharded raw records.

Dataset names:
  * any TFDS name, optionally with a version: `cifar10`, `imagenet2012:5.1.0`, `oxford_iiit_pet`,
    `coco/2017`, `voc/2007`, and this package's offline builders `sklearn_digits` (scikit-learn's
    digits) and `digit_scenes` (detection scenes made of them);
  * `imagefolder:/path/to/root` for images in `root/<split>/<class>/*.{jpg,jpeg,png,bmp,gif}` (class names
    are the sorted union of the class folders of all splits);
  * `coco:/path/instances.json,/path/images` for a COCO-format detection annotation file and its images
    (see `vit_jax.data.coco_format`).

TFDS data is read from `data_dir` (None: TFDS's default, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`). A
builder that ships its data (`sklearn_digits`, `digit_scenes`) is prepared there automatically on first use;
any other dataset that is not prepared raises ValueError saying how to prepare it, and nothing is ever
downloaded. Under `tfds.testing.mock_data` the mocked examples are used.

Tasks (`DatasetInfo.task`):
  * "classification": a TFDS dataset with a ClassLabel `label`, or an image folder; records hold `image` and
    `label` (and whatever else the dataset has).
  * "detection": a TFDS dataset whose `objects` sequence holds a ClassLabel `label` and a BBoxFeature `bbox`
    (`coco/2017`, `voc`, `digit_scenes`), or a COCO file. Every detection source yields records of
    exactly `image` (uint8 [h, w, c]), `image/id` (int64), `objects`: {`bbox` float32 [n, 4] normalised
    (ymin, xmin, ymax, xmax), `label` int64 [n], `is_crowd` bool [n]} (COCO files add `image/filename`).
    A dataset without `image/id` (e.g. `voc`) gets the example's index within the split as read
    (`train+validation` numbers the union); one without `is_crowd` gets all False. Other object fields
    are dropped.

A source reads one shard of a split as raw records in a fixed order. Records may still hold encoded images
(for large datasets, so that skipping records on resume costs no decoding); `Source.decode` turns a raw
record into the example the preprocessing sees, and runs inside the pipeline's parallel map.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import os
from typing import Any, Callable

import numpy as np

from vit_jax.data.tf_runtime import import_tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
IMAGEFOLDER_PREFIX = "imagefolder:"
# Splits whose decoded images take at most this many bytes are decoded once and cached in memory.
CACHE_MAX_BYTES = 512 * 2**20
CLASSIFICATION, DETECTION = "classification", "detection"
# (data dir, split, shard, shards) -> image sizes of a TFDS shard, read once per process.
_IMAGE_SIZES: dict[tuple[str, str, int, int], np.ndarray] = {}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the trainer need to know about a dataset."""
  num_classes: int
  num_examples: dict[str, int]  # split -> count (empty if unknown, e.g. under tfds.testing.mock_data)
  class_names: list[str] | None
  image_shape: tuple | None  # e.g. (8, 8, 1); None entries for variable sizes
  task: str = CLASSIFICATION  # or DETECTION
  category_ids: list[int] | None = None  # a COCO file's category id of each label, for results files


class Source(abc.ABC):
  """Ordered, sharded raw records of one dataset."""

  info: DatasetInfo

  @abc.abstractmethod
  def read(self, split: str, shard: int, num_shards: int) -> tuple[Any, Callable | None, bool]:
    """Shard `shard` of `num_shards` even contiguous parts of `split`, in a fixed order.

    Returns (tf.data.Dataset of raw records, decode function for a raw record or None if the records are
    already decoded, whether the records are small enough to cache in memory).
    """

  @abc.abstractmethod
  def shard_sizes(self, split: str, num_shards: int) -> list[int]:
    """Number of examples in each shard of `split`."""

  def image_sizes(self, split: str, shard: int, num_shards: int) -> np.ndarray:
    """(height, width) of each record's image in `read`'s order, int64 [n, 2] (for shape buckets).

    This default reads the shard once, decoding every image; sources override it with something cheaper.
    """
    raw, decode, _ = self.read(split, shard, num_shards)
    return _sizes_of(raw, lambda r: _image_hw(decode(r)["image"] if decode else r["image"]))


def _image_hw(image: Any) -> Any:
  tf = import_tf()
  return tf.cast(tf.shape(image)[:2], tf.int64)


def encoded_image_hw(data: Any) -> Any:
  """(height, width) int64 of an encoded image: from a JPEG's header without decoding it, else by
  decoding (PNG, GIF, BMP)."""
  tf = import_tf()
  is_jpeg = tf.strings.substr(data, 0, 3) == b"\xff\xd8\xff"
  return tf.cond(is_jpeg, lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64),
                 lambda: _image_hw(tf.io.decode_image(data, expand_animations=False)))


def _sizes_of(records: Any, hw: Callable) -> np.ndarray:
  """`hw(record)` ([2] int64) of every record, in order, stacked to [n, 2]."""
  tf = import_tf()
  ds = records.map(hw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(4096)
  parts = [np.asarray(b) for b in ds.as_numpy_iterator()]
  return np.concatenate(parts).astype(np.int64) if parts else np.zeros([0, 2], np.int64)


def count_examples(ds: Any) -> int:
  """The cardinality of a finite tf.data.Dataset, counting its records if TF does not know it."""
  tf = import_tf()
  n = int(ds.cardinality())
  if n >= 0:
    return n
  if n == tf.data.INFINITE_CARDINALITY:
    raise ValueError("the dataset is infinite, so its examples cannot be counted")
  return int(ds.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))


class TfdsSource(Source):
  """A TFDS builder's data, with optional `name:version`."""

  def __init__(self, name: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    # pylint: disable-next=g-import-not-at-top,unused-import  # Registers the builders.
    from vit_jax.data import digit_scenes, digits

    self.name = name
    self._tfds = tfds
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise ValueError(_unknown_dataset_message(name, tfds)) from None
    if getattr(type(self.builder), "PREPARES_OFFLINE", False) and not self.builder.is_prepared():
      self._prepare_offline(data_dir)
    self.info = self._make_info()

  def _prepare_offline(self, data_dir: str | None) -> None:
    """Prepares a builder that needs no download; another process may be preparing it at the same time."""
    try:
      self.builder.download_and_prepare(
          download_config=self._tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception:  # pylint: disable=broad-except
      # Two processes preparing into one data_dir: the second to finish cannot rename its copy into place.
      builder = self._tfds.builder(self.name, data_dir=data_dir)
      if not builder.is_prepared():
        raise
      self.builder = builder

  def _make_info(self) -> DatasetInfo:
    features = self.builder.info.features
    label = features["label"] if "label" in features else None
    task = CLASSIFICATION
    if not isinstance(label, self._tfds.features.ClassLabel):
      label, task = self._detection_label(features), DETECTION
    image = features["image"] if "image" in features else None
    if not isinstance(image, self._tfds.features.Image):
      raise ValueError(f"dataset {self.name!r} has no Image feature 'image' (features: {sorted(features)})")
    return DatasetInfo(
        num_classes=label.num_classes,
        num_examples={s: int(i.num_examples) for s, i in self.builder.info.splits.items()},
        class_names=list(label.names) if label.names else None,
        image_shape=tuple(image.shape),
        task=task,
    )

  def _detection_label(self, features: Any) -> Any:
    """The ClassLabel `objects/label` of a detection dataset; ValueError if it is not one."""
    objects = features["objects"] if "objects" in features else None
    fields = getattr(objects, "feature", None)
    if (isinstance(objects, self._tfds.features.Sequence) and
        isinstance(fields, self._tfds.features.FeaturesDict) and "label" in fields and "bbox" in fields and
        isinstance(fields["label"], self._tfds.features.ClassLabel) and
        isinstance(fields["bbox"], self._tfds.features.BBoxFeature)):
      return fields["label"]
    raise ValueError(
        f"dataset {self.name!r} has neither a ClassLabel feature 'label' (classification) nor an 'objects' "
        "sequence with a ClassLabel 'label' and a BBoxFeature 'bbox' (detection); its features are "
        f"{sorted(features)}")

  def _check_split(self, split: str) -> None:
    known = self.info.num_examples
    for base in _split_names(split):
      if known and base not in known:
        raise ValueError(f"dataset {self.name!r} has no split {base!r} (in {split!r}); its splits are "
                         f"{sorted(known)}")

  def _subsplit(self, split: str, shard: int, num_shards: int) -> Any:
    return split if num_shards == 1 else self._tfds.even_splits(split, num_shards)[shard]

  def shard_sizes(self, split: str, num_shards: int) -> list[int]:
    self._check_split(split)
    if self.info.num_examples:
      return [int(self.builder.info.splits[self._subsplit(split, s, num_shards)].num_examples)
              for s in range(num_shards)]
    # Split sizes unknown (mocked data): count the records.
    return [count_examples(self._as_dataset(self._subsplit(split, s, num_shards), decoders=None))
            for s in range(num_shards)]

  def _as_dataset(self, subsplit: Any, decoders: Any) -> Any:
    read_config = self._tfds.ReadConfig(try_autocache=False, add_tfds_id=False)
    try:
      return self.builder.as_dataset(split=subsplit, shuffle_files=False, decoders=decoders,
                                     read_config=read_config)
    except AssertionError as e:
      if "could not find data" not in str(e):
        raise
      data_dir = os.path.dirname(os.path.dirname(self.builder.data_dir))
      raise ValueError(
          f"dataset {self.name!r} is not prepared in data_dir {data_dir!r}, and vit_jax never downloads "
          f"data. Prepare it first, e.g. `tfds build {self.name.split(':')[0]} --data_dir {data_dir}` "
          "(datasets with manual downloads, like imagenet2012, also need --manual_dir), or pass the "
          "data_dir that holds it.") from None

  def _cacheable(self, split: str) -> bool:
    """Whether the decoded split is known to be small (then it is decoded once and cached)."""
    shape = self.info.image_shape
    names = _split_names(split)
    if not all(name in self.info.num_examples for name in names) or any(d is None for d in shape):
      return False
    n = sum(self.info.num_examples[name] for name in names)  # An upper bound for slices like 'train[:10%]'.
    size = n * np.dtype(self.builder.info.features["image"].np_dtype).itemsize
    for d in shape:
      size *= d
    return size <= CACHE_MAX_BYTES

  def read(self, split: str, shard: int, num_shards: int) -> tuple[Any, Callable | None, bool]:
    self._check_split(split)
    subsplit = self._subsplit(split, shard, num_shards)
    cacheable = self._cacheable(split)
    # tfds.testing.mock_data encodes mocked examples to skip-decode them, which fails for its detection
    # examples (their object fields differ in length): read those decoded.
    decoded = cacheable or (self.info.task == DETECTION and self._mocked())
    decoders = None if decoded else {"image": self._tfds.decode.SkipDecoding()}
    ds = self._as_dataset(subsplit, decoders=decoders)
    if self.info.task == DETECTION:
      ds = self._detection_records(ds, split, shard, num_shards)
    if decoded:
      return ds, None, cacheable
    image_feature = self.builder.info.features["image"]

    def decode(example: dict) -> dict:
      return {**example, "image": image_feature.decode_example(example["image"])}

    return ds, decode, False

  def image_sizes(self, split: str, shard: int, num_shards: int) -> np.ndarray:
    """From the decoded images when the split is read decoded, else from the encoded images' headers
    (JPEG; other formats are decoded): one pass over the shard's records, once per process."""
    key = (self.builder.data_dir, split, shard, num_shards)
    if key not in _IMAGE_SIZES or self._mocked():
      raw, decode, _ = self.read(split, shard, num_shards)
      hw = (lambda r: encoded_image_hw(r["image"])) if decode else (lambda r: _image_hw(r["image"]))
      _IMAGE_SIZES[key] = _sizes_of(raw, hw)
    return _IMAGE_SIZES[key]

  def _mocked(self) -> bool:
    """Whether `tfds.testing.mock_data` is active."""
    # pylint: disable-next=protected-access
    as_dataset = self._tfds.core.dataset_builder.FileReaderBuilder._as_dataset
    return getattr(as_dataset, "__module__", "") == "tensorflow_datasets.testing.mocking"

  def _detection_records(self, ds: Any, split: str, shard: int, num_shards: int) -> Any:
    """Records of exactly `image`, `image/id` and `objects` {bbox, label, is_crowd} (module docstring)."""
    tf = import_tf()
    features = self.builder.info.features
    has_id = "image/id" in features and np.issubdtype(features["image/id"].np_dtype, np.integer)
    has_crowd = "is_crowd" in features["objects"].feature
    if not has_id:
      ds = ds.enumerate(start=sum(self.shard_sizes(split, num_shards)[:shard]))
    else:
      ds = ds.map(lambda ex: (ex["image/id"], ex))

    def normalise(image_id: Any, example: dict) -> dict:
      objects = example["objects"]
      fields = [objects["bbox"], objects["label"]] + ([objects["is_crowd"]] if has_crowd else [])
      n = tf.reduce_min([tf.shape(f)[0] for f in fields])  # Equal, except in tfds.testing.mock_data.
      is_crowd = tf.cast(objects["is_crowd"][:n], tf.bool) if has_crowd else tf.zeros([n], tf.bool)
      return {
          "image": example["image"],
          "image/id": tf.cast(image_id, tf.int64),
          "objects": {
              "bbox": tf.reshape(tf.cast(objects["bbox"][:n], tf.float32), [-1, 4]),
              "label": tf.cast(objects["label"][:n], tf.int64),
              "is_crowd": is_crowd,
          },
      }

    return ds.map(tf.autograph.experimental.do_not_convert(normalise))


def _split_names(split: str) -> list[str]:
  """The split names in a TFDS split string: 'train[:90%]+validation' -> ['train', 'validation']."""
  return [part.split("[")[0].strip() for part in split.split("+")]


def _unknown_dataset_message(name: str, tfds: Any) -> str:
  base = name.split(":")[0]
  try:
    known = list(tfds.list_builders(with_community_datasets=False))
  except Exception:  # pylint: disable=broad-except  # Only for the hint.
    known = []
  close = difflib.get_close_matches(base, known, n=5)
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  return (f"unknown dataset {name!r}: TFDS has no builder named {base!r}.{hint} List the known names with "
          "`tfds.list_builders()`; for a folder of images use 'imagefolder:/path/to/root', for a COCO "
          "annotation file 'coco:/path/instances.json,/path/images'.")


class ImageFolderSource(Source):
  """Images in `root/<split>/<class>/<file>`; each split's examples sorted by (class, file name)."""

  def __init__(self, root: str):
    tf = import_tf()
    root = os.path.expanduser(root)
    if not root or not tf.io.gfile.isdir(root):
      raise ValueError(f"image folder {root!r} does not exist or is not a directory; expected "
                       "'imagefolder:/path/to/root' with images in root/<split>/<class>/")
    self.root = root
    splits = sorted(d for d in tf.io.gfile.listdir(root) if tf.io.gfile.isdir(os.path.join(root, d)))
    splits = [d.rstrip("/") for d in splits]
    per_split = {s: _list_class_images(tf, os.path.join(root, s)) for s in splits}
    classes = sorted({c for files in per_split.values() for c in files})
    if not classes:
      raise ValueError(f"image folder {root!r} has no images in root/<split>/<class>/ with extensions "
                       f"{', '.join(IMAGE_EXTENSIONS)}")
    self._files: dict[str, tuple[list[str], list[int]]] = {}
    for s, files in per_split.items():
      paths, labels = [], []
      for c in sorted(files):
        paths += files[c]
        labels += [classes.index(c)] * len(files[c])
      if paths:
        self._files[s] = (paths, labels)
    self.info = DatasetInfo(num_classes=len(classes),
                            num_examples={s: len(p) for s, (p, _) in self._files.items()},
                            class_names=classes, image_shape=(None, None, 3))

  def _split_files(self, split: str) -> tuple[list[str], list[int]]:
    if split not in self._files:
      raise ValueError(f"image folder {self.root!r} has no split {split!r} with images; its splits are "
                       f"{sorted(self._files)} (slices like 'train[:10%]' are not supported here)")
    return self._files[split]

  def shard_sizes(self, split: str, num_shards: int) -> list[int]:
    n = len(self._split_files(split)[0])
    return [n // num_shards + (1 if s < n % num_shards else 0) for s in range(num_shards)]

  def read(self, split: str, shard: int, num_shards: int) -> tuple[Any, Callable | None, bool]:
    tf = import_tf()
    paths, labels = self._split_files(split)
    sizes = self.shard_sizes(split, num_shards)
    start = sum(sizes[:shard])
    stop = start + sizes[shard]
    ds = tf.data.Dataset.from_tensor_slices({
        "file_name": tf.constant(paths[start:stop], tf.string),
        "label": tf.constant(labels[start:stop], tf.int64),
    })

    def decode(example: dict) -> dict:
      data = tf.io.read_file(example["file_name"])
      known = tf.reduce_any([tf.strings.substr(data, 0, len(m)) == m for m in _IMAGE_MAGIC])
      check = tf.debugging.Assert(known, ["cannot decode", example["file_name"], "as an image: it is "
                                          "not a JPEG, PNG, GIF or BMP file"])
      with tf.control_dependencies([check]):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
      image.set_shape([None, None, 3])
      return {**example, "image": image}

    return ds, decode, False


# The first bytes of the formats tf.io.decode_image reads.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def _list_class_images(tf: Any, split_dir: str) -> dict[str, list[str]]:
  out = {}
  for c in tf.io.gfile.listdir(split_dir):
    c = c.rstrip("/")
    class_dir = os.path.join(split_dir, c)
    if not tf.io.gfile.isdir(class_dir):
      continue
    out[c] = sorted(os.path.join(class_dir, f) for f in tf.io.gfile.listdir(class_dir)
                    if f.lower().endswith(IMAGE_EXTENSIONS))
  return out


def open_source(dataset: str, data_dir: str | None = None) -> Source:
  """The source for a dataset name (see the module docstring for the accepted names)."""
  if not isinstance(dataset, str) or not dataset.strip():
    raise ValueError("dataset must be a TFDS name, 'imagefolder:/path' or 'coco:/path/instances.json,"
                     f"/path/images', got {dataset!r}")
  import_tf()  # Hides the GPUs from TF before anything (TFDS included) initialises its devices.
  if dataset.startswith(IMAGEFOLDER_PREFIX):
    return ImageFolderSource(dataset[len(IMAGEFOLDER_PREFIX):])
  from vit_jax.data import coco_format  # pylint: disable=g-import-not-at-top  # It imports this module.

  if coco_format.is_coco_format(dataset):
    return coco_format.CocoFormatSource(dataset[len(coco_format.COCO_PREFIX):])
  return TfdsSource(dataset, data_dir)


def dataset_info(dataset: str, data_dir: str | None = None) -> DatasetInfo:
  """Task, classes, split sizes and image shape of `dataset` (preparing offline builders if needed)."""
  return open_source(dataset, data_dir).info
