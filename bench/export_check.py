"""The export issue's models at 224 px, random weights, fp32: each artifact against the JAX model.

  .venv/bin/python bench/export_check.py [--models ViT-Ti/16,...] [--formats stablehlo,savedmodel,onnx,timm]

For each model: the JAX model's logits on 2 random images (the detectors at 512 x 512, 91 classes,
with a pixel mask that pads the second image: raw logits and boxes and the post-processed scores,
labels and pixel boxes, those divided by the image size), then the same images through the
stablehlo artifact (deserialised; dynamic batch, also checked at batch 3), the SavedModel in
TensorFlow, the ONNX graph in onnxruntime (also at batch 3) and the timm export loaded by timm;
prints the max abs difference of each (the bar: 1e-4, and beside it the largest logit) or why the
format refused the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODELS = ("ViT-Ti/16", "ViT-B/16", "R50+ViT-B/16", "Mixer-B/16", "TNT-S/16", "BiT-R50x1",
          "YOLOS-Ti", "DETR-R50")
DETECTORS = ("YOLOS-Ti", "DETR-R50")
DETECTOR_SIZE = (512, 512)  # YOLOS-Ti's evaluation size


def random_model(name: str, image_size=224, num_classes: int = 1000):
  """``name`` with random values everywhere (the head starts at zero, which would make every
  comparison equal); scales and norms near 1, the rest small."""
  import jax
  from flax import nnx

  from vit_jax import models

  model = models.create(name, num_classes=num_classes, image_size=image_size, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  def randomise(path, x):
    noise = 0.02 * jax.random.normal(next(keys), x.shape, x.dtype)
    return (1.0 + noise) if str(path[-1]).strip("'[]. ") in ("scale",) else noise
  nnx.update(model, jax.tree_util.tree_map_with_path(randomise, params))
  return model


def check(name: str, formats: list[str], out_dir: str) -> dict:
  import jax
  import numpy as np

  from vit_jax.detection.postprocess import postprocess
  from vit_jax.export import ServingConfig, export

  detector = name in DETECTORS
  size = DETECTOR_SIZE if detector else (224, 224)
  classes = 91 if detector else 1000
  model = random_model(name, image_size=size if detector else 224, num_classes=classes)
  serving = ServingConfig(model_name=name, num_classes=classes, image_size=size, detector=detector)
  rng = np.random.default_rng(0)
  inputs = {"images": rng.uniform(-1, 1, (3, *size, 3)).astype(np.float32)}
  if detector:
    inputs["pixel_mask"] = np.ones((3, *size), np.float32)
    inputs["pixel_mask"][1, :, size[1] // 2:] = 0  # the second image padded on the right
    inputs["image_sizes"] = np.array([[480, 640], [512, 256], [640, 480]], np.int32)
    out = jax.jit(lambda x, m: model(x, pixel_mask=m))(inputs["images"], inputs["pixel_mask"])
    want = {"logits": out["logits"], "pred_boxes": out["boxes"],
            **postprocess(out, inputs["image_sizes"])}
    want = {k: np.asarray(v) for k, v in want.items()}
  else:
    want = {"logits": np.asarray(jax.jit(lambda x: model(x))(inputs["images"]))}
  result = {"model": name, "size": list(size), "max_abs_logit": float(np.abs(want["logits"]).max())}

  def difference(got: dict, n: int) -> float:
    """Max abs difference over the outputs; pixel boxes relative to the image size (a 1e-4
    bar on [0, 1] coordinates)."""
    def scale(k):
      return inputs["image_sizes"][:n].max() if k == "boxes" and detector else 1.0
    return max(float(np.abs(np.asarray(got[k]) - want[k][:n]).max() / scale(k)) for k in want)

  first2 = {k: v[:2] for k, v in inputs.items()}
  for fmt in formats:
    out = os.path.join(out_dir, name.replace("/", "_").replace("+", "_") + "." + fmt)
    t = time.time()
    try:
      export(model, serving, fmt, out)
    except ValueError as e:
      result[fmt] = f"refused: {e}"
      continue
    if fmt == "stablehlo":
      exported = jax.export.deserialize(open(out, "rb").read())
      diff = max(difference(exported.call(*first2.values()), 2),
                 difference(exported.call(*inputs.values()), 3))
    elif fmt == "savedmodel":
      import tensorflow as tf
      serve = tf.saved_model.load(out).signatures["serving_default"]
      got = serve(**{k: tf.constant(v) for k, v in first2.items()})
      diff = difference({k: v.numpy() for k, v in got.items()}, 2)
    elif fmt == "onnx":
      import onnxruntime
      session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
      names = [o.name for o in session.get_outputs()]
      diff = max(difference(dict(zip(names, session.run(None, first2))), 2),
                 difference(dict(zip(names, session.run(None, inputs))), 3))
    else:
      import timm
      import torch
      tm = timm.create_model("local-dir:" + out, pretrained=True).eval()
      with torch.no_grad():
        got = tm(torch.from_numpy(inputs["images"][:2]).permute(0, 3, 1, 2)).numpy()
      diff = difference({"logits": got}, 2)
    result[fmt] = diff
    result[fmt + "_s"] = round(time.time() - t, 1)
  return result


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--formats", default="stablehlo,savedmodel,onnx,timm")
  p.add_argument("--json")
  args = p.parse_args()
  if "timm" in args.formats:
    from tests.timm_helpers import import_timm  # this torchvision's C ops do not load
    import_timm()
  out = []
  with tempfile.TemporaryDirectory() as d:
    for name in args.models.split(","):
      r = check(name, args.formats.split(","), d)
      print(json.dumps(r), flush=True)
      out.append(r)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
