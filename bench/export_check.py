"""The export issue's models at 224 px, random weights, fp32: each artifact against the JAX model.

  .venv/bin/python bench/export_check.py [--models ViT-Ti/16,...] [--formats stablehlo,savedmodel,onnx,timm]

For each model: the JAX model's logits on 2 random images, then the same images through the
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

MODELS = ("ViT-Ti/16", "ViT-B/16", "R50+ViT-B/16", "Mixer-B/16", "TNT-S/16", "BiT-R50x1")


def random_model(name: str, image_size: int = 224, num_classes: int = 1000):
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

  from vit_jax.export import ServingConfig, export

  model = random_model(name)
  serving = ServingConfig(model_name=name, num_classes=1000, image_size=(224, 224))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (3, 224, 224, 3)).astype(np.float32)
  want = np.asarray(jax.jit(lambda x: model(x))(images))
  result = {"model": name, "max_abs_logit": float(np.abs(want).max())}
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
      got = np.asarray(exported.call(images[:2])["logits"])
      got3 = np.asarray(exported.call(images)["logits"])
      diff = max(np.abs(got - want[:2]).max(), np.abs(got3 - want).max())
    elif fmt == "savedmodel":
      import tensorflow as tf
      loaded = tf.saved_model.load(out)
      got = loaded.signatures["serving_default"](images=tf.constant(images[:2]))["logits"].numpy()
      diff = np.abs(got - want[:2]).max()
    elif fmt == "onnx":
      import onnxruntime
      session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
      got = session.run(None, {"images": images[:2]})[0]
      got3 = session.run(None, {"images": images})[0]
      diff = max(np.abs(got - want[:2]).max(), np.abs(got3 - want).max())
    else:
      import timm
      import torch
      tm = timm.create_model("local-dir:" + out, pretrained=True).eval()
      with torch.no_grad():
        got = tm(torch.from_numpy(images[:2]).permute(0, 3, 1, 2)).numpy()
      diff = np.abs(got - want[:2]).max()
    result[fmt] = float(diff)
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
