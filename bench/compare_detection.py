"""Our YOLOS and DETR training steps against transformers' on the same scenes, weights and recipe.

  .venv/bin/python bench/compare_detection.py --rounds 3 --json results/compare_detection.json

The models are ``configs/detection.py:yolos_digits`` and ``detr_digits`` (YOLOS: 4 layers, width
192, patch 8, 20 det tokens; DETR: a 2-stage ResNet of width 16, 2 + 2 layers of width 128, 20
queries), batch 32 of the embedded digit scenes. The driver builds each model as the trainer
initialises it, writes it as an HF folder (``export_hf``) and writes one training batch from the
config's own pipeline; every measurement then runs in a fresh process, pinned to the same
``--threads`` cores with the same allocator, the frameworks alternating first. One step is the
whole update: forward, the set loss with its Hungarian matching, backward, gradient clipping at
0.1 and AdamW. Ours is the trainer's jitted step (``trainer.make_setup``); HF's is
``model(pixel_values, [pixel_mask,] labels=...)``, ``loss.backward()``,
``clip_grad_norm_`` and ``torch.optim.AdamW.step``.

With ``--train`` it compares what the two learn instead of how fast: HF's model starts from the
initial weights of our finished run in ``--ours DIR`` (default ``workdirs/<config>``: for YOLOS
the encoder our first stage trained, loaded as the trainer loads it; for DETR the trainer's
initialisation), trains for the config's ``total_steps`` on the same stream of batches (our
pipeline, same seed) with the same recipe (our learning-rate schedule set on torch's AdamW at
every step, weight decay on the same weight matrices, clipping at 0.1), and is evaluated on the
test scenes by our COCO evaluator; the table sets its AP beside our run's ``final_metrics.json``:

  .venv/bin/python train.py --config configs/detection.py:detr_digits --workdir workdirs/detr_digits
  .venv/bin/python bench/compare_detection.py --train --models detr --json results/train_detr.json

Like with like: HF's DETR freezes every parameter of an HF (non-timm) ResNet backbone (its
freezing test looks for timm's stage names), so the worker makes them trainable again, as ours
are; its batch norms are frozen in both. HF's DETR runs with ``auxiliary_loss=True`` (ours has
the auxiliary losses) and its decoder made the original's (``original_decoder``: HF writes the
final norm into the residual stream after every layer where the original and ours apply it to a
copy). Both start from the same weights (HF's YOLOS would otherwise start its tokens and position
embeddings at zero). ``--jax-devices N`` runs our step data parallel over N CPU devices on the
same cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (bench/, beside this script)
from vit_jax import kernels  # noqa: E402  (imports no JAX)

MODELS = {"yolos": "yolos_digits", "detr": "detr_digits"}
FRAMEWORKS = ("jax", "hf")


def detection_config(model: str, batch_size: int | None = None):
  """The experiment config of ``model`` (yolos | detr), from scratch (no pre-training stage)."""
  from configs import detection

  c = detection.get_config(MODELS[model])
  c.pretrained = None
  if batch_size:
    c.batch_size = batch_size
  return c


# ---------------------------------------------------------------------------------------------
# Driver-side preparation: the weights as an HF folder, one batch as .npz.


def prepare(model: str, batch_size: int, folder: str) -> dict:
  """Writes ``folder``/hf (the initial weights, HF layout) and ``folder``/batch.npz."""
  import numpy as np
  from flax import nnx

  from vit_jax import tasks
  from vit_jax.checkpoints import detr_names, yolos_names

  config = detection_config(model, batch_size)
  task = tasks.create(config)
  net = task.build_model(nnx.Rngs(config.seed))
  export = yolos_names.export_hf if model == "yolos" else detr_names.export_hf
  export(net, os.path.join(folder, "hf"))
  batch = next(iter(task.train_data(0)))
  np.savez(os.path.join(folder, "batch.npz"), **{k: np.asarray(v) for k, v in batch.items()})
  return {"boxes_per_image": float(np.asarray(batch["box_mask"]).sum(1).mean())}


def prepare_training(model: str, ours: str, folder: str) -> dict:
  """Writes ``folder``/hf: the initial weights of our run in ``ours``, as the trainer made them
  (``Setup.init_state``: from the first stage's checkpoint when the recipe has one)."""
  import json

  from flax import nnx

  from vit_jax import tasks
  from vit_jax.checkpoints import detr_names, yolos_names
  from vit_jax.train import stages

  from configs import detection

  config = detection_config(model)
  full = detection.get_config(MODELS[model])
  metrics_path = os.path.join(ours, "final_metrics.json")
  if not os.path.exists(metrics_path):
    raise SystemExit(f"--ours {ours}: no final_metrics.json; train it first: python train.py "
                     f"--config configs/detection.py:{MODELS[model]} --workdir {ours}")
  with open(metrics_path) as f:
    our_metrics = json.load(f)
  task = tasks.create(config)
  net = task.build_model(nnx.Rngs(config.seed))
  if full.pretrained:
    stage_dir = os.path.join(ours, stages.STAGE_DIR)
    task.load_pretrained(net, stage_dir, **dict(full.pretrained_options))
  export = yolos_names.export_hf if model == "yolos" else detr_names.export_hf
  export(net, os.path.join(folder, "hf"))
  return our_metrics


# ---------------------------------------------------------------------------------------------
# Workers: one measurement in a fresh process.


def hf_model(model: str, folder: str):
  """transformers' model from the HF folder, with like-with-like settings (module docstring)."""
  from transformers import DetrForObjectDetection, YolosForObjectDetection

  if model == "yolos":
    return YolosForObjectDetection.from_pretrained(folder)
  net = DetrForObjectDetection.from_pretrained(folder, auxiliary_loss=True)
  for p in net.parameters():
    p.requires_grad_(True)  # HF froze the whole (non-timm) ResNet
  original_decoder(net.model.decoder)
  return net


def original_decoder(decoder) -> None:
  """Makes transformers' DETR decoder with ``auxiliary_loss=True`` compute what the original
  DETR's (and ours) computes: each layer takes the previous layer's output, not its layer-normed
  copy, and the final output is normed once, not twice. HF's loop writes
  ``hidden = layernorm(layer(hidden))`` back into the stream; here every layer after the first
  takes the unnormed output its predecessor returned, and the final ``layernorm`` call, whose
  input is the normed tensor the last call returned, passes it through unchanged. The
  auxiliary heads still see ``layernorm(layer_i output)``, as in the original."""
  import torch

  class FromPrevious(torch.nn.Module):
    def __init__(self, layer, index, outputs):
      super().__init__()
      self.layer, self.index, self.outputs = layer, index, outputs

    def forward(self, hidden_states, *args, **kwargs):
      if self.index > 0:
        hidden_states = self.outputs[self.index - 1]  # the unnormed output, not HF's normed copy
      out = self.layer(hidden_states, *args, **kwargs)
      self.outputs[self.index] = out[0] if isinstance(out, tuple) else out
      return out

  class NormOnce(torch.nn.Module):
    def __init__(self, norm):
      super().__init__()
      self.norm, self.last = norm, None

    def forward(self, x):
      if x is self.last:  # the decoder's final call on what the loop's last call returned
        return x
      self.last = self.norm(x)
      return self.last

  outputs: dict = {}
  decoder.layers = torch.nn.ModuleList(
      [FromPrevious(layer, i, outputs) for i, layer in enumerate(decoder.layers)])
  decoder.layernorm = NormOnce(decoder.layernorm)


def hf_optimizer(net, lr: float, weight_decay: float):
  """AdamW with decay on weight matrices only (as the trainer's default)."""
  import torch

  decay = [p for p in net.parameters() if p.ndim > 1]
  rest = [p for p in net.parameters() if p.ndim <= 1]
  return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                            {"params": rest, "weight_decay": 0.0}], lr=lr)


