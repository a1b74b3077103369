"""The detection task end to end: the digit scenes through the trainer, COCO evaluation on
eight devices, the real pipeline on mocked coco/2017 and on a COCO-format folder, bad input."""

import logging as std_logging
import re

import jax
import numpy as np
import pytest
from flax import nnx

from configs import detection
from tests.test_detection_data import write_coco
from vit_jax import tasks
from vit_jax.data import digit_scenes
from vit_jax.train import trainer

TINY = {
    "yolos": dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, num_det_tokens=10),
    "detr": dict(resnet_width=8, hidden_size=64, encoder_layers=1, decoder_layers=2,
                 num_heads=4, mlp_dim=128, num_queries=10),
}
# Steps and peak learning rate with which each tiny model learns its 8 scenes by heart.
OVERFIT = {"yolos": (300, 1e-3), "detr": (500, 1e-3)}


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
  """digit_scenes prepared with 8 train and 13 test scenes (the definition's first ones)."""
  data_dir = str(tmp_path_factory.mktemp("scenes"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(digit_scenes, "SPLIT_SIZES", {"train": 8, "test": 13})
    from vit_jax import data
    info = data.dataset_info("digit_scenes", data_dir)
  assert info.num_examples == {"train": 8, "test": 13} and info.task == "detection"
  return data_dir


def tiny(kind: str, data_dir: str, **overrides):
  c = detection.get_config(f"{kind}_digits")
  c.pretrained = None  # from scratch: yolos_digits' pre-training stage is a full-size ViT
  c.data_dir = data_dir
  c.model.update(**TINY[kind])
  steps, lr = OVERFIT[kind]
  c.batch_size, c.eval_batch_size = 8, 8
  c.total_steps, c.lr = steps, lr
  c.schedule.update(warmup_steps=20, end_lr=lr * 0.1)
  c.optimizer.grad_clip_norm = 1.0
  c.log_every, c.eval_every, c.checkpoint_every = 100, steps, 10**6
  for key, value in overrides.items():
    setattr(c, key, value)
  return c


@pytest.mark.parametrize("kind", ["yolos", "detr"])
def test_tiny_detectors_overfit_eight_scenes(kind, scenes_dir, tmp_path):
  """The pipeline check every DETR user is told to run first: no augmentation, 8 scenes, until
  they are learnt by heart; then the 13 test scenes on 8 devices are each evaluated once."""
  config = tiny(kind, scenes_dir, eval_split="train")
  final = trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert final["images"] == 8
  assert final["AP50"] >= 0.9, final

  one = trainer.make_setup(config, jax.devices()[:1])
  state, _ = trainer.checkpointing.Checkpointer(str(tmp_path / "checkpoints")).restore(
      one.sharded_abstract_state(), one.task.signature())
  eight = trainer.make_setup(config, jax.devices())
  state8 = jax.device_put(jax.device_get(state), eight.shardings)
  on_eight = trainer.evaluate(eight, state8, split="test")
  assert on_eight["images"] == 13
  assert on_eight == pytest.approx(trainer.evaluate(one, state, split="test"), abs=1e-9)


def test_the_real_pipeline_on_mocked_coco_2017(tmp_path, caplog):
  import tensorflow_datasets as tfds
  c = detection.get_config("yolos_ti_coco")
  c.model.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, num_det_tokens=5,
                 patch_size=16)
  c.detection.canvas = (64, 96)
  c.detection.buckets = ((64, 96), (96, 64))  # mocked images have random sizes
  c.detection.max_boxes = 2  # mocked images hold more: they are dropped and counted
  c.pp_train = c.pp_train.replace("(864, 864)", "(64, 96)").replace("det_pad_boxes(100)",
                                                                     "det_pad_boxes(2)")
  for size in ("800", "864", "608", "600", "576", "544", "512", "480", "448", "416", "400",
               "384", "352", "320", "288", "256"):
    c.pp_train = c.pp_train.replace(size, "64")
  c.pp_eval = ("decode|det_objects(drop_crowd=False)|det_resize(64, 96)|value_range(-1, 1)"
               "|det_pad((64, 96))|det_pad_boxes(2)|keep('image', 'pixel_mask', 'boxes', "
               "'labels', 'box_mask', 'boxes_dropped', 'image_id', 'orig_size', 'is_crowd')")
  c.batch_size = c.eval_batch_size = 4
  c.shuffle_buffer = 8
  with tfds.testing.mock_data(num_examples=6):
    setup = trainer.make_setup(c, jax.devices()[:1])
    state = setup.init_state()
    with caplog.at_level(std_logging.WARNING):
      batch = next(iter(setup.task.train_data(0)))
    assert "beyond max_boxes=2" in caplog.text
    assert batch["image"].shape in ((4, 64, 96, 3), (4, 96, 64, 3)) and batch["boxes"].shape == (4, 2, 4)
    state, metrics = setup.jit_train_step()(state, setup.global_batch(batch))
    assert np.isfinite(float(metrics["loss"]))
    result = trainer.evaluate(setup, state, split="validation")
  assert result["images"] == 6 and set(result) >= {"AP", "AP50", "AR100"}


def test_a_coco_folder_trains_and_evaluates_in_shape_buckets(tmp_path):
  """Images of three aspect ratios (resized to 32 x 64, 64 x 32 and 48 x 48), one bucket each."""
  ann, images = write_coco(tmp_path)
  c = tiny("yolos", None, dataset=f"coco:{ann},{images}", num_classes=3, total_steps=3,
           eval_every=3, train_split="train", eval_split="train")
  c.model.update(channels=3)
  c.detection.buckets = ((32, 64), (64, 32), (48, 48))
  for key in ("pp_train", "pp_eval"):
    setattr(c, key, re.sub(r"(det_objects(\([^)]*\))?)", r"\1|det_resize(48, 64)",
                           getattr(c, key)))
  task = tasks.create(c)
  assert [b["image"].shape for b in task.input_specs(8)] == [(8, h, w, 3) for h, w in c.detection.buckets]
  assert [b["image"].shape[1:3] for b in task.eval_data()] == [(32, 64), (64, 32), (48, 48)]
  final = trainer.train_and_evaluate(c, str(tmp_path / "wd"), devices=jax.devices()[:1])
  assert final["images"] == 3 and final["step"] == 3


def test_labels_outside_the_classes_are_refused(scenes_dir):
  c = tiny("yolos", scenes_dir, num_classes=5)
  task = tasks.create(c)
  with pytest.raises(ValueError, match=r"target labels must lie in \[0, 5\)"):
    next(iter(task.train_data(0)))
  with pytest.raises(ValueError, match="has 10 classes, the config's num_classes is 5"):
    task.evaluator()


def test_the_objective_has_the_aux_layers_of_detr(scenes_dir):
  detr = tasks.create(tiny("detr", scenes_dir))
  assert sorted(detr.objective) == ["loss_bbox", "loss_bbox_0", "loss_ce", "loss_ce_0",
                                    "loss_giou", "loss_giou_0"]
  assert sorted(tasks.create(tiny("yolos", scenes_dir)).objective) == [
      "loss_bbox", "loss_ce", "loss_giou"]
  model = detr.build_model(nnx.Rngs(0))
  assert model.config.num_queries == 10


def test_yolos_starts_from_a_vit_classifier(tmp_path):
  """As YOLOS starts from ImageNet: the encoder from the ViT, its 2x2 position grid resampled
  to the detector's 4x4, the detection tokens, their positions and the heads new."""
  from vit_jax import checkpoints, models
  from vit_jax.checkpoints import readers, yolos_names
  from vit_jax.models.yolos import resize_positions
  size = dict(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, channels=1)
  vit = models.create("ViT-Ti/8", num_classes=10, image_size=16, rngs=nnx.Rngs(1), **size)
  path = str(tmp_path / "vit.npz")
  checkpoints.export_npz(vit, path)
  yolos = models.create("YOLOS-Ti/8", num_classes=10, image_size=32, rngs=nnx.Rngs(2),
                        num_det_tokens=3, **size)
  det_before = np.asarray(yolos.det_tokens[...])
  pe_before = np.asarray(yolos.Transformer.posembed_input.pos_embedding[...])
  head_before = np.asarray(yolos.class_head.Dense_0.kernel[...])
  yolos_names.load_from_classifier(yolos, path)
  np.testing.assert_array_equal(yolos.embedding.kernel[...], vit.embedding.kernel[...])
  np.testing.assert_array_equal(yolos.cls[...], vit.cls[...])
  np.testing.assert_array_equal(yolos.Transformer.blocks[0].MlpBlock_3.Dense_0.kernel[...],
                                vit.Transformer.blocks[0].MlpBlock_3.Dense_0.kernel[...])
  np.testing.assert_array_equal(yolos.det_tokens[...], det_before)
  np.testing.assert_array_equal(yolos.class_head.Dense_0.kernel[...], head_before)
  vit_pe = np.asarray(vit.Transformer.posembed_input.pos_embedding[...])
  want = resize_positions(np.concatenate([vit_pe, pe_before[:, -3:]], 1), (2, 2), (4, 4), 3)
  np.testing.assert_allclose(yolos.Transformer.posembed_input.pos_embedding[...], want, atol=1e-6)

  wide = models.create("YOLOS-Ti/8", num_classes=10, image_size=32, num_det_tokens=3,
                       **dict(size, hidden_size=32, num_heads=4))
  with pytest.raises(readers.CheckpointError, match="cannot start this YOLOS"):
    yolos_names.load_from_classifier(wide, path)


def test_yolos_starts_from_timm_deit_including_a_distilled_one(tmp_path):
  """timm's DeiTs start YOLOS too; of a distilled one YOLOS keeps the class token and takes the
  distillation token's position as the class position (hustvl/YOLOS ``finetune_det``)."""
  from safetensors.numpy import save_file

  from tests.timm_helpers import import_timm, randomize_, state_dict_numpy
  from vit_jax import models
  from vit_jax.checkpoints import yolos_names
  from vit_jax.models.yolos import resize_positions
  timm = import_timm()
  size = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=64)
  for distilled in (False, True):
    cls = timm.models.deit.VisionTransformerDistilled if distilled else timm.models.vision_transformer.VisionTransformer
    deit = cls(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=7)
    randomize_(deit, seed=3)
    arrays = state_dict_numpy(deit)
    assert ("dist_token" in arrays) == distilled
    path = str(tmp_path / f"deit_{distilled}.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)
    yolos = models.create("YOLOS-Ti/8", num_classes=10, image_size=(32, 48), rngs=nnx.Rngs(2),
                          num_det_tokens=3, **size)
    det_pe = np.asarray(yolos.Transformer.posembed_input.pos_embedding[...])[:, -3:]
    yolos_names.load_from_classifier(yolos, path)
    np.testing.assert_allclose(yolos.cls[...], arrays["cls_token"], rtol=1e-6)
    pos = arrays["pos_embed"][:, 1:] if distilled else arrays["pos_embed"]  # [1, 1 + 16, D]
    want = resize_positions(np.concatenate([pos, det_pe], 1), (4, 4), (4, 6), 3)
    got = np.asarray(yolos.Transformer.posembed_input.pos_embedding[...])
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got[:, 0], arrays["pos_embed"][:, 1 if distilled else 0], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(yolos.Transformer.blocks[1].MlpBlock_3.Dense_0.kernel[...]),
        arrays["blocks.1.mlp.fc1.weight"].T, rtol=1e-6)


