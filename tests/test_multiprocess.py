"""Two JAX processes on localhost (4 CPU devices each) train, checkpoint and evaluate exactly as
one process with 8 devices does."""

import json
import re
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.checkpoint_reading import read_state
from tests.conftest import subprocess_xla_flags
from tests.train_configs import parse_like_train_py
from vit_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config.model.hidden_size=64", "--config.model.num_layers=2", "--config.model.num_heads=4",
        "--config.model.mlp_dim=128", "--config.batch_size=32", "--config.eval_batch_size=80",
        "--config.total_steps=6", "--config.log_every=2", "--config.checkpoint_every=3",
        "--config.eval_every=6", "--config.num_data_shards=2", "--config.mesh=data=2,fsdp=4",
        "--config.lr=1e-4", "--config.schedule.warmup_steps=2"]


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env(devices):
  e = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
           XLA_FLAGS=subprocess_xla_flags(devices))
  return e


def cmd(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/default.py"),
          "--workdir", str(workdir), "--config.data_dir=" + os.path.join(str(workdir), "..", "tfds"),
          *ARGS, *extra]


def single_process_config(workdir):
  """The config ``cmd`` gives train.py, parsed as train.py parses it."""
  return parse_like_train_py("configs/default.py", [a for a in cmd(workdir) if a.startswith("--config.")])


def test_two_processes_match_one(tmp_path):
  # The reference: one process over the 8 devices of this test process (the same XLA flags as
  # the subprocesses').
  trainer.train_and_evaluate(single_process_config(tmp_path / "one"), str(tmp_path / "one"))

  port = free_port()
  procs = [subprocess.Popen(cmd(tmp_path / "two", "--distributed=explicit",
                                f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                f"--process_id={i}"),
                            env=env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # One writer: only process 0 prints the progress and writes metrics.
  assert "final: top-1" in outs[0][0] and "[" in outs[0][0]
  assert "img/s" not in outs[1][0]

  def metrics(workdir):
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
  assert [m["step"] for m in one] == [m["step"] for m in two]  # no duplicated lines
  for a, b in zip(one, two):
    if "train/loss" in a:
      np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-6)
  final_one = json.loads((tmp_path / "one" / "final_metrics.json").read_text())
  final_two = json.loads((tmp_path / "two" / "final_metrics.json").read_text())
  assert final_one["examples"] == final_two["examples"] == 300  # every example once
  np.testing.assert_allclose(final_two["loss"], final_one["loss"], rtol=1e-5)

  ref, got = read_state(tmp_path / "one", 6), read_state(tmp_path / "two", 6)
  assert ref.keys() == got.keys()
  for k in ref:
    if "['key']['bias']" in k:
      assert np.max(np.abs(got[k] - ref[k])) < 1e-5, k
    else:
      assert np.linalg.norm(got[k] - ref[k]) <= 1e-5 * np.linalg.norm(ref[k]) + 1e-12, k


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_peer_ends_the_other_process_within_half_the_peer_timeout(tmp_path, sig):
  import signal
  import time
  port = free_port()
  extra = ["--config.total_steps=400", "--config.log_every=1", "--config.checkpoint_every=100",
           "--config.eval_every=400", "--peer_timeout=10"]
  procs = [subprocess.Popen(cmd(tmp_path / "two", "--distributed=explicit",
                                f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                f"--process_id={i}", *extra),
                            env=env(4), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
           for i in range(2)]
  metrics = tmp_path / "two" / "metrics.jsonl"
  deadline = time.time() + 300
  while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
    time.sleep(0.1)
  procs[1].send_signal(getattr(signal, sig))
  killed = time.time()
  _, err = procs[0].communicate(timeout=120)
  waited = time.time() - killed
  procs[1].kill()
  procs[1].wait()
  assert procs[0].returncode == 1
  # Half the peer timeout (and slack for this busy machine), with one line naming the dead process.
  assert waited < 5 + 10, waited
  lines = [l for l in err.splitlines() if l.strip() and "port.cc" not in l and "InitializeLog" not in l]
  # Killed: the failed collective (gloo's connection reset) usually says it first; stopped (hung):
  # only the heartbeats tell.
  assert lines and re.match(r"error: (a collective failed because another process of the run went "
                            r"away|process 1 of 2 has sent no heartbeat for )", lines[-1]), err[-2000:]
  assert "Traceback" not in err and "another task died" not in err, err[-2000:]


def test_two_processes_share_the_shape_buckets(tmp_path):
  """A DETR on images of three aspect ratios in shape buckets: the processes gather their bucket
  counts, so they draw the same bucket at every step and evaluate every image once."""
  from tests.test_detection_data import write_coco
  shapes = [(48, 64), (64, 48), (56, 56)]
  images = [(i + 1, f"{i}.png", *shapes[i % 3]) for i in range(24)]
  annotations = [(i + 1, i + 1, 1 + i % 3, [4, 4, 16, 16], 0) for i in range(24)]
  categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
  ann, image_dir = write_coco(tmp_path, images, annotations, categories)
  pad = "value_range(-1, 1)|det_pad((64, 64))|det_pad_boxes(4)|keep('image', 'pixel_mask', 'boxes', " \
        "'labels', 'box_mask', 'boxes_dropped'"
  args = [sys.executable, os.path.join(ROOT, "train.py"), "--config", "configs/detection.py:detr_digits",
          "--workdir", str(tmp_path / "two"), f"--config.dataset=coco:{ann},{image_dir}",
          "--config.num_classes=3", "--config.model.channels=3", "--config.model.resnet_width=8",
          "--config.model.hidden_size=32", "--config.model.encoder_layers=1",
          "--config.model.decoder_layers=1", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
          "--config.model.num_queries=4",
          "--config.train_split=train", "--config.eval_split=train", "--config.batch_size=8",
          "--config.eval_batch_size=8", "--config.total_steps=4", "--config.log_every=1",
          "--config.eval_every=4", "--config.checkpoint_every=4", "--config.num_data_shards=2",
          "--config.detection.max_boxes=4",
          "--config.detection.buckets=((48, 64), (64, 48), (64, 64))",
          f"--config.pp_train=decode|det_objects|det_flip_lr|{pad})",
          f"--config.pp_eval=decode|det_objects(drop_crowd=False)|{pad}, 'image_id', 'orig_size', "
          "'is_crowd')"]
  port = free_port()
  procs = [subprocess.Popen(args + ["--distributed=explicit", f"--coordinator_address=localhost:{port}",
                                    "--num_processes=2", f"--process_id={i}"],
                            env=env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  final = json.loads((tmp_path / "two" / "final_metrics.json").read_text())
  assert final["step"] == 4 and final["images"] == 24
