"""Inference speed: images/s and latency of the jitted forward pass, per batch size.

  python bench/inference.py --model ViT-B/16 --batch-sizes 1,8,32 --json results/inference.json

Prints a Markdown table (with the machine-load verdict) and writes a JSON record.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (bench/, beside this script)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="ViT-B/16", help="registered model name (default: %(default)s)")
  p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default: %(default)s)")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="activation/compute dtype (parameters stay float32)")
  p.add_argument("--option", action="append", metavar="KEY=VALUE",
                 help="models.create option, repeatable (e.g. --option num_layers=2)")
  p.add_argument("--iters", type=int, default=10, help="timed calls per batch size (at least)")
  p.add_argument("--min-seconds", type=float, default=2.0, help="time each batch size at least this long")
  p.add_argument("--warmup", type=int, default=2)
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
  import workloads

  options = harness.parse_options(args.option)
  if args.dtype != "float32":
    options["dtype"] = args.dtype
  rows = []
  with harness.LoadMonitor(probe_s=harness.IDLE_PROBE_S) as load:
    for batch in (int(b) for b in args.batch_sizes.split(",")):
      run, info = workloads.jax_forward(args.model, batch=batch, image_size=args.image_size,
                                        num_classes=args.num_classes, options=options)
      times = harness.summarize(harness.time_calls(run, warmup=args.warmup, iters=args.iters,
                                                   min_seconds=args.min_seconds))
      gflops = info["forward_flops_per_image"] * batch / times["median"] / 1e9
      rows.append({"batch": batch, "img_per_s": batch / times["median"],
                   "latency_ms": 1e3 * times["median"], "spread": times["spread"], "gflop_per_s": gflops,
                   "compile_s": info["compile_s"], "times_s": times, "memory": info["memory"]})
  print(f"{args.model} forward, {args.image_size} px, {args.dtype}, {workloads.device_kind()}")
  print(harness.format_table(rows, ["batch", "img_per_s", "latency_ms", "spread", "gflop_per_s",
                                    "compile_s"]))
  print(load.verdict())
  record = {"script": "inference", "model": args.model, "image_size": args.image_size,
            "dtype": args.dtype, "options": options, "results": rows, "load": load.report(),
            "preset": preset, "environment": harness.environment(device=workloads.device_kind())}
  harness.write_json(args.json, record)
  return record


if __name__ == "__main__":
  main()