def hf_labels(batch: dict) -> list[dict]:
  import torch

  out = []
  for boxes, labels, mask in zip(batch["boxes"], batch["labels"], batch["box_mask"]):
    keep = mask > 0
    out.append({"class_labels": torch.from_numpy(labels[keep].astype("int64")),
                "boxes": torch.from_numpy(boxes[keep].astype("float32"))})
  return out


def hf_step(model: str, folder: str, batch: dict, clip: float = 0.1):
  """One HF update on ``batch``; returns (run one step, seconds to build and run the first)."""
  import torch

  t = time.perf_counter()
  net = hf_model(model, os.path.join(folder, "hf")).train()
  config = detection_config(model, len(batch["image"]))
  opt = hf_optimizer(net, config.lr, config.optimizer.weight_decay)
  pixels = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
  kwargs = {"pixel_mask": torch.from_numpy(batch["pixel_mask"].astype("int64"))} if model == "detr" else {}
  labels = hf_labels(batch)

  def run() -> None:
    opt.zero_grad(set_to_none=True)
    loss = net(pixel_values=pixels, labels=labels, **kwargs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()

  run()
  return run, time.perf_counter() - t


def hf_training_optimizer(net, lr: float, weight_decay: float):
  """AdamW decaying exactly the parameters our trainer decays (``optimizer.decay_mask``: weight
  matrices and convolution kernels; not biases, norms, position or query embeddings, tokens)."""
  import torch

  def decays(name, p):
    return p.ndim > 1 and name.endswith(".weight") and "embedding" not in name
  named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
  return torch.optim.AdamW([{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
                            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}],
                           lr=lr)


def hf_train(model: str, folder: str, progress: str, steps: int | None = None) -> dict:
  """Trains HF's model from ``folder``/hf with our recipe on our batches; returns its COCO metrics
  on the test scenes (our evaluator) and the wall time."""
  import jax
  import numpy as np
  import torch

  from vit_jax import tasks
  from vit_jax.tasks.detection import evaluation_outputs
  from vit_jax.train import optimizer

  config = detection_config(model)
  if steps:  # a shorter run on the same schedule (a smoke test of this path)
    config.total_steps = steps
  task = tasks.create(config)
  net = hf_model(model, os.path.join(folder, "hf")).train()
  opt = hf_training_optimizer(net, config.lr, config.optimizer.weight_decay)
  schedule = optimizer.make_schedule(config.lr, config.total_steps, **config.schedule)
  clip = config.optimizer.grad_clip_norm
  start = time.perf_counter()
  batches = task.train_data(0)
  with open(progress, "w") as log:
    for step in range(config.total_steps):
      batch = {k: np.asarray(v) for k, v in next(batches).items()}
      lr = float(schedule(step))
      for group in opt.param_groups:
        group["lr"] = lr
      kwargs = ({"pixel_mask": torch.from_numpy(batch["pixel_mask"].astype("int64"))}
                if model == "detr" else {})
      opt.zero_grad(set_to_none=True)
      loss = net(pixel_values=torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()),
                 labels=hf_labels(batch), **kwargs).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
      opt.step()
      if (step + 1) % config.log_every == 0:
        log.write(f"step {step + 1} loss {loss.item():.4f} lr {lr:.2e} "
                  f"{time.perf_counter() - start:.0f} s\n")
        log.flush()
  train_s = time.perf_counter() - start
  net.eval()
  evaluator = task.evaluator()
  with torch.no_grad():
    for batch in task.eval_data():
      batch = {k: np.asarray(v) for k, v in batch.items()}
      kwargs = ({"pixel_mask": torch.from_numpy(batch["pixel_mask"].astype("int64"))}
                if model == "detr" else {})
      out = net(pixel_values=torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()), **kwargs)
      outputs = {"logits": out.logits.numpy(), "boxes": out.pred_boxes.numpy()}
      evaluator.update(jax.device_get(evaluation_outputs(outputs, batch)))
  return {"metrics": evaluator.result(), "train_s": train_s, "steps": config.total_steps}


