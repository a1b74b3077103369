"""Full-size DETR parity with transformers' DetrForObjectDetection, on the same random weights.

Run from the repository root, as a module (it imports the reference helpers of tests/):
        .venv/bin/python -m bench.parity_detr                     (DETR-R50, a few minutes on 2 cores)
        .venv/bin/python -m bench.parity_detr DETR-R50-DC5 DETR-R101
The reference is HF's default configuration (``facebook/detr-resnet-50``'s): timm's ResNet
backbone (``use_timm_backbone=True``, ``use_pretrained_backbone=False``; DC5: ``dilation=True``),
6 + 6 layers of width 256, 100 queries, 91 classes, every parameter and buffer random
(``tests/test_detr.randomize_all``). The input is a padded batch as HF's image processor makes it:
an 800 x 1066 image (a 640 x 480 COCO image at DETR's 800-pixel shortest edge) and a 600 x 900 one
padded to 800 x 1066 (``pixel_mask`` zeros). Checks, in float32: max |ours - HF| of the logits and
boxes, and of the auxiliary outputs against the original's semantics (HF's decoder layers hooked,
the final norm applied outside), after ``checkpoints.load_pretrained`` reads HF's state dict from a
``.safetensors`` file, all within 1e-4; then ``detr_names.export_hf(..., backbone="timm")`` and
``DetrForObjectDetection.from_pretrained`` of that folder reproduce HF's outputs. The test suite
runs the same checks at small sizes (tests/test_detr.py).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

try:  # tests/ is importable when this runs as ``python -m bench.parity_detr`` from the repository root
  from tests.test_detr import hf_forward, randomize_all
  from tests.timm_helpers import import_timm, state_dict_numpy
except ModuleNotFoundError as e:
  if e.name != "tests":
    raise
  import_timm = None
from vit_jax import checkpoints, models
from vit_jax.checkpoints import detr_names, hf_export

TOLERANCE = 1e-4
BACKBONES = {"R50": "resnet50", "R101": "resnet101"}
KEYS = ("logits", "boxes", "aux_logits", "aux_boxes")


def padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.uniform(-2, 2, (2, 800, 1066, 3)).astype(np.float32)
  mask = np.ones((2, 800, 1066), np.float32)
  mask[1, 600:] = mask[1, :, 900:] = 0
  images[mask == 0] = 0  # HF's processor pads with zeros
  return images, mask


def check(name: str, images: np.ndarray, mask: np.ndarray) -> bool:
  import torch
  from transformers import DetrConfig, DetrForObjectDetection
  depth = name.split("-")[1]
  start = time.time()
  ref = DetrForObjectDetection(DetrConfig(backbone=BACKBONES[depth], use_pretrained_backbone=False,
                                          dilation=name.endswith("-DC5"), num_labels=91)).eval()
  randomize_all(ref, seed=0)
  want = hf_forward(ref, images, mask)
  reference_s = time.time() - start
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "detr.safetensors")
    hf_export.write_safetensors(state_dict_numpy(ref), path)
    model = checkpoints.load_pretrained(models.create(name, num_classes=91), path)
    graphdef, state = nnx.split(model)
    start = time.time()
    got = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, pixel_mask=m))(state, images, mask)
    got = {k: np.asarray(v) for k, v in got.items()}
    ours_s = time.time() - start
    folder = detr_names.export_hf(model, os.path.join(tmp, "export"), backbone="timm")
    exported = hf_forward(DetrForObjectDetection.from_pretrained(folder).eval(), images, mask)
  print(f"{name} (HF {BACKBONES[depth]} timm backbone, 91 classes), input {images.shape[1:3]} "
        f"batch 2 (second padded from 600 x 900), float32; HF {reference_s:.0f} s, ours "
        f"{ours_s:.0f} s with compiling; torch {torch.__version__}")
  ok = True
  for key in KEYS:
    diff = float(np.max(np.abs(got[key] - want[key])))
    ok &= diff < TOLERANCE
    print(f"  {key:10s} shape {tuple(want[key].shape)}  max |HF| {np.abs(want[key]).max():8.4f}  "
          f"max |ours - HF| {diff:.2e}  {'ok' if diff < TOLERANCE else 'FAIL'}")
  diff = max(float(np.max(np.abs(exported[k] - want[k]))) for k in KEYS)
  ok &= diff < 1e-5
  print(f"  exported HF folder (timm backbone) in transformers: max |diff| {diff:.2e}  "
        f"{'ok' if diff < 1e-5 else 'FAIL'}")
  return ok


def main(argv: list[str]) -> int:
  if import_timm is None:
    print("error: tests/ (the reference helpers) is not importable: run this from the repository root "
          "as .venv/bin/python -m bench.parity_detr", file=sys.stderr)
    return 2
  import_timm()  # timm builds HF's backbone; it also makes the installed torchvision loadable
  names = argv or ["DETR-R50"]
  unknown = [n for n in names if not re.fullmatch(r"DETR-R(50|101)(-DC5)?", n)]
  if unknown:
    print(f"unknown model(s) {unknown}: give DETR-R50, DETR-R101, DETR-R50-DC5 or DETR-R101-DC5")
    return 2
  images, mask = padded_batch()
  ok = True
  for name in names:
    ok &= check(name, images, mask)
  return 0 if ok else 1


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("names", nargs="*", metavar="NAME",
                      help="DETR-R50, DETR-R101, DETR-R50-DC5 or DETR-R101-DC5 (default: DETR-R50)")
  sys.exit(main(parser.parse_args().names))
