"""Export a checkpoint for serving: python export.py --checkpoint PATH [--model NAME] --format stablehlo|savedmodel|onnx|timm --out PATH

PATH is anything predict.py reads: a workdir or DIR/checkpoints/<step> of this trainer, a
released .npz, a timm .safetensors / torch file. The model name, classes and size come from the
checkpoint when it records them, else from --model / --num_classes / --image_size.

  stablehlo   OUT: jax.export's serialised module, the parameters baked in; call it with
              jax.export.deserialize(open(OUT, "rb").read()).call(images). OUT.json says what
              goes in and out (shapes, normalisation, class names).
  savedmodel  OUT/: a TensorFlow SavedModel (jax2tf), signature serving_default(images=...).
  onnx        OUT: an ONNX graph of the JAX computation (opset 18) for onnxruntime:
              onnxruntime.InferenceSession(OUT).run(None, {"images": images}).
  timm        OUT/: model.safetensors and config.json for
              timm.create_model("local-dir:OUT", pretrained=True) (ViT, hybrid, Mixer, TNT, BiT).

The graph formats take float32 NHWC images normalised as OUT.json says, with any batch size
(--batch dynamic) or a fixed one; with --with_preprocessing they take uint8 images of
--input_size and resize, centre-crop (as timm does with --crop_pct; no crop without it) and
normalise them themselves. They return {"logits"}; a detector's (YOLOS, DETR) take images, a
pixel_mask and image_sizes (each original height, width) and return HF's raw "logits" and
"pred_boxes" and the post-processed "scores", "labels" and pixel "boxes" of every query. Takes
train.py's process flags too (vit_jax/command_line.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from vit_jax import command_line  # imports no JAX: the process is set up in __main__ first

command_line.define_process_flags()  # --xla_preset, --host_memory, --fake_devices, --cpu_matmul

FORMATS = ("stablehlo", "savedmodel", "onnx", "timm")  # vit_jax.export.FORMATS, without importing JAX


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=command_line.process_flags_help())
  p.add_argument("--checkpoint", required=True, help="checkpoint file or directory")
  p.add_argument("--format", required=True, help=" | ".join(FORMATS))
  p.add_argument("--out", required=True, help="the file (stablehlo) or folder to write")
  p.add_argument("--model", help="model name (default: read from the checkpoint), e.g. ViT-B/16")
  p.add_argument("--image_size", help="the model's resolution S (a detector's H,W); default: "
                                      "the checkpoint's")
  p.add_argument("--num_classes", type=int, help="classes (default: the checkpoint's head)")
  p.add_argument("--batch", default="dynamic",
                 help="batch size of the graph formats: N, or 'dynamic' (default: any size)")
  p.add_argument("--with_preprocessing", action="store_true",
                 help="bake resize, centre crop and normalisation in: the artifact takes uint8 "
                      "images of --input_size")
  p.add_argument("--input_size", help="S or H,W of the uint8 images --with_preprocessing takes "
                                      "(default: the model's size / crop_pct)")
  p.add_argument("--crop_pct", type=float,
                 help="timm's eval crop fraction, for --with_preprocessing and timm's config "
                      "(default: none, 1.0)")
  p.add_argument("--normalize", choices=("minus_one_one", "imagenet"),
                 help="pixel scaling: minus_one_one ([-1, 1], this trainer's and predict.py's; "
                      "default) or imagenet mean/std")
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 help="compute dtype of the exported graph (default: the checkpoint's; onnx needs "
                      "float32, which onnxruntime's CPU kernels implement)")
  p.add_argument("--labels", help="class names: imagenet1k | imagenet21k | a TFDS dataset name | "
                                  "imagefolder:/root | a text file (default: the checkpoint's)")
  p.add_argument("--platforms", help="stablehlo/savedmodel: backends to lower for, e.g. cpu,cuda "
                                     "(default: this machine's)")
  return p.parse_args(argv)


def _size(text: str | None, option: str) -> tuple[int, int] | None:
  if text is None:
    return None
  try:
    size = tuple(int(v) for v in text.split(","))
    assert len(size) in (1, 2) and min(size) > 0
  except (ValueError, AssertionError):
    raise ValueError(f"{option} {text!r}: give S or H,W, e.g. 224 or 800,1333") from None
  return size * 2 if len(size) == 1 else size


def _batch(text: str) -> int | None:
  if text == "dynamic":
    return None
  try:
    batch = int(text)
    assert batch > 0
  except (ValueError, AssertionError):
    raise ValueError(f"--batch {text!r}: give a positive batch size or 'dynamic'") from None
  return batch


def run(argv: list[str]) -> list[str]:
  """export.py on ``argv``; returns the paths written."""
  args = parse_args(argv)
  from vit_jax.kernels import blas  # pylint: disable=g-import-not-at-top  (after the set-up)
  blas.select("xla")  # a serialized program cannot carry the CPU BLAS custom call (--cpu_matmul)
  if args.format not in FORMATS:
    raise ValueError(f"--format {args.format!r} is not one of {', '.join(FORMATS)}")
  batch = _batch(args.batch)
  image_size = _size(args.image_size, "--image_size")
  input_size = _size(args.input_size, "--input_size")
  if args.format == "timm" and (args.with_preprocessing or input_size):
    raise ValueError("--format timm does not bake in preprocessing: timm builds its own from "
                     "config.json (crop_pct, mean, std, interpolation); drop --with_preprocessing")
  if args.format == "timm" and (args.batch != "dynamic" or args.platforms):
    raise ValueError("--format timm writes weights: --batch and --platforms do not apply")
  if input_size and not args.with_preprocessing:
    raise ValueError("--input_size is the size of the uint8 images --with_preprocessing takes; "
                     "give --with_preprocessing too (the model's own size: --image_size)")

  from predict import class_names  # pylint: disable=g-import-not-at-top  (the same class names)
  from vit_jax import export as exporting  # pylint: disable=g-import-not-at-top
  model, serving, ckpt = exporting.load_checkpoint(
      args.checkpoint, args.model, image_size=image_size, num_classes=args.num_classes,
      normalize=args.normalize, dtype=args.dtype)
  if args.crop_pct is not None:
    serving = dataclasses.replace(serving, crop_pct=args.crop_pct)
  if args.labels or serving.class_names is None:
    try:
      names = class_names(args.labels, serving.num_classes, ckpt.meta)
    except Exception as e:  # pylint: disable=broad-except
      if args.labels:
        raise
      print(f"note: no class names ({e})", file=sys.stderr)
      names = None
    serving = dataclasses.replace(serving, class_names=tuple(names) if names else None)
  platforms = tuple(args.platforms.split(",")) if args.platforms else None
  written = exporting.export(model, serving, args.format, args.out, batch=batch,
                             preprocess=args.with_preprocessing,
                             input_size=input_size,
                             platforms=platforms)
  print(f"{serving.model_name} ({serving.num_classes} classes, {serving.image_size[0]}x"
        f"{serving.image_size[1]}) from {ckpt.path} as {args.format}:")
  for path in written:
    print(f"  {path}")
  return written


def main(argv: list[str] | None = None) -> int:
  return command_line.exit_code(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  command_line.run_argparse_script(main, parse_args)
