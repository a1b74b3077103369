"""Tests of detection sources: COCO-format files, `digit_scenes` and mocked TFDS `coco/2017`."""

import json
import os

import numpy as np
import pytest

from vit_jax.data import sources

CATEGORIES = [{"id": 9, "name": "cat"}, {"id": 1, "name": "person"}, {"id": 5, "name": "car"}]
IMAGES = [  # (id, file_name, height, width); listed out of id order on purpose.
    (7, "b.png", 10, 20),
    (3, "a.jpg", 16, 8),
    (12, "sub/c.png", 12, 12),
]
ANNOTATIONS = [  # (id, image_id, category_id, bbox xywh, iscrowd)
    (1, 7, 1, [2, 1, 10, 4], 0),
    (2, 7, 9, [0, 0, 20, 10], 1),
    (3, 3, 5, [1, 2, 3, 4], 0),
    (4, 3, 1, [-2, 10, 6, 10], 0),  # Sticks out: clipped.
    (5, 3, 9, [4, 4, 0, 3], 0),  # No area: dropped.
    (6, 7, 5, [25, 0, 3, 3], 0),  # Wholly outside: clipped to nothing, dropped.
]


def write_coco(root, images=IMAGES, annotations=ANNOTATIONS, categories=CATEGORIES, name="instances.json"):
  """A COCO annotation file and its images under `root/images`; returns (json path, image dir)."""
  from PIL import Image
  image_dir = root / "images"
  for image_id, file_name, height, width in images:
    path = image_dir / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((height, width, 3), image_id, np.uint8)
    Image.fromarray(pixels).save(path, quality=100)
  content = {
      "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, f, h, w in images],
      "annotations": [{"id": a, "image_id": i, "category_id": c, "bbox": b, "iscrowd": z, "area": 1}
                      for a, i, c, b, z in annotations],
      "categories": categories,
  }
  ann = root / name
  ann.write_text(json.dumps(content))
  return str(ann), str(image_dir)


def read_all(source, split, shard=0, num_shards=1):
  import tensorflow_datasets as tfds
  ds, decode, _ = source.read(split, shard, num_shards)
  if decode:
    ds = ds.map(decode)
  return list(tfds.as_numpy(ds))


def assert_layout(record, channels=3):
  assert set(record) >= {"image", "image/id", "objects"}
  assert set(record["objects"]) == {"bbox", "label", "is_crowd"}
  image, objects = record["image"], record["objects"]
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == channels
  assert record["image/id"].dtype == np.int64 and record["image/id"].shape == ()
  n = len(objects["label"])
  assert objects["bbox"].dtype == np.float32 and objects["bbox"].shape == (n, 4)
  assert objects["label"].dtype == np.int64 and objects["is_crowd"].dtype == bool
  assert objects["is_crowd"].shape == (n,)


def expected_objects(image_id):
  """Normalised yxyx boxes, labels and crowd flags of an image, computed from the test's JSON."""
  _, _, height, width = next(i for i in IMAGES if i[0] == image_id)
  label_of = {1: 0, 5: 1, 9: 2}
  boxes, labels, crowd = [], [], []
  for _, i, c, (x, y, w, h), z in ANNOTATIONS:
    if i != image_id:
      continue
    box = np.clip([y / height, x / width, (y + h) / height, (x + w) / width], 0, 1)
    if box[2] > box[0] and box[3] > box[1]:
      boxes.append(box)
      labels.append(label_of[c])
      crowd.append(bool(z))
  return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels), np.asarray(crowd, bool)


# ---- COCO-format files


