"""Transfer on the real digits: pretrain on 0-4 at 8x8, fine-tune on 5-9 at 16x16, vs from scratch.

Run:    .venv/bin/python bench/transfer_digits.py [--seeds 3] [--json out.json]
        (about 30 minutes on 2 shared CPU cores; steps, not time, are measured, so load does not matter)

Data: scikit-learn's 1,797 digits with the library's fixed stratified split
(``vit_jax.data.digits.split_indices``: 1,497 train, 300 test); the 0-4 images of the train
split pretrain, the 5-9 images of the train split fine-tune, and the 5-9 images of the test split
(149) measure. Fine-tuning is at twice the resolution: images upsampled bilinearly to 16x16,
patch 2 as before, so the 4x4 grid of position embeddings is resampled to 8x8 (the original
zoom) and the head is re-initialised (``load_pretrained(..., init=["head/.*"])`` from the
exported npz). The from-scratch model is the same 16x16 model with a fresh initialisation.

Both runs of a seed use the same optimizer, schedule, batches and step function (the library's
``make_train_step``: AdamW as in configs/default.py, cosine decay with warm-up, label smoothing
0.1, batch 128), and are evaluated every ``--eval_every`` steps; the figure is the first step at
which the 5-9 test accuracy reaches each of ``--targets`` (a run stops once it reached them all;
the schedule is always that of ``--steps``).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import harness  # bench/, beside this script
from configs import default
from vit_jax import checkpoints, models
from vit_jax.train import optimizer
from vit_jax.train.state import TrainState
from vit_jax.tasks.classification import Classification
from vit_jax.train.step import make_eval_step, make_train_step, split_model

MODEL = dict(name="ViT-Ti/2", channels=1, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128)


def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train', 'test'}: images in [-1, 1] [N, 8, 8, 1] and labels, the library's split."""
  from vit_jax.data.digits import digits_arrays, split_indices  # Imports tensorflow_datasets.
  images, labels = digits_arrays()
  images = images.astype(np.float32) / 127.5 - 1.0
  return {s: (images[i], labels[i]) for s, i in split_indices(labels).items()}


def subset(data, split: str, first: int, size: int):
  """Digits ``first..first+4`` of ``split`` relabelled 0..4, at ``size`` x ``size``."""
  x, y = data[split]
  keep = (y >= first) & (y < first + 5)
  x, y = x[keep], y[keep] - first
  if size != x.shape[1]:
    x = np.asarray(jax.image.resize(x, (x.shape[0], size, size, 1), "linear"))
  return x, y


def config(image_size: int, total_steps: int, lr: float, warmup: int) -> ml_collections.ConfigDict:
  """configs/default.py with this experiment's model, classes, resolution and schedule."""
  c = default.get_config()
  c.model.update(MODEL)
  c.num_classes, c.image_size = 5, image_size
  c.lr, c.total_steps = lr, total_steps
  c.schedule.warmup_steps = warmup
  return c


