"""Hungarian matching speed: the pure-JAX matcher under jit(vmap), scipy through pure_callback,
and scipy's linear_sum_assignment looped over the batch on the host.

  .venv/bin/python -m bench.matcher_speed            (from the repo root)
  .venv/bin/python bench/matcher_speed.py --batch 64 --shapes 100x20,100x100 --json out.json

Each shape is QUERIESxTARGETS; the batch holds that many random cost matrices (uniform in
[-1, 1]). Times are per call on the whole batch, after compilation: median of ``--iters`` runs.
Every method's total matched cost is checked against scipy's before timing. Prints the table,
the CPU model, the devices, the versions and the machine-load verdict (CPU figures are only
worth quoting from an idle machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness, also under ``-m``
import harness  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from vit_jax import detection  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=64, help="cost matrices per call")
  p.add_argument("--shapes", default="100x20,100x100", help="comma-separated QUERIESxTARGETS")
  p.add_argument("--iters", type=int, default=10, help="timed calls per method (median reported)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="write the record here")
  return p.parse_args(argv)


def parse_shape(text: str) -> tuple[int, int]:
  try:
    queries, targets = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise SystemExit(f"--shapes: {text!r} is not QUERIESxTARGETS, e.g. 100x20") from None
  if targets > queries:
    raise SystemExit(f"--shapes: {text} has more targets than queries")
  return queries, targets


def scipy_loop(cost: np.ndarray) -> np.ndarray:
  out = np.empty(cost.shape[::2], np.int32)
  for b in range(cost.shape[0]):
    queries, targets = linear_sum_assignment(cost[b])
    out[b, targets] = queries
  return out


def total_cost(cost: np.ndarray, query_of_target: np.ndarray) -> float:
  picked = np.take_along_axis(cost.astype(np.float64), query_of_target[:, None, :], axis=1)
  return float(picked.sum())


def measure(name: str, fn, cost: np.ndarray, iters: int, reference: float) -> dict:
  t0 = time.perf_counter()
  result = np.asarray(fn())  # compiles (jitted methods) and checks the answer
  first_s = time.perf_counter() - t0
  if abs(total_cost(cost, result) - reference) > 1e-4:
    raise SystemExit(f"{name}: total cost {total_cost(cost, result)} != scipy's {reference}")
  times = harness.summarize(harness.time_calls(fn, warmup=1, iters=iters))
  batch = cost.shape[0]
  return {"method": name, "median_ms": 1e3 * times["median"], "min_ms": 1e3 * times["min"],
          "per_matrix_us": 1e6 * times["median"] / batch, "first_call_s": first_s,
          "spread": times["spread"]}


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  shapes = [parse_shape(s) for s in args.shapes.split(",")]
  rng = np.random.default_rng(args.seed)
  by_jax = jax.jit(lambda c, v: detection.match(c, v, "jax"))
  by_callback = jax.jit(lambda c, v: detection.match(c, v, "scipy"))
  rows = []
  with harness.LoadMonitor(probe_s=1.0) as load:
    for queries, targets in shapes:
      cost = rng.uniform(-1, 1, (args.batch, queries, targets)).astype(np.float32)
      valid = np.ones((args.batch, targets), bool)
      cost_d, valid_d = jax.device_put(cost), jax.device_put(valid)
      reference = total_cost(cost, scipy_loop(cost))
      methods = [
          ("jax jit(vmap)", lambda: by_jax(cost_d, valid_d).block_until_ready()),
          ("scipy pure_callback", lambda: by_callback(cost_d, valid_d).block_until_ready()),
          ("scipy loop (host)", lambda: scipy_loop(cost)),
      ]
      for name, fn in methods:
        row = measure(name, fn, cost, args.iters, reference)
        rows.append({"shape": f"{args.batch}x{queries}x{targets}", **row})
  print(harness.format_table(rows, ["shape", "method", "median_ms", "min_ms", "per_matrix_us",
                                    "first_call_s", "spread"]))
  env = harness.environment()
  env["versions"].update(scipy=scipy.__version__, numpy=np.__version__)
  print(f"cpu: {env['cpu']} ({os.cpu_count()} cores); devices: {env['devices']}")
  print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
  print(load.verdict())
  record = {"script": "matcher_speed", "args": vars(args), "results": rows, "load": load.report(),
            "environment": env}
  harness.write_json(args.json, record)
  return record


if __name__ == "__main__":
  main()
