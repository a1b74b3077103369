"""ViT-B/16 at 224 px on a folder of JPEGs: how soon ``train.py`` takes its first step.

Run:     python bench/first_step.py      (writes the JPEGs, starts train.py with this config, times it)
   or    python train.py --config configs/bench_vit_b16.py:/path/to/imagefolder --workdir /tmp/b16
         (the folder holds root/{train,test}/<class>/*.jpg with 10 classes)
Reaches: the first training step within 60 s of starting on a 2-core CPU (docs/benchmarks.md).
         A start-up and speed check, not a training recipe: 3 steps of batch 8.
"""

import ml_collections

from configs import base, default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.dataset = f"imagefolder:{arg or '/tmp/vit_jax_bench_images'}"
  c.num_classes = 10
  c.image_size = 224
  c.shuffle_buffer = 64
  c.pp_train = ("decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(10)"
                "|keep('image', 'labels')")
  c.pp_eval = "decode|resize(224)|value_range(-1, 1)|onehot(10)|keep('image', 'labels')"
  c.model = base.model_block(name="ViT-B/16", scan=False)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.total_steps = 3
  c.lr = 1e-4
  c.schedule.update(name="constant", warmup_steps=0)
  c.label_smoothing = 0.0
  c.log_every = 1
  c.eval_every = 1_000
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 1
  return c
