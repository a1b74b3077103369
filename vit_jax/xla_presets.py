"""XLA flag presets: named sets of ``XLA_FLAGS`` that must be set before JAX is imported.

  cpu:  XLA runs matmuls with its Eigen kernels while YNNPACK keeps the reductions
        (``--xla_cpu_experimental_ynn_fusion_type=reduce``). It touches only the CPU backend.
        (measured: docs/benchmarks.md, "Where the speed comes from")
  none: XLA's defaults.

The scripts' ``--xla_preset NAME`` (``vit_jax.command_line.prepare_process``) and the ``bench/``
scripts' ``--preset NAME`` apply one.
"""

from __future__ import annotations

import os
import sys

PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "cpu": ("--xla_cpu_experimental_ynn_fusion_type=reduce",),
}


def apply(name: str) -> str:
  """Adds preset ``name``'s flags to ``XLA_FLAGS`` (before jax is imported); returns XLA_FLAGS."""
  if name not in PRESETS:
    raise ValueError(f"XLA preset {name!r} is not one of {sorted(PRESETS)}")
  if "jax" in sys.modules and PRESETS[name]:
    raise RuntimeError("XLA presets must be applied before jax is imported")
  flags = os.environ.get("XLA_FLAGS", "").split()
  flags += [f for f in PRESETS[name] if f not in flags]
  if flags:
    os.environ["XLA_FLAGS"] = " ".join(flags)
  return os.environ.get("XLA_FLAGS", "")
