"""Object detection with YOLOS and DETR (vit_jax/tasks/detection.py). ARG picks the recipe.

Run:     python train.py --config configs/detection.py:yolos_digits --workdir workdirs/yolos_digits
         (ARG: yolos_digits | detr_digits | yolos_ti_coco | detr_r50_coco;
         yolos_digits_backbone is yolos_digits' first stage, which it trains itself)
         python evaluate.py --config configs/detection.py:yolos_digits --workdir workdirs/yolos_digits
Reaches: on the embedded digit scenes' 1,000 test scenes (vit_jax/data/digit_scenes.py), one
         command each, every stage included, 2-core Intel Xeon, 2026-12-04 (AP50 / AP@[.5:.95];
         minutes from the command's start):
           yolos_digits  5 min: 0 / 0 (stage 1 done at 2.2 min, 92.3% top-1; step 1000 at 6.2 min:
                         0.8% / 0.2%); 9.8 min: 47.3% / 21.8%; 13.4 min: 68.4% / 43.6%;
                         17.0 min: 78.3% / 54.0%; ends at 20.8 min (5,000 steps): 82.5% / 59.4%
                         (so at 30 and 60 min: 82.5% / 59.4%). AMD EPYC, 2026-12-03: 83.3% / 60.7%
                         at 33.2 min.
           detr_digits   1.8 min: 1.3% / 0.5%; 4.9 min: 66.0% / 37.8%; 9.6 min: 90.8% / 66.9%;
                         13.0 min: 92.0% / 69.5%; ends at 13.5 min (8,000 steps): 92.0% / 69.5%
                         (AP75 85.6%; so at 15, 30 and 60 min: 92.0% / 69.5%).
         yolos_ti_coco and detr_r50_coco are the papers' COCO recipes: 28.7 AP (YOLOS-Ti)
         and 42.0 AP (DETR-R50) are the papers' figures, not reproduced here (there is no COCO on
         the machines this project is developed on). They pad each image to one of five shape
         buckets (aspect_buckets) rather than one square canvas.
Your own data (COCO-format annotations and their images; K classes) and a checkpoint to start from
(a released YOLOS or DETR checkpoint: an HF folder or the original .pth; or a ViT or DeiT
classifier for YOLOS, timm's distilled DeiTs too, whose det tokens and heads then start new):
         python train.py --config configs/detection.py:yolos_digits --workdir workdirs/mine \
           --config.dataset=coco:/data/coco_mine/instances.json,/data/coco_mine/images \
           --config.num_classes=K --config.model.channels=3 --config.pretrained=PATH
"""

import ml_collections

from configs import base

_TRAIN_KEYS = "'image', 'pixel_mask', 'boxes', 'labels', 'box_mask', 'boxes_dropped'"
_EVAL_KEYS = _TRAIN_KEYS + ", 'image_id', 'orig_size', 'is_crowd'"


def _pp(ops: str, canvas: tuple[int, int], max_boxes: int, keys: str) -> str:
  return (f"{ops}|value_range(-1, 1)|det_pad({canvas})|det_pad_boxes({max_boxes})"
          f"|keep({keys})")


def digits(c: ml_collections.ConfigDict) -> None:
  """The embedded 64x64 digit scenes: 10 classes, up to 6 digits per scene."""
  c.dataset = "digit_scenes"
  c.num_classes = 10
  c.image_size = 64
  c.detection.canvas = (64, 64)
  c.detection.max_boxes = 8
  c.pp_train = _pp("decode|det_objects", (64, 64), 8, _TRAIN_KEYS)
  c.pp_eval = _pp("decode|det_objects(drop_crowd=False)", (64, 64), 8, _EVAL_KEYS)
  c.eval_batch_size = 200
  c.shuffle_buffer = 20_000


# The YOLOS encoder of yolos_digits (ViT-Ti width, 4 layers, 8x8 patches, grey images).
_DIGITS_ENCODER = dict(channels=1, hidden_size=192, num_layers=4, num_heads=3, mlp_dim=768)


def yolos_digits_backbone(c: ml_collections.ConfigDict) -> None:
  """Stage 1 of yolos_digits, as YOLOS pre-trains its ViT on ImageNet: the encoder classifies
  single training digits placed at a random size (12-24 px) and position on a 32x32 canvas."""
  c.task = "classification"
  c.dataset = "sklearn_digits"
  c.num_classes = 10
  c.image_size = 32
  pp = "decode|place_randomly(32, 12, 24)|value_range(-1, 1)|onehot(10)|keep('image', 'labels')"
  c.pp_train = c.pp_eval = pp
  c.model = base.model_block(name="ViT-Ti/8", classifier="token", **_DIGITS_ENCODER)
  c.batch_size = 128
  c.eval_batch_size = 100
  c.total_steps = 800
  c.lr = 1e-3
  c.schedule.update(name="cosine", warmup_steps=200, end_lr=1e-5)
  c.optimizer.update(name="adamw", weight_decay=1e-4, grad_clip_norm=1.0)
  c.eval_every = c.checkpoint_every = 800


def yolos_digits(c: ml_collections.ConfigDict) -> None:
  """Stage 2: YOLOS started from stage 1's encoder (det tokens and heads new, positions
  resampled from the 4x4 to the 8x8 grid), trained on the scenes."""
  digits(c)
  c.model = base.model_block(name="YOLOS-Ti/8", num_det_tokens=20, **_DIGITS_ENCODER)
  c.pretrained = "train:configs/detection.py:yolos_digits_backbone"
  c.batch_size = 32
  c.total_steps = 5_000
  c.lr = 5e-4
  c.schedule.update(name="cosine", warmup_steps=500, end_lr=1e-5)
  c.optimizer.update(name="adamw", weight_decay=1e-4, grad_clip_norm=0.1)


