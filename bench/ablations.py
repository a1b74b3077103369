"""Before/after figures for the CPU speed work: each change undone in turn, against the code as shipped.

  python bench/ablations.py --rounds 3 --json results/ablations.json

Whole steps: the workloads of ``compare_timm.py`` (``mode:model:batch``) with JAX, each variant in
its own fresh process, the order rotated every round:
  shipped          the library as it is (train.py's defaults: XLA preset ``cpu``, huge pages)
  no_huge_pages    ``--allocator glibc``: XLA's per-step temporaries on 4 KiB pages
                   (vit_jax/host_memory.py)
  preset_none      ``--preset none``: XLA's default flags (vit_jax/xla_presets.py)
  xla_attention    ``attention="xla"``: ``jax.nn.dot_product_attention`` instead of the explicit
                   heads-major einsums (vit_jax/models/attention.py)
Layers (``--micro``, in one fresh process, variants alternating): a forward and backward pass of
the pieces of a ViT-Ti/16 block at batch 32 written as shipped and as before each change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import compare_timm  # noqa: E402  (bench/, beside this script)
import harness  # noqa: E402

# name -> changes to compare_timm's arguments
VARIANTS: dict[str, dict] = {
    "shipped": {},
    "no_huge_pages": {"allocator": "glibc"},
    "preset_none": {"preset": "none"},
    "xla_attention": {"options": {"attention": "xla"}},
}
DEFAULT_WORKLOADS = "train:ViT-Ti/16:32,fwd:ViT-Ti/16:8,fwd:ViT-B/16:8"
MICRO_PREFIX = "MICRO "


# ---------------------------------------------------------------------------------------------
# Layer micro-benchmarks (run in a fresh process; imports JAX).


def micro_cases(batch: int, tokens: int, width: int, heads: int, mlp: int) -> dict[str, dict]:
  """``{case: {variant: (jitted fn, args)}}``, the shipped variant first in each case."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from vit_jax.models import attention, layers

  rng = np.random.default_rng(0)

  def arr(*shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * scale)

  def fwd_bwd(f, *args):
    """A jitted forward and backward pass of ``sum(f(*args) * dy)`` with respect to every arg."""
    dy = arr(*jax.eval_shape(f, *args).shape)
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * dy), argnums=tuple(range(len(args))))), args

  cases: dict[str, dict] = {}
  h = arr(batch * tokens, mlp)
  cases["gelu (erf form)"] = {
      "shipped: 0.5x(1+erf(x/sqrt2))": fwd_bwd(layers.gelu, h),
      "before: jax.nn.gelu(approximate=False)": fwd_bwd(lambda x: jax.nn.gelu(x, approximate=False), h)}

  x = arr(batch, tokens, width)
  p = (arr(width, mlp, scale=width ** -0.5), arr(mlp), arr(mlp, width, scale=mlp ** -0.5), arr(width))

  def mlp_2d(x, w0, b0, w1, b1):
    y = layers.gelu(layers.matmul_2d(x.reshape(-1, width), w0) + b0)
    return (layers.matmul_2d(y, w1) + b1).reshape(x.shape)

  def mlp_einsum(x, w0, b0, w1, b1):
    y = layers.gelu(jnp.einsum("btd,dh->bth", x, w0) + b0)
    return jnp.einsum("bth,hd->btd", y, w1) + b1

  cases["MLP block (Dense layout)"] = {"shipped: one 2-D matmul": fwd_bwd(mlp_2d, x, *p),
                                       "before: einsum over [B, T, D]": fwd_bwd(mlp_einsum, x, *p)}

  # The attention block as MultiHeadAttention computes it: projections into the heads-major
  # layout, the core, and back; only the core differs between the variants.
  dh = width // heads
  wq, wk, wv = (arr(width, width, scale=width ** -0.5) for _ in range(3))
  wo = arr(width, width, scale=width ** -0.5)

  def block(core):
    def f(x, wq, wk, wv, wo):
      def heads_major(w):
        return layers.matmul_2d(x.reshape(-1, width), w).reshape(batch, tokens, heads, dh).swapaxes(1, 2)
      y = core(heads_major(wq) * dh ** -0.5, heads_major(wk), heads_major(wv))
      return layers.matmul_2d(y.swapaxes(1, 2).reshape(-1, width), wo).reshape(x.shape)
    return f

  def explicit(q, k, v):  # MultiHeadAttention's "explicit" core
    return jnp.einsum("...qk,...kd->...qd", attention.attention_weights(q, k), v)

  def xla_dpa(q, k, v):  # its layout is [B, T, H, Dh]; q is already scaled
    t = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), scale=1.0, implementation="xla"))

  w = (x, wq, wk, wv, wo)
  cases["attention block"] = {"shipped: heads-major einsums": fwd_bwd(block(explicit), *w),
                              "jax.nn.dot_product_attention (xla)": fwd_bwd(block(xla_dpa), *w)}
  return cases


