r"""The ViT paper's public regime: ImageNet-21k pre-training, then fine-tuning and few-shot evaluation.

Ready for a pod or a SLURM cluster; never run on this machine (no ImageNet-21k here). First the plan
(exaFLOPs and estimated GPU-hours of every run), then the sweep:
  python sweep.py --sweep configs/sweeps/imagenet21k.py --plan --accelerator h100
  python sweep.py --sweep configs/sweeps/imagenet21k.py:data_dir=/shared/tfds \
      --root /shared/sweeps/i21k --executor slurm --slurm_partition gpu --slurm_nodes 4 \
      --slurm_gpus_per_node 8 --slurm_cpus_per_task 12 --slurm_time 4320 \
      --slurm_setup 'source .venv/bin/activate'
Launch the same command again to see what finished and to submit what is missing (a run preempted or
out of time is requeued by submitit and resumes from its checkpoint); --only 'ViT-B32' picks runs.
ARG (optional, comma-separated): data=imagefolder:/root (root/train/<class>/*.jpg and
root/val/...; default: a TFDS builder named imagenet21k in data_dir, big_vision's split:
full[51200:] for training, full[:51200] held out), data_dir=PATH, examples=N (training images;
counted if not given for an image folder), l_epochs=30 (ViT-L and H for 30 epochs instead of 90).
The pre-training config is this file's get_config: python train.py --config
configs/sweeps/imagenet21k.py:model=ViT-B/16 --workdir DIR trains one model alone.

Pre-training recipe: the ViT paper (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
arXiv:2010.11929), Appendix B.1 and Table 3 (all models: batch 4096, linear warm-up of 10k steps,
224 px; Adam β1 = 0.9, β2 = 0.999; "for ImageNet we found it beneficial to additionally apply
gradient clipping at global norm 1"):
    Models          Dataset        Epochs  Base LR  LR decay  Weight decay  Dropout
    ViT-B/{16,32}   JFT-300M       7       8e-4     linear    0.1           0.0
    ViT-L/32        JFT-300M       7       6e-4     linear    0.1           0.0
    ViT-L/16        JFT-300M       7/14    4e-4     linear    0.1           0.0
    ViT-H/14        JFT-300M       14      3e-4     linear    0.1           0.0
    R50x1           JFT-300M       7       1e-3     linear    0.1           0.0
    R50+ViT-B/16    JFT-300M       7       8e-4     linear    0.1           0.0
    ViT-B/{16,32}   ImageNet-21k   90      1e-3     linear    0.03          0.1
    ViT-L/{16,32}   ImageNet-21k   30/90   1e-3     linear    0.03          0.1
So ImageNet-21k pre-training here uses weight decay 0.03 and dropout 0.1 (the paper's "high weight
decay of 0.1" is its JFT rows; configs/sweeps/table6.py has them). Table 3 has no ImageNet-21k row
for ViT-H/14 (trained on JFT only), R50x1 or the hybrid: H/14 takes the ViT-L row, R50x1 (BiT) and
R50+ViT-B/16 the ViT-B row. The classification head is an MLP with one hidden layer (the
representation, of the model's width) at pre-training (paper, Section 3.1); fine-tuning drops it.
Weight decay is decoupled and scaled by the learning rate (this library's adamw), the linear decay
ends at 1e-5 (the original repository's --linear_end), softmax cross-entropy, Inception crop and
flips, bfloat16 activations. Fine-tuning: configs/finetune.py (the paper's Appendix B.1.1 recipe) on
imagenet2012, cifar10, cifar100, oxford_iiit_pet and oxford_flowers102; few-shot: linear
regression on frozen features (few_shot.py) with 1, 5, 10 and 25 examples per class.
Results: not measured here. The paper's for comparison (Table 2 / 5, ImageNet-21k pre-training,
fine-tuned at 384 px): ViT-L/16 85.30 % ImageNet top-1, 99.38 % CIFAR-10, 93.25 % CIFAR-100,
94.67 % Pets, 99.61 % Flowers.
"""

