"""Look inside a model: python visualize.py --checkpoint PATH --images a.png [b.jpg ...] --out DIR

PATH is anything predict.py takes (a workdir of this trainer, one of its checkpoints, a released
.npz, a timm file; --model NAME where the file does not say); --workdir DIR is the same as
--checkpoint DIR (with --config FILE[:ARG], as evaluate.py takes them, checked against the
checkpoint). Writes to DIR, per input image (STEM: its file name without extension):

  classifiers (ViT, hybrids, TNT)
    STEM_rollout.png   the image, the attention rollout and the gradient-weighted rollout of the
                       predicted class laid over it (vit_jax/attention_maps/rollout.py)
    STEM_heads.png     one tile per layer and head: the class token's attention over the patches
                       (gap / map models: the patch queries' mean)
  YOLOS
    STEM_det_tokens.png  the last layer's attention (head mean) of each confident det token, with
                         its box; STEM_det_heads.png: the same per head; STEM_heads.png: per
                         layer and head, the confident tokens' mean
  DETR
    STEM_decoder.png   the last decoder layer's cross-attention of each confident query, with its box
    STEM_encoder.png   the last encoder layer's self-attention at the reference pixels
  STEM_maps.npz        the arrays behind the pictures
and once, for ViTs with learned position embeddings, the ViT paper's Figure 7:
  figure7_filters.png, figure7_position_similarity.png, figure7_attention_distance.png (mean
  attention distance per head against depth, over the given images), figure7.npz;
and summary.json (predictions, what was written). Takes train.py's process flags too
(--xla_preset, --host_memory, --fake_devices, --cpu_matmul).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from vit_jax import command_line  # imports no JAX: the process is set up in __main__ first
from vit_jax.data.image_files import fit_to_canvas, load_image  # PIL and numpy only

command_line.define_process_flags()

SIZE_OPTIONS = ("hidden_size", "num_layers", "num_heads", "mlp_dim")
DETECTORS = ("YOLOS", "DETR")


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=command_line.process_flags_help())
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="checkpoint file or directory (as predict.py)")
  source.add_argument("--workdir", help="a training workdir (its latest checkpoint)")
  p.add_argument("--config", help="with --workdir: the run's config (configs/NAME.py[:ARG]); its "
                                  "model must be the checkpoint's")
  p.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="jpg/png files")
  p.add_argument("--out", required=True, metavar="DIR", help="where the PNGs and arrays go")
  p.add_argument("--model", help="model name when the checkpoint does not say, e.g. ViT-B/16")
  p.add_argument("--num_classes", type=int, help="classes, when the checkpoint does not say")
  p.add_argument("--image_size", type=int, help="classifiers: input resolution (default: the checkpoint's)")
  p.add_argument("--head_fusion", default="mean", choices=("mean", "max", "min"),
                 help="how rollout fuses the heads of a layer (default mean)")
  p.add_argument("--discard_ratio", type=float, default=0.0,
                 help="rollout: the lowest fraction of each layer's fused weights set to 0")
  p.add_argument("--layer", type=int, help="draw only this layer in the layer x head grid")
  p.add_argument("--head", type=int, help="draw only this head in the layer x head grid")
  p.add_argument("--threshold", type=float, default=0.5,
                 help="detectors: the lowest score of a query or det token shown (default 0.5)")
  p.add_argument("--max_queries", type=int, default=6, help="detectors: at most this many shown")
  p.add_argument("--reference_pixels", default=None,
                 help="DETR encoder maps: 'y,x;y,x' in input pixels (default: the confident boxes' centres)")
  p.add_argument("--canvas", help="detectors: HEIGHT,WIDTH (default: the checkpoint's)")
  p.add_argument("--normalize", choices=("minus_one_one", "imagenet"),
                 help="detectors: pixel scaling (default as predict.py)")
  return p.parse_args(argv)


def check_index(value: int | None, count: int, what: str) -> None:
  if value is not None and not 0 <= value < count:
    raise ValueError(f"--{what} {value} is out of range: the model has {count} {what}s "
                     f"(0 to {count - 1})")


def select_grid(maps: np.ndarray, args: argparse.Namespace) -> np.ndarray:
  """[layers, heads, rows, cols] narrowed to --layer / --head."""
  check_index(args.layer, maps.shape[0], "layer")
  check_index(args.head, maps.shape[1], "head")
  if args.layer is not None:
    maps = maps[args.layer:args.layer + 1]
  if args.head is not None:
    maps = maps[:, args.head:args.head + 1]
  return maps


def display_image(x: np.ndarray) -> np.ndarray:
  """A [-1, 1] (or standardised) model input as [0, 1] for drawing."""
  lo, hi = float(x.min()), float(x.max())
  return (x - lo) / max(hi - lo, 1e-12)


def query_grid(layers: list, lay, queries: np.ndarray | None) -> np.ndarray:
  """[layers, heads, rows, cols]: the class token's (or the given query rows' mean, or the
  patch rows' mean) attention over the patches, per layer and head."""
  rows, cols = lay.grid
  start, stop = lay.prefix, lay.prefix + rows * cols
  out = []
  for w in layers:
    w = np.asarray(w, np.float64)[0]  # [H, T, T]
    if queries is not None:
      m = w[:, queries][:, :, start:stop].mean(axis=1)
    elif lay.prefix:
      m = w[:, 0, start:stop]
    else:
      m = w[:, start:stop, start:stop].mean(axis=1)
    out.append(m.reshape(-1, rows, cols))
  return np.stack(out)