def run_micro(args: argparse.Namespace) -> dict:
  import jax

  cases = micro_cases(args.micro_batch, 197, 192, 3, 768)
  rows = []
  for case, variants in cases.items():
    for fn, fargs in variants.values():
      jax.block_until_ready(fn(*fargs))  # compiles
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.micro_rounds):
      names = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
      for name in names:
        fn, fargs = variants[name]
        times[name] += harness.time_calls(lambda: jax.block_until_ready(fn(*fargs)), warmup=1,
                                          iters=args.micro_iters)
    base = statistics.median(times[next(iter(variants))])
    for name, ts in times.items():
      med = statistics.median(ts)
      rows.append({"case": case, "variant": name, "ms": 1e3 * med, "vs_shipped": med / base,
                   "spread": harness.summarize(ts)["spread"]})
  return {"rows": rows, "versions": harness.environment()["versions"]}


# ---------------------------------------------------------------------------------------------
# Driver.


def run_driver(args: argparse.Namespace) -> dict:
  workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  for w in workloads:
    compare_timm.parse_workload(w)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"variant {v!r} is not one of {list(VARIANTS)}")
  worker_args = compare_timm.parse_args(["--threads", str(args.threads), "--image-size", str(args.image_size),
                                         "--iters", str(args.iters), "--min-seconds", str(args.min_seconds),
                                         "--warmup", str(args.warmup)] +
                                        [f"--option={o}" for o in args.option or []])
  samples: dict[tuple[str, str], list[float]] = {(w, v): [] for w in workloads for v in variants}
  runs = []
  with harness.LoadMonitor(probe_s=harness.IDLE_PROBE_S) as total:
    for r in range(args.rounds):
      for w in workloads:
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
          changes = VARIANTS[v]
          changes = dict(changes, options={**worker_args.options, **changes.get("options", {})})
          result, load = compare_timm.spawn_worker(argparse.Namespace(**{**vars(worker_args), **changes}),
                                                   "jax", w)
          samples[(w, v)].append(result["img_per_s"])
          runs.append({"round": r, "workload": w, "variant": v, "img_per_s": result["img_per_s"],
                       "load": load})
          print(f"round {r} {w:22s} {v:15s} {result['img_per_s']:8.2f} img/s "
                f"(foreign CPU {100 * load['foreign_cpu_fraction']:.0f}%, stolen {100 * load['steal_fraction']:.0f}%)",
                flush=True)
    micro = None
    if args.micro_rounds:
      env = harness.worker_env("hugepages")
      cmd = [sys.executable, os.path.abspath(__file__), "--micro", "--micro-rounds", str(args.micro_rounds),
             "--micro-iters", str(args.micro_iters), "--micro-batch", str(args.micro_batch)]
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
      lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MICRO_PREFIX)]
      if proc.returncode != 0 or not lines:
        raise RuntimeError(f"micro-benchmarks failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
      micro = json.loads(lines[-1][len(MICRO_PREFIX):])
  rows = []
  for w in workloads:
    base = statistics.median(samples[(w, "shipped")]) if "shipped" in variants else None
    for v in variants:
      s = harness.summarize(samples[(w, v)])
      rows.append({"workload": w, "variant": v, "img_per_s": s["median"], "min": s["min"], "max": s["max"],
                   "shipped_speedup": base / s["median"] if base else None})
  print(f"\n{args.rounds} rounds, {args.threads} threads; img/s medians over rounds; shipped_speedup = "
        "shipped img/s / this variant's (how much faster the shipped code is)")
  print(harness.format_table(rows, ["workload", "variant", "img_per_s", "min", "max", "shipped_speedup"]))
  if micro:
    print(f"\nLayers of ViT-Ti/16 at batch {args.micro_batch}, forward + backward, medians of "
          f"{args.micro_rounds} alternating rounds; vs_shipped = time / shipped time")
    print(harness.format_table(micro["rows"], ["case", "variant", "ms", "vs_shipped", "spread"]))
  return harness.finish_runs("ablations", args, total, runs, results=rows, micro=micro)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workloads", default=DEFAULT_WORKLOADS, help="comma-separated mode:model:batch "
                 "(default: %(default)s)")
  p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: %(default)s)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--option", action="append", metavar="KEY=VALUE", help="models.create option")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--min-seconds", type=float, default=3.0)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--micro-rounds", type=int, default=5, help="rounds of the layer benchmarks (0: skip them)")
  p.add_argument("--micro-iters", type=int, default=5, help="timed calls per variant and round")
  p.add_argument("--micro-batch", type=int, default=32, help="batch of the layer benchmarks")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--micro", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.micro:
    harness.apply_preset("cpu")
    result = run_micro(args)
    print(MICRO_PREFIX + json.dumps(result), flush=True)
    return result
  return run_driver(args)


if __name__ == "__main__":
  main()
