"""Input-pipeline speed: images/s per CPU core of the real tf.data training pipeline.

  python bench/input_pipeline.py --cores 1,2 --json results/input_pipeline.json

Writes ImageNet-like JPEGs (500x375, quality 90) into an image folder, then runs
``vit_jax.data.train_batches`` over it with the ImageNet training preprocessing (JPEG decode,
Inception crop to 224, random flip, value range [-1, 1], one-hot labels), each core count in a
fresh process pinned to that many cores. Divide an accelerator's training img/s (bench/train_step.py)
by the img/s per core here to get the cores needed to feed it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (bench/, beside this script)

PP = ("decode|inception_crop({size})|flip_lr|value_range(-1, 1)|onehot({classes})"
      "|keep('image', 'labels')")


def write_jpegs(root: str, *, num_images: int, width: int, height: int, num_classes: int,
                quality: int = 90, seed: int = 0) -> None:
  """``num_images`` smooth random RGB JPEGs in ``root/train/class_<k>/`` (natural-image-like sizes:
  upsampled low-resolution colour fields plus fine noise)."""
  import numpy as np

  from vit_jax.data.tf_runtime import import_tf

  tf = import_tf()
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    folder = os.path.join(root, "train", f"class_{i % num_classes}")
    os.makedirs(folder, exist_ok=True)
    coarse = rng.uniform(0, 255, (1, height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    image = tf.image.resize(coarse, (height, width), method="bicubic")[0].numpy()
    image += rng.normal(0, 12, image.shape)
    data = tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=quality)
    with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
      f.write(data.numpy())


def run_worker(args: argparse.Namespace) -> dict:
  harness.pin_cores(args.worker_cores)
  from vit_jax import data

  pp = PP.format(size=args.image_size, classes=args.num_classes)
  batches = data.train_batches(dataset=f"imagefolder:{args.root}", split="train", pp=pp,
                               batch_size=args.batch, seed=0, shuffle_buffer=args.num_images)
  for _ in range(args.warmup):
    next(batches)
  t = time.perf_counter()
  for _ in range(args.batches):
    batch = next(batches)
  seconds = time.perf_counter() - t
  shape = list(batch["image"].shape)
  return {"cores": args.worker_cores, "img_per_s": args.batch * args.batches / seconds,
          "seconds": seconds, "batch_shape": shape, "versions": harness.environment()["versions"]}


def run_driver(args: argparse.Namespace) -> dict:
  rows, runs = [], []
  with tempfile.TemporaryDirectory() as tmp:
    root = args.root or os.path.join(tmp, "images")
    if not args.root:
      t = time.perf_counter()
      write_jpegs(root, num_images=args.num_images, width=args.width, height=args.height,
                  num_classes=args.num_classes)
      print(f"wrote {args.num_images} JPEGs ({args.width}x{args.height}) in {time.perf_counter() - t:.1f} s")
    with harness.LoadMonitor(probe_s=harness.IDLE_PROBE_S) as load:
      for cores in (int(c) for c in args.cores.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker-cores", str(cores), "--root", root,
               "--image-size", str(args.image_size), "--batch", str(args.batch),
               "--batches", str(args.batches), "--warmup", str(args.warmup),
               "--num-classes", str(args.num_classes), "--num-images", str(args.num_images)]
        result = harness.run_worker_process(cmd, f"with {cores} cores", cwd=ROOT)
        runs.append(result)
        rows.append({"cores": cores, "img_per_s": result["img_per_s"],
                     "img_per_s_per_core": result["img_per_s"] / cores})
  print(f"tf.data training pipeline, {args.width}x{args.height} JPEGs -> {args.image_size} px: "
        "decode, inception crop, flip, value range")
  print(harness.format_table(rows, ["cores", "img_per_s", "img_per_s_per_core"]))
  print(load.verdict())
  record = {"script": "input_pipeline", "args": vars(args), "pp": PP.format(size=args.image_size,
            classes=args.num_classes), "results": rows, "runs": runs, "load": load.report(),
            "environment": harness.environment()}
  harness.write_json(args.json, record)
  return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cores", default=",".join(str(c) for c in range(1, len(os.sched_getaffinity(0)) + 1)),
                 help="comma-separated core counts to measure (default: %(default)s)")
  p.add_argument("--num-images", type=int, default=512, help="JPEGs to write (default: %(default)s)")
  p.add_argument("--width", type=int, default=500)
  p.add_argument("--height", type=int, default=375)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--image-size", type=int, default=224, help="output size of the crop")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=20, help="timed batches per core count")
  p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
  p.add_argument("--root", default=None, help="use this existing image folder instead of writing one")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--worker-cores", type=int, default=0, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  return harness.worker_or_driver(args, bool(args.worker_cores), run_worker, run_driver)


if __name__ == "__main__":
  main()
