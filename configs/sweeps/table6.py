r"""The ViT paper's Table 6 models at JFT-300M scale, for their compute: sweep.py --plan only.

Run:  python sweep.py --sweep configs/sweeps/table6.py --plan --accelerator tpu-v3-core
JFT-300M is not public, so this sweep is never launched; its plan reproduces Table 6's pre-training
exaFLOPs (tests/test_sweeps.py checks it, within 2.5 %):
    ViT-B/32 (7 epochs) 55, ViT-B/16 (7) 224, ViT-L/32 (7) 196, ViT-L/16 (7) 783,
    ViT-L/16 (14) 1,567, ViT-H/14 (14) 4,262.
How (the paper's definition, vit_jax/flops.py): FLOPs = 2 × multiply-adds; a training step costs
3 × the forward pass; pre-training at 224 px; examples seen = steps × batch 4096, steps =
ceil(epochs × 303M / 4096). 303M is JFT-300M's size as the paper gives it ("18k classes and 303M
high-resolution images", Section 4.1); 18,291 classes (the head's FLOPs are negligible). With these
the plan is within 0.15 % of Table 6 for all but ViT-B/32, which comes 2.3 % above (56.3 vs 55).
Table 3's recipe for JFT-300M (see configs/sweeps/imagenet21k.py): weight decay 0.1, no dropout, lr
8e-4 (B), 6e-4 (L/32), 4e-4 (L/16), 3e-4 (H/14).
"""

from __future__ import annotations

import ml_collections

from configs.sweeps import imagenet21k
from vit_jax.scaling.sweep import Data, Sweep

JFT_EXAMPLES = 303_000_000
JFT_CLASSES = 18_291
# (model, epochs): Table 6's exaFLOPs; and each model's base lr (Table 3).
PAPER_EXAFLOPS = {("ViT-B/32", 7): 55, ("ViT-B/16", 7): 224, ("ViT-L/32", 7): 196,
                  ("ViT-L/16", 7): 783, ("ViT-L/16", 14): 1567, ("ViT-H/14", 14): 4262}
LR = {"ViT-B/32": 8e-4, "ViT-B/16": 8e-4, "ViT-L/32": 6e-4, "ViT-L/16": 4e-4, "ViT-H/14": 3e-4}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ARG: model=NAME[,epochs=E] (a Table 6 model; 7 epochs by default)."""
  args = dict(item.split("=", 1) for item in (arg or "model=ViT-B/16").split(",") if "=" in item)
  model = args.get("model", "ViT-B/16")
  if model not in LR:
    raise ValueError(f"configs/sweeps/table6.py: model {model!r} is not one of {sorted(LR)}")
  return imagenet21k.pretrain_config(
      model=model, dataset="jft", train_split="train", eval_split="validation",
      num_classes=JFT_CLASSES, examples=JFT_EXAMPLES, epochs=float(args.get("epochs", 7)),
      lr=LR[model], weight_decay=0.1, dropout=0.0)


def get_sweep(arg: str | None = None) -> Sweep:
  if arg:
    raise ValueError(f"configs/sweeps/table6.py takes no argument, got {arg!r}")
  sweep = Sweep([])
  for model, epochs in PAPER_EXAFLOPS:
    sweep += Sweep.product(config="configs/sweeps/table6.py:model={model}", models=[model],
                           data_sizes=[Data(None, JFT_EXAMPLES, label="jft300m")],
                           epochs=[epochs])
  return sweep