def test_coco_file_records_match_the_json(tmp_path):
  ann, image_dir = write_coco(tmp_path)
  source = sources.open_source(f"coco:{ann},{image_dir}")
  info = source.info
  assert info.task == "detection" and info.num_classes == 3
  assert info.class_names == ["person", "car", "cat"] and info.category_ids == [1, 5, 9]
  assert info.num_examples == {} and info.image_shape == (None, None, 3)
  assert source.shard_sizes("train", 2) == [2, 1]
  records = read_all(source, "validation")
  assert [r["image/id"] for r in records] == [3, 7, 12]  # Ascending ids.
  assert [r["image/filename"] for r in records] == [b"a.jpg", b"b.png", b"sub/c.png"]
  for record in records:
    assert_layout(record)
    image_id = int(record["image/id"])
    _, _, height, width = next(i for i in IMAGES if i[0] == image_id)
    assert record["image"].shape == (height, width, 3)
    boxes, labels, crowd = expected_objects(image_id)
    np.testing.assert_array_equal(record["objects"]["bbox"], boxes)
    np.testing.assert_array_equal(record["objects"]["label"], labels)
    np.testing.assert_array_equal(record["objects"]["is_crowd"], crowd)
  assert len(records[2]["objects"]["label"]) == 0  # An image without annotations is kept.
  np.testing.assert_array_equal(records[1]["objects"]["bbox"][1], [0, 0, 1, 1])  # The crowd box.
  shards = read_all(source, "train", 0, 2) + read_all(source, "train", 1, 2)
  assert [r["image/id"] for r in shards] == [3, 7, 12]


def test_coco_file_through_eval_batches(tmp_path):
  from vit_jax.data import pipeline
  ann, image_dir = write_coco(tmp_path)
  batches = list(pipeline.eval_batches(dataset=f"coco:{ann},{image_dir}", split="validation",
                                       pp="keep('image/id')", batch_size=2, process_index=0,
                                       process_count=1))
  assert [b["image/id"].tolist() for b in batches] == [[3, 7], [12, 0]]
  assert [b["mask"].tolist() for b in batches] == [[1, 1], [1, 0]]


def test_coco_clipped_and_dropped_boxes_are_counted(tmp_path, monkeypatch):
  from vit_jax.data import coco_format
  ann, image_dir = write_coco(tmp_path)
  warnings = []
  monkeypatch.setattr(coco_format.logging, "warning", lambda msg, *args: warnings.append(msg % args))
  sources.open_source(f"coco:{ann},{image_dir}")
  assert len(warnings) == 1
  assert "clipped 2 boxes" in warnings[0] and "dropped 2 boxes" in warnings[0]
  assert "of 6 annotations" in warnings[0]


def test_coco_named_splits_and_default_image_dir(tmp_path):
  (tmp_path / "t").mkdir()
  (tmp_path / "v").mkdir()
  train_ann, train_images = write_coco(tmp_path / "t")
  val_ann, _ = write_coco(tmp_path / "v", images=IMAGES[:1], annotations=ANNOTATIONS[:2])
  os.rename(tmp_path / "v" / "images" / "b.png", tmp_path / "v" / "b.png")  # Next to the JSON.
  source = sources.open_source(f"coco:train={train_ann},{train_images};val={val_ann}")
  assert source.info.num_examples == {"train": 3, "val": 1}
  assert [int(r["image/id"]) for r in read_all(source, "val")] == [7]
  with pytest.raises(ValueError, match=r"has no split 'test'; its splits are \['train', 'val'\]"):
    source.read("test", 0, 1)


def test_coco_files_with_other_categories_are_refused(tmp_path):
  (tmp_path / "t").mkdir()
  (tmp_path / "v").mkdir()
  train_ann, train_images = write_coco(tmp_path / "t")
  val_ann, val_images = write_coco(tmp_path / "v", annotations=[], categories=CATEGORIES[:2])
  with pytest.raises(ValueError, match="other categories.*all splits must share"):
    sources.open_source(f"coco:train={train_ann},{train_images};val={val_ann},{val_images}")


def test_coco_version_is_tfds(tmp_path):
  source = sources.open_source("coco:1.1.0", data_dir=str(tmp_path))
  assert isinstance(source, sources.TfdsSource) and source.info.task == "detection"


