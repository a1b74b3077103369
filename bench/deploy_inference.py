"""Inference speed of each export in its runtime, beside the JAX model and timm: the Deploy table.

  .venv/bin/python bench/deploy_inference.py --models ViT-B/16 --rounds 2 --json results/deploy.json

For each model (224 px, 1,000 classes, random weights, fp32) the driver writes every artifact once
(export.py's formats: stablehlo, savedmodel, onnx, timm), then measures each runtime in its own
fresh process, pinned to the same ``--threads`` cores with as many threads, the runtimes' order
rotated every round:

  jax        the model itself, ``jax.jit`` (the trainer's XLA preset and host allocator)
  stablehlo  the artifact deserialised with ``jax.export`` and called under ``jax.jit``
  savedmodel TensorFlow's ``serving_default`` signature (jax2tf's XlaCallModule)
  onnx       onnxruntime's CPU provider, default graph optimisations
  timm       the timm export loaded by ``timm.create_model``, eager PyTorch, ``inference_mode``

Latency: median seconds of one batch-1 call; throughput: batch-32 images per second (median call).
The graphs of jax, stablehlo and savedmodel are the same XLA computation; the table measures the
runtimes, not a race between models. The machine load is checked around every process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (bench/, beside this script)

RUNTIMES = ("jax", "stablehlo", "savedmodel", "onnx", "timm")
ARTIFACTS = {"stablehlo": "model.shlo", "savedmodel": "savedmodel", "onnx": "model.onnx",
             "timm": "timm"}
DEFAULT_MODELS = "ViT-Ti/16,ViT-B/16,R50+ViT-B/16,Mixer-B/16,TNT-S/16,BiT-R50x1"


# ---------------------------------------------------------------------------------------------
# Workers: one runtime, one model, batch 1 then batch 32, in a fresh process.


def _forward(runtime: str, model: str, artifact: str, threads: int):
  """``make(batch)`` -> a no-argument callable running one forward pass to completion."""
  import numpy as np

  def images(batch):
    return np.random.default_rng(batch).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)

  if runtime == "jax":
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import jax
    from export_check import random_model
    from flax import nnx
    graphdef, params = nnx.split(random_model(model))
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

    def make(batch):
      x = jax.device_put(images(batch))
      return lambda: forward(params, x).block_until_ready()
  elif runtime == "stablehlo":
    import jax
    with open(artifact, "rb") as f:
      call = jax.jit(jax.export.deserialize(f.read()).call)

    def make(batch):
      x = jax.device_put(images(batch))
      return lambda: call(x)["logits"].block_until_ready()
  elif runtime == "savedmodel":
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    serve = tf.saved_model.load(artifact).signatures["serving_default"]

    def make(batch):
      x = tf.constant(images(batch))
      return lambda: serve(images=x)["logits"].numpy()
  elif runtime == "onnx":
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(artifact, options, providers=["CPUExecutionProvider"])

    def make(batch):
      feeds = {"images": images(batch)}
      return lambda: session.run(None, feeds)
  else:
    sys.path.insert(0, ROOT)
    from tests.timm_helpers import import_timm  # this torchvision's C ops do not load
    timm = import_timm()
    import torch
    torch.set_num_threads(threads)
    net = timm.create_model("local-dir:" + artifact, pretrained=True).eval()

    def make(batch):
      x = torch.from_numpy(images(batch).transpose(0, 3, 1, 2).copy())

      def run():
        with torch.inference_mode():
          net(x)
      return run
  return make


def run_worker(args: argparse.Namespace) -> dict:
  harness.pin_cores(args.threads)
  preset = harness.apply_preset(args.preset) if args.worker in ("jax", "stablehlo") else None
  t = time.perf_counter()
  make = _forward(args.worker, args.model, args.artifact, args.threads)
  result = {"runtime": args.worker, "model": args.model, "threads": args.threads, "preset": preset}
  for batch, key in ((1, "b1"), (32, "b32")):
    run = make(batch)
    run()  # builds / compiles before the timed calls
    if batch == 1:
      result["setup_s"] = time.perf_counter() - t
    times = harness.time_calls(run, warmup=args.warmup if batch == 1 else 1,
                               iters=args.iters if batch == 1 else 3,
                               min_seconds=args.min_seconds)
    result[key + "_times_s"] = times
    result[key + "_median_s"] = statistics.median(times)
  result["versions"] = harness.environment()["versions"]
  return result


# ---------------------------------------------------------------------------------------------
# Driver.


def export_all(model: str, folder: str) -> dict[str, str]:
  """Writes every artifact of ``model`` (random weights) into ``folder``; returns their paths."""
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  from export_check import random_model
  from vit_jax.export import ServingConfig, export
  net = random_model(model)
  serving = ServingConfig(model_name=model, num_classes=1000, image_size=(224, 224))
  paths = {}
  for fmt, name in ARTIFACTS.items():
    paths[fmt] = os.path.join(folder, model.replace("/", "_").replace("+", "_") + "_" + name)
    export(net, serving, fmt, paths[fmt])
  return paths


def run_driver(args: argparse.Namespace) -> dict:
  models = [m for m in args.models.split(",") if m]
  runtimes = [r for r in args.runtimes.split(",") if r]
  for r in runtimes:
    if r not in RUNTIMES:
      raise ValueError(f"runtime {r!r} is not one of {RUNTIMES}")
  env = harness.worker_env(args.allocator)
  samples = {(m, r): [] for m in models for r in runtimes}
  log = []
  with tempfile.TemporaryDirectory() as folder, harness.LoadMonitor(probe_s=harness.IDLE_PROBE_S) as total:
    for model in models:
      t = time.perf_counter()
      paths = export_all(model, folder)
      print(f"{model}: exported in {time.perf_counter() - t:.0f} s", flush=True)
      for rnd in range(args.rounds):
        order = runtimes[rnd % len(runtimes):] + runtimes[:rnd % len(runtimes)]
        for runtime in order:
          cmd = [sys.executable, os.path.abspath(__file__), "--worker", runtime, "--model", model,
                 "--artifact", paths.get(runtime, ""), "--threads", str(args.threads),
                 "--iters", str(args.iters), "--warmup", str(args.warmup),
                 "--min-seconds", str(args.min_seconds), "--preset", args.preset]
          with harness.LoadMonitor() as load:
            result = harness.run_worker_process(cmd, f"{runtime} {model}", cwd=ROOT, env=env)
          result["load"], result["round"] = load.report(), rnd
          samples[(model, runtime)].append(result)
          log.append(result)
          print(f"round {rnd} {model:14s} {runtime:10s} b1 {1e3 * result['b1_median_s']:8.1f} ms  "
                f"b32 {32 / result['b32_median_s']:7.1f} img/s  (foreign CPU "
                f"{100 * load.report()['foreign_cpu_fraction']:.0f}%)", flush=True)
      for path in paths.values():  # the next model's artifacts need the room
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
  rows = []
  for model in models:
    jax_b1 = statistics.median(r["b1_median_s"] for r in samples[(model, runtimes[0])])
    jax_b32 = statistics.median(r["b32_median_s"] for r in samples[(model, runtimes[0])])
    for runtime in runtimes:
      b1 = statistics.median(r["b1_median_s"] for r in samples[(model, runtime)])
      b32 = statistics.median(r["b32_median_s"] for r in samples[(model, runtime)])
      rows.append({"model": model, "runtime": runtime, "b1_ms": 1e3 * b1,
                   f"b1_vs_{runtimes[0]}": jax_b1 / b1, "b32_img_s": 32 / b32,
                   f"b32_vs_{runtimes[0]}": jax_b32 / b32,
                   "setup_s": statistics.median(r["setup_s"] for r in samples[(model, runtime)])})
  print(f"\n{args.rounds} rounds, {args.threads} threads, fp32, 224 px, {harness.cpu_model()}; "
        f"medians over rounds; vs_{runtimes[0]} > 1: faster than {runtimes[0]}")
  print(harness.format_table(rows, list(rows[0])))
  return harness.finish_runs("deploy_inference", args, total, log, results=rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated (default: %(default)s)")
  p.add_argument("--runtimes", default=",".join(RUNTIMES),
                 help="comma-separated; the first is the ratios' baseline (default: %(default)s)")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                 help="cores (and threads) every runtime gets (default: all, %(default)s)")
  p.add_argument("--iters", type=int, default=10, help="timed batch-1 calls per process (at least)")
  p.add_argument("--warmup", type=int, default=3, help="untimed batch-1 calls first")
  p.add_argument("--min-seconds", type=float, default=3.0, help="time each batch at least this long")
  p.add_argument("--preset", default="cpu", choices=sorted(harness.PRESETS),
                 help="XLA flags preset of the jax and stablehlo workers (default: %(default)s)")
  p.add_argument("--allocator", default="hugepages", choices=harness.ALLOCATORS,
                 help="host allocator of every worker (default: %(default)s, as train.py)")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
  p.add_argument("--model", help=argparse.SUPPRESS)
  p.add_argument("--artifact", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  return harness.worker_or_driver(args, bool(args.worker), run_worker, run_driver)


if __name__ == "__main__":
  main()
