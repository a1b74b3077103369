r"""A scaling sweep that runs on a laptop: pre-train on the digits 0-4, transfer to the digits 5-9.

  python sweep.py --sweep configs/sweeps/digits.py --root workdirs/sweep_digits
  python plot_sweep.py --root workdirs/sweep_digits        # the table's plots and fits

Four ViTs (width 16 to 128, patch 2 on the 8x8 digits) and two BiT ResNets (two stages of one
unit, width 8 and 16) are each pre-trained on three data sizes of the digits 0-4 (25 %, 50 % and
all of `train_0to4`: 188, 375 and 750 images) for 200 epochs, evaluated on `test_0to4`, then
  * fine-tuned on `train_5to9` (747 images, 200 steps from the pre-trained weights, head included)
    and evaluated on `test_5to9`: the transfer column;
  * evaluated few-shot on the same classes at the end of pre-training (1, 5, 10 and 25 images per
    class, 3 seeds: `config.few_shot`), on frozen features: the few-shot columns.
Six models x three data sizes: 18 pre-training and 18 fine-tuning runs of `train.py`. What it
reaches and how long it takes on this machine: README "Scaling curves" and docs/benchmarks.md.
"""

from __future__ import annotations

from vit_jax.scaling.sweep import Data, Sweep, Transfer

EPOCHS = 200
FEW_SHOT = "sklearn_digits:train_5to9:test_5to9"
VIT = {f"ViT-{size}": {"model.name": "ViT-Ti/2", "model.hidden_size": width, "model.num_layers": depth,
                      "model.num_heads": heads, "model.mlp_dim": 2 * width}
       for size, width, depth, heads in (("XS", 16, 2, 2), ("S", 32, 2, 2), ("M", 64, 4, 4),
                                         ("L", 128, 4, 4))}
BIT = {f"BiT-{size}": {"model.width": width} for size, width in (("S", 8), ("M", 16))}
# Each family's base config: configs/families.py:bit holds the BiT block (ViT options unset).
FAMILIES = (("configs/default.py", VIT), ("configs/families.py:bit", BIT))
PRETRAIN = {
    "eval_split": "test_0to4",
    "batch_size": 64,
    "lr": 1e-3,
    "schedule.warmup_steps": 100,
    "log_every": 100,
    "checkpoint_every": 1000,
    "few_shot.datasets": (FEW_SHOT,),
    "few_shot.every": 100_000,  # once, at the end
}
TRANSFER = {"train_split": "train_5to9", "eval_split": "test_5to9", "batch_size": 64,
            "total_steps": 200, "lr": 1e-3, "schedule.warmup_steps": 20, "log_every": 50,
            "eval_every": 200, "checkpoint_every": 200}


def get_sweep(arg: str | None = None) -> Sweep:
  if arg:
    raise ValueError(f"configs/sweeps/digits.py takes no argument, got {arg!r}")
  sweep = Sweep([])
  for config, models in FAMILIES:
    sweep += Sweep.product(
        config=config,
        models=models,
        data_sizes=[Data("train_0to4[:25%]", label="25pct"),
                    Data("train_0to4[:50%]", label="50pct"), Data("train_0to4", label="all")],
        epochs=[EPOCHS],
        overrides=PRETRAIN,
        transfers=[Transfer("digits5to9", config=config, overrides=TRANSFER)])
  return sweep
