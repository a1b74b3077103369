"""Start-up time: seconds from launching ``train.py`` to its first logged training step.

  python bench/first_step.py --json results/first_step.json

Writes a small folder of JPEGs, launches ``python train.py --config configs/bench_vit_b16.py:FOLDER``
(ViT-B/16, 224 px, batch 8) as a fresh process, and stops it once it prints step 1: the time covers
interpreter start, imports, data pipeline, parameter initialisation, compilation and the first step.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (bench/, beside this script)

STEP_LINE = re.compile(r"\b1/(\d+) loss (\S+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/bench_vit_b16.py",
                 help="config file taking the image folder as its argument (default: %(default)s)")
  p.add_argument("--override", action="append", metavar="KEY=VALUE", default=[],
                 help="extra --config.KEY=VALUE for train.py, repeatable (e.g. model.scan=True)")
  p.add_argument("--num-images", type=int, default=32, help="JPEGs per split")
  p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
  p.add_argument("--json", default=None, help="write the results here")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  from input_pipeline import write_jpegs

  with tempfile.TemporaryDirectory() as tmp:
    images = os.path.join(tmp, "images")
    for split in ("train", "test"):
      write_jpegs(os.path.join(tmp, "split_" + split), num_images=args.num_images, width=320, height=240,
                  num_classes=10)
      os.makedirs(images, exist_ok=True)
      os.rename(os.path.join(tmp, "split_" + split, "train"), os.path.join(images, split))
    cmd = [sys.executable, "train.py", "--config", f"{args.config}:{images}",
           "--workdir", os.path.join(tmp, "workdir")] + [f"--config.{o}" for o in args.override]
    lines: list[str] = []
    seconds, loss = None, None
    with harness.LoadMonitor(probe_s=harness.IDLE_PROBE_S) as load:
      start = time.perf_counter()
      proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      try:
        for line in proc.stdout:
          lines.append(line.rstrip())
          match = STEP_LINE.search(line)
          if match:
            seconds, loss = time.perf_counter() - start, float(match.group(2))
            break
          if time.perf_counter() - start > args.timeout:
            break
      finally:
        proc.terminate()
        try:
          proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
  if seconds is None:
    raise RuntimeError("train.py did not log its first step:\n" + "\n".join(lines[-40:]))
  print(f"train.py {args.config} {' '.join(args.override)}: first step logged {seconds:.1f} s after "
        f"launch (loss {loss:.4f})")
  print(load.verdict())
  record = {"script": "first_step", "args": vars(args), "seconds_to_first_step": seconds,
            "first_loss": loss, "command": " ".join(cmd), "load": load.report(),
            "environment": harness.environment()}
  harness.write_json(args.json, record)
  return record


if __name__ == "__main__":
  main()
