r"""Pre-train a ViT from scratch on ImageNet-1k (big_vision's "better plain ViT baselines" recipe).

Run:  python train.py --config configs/imagenet_vit.py:ViT-S/16 --workdir workdirs/s16_i1k \
          --config.data_dir=/path/to/tensorflow_datasets
      ARG is any registered ViT name (default ViT-S/16). Scale-out switches: --config.mesh=fsdp
      (or data_parallel, tensor_parallel), --config.model.scan=True, --config.model.remat=full,
      --config.model.dtype=bfloat16, --config.optimizer.adamw.mu_dtype=bfloat16, --config.grad_accum_steps=K.
Check memory before a job:  python train.py --config configs/imagenet_vit.py:ViT-g/14 --dry_run \
      --fake_devices 64 --config.mesh=fsdp --config.model.scan=True --config.model.remat=full
Result: not measured here (no ImageNet on this machine). big_vision reports 76.5 % top-1 for
ViT-S/16 after 90 epochs with this recipe plus RandAugment(2, 10), an op vit_jax does not have yet.

Recipe: global-average pooling, fixed 2D sin-cos position embeddings, batch 1024, AdamW
(b2 0.999, decoupled weight decay 1e-4 of the learning rate), lr 1e-3 with 10k warm-up steps
and cosine decay, 90 epochs, Inception crop at 224 px, flips, mixup 0.2, gradient clipping 1.0.
"""

import ml_collections

from configs import base, default

STEPS_PER_EPOCH = 1_281_167 // 1024


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.dataset = "imagenet2012"
  c.train_split = "train[:99%]"
  c.eval_split = "train[99%:]"  # minival, as big_vision
  c.num_classes = 1000
  c.image_size = 224
  c.shuffle_buffer = 250_000
  c.pp_train = ("decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(1000)|"
                "keep('image', 'labels')")
  c.pp_eval = "decode|resize(256)|central_crop(224)|value_range(-1, 1)|onehot(1000)|keep('image', 'labels')"
  c.model = base.model_block(
      name=arg or "ViT-S/16", classifier="gap", posemb="sincos2d", dropout_rate=0.0,
      stochastic_depth=0.0, dtype="float32", scan=False, remat="none", attention="explicit")
  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.total_steps = 90 * STEPS_PER_EPOCH
  c.lr = 1e-3
  c.schedule.update(name="cosine", warmup_steps=10_000)
  c.optimizer.update(name="adamw", weight_decay=1e-4, grad_clip_norm=1.0)
  c.optimizer.adamw.update(b1=0.9, b2=0.999)
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.2
  c.log_every = 100
  c.eval_every = 5_000
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3
  c.mesh = "data_parallel"
  return c
