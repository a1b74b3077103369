"""Detection as a user runs it: train.py killed with SIGKILL and restarted ends bit-equal,
evaluate.py prints COCO's table and writes the detections, predict.py draws the boxes."""

import json
import os
import random
import sys
import time

import numpy as np
import pytest

from tests.checkpoint_reading import read_state
from tests.test_cli import ROOT, kill_after_step, run
from vit_jax.data import digit_scenes

STEPS = 16
CONFIG = os.path.join(ROOT, "configs/detection.py") + ":yolos_digits"


def tiny(data_dir):
  """yolos_digits shrunk, from scratch: its pre-training stage (a full-size ViT) is switched off
  (test_detection_task.py runs a staged run)."""
  return ["--config.pretrained=", "--config.model.hidden_size=32", "--config.model.num_layers=1",
          "--config.model.num_heads=2", "--config.model.mlp_dim=64",
          "--config.model.num_det_tokens=8", "--config.batch_size=8",
          "--config.eval_batch_size=8", f"--config.total_steps={STEPS}",
          "--config.log_every=1", "--config.checkpoint_every=4", f"--config.eval_every={STEPS}",
          "--config.schedule.warmup_steps=4", "--config.model.dropout_rate=0.1",
          f"--config.data_dir={data_dir}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """digit_scenes with 40 train and 6 test scenes, prepared before the subprocesses read it."""
  path = str(tmp_path_factory.mktemp("scenes"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(digit_scenes, "SPLIT_SIZES", {"train": 40, "test": 6})
    from vit_jax import data
    assert data.dataset_info("digit_scenes", path).num_examples == {"train": 40, "test": 6}
  return path


def train_cmd(workdir, data_dir):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG, "--workdir",
          str(workdir), *tiny(data_dir)]


def test_detection_killed_and_restarted_ends_bit_equal(tmp_path, data_dir):
  reference = run(train_cmd(tmp_path / "ref", data_dir))
  assert reference.returncode == 0, reference.stderr[-2000:]
  assert "final: AP" in reference.stdout

  kill_at = random.Random(time.time_ns()).randint(5, 13)
  workdir = tmp_path / "killed"
  killed_at = kill_after_step(train_cmd(workdir, data_dir), workdir, kill_at)
  assert killed_at < STEPS, f"the run finished before the kill at step {kill_at}"
  resumed = run(train_cmd(workdir, data_dir))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step" in resumed.stdout
  ref, got = read_state(tmp_path / "ref", STEPS), read_state(workdir, STEPS)
  assert ref.keys() == got.keys() and len(ref) > 10
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{k}, killed at step {killed_at}")

  # evaluate.py: the COCO table, the JSON, the detections in COCO results format.
  detections = tmp_path / "detections.json"
  out = run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--config", CONFIG,
             "--workdir", str(workdir), f"--detections={detections}", *tiny(data_dir)])
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out.stdout
  result = json.loads((workdir / f"eval_test_{STEPS}.json").read_text())
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert result["images"] == 6 and result["AP"] == pytest.approx(final["AP"])
  found = json.loads(detections.read_text())
  assert len(found) == 6 * 8 and set(found[0]) == {"image_id", "category_id", "bbox", "score"}

  # predict.py on two scenes saved as PNGs: boxes printed, drawn, written as COCO results.
  from PIL import Image
  scenes = []
  for s, canvas, _, _ in digit_scenes.scenes("test", 0, 2):
    scenes.append(str(tmp_path / f"scene{s}.png"))
    Image.fromarray(canvas).save(scenes[-1])
  out = run([sys.executable, os.path.join(ROOT, "predict.py"), "--checkpoint", str(workdir),
             "--threshold", "0", "--out", str(tmp_path / "drawn"), "--json",
             str(tmp_path / "p.json"), *scenes])
  assert out.returncode == 0, out.stderr[-2000:]
  assert "scene0.png: 8 detections above 0.0" in out.stdout
  drawn = Image.open(tmp_path / "drawn" / "scene1.png")
  assert drawn.size == (256, 256) and drawn.mode == "RGB"
  assert len(json.loads((tmp_path / "p.json").read_text())) == 16

  # visualize.py on the same checkpoint (written by an 8-device run, read on 8 fake devices):
  # the det tokens' attention with their boxes, the layer x head grid, the arrays.
  out = run([sys.executable, os.path.join(ROOT, "visualize.py"), "--workdir", str(workdir),
             "--config", CONFIG, "--images", scenes[0], "--out", str(tmp_path / "maps"),
             "--threshold", "0", "--fake_devices", "8"])
  assert out.returncode == 0, out.stderr[-2000:]
  maps = np.load(tmp_path / "maps" / "scene0_maps.npz")
  assert maps["det_attention"].shape == (2, 8, 8, 8)  # [heads, det tokens, rows, cols]
  assert maps["layer_head"].shape == (1, 2, 8, 8)
  for name in ("scene0_det_tokens.png", "scene0_heads.png", "summary.json"):
    assert (tmp_path / "maps" / name).exists(), name
