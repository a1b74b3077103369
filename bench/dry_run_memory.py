"""Checks the dry run's per-device memory prediction against a real train step on this machine.

  python bench/dry_run_memory.py [--model ViT-B/16] [--batch 16] [--json out.json]

On CPU the real peak is the process's resident-memory high-water mark (VmHWM, reset through
/proc/self/clear_refs after compiling) minus its level before the state is created; on a GPU it is
the device's peak bytes in use. Prints both figures and their ratio.
"""

from __future__ import annotations

import argparse
import gc
import json


def _status_kib(field: str) -> int:
  for line in open("/proc/self/status"):
    if line.startswith(field + ":"):
      return int(line.split()[1])
  raise KeyError(field)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="ViT-B/16")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_layers", type=int, default=None, help="depth (default: the model's)")
  parser.add_argument("--json", default=None, help="write the figures here")
  args = parser.parse_args()

  import jax
  import numpy as np
  from configs import imagenet_vit
  from vit_jax.train import dry_run, trainer

  config = imagenet_vit.get_config(args.model)
  config.image_size = args.image_size
  if args.num_layers:
    config.model.num_layers = args.num_layers
  config.batch_size = config.eval_batch_size = args.batch
  report = dry_run.dry_run(config)
  setup = trainer.make_setup(config)
  spec = setup.task.input_spec(args.batch)
  batch_np = {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}
  step = setup.jit_train_step()
  compiled = step.lower(setup.sharded_abstract_state(),
                        jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                    sharding=setup.batch_sharding), spec)).compile()
  gc.collect()
  gpu = jax.devices()[0].platform == "gpu"
  if not gpu:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    before = _status_kib("VmRSS") * 1024
  state = setup.init_state()
  batch = setup.global_batch(batch_np)
  with jax.set_mesh(setup.mesh):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  if gpu:
    measured = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
  else:
    measured = _status_kib("VmHWM") * 1024 - before
  predicted = report["total_bytes"]
  result = {"model": args.model, "batch": args.batch, "platform": jax.devices()[0].platform,
            "predicted_bytes": predicted, "measured_peak_bytes": measured,
            "ratio": predicted / measured, "param_bytes": report["param_bytes"],
            "opt_state_bytes": report["opt_state_bytes"], "temp_bytes": report["temp_bytes"]}
  print(f"{args.model} batch {args.batch} on {result['platform']}: dry run predicts "
        f"{predicted / 2**30:.3f} GiB, a real step peaks at {measured / 2**30:.3f} GiB "
        f"(ratio {result['ratio']:.3f})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