def run_worker(args: argparse.Namespace) -> dict:
  harness.pin_cores(args.threads)
  preset = harness.apply_preset(args.preset)
  import numpy as np

  if args.worker == "hf_train":
    import torch

    from tests.timm_helpers import import_timm

    import_timm()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = hf_train(args.model, args.folder, os.path.join(args.folder, "progress.txt"), args.steps)
    return {"worker": "hf_train", "model": args.model, **result, "threads": args.threads,
            "versions": harness.environment()["versions"]}
  batch = dict(np.load(os.path.join(args.folder, "batch.npz")))
  if args.worker == "jax":
    import workloads

    run, info = workloads.jax_train_step(detection_config(args.model, len(batch["image"])), batch)
    setup_s, devices = info["compile_s"], info["num_devices"]
  else:
    import torch

    from tests.timm_helpers import import_timm  # makes the installed torchvision loadable

    import_timm()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run, setup_s = hf_step(args.model, args.folder, batch)
    devices = 1
  times = harness.time_calls(run, warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds)
  size = len(batch["image"])
  return {"worker": args.worker, "model": args.model, "batch": size, "setup_s": setup_s,
          "devices": devices, "times_s": times, "img_per_s": size / statistics.median(times),
          "threads": args.threads, "preset": preset,
          "cpu_matmul": os.environ.get(kernels.CPU_MATMUL_ENV, "xla") if args.worker == "jax" else None,
          "versions": harness.environment()["versions"]}