def detr_digits(c: ml_collections.ConfigDict) -> None:
  digits(c)
  c.model = base.model_block(
      name="DETR-R50", channels=1, resnet_layers=(1, 1), resnet_width=16, hidden_size=128,
      encoder_layers=2, decoder_layers=2, num_heads=4, mlp_dim=512, num_queries=20,
      dropout_rate=0.0, attention_dropout_rate=0.0)
  c.batch_size = 32
  c.total_steps = 8_000
  c.lr = 5e-4
  c.schedule.update(name="cosine", warmup_steps=500, end_lr=1e-6)
  c.optimizer.update(name="adamw", weight_decay=1e-4, grad_clip_norm=0.1)


def _coco(c: ml_collections.ConfigDict, canvas: tuple[int, int], train_ops: str,
          eval_ops: str) -> None:
  c.dataset = "coco/2017"
  c.train_split, c.eval_split = "train", "validation"
  c.num_classes = 80
  c.image_size = max(canvas)
  c.detection.canvas = canvas
  c.detection.max_boxes = 100
  c.pp_train = _pp(f"decode|det_objects|det_flip_lr|{train_ops}", canvas, 100, _TRAIN_KEYS)
  c.pp_eval = _pp(f"decode|det_objects(drop_crowd=False)|{eval_ops}", canvas, 100, _EVAL_KEYS)
  c.shuffle_buffer = 10_000
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  c.keep_checkpoints = 3


def aspect_buckets(short: int, long: int) -> tuple[tuple[int, int], ...]:
  """Shape buckets for images resized to a shorter side of at most ``short`` and a longer one of at
  most ``long``: square, 4:3 and the widest, landscape and portrait, each rounded up to a multiple
  of 32. Every image goes to the narrowest that holds it at the largest scale
  (``buckets.best_canvas``); an augmented image larger than its bucket's canvas (a crop of another
  aspect ratio) is shrunk to fit by ``det_pad``."""
  up = lambda n: -(-n // 32) * 32
  mid, wide = up(min(long, -(-short * 4 // 3))), up(long)
  short = up(short)
  return ((short, short), (short, mid), (mid, short), (short, wide), (wide, short))


def _detr_augment(scales: tuple[int, ...], max_size: int) -> str:
  """DETR's training augmentation: resize to a random scale, or resize-crop-resize."""
  return (f'det_select(0.5, "det_resize({scales}, {max_size})", "det_resize((400, 500, 600))'
          f'|det_random_size_crop(384, 600)|det_resize({scales}, {max_size})")')


def yolos_ti_coco(c: ml_collections.ConfigDict) -> None:
  """YOLOS-Ti's recipe: 300 epochs at batch 16 (118,287 images per epoch)."""
  scales = tuple(range(256, 609, 32))
  _coco(c, (864, 864), _detr_augment(scales, 864), "det_resize(512, 864)")
  c.detection.buckets = aspect_buckets(608, 864)
  c.model = base.model_block(name="YOLOS-Ti", num_det_tokens=100, dropout_rate=0.0)
  c.batch_size = 16
  c.total_steps = 300 * 118_287 // 16
  c.lr = 5e-5
  c.schedule.update(name="cosine", warmup_steps=0, end_lr=1e-7)
  # AdamW, decay 1e-4 on the weight matrices only (not on biases, norms, position embeddings,
  # the class and det tokens: the optimizer's default), clip 0.1.
  c.optimizer.update(name="adamw", weight_decay=1e-4, grad_clip_norm=0.1)


def detr_r50_coco(c: ml_collections.ConfigDict) -> None:
  """DETR-R50's recipe: 500 epochs at batch 64, lr x0.1 after epoch 400, the backbone at 1e-5
  with its stem and first stage frozen (the original trains layer2-4 of the ResNet)."""
  scales = tuple(range(480, 801, 32))
  _coco(c, (1333, 1333), _detr_augment(scales, 1333), "det_resize(800, 1333)")
  c.detection.buckets = aspect_buckets(800, 1333)
  c.model = base.model_block(name="DETR-R50", num_queries=100)
  c.batch_size = 64
  steps_per_epoch = 118_287 // 64
  c.total_steps = 500 * steps_per_epoch
  c.lr = 1e-4
  c.schedule.update(name="step", warmup_steps=0, boundaries=(400 * steps_per_epoch,), factor=0.1)
  c.optimizer.update(name="adamw", weight_decay=1e-4, grad_clip_norm=0.1)
  c.optimizer.lr_mults = [("backbone/.*", 0.1)]
  c.optimizer.frozen = ["backbone/(conv1|layer1)/.*"]


RECIPES = {"yolos_digits": yolos_digits, "yolos_digits_backbone": yolos_digits_backbone,
           "detr_digits": detr_digits,
           "yolos_ti_coco": yolos_ti_coco, "detr_r50_coco": detr_r50_coco}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in RECIPES:
    raise ValueError(f"configs/detection.py takes one of {sorted(RECIPES)} as ARG "
                     f"(configs/detection.py:yolos_digits), got {arg!r}")
  c = base.get_config()
  c.task = "detection"
  c.log_every = 100
  c.eval_every = 1_000
  c.checkpoint_every = 1_000
  RECIPES[arg](c)
  return c