def figure7(model, lay, layers_per_image: list, out: str, written: list[str]) -> str | None:
  """Figure 7's three panels for a ViT with learned position embeddings; else why not."""
  from vit_jax.attention_maps import figure7 as f7, plots
  from vit_jax.models import vit, vit_hybrid
  if not isinstance(model, vit.VisionTransformer) or isinstance(model, vit_hybrid.HybridViT):
    return "Figure 7 applies to plain ViTs (patch-embedding filters, learned position embeddings)"
  if model.Transformer.posembed_input is None:
    return "Figure 7 needs learned position embeddings (this model uses fixed sin-cos ones)"
  kernel = np.asarray(model.embedding.kernel[...])
  p, c = model.config.patch_size, model.config.channels
  kernel = kernel.reshape(p, p, c, -1)
  comps = f7.embedding_components(kernel, 28)
  rgb = f7.as_rgb(comps)
  sim = f7.position_similarity(np.asarray(model.Transformer.posembed_input.pos_embedding[...]),
                               lay.grid, lay.prefix)
  dist = np.mean([f7.attention_distances(layers, lay.grid, lay.patch_size, lay.prefix)
                  for layers in layers_per_image], axis=0)
  for name, draw, arg in (("figure7_filters.png", plots.filters, rgb),
                          ("figure7_position_similarity.png", plots.position_similarity, sim),
                          ("figure7_attention_distance.png", plots.attention_distance, dist)):
    draw(os.path.join(out, name), arg)
    written.append(name)
  np.savez(os.path.join(out, "figure7.npz"), components=comps, position_similarity=sim,
           attention_distance=dist)
  written.append("figure7.npz")
  return None


def classifier_maps(args, model, spec, paths: list[str], written: list[str]) -> list[dict]:
  import jax.numpy as jnp
  from vit_jax.attention_maps import capture as capture_lib, plots, rollout as rollout_lib
  size = args.image_size or spec.image_size
  channels = model.config.channels if hasattr(model, "config") else 3
  summary, per_image_layers = [], []
  for path in paths:
    x = load_image(path, size, channels)[None]
    lay = capture_lib.layout(model, x.shape[1:3])
    rollout_map, cap = rollout_lib.attention_rollout(model, jnp.asarray(x), head_fusion=args.head_fusion,
                                                     discard_ratio=args.discard_ratio)
    grad_map, targets = rollout_lib.gradient_rollout(model, jnp.asarray(x))
    layers = [np.asarray(w) for w in capture_lib.encoder_weights(cap, lay)]
    per_image_layers.append(layers)
    grid = query_grid(layers, lay, None)
    stem = os.path.splitext(os.path.basename(path))[0]
    image = display_image(x[0])
    label = int(targets[0])
    fusion = args.head_fusion + (f", discard {args.discard_ratio:g}" if args.discard_ratio else "")
    plots.overlays(os.path.join(args.out, f"{stem}_rollout.png"), image,
                   [(f"rollout ({fusion})", np.asarray(rollout_map[0])),
                    (f"gradient rollout, class {label}", np.asarray(grad_map[0]))],
                   extent=(lay.grid[0] * lay.patch_size, lay.grid[1] * lay.patch_size))
    plots.layer_head_grid(os.path.join(args.out, f"{stem}_heads.png"), select_grid(grid, args),
                          "attention over the patches " + ("(class token)" if lay.prefix else "(mean of the patch queries)"))
    np.savez(os.path.join(args.out, f"{stem}_maps.npz"), rollout=np.asarray(rollout_map[0]),
             gradient_rollout=np.asarray(grad_map[0]), layer_head=grid,
             logits=np.asarray(cap.outputs[0]))
    written += [f"{stem}_rollout.png", f"{stem}_heads.png", f"{stem}_maps.npz"]
    summary.append({"image": path, "predicted_class": label})
  why_not = figure7(model, lay, per_image_layers, args.out, written)
  if why_not:
    print(f"figure 7 skipped: {why_not}")
  return summary


