"""Tests of vit_jax.data: the digits builder, preprocessing ops, and deterministic resumable batches."""

import collections
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from vit_jax import data
from vit_jax.data import preprocess_ops

DIGITS = "sklearn_digits"
PP_AUG = "decode|pad(1)|random_crop(8)|flip_lr|value_range(-1, 1)|onehot(10)|keep('image', 'labels')"
PP_RAW = "keep('image', 'label')"


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A TFDS data_dir holding the prepared digits (prepared by the first use)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data.dataset_info(DIGITS, data_dir=data_dir)
  return data_dir


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def example_keys(images, labels):
  """Hashable keys of examples, for multiset comparisons."""
  return collections.Counter((img.tobytes(), int(lab)) for img, lab in zip(images, labels))


def digits_split(data_dir, split):
  import tensorflow_datasets as tfds
  ds = tfds.builder(DIGITS, data_dir=data_dir).as_dataset(split=split, shuffle_files=False)
  examples = list(tfds.as_numpy(ds))
  return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])


def train(data_dir, **kwargs):
  args = dict(dataset=DIGITS, split="train", pp=PP_AUG, batch_size=8, seed=0, data_dir=data_dir,
              process_index=0, process_count=1)
  args.update(kwargs)
  return data.train_batches(**args)


# ---- package


def test_import_does_not_load_tensorflow():
  code = "import vit_jax.data, sys; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ---- digits


def test_digits_info_and_splits(digits_dir):
  info = data.dataset_info(DIGITS, data_dir=digits_dir)
  assert info.num_classes == 10
  assert info.class_names == [str(i) for i in range(10)]
  assert info.image_shape == (8, 8, 1)
  assert info.num_examples == {"train": 1497, "test": 300, "train_0to4": 750, "test_0to4": 151,
                               "train_5to9": 747, "test_5to9": 149}


def test_digits_examples_are_the_stratified_sklearn_split(digits_dir):
  from sklearn.datasets import load_digits
  digits = load_digits()
  train_images, train_labels = digits_split(digits_dir, "train")
  test_images, test_labels = digits_split(digits_dir, "test")
  assert train_images.shape == (1497, 8, 8, 1) and train_images.dtype == np.uint8
  assert test_images.shape == (300, 8, 8, 1) and test_images.dtype == np.uint8
  assert test_images.max() == 255 and test_images.min() == 0
  # Stratified: each class has its share (174..183 of 1,797) of the 300 test examples.
  counts = np.bincount(test_labels, minlength=10)
  expected = np.bincount(digits.target) * 300 / 1797
  assert np.all(np.abs(counts - expected) <= 1), counts
  # Exactly the sklearn images scaled to 0..255, split disjointly and in a fixed order.
  scaled = np.rint(digits.images * 255 / 16).astype(np.uint8)[..., None]
  assert example_keys(np.concatenate([train_images, test_images]),
                      np.concatenate([train_labels, test_labels])) == example_keys(scaled, digits.target)
  from vit_jax.data.digits import split_indices
  idx = split_indices(digits.target)["test"]
  np.testing.assert_array_equal(test_images, scaled[idx])
  np.testing.assert_array_equal(test_labels, digits.target[idx])


# ---- pp ops


def run_pp(spec, example, rng=(0, 0)):
  import tensorflow as tf
  pp = data.parse_pp(spec)
  out = pp({k: tf.constant(v) for k, v in example.items()}, tf.constant(rng, tf.int64))
  return {k: v.numpy() for k, v in out.items()}


def test_unknown_op_lists_valid_ops():
  with pytest.raises(ValueError, match="unknown preprocessing op 'resise'") as e:
    data.parse_pp("decode|resise(32)")
  for name in ("decode", "resize", "inception_crop", "flip_lr", "value_range", "onehot", "keep"):
    assert name in str(e.value)
  with pytest.raises(ValueError, match="unknown preprocessing op"):
    data.get_op("nope")


@pytest.mark.parametrize("spec, match", [
    ("resize(", "cannot parse"),
    ("resize(size=x)", "Python literals"),
    ("resize(1, 2, 3, 4, 5, 6)", "bad arguments"),
    ("decode||keep('image')", "empty op"),
    ("resize(0)", "positive int"),
])
def test_bad_specs_raise_value_error(spec, match):
  with pytest.raises(ValueError, match=match):
    data.parse_pp(spec)


