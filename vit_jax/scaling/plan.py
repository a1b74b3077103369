"""``sweep.py --plan``: every run's training compute and an estimate of its device-hours.

Compute is ``vit_jax.flops``'s: 3 × the forward FLOPs (2 × multiply-adds) per image × the images
the run sees (steps × batch size), as the ViT paper's Table 6 counts it. Device-hours are an
ESTIMATE: FLOPs / (peak dense bf16 FLOP/s of one device × an assumed utilisation, 0.4 by
default); measured device-hours are in the results table once the runs are done.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from vit_jax.scaling.sweep import Resolved

# Peak dense bf16 FLOP/s of one device (no sparsity), from the vendors' data sheets:
# TPU v3: 123 TFLOP/s per chip of 2 cores (the ViT paper's Table 6 counts TPUv3-core-days);
# TPU v4: 275, v5e: 197, v5p: 459 per chip; NVIDIA V100: 125 (fp16 tensor cores, it has no
# bf16), A100: 312, H100 and H200 (SXM): 989.
ACCELERATORS: Mapping[str, float] = {
    "tpu-v3-core": 61.5e12,
    "tpu-v3": 123e12,
    "tpu-v4": 275e12,
    "tpu-v5e": 197e12,
    "tpu-v5p": 459e12,
    "v100": 125e12,
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
}
DEFAULT_ACCELERATOR = "a100"
DEFAULT_UTILIZATION = 0.4


def check_accelerator(name: str, utilization: float) -> None:
  if name not in ACCELERATORS:
    raise ValueError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")
  if not 0 < utilization <= 1:
    raise ValueError(f"utilisation {utilization} is not in (0, 1]")


def device_hours(flops: float, accelerator: str = DEFAULT_ACCELERATOR,
                 utilization: float = DEFAULT_UTILIZATION) -> float:
  """Estimated device-hours for ``flops`` on ``accelerator`` at ``utilization`` of its peak."""
  check_accelerator(accelerator, utilization)
  return flops / (ACCELERATORS[accelerator] * utilization) / 3600


def rows(plan: Sequence[Resolved], accelerator: str = DEFAULT_ACCELERATOR,
         utilization: float = DEFAULT_UTILIZATION) -> list[dict]:
  """One dict per run: name, stage, model, params, data_size, steps, batch_size,
  examples_seen, exaflops (this run's training compute; None for an evaluation) and
  est_device_hours."""
  out = []
  for r in plan:
    flops = r.info["flops"]
    out.append({"run": r.run.name, "stage": r.run.stage, "model": r.info["model"],
                "params": r.info["params"], "data_size": r.info["data_size"],
                "steps": r.info["steps"], "batch_size": r.info["batch_size"],
                "examples_seen": r.info["examples_seen"],
                "exaflops": None if flops is None else flops / 1e18,
                "est_device_hours": (None if flops is None
                                     else device_hours(flops, accelerator, utilization))})
  return out


def _number(value: float | int | None, kind: str) -> str:
  if value is None:
    return "-"
  if kind == "int":
    return f"{value:,}"
  if kind == "count":  # 86.6M, 1.4B
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
      if value >= scale:
        return f"{value / scale:.1f}{unit}"
    return str(value)
  if value >= 1000:
    return f"{value:,.0f}"
  return f"{value:.4g}" if value >= 0.01 or value == 0 else f"{value:.2e}"


def format_plan(plan: Sequence[Resolved], accelerator: str = DEFAULT_ACCELERATOR,
                utilization: float = DEFAULT_UTILIZATION,
                statuses: Mapping[str, str] | None = None) -> str:
  """The plan as a text table, with totals; ``statuses``: run -> done / failed / to run."""
  table = rows(plan, accelerator, utilization)
  header = ["run", "stage", "model", "params", "data", "steps", "batch", "examples",
            "exaFLOPs", f"est. {accelerator}-hours"] + (["status"] if statuses else [])
  lines = [header]
  for row in table:
    lines.append([row["run"], row["stage"], row["model"], _number(row["params"], "count"),
                  _number(row["data_size"], "count"), _number(row["steps"], "int"),
                  _number(row["batch_size"], "int"), _number(row["examples_seen"], "count"),
                  _number(row["exaflops"], "float"), _number(row["est_device_hours"], "float")]
                 + ([statuses.get(row["run"], "")] if statuses else []))
  widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
  text = ["  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                    for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in lines]
  total_flops = sum(r["exaflops"] or 0 for r in table)
  total_hours = sum(r["est_device_hours"] or 0 for r in table)
  text.append(f"{len(table)} runs: {_number(total_flops, 'float')} exaFLOPs of training, about "
              f"{_number(total_hours, 'float')} {accelerator}-hours "
              f"({_number(total_hours / 24, 'float')} days) at "
              f"{utilization:.0%} of its peak {ACCELERATORS[accelerator] / 1e12:g} TFLOP/s "
              "(bf16, dense): an estimate, not a measurement.")
  return "\n".join(text)