def detector_maps(args, model, spec, ckpt, paths: list[str], written: list[str]) -> list[dict]:
  import jax.numpy as jnp
  from vit_jax.attention_maps import capture as capture_lib, detection_maps as dm, plots
  from vit_jax.detection.postprocess import postprocess as postprocess_outputs
  from vit_jax.models import yolos
  canvas = _canvas(args, spec)
  normalize = args.normalize or ("minus_one_one" if ckpt.container == "orbax" else "imagenet")
  summary = []
  for path in paths:
    original, x, mask = fit_to_canvas(path, canvas, model.config.channels, normalize)
    lay = capture_lib.layout(model, x.shape[:2])
    cap = capture_lib.capture(model, jnp.asarray(x[None]), pixel_mask=jnp.asarray(mask[None]))
    # Boxes in the canvas's pixels (the model's input), where the maps live.
    det = postprocess_outputs(cap.outputs, jnp.asarray([x.shape[:2]], jnp.float32))
    scores = np.asarray(det["scores"][0])
    order = [int(q) for q in np.argsort(-scores, kind="stable") if scores[q] > args.threshold]
    order = order[:args.max_queries]
    boxes = np.asarray(det["boxes"][0])
    labels = np.asarray(det["labels"][0])
    stem = os.path.splitext(os.path.basename(path))[0]
    image = display_image(x)
    extent = (lay.grid[0] * lay.patch_size, lay.grid[1] * lay.patch_size)
    arrays = {"scores": scores, "labels": labels, "boxes": boxes, "queries": np.asarray(order)}
    if isinstance(model, yolos.YOLOS):
      att = dm.yolos_det_attention(cap.weights, lay)[0]  # [H, det, rows, cols]
      maps = [(f"det token {q}: {labels[q]} {scores[q]:.2f}", att[:, q].mean(axis=0)) for q in order]
      plots.query_maps(os.path.join(args.out, f"{stem}_det_tokens.png"), image, maps,
                       [boxes[q] for q in order], extent)
      layers = [np.asarray(w) for w in capture_lib.encoder_weights(cap, lay)]
      start = lay.prefix + lay.grid[0] * lay.grid[1]
      queries = np.asarray(order) + start if order else np.arange(start, start + lay.suffix)
      grid = query_grid(layers, lay, queries)
      plots.layer_head_grid(os.path.join(args.out, f"{stem}_heads.png"), select_grid(grid, args),
                            "det tokens' attention over the patches")
      if order:  # the last layer per head, as YOLOS's figure
        plots.layer_head_grid(os.path.join(args.out, f"{stem}_det_heads.png"),
                              np.stack([att[:, q] for q in order]),
                              "last layer: each det token's attention per head",
                              [f"det token {q}" for q in order])
        written.append(f"{stem}_det_heads.png")
      arrays.update(det_attention=att, layer_head=grid)
      written += [f"{stem}_det_tokens.png", f"{stem}_heads.png"]
    else:
      cross = dm.detr_cross_attention(cap.weights, lay)[0]  # [Q, rows, cols]
      maps = [(f"query {q}: {labels[q]} {scores[q]:.2f}", cross[q]) for q in order]
      plots.query_maps(os.path.join(args.out, f"{stem}_decoder.png"), image, maps,
                       [boxes[q] for q in order], extent)
      pixels = _reference_pixels(args.reference_pixels, [boxes[q] for q in order], x.shape[:2])
      enc = [(f"pixel (y {y}, x {xx})", dm.detr_encoder_attention(cap.weights, lay, (y, xx))[0])
             for y, xx in pixels]
      plots.query_maps(os.path.join(args.out, f"{stem}_encoder.png"), image, enc,
                       [None] * len(enc), extent)
      arrays.update(cross_attention=cross, encoder_attention=np.stack([m for _, m in enc]),
                    reference_pixels=np.asarray(pixels))
      written += [f"{stem}_decoder.png", f"{stem}_encoder.png"]
    np.savez(os.path.join(args.out, f"{stem}_maps.npz"), **arrays)
    written.append(f"{stem}_maps.npz")
    summary.append({"image": path, "shown_queries": [
        {"query": q, "label": int(labels[q]), "score": float(scores[q]),
         "box": [float(v) for v in boxes[q]]} for q in order]})
  return summary


