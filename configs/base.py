"""Every config key the code reads, declared once with what it means.

Each experiment file starts from ``get_config()`` and updates it, so every override
(``--config.KEY=VALUE``) works on every config and a misspelt key is an error. Not itself an
experiment: ``configs/default.py`` is the default one.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

_TYPES = {int: int, float: float, str: str, bool: bool, tuple: tuple}


def model_block(**values) -> ml_collections.ConfigDict:
  """The ``model`` block: ``name`` plus every option of every registered model family
  (``vit_jax.models.registry.options()``, declared with each family's config). None means the
  family's default; only the options that are set reach ``models.create``, and a family
  refuses one it does not take, listing those it does."""
  from vit_jax.models import registry
  block = {"name": "ViT-B/16"}
  for key, kind in sorted(registry.options().items()):
    block[key] = placeholder(_TYPES.get(kind, object))
  unknown = sorted(set(values) - set(block))
  if unknown:
    raise ValueError(f"unknown model option(s) {unknown}; valid: {sorted(block)}")
  c = ml_collections.ConfigDict(block)
  c.update(values)
  return c


def takes_no_argument(arg: str | None, path: str) -> None:
  """For a config without variants: ``--config FILE:ARG`` is refused, not ignored."""
  if arg:
    name = "configs/" + path.replace("\\", "/").rsplit("/", 1)[-1]
    raise ValueError(f"{name} takes no argument (as in --config {name}), got {arg!r}")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "classification"         # a registered task (vit_jax/tasks/): classification | detection
  c.seed = 0                        # parameters, data order, augmentation and dropout keys

  # Data (vit_jax/data): a tfds name, "sklearn_digits" (embedded) or "imagefolder:/root".
  c.dataset = "sklearn_digits"
  c.data_dir = placeholder(str)     # where tfds datasets are prepared (None: tfds's default)
  c.train_split = "train"
  c.eval_split = "test"
  c.num_classes = 10
  c.image_size = 8                  # the model's input resolution (square)
  c.shuffle_buffer = 2_000
  # Input shards (0: one per process). Fix it to keep the global batch sequence when the
  # number of hosts changes between runs.
  c.num_data_shards = 0
  # Preprocessing: "|"-separated ops of vit_jax/data/preprocess_ops.py.
  c.pp_train = "decode|value_range(-1, 1)|onehot(10)|keep('image', 'labels')"
  c.pp_eval = "decode|value_range(-1, 1)|onehot(10)|keep('image', 'labels')"

  c.model = model_block()

  # Initialisation from a checkpoint (vit_jax.checkpoints.load_pretrained): a released .npz,
  # a timm .safetensors / torch file, or a workdir / checkpoint of this trainer.
  c.pretrained = placeholder(str)
  c.pretrained_options = ml_collections.ConfigDict(dict(
      format="auto",                # auto | vit | big_vision | timm | vit_jax
      resample_posemb="zoom",       # position embeddings to the new grid: zoom | bilinear | bicubic
      load=[".*"],                  # regexes (full match) of model parameters to take from the file
      init=[],                      # regexes of model parameters to keep as initialised instead
  ))

  c.batch_size = 128                # global batch, over every device and process
  c.eval_batch_size = 100
  c.grad_accum_steps = 1            # microbatches per step (the update is the full batch's)
  c.total_steps = 2_000
  c.lr = 1e-3                       # peak learning rate
  c.schedule = ml_collections.ConfigDict(dict(
      name="cosine",                # cosine | linear | rsqrt | constant | step, after the warm-up
      warmup_steps=200,             # linear from 0 to lr
      end_lr=0.0,                   # cosine and linear decay to this
      boundaries=(),                # step: the rate is multiplied by factor at each of these steps
      factor=0.1,
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",                 # adamw | sgd | adafactor: its block below goes to optax
      grad_clip_norm=1.0,           # global-norm clipping (0: none)
      weight_decay=1e-4,            # decoupled, times the learning rate; kernels only
      # Parameter groups: (regex, multiplier) pairs matched in order against parameter paths
      # such as "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"; the first match wins.
      lr_mults=[],                  # e.g. [("head/.*", 1.0), (".*", 0.1)]
      wd_mults=[],                  # e.g. [(".*posembed.*", 0.0)]
      frozen=[],                    # regexes of parameters that are never updated
      adamw=ml_collections.ConfigDict(dict(   # optax.scale_by_adam
          b1=0.9, b2=0.999, eps=1e-8, mu_dtype=placeholder(str))),
      sgd=ml_collections.ConfigDict(dict(     # optax.sgd
          momentum=0.9, nesterov=False, accumulator_dtype=placeholder(str))),
      adafactor=ml_collections.ConfigDict(dict(  # optax.adafactor
          decay_rate=0.8, clipping_threshold=1.0, momentum=placeholder(float),
          dtype_momentum="float32", multiply_by_parameter_scale=False)),
  ))

  # Classification (vit_jax/tasks/classification.py).
  c.loss = "softmax_xent"           # softmax_xent | sigmoid_xent
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.0               # 0: no mixup

  # Detection (vit_jax/tasks/detection.py): YOLOS-* and DETR-* with DETR's set loss.
  c.detection = ml_collections.ConfigDict(dict(
      canvas=placeholder(tuple),    # (height, width) every batch is padded to (None: image_size)
      buckets=(),                   # shape buckets: (height, width) canvases; each image is padded
                                    # to the one that suits its aspect ratio (() = one canvas)
      max_boxes=100,                # targets per image; boxes beyond it are dropped and counted
      class_cost=1.0,               # matching cost: class probability, L1 and GIoU of the boxes
      bbox_cost=5.0,
      giou_cost=2.0,
      ce_loss_coef=1.0,             # objective: classification, L1 and GIoU terms
      bbox_loss_coef=5.0,
      giou_loss_coef=2.0,
      eos_coef=0.1,                 # the no-object class's weight in the classification term
      matcher="scipy",              # scipy (on the host) | jax (on the device)
      aux_loss=True,                # DETR: every decoder layer's terms in the objective
  ))

  # Few-shot linear evaluation of the pre-logits features (vit_jax/few_shot, few_shot.py).
  c.few_shot = ml_collections.ConfigDict(dict(
      datasets=(),                  # "name:train_split:test_split" each; () = none
      shots=(1, 5, 10, 25),         # training examples per class
      seeds=3,                      # random k-shot draws; the accuracy is their mean
      l2_reg=2.0 ** 10,             # the least squares' l2 regularisation
      l2_grid=(),                   # if given: l2 chosen per dataset and k on a held-out fifth
      every=0,                      # steps between evaluations in training (0: at eval_every's)
      pp=placeholder(str),          # preprocessing of the few-shot images (None: the run's pp_eval)
  ))

  c.log_every = 100
  c.eval_every = 1_000
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 2

  # A preset (data_parallel, fsdp, tensor_parallel) or sizes such as "data=2,fsdp=-1,tensor=2".
  c.mesh = "data_parallel"
  # (logical axis, mesh axis or None) pairs overriding the defaults (vit_jax.train.sharding).
  c.sharding_rules = []
  return c
