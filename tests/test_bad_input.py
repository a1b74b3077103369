"""Bad files and command lines: each a non-zero exit with one message naming the culprit and what
would be valid, never a traceback. (Bad config values: tests/test_bad_config.py; more command
lines: tests/test_cli.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.train_configs import tiny_config
from vit_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs/default.py")


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"))


COMMAND_LINES = [
    (["train.py", "--workdir", "W"], r"^error: flag --config=None: Flag --config must have a value"),
    (["train.py", "--config", DEFAULT, "--workdir", "W", "--nosuchflag=1"],
     r"^error: Unknown command line flag 'nosuchflag'"),
    (["train.py", "--config", "configs/nosuch.py", "--workdir", "W"],
     r"^error: --config file 'configs/nosuch.py' does not exist; the configs here: .*configs/default.py"),
    (["train.py", "--config", DEFAULT + ":big", "--workdir", "W"],
     r"^error: --config=.*default.py:big: configs/default.py takes no argument .*got .big.$"),
    (["train.py", "--config", DEFAULT, "--workdir", "W", "extra"],
     r"^error: unexpected arguments \['extra'\]: train.py takes only flags"),
    (["train.py", "--config", DEFAULT], r"^error: --workdir is required \(except with --dry_run\)"),
    (["train.py", "--config", DEFAULT, "--workdir", "W", "--config.total_steps=abc"],
     r"^error: flag --config.total_steps=abc: invalid literal for int\(\)"),
    (["evaluate.py", "--config", DEFAULT], r"^error: give --workdir \(latest checkpoint\) or --checkpoint PATH"),
    (["evaluate.py", "--config", DEFAULT, "--checkpoint", "/nope/7"],
     r"^error: /nope/7 is not a checkpoint step directory \(DIR/checkpoints/<step>\)"),
]


@pytest.mark.parametrize("args,message", COMMAND_LINES,
                         ids=[re.sub(r"\W+", "_", " ".join(a[:1] + a[3:]))[:60] for a, _ in COMMAND_LINES])
def test_a_bad_command_line_is_one_error_line(tmp_path, args, message):
  out = run(*[str(tmp_path / "w") if a == "W" else a for a in args])
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.strip() and "port.cc" not in l and "InitializeLog" not in l]
  assert len(lines) == 1 and re.search(message, lines[0]), out.stderr[-2000:]


def test_a_workdir_that_is_a_file_through_train_py(tmp_path):
  (tmp_path / "afile").write_text("x")
  out = run("train.py", "--config", DEFAULT, "--workdir", str(tmp_path / "afile"))
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: --workdir {tmp_path / 'afile'} is a file, not a directory: give a directory "
      "(created if missing)")


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory on a read-only tmpfs (permissions alone do not stop root)."""
  path = tmp_path / "ro"
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                           capture_output=True, text=True)
  if mounted.returncode != 0:  # not root: a directory without write permission does it
    os.chmod(path, 0o555)
  yield path
  if mounted.returncode == 0:
    subprocess.run(["umount", str(path)], check=True)


def test_bad_files_are_refused_with_their_names(tmp_path, read_only_dir):
  (tmp_path / "weights.txt").write_text("not weights")
  good = _npz(tmp_path / "good.npz", a=np.ones((64, 64), np.float32))
  data = open(good, "rb").read()
  (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
  (tmp_path / "afile").write_text("x")
  folder = tmp_path / "images"
  for split in ("train", "test"):
    for c in ("a", "b"):
      (folder / split / c).mkdir(parents=True)
      from PIL import Image
      for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / split / c / f"{i}.png")
  (folder / "train" / "b" / "broken.png").write_text("this is text, not a PNG")
  cases = [
      (dict(pretrained=str(tmp_path / "weights.txt")),
       rf"'{tmp_path}/weights.txt' is not a checkpoint: expected an .npz of arrays"),
      (dict(pretrained=str(tmp_path / "cut.npz")),
       rf"'{tmp_path}/cut.npz' is a damaged or truncated zip archive"),
      (dict(dataset=f"imagefolder:{folder}", num_classes=2, image_size=8,
            pp_train="decode|resize(8)|value_range(-1, 1)|onehot(2)|keep('image', 'labels')",
            batch_size=16, **{"model.channels": 3, "model.patch_size": 4}),
       rf"cannot decode.*{folder}/train/b/broken.png.*as an image: it is not a JPEG, PNG, GIF or BMP"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      trainer.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "w"))
  with pytest.raises(ValueError, match=rf"--workdir {tmp_path}/afile is a file, not a directory"):
    trainer.train_and_evaluate(tiny_config(), str(tmp_path / "afile"))
  with pytest.raises(ValueError, match=rf"--workdir {read_only_dir}/w cannot be written "
                                       r"\((Read-only file system|Permission denied)\)"):
    trainer.train_and_evaluate(tiny_config(), str(read_only_dir / "w"))
