"""Shape buckets against one square canvas: padding and input-pipeline speed of a COCO recipe.

  python bench/detection_buckets.py --config detr_r50_coco --rounds 3 --json results/detection_buckets.json

Writes a COCO-format folder of JPEGs in COCO's common sizes (``SIZES``, a synthetic mix: there is
no COCO here), then alternates, in one process, the recipe's training pipeline with its shape
buckets (``detection.buckets``) and with none (every image padded to ``detection.canvas``). For each
it reports the training batches' real pixels (the mean of ``pixel_mask``: what the model computes
on that is not padding), the pixels per batch, and the pipeline's images/s on this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (bench/, beside this script)

# (height, width) and share of the images: landscape 4:3 and 3:2 dominate COCO, then upright,
# square and 16:9 images.
SIZES = {(480, 640): 0.40, (427, 640): 0.20, (640, 480): 0.15, (640, 427): 0.05,
         (640, 640): 0.10, (360, 640): 0.10}


def write_folder(root: str, num_images: int, seed: int = 0) -> str:
  """A COCO annotation file and ``num_images`` smooth random JPEGs (two boxes each); returns the
  dataset name."""
  import numpy as np

  from vit_jax.data.tf_runtime import import_tf

  tf = import_tf()
  rng = np.random.default_rng(seed)
  sizes = list(SIZES)
  picks = rng.choice(len(sizes), num_images, p=list(SIZES.values()))
  images, annotations = [], []
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  for i, k in enumerate(picks):
    h, w = sizes[k]
    coarse = rng.uniform(0, 255, (1, h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    pixels = tf.image.resize(coarse, (h, w), method="bicubic")[0].numpy()
    name = f"{i:06d}.jpg"
    with open(os.path.join(root, "images", name), "wb") as f:
      f.write(tf.io.encode_jpeg(np.clip(pixels, 0, 255).astype(np.uint8), quality=90).numpy())
    images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    for j in range(2):
      annotations.append({"id": 2 * i + j + 1, "image_id": i + 1, "category_id": 1 + j,
                          "bbox": [w * 0.1 * (j + 1), h * 0.1, w * 0.3, h * 0.4], "iscrowd": 0})
  content = {"images": images, "annotations": annotations,
             "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
  with open(os.path.join(root, "instances.json"), "w") as f:
    json.dump(content, f)
  return f"coco:{root}/instances.json,{root}/images"


def measure(config, dataset: str, bucketed: bool, batches: int, warmup: int) -> dict:
  """Pixels and images/s of ``batches`` training batches after ``warmup``."""
  import numpy as np

  from vit_jax import data
  from vit_jax.tasks.detection import shape_buckets

  c = config.copy_and_resolve_references()
  if not bucketed:
    c.detection.buckets = ()
  it = data.train_batches(dataset=dataset, split="train", pp=c.pp_train, batch_size=c.batch_size,
                          seed=0, shuffle_buffer=c.shuffle_buffer, num_shards=1,
                          process_index=0, process_count=1, buckets=shape_buckets(c, c.pp_train))
  for _ in range(warmup):
    next(it)
  real = total = 0
  shapes = set()
  t = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    real += float(np.asarray(b["pixel_mask"]).sum())
    total += b["pixel_mask"].size
    shapes.add(tuple(b["image"].shape[1:3]))
  seconds = time.perf_counter() - t
  return {"img_per_s": batches * c.batch_size / seconds, "real_pixel_fraction": real / total,
          "pixels_per_image": total / (batches * c.batch_size), "shapes": sorted(shapes)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="detr_r50_coco", choices=["detr_r50_coco", "yolos_ti_coco"])
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--batch", type=int, default=4, help="the pipeline's batch (the recipe's is larger)")
  p.add_argument("--batches", type=int, default=25)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--json", default=None)
  args = p.parse_args()
  from configs import detection

  config = detection.get_config(args.config)
  config.batch_size = args.batch
  config.shuffle_buffer = args.images
  samples = {True: [], False: []}
  with tempfile.TemporaryDirectory() as tmp, harness.LoadMonitor(probe_s=harness.IDLE_PROBE_S) as load:
    dataset = write_folder(tmp, args.images)
    for r in range(args.rounds):
      for bucketed in ((True, False) if r % 2 == 0 else (False, True)):
        result = measure(config, dataset, bucketed, args.batches, args.warmup)
        samples[bucketed].append(result)
        print(f"round {r} {'buckets' if bucketed else 'one canvas':10s} {result['img_per_s']:7.1f} img/s, "
              f"real pixels {100 * result['real_pixel_fraction']:.1f}%, "
              f"{result['pixels_per_image'] / 1e6:.2f} Mpixel per image", flush=True)
  rows = []
  for bucketed in (True, False):
    s = samples[bucketed]
    rows.append({"pipeline": "buckets" if bucketed else "one canvas",
                 "img_per_s": statistics.median(x["img_per_s"] for x in s),
                 "real_pixels_pct": 100 * statistics.median(x["real_pixel_fraction"] for x in s),
                 "mpixel_per_image": statistics.median(x["pixels_per_image"] for x in s) / 1e6,
                 "shapes": len(set().union(*[x["shapes"] for x in s]))})
  print(harness.format_table(rows, ["pipeline", "img_per_s", "real_pixels_pct", "mpixel_per_image", "shapes"]))
  harness.write_json(args.json, {"script": "detection_buckets", "args": vars(args), "results": rows,
                                 "load": load.report(), "environment": harness.environment()})


if __name__ == "__main__":
  main()