def test_spec_parsing():
  assert preprocess_ops.split_spec("a|b('x|y', (1, 2))| c") == ["a", "b('x|y', (1, 2))", "c"]
  assert preprocess_ops.parse_call("value_range(-1, 1, in_max=2.5)") == ("value_range", (-1, 1),
                                                                         {"in_max": 2.5})
  assert preprocess_ops.parse_call("flip_lr") == ("flip_lr", (), {})


def test_value_range_onehot_keep():
  image = np.array([[[0], [255]], [[51], [102]]], np.uint8)
  out = run_pp("value_range(-1, 1)|onehot(4)|keep('image', 'labels')", {"image": image, "label": 2})
  assert set(out) == {"image", "labels"}
  assert out["image"].dtype == np.float32
  np.testing.assert_allclose(out["image"][..., 0], [[-1, 1], [-0.6, -0.2]], atol=1e-6)
  np.testing.assert_array_equal(out["labels"], np.array([0, 0, 1, 0], np.float32))
  out = run_pp("onehot(3, key='y', key_result='z', on=0.9, off=0.05)|copy('z', 'w')|keep('w')", {"y": 1})
  np.testing.assert_allclose(out["w"], [0.05, 0.9, 0.05])
  with pytest.raises(ValueError, match="keys \\['labels'\\] are not in the example"):
    run_pp("keep('image', 'labels')", {"image": image, "label": 2})


def test_decode_resize_crops_pad():
  import tensorflow as tf
  rgb = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
  png = tf.io.encode_png(rgb[..., :1]).numpy()
  out = run_pp("decode", {"image": png})
  assert out["image"].shape == (6, 4, 3) and out["image"].dtype == np.uint8  # Bytes decode to RGB.
  np.testing.assert_array_equal(out["image"][..., 2], rgb[..., 0])
  assert run_pp("decode", {"image": rgb[..., :1]})["image"].shape == (6, 4, 1)  # Decoded: kept as is.
  assert run_pp("decode(channels=3)", {"image": rgb[..., :1]})["image"].shape == (6, 4, 3)
  out = run_pp("resize((3, 2))", {"image": rgb})
  assert out["image"].shape == (3, 2, 3) and out["image"].dtype == np.uint8
  np.testing.assert_array_equal(run_pp("central_crop(2)", {"image": rgb})["image"], rgb[2:4, 1:3])
  out = run_pp("pad(1)", {"image": rgb})["image"]
  assert out.shape == (8, 6, 3) and out[0].sum() == 0 and out[:, 0].sum() == 0
  np.testing.assert_array_equal(out[1:-1, 1:-1], rgb)
  assert run_pp("inception_crop((5, 7))", {"image": rgb})["image"].shape == (5, 7, 3)
  assert run_pp("random_crop(3)", {"image": rgb})["image"].shape == (3, 3, 3)


@pytest.mark.parametrize("spec", ["inception_crop(4)", "random_crop(3)", "flip_lr",
                                  "pad(2)|random_crop(6)|flip_lr"])
def test_random_ops_are_pure_functions_of_the_rng(spec):
  image = np.random.RandomState(0).randint(0, 256, (6, 6, 3)).astype(np.uint8)
  a = run_pp(spec, {"image": image}, rng=(1, 2))["image"]
  np.testing.assert_array_equal(a, run_pp(spec, {"image": image}, rng=(1, 2))["image"])
  others = [run_pp(spec, {"image": image}, rng=(1, s))["image"] for s in range(3, 11)]
  assert any(not np.array_equal(a, b) for b in others)


# ---- training


def test_train_batches_shapes_and_determinism(digits_dir):
  a = take(train(digits_dir), 5)
  assert a[0]["image"].shape == (8, 8, 8, 1) and a[0]["image"].dtype == np.float32
  assert a[0]["labels"].shape == (8, 10) and a[0]["labels"].dtype == np.float32
  assert_same_batches(a, take(train(digits_dir), 5))
  b = take(train(digits_dir, seed=1), 5)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_exact_resume_across_epoch_boundary(digits_dir):
  # 1,497 examples / 8 per step: epoch 1 starts inside step 187.
  full = take(train(digits_dir), 200)
  for k in (185, 187, 190):
    assert_same_batches(take(train(digits_dir, start_step=k), 200 - k), full[k:])