def bad_json(tmp_path, **changes):
  """A COCO folder whose JSON content is changed by `changes` (key -> new value, None deletes)."""
  ann, image_dir = write_coco(tmp_path)
  content = json.loads(open(ann).read())
  for key, value in changes.items():
    if value is None:
      del content[key]
    else:
      content[key] = value
  with open(ann, "w") as f:
    json.dump(content, f)
  return f"coco:{ann},{image_dir}"


def test_coco_bad_annotation_files(tmp_path):
  with pytest.raises(ValueError, match="annotation file '.*nothing.json' does not exist"):
    sources.open_source(f"coco:{tmp_path}/nothing.json")
  (tmp_path / "broken.json").write_text("{'images': [")
  with pytest.raises(ValueError, match="broken.json' is not valid JSON.*expected a COCO annotation file"):
    sources.open_source(f"coco:{tmp_path}/broken.json")
  (tmp_path / "list.json").write_text("[]")
  with pytest.raises(ValueError, match="list.json' holds a JSON list; expected a COCO annotation file"):
    sources.open_source(f"coco:{tmp_path}/list.json")
  with pytest.raises(ValueError, match="'annotations' is missing; expected .* lists 'images', "):
    sources.open_source(bad_json(tmp_path, annotations=None))
  with pytest.raises(ValueError, match="'categories' is a dict"):
    sources.open_source(bad_json(tmp_path, categories={"1": "person"}))
  with pytest.raises(ValueError, match="paths cannot contain ','"):
    sources.open_source(f"coco:{tmp_path}/a.json,{tmp_path},x")
  with pytest.raises(ValueError, match="each must be NAME=/path"):
    sources.open_source(f"coco:{tmp_path}/a.json;val={tmp_path}/b.json")


@pytest.mark.parametrize("annotation, match", [
    ((7, 7, 99, [1, 1, 2, 2], 0),
     r"category id 99 of annotation 7 is not in the file's categories \[1, 5, 9\]"),
    ((8, 42, 1, [1, 1, 2, 2], 0), r"image id 42 of annotation 8 is not among the file's 3 images"),
    ((9, 7, 1, [1, 1, 2], 0), r"annotation 9 has bbox \[1, 1, 2\]; expected \[x, y, width, height\]"),
])
def test_coco_bad_annotations(tmp_path, annotation, match):
  ann, image_dir = write_coco(tmp_path, annotations=ANNOTATIONS + [annotation])
  with pytest.raises(ValueError, match=match):
    sources.open_source(f"coco:{ann},{image_dir}")


def test_coco_bad_images_and_categories(tmp_path):
  with pytest.raises(ValueError, match="image at index 0 has no 'height'; each of its images needs 'id'"):
    sources.open_source(bad_json(tmp_path, images=[{"id": 1, "file_name": "a.jpg", "width": 3}]))
  with pytest.raises(ValueError, match="image id 3 appears twice"):
    sources.open_source(bad_json(tmp_path, images=[{"id": 3, "file_name": "a.jpg", "height": 1, "width": 1}]
                                 * 2, annotations=[]))
  with pytest.raises(ValueError, match="category at index 1 has no 'name'"):
    sources.open_source(bad_json(tmp_path, categories=[{"id": 1, "name": "a"}, {"id": 2}]))
  with pytest.raises(ValueError, match="has no categories"):
    sources.open_source(bad_json(tmp_path, categories=[], annotations=[]))


def test_coco_missing_and_undecodable_image_files(tmp_path):
  import tensorflow as tf
  ann, image_dir = write_coco(tmp_path)
  os.remove(os.path.join(image_dir, "a.jpg"))
  os.remove(os.path.join(image_dir, "sub", "c.png"))
  with pytest.raises(ValueError, match=r"2 of the 3 images .* are missing from .*: '.*a\.jpg', '.*c\.png'"):
    sources.open_source(f"coco:{ann},{image_dir}")
  with pytest.raises(ValueError, match="image folder '.*nowhere' of COCO annotation .* does not exist"):
    sources.open_source(f"coco:{ann},{tmp_path}/nowhere")
  (tmp_path / "images" / "a.jpg").write_text("not an image")
  (tmp_path / "images" / "sub" / "c.png").write_bytes(b"")
  source = sources.open_source(f"coco:{ann},{image_dir}")  # Contents are only read when decoded.
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"image file.*a\.jpg.*is not a JPEG, PNG"):
    read_all(source, "train")


