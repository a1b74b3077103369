"""Shape buckets: images grouped by aspect ratio, each group padded to its own canvas, with exact
resume, the same shapes on every host and every evaluation image once."""

import functools

import numpy as np
import pytest

from tests.test_detection_data import write_coco
from vit_jax.data import buckets, detection_ops, pipeline
from vit_jax.train import trainer

CANVASES = [(32, 32), (24, 40), (40, 24)]
SHAPES = [(24, 32), (32, 24), (28, 28), (20, 40)]  # -> canvases 1, 2, 0, 1
SPEC = ("decode|det_objects|det_flip_lr|det_resize((24, 32), 40)|value_range(-1, 1)|det_pad(40)"
        "|det_pad_boxes(4)|keep('image', 'pixel_mask', 'boxes', 'labels', 'box_mask', 'image/id')")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A COCO folder of 40 images of four shapes (image i + 1 has shape SHAPES[i % 4])."""
  images = [(i + 1, f"{i}.png", *SHAPES[i % 4]) for i in range(40)]
  annotations = [(i + 1, i + 1, 1 + i % 3, [2, 2, 6, 6], 0) for i in range(40)]
  categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
  ann, image_dir = write_coco(tmp_path_factory.mktemp("buckets"), images, annotations, categories)
  return f"coco:{ann},{image_dir}"


def bucket_of(image_id: int) -> int:
  return [1, 2, 0, 1][(image_id - 1) % 4]


def make_buckets(gather=None):
  return buckets.Buckets(assign=functools.partial(buckets.best_canvas, canvases=CANVASES),
                         pps=tuple(detection_ops.with_pad_size(SPEC, c) for c in CANVASES),
                         gather_counts=gather)


def take(batches, n):
  return [next(batches) for _ in range(n)]


def test_best_canvas_holds_the_image_at_its_shorter_side():
  got = buckets.best_canvas(np.array([*SHAPES, (480, 640), (640, 480), (100, 1000)]), CANVASES)
  assert got.tolist() == [1, 2, 0, 1, 1, 2, 1]
  with pytest.raises(ValueError, match=r"size \(0, 5\) .* has no area"):
    buckets.best_canvas(np.array([(4, 4), (0, 5)]), CANVASES)


def test_the_schedule_is_a_pure_function_of_seed_and_step():
  s = buckets.BucketSchedule([10, 30, 0, 60], seed=5)
  steps = s.buckets(0, 200_000)
  assert not (steps == 2).any()
  np.testing.assert_allclose(np.bincount(steps, minlength=4) / len(steps), [0.1, 0.3, 0, 0.6], atol=0.005)
  it = s.iterate(65_530)
  assert [next(it) for _ in range(20)] == steps[65_530:65_550].tolist()  # across a chunk's end
  assert s.batches_before(70_000).tolist() == np.bincount(steps[:70_000], minlength=4).tolist()
  assert buckets.BucketSchedule([10, 30, 0, 60], seed=5).buckets(65_000, 66_000).tolist() == \
      steps[65_000:66_000].tolist()
  assert not np.array_equal(buckets.BucketSchedule([10, 30, 0, 60], seed=6).buckets(0, 100), steps[:100])
  negative = [buckets.BucketSchedule([1, 1, 1], seed=s).buckets(0, 100).tolist() for s in (-1, -5, 0)]
  assert negative[0] != negative[1] != negative[2] != negative[0]
  empty_last = buckets.BucketSchedule([0.1, 0.2, 0.0], seed=0)  # 0.1 + 0.2 rounds below 0.3 / 0.3
  assert empty_last.cumulative[1] == 1.0 and 2 not in empty_last.buckets(0, 1000)


def test_with_pad_size_sets_the_one_det_pad():
  assert detection_ops.with_pad_size("decode|det_pad(40, method='nearest')|det_pad_boxes(4)", (24, 40)) == \
      "decode|det_pad((24, 40), method='nearest')|det_pad_boxes(4)"
  for spec in ("decode|det_pad_boxes(4)", "det_pad(4)|det_pad(8)"):
    with pytest.raises(ValueError, match="exactly one det_pad"):
      detection_ops.with_pad_size(spec, (8, 8))


def test_bucketed_training_batches_resume_exactly(dataset):
  args = dict(dataset=dataset, split="train", pp=SPEC, batch_size=4, seed=3, buckets=make_buckets(),
              num_shards=2, process_index=0, process_count=1)
  batches = take(pipeline.train_batches(**args), 12)
  shapes = {b["image"].shape[1:3] for b in batches}
  assert len(shapes) > 1 and shapes <= set(CANVASES)
  for b in batches:  # each batch from one bucket, each image padded to its bucket's canvas
    assert {CANVASES[bucket_of(i)] for i in b["image/id"]} == {b["image"].shape[1:3]}
    assert b["pixel_mask"].shape == b["image"].shape[:3]
  again = take(pipeline.train_batches(**args, start_step=7), 5)
  for a, b in zip(batches[7:], again):
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_two_hosts_agree_on_shapes_and_evaluate_every_image_once(dataset):
  def counts_of_every_shard(local):  # what Detection's gather_bucket_counts gives on two hosts
    del local
    source = pipeline.open_source(dataset)
    return np.stack([np.bincount(buckets.best_canvas(source.image_sizes("train", s, 2), CANVASES),
                                 minlength=3) for s in range(2)])

  hosts = [dict(dataset=dataset, batch_size=4, num_shards=2, process_index=p, process_count=2,
                buckets=make_buckets(counts_of_every_shard), pp=SPEC) for p in range(2)]
  train = [take(pipeline.train_batches(**h, split="train", seed=1), 8) for h in hosts]
  assert [b["image"].shape for b in train[0]] == [b["image"].shape for b in train[1]]
  assert len({b["image"].shape for b in train[0]}) > 1
  evals = [list(pipeline.eval_batches(**h, split="train")) for h in hosts]
  assert [b["image"].shape for b in evals[0]] == [b["image"].shape for b in evals[1]]
  assert len(evals[0]) == pipeline.num_eval_batches(**hosts[0], split="train")
  seen = [int(i) for host in evals for b in host for i, m in zip(b["image/id"], b["mask"]) if m]
  assert sorted(seen) == list(range(1, 41))
  for b in (b for host in evals for b in host):
    assert all(CANVASES[bucket_of(i)] == b["image"].shape[1:3] for i, m in zip(b["image/id"], b["mask"]) if m)
  with pytest.raises(ValueError, match="reads 1 of 2 shards, so Buckets.gather_counts must give every shard"):
    pipeline.num_eval_batches(**{**hosts[0], "buckets": make_buckets()}, split="train")


def test_a_bucket_no_image_takes_is_never_drawn_nor_evaluated(dataset):
  canvases = [(100, 8)] + CANVASES  # no image is that tall and narrow
  spec = buckets.Buckets(assign=functools.partial(buckets.best_canvas, canvases=canvases),
                         pps=tuple(detection_ops.with_pad_size(SPEC, c) for c in canvases))
  args = dict(dataset=dataset, batch_size=4, buckets=spec, num_shards=1, process_index=0, process_count=1,
              pp=SPEC)
  train = take(pipeline.train_batches(**args, split="train", seed=0), 8)
  assert {b["image"].shape[1:3] for b in train} <= set(CANVASES)
  evals = list(pipeline.eval_batches(**args, split="train"))
  assert (100, 8) not in {b["image"].shape[1:3] for b in evals}
  assert sum(int(b["mask"].sum()) for b in evals) == 40


def test_a_bucket_missing_from_a_training_shard_is_refused(dataset):
  # 16 shards of 2 or 3 images: shard 1 (images 4-6) has none of shape (28, 28), bucket 0's.
  with pytest.raises(ValueError, match=r"shape bucket 0 holds 10 training images, none of them in shard 1 of "
                                       r"16.*fewer data shards or fewer buckets"):
    pipeline.train_batches(dataset=dataset, split="train", pp=SPEC, batch_size=16, seed=0,
                           buckets=make_buckets(), num_shards=16, process_index=0, process_count=1)


def test_check_batch_takes_any_bucket_and_names_them_all():
  import jax
  spec = lambda h, w: {"image": jax.ShapeDtypeStruct((2, h, w, 3), np.float32)}
  specs = [spec(32, 32), spec(24, 40)]
  trainer.check_batch({"image": np.zeros((1, 24, 40, 3))}, specs)
  with pytest.raises(ValueError, match=r"'image' of shape \(1, 8, 8, 3\) .* takes \(batch, 32, 32, 3\) or "
                                       r"\(batch, 24, 40, 3\)"):
    trainer.check_batch({"image": np.zeros((1, 8, 8, 3))}, specs)


def test_image_sizes_from_encoded_images_and_gathered_counts():
  import tensorflow as tf
  from vit_jax.data import sources
  from vit_jax.tasks.detection import gather_bucket_counts
  image = tf.zeros([5, 7, 3], tf.uint8)
  for data in (tf.io.encode_jpeg(image), tf.io.encode_png(image)):  # the header, or decoding
    assert sources.encoded_image_hw(data).numpy().tolist() == [5, 7]
  counts = np.array([[3, 0, 1], [2, 2, 0]])
  np.testing.assert_array_equal(gather_bucket_counts(counts), counts)  # one process: its own


def test_resuming_with_other_buckets_is_refused_and_bad_buckets_are_named(tmp_path):
  import types
  from configs import detection
  from vit_jax import tasks
  c = detection.get_config("detr_digits")
  c.model.update(resnet_width=8, hidden_size=32, encoder_layers=1, decoder_layers=1, num_heads=2, mlp_dim=64)
  plain = types.SimpleNamespace(config=c, task=tasks.create(c))
  meta = {"data_order": trainer.data_order(c, plain.task), "step": 5}
  trainer.check_data_order(meta, plain, "here")  # the same run
  del meta["data_order"]["shape_buckets"]  # a checkpoint from before shape buckets
  trainer.check_data_order(meta, plain, "here")
  b = c.copy_and_resolve_references()
  b.detection.buckets = ((64, 64), (48, 96))
  bucketed = types.SimpleNamespace(config=b, task=tasks.create(b))
  with pytest.raises(ValueError, match=r"shape_buckets: the checkpoint's run had \[\], the config has "
                                       r"\[\[64, 64\], \[48, 96\]\]"):
    trainer.check_data_order(meta, bucketed, "here")
  b.detection.buckets = ((64, 64), 96)
  with pytest.raises(ValueError, match=r"detection.buckets .* each bucket is a \(height, width\) canvas of "
                                       r"positive ints.* 96 is not"):
    tasks.create(b)


def test_tfds_image_sizes_from_encoded_records_once_per_process(tmp_path, monkeypatch):
  from vit_jax.data import digit_scenes, sources
  monkeypatch.setattr(digit_scenes, "SPLIT_SIZES", {"train": 5, "test": 3})
  monkeypatch.setattr(sources, "CACHE_MAX_BYTES", 0)  # read encoded (PNG), as large splits are
  source = sources.open_source("digit_scenes", str(tmp_path))
  assert source.read("train", 0, 1)[1] is not None  # records hold encoded images
  assert source.image_sizes("train", 0, 1).tolist() == [[64, 64]] * 5
  monkeypatch.setattr(source, "read", lambda *a: pytest.fail("read the shard again"))
  assert source.image_sizes("train", 0, 1).shape == (5, 2)
