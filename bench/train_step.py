"""Training speed: the trainer's own jitted step (forward, backward, AdamW) on synthetic data.

  python bench/train_step.py --model ViT-B/16 --batch 32 --json results/train_step.json
  python bench/train_step.py --model ViT-L/16 --batch 64 --dtype bfloat16 --remat full --scan \\
      --mesh data=1,fsdp=-1,tensor=1

The batch is created once and placed on the devices, so the figure is the step alone. Reports
images/s, step time, MFU (analytic training FLOPs, 3x forward, over the devices' peak; see
PEAK_TFLOPS, or give --peak-tflops), memory (XLA's static analysis; the allocator's peak where the
device reports it; the host's peak resident set), host page faults and kernel CPU time per step,
and compile time, with the machine-load verdict. On the CPU the peak is the nominal one from /proc/cpuinfo's clock: a CPU
that boosts above it can show an MFU near or above 1.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (bench/, beside this script)

# Dense peak TFLOP/s per device: (substring of jax's device_kind, dtype). float32 on NVIDIA GPUs is
# the TF32 tensor-core peak (JAX's default matmul precision there); first match wins.
PEAK_TFLOPS: list[tuple[str, str, float]] = [
    ("H100 PCIe", "bfloat16", 756.0), ("H100 PCIe", "float32", 378.0),
    ("H100", "bfloat16", 989.0), ("H100", "float32", 494.0),
    ("H200", "bfloat16", 989.0), ("H200", "float32", 494.0),
    ("A100", "bfloat16", 312.0), ("A100", "float32", 156.0),
    ("TPU v4", "bfloat16", 275.0), ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5p", "bfloat16", 459.0), ("TPU v6 lite", "bfloat16", 918.0),
]


def cpu_peak_tflops() -> float:
  """fp32 FMA peak of the CPU cores this process may use: cores x clock x FLOPs per cycle
  (64 with AVX-512, i.e. two 16-lane FMA units; 32 with AVX2+FMA; 8 otherwise)."""
  mhz, flags = 0.0, ""
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("cpu MHz") and not mhz:
        mhz = float(line.split(":")[1])
      elif line.startswith("flags") and not flags:
        flags = line
  per_cycle = 64 if " avx512f" in flags else 32 if " fma" in flags else 8
  return len(os.sched_getaffinity(0)) * mhz * 1e6 * per_cycle / 1e12


def peak_tflops(device_kind: str, platform: str, dtype: str) -> float | None:
  if platform == "cpu":
    return cpu_peak_tflops()
  for kind, kind_dtype, peak in PEAK_TFLOPS:
    if kind in device_kind and kind_dtype == dtype:
      return peak
  return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="ViT-B/16", help="registered model name (default: %(default)s)")
  p.add_argument("--batch", type=int, default=32, help="global batch size")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="activation/compute dtype (parameters and optimizer state stay float32)")
  p.add_argument("--remat", default="none", help="rematerialisation policy of the layer stack "
                 "(none, full, save_dots, save_dots_no_batch)")
  p.add_argument("--scan", action="store_true", help="scan over layers instead of unrolling")
  p.add_argument("--mesh", default="data_parallel", help="mesh preset (data_parallel, fsdp, "
                 "tensor_parallel) or axis sizes such as data=2,fsdp=-1 (default: %(default)s)")
  p.add_argument("--option", action="append", metavar="KEY=VALUE",
                 help="models.create option, repeatable (e.g. --option num_layers=2)")
  p.add_argument("--grad-clip-norm", type=float, default=None, help="add global-norm clipping")
  p.add_argument("--steps", type=int, default=5, help="timed steps (at least)")
  p.add_argument("--min-seconds", type=float, default=5.0, help="time at least this long")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="peak TFLOP/s per device for MFU (default: from the device kind)")
  p.add_argument("--preset", default="cpu", choices=sorted(harness.PRESETS),
                 help="XLA flags preset (see vit_jax/xla_presets.py; default: %(default)s)")
  p.add_argument("--allocator", default="hugepages", choices=harness.ALLOCATORS,
                 help="host allocator (see bench/harness.py; default: %(default)s, as train.py)")
  p.add_argument("--json", default=None, help="write the results here")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  harness.use_allocator(args.allocator)
  preset = harness.apply_preset(args.preset)
  import jax

  import workloads

  options = harness.parse_options(args.option)
  if args.dtype != "float32":
    options["dtype"] = args.dtype
  if args.remat != "none":
    options["remat"] = args.remat
  if args.scan:
    options["scan"] = True
  config = workloads.trainer_config(args.model, batch_size=args.batch, image_size=args.image_size,
                                    num_classes=args.num_classes, options=options,
                                    mesh=args.mesh, grad_clip_norm=args.grad_clip_norm)
  with harness.LoadMonitor(probe_s=harness.IDLE_PROBE_S) as load:
    run, info = workloads.jax_train_step(config)
    harness.time_calls(run, warmup=args.warmup, iters=0)
    faults, system_s = harness.page_faults_and_system_seconds()
    step_times = harness.time_calls(run, iters=args.steps, min_seconds=args.min_seconds, warmup=0)
    faults_after, system_s_after = harness.page_faults_and_system_seconds()
    faults = (faults_after - faults) / len(step_times)
    system_s = (system_s_after - system_s) / len(step_times)
    times = harness.summarize(step_times)
  device = jax.local_devices()[0]
  peak = args.peak_tflops or peak_tflops(device.device_kind, device.platform, args.dtype)
  achieved = info["train_flops_per_image"] * args.batch / times["median"]
  mem = info["memory"]
  row = {"model": args.model, "batch": args.batch, "dtype": args.dtype, "remat": args.remat,
         "scan": args.scan, "mesh": "x".join(str(v) for v in info["mesh"].values()),
         "img_per_s": args.batch / times["median"], "step_ms": 1e3 * times["median"],
         "spread": times["spread"], "tflop_per_s": achieved / 1e12,
         "mfu": achieved / (peak * 1e12 * info["num_devices"]) if peak else None,
         "compile_s": info["compile_s"], "page_faults_per_step": faults,
         "kernel_cpu_s_per_step": system_s,
         "host_peak_rss_mib": harness.peak_rss_bytes() / 2**20,
         "static_peak_mib": mem.get("static_peak_bytes", 0) / 2**20,
         "device_peak_mib": mem["device_peak_bytes"] / 2**20 if "device_peak_bytes" in mem else None}
  print(f"train step on {info['num_devices']} x {workloads.device_kind()} "
        f"(peak {peak if peak else '?'} TFLOP/s per device)")
  print(harness.format_table([row], ["model", "batch", "dtype", "remat", "scan", "mesh", "img_per_s",
                                     "step_ms", "spread", "mfu", "compile_s", "page_faults_per_step",
                                     "kernel_cpu_s_per_step", "host_peak_rss_mib", "static_peak_mib",
                                     "device_peak_mib"]))
  print(load.verdict())
  record = {"script": "train_step", "args": vars(args), "options": options, "result": row,
            "times_s": times, "memory": mem, "peak_tflops_per_device": peak,
            "train_flops_per_image": info["train_flops_per_image"], "load": load.report(),
            "preset": preset, "environment": harness.environment(device=workloads.device_kind(),
                                               num_devices=info["num_devices"])}
  harness.write_json(args.json, record)
  return record


if __name__ == "__main__":
  main()
