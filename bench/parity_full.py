"""Full-size parity of the hybrid, BiT, Mixer and TNT families with timm, on the same random weights.

Run from the repository root, as a module (it imports the reference helpers of tests/):
        .venv/bin/python -m bench.parity_full          (all 13 models, about 4 minutes on 2 CPU cores)
        .venv/bin/python -m bench.parity_full mixer_b16_224 tnt_s_patch16_224
Checks: max |logits - timm logits| in float32 at 224 px, 1000 classes, for two random images
(within 1e-4; for the deepest models timm's own float32 error can exceed that, so a check also
passes when ours is at least as close as timm's float32 logits to timm's float64 logits),
after ``vit_jax.checkpoints.load_pretrained`` reads timm's (randomised) state dict from a
``.safetensors`` file; for the hybrid R50+ViT-B/16 and Mixer-B/16 also through the original npz
format written by ``tests/original_npz.py`` (the hybrid npz read by timm's own reader too). The
test suite runs the same checks at small sizes (tests/test_families.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax import checkpoints, models

try:  # tests/ is importable when this runs as ``python -m bench.parity_full`` from the repository root
  from tests import original_npz
  from tests.timm_helpers import import_timm, randomize_, state_dict_numpy
except ModuleNotFoundError as e:
  if e.name != "tests":
    raise
  original_npz = None

TIMM_NUMERICS = dict(ws_style="var", ws_eps=1e-8, gn_eps=1e-5)  # timm's hybrid StdConv2dSame/GroupNorm
# timm name -> (our name, options that reproduce timm's numerics)
MODELS = {
    "vit_base_r50_s16_224": ("R50+ViT-B/16", TIMM_NUMERICS),
    "vit_small_r26_s32_224": ("R26+ViT-S/32", TIMM_NUMERICS),
    "vit_base_r26_s32_224": ("R26+ViT-B/32", TIMM_NUMERICS),
    "vit_large_r50_s32_224": ("R50+ViT-L/32", TIMM_NUMERICS),
    "vit_tiny_r_s16_p8_224": ("R+ViT-Ti/16", TIMM_NUMERICS),
    "resnetv2_50x1_bit": ("BiT-R50x1", {}),
    "resnetv2_101x1_bit": ("BiT-R101x1", {}),
    "resnetv2_50x3_bit": ("BiT-R50x3", {}),
    "mixer_b16_224": ("Mixer-B/16", {}),
    "mixer_b32_224": ("Mixer-B/32", {}),
    "mixer_l16_224": ("Mixer-L/16", {}),
    "tnt_s_patch16_224": ("TNT-S/16", {}),
    "tnt_b_patch16_224": ("TNT-B/16", {}),
}
TOLERANCE = 1e-4


def logits(model: nnx.Module, x: np.ndarray) -> np.ndarray:
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))


def run(timm_name: str, timm, torch) -> list[tuple[str, float]]:
  ours_name, options = MODELS[timm_name]
  tm = timm.create_model(timm_name, pretrained=False, num_classes=1000)
  randomize_(tm, seed=1)
  tm.eval()
  sd = state_dict_numpy(tm)
  x = np.random.RandomState(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    exact = tm.double()(torch.from_numpy(x.transpose(0, 3, 1, 2)).double()).numpy()
  tm.float()
  rows = []
  model = models.create(ours_name, num_classes=1000, **options)
  with tempfile.TemporaryDirectory() as d:
    from safetensors.numpy import save_file
    save_file(sd, os.path.join(d, "timm.safetensors"))
    checkpoints.load_pretrained(model, os.path.join(d, "timm.safetensors"))
  out = logits(model, x)
  rows.append((f"{ours_name} <- timm {timm_name}", float(np.max(np.abs(out - ref))),
               float(np.max(np.abs(out - exact))), float(np.max(np.abs(ref - exact)))))
  if timm_name == "vit_base_r50_s16_224":
    flat = original_npz.hybrid_npz(sd, num_heads=model.config.num_heads)
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "R50+ViT-B_16.npz")
      np.savez(path, **flat)
      tm2 = timm.create_model(timm_name, pretrained=False, num_classes=1000)
      timm.models.vision_transformer._load_weights(tm2, path)
      tm2.eval()
      with torch.no_grad():
        ref2 = tm2(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
      rows.append(("  timm npz reader vs timm", float(np.max(np.abs(ref2 - ref))), None, None))
      model2 = models.create(ours_name, num_classes=1000, **options)
      checkpoints.load_pretrained(model2, path)
      rows.append((f"  {ours_name} <- npz vs timm", float(np.max(np.abs(logits(model2, x) - ref))), None, None))
      model3 = models.create(ours_name, num_classes=1000)  # the original code's numerics
      checkpoints.load_pretrained(model3, path)
      rows.append((f"  {ours_name} (original WS/GN eps) <- npz vs timm [info]",
                   float(np.max(np.abs(logits(model3, x) - ref))), None, None))
  if timm_name == "mixer_b16_224":
    model2 = models.create(ours_name, num_classes=1000)
    with tempfile.TemporaryDirectory() as d:
      np.savez(os.path.join(d, "Mixer-B_16.npz"), **original_npz.mixer_npz(sd))
      checkpoints.load_pretrained(model2, os.path.join(d, "Mixer-B_16.npz"))
    rows.append((f"  {ours_name} <- npz vs timm", float(np.max(np.abs(logits(model2, x) - ref))), None, None))
  return rows


def main(names: list[str]) -> int:
  if original_npz is None:
    print("error: tests/ (the reference helpers) is not importable: run this from the repository root "
          "as .venv/bin/python -m bench.parity_full [TIMM_NAME ...]", file=sys.stderr)
    return 2
  timm = import_timm()
  import torch
  failed = 0
  print(f"{'check':62s} {'vs timm32':>10s} {'vs timm64':>10s} {'timm32-64':>10s}")
  for name in names or list(MODELS):
    start = time.time()
    for check, diff, diff64, timm_error in run(name, timm, torch):
      ok = "[info]" in check or diff <= TOLERANCE or (diff64 is not None and diff64 <= timm_error)
      failed += not ok
      extra = "" if diff64 is None else f" {diff64:10.2e} {timm_error:10.2e}"
      print(f"{check:62s} {diff:10.2e}{extra}  {'' if ok else 'FAIL'}")
    print(f"{'':62s} {time.time() - start:.0f}s")
  print(f"all within {TOLERANCE} of timm (or closer than timm float32 to float64)" if not failed
        else f"{failed} FAILED")
  return 1 if failed else 0


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("names", nargs="*", metavar="TIMM_NAME",
                      help=f"models to check (default: all of {', '.join(MODELS)})")
  args = parser.parse_args()
  unknown = [n for n in args.names if n not in MODELS]
  if unknown:
    parser.error(f"unknown model {', '.join(unknown)}; valid: {', '.join(MODELS)}")
  sys.exit(main(args.names))
