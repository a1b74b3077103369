"""Every ``--config.*`` override that README.md and the config docstrings show parses on the
config it names and runs one train step there (model and batch shrunk); gradient accumulation
gives the full batch's update on every config."""

from __future__ import annotations

import glob
import math
import os
import re

import jax
import numpy as np
import pytest
from tests.train_configs import parse_like_train_py

from tests.config_docs import ROOT, documented
from vit_jax import models
from vit_jax.train import checkpointing, trainer
from vit_jax.train.step import make_train_step

# Small sizes per family, used where the config leaves an option at the family's default or
# sets it larger.
SHRINK = {
    "ViT": dict(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32),
    "Hybrid": dict(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, resnet_layers=(1, 1, 1),
                   resnet_width=8, gn_groups=4),
    "BiT": dict(layers=(1,), width=8, gn_groups=4),
    "Mixer": dict(hidden_size=16, num_layers=1, tokens_mlp_dim=8, channels_mlp_dim=32),
    "TNT": dict(hidden_size=16, inner_size=8, num_layers=1, num_heads=2, inner_heads=2),
    "YOLOS": dict(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, num_det_tokens=4),
    "DETR": dict(resnet_layers=(1,), resnet_width=8, hidden_size=16, encoder_layers=1,
                 decoder_layers=2, num_heads=2, mlp_dim=32, num_queries=4),
}
# Detection configs: the canvas every batch is padded to, and the sizes images are resized to.
SMALL_CANVAS = (32, 48)
MULTI_DEVICE_MESHES = ("fsdp", "tensor_parallel")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for cls in ("cat", "dog"):
      os.makedirs(root / split / cls)
      for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(root / split / cls / f"{i}.png")
  return str(root)


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory):
  from tests.test_detection_data import write_coco
  return write_coco(tmp_path_factory.mktemp("coco"))


def substitute(text: str, folder: str, coco: tuple[str, str] = ("", "")) -> str:
  """The docs' example paths replaced by the test's: an image folder, a COCO folder."""
  text = text.replace("/data/coco_mine/instances.json", coco[0])
  text = text.replace("/data/coco_mine/images", coco[1])
  for placeholder in ("/path/to/imagefolder", "/path/to/root", "/data/mine"):
    text = text.replace(placeholder, folder)
  return text