# ---- TFDS detection datasets


def test_digit_scenes_is_a_detection_source(tmp_path, monkeypatch):
  from vit_jax.data import digit_scenes
  monkeypatch.setattr(digit_scenes, "SPLIT_SIZES", {"train": 12, "test": 6})
  source = sources.open_source("digit_scenes", data_dir=str(tmp_path))
  info = source.info
  assert info.task == "detection" and info.num_classes == 10 and info.class_names == list("0123456789")
  assert info.num_examples == {"train": 12, "test": 6} and info.image_shape == (64, 64, 1)
  ds, decode, cacheable = source.read("train", 1, 2)
  assert decode is None and cacheable
  records = read_all(source, "train", 1, 2)
  assert [int(r["image/id"]) for r in records] == list(range(6, 12))
  scenes = list(digit_scenes.scenes("train", 6, 12))
  for record, (_, canvas, boxes, labels) in zip(records, scenes):
    assert_layout(record, channels=1)
    np.testing.assert_array_equal(record["image"][..., 0], canvas)
    np.testing.assert_allclose(record["objects"]["bbox"], boxes / 64, atol=1e-6)
    np.testing.assert_array_equal(record["objects"]["label"], labels)
    assert not record["objects"]["is_crowd"].any()
  cached = list(ds.cache().take(2))  # Variable-length objects cache fine.
  assert len(cached) == 2


def test_mocked_coco_2017(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=4):
    source = sources.open_source("coco/2017", data_dir=str(tmp_path))
    assert source.info.task == "detection" and source.info.num_classes == 80
    records = read_all(source, "train")
  assert len(records) == 4
  for record in records:
    assert_layout(record)
    assert set(record) == {"image", "image/id", "objects"}


def test_detection_record_without_id_or_crowd(tmp_path):
  """A dataset like voc: image/id becomes the index within the split, is_crowd all False."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=5):
    source = sources.open_source("voc/2007", data_dir=str(tmp_path))
    assert source.info.task == "detection" and source.info.num_classes == 20
    whole = read_all(source, "test")
    sizes = source.shard_sizes("test", 2)  # Each mocked sub-split has 5 examples.
    second = read_all(source, "test", 1, 2)
  assert [int(r["image/id"]) for r in whole] == list(range(5))
  assert [int(r["image/id"]) for r in second] == list(range(sizes[0], sizes[0] + sizes[1]))
  for record in whole + second:
    assert_layout(record)
    assert not record["objects"]["is_crowd"].any()


def test_digit_scenes_written_as_a_coco_folder(tmp_path):
  """`python -m vit_jax.data.digit_scenes --out DIR` writes scenes the COCO-format source reads
  back exactly (pixels, boxes, labels, the names '0'..'9')."""
  from vit_jax.data import digit_scenes
  ann = digit_scenes.write_coco_folder(str(tmp_path), "test", 3, 2)
  source = sources.open_source(f"coco:{ann},{tmp_path / 'images'}")
  assert source.info.class_names == list("0123456789")
  records = read_all(source, "validation")
  for record, (s, canvas, boxes, labels) in zip(records, digit_scenes.scenes("test", 3, 5)):
    assert int(record["image/id"]) == s
    np.testing.assert_array_equal(record["image"][..., 0], canvas)
    np.testing.assert_allclose(record["objects"]["bbox"], boxes / 64, atol=1e-6)
    np.testing.assert_array_equal(record["objects"]["label"], labels)
  with pytest.raises(ValueError, match="1000"):
    digit_scenes.write_coco_folder(str(tmp_path), "test", 999, 2)
