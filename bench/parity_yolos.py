"""Full-size YOLOS-Ti parity with transformers' YolosForObjectDetection, on the same random weights.

Run from the repository root, as a module (it imports the reference helpers of tests/):
        .venv/bin/python -m bench.parity_yolos               (about a minute on 2 CPU cores)
        .venv/bin/python -m bench.parity_yolos 800 1216      (another input height and width)
The configuration is the published hustvl/yolos-tiny one (position embeddings stored for
800 x 1333, no mid position embeddings, LayerNorm eps 1e-12, 91 classes). Every parameter is
random (``randomize_``, std 0.07); the position embeddings and tokens at std 0.5, so that their bicubic
resizing to the input's grid shows. The default input, 512 x 683, is a 640 x 480 COCO image at
the 512-pixel shortest edge YOLOS-Ti is evaluated at: its grid (32 x 42) differs from the stored
one (50 x 83) and its width is no multiple of 16. Checks: max |logits - HF| and |boxes - HF| in
float32, for two random images, after ``checkpoints.load_pretrained`` reads HF's state dict from
a ``.safetensors`` file; both within 1e-4. The test suite runs the same checks at small sizes
(tests/test_yolos.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

try:  # tests/ is importable when this runs as ``python -m bench.parity_yolos`` from the repository root
  from tests.test_yolos import random_yolos
  from tests.timm_helpers import import_timm
except ModuleNotFoundError as e:
  if e.name != "tests":
    raise
  import_timm = None
from vit_jax import checkpoints, models

TOLERANCE = 1e-4
YOLOS_TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                  image_size=[800, 1333], patch_size=16, num_detection_tokens=100, num_labels=91,
                  use_mid_position_embeddings=False, layer_norm_eps=1e-12)


def reference(seed: int = 0):
  """transformers' YOLOS-Ti with every parameter random."""
  import_timm()  # makes the installed torchvision (which transformers imports) loadable
  from transformers import YolosConfig
  return random_yolos(YolosConfig(**YOLOS_TINY), seed, std=0.07)  # 0.07: unit gain at width 192


def main(argv: list[str]) -> int:
  if import_timm is None:
    print("error: tests/ (the reference helpers) is not importable: run this from the repository root "
          "as .venv/bin/python -m bench.parity_yolos", file=sys.stderr)
    return 2
  import torch
  from safetensors.numpy import save_file
  height, width = (int(argv[0]), int(argv[1])) if len(argv) == 2 else (512, 683)
  start = time.time()
  ref = reference()
  x = np.random.default_rng(0).uniform(-1, 1, (2, height, width, 3)).astype(np.float32)
  with torch.no_grad():
    out = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  want = {"logits": out.logits.numpy(), "boxes": out.pred_boxes.numpy()}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "yolos_tiny.safetensors")
    save_file({k: v.detach().numpy() for k, v in ref.state_dict().items()}, path)
    model = models.create("YOLOS-Ti", num_classes=91, image_size=(800, 1333), layernorm_eps=1e-12)
    model = checkpoints.load_pretrained(model, path)
  got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
  ok = True
  print(f"YOLOS-Ti (hustvl/yolos-tiny configuration), input {height}x{width}, batch 2, float32")
  for key in ("logits", "boxes"):
    diff = float(np.max(np.abs(np.asarray(got[key]) - want[key])))
    ok &= diff < TOLERANCE
    print(f"  {key:6s} shape {tuple(want[key].shape)}  max |ref| {np.abs(want[key]).max():8.4f}  "
          f"max |ours - HF| {diff:.2e}  {'ok' if diff < TOLERANCE else 'FAIL'}")
  print(f"  ({time.time() - start:.0f} s)")
  return 0 if ok else 1


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("size", nargs="*", type=int, metavar="PIXELS",
                      help="input height and width (default: 512 683)")
  sys.exit(main([str(s) for s in parser.parse_args().size]))
