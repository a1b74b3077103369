"""Classify images or detect objects: python predict.py --checkpoint PATH [--model NAME] [--json OUT] IMAGE...

PATH is a released .npz (original ViT or big_vision), a timm .safetensors / torch file, or a
checkpoint of this library's trainer (a workdir, its checkpoints/ directory or one step). The
model is read from the checkpoint when --model is not given. Prints the top-5 classes of each
image with their names: ImageNet-1k / -21k names for 1,000 / 21,843-class checkpoints, a
dataset's names with --labels DATASET (a TFDS name or imagefolder:/root) or --labels FILE (one
name per line); class indices otherwise. Detection checkpoints (this trainer's, of configs/detection.py; or YOLOS / DETR files with --model):
prints label, score and pixel box of every detection above --threshold, writes the image with its
boxes drawn to --out DIR (one PNG per input) and, with --json, the detections in COCO results format
(image_id: the input's position). Takes train.py's process flags too (--xla_preset,
--host_memory, --fake_devices; vit_jax/command_line.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from vit_jax import command_line  # imports no JAX: the process is set up in __main__ first
from vit_jax.data.image_files import fit_to_canvas, load_image  # PIL and numpy only

command_line.define_process_flags()  # --xla_preset, --host_memory, --fake_devices, --cpu_matmul

SIZE_OPTIONS = ("hidden_size", "num_layers", "num_heads", "mlp_dim")
DETECTORS = ("YOLOS", "DETR")  # model families predict.py runs as detectors


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=command_line.process_flags_help())
  p.add_argument("images", nargs="+", metavar="IMAGE", help="jpg/png files")
  p.add_argument("--checkpoint", required=True, help="checkpoint file or directory")
  p.add_argument("--model", help="model name (default: read from the checkpoint), e.g. ViT-B/16")
  p.add_argument("--image_size", type=int, help="resolution (default: the checkpoint's)")
  p.add_argument("--num_classes", type=int, help="classes (default: the checkpoint's head)")
  p.add_argument("--labels", help="imagenet1k | imagenet21k | a TFDS dataset name | "
                                  "imagefolder:/root | a text file with one class name per line")
  p.add_argument("--top_k", type=int, default=5)
  p.add_argument("--json", metavar="OUT", help="also write the predictions to this JSON file")
  p.add_argument("--threshold", type=float, default=0.5,
                 help="detection: the lowest score printed and drawn (default 0.5)")
  p.add_argument("--out", metavar="DIR", help="detection: write each image with its boxes here")
  p.add_argument("--canvas", help="detection: HEIGHT,WIDTH the image is fitted and padded to "
                                  "(default: the checkpoint's; 800,1333 for files without one)")
  p.add_argument("--normalize", choices=("minus_one_one", "imagenet"),
                 help="detection: pixel scaling; default minus_one_one for this trainer's "
                      "checkpoints (value_range(-1, 1)), imagenet mean/std for released files")
  return p.parse_args(argv)


def class_names(labels: str | None, num_classes: int, meta: dict) -> list[str] | None:
  """Names for the classes, or None (print indices)."""
  from vit_jax.data import imagenet_labels
  source = labels or meta.get("dataset")
  if source is None:
    return imagenet_labels.imagenet_names(num_classes)
  if source in imagenet_labels.SUBSETS:
    names = imagenet_labels.imagenet_names(imagenet_labels.SUBSETS[source])
    if names is None:
      print("note: ImageNet class names come from the timm package's files; install timm to "
            "see them (printing class indices)", file=sys.stderr)
  elif os.path.isfile(source):
    with open(source) as f:
      names = [line.strip() for line in f if line.strip()]
  else:
    from vit_jax import data
    names = data.dataset_info(source).class_names
  if names is not None and len(names) != num_classes:
    raise ValueError(f"--labels {source!r} has {len(names)} classes, the checkpoint {num_classes}")
  return names


def model_spec(args: argparse.Namespace):
  """(ModelSpec, Checkpoint): read from the checkpoint, with --model / --num_classes overriding."""
  from vit_jax.checkpoints import loading
  return loading.resolve_model(args.checkpoint, args.model, args.num_classes, SIZE_OPTIONS)


def detect(args: argparse.Namespace, spec, ckpt) -> list[dict]:
  """predict.py for detectors (see the module docstring)."""
  import jax.numpy as jnp
  from vit_jax import checkpoints, models
  import importlib
  from vit_jax.detection import draw
  postprocess = importlib.import_module("vit_jax.detection.postprocess")
  if args.canvas:
    try:
      canvas = tuple(int(v) for v in args.canvas.split(","))
      assert len(canvas) == 2 and min(canvas) > 0
    except (ValueError, AssertionError):
      raise ValueError(f"--canvas {args.canvas!r}: give HEIGHT,WIDTH, e.g. 800,1333") from None
  elif isinstance(spec.image_size, tuple):
    canvas = spec.image_size
  else:
    canvas = (800, 1333)
  model = models.create(spec.name, num_classes=spec.num_classes, image_size=canvas,
                        **spec.overrides)
  checkpoints.load_pretrained(model, ckpt)
  channels = model.config.channels
  normalize = args.normalize or ("minus_one_one" if ckpt.container == "orbax" else "imagenet")
  names = class_names(args.labels, spec.num_classes, ckpt.meta) if (
      args.labels or ckpt.meta.get("dataset")) else None
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  results, coco = [], []
  print(f"{spec.name} ({spec.num_classes} classes, canvas {canvas[0]}x{canvas[1]}) from {ckpt.path}")
  for index, path in enumerate(args.images):
    original, x, mask = fit_to_canvas(path, canvas, channels, normalize)
    outputs = model(jnp.asarray(x[None]), pixel_mask=jnp.asarray(mask[None]))
    found = postprocess.select_detections(
        postprocess.postprocess(outputs, jnp.asarray([original.shape[:2]])), args.threshold)[0]
    order = np.argsort(-found["scores"], kind="stable")
    found = {k: v[order] for k, v in found.items()}
    label = lambda i: names[int(i)] if names else str(int(i))
    print(f"{path}: {len(order)} detections above {args.threshold}")
    for score, cls, box in zip(found["scores"], found["labels"], found["boxes"]):
      x0, y0, x1, y1 = (float(v) for v in box)
      print(f"  {label(cls):>12} {score:6.3f}  box ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f})")
      coco.append({"image_id": index, "file_name": path, "category_id": int(cls),
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    results.append({"image": path, "detections": [
        {"label": label(c), "index": int(c), "score": float(s), "box": [float(v) for v in b]}
        for s, c, b in zip(found["scores"], found["labels"], found["boxes"])]})
    if args.out:
      name = os.path.splitext(os.path.basename(path))[0] + ".png"
      draw.draw_detections(original, found["boxes"], found["scores"], found["labels"],
                           names).save(os.path.join(args.out, name))
  if args.out:
    print(f"images with their boxes written to {args.out}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(coco, f, indent=2)
  return results


def predict(argv: list[str]) -> list[dict]:
  args = parse_args(argv)
  from vit_jax import checkpoints, models
  spec, ckpt = model_spec(args)
  if spec.task == "detection" or models.resolve(spec.name)[0].name in DETECTORS:
    return detect(args, spec, ckpt)
  if not spec.num_classes:
    raise ValueError(f"{ckpt.path!r} has no classification head: nothing to predict with")
  size = args.image_size or spec.image_size
  model = models.create(spec.name, num_classes=spec.num_classes, image_size=size, **spec.overrides)
  checkpoints.load_pretrained(model, ckpt)
  channels = model.config.channels if hasattr(model, "config") else 3
  batch = np.stack([load_image(p, size, channels) for p in args.images])
  logits = np.asarray(model(batch), np.float64)
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  names = class_names(args.labels, spec.num_classes, ckpt.meta)
  k = min(args.top_k, spec.num_classes)
  results = []
  for path, p in zip(args.images, probs):
    top = np.argsort(-p, kind="stable")[:k]
    results.append({"image": path, "top": [
        {"index": int(i), "label": names[i] if names else str(int(i)), "probability": float(p[i])}
        for i in top]})
  options = "".join(f", {k}={v}" for k, v in sorted(spec.overrides.items()))
  print(f"{spec.name} ({spec.num_classes} classes, {size} px{options}) from {ckpt.path}")
  for r in results:
    print(r["image"])
    for rank, t in enumerate(r["top"], 1):
      print(f"  {rank}. {t['probability']:7.2%}  {t['label']}" + (f"  [{t['index']}]" if names else ""))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


def main(argv: list[str] | None = None) -> int:
  return command_line.exit_code(predict, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  command_line.run_argparse_script(main, parse_args)
