r"""Fine-tune a released checkpoint with the original ViT recipe.

Run:  python train.py --config configs/finetune.py:model=ViT-B/16,dataset=cifar10 \
          --config.pretrained=ViT-B_16.npz --workdir workdirs/b16_cifar10
ARG:  model=<any registered name>,dataset=<cifar10|cifar100|oxford_iiit_pet|oxford_flowers102|
      imagenet2012|imagefolder:/root>[,num_classes=N]  (an image folder's classes are counted
      from root/<split>/<class>/ unless num_classes is given).

Recipe (google-research/vision_transformer, configs/common.py and vit.py): SGD with momentum
0.9 (bfloat16 momentum, as optim_dtype there), batch 512 in 8 accumulated microbatches of 64
(--config.grad_accum_steps=16 halves the memory again), linear warm-up then cosine decay, global
gradient clipping at 1.0, no weight decay, 384 px, Inception crop (5-100 % of the area) and
flips for training, a plain resize for evaluation, the head re-initialised to zeros (position
embeddings resampled to the 24x24 grid). lr 0.03 (0.01 for ViT-B/16 on CIFAR-10); 10k steps
(warm-up 500) for CIFAR, 20k for ImageNet, 500 (warm-up 100) for Pets, Flowers and image folders.

Published accuracy for each setting (top-1 on the eval split below):
  cifar10        ViT-B/16 99.02 %, ViT-B/32 98.88 %, ViT-L/16 99.13 %, ViT-L/32 99.06 %
  cifar100       ViT-B/16 92.06 %, ViT-B/32 92.31 %, ViT-L/16 92.91 %, ViT-L/32 93.29 %
  imagenet2012   ViT-B/16 84.53 %, ViT-B/32 81.66 %, ViT-L/16 84.47 %, ViT-L/32 81.89 %
                 (the original README's replication table, imagenet21k checkpoints, dropout 0);
                 augreg i21k checkpoints fine-tuned at 384 px: Ti/16 78.22 %, S/16 83.73 %,
                 B/16 85.49 %, L/16 85.59 %, S/32 79.58 %, B/32 83.59 %.
  oxford_iiit_pet    none published for these models with this recipe (big_vision's
                     configs/transfer.py reports 93.78 % for augreg B/32 at lr 0.003);
  oxford_flowers102  none published likewise (big_vision: 99.43 % for augreg B/32 at lr 0.003);
  imagefolder        none published.
Other model/dataset pairs: none published.
"""

import os

import ml_collections

from configs import base, default

IMAGE_SIZE = 384
# dataset: (classes, train split, eval split, steps, warm-up steps)
DATASETS = {
    "cifar10": (10, "train[:98%]", "test", 10_000, 500),
    "cifar100": (100, "train[:98%]", "test", 10_000, 500),
    "imagenet2012": (1000, "train[:99%]", "validation", 20_000, 500),
    "oxford_iiit_pet": (37, "train[:90%]", "test", 500, 100),
    "oxford_flowers102": (102, "train[:90%]", "test", 500, 100),
}
IMAGEFOLDER = "imagefolder:"
ARG_KEYS = ("model", "dataset", "num_classes")


def parse_arg(arg: str | None) -> dict:
  """'model=ViT-B/16,dataset=cifar10' -> {'model': 'ViT-B/16', 'dataset': 'cifar10'}."""
  out = {}
  for item in (arg or "").split(","):
    key, sep, value = item.partition("=")
    if not sep or key.strip() not in ARG_KEYS:
      raise ValueError(f"configs/finetune.py takes 'key=value' pairs with keys {ARG_KEYS}, "
                       f"e.g. configs/finetune.py:model=ViT-B/16,dataset=cifar10; got {arg!r}")
    out[key.strip()] = value.strip()
  for key in ("model", "dataset"):
    if key not in out:
      raise ValueError(f"configs/finetune.py needs {key}=...: e.g. model=ViT-B/16,dataset=cifar10")
  return out


def count_folder_classes(root: str) -> int:
  """Classes of an image folder: the union of root/<split>/<class> directory names."""
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise ValueError(f"image folder {root!r} does not exist; expected root/<split>/<class>/*.jpg")
  classes = {c for s in os.listdir(root) if os.path.isdir(os.path.join(root, s))
             for c in os.listdir(os.path.join(root, s)) if os.path.isdir(os.path.join(root, s, c))}
  if not classes:
    raise ValueError(f"image folder {root!r} has no root/<split>/<class>/ directories")
  return len(classes)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  model, dataset = args["model"], args["dataset"]
  if dataset.startswith(IMAGEFOLDER):
    num_classes, train_split, eval_split, steps, warmup = None, "train", "test", 500, 100
    num_classes = int(args.get("num_classes") or count_folder_classes(dataset[len(IMAGEFOLDER):]))
  elif dataset in DATASETS:
    num_classes, train_split, eval_split, steps, warmup = DATASETS[dataset]
    num_classes = int(args.get("num_classes", num_classes))
  else:
    raise ValueError(f"dataset {dataset!r} has no fine-tuning preset; use one of "
                     f"{sorted(DATASETS)} or 'imagefolder:/root'")

  c = default.get_config()
  c.dataset = dataset
  c.train_split = train_split
  c.eval_split = eval_split
  c.num_classes = num_classes
  c.image_size = IMAGE_SIZE
  c.shuffle_buffer = 50_000
  common = f"value_range(-1, 1)|onehot({num_classes})|keep('image', 'labels')"
  c.pp_train = f"decode|inception_crop({IMAGE_SIZE}, antialias=False)|flip_lr|{common}"
  c.pp_eval = f"decode|resize({IMAGE_SIZE}, antialias=False)|{common}"

  c.model = base.model_block(name=model)
  # The head is new (zeros); a representation layer of the checkpoint is dropped.
  c.pretrained_options.update(init=["head/.*", "pre_logits/.*"], resample_posemb="zoom")

  c.batch_size = 512
  c.grad_accum_steps = 8
  c.eval_batch_size = 512
  c.total_steps = steps
  c.lr = 0.01 if (model.replace("_", "/"), dataset) == ("ViT-B/16", "cifar10") else 0.03
  c.schedule.update(name="cosine", warmup_steps=warmup)
  c.optimizer.update(name="sgd", grad_clip_norm=1.0, weight_decay=0.0)
  c.optimizer.sgd.update(momentum=0.9, accumulator_dtype="bfloat16")
  c.loss = "softmax_xent"
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.0

  c.log_every = 10 if steps <= 1_000 else 50
  c.eval_every = 100 if steps <= 1_000 else 1_000
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 2
  return c