@pytest.mark.parametrize("num_shards", [2, 4])
def test_num_shards_global_batch_independent_of_process_count(digits_dir, num_shards):
  # Shards of ~749 (~375) examples, 8 (4) per step: 100 steps cross an epoch boundary.
  single = take(train(digits_dir, batch_size=16, num_shards=num_shards), 100)
  parts = [take(train(digits_dir, batch_size=16, num_shards=num_shards, process_index=p, process_count=2),
                100) for p in range(2)]
  assert parts[0][0]["image"].shape[0] == 8
  joined = [{k: np.concatenate([x[k], y[k]]) for k in x} for x, y in zip(*parts)]
  assert_same_batches(single, joined)
  # Resuming one process of a sharded run is exact too.
  resumed = take(train(digits_dir, batch_size=16, num_shards=num_shards, process_index=1, process_count=2,
                       start_step=90), 10)
  assert_same_batches(resumed, parts[1][90:])


def test_batchwise_and_per_example_preprocessing_agree(digits_dir, monkeypatch):
  from vit_jax.data import pipeline
  batchwise = take(train(digits_dir, start_step=180), 10)
  map_and_batch = pipeline._map_and_batch

  def per_example(tf, ds, process, batch_size, batchwise):
    del batchwise
    return map_and_batch(tf, ds, process, batch_size, batchwise=False)

  monkeypatch.setattr(pipeline, "_map_and_batch", per_example)
  assert_same_batches(batchwise, take(train(digits_dir, start_step=180), 10))


def test_each_epoch_visits_every_example_once(digits_dir):
  images, labels = digits_split(digits_dir, "train")
  batches = take(train(digits_dir, pp=PP_RAW, batch_size=3), 2 * 499)  # 1,497 = 499 * 3.
  epochs = []
  for e in range(2):
    part = batches[e * 499:(e + 1) * 499]
    epoch_images = np.concatenate([b["image"] for b in part])
    epoch_labels = np.concatenate([b["label"] for b in part])
    assert example_keys(epoch_images, epoch_labels) == example_keys(images, labels)
    epochs.append(epoch_labels)
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled.


def test_sharding_errors(digits_dir):
  with pytest.raises(ValueError, match="multiple of num_shards"):
    train(digits_dir, batch_size=6, num_shards=4)
  with pytest.raises(ValueError, match="multiple of process_count"):
    train(digits_dir, num_shards=3, process_index=0, process_count=2)


# ---- evaluation

PP_EVAL = "decode|value_range(-1, 1)|onehot(10)|keep('image', 'labels', 'label')"


def evaluate(data_dir, **kwargs):
  args = dict(dataset=DIGITS, split="test", pp=PP_EVAL, batch_size=64, data_dir=data_dir)
  args.update(kwargs)
  return list(data.eval_batches(**args))


@pytest.mark.parametrize("batch_size, num_shards, process_count",
                         [(64, 1, 1), (100, 1, 1), (64, 2, 2), (48, 4, 2), (48, 4, 1)])
