"""train.py and evaluate.py as a user runs them: exact resume after SIGKILL, evaluation, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.checkpoint_reading import read_state
from tests.conftest import subprocess_xla_flags
from vit_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 2-layer ViT on the digits; 64 images a step, so an epoch of 1,497 ends after step 23.
TINY = ["--config.model.hidden_size=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.batch_size=64", "--config.total_steps=40",
        "--config.log_every=1", "--config.checkpoint_every=5", "--config.eval_every=40",
        "--config.schedule.warmup_steps=5", "--config.model.dropout_rate=0.1"]


def env():
  e = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  e["XLA_FLAGS"] = subprocess_xla_flags()  # one CPU device: the subprocesses stay fast
  return e


def train_cmd(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/default.py"),
          "--workdir", str(workdir), *TINY, *extra]


def run(cmd, timeout=300):
  return subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def last_logged_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  steps = [json.loads(l)["step"] for l in open(path).read().splitlines() if l.strip()]
  return max(steps, default=0)


def kill_after_step(cmd, workdir, step):
  """Starts ``cmd`` and SIGKILLs it once its metrics log reaches ``step`` and a checkpoint is
  complete (or it ends), so that the restart has something to resume; returns the last step it
  logged."""
  proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while ((last_logged_step(workdir) < step or not trainer.has_checkpoint(workdir))
         and proc.poll() is None and time.time() < deadline):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return last_logged_step(workdir)


def test_sigkill_and_restart_ends_bit_equal(tmp_path):
  reference = run(train_cmd(tmp_path / "ref"))
  assert reference.returncode == 0, reference.stderr[-2000:]
  assert "final: top-1" in reference.stdout

  # SIGKILL at a random step, then SIGTERM (preemption) in the resumed run, then resume to the end.
  kill_at = random.Random(time.time_ns()).randint(8, 22)  # past a checkpoint, before the end
  workdir = tmp_path / "killed"
  killed_at = kill_after_step(train_cmd(workdir), workdir, kill_at)
  assert killed_at < 40, f"the run finished before the kill at step {kill_at}"

  # The resumed run gets SIGTERM past the step the killed one reached: it checkpoints the step it
  # is at and exits cleanly.
  term_at = killed_at + 6
  proc = subprocess.Popen(train_cmd(workdir), env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while last_logged_step(workdir) < term_at and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "resumed from step" in out
  saved = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
  assert "SIGTERM: saved a checkpoint at step" in out and max(saved) >= term_at
  assert max(saved) < 40 and max(saved) == last_logged_step(workdir)  # the step it was at

  resumed = run(train_cmd(workdir))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from step {max(saved)}" in resumed.stdout
  ref, got = read_state(tmp_path / "ref", 40), read_state(workdir, 40)
  assert ref.keys() == got.keys() and len(ref) > 10
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k],
                                  err_msg=f"{k}, killed at step {killed_at}, SIGTERM at {max(saved)}")

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

  # The workdir now holds a 2-layer model's checkpoints: a 3-layer config is refused.
  out = run(train_cmd(workdir, "--config.model.num_layers=3"))
  assert out.returncode != 0
  assert "belongs to another model" in out.stderr and "num_layers" in out.stderr

  # A second train.py while a run holds the workdir is refused, naming the holder.
  from vit_jax.train import workdir_lock
  with workdir_lock.hold(str(workdir)):
    out = run(train_cmd(workdir))
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert f"is in use by another run (process {os.getpid()} on " in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("flag,message", [
    ("--config.nosuchkey=1", r"unknown config key 'nosuchkey'.*Valid keys: .*batch_size"),
    ("--config.model.name=ViT-Q/2", r"unknown model name 'ViT-Q/2'.*ViT-B/16"),
    ("--config.pp_train=decode|blur(3)", r"unknown preprocessing op 'blur'.*valid ops.*flip_lr"),
    ("--config.dataset=no_such_dataset", r"unknown dataset 'no_such_dataset'"),
    ("--config.image_size=16", r"'image' of shape \(64, 8, 8, 1\) does not fit this model: it "
                               r"takes \(batch, 16, 16, 1\)"),
    ("--xla_preset=fastest", r"--xla_preset 'fastest' is not one of \['cpu', 'none'\]"),
])
def test_bad_input_exits_with_a_clear_message(tmp_path, flag, message):
  out = run(train_cmd(tmp_path, flag, "--config.total_steps=2"))
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  import re
  assert re.search(message, out.stderr), out.stderr[-2000:]


HALF_SAVE = """
import os
from tests.train_configs import tiny_config
from vit_jax.train import checkpointing, trainer
setup = trainer.make_setup(tiny_config())
state = setup.init_state()
ckpt = checkpointing.Checkpointer({directory!r}, keep=5)
meta = {{"signature": setup.task.signature(), "step": 5}}
ckpt.save(5, state, meta)
ckpt.wait()
ckpt.save(10, state, dict(meta, step=10))  # asynchronous: still writing when the process dies
os._exit(1)
"""


def test_checkpoint_half_written_when_the_process_died_is_never_loaded(tmp_path):
  directory = tmp_path / "checkpoints"
  out = subprocess.run([sys.executable, "-c", HALF_SAVE.format(root=ROOT, directory=str(directory))],
                       env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  leftovers = [d for d in os.listdir(directory) if d.startswith("10")]
  assert leftovers and all("tmp" in d for d in leftovers), os.listdir(directory)
  from tests.train_configs import tiny_config
  from vit_jax.train import checkpointing, trainer
  ckpt = checkpointing.Checkpointer(str(directory), keep=5)
  assert ckpt.latest_step() == 5
  setup = trainer.make_setup(tiny_config())
  state, meta = ckpt.restore(setup.sharded_abstract_state(), setup.task.signature())
  assert meta["step"] == 5 and int(state.step) == 0
  ckpt.close()