from __future__ import annotations

import ml_collections

from configs import base, finetune
from vit_jax.scaling.sweep import Data, FewShot, Sweep, Transfer

BATCH = 4096
IMAGE_SIZE = 224
TFDS_NAME, TFDS_CLASSES = "imagenet21k", 21843  # big_vision's imagenet21k builder
TFDS_TRAIN, TFDS_EVAL = "full[51200:]", "full[:51200]"
TFDS_EXAMPLES = 14_197_122 - 51_200             # ImageNet-21k (fall 2011): 14,197,122 images
# model: (epochs, base lr), Table 3's ImageNet-21k rows (H/14, R50x1 and the hybrid: see above).
MODELS = {
    "ViT-B/32": (90, 1e-3), "ViT-B/16": (90, 1e-3), "ViT-L/32": (90, 1e-3),
    "ViT-L/16": (90, 1e-3), "ViT-H/14": (90, 1e-3), "BiT-R50x1": (90, 1e-3),
    "R50+ViT-B/16": (90, 1e-3),
}
WEIGHT_DECAY, DROPOUT = 0.03, 0.1
TRANSFERS = ("imagenet2012", "cifar10", "cifar100", "oxford_iiit_pet", "oxford_flowers102")
FEW_SHOT = ("imagenet2012:train:validation", "cifar10:train:test", "cifar100:train:test",
            "oxford_iiit_pet:train:test", "oxford_flowers102:train:test")
FEW_SHOT_PP = f"decode|resize({IMAGE_SIZE})|value_range(-1, 1)|keep('image', 'label')"
ARG_KEYS = ("model", "data", "data_dir", "examples", "l_epochs", "epochs")


def parse_arg(arg: str | None) -> dict[str, str]:
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key.strip() not in ARG_KEYS:
      raise ValueError(f"configs/sweeps/imagenet21k.py takes key=value pairs with keys {ARG_KEYS}, "
                       f"e.g. data=imagefolder:/data/i21k,l_epochs=30; got {arg!r}")
    out[key.strip()] = value.strip()
  return out


def head_width(name: str) -> int | None:
  """The width of a ViT or hybrid (its pre-training representation layer); None for others."""
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  family, match = registry.resolve(name)
  if "representation_size" not in family.options:
    return None
  variant = match["variant"]
  vit, _ = registry.resolve(f"ViT-{variant}/16")
  return vit.sizes[variant]["hidden_size"]


def model_block(name: str, dropout: float) -> ml_collections.ConfigDict:
  """The model with the paper's pre-training options that its family takes."""
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  family, _ = registry.resolve(name)
  wanted = dict(classifier="token", posemb="learn", representation_size=head_width(name),
                dropout_rate=dropout, dtype="bfloat16", scan=True)
  return base.model_block(name=name, **{k: v for k, v in wanted.items()
                                        if k in family.options and v is not None})


