"""FLOPs per image: the analytic count of ``vit_jax.flops`` beside XLA's count, and the ViT paper's
pre-training compute.

  python bench/flops_table.py --json results/flops.json

For each model and resolution: analytic forward GFLOPs (2 x multiply-adds of the matmuls and
convolutions), the same as GMACs (timm's unit), and XLA's cost analysis of the compiled, unrolled
forward pass (which also counts norms, activations, softmax and additions). Then the pre-training
compute of the ViT paper's Table 6 (JFT-300M: 303M images at 224 px, 18,291 classes, with the
pre-logits layer; training = 3 x forward) in exaFLOPs. ``--no-xla`` skips the compiles.
"""

from __future__ import annotations

import argparse
import harness  # bench/, beside this script

DEFAULT_MODELS = ("ViT-Ti/16@224,ViT-S/16@224,ViT-B/16@224,ViT-L/16@224,ViT-H/14@224,"
                  "ViT-Ti/16@384,ViT-S/16@384,ViT-B/16@384,ViT-L/16@384")
# (model, epochs) of the ViT paper's Table 6.
PAPER_RUNS = (("ViT-B/32", 7), ("ViT-B/16", 7), ("ViT-L/32", 7), ("ViT-L/16", 7), ("ViT-L/16", 14),
              ("ViT-H/14", 14))
JFT_IMAGES, JFT_CLASSES = 303e6, 18_291


def parse_models(text: str) -> list[tuple[str, int]]:
  out = []
  for item in (s.strip() for s in text.split(",") if s.strip()):
    name, _, size = item.partition("@")
    if not size.isdigit():
      raise ValueError(f"model {item!r} is not NAME@SIZE (e.g. ViT-B/16@224)")
    out.append((name, int(size)))
  return out


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated NAME@SIZE (default: %(default)s)")
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--no-xla", action="store_true", help="skip XLA's count (no compiles)")
  p.add_argument("--json", default=None, help="write the results here")
  args = p.parse_args(argv)
  models = parse_models(args.models)

  from vit_jax import flops
  from vit_jax.models.vit import VARIANTS

  rows = []
  for name, size in models:
    analytic = flops.forward_flops(name, size, args.num_classes)
    row = {"model": name, "image_size": size, "gflops": analytic / 1e9, "gmacs": analytic / 2e9}
    if not args.no_xla:
      xla = flops.xla_forward_flops(name, size, args.num_classes)
      row.update(xla_gflops=xla / 1e9, xla_over_analytic=xla / analytic)
    rows.append(row)
    print(f"{name} @ {size}: {analytic / 1e9:.2f} GFLOPs", flush=True)
  paper = []
  for name, epochs in PAPER_RUNS:
    width = VARIANTS[name[4]]["hidden_size"]
    per_image = flops.train_flops(name, 224, JFT_CLASSES, representation_size=width)
    paper.append({"model": name, "epochs": epochs, "exaflops": JFT_IMAGES * epochs * per_image / 1e18})
  print(f"\nForward FLOPs per image, {args.num_classes} classes")
  print(harness.format_table(rows, [c for c in ("model", "image_size", "gflops", "gmacs", "xla_gflops",
                                                "xla_over_analytic") if c in rows[0]]))
  print("\nPre-training compute on JFT-300M (ViT paper, Table 6), exaFLOPs")
  print(harness.format_table(paper, ["model", "epochs", "exaflops"]))
  record = {"script": "flops_table", "forward": rows, "paper_table6": paper,
            "environment": harness.environment()}
  harness.write_json(args.json, record)
  return record


if __name__ == "__main__":
  main()