def test_a_run_with_a_pretraining_stage(tmp_path, monkeypatch):
  """``pretrained="train:CONFIG"``: the stage is trained first in WORKDIR/pretrain, once."""
  from vit_jax.train import stages
  trained = []
  config = detection.get_config("yolos_digits")
  assert config.pretrained == "train:configs/detection.py:yolos_digits_backbone"
  out = stages.run_stages(config, str(tmp_path), lambda c, w: trained.append((c.task, w)),
                          trainer.has_checkpoint)
  assert trained == [("classification", str(tmp_path / "pretrain"))]
  assert out.pretrained == str(tmp_path / "pretrain")
  (tmp_path / "again" / "checkpoints" / "10").mkdir(parents=True)
  config = detection.get_config("yolos_digits")
  out = stages.run_stages(config, str(tmp_path / "again"), lambda c, w: trained.append(w),
                          trainer.has_checkpoint)
  assert len(trained) == 1 and out.pretrained == str(tmp_path / "again" / "pretrain")
  assert config.pretrained.startswith("train:")  # the caller's config is left as it was
  config.pretrained = "train:configs/nothing.py"
  with pytest.raises(ValueError, match="no config file 'configs/nothing.py'"):
    stages.run_stages(config, str(tmp_path / "new"), lambda c, w: None, trainer.has_checkpoint)