def pretrain_config(*, model: str, dataset: str, train_split: str, eval_split: str,
                    num_classes: int, examples: int | None, epochs: float, lr: float,
                    weight_decay: float, dropout: float, data_dir: str | None = None
                    ) -> ml_collections.ConfigDict:
  """Table 3's pre-training recipe (shared with configs/sweeps/table6.py)."""
  c = base.get_config()
  c.dataset = dataset
  c.data_dir = data_dir
  c.train_split, c.eval_split = train_split, eval_split
  c.num_classes = num_classes
  c.image_size = IMAGE_SIZE
  c.shuffle_buffer = 250_000
  common = f"value_range(-1, 1)|onehot({num_classes})|keep('image', 'labels')"
  c.pp_train = f"decode|inception_crop({IMAGE_SIZE})|flip_lr|{common}"
  c.pp_eval = f"decode|resize(256)|central_crop({IMAGE_SIZE})|{common}"
  c.model = model_block(model, dropout)
  c.batch_size = BATCH
  c.eval_batch_size = 1024
  # The sweep sets total_steps from the counted examples; alone, 1 epoch of unknown size is 1 step.
  c.total_steps = max(1, -(-int(epochs * (examples or BATCH)) // BATCH))
  c.lr = lr
  c.schedule.update(name="linear", warmup_steps=10_000, end_lr=1e-5)
  c.optimizer.update(name="adamw", weight_decay=weight_decay, grad_clip_norm=1.0)
  c.optimizer.adamw.update(b1=0.9, b2=0.999)
  c.loss = "softmax_xent"
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.0
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  c.keep_checkpoints = 2
  c.mesh = "data_parallel"
  return c


def _data(args: dict[str, str]) -> tuple[str, str, str, int, int | None]:
  """(dataset, train split, eval split, classes, training examples or None: count them)."""
  data = args.get("data", TFDS_NAME)
  examples = int(args["examples"]) if "examples" in args else None
  if data.startswith(finetune.IMAGEFOLDER):
    classes = finetune.count_folder_classes(data[len(finetune.IMAGEFOLDER):])
    return data, "train", "val", classes, examples
  if data != TFDS_NAME:
    raise ValueError(f"data={data!r}: give imagefolder:/root or leave it out (TFDS {TFDS_NAME})")
  return data, TFDS_TRAIN, TFDS_EVAL, TFDS_CLASSES, examples or TFDS_EXAMPLES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  model = args.get("model", "ViT-B/16")
  dataset, train_split, eval_split, classes, examples = _data(args)
  epochs, lr = MODELS.get(model, (90, 1e-3))
  if "epochs" in args:
    epochs = float(args["epochs"])
  elif "l_epochs" in args and model.split("/")[0] in ("ViT-L", "ViT-H"):
    epochs = float(args["l_epochs"])
  return pretrain_config(model=model, dataset=dataset, train_split=train_split,
                         eval_split=eval_split, num_classes=classes, examples=examples,
                         epochs=epochs, lr=lr, weight_decay=WEIGHT_DECAY, dropout=DROPOUT,
                         data_dir=args.get("data_dir"))


def finetune_size(model: str, dataset: str) -> dict:
  """configs/finetune.py's 384 px, or for a patch size that does not divide it (H/14) the
  paper's 518 px (its ViT-H/14 fine-tuning resolution): the overrides."""
  patch = int(model.rsplit("/", 1)[-1]) if "/" in model else 16
  if finetune.IMAGE_SIZE % patch == 0:
    return {}
  size = 518
  common = f"value_range(-1, 1)|onehot({finetune.DATASETS[dataset][0]})|keep('image', 'labels')"
  return {"image_size": size,
          "pp_train": f"decode|inception_crop({size}, antialias=False)|flip_lr|{common}",
          "pp_eval": f"decode|resize({size}, antialias=False)|{common}"}


def get_sweep(arg: str | None = None) -> Sweep:
  args = parse_arg(arg)
  if "model" in args or "epochs" in args:
    raise ValueError("the sweep picks the models and epochs itself: pick runs with --only")
  _, _, _, _, examples = _data(args)
  data_dir = {"data_dir": args["data_dir"]} if "data_dir" in args else {}
  config = "configs/sweeps/imagenet21k.py:model={model}" + (f",{arg}" if arg else "")
  sweep = Sweep([])
  for model, (epochs, _) in MODELS.items():
    if "l_epochs" in args and model.split("/")[0] in ("ViT-L", "ViT-H"):
      epochs = float(args["l_epochs"])
    sweep += Sweep.product(
        config=config, models=[model], data_sizes=[Data(None, examples, label="i21k")],
        epochs=[epochs], seeds=[0],
        transfers=[Transfer(d, overrides={**data_dir, **finetune_size(model, d)})
                   for d in TRANSFERS],
        few_shot=FewShot(overrides={
            "few_shot.datasets": FEW_SHOT, "few_shot.shots": (1, 5, 10, 25),
            "few_shot.pp": FEW_SHOT_PP}))
  return sweep
