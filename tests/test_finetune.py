"""configs/finetune.py: the recipe's values, the command line, and a mocked fine-tune from an npz."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import finetune
from vit_jax import checkpoints, models
from vit_jax.checkpoints import param_tree, posemb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("arg,want", [
    ("model=ViT-B/16,dataset=cifar10", dict(num_classes=10, lr=0.01, total_steps=10_000, warmup=500,
                                            train_split="train[:98%]", eval_split="test")),
    ("model=ViT-B/32,dataset=cifar10", dict(num_classes=10, lr=0.03, total_steps=10_000, warmup=500)),
    ("model=ViT-L/16,dataset=cifar100", dict(num_classes=100, lr=0.03, total_steps=10_000)),
    ("model=ViT-B/16,dataset=imagenet2012", dict(num_classes=1000, lr=0.03, total_steps=20_000,
                                                 warmup=500, eval_split="validation")),
    ("model=ViT-S/16,dataset=oxford_iiit_pet", dict(num_classes=37, total_steps=500, warmup=100)),
    ("model=ViT-B/16,dataset=oxford_flowers102", dict(num_classes=102, total_steps=500, warmup=100)),
])
def test_recipe_values(arg, want):
  c = finetune.get_config(arg)
  got = dict(num_classes=c.num_classes, lr=c.lr, total_steps=c.total_steps,
             warmup=c.schedule.warmup_steps, train_split=c.train_split, eval_split=c.eval_split)
  assert {k: got[k] for k in want} == want
  assert (c.batch_size, c.grad_accum_steps, c.image_size) == (512, 8, 384)
  o = c.optimizer
  assert (o.name, o.grad_clip_norm, o.weight_decay) == ("sgd", 1.0, 0.0)
  assert (o.sgd.momentum, o.sgd.nesterov, o.sgd.accumulator_dtype) == (0.9, False, "bfloat16")
  assert (list(o.lr_mults), list(o.wd_mults), list(o.frozen)) == ([], [], [])
  # A new zero head; a representation layer of the checkpoint is dropped (or re-initialised).
  assert c.schedule.name == "cosine"
  assert list(c.pretrained_options.init) == ["head/.*", "pre_logits/.*"]
  assert list(c.pretrained_options.load) == [".*"]
  assert c.model.name == arg.split(",")[0].split("=")[1]


def test_image_folder_classes_are_counted(tmp_path):
  for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "dog", "eel"))):
    for c in classes:
      os.makedirs(tmp_path / split / c)
  c = finetune.get_config(f"model=ViT-B/16,dataset=imagefolder:{tmp_path}")
  assert (c.num_classes, c.total_steps, c.train_split, c.eval_split) == (3, 500, "train", "test")
  assert "onehot(3)" in c.pp_train
  assert finetune.get_config(f"model=ViT-B/16,dataset=imagefolder:{tmp_path},num_classes=5").num_classes == 5


def test_bad_args_are_clear():
  with pytest.raises(ValueError, match="needs dataset="):
    finetune.get_config("model=ViT-B/16")
  with pytest.raises(ValueError, match="keys \\('model', 'dataset', 'num_classes'\\)"):
    finetune.get_config("model=ViT-B/16,data=cifar10")
  with pytest.raises(ValueError, match="no fine-tuning preset"):
    finetune.get_config("model=ViT-B/16,dataset=mnist")


def test_command_line_takes_the_pretrained_path():
  argv = ["train.py", f"--config={ROOT}/configs/finetune.py:model=ViT-B/16,dataset=cifar10",
          "--config.pretrained=/ckpt/ViT-B_16.npz", "--config.grad_accum_steps=16"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  assert fv.config.pretrained == "/ckpt/ViT-B_16.npz"
  assert fv.config.grad_accum_steps == 16


def test_finetune_mocked_cifar10_from_an_npz(tmp_path):
  """The recipe scaled down: a 16 px, 5-class 'pretrained' model fine-tuned at 32 px on 10
  mocked CIFAR-10 classes (position embeddings resampled 2x2 -> 4x4, head re-initialised, the
  checkpoint's representation layer dropped: the recipe's init=["head/.*", "pre_logits/.*"])."""
  import tensorflow_datasets as tfds
  from vit_jax.train import trainer

  tiny = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
  pretrained = models.create("ViT-Ti/8", num_classes=5, image_size=16, rngs=nnx.Rngs(3),
                             representation_size=32, **tiny)
  rng = np.random.default_rng(0)
  arrays = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in param_tree.model_arrays(pretrained, ["Transformer/blocks"]).items()}
  param_tree.assign(pretrained, arrays, ["Transformer/blocks"])
  npz = checkpoints.export_npz(pretrained, tmp_path / "pretrained.npz")

  c = finetune.get_config("model=ViT-Ti/8,dataset=cifar10")
  c.model.update(tiny)
  c.pretrained = npz
  c.image_size = 32
  c.pp_train = c.pp_train.replace("384", "32")
  c.pp_eval = c.pp_eval.replace("384", "32")
  c.update(dict(batch_size=16, grad_accum_steps=2, eval_batch_size=16, total_steps=4, log_every=2,
                eval_every=4, checkpoint_every=4, shuffle_buffer=64))
  c.schedule.warmup_steps = 2

  start = time.time()
  with tfds.testing.mock_data(num_examples=32):
    setup = trainer.make_setup(c)
    init = setup.init_state().params
    final = trainer.train_and_evaluate(c, str(tmp_path / "work"), jax.devices()[:1])
  elapsed = time.time() - start

  # Initialised from the npz: weights copied, grid resampled (class token kept), head zeroed.
  src = np.load(npz)
  np.testing.assert_array_equal(np.asarray(init["embedding"]["kernel"]), src["embedding/kernel"])
  pe = np.asarray(init["Transformer"]["posembed_input"]["pos_embedding"])
  np.testing.assert_array_equal(pe, posemb.resample_posemb(src["Transformer/posembed_input/pos_embedding"], 17))
  assert pe.shape == (1, 17, 32)
  assert not np.asarray(init["head"]["kernel"]).any() and init["head"]["kernel"].shape == (32, 10)
  assert "pre_logits/kernel" in src.files and "pre_logits" not in init
  assert final["step"] == 4 and 0.0 <= final["top1"] <= 1.0 and np.isfinite(final["loss"])
  with open(tmp_path / "work" / "metrics.jsonl") as f:
    lines = [json.loads(l) for l in f]
  assert [l["step"] for l in lines if "train/loss" in l] == [2, 4]
  assert elapsed < 120  # Well under a minute when the machine is not shared.
