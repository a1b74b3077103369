"""Our ViTs against timm's on the same machine: forward and training speed, alternating fresh processes.

  python bench/compare_timm.py --rounds 5 --json results/compare_timm.json

Each measurement runs in its own fresh Python process that imports only its framework (JAX, or
PyTorch + timm), pinned to the same ``--threads`` cores with the same thread count and the same
host allocator (``--allocator``). Rounds
alternate the order of the frameworks. The machine load is checked before and after every process;
rounds disturbed by other work are flagged and the verdict printed. Workloads are
``mode:model:batch`` with mode ``fwd`` (inference, ``torch.inference_mode``) or ``train`` (forward,
backward and an AdamW update: for JAX the trainer's own step; for timm ``zero_grad``, ``backward``
and ``torch.optim.AdamW.step``). Frameworks: ``jax``, ``timm`` (eager), ``timm_compile``
(``torch.compile``, default mode; its compile time is excluded from the speed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (bench/, beside this script)

DEFAULT_WORKLOADS = "fwd:ViT-Ti/16:8,fwd:ViT-B/16:8,train:ViT-Ti/16:32"
FRAMEWORKS = ("jax", "timm", "timm_compile")


def parse_workload(text: str) -> tuple[str, str, int]:
  parts = text.split(":")
  if len(parts) != 3 or parts[0] not in ("fwd", "train"):
    raise ValueError(f"workload {text!r} is not mode:model:batch with mode fwd or train "
                     f"(e.g. fwd:ViT-B/16:8)")
  return parts[0], parts[1], int(parts[2])


# ---------------------------------------------------------------------------------------------
# Workers: one measurement in a fresh process.


def timm_vit_kwargs(model: str, image_size: int, num_classes: int, options: dict) -> dict:
  """timm ``VisionTransformer`` arguments for our ``model`` (same shapes and numerics)."""
  from vit_jax import flops  # the driver's import; workers for timm never import JAX

  model_obj = flops.abstract_model(model, image_size, num_classes, **options)
  cfg = getattr(model_obj, "config", None)
  if (type(model_obj).__name__ != "VisionTransformer" or cfg.classifier != "token"
      or cfg.representation_size or cfg.posemb != "learn"):
    raise ValueError(f"compare_timm covers plain ViTs with a class token and learned position "
                     f"embedding, got {model!r} with {options}")
  return dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.channels,
              num_classes=cfg.num_classes, embed_dim=cfg.hidden_size, depth=cfg.num_layers,
              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.hidden_size, qkv_bias=True,
              class_token=True, global_pool="token")


def _import_timm():
  import torch

  # This torchvision build's C ops do not load; timm only needs their schemas to exist.
  try:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  except RuntimeError:
    pass
  import timm  # noqa: F401
  from timm.models.vision_transformer import VisionTransformer

  return torch, VisionTransformer


def run_worker(args: argparse.Namespace) -> dict:
  harness.pin_cores(args.threads)
  preset = harness.apply_preset(args.preset)
  mode, model, batch = parse_workload(args.workload)
  options = json.loads(args.options_json)
  if args.worker == "jax":
    import workloads

    if mode == "fwd":
      run, info = workloads.jax_forward(model, batch=batch, image_size=args.image_size,
                                        num_classes=args.num_classes, options=options)
    else:
      config = workloads.trainer_config(model, batch_size=batch, image_size=args.image_size,
                                        num_classes=args.num_classes, options=options,
                                        mesh="data_parallel")
      run, info = workloads.jax_train_step(config)
    setup_s = info["compile_s"]
  else:
    kw = json.loads(args.timm_kwargs_json)
    torch, VisionTransformer = _import_timm()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = VisionTransformer(**kw)
    images = torch.rand(batch, kw["in_chans"], kw["img_size"], kw["img_size"]) * 2 - 1
    if mode == "fwd":
      net.eval()
      fn = torch.compile(net) if args.worker == "timm_compile" else net

      def run():
        with torch.inference_mode():
          fn(images)
    else:
      net.train()
      fn = torch.compile(net) if args.worker == "timm_compile" else net
      opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
      classes = kw["num_classes"]
      labels = torch.nn.functional.one_hot(torch.arange(batch) % classes, classes).float()

      def run():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(fn(images), labels)
        loss.backward()
        opt.step()
    t = time.perf_counter()
    run()  # builds (and for torch.compile, compiles) before the timed calls
    setup_s = time.perf_counter() - t
  times = harness.time_calls(run, warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds)
  return {"worker": args.worker, "workload": args.workload, "batch": batch, "setup_s": setup_s,
          "times_s": times, "img_per_s": batch / statistics.median(times),
          "threads": args.threads, "preset": preset, "versions": harness.environment()["versions"]}


# ---------------------------------------------------------------------------------------------
# Driver: alternating rounds of fresh workers.


def spawn_worker(args: argparse.Namespace, framework: str, workload: str) -> tuple[dict, dict]:
  """Runs one measurement in a fresh process; returns its result and the machine-load report.

  ``args`` carries the driver's settings (see ``parse_args``).
  """
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--workload", workload,
         "--threads", str(args.threads), "--image-size", str(args.image_size),
         "--num-classes", str(args.num_classes), "--iters", str(args.iters),
         "--min-seconds", str(args.min_seconds), "--warmup", str(args.warmup),
         "--preset", args.preset, "--options-json", json.dumps(args.options)]
  if framework != "jax":
    _, model, _ = parse_workload(workload)
    kw = timm_vit_kwargs(model, args.image_size, args.num_classes, args.options)
    cmd += ["--timm-kwargs-json", json.dumps(kw)]
  env = harness.worker_env(args.allocator)  # the same for both frameworks
  with harness.LoadMonitor() as load:
    result = harness.run_worker_process(cmd, f"{framework} {workload}", cwd=ROOT, env=env)
  return result, load.report()


def wait_for_idle(max_wait_s: float) -> None:
  """Waits (up to ``max_wait_s``) until the CPUs are idle for a whole probe."""
  deadline = time.monotonic() + max_wait_s
  while (harness.busy_fraction() > harness.MAX_BUSY_BEFORE_FRACTION
         and time.monotonic() < deadline):
    time.sleep(3)


def run_driver(args: argparse.Namespace) -> dict:
  workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  for w in workloads:
    parse_workload(w)
  frameworks = [f.strip() for f in args.frameworks.split(",")]
  for f in frameworks:
    if f not in FRAMEWORKS:
      raise ValueError(f"framework {f!r} is not one of {FRAMEWORKS}")
  harness.allocator_env(args.allocator)  # fails early if it is not installed
  if args.wait_idle:
    wait_for_idle(args.wait_idle)
  samples = {(w, f): [] for w in workloads for f in frameworks}
  rounds_log = []
  with harness.LoadMonitor(probe_s=harness.IDLE_PROBE_S) as total:
    for r in range(args.rounds):
      for w in workloads:
        order = frameworks[r % len(frameworks):] + frameworks[:r % len(frameworks)]
        for f in order:
          result, load = spawn_worker(args, f, w)
          samples[(w, f)].append(result["img_per_s"])
          rounds_log.append({"round": r, "workload": w, "framework": f, "img_per_s": result["img_per_s"],
                             "setup_s": result["setup_s"], "load": load, "versions": result["versions"]})
          print(f"round {r} {w:24s} {f:13s} {result['img_per_s']:9.2f} img/s  "
                f"(load {load['loadavg_before'][0]:.2f}->{load['loadavg_after'][0]:.2f}, "
                f"foreign CPU {100 * load['foreign_cpu_fraction']:.0f}%, "
                f"stolen {100 * load['steal_fraction']:.0f}%)", flush=True)
  rows = []
  baseline = "timm" if "timm" in frameworks else frameworks[-1]
  for w in workloads:
    base = samples[(w, baseline)]
    for f in frameworks:
      s = harness.summarize(samples[(w, f)])
      paired = [a / b for a, b in zip(samples[(w, f)], base)]
      rows.append({"workload": w, "framework": f, "img_per_s": s["median"], "min": s["min"],
                   "max": s["max"], "spread": s["spread"],
                   f"ratio_vs_{baseline}": s["median"] / statistics.median(base),
                   "paired_ratio_min": min(paired), "paired_ratio_max": max(paired)})
  print(f"\n{args.rounds} rounds, {args.threads} threads, fp32, {args.image_size} px; img/s medians over "
        f"rounds, spread = (p90 - p10) / median, ratio = median / median of {baseline}")
  print(harness.format_table(rows, ["workload", "framework", "img_per_s", "min", "max", "spread",
                                    f"ratio_vs_{baseline}", "paired_ratio_min", "paired_ratio_max"]))
  return harness.finish_runs("compare_timm", args, total, rounds_log, results=rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workloads", default=DEFAULT_WORKLOADS, help="comma-separated mode:model:batch "
                 "(default: %(default)s)")
  p.add_argument("--frameworks", default="jax,timm", help=f"comma-separated, from {FRAMEWORKS} "
                 "(default: %(default)s)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                 help="cores (and threads) each framework gets (default: all, %(default)s)")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--option", action="append", metavar="KEY=VALUE",
                 help="models.create option for both frameworks (ViT shape options only: "
                 "num_layers, hidden_size, num_heads, mlp_dim)")
  p.add_argument("--iters", type=int, default=5, help="timed calls per process (at least)")
  p.add_argument("--min-seconds", type=float, default=3.0, help="time each process at least this long")
  p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: %(default)s)")
  p.add_argument("--preset", default="cpu", choices=sorted(harness.PRESETS),
                 help="XLA flags preset (see vit_jax/xla_presets.py; default: %(default)s)")
  p.add_argument("--allocator", default="hugepages", choices=harness.ALLOCATORS,
                 help="host allocator for both frameworks' processes (see bench/harness.py; default: "
                 "%(default)s, as train.py)")
  p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                 help="first wait up to this long for the CPUs to go idle")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
  p.add_argument("--workload", help=argparse.SUPPRESS)
  p.add_argument("--options-json", default="{}", help=argparse.SUPPRESS)
  p.add_argument("--timm-kwargs-json", default="{}", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.options = harness.parse_options(args.option)
  return args


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  return harness.worker_or_driver(args, bool(args.worker), run_worker, run_driver)


if __name__ == "__main__":
  main()
