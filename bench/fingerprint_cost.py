"""What checkpoint fingerprints cost: fingerprinting a whole train state against one train step.

  .venv/bin/python bench/fingerprint_cost.py --model ViT-B/16 --batch 16

Builds the trainer's own state and jitted step for MODEL at BATCH (synthetic images), times the
step and ``vit_jax.train.fingerprint.fingerprints`` of the whole state (parameters, AdamW's two
moments, the step; computed the CPU devices' way, and the accelerators' way for comparison), each the median of ``--iters`` calls after a warm-up, in one process, and
prints both and their ratio. The checkpoint issue's bar: under 2% of a step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import harness  # noqa: E402  (bench/, beside this script)


def main() -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="ViT-B/16")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--preset", default="cpu", choices=sorted(harness.PRESETS))
  args = p.parse_args()
  preset = harness.apply_preset(args.preset)
  import jax
  import numpy as np

  import workloads
  from configs import default
  from vit_jax.train import checkpointing, fingerprint

  config = default.get_config()
  config.model.update(name=args.model, channels=3, hidden_size=None, num_layers=None,
                      num_heads=None, mlp_dim=None)
  config.image_size, config.num_classes, config.batch_size = 224, 1000, args.batch
  run, info = workloads.jax_train_step(config)
  holder = {}
  from vit_jax.train import trainer
  setup = trainer.make_setup(config)
  state = setup.init_state()
  nested = checkpointing.to_nested(state)
  leaves = jax.tree.leaves(nested)
  elements = sum(int(np.size(x)) for x in leaves)

  def timed(fn, n):
    fn()
    out = []
    for _ in range(n):
      t = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t)
    return statistics.median(out)

  step_s = timed(run, args.iters)
  fp_s = timed(lambda: fingerprint.fingerprints(nested), args.iters)
  direct_s = timed(lambda: fingerprint.fingerprints(nested, folded=False), args.iters)
  result = {"model": args.model, "batch": args.batch, "state_arrays": len(leaves),
            "state_elements": elements, "step_s": step_s, "fingerprint_s": fp_s,
            "ratio": fp_s / step_s, "direct_s": direct_s, "preset": preset, **harness.environment()}
  del holder
  print(f"{args.model} batch {args.batch}: train step {step_s * 1000:.0f} ms; fingerprints of the "
        f"whole state ({len(leaves)} arrays, {elements / 1e6:.1f} M elements) {fp_s * 1000:.1f} ms "
        f"= {100 * fp_s / step_s:.2f}% of a step (the accelerators' way, one "
        f"reduction per array, on this CPU: {direct_s * 1000:.1f} ms)")
  return result


if __name__ == "__main__":
  main()