def shrink_detection(config) -> None:
  """A small canvas, and the preprocessing's sizes scaled down to fit it."""
  h, w = SMALL_CANVAS
  config.detection.canvas = SMALL_CANVAS
  config.detection.max_boxes = 4  # SHRINK's queries
  for key in ("pp_train", "pp_eval"):
    pp = re.sub(r"det_pad\(\([^)]*\)\)", f"det_pad(({h}, {w}))", config[key])
    pp = re.sub(r"det_pad_boxes\(\d+\)", f"det_pad_boxes({config.detection.max_boxes})", pp)
    pp = re.sub(r"\b\d{3,4}\b", lambda m: str(max(8, int(m[0]) * h // 1333)), pp)
    config[key] = pp


def parse(spec: str, overrides: tuple[str, ...]):
  """The config as train.py's flag parser builds it."""
  return parse_like_train_py(spec, overrides)


def shrink(config, *, batch: int = 8):
  family = models.resolve(config.model.name)[0].name
  for key, small in SHRINK[family].items():
    value = config.model[key]
    if value is None or (not isinstance(small, tuple) and value > small):
      config.model[key] = small
  if config.task == "detection":
    shrink_detection(config)
  config.batch_size = batch * math.ceil(config.grad_accum_steps / batch)
  config.eval_batch_size = 8
  config.shuffle_buffer = 16
  config.total_steps = 1
  return config


def devices_for(config) -> list:
  mesh = config.mesh
  many = mesh in MULTI_DEVICE_MESHES or any(
      part.split("=")[1] not in ("1", "-1") for part in mesh.split(",") if "=" in part)
  return jax.devices() if many else jax.devices()[:1]


def provide_pretrained(config, tmp_path) -> None:
  """Points ``config.pretrained`` at a checkpoint of the shrunk model, in the format named."""
  if not config.pretrained:
    return
  probe = parse_like(config)
  probe.pretrained = None
  setup = trainer.make_setup(probe, jax.devices()[:1])
  if config.pretrained.endswith(".npz"):
    from vit_jax import checkpoints
    model = setup.task.build_model(__import__("flax").nnx.Rngs(1))
    path = str(tmp_path / os.path.basename(config.pretrained))
    checkpoints.export_npz(model, path)
  else:
    path = str(tmp_path / "pretrained_workdir")
    ckpt = checkpointing.Checkpointer(os.path.join(path, "checkpoints"), keep=1, async_save=False)
    ckpt.save(1, setup.init_state(), {"signature": setup.task.signature(), "step": 1})
    ckpt.close()
  config.pretrained = path


def parse_like(config):
  return type(config)(config.to_dict())


DOCUMENTED = documented()
# Keys the shrinking sets anyway: entries that differ only there run as one.
SHRUNK_KEYS = ("total_steps", "batch_size", "eval_batch_size", "log_every", "eval_every",
               "checkpoint_every")


def merged_runs() -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
  """(spec, overrides, where) runs: the entries naming the same config whose overrides agree
  on every key they share (but the shrunk ones) are applied together, in document order."""
  runs: list[tuple[str, dict, list]] = []
  for d in DOCUMENTED:
    mine = dict(o[len("--config."):].split("=", 1) for o in d.overrides)
    for spec, values, wheres in runs:
      if spec == d.spec and all(values[k] == v for k, v in mine.items()
                                if k in values and k not in SHRUNK_KEYS):
        values.update(mine)
        wheres.append(d.where)
        break
    else:
      runs.append((d.spec, mine, [d.where]))
  return [(spec, tuple(f"--config.{k}={v}" for k, v in values.items()), tuple(wheres))
          for spec, values, wheres in runs]


RUNS = merged_runs()


def test_the_docs_show_overrides_for_every_config():
  named = {d.spec.split(":")[0] for d in DOCUMENTED}
  configs = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
  assert configs - {"configs/base.py", "configs/__init__.py"} <= named
  assert sum(len(d.overrides) for d in DOCUMENTED) >= 30


@pytest.fixture
def sorted_mock_boxes(monkeypatch):
  """tfds's mock generator draws box corners in any order (oxford_iiit_pet's head boxes), which
  its own BBoxFeature then refuses: order them."""
  import tensorflow_datasets as tfds
  encode = tfds.features.BBoxFeature.encode_example

  def ordered(self, bbox):
    y0, x0, y1, x1 = (float(v) for v in bbox)
    return encode(self, np.array([min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1)], np.float32))
  monkeypatch.setattr(tfds.features.BBoxFeature, "encode_example", ordered)


@pytest.mark.parametrize("doc", DOCUMENTED, ids=[d.where for d in DOCUMENTED])
def test_documented_overrides_parse(doc, image_folder, coco_folder):
  config = parse(substitute(doc.spec, image_folder, coco_folder),
                 tuple(substitute(o, image_folder, coco_folder) for o in doc.overrides))
  assert config.model.name


@pytest.mark.parametrize("spec,overrides,where", RUNS, ids=["+".join(r[2]) for r in RUNS])
def test_documented_overrides_run_one_step(spec, overrides, where, image_folder, coco_folder,
                                           tmp_path, sorted_mock_boxes):
  import tensorflow_datasets as tfds
  spec = substitute(spec, image_folder, coco_folder)
  overrides = tuple(substitute(o, image_folder, coco_folder) for o in overrides)
  config = shrink(parse(spec, overrides))
  provide_pretrained(config, tmp_path)
  with tfds.testing.mock_data(num_examples=8):
    setup = trainer.make_setup(config, devices_for(config))
    state = setup.init_state()
    batch = next(iter(setup.task.train_data(0)))
    state, metrics = setup.jit_train_step()(state, setup.global_batch(batch))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


def fake_batch(spec: dict, num_classes: int) -> dict:
  """A batch of the task's input spec: random images, one class per example for a classifier;
  for a detector 0 to max_boxes random boxes per image (a per-batch count of valid items)."""
  rng = np.random.default_rng(0)
  n = spec["image"].shape[0]
  batch = {"image": rng.uniform(-1, 1, spec["image"].shape).astype(np.float32)}
  if "box_mask" in spec:
    m = spec["box_mask"].shape[1]
    batch["pixel_mask"] = np.ones(spec["pixel_mask"].shape, np.float32)
    batch["box_mask"] = (np.arange(m) < rng.integers(0, m + 1, (n, 1))).astype(np.float32)
    batch["labels"] = rng.integers(0, num_classes, (n, m)).astype(np.int32)
    centre, size = rng.uniform(0.3, 0.7, (n, m, 2)), rng.uniform(0.1, 0.5, (n, m, 2))
    batch["boxes"] = np.concatenate([centre, size], -1).astype(np.float32)
  else:
    batch["labels"] = np.eye(num_classes, dtype=np.float32)[np.arange(n) % num_classes]
  assert set(batch) == set(spec)
  return batch


def every_config() -> list[str]:
  """Each config file once, with the ARG its docstring's first command gives."""
  specs = {}
  for d in DOCUMENTED:
    specs.setdefault(d.spec.split(":")[0], d.spec)
  return sorted(specs.values())


@pytest.mark.parametrize("spec", every_config())
def test_accumulation_gives_the_full_batch_update(spec, image_folder, tmp_path):
  config = parse(substitute(spec, image_folder), ())
  for key in ("dropout_rate", "attention_dropout_rate", "stochastic_depth"):
    if config.model[key] is not None:
      config.model[key] = 0.0
  config.mixup_alpha = 0.0
  config.grad_accum_steps = 1
  shrink(config)
  provide_pretrained(config, tmp_path)
  setup = trainer.make_setup(config, jax.devices()[:1])
  batch = setup.global_batch(fake_batch(setup.task.input_spec(config.batch_size),
                                        config.num_classes))
  before = jax.device_get(setup.init_state().params)
  updates = []
  for k in (1, 4):
    step = jax.jit(make_train_step(setup.graphdef, setup.task, setup.tx, setup.schedule,
                                   seed=config.seed, accum_steps=k))
    state, _ = step(setup.init_state(), batch)
    updates.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                                jax.device_get(state.params), before))
  moved = 0
  for a, b in zip(jax.tree.leaves(updates[0]), jax.tree.leaves(updates[1])):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    moved += int(np.any(a != 0))
  assert moved > 0