# ---------------------------------------------------------------------------------------------
# Driver: alternating rounds of fresh workers.


def spawn_worker(args: argparse.Namespace, framework: str, model: str, folder: str) -> tuple[dict, dict]:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--model", model,
         "--folder", folder, "--threads", str(args.threads), "--iters", str(args.iters),
         "--min-seconds", str(args.min_seconds), "--warmup", str(args.warmup), "--preset", args.preset]
  env = harness.worker_env(args.allocator)
  env["PYTHONPATH"] = ROOT  # the HF worker imports tests.timm_helpers
  env[kernels.CPU_MATMUL_ENV] = args.cpu_matmul  # read by vit_jax.kernels.blas (ours only)
  if framework == "jax" and args.jax_devices > 1:  # train.py --fake_devices N: data parallel over cores
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={args.jax_devices}").strip()
  with harness.LoadMonitor() as load:
    result = harness.run_worker_process(cmd, f"{framework} {model}", cwd=ROOT, env=env)
  return result, load.report()


def run_driver(args: argparse.Namespace) -> dict:
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    raise ValueError(f"--models {unknown} not among {sorted(MODELS)}")
  harness.allocator_env(args.allocator)
  samples = {(m, f): [] for m in models for f in FRAMEWORKS}
  rounds_log = []
  with tempfile.TemporaryDirectory() as tmp:
    folders = {}
    for m in models:
      folders[m] = os.path.join(tmp, m)
      os.makedirs(folders[m])
      facts = prepare(m, args.batch, folders[m])
      print(f"{m}: batch {args.batch}, {facts['boxes_per_image']:.2f} boxes per image", flush=True)
    with harness.LoadMonitor(probe_s=harness.IDLE_PROBE_S) as total:
      for r in range(args.rounds):
        for m in models:
          order = FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]
          for f in order:
            result, load = spawn_worker(args, f, m, folders[m])
            samples[(m, f)].append(result["img_per_s"])
            rounds_log.append({"round": r, "model": m, "framework": f, "img_per_s": result["img_per_s"],
                               "setup_s": result["setup_s"], "load": load,
                               "versions": result["versions"]})
            print(f"round {r} {m:6s} {f:4s} {result['img_per_s']:8.2f} img/s on {result['devices']} device(s)  "
                  f"(load {load['loadavg_before'][0]:.2f}->{load['loadavg_after'][0]:.2f}, "
                  f"foreign CPU {100 * load['foreign_cpu_fraction']:.0f}%, "
                  f"stolen {100 * load['steal_fraction']:.0f}%)", flush=True)
  rows = []
  for m in models:
    hf = samples[(m, "hf")]
    for f in FRAMEWORKS:
      s = harness.summarize(samples[(m, f)])
      paired = [a / b for a, b in zip(samples[(m, f)], hf)]
      rows.append({"model": m, "framework": f, "img_per_s": s["median"], "min": s["min"],
                   "max": s["max"], "ratio_vs_hf": s["median"] / statistics.median(hf),
                   "paired_ratio_min": min(paired), "paired_ratio_max": max(paired)})
  print(f"\n{args.rounds} rounds, {args.threads} threads, fp32, batch {args.batch}, allocator "
        f"{args.allocator}, our matrix products by {args.cpu_matmul}; train-step img/s medians over "
        f"rounds, ratio = median / HF's median")
  print(harness.format_table(rows, ["model", "framework", "img_per_s", "min", "max", "ratio_vs_hf",
                                    "paired_ratio_min", "paired_ratio_max"]))
  return harness.finish_runs("compare_detection", args, total, rounds_log, results=rows)