def test_eval_visits_every_example_once(digits_dir, batch_size, num_shards, process_count):
  images, labels = digits_split(digits_dir, "test")
  per_process = [evaluate(digits_dir, batch_size=batch_size, num_shards=num_shards, process_index=p,
                          process_count=process_count) for p in range(process_count)]
  counts = {len(b) for b in per_process}
  assert len(counts) == 1  # Every process runs the same number of steps.
  expected = data.num_eval_batches(dataset=DIGITS, split="test", pp=PP_EVAL, batch_size=batch_size,
                                   data_dir=digits_dir, num_shards=num_shards, process_index=0,
                                   process_count=process_count)
  assert counts == {expected}
  batches = [b for process in per_process for b in process]
  assert all(b["image"].shape[0] == batch_size // process_count for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.dtype == np.float32 and mask.sum() == 300
  real = mask == 1
  got_images = np.concatenate([b["image"] for b in batches])[real]
  got_labels = np.concatenate([b["label"] for b in batches])[real]
  want_images = (images.astype(np.float32) / 255 * 2 - 1)
  assert example_keys(np.round(got_images, 4), got_labels) == example_keys(np.round(want_images, 4), labels)
  assert np.all(np.concatenate([b["labels"] for b in batches])[~real] == 0)  # Padding is zeros.


def test_eval_in_order_on_one_process(digits_dir):
  _, labels = digits_split(digits_dir, "test")
  batches = evaluate(digits_dir, batch_size=128, process_index=0, process_count=1)
  got = np.concatenate([b["label"] for b in batches])[:300]
  np.testing.assert_array_equal(got, labels)


# ---- tfds mocks


@pytest.mark.parametrize("name, num_classes, size", [("cifar10", 10, 16), ("imagenet2012", 1000, 24)])
def test_mocked_tfds_datasets(tmp_path, name, num_classes, size):
  import tensorflow_datasets as tfds
  pp = (f"decode|inception_crop({size})|flip_lr|value_range(-1, 1)|onehot({num_classes})"
        "|keep('image', 'labels')")
  with tfds.testing.mock_data(num_examples=10):
    info = data.dataset_info(name, data_dir=str(tmp_path))
    assert info.num_classes == num_classes
    batches = take(data.train_batches(dataset=name, split="train", pp=pp, batch_size=4, seed=0,
                                      data_dir=str(tmp_path), process_index=0, process_count=1), 4)
    again = take(data.train_batches(dataset=name, split="train", pp=pp, batch_size=4, seed=0, start_step=2,
                                    data_dir=str(tmp_path), process_index=0, process_count=1), 2)
    evals = list(data.eval_batches(dataset=name, split="validation" if name == "imagenet2012" else "test",
                                   pp=pp.replace("inception_crop", "resize"), batch_size=4,
                                   data_dir=str(tmp_path), process_index=0, process_count=1))
  for b in batches:
    assert b["image"].shape == (4, size, size, 3) and b["image"].dtype == np.float32
    assert b["labels"].shape == (4, num_classes) and b["labels"].dtype == np.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1
  assert_same_batches(again, batches[2:])
  assert len(evals) == 3 and sum(b["mask"].sum() for b in evals) == 10
  assert evals[0]["image"].shape == (4, size, size, 3)


# ---- image folder


@pytest.fixture
def image_folder(tmp_path):
  from PIL import Image
  rng = np.random.RandomState(0)
  counts = {"train": {"dog": 5, "cat": 4}, "test": {"dog": 2, "cat": 1, "bird": 1}}
  for split, classes in counts.items():
    for cls, n in classes.items():
      os.makedirs(tmp_path / split / cls)
      for i in range(n):
        shape = (rng.randint(6, 12), rng.randint(6, 12)) + (() if i % 2 else (3,))  # Grey and RGB.
        ext = "png" if i % 3 else "jpg"
        image = Image.fromarray(rng.randint(0, 256, shape).astype(np.uint8))
        image.save(tmp_path / split / cls / f"{i}.{ext}")
  (tmp_path / "train" / "notes.txt").write_text("not an image")
  return f"imagefolder:{tmp_path}"


def test_image_folder(image_folder):
  info = data.dataset_info(image_folder)
  assert info.class_names == ["bird", "cat", "dog"] and info.num_classes == 3
  assert info.num_examples == {"train": 9, "test": 4}
  pp = "decode|resize(8)|flip_lr|value_range(-1, 1)|onehot(3)|keep('image', 'labels')"
  batches = take(data.train_batches(dataset=image_folder, split="train", pp=pp, batch_size=4, seed=0,
                                    process_index=0, process_count=1), 5)
  assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)
  first_epoch_labels = np.concatenate([b["labels"] for b in batches])[:9].argmax(-1)
  assert np.bincount(first_epoch_labels, minlength=3).tolist() == [0, 4, 5]
  evals = list(data.eval_batches(dataset=image_folder, split="test", pp=pp.replace("|flip_lr", ""),
                                 batch_size=2, process_index=0, process_count=1))
  labels = np.concatenate([b["labels"] for b in evals]).argmax(-1)
  assert labels.tolist() == [0, 1, 2, 2]  # In order: sorted by class, then file name.
  with pytest.raises(ValueError, match="no split 'validation'"):
    data.eval_batches(dataset=image_folder, split="validation", pp=pp, batch_size=2, process_index=0,
                      process_count=1)


def test_missing_image_folder(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    data.dataset_info(f"imagefolder:{tmp_path}/nothing")


# ---- errors


def test_unknown_dataset_names_it(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'"):
    data.dataset_info("no_such_dataset_xyz", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Did you mean: .*cifar10"):
    data.train_batches(dataset="cifar01", split="train", pp=PP_RAW, batch_size=2, seed=0,
                       data_dir=str(tmp_path), process_index=0, process_count=1)


def test_unprepared_dataset_is_not_downloaded(tmp_path):
  with pytest.raises(ValueError, match=f"not prepared.*tfds build mnist --data_dir {tmp_path}"):
    data.train_batches(dataset="mnist", split="train", pp=PP_RAW, batch_size=2, seed=0,
                       data_dir=str(tmp_path), process_index=0, process_count=1)


def test_unknown_split(digits_dir):
  with pytest.raises(ValueError,
                     match="no split 'validation'.*'test', 'test_0to4', 'test_5to9', 'train'"):
    train(digits_dir, split="validation")