def train(model: nnx.Module, c, train_set, test_set, *, seed: int, eval_every: int,
          targets: tuple[float, ...] = (), batch_size: int = 128) -> dict:
  """Trains ``model`` on ``c.total_steps``' schedule, stopping early once the test accuracy
  reached every one of ``targets``; returns the accuracy curve and, for each target, the first
  evaluated step that reached it (None: not within ``c.total_steps``)."""
  task = Classification(c)
  graphdef, params, model_state = split_model(model)
  schedule = optimizer.make_schedule(c.lr, c.total_steps, **c.schedule)
  tx = optimizer.make_optimizer(c.optimizer, schedule)
  st = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                  model_state=model_state)
  step_fn = jax.jit(make_train_step(graphdef, task, tx, schedule, seed=seed), donate_argnums=0)
  eval_fn = jax.jit(make_eval_step(graphdef, task))
  x, y = train_set
  onehot = np.eye(5, dtype=np.float32)
  test = {"image": test_set[0], "labels": onehot[test_set[1]]}
  order = np.random.default_rng(seed)
  perm, pos = order.permutation(len(x)), 0
  curve, reached = [], {t: None for t in targets}
  for step in range(1, c.total_steps + 1):
    if pos + batch_size > len(perm):
      perm, pos = order.permutation(len(x)), 0
    idx = perm[pos:pos + batch_size]
    pos += batch_size
    st, _ = step_fn(st, {"image": x[idx], "labels": onehot[y[idx]]})
    if step % eval_every == 0 or step == c.total_steps:
      top1, count = jax.device_get(eval_fn(st.params, st.model_state, test))["top1"]
      acc = float(top1 / count)
      curve.append((step, acc))
      for t in targets:
        if reached[t] is None and acc >= t:
          reached[t] = step
      if targets and all(v is not None for v in reached.values()):
        break
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.device_get(st.params))
  nnx.update(model, state)  # The trained weights, for exporting.
  return {"curve": curve, "reached": reached, "final": curve[-1][1]}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--pretrain_steps", type=int, default=1500)
  p.add_argument("--steps", type=int, default=1000, help="fine-tuning / from-scratch steps")
  p.add_argument("--eval_every", type=int, default=10)
  p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95])
  p.add_argument("--json", help="write the record here")
  args = p.parse_args(argv)

  data = digits()
  pre_train, pre_test = subset(data, "train", 0, 8), subset(data, "test", 0, 8)
  ft_train, ft_test = subset(data, "train", 5, 16), subset(data, "test", 5, 16)
  print(f"pretrain 0-4: {len(pre_train[1])} train / {len(pre_test[1])} test at 8x8; "
        f"5-9: {len(ft_train[1])} train / {len(ft_test[1])} test at 16x16")
  kw = {k: v for k, v in MODEL.items() if k != "name"}
  rows, runs = [], []
  tmp = tempfile.mkdtemp()
  for seed in range(args.seeds):
    pre = models.create(MODEL["name"], num_classes=5, image_size=8, rngs=nnx.Rngs(100 + seed), **kw)
    pre_run = train(pre, config(8, args.pretrain_steps, 1e-3, 200), pre_train, pre_test, seed=seed,
                    eval_every=args.pretrain_steps)
    npz = checkpoints.export_npz(pre, os.path.join(tmp, f"pretrained_{seed}.npz"))

    ft_cfg = config(16, args.steps, 1e-3, 100)
    finetuned = models.create(MODEL["name"], num_classes=5, image_size=16, rngs=nnx.Rngs(seed), **kw)
    checkpoints.load_pretrained(finetuned, npz, init=["head/.*"])
    targets = tuple(args.targets)
    ft = train(finetuned, ft_cfg, ft_train, ft_test, seed=seed, eval_every=args.eval_every, targets=targets)
    scratch = models.create(MODEL["name"], num_classes=5, image_size=16, rngs=nnx.Rngs(seed), **kw)
    sc = train(scratch, ft_cfg, ft_train, ft_test, seed=seed, eval_every=args.eval_every, targets=targets)
    row = {"seed": seed, "pretrain 0-4 test acc": pre_run["final"]}
    for t in targets:
      row[f"fine-tuned: steps to {t:.0%}"] = ft["reached"][t] or f">{args.steps}"
      row[f"scratch: steps to {t:.0%}"] = sc["reached"][t] or f">{args.steps}"
    print(row, flush=True)
    rows.append(row)
    runs.append({"seed": seed, "pretrain": pre_run, "finetune": ft, "scratch": sc})
  columns = list(rows[0])
  print(harness.format_table(rows, columns))
  for t in args.targets:
    ft_steps = [r["finetune"]["reached"][t] for r in runs]
    sc_steps = [r["scratch"]["reached"][t] for r in runs]
    if all(s is not None for s in ft_steps + sc_steps):
      print(f"median steps to {t:.0%} on 5-9: fine-tuned {np.median(ft_steps):.0f}, "
            f"from scratch {np.median(sc_steps):.0f}")
  harness.write_json(args.json, {"args": vars(args), "model": MODEL, "runs": runs,
                                 "environment": harness.environment()})


if __name__ == "__main__":
  main()
