"""train.py and evaluate.py as a user runs them: exact resume after SIGKILL, evaluation, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 2-layer ViT on the digits; 64 images a step, so an epoch of 1,497 ends after step 23.
TINY = ["--config.model.hidden_size=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.batch_size=64", "--config.total_steps=40",
        "--config.log_every=1", "--config.checkpoint_every=5", "--config.eval_every=40",
        "--config.schedule.warmup_steps=5", "--config.model.dropout_rate=0.1"]


def env():
  e = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  e.pop("XLA_FLAGS", None)  # one CPU device: the subprocesses stay fast
  return e


def train_cmd(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/default.py"),
          "--workdir", str(workdir), *TINY, *extra]


def run(cmd, timeout=300):
  return subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def final_params(workdir, step=40):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta"))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  manager.close()
  return state


def last_logged_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  steps = [json.loads(l)["step"] for l in open(path).read().splitlines() if l.strip()]
  return max(steps, default=0)


def test_sigkill_and_restart_ends_bit_equal(tmp_path):
  reference = run(train_cmd(tmp_path / "ref"))
  assert reference.returncode == 0, reference.stderr[-2000:]
  assert "final: top-1" in reference.stdout

  kill_at = random.Random(time.time_ns()).randint(12, 33)  # past a checkpoint, before the end
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(train_cmd(workdir), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while last_logged_step(workdir) < kill_at and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = last_logged_step(workdir)
  assert killed_at < 40, f"the run finished before the kill at step {kill_at}"

  resumed = run(train_cmd(workdir))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step" in resumed.stdout
  ref, got = final_params(tmp_path / "ref"), final_params(workdir)
  import jax
  leaves_ref, leaves_got = jax.tree.leaves(ref), jax.tree.leaves(got)
  assert len(leaves_ref) == len(leaves_got) > 10
  for a, b in zip(leaves_ref, leaves_got):
    np.testing.assert_array_equal(a, b, err_msg=f"killed at step {killed_at}")

  # evaluate.py on the latest checkpoint, then on an explicit one.
  out = run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--config",
             os.path.join(ROOT, "configs/default.py"), "--workdir", str(workdir), *TINY])
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads((workdir / "eval_test_40.json").read_text())
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert result["examples"] == 300 and result["top1"] == pytest.approx(final["top1"])
  assert "top-1" in out.stdout and "top-5" in out.stdout
  out = run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--config",
             os.path.join(ROOT, "configs/default.py"), "--checkpoint", str(workdir / "checkpoints" / "35"),
             "--output", str(tmp_path / "e35.json"), *TINY])
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads((tmp_path / "e35.json").read_text())["step"] == 35


@pytest.mark.parametrize("flag,message", [
    ("--config.nosuchkey=1", r"unknown config key 'nosuchkey'.*Valid keys: .*batch_size"),
    ("--config.model.name=ViT-Q/2", r"unknown model name 'ViT-Q/2'.*ViT-B/16"),
    ("--config.pp_train=decode|blur(3)", r"unknown preprocessing op 'blur'.*valid ops.*flip_lr"),
    ("--config.dataset=no_such_dataset", r"unknown dataset 'no_such_dataset'"),
    ("--config.image_size=16", r"images of shape \(64, 8, 8, 1\) do not fit this model"),
])
def test_bad_input_exits_with_a_clear_message(tmp_path, flag, message):
  out = run(train_cmd(tmp_path, flag, "--config.total_steps=2"))
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  import re
  assert re.search(message, out.stderr), out.stderr[-2000:]


def test_workdir_of_another_model_is_refused(tmp_path):
  first = run(train_cmd(tmp_path, "--config.total_steps=5"))
  assert first.returncode == 0, first.stderr[-2000:]
  out = run(train_cmd(tmp_path, "--config.model.num_layers=3"))
  assert out.returncode != 0
  assert "belongs to another model" in out.stderr and "num_layers" in out.stderr