def run_training(args: argparse.Namespace) -> dict:
  """``--train``: HF's models trained with our recipe from our runs' initial weights (docstring)."""
  import json

  models = [m.strip() for m in args.models.split(",") if m.strip()]
  harness.allocator_env(args.allocator)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for m in models:
      ours = args.ours or os.path.join(ROOT, "workdirs", MODELS[m])
      folder = os.path.join(tmp, m)
      os.makedirs(folder)
      our_metrics = prepare_training(m, ours, folder)
      print(f"{m}: HF training from {ours}'s initial weights; progress in "
            f"{os.path.join(folder, 'progress.txt')}", flush=True)
      cmd = [sys.executable, os.path.abspath(__file__), "--worker", "hf_train", "--model", m,
             "--folder", folder, "--threads", str(args.threads), "--preset", args.preset]
      if args.steps:
        cmd += ["--steps", str(args.steps)]
      env = harness.worker_env(args.allocator)
      env["PYTHONPATH"] = ROOT
      with harness.LoadMonitor() as load:
        result = harness.run_worker_process(cmd, f"hf_train {m}", cwd=ROOT, env=env)
      theirs = result["metrics"]
      rows.append({"model": m, "steps": result["steps"], "ours_AP50": our_metrics["AP50"],
                   "hf_AP50": theirs["AP50"], "ours_AP": our_metrics["AP"], "hf_AP": theirs["AP"],
                   "AP50_gap_points": 100 * (our_metrics["AP50"] - theirs["AP50"]),
                   "hf_train_minutes": result["train_s"] / 60, "load": load.report(),
                   "hf_metrics": theirs, "ours_metrics": our_metrics,
                   "versions": result["versions"]})
      print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("load", "versions")}),
            flush=True)
  print(harness.format_table(rows, ["model", "steps", "ours_AP50", "hf_AP50", "ours_AP", "hf_AP",
                                    "AP50_gap_points", "hf_train_minutes"]))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"script": "compare_detection --train", "rows": rows,
                 "environment": harness.environment()}, f, indent=1)
  return {"rows": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="yolos,detr", help="comma-separated, from yolos, detr")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--iters", type=int, default=10, help="timed steps per process (at least)")
  p.add_argument("--min-seconds", type=float, default=5.0)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--preset", default="cpu", choices=sorted(harness.PRESETS))
  p.add_argument("--jax-devices", type=int, default=1,
                 help="CPU devices of our step (train.py --fake_devices N): the batch split over "
                      "them, data parallel, on the same --threads cores (default: %(default)s)")
  p.add_argument("--allocator", default="hugepages", choices=harness.ALLOCATORS)
  p.add_argument("--cpu-matmul", default="xla", choices=kernels.CPU_MATMUL_CHOICES,
                 help="who computes our step's float32 matrix products (train.py --cpu_matmul)")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--train", action="store_true",
                  help="train HF's models with our recipe and compare their AP (module docstring)")
  p.add_argument("--steps", type=int, default=None,
                 help="--train: train HF's model this many steps instead of the config's (a smoke test)")
  p.add_argument("--ours", default=None,
                  help="--train: our finished run's workdir (default workdirs/<config>)")
  p.add_argument("--worker", choices=FRAMEWORKS + ("hf_train",), help=argparse.SUPPRESS)
  p.add_argument("--model", choices=sorted(MODELS), help=argparse.SUPPRESS)
  p.add_argument("--folder", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  return harness.worker_or_driver(args, bool(args.worker), run_worker,
                                  run_training if args.train else run_driver)


if __name__ == "__main__":
  main()
