"""Classify images: python predict.py --checkpoint PATH [--model NAME] [--json OUT] IMAGE...

PATH is a released .npz (original ViT or big_vision), a timm .safetensors / torch file, or a
checkpoint of this library's trainer (a workdir, its checkpoints/ directory or one step). The
model is read from the checkpoint when --model is not given. Prints the top-5 classes of each
image with their names: ImageNet-1k / -21k names for 1,000 / 21,843-class checkpoints, a
dataset's names with --labels DATASET (a TFDS name or imagefolder:/root) or --labels FILE (one
name per line); class indices otherwise. Takes train.py's process flags too (--xla_preset,
--host_memory, --fake_devices; vit_jax/command_line.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from absl import app, logging

from vit_jax import command_line  # imports no JAX: the process is set up in __main__ first

command_line.define_process_flags()  # --xla_preset, --host_memory, --fake_devices (absl parses them)

SIZE_OPTIONS = ("hidden_size", "num_layers", "num_heads", "mlp_dim")


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


def load_image(path: str, size: int, channels: int) -> np.ndarray:
  """An image file resized to size x size (bilinear), values in [-1, 1], HWC."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      im = im.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
      x = np.asarray(im, np.float32)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read the image {path!r}: {e}") from None
  x = x.reshape(size, size, channels)
  return x / 127.5 - 1.0


def model_spec(args: argparse.Namespace):
  """(ModelSpec, Checkpoint): read from the checkpoint, with --model / --num_classes overriding."""
  from vit_jax import checkpoints, models
  from vit_jax.checkpoints import readers
  try:
    spec, ckpt = checkpoints.infer_model(args.checkpoint)
  except checkpoints.CheckpointNotFoundError:
    raise
  except checkpoints.CheckpointError:
    if not args.model:
      raise
    spec, ckpt = None, readers.read(args.checkpoint)
  if not args.model:
    return spec, ckpt
  same_family = spec is not None and models.resolve(spec.name)[0] is models.resolve(args.model)[0]
  num_classes = args.num_classes or (spec.num_classes if spec else None)
  if not num_classes:
    raise ValueError(f"cannot read the number of classes from {args.checkpoint!r}; pass --num_classes")
  # The name fixes the sizes; options such as the classifier still come from the checkpoint.
  overrides = {k: v for k, v in spec.overrides.items() if k not in SIZE_OPTIONS} if same_family else {}
  return checkpoints.ModelSpec(args.model, num_classes, spec.image_size if spec else 224,
                               overrides), ckpt


def predict(argv: list[str]) -> list[dict]:
  args = parse_args(argv)
  from vit_jax import checkpoints, models
  spec, ckpt = model_spec(args)
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
  try:
    predict(sys.argv[1:] if argv is None else argv)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parses the process flags; predict's own options (and --help) are left to parse_args."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    parse_args(["--help"])  # prints the options and the process flags, and exits
  return command_line.parse_flags(argv, known_only=True)


def _run(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)  # as before app.run: no INFO lines from the libraries
  return main(argv[1:])  # argv: the program, then what absl left


if __name__ == "__main__":
  command_line.prepare_process(sys.argv)  # before JAX starts; may re-execute this program
  app.run(_run, flags_parser=_parse_flags)