def check_config_matches(config_spec: str, spec) -> None:
  """Raises a ValueError unless the config's model and classes are the checkpoint's."""
  from vit_jax.train import stages
  path = config_spec.partition(":")[0]
  if not os.path.isfile(path):
    raise ValueError(f"--config {config_spec!r}: no config file {path!r}")
  config = stages.load_config(config_spec)
  theirs = (config.model.name, config.num_classes)
  if theirs != (spec.name, spec.num_classes):
    raise ValueError(f"--config {config_spec!r} describes {theirs[0]} with {theirs[1]} classes, but "
                     f"the checkpoint holds {spec.name} with {spec.num_classes}: give the run's own "
                     "config, or leave --config out (the checkpoint says what it holds)")


def _canvas(args, spec) -> tuple[int, int]:
  if args.canvas:
    try:
      canvas = tuple(int(v) for v in args.canvas.split(","))
      assert len(canvas) == 2 and min(canvas) > 0
      return canvas
    except (ValueError, AssertionError):
      raise ValueError(f"--canvas {args.canvas!r}: give HEIGHT,WIDTH, e.g. 800,1333") from None
  return spec.image_size if isinstance(spec.image_size, tuple) else (800, 1333)


def _reference_pixels(text: str | None, boxes: list, hw: tuple[int, int]) -> list[tuple[int, int]]:
  if text:
    try:
      pixels = [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item]
      assert pixels and all(len(p) == 2 for p in pixels)
    except (ValueError, AssertionError):
      raise ValueError(f"--reference_pixels {text!r}: give 'y,x;y,x' in input pixels") from None
    return pixels
  if boxes:
    return [(int((b[1] + b[3]) / 2), int((b[0] + b[2]) / 2)) for b in boxes[:4]]
  return [(hw[0] // 2, hw[1] // 2)]


def visualize(argv: list[str]) -> dict:
  args = parse_args(argv)
  from flax import nnx
  from vit_jax import checkpoints, models
  from vit_jax.attention_maps import capture as capture_lib
  from vit_jax.checkpoints import loading
  if not 0.0 <= args.discard_ratio < 1.0:
    raise ValueError(f"--discard_ratio {args.discard_ratio}: give a fraction in [0, 1)")
  for path in args.images:
    if not os.path.isfile(path):
      raise ValueError(f"cannot read the image {path!r}: no such file")
  spec, ckpt = loading.resolve_model(args.checkpoint or args.workdir, args.model, args.num_classes,
                                     SIZE_OPTIONS)
  if args.config:
    check_config_matches(args.config, spec)
  family = models.resolve(spec.name)[0].name
  detector = spec.task == "detection" or family in DETECTORS
  if detector:
    size = _canvas(args, spec)
  else:
    size = args.image_size or spec.image_size
  build = lambda: models.create(spec.name, num_classes=spec.num_classes, image_size=size,
                                **spec.overrides)
  capture_lib.attention_names(nnx.eval_shape(build))  # no attention (Mixer, BiT): say so first
  model = build()
  checkpoints.load_pretrained(model, ckpt)
  os.makedirs(args.out, exist_ok=True)
  written: list[str] = []
  if detector:
    results = detector_maps(args, model, spec, ckpt, args.images, written)
  else:
    results = classifier_maps(args, model, spec, args.images, written)
  summary = {"model": spec.name, "checkpoint": ckpt.path, "images": results, "written": written}
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"{spec.name} from {ckpt.path}: wrote {len(written)} files to {args.out}")
  for name in written:
    print(f"  {name}")
  return summary


def main(argv: list[str] | None = None) -> int:
  return command_line.exit_code(visualize, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  command_line.run_argparse_script(main, parse_args)
