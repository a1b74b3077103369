"""Every registered model family and name: exact sizes, FLOPs formula against XLA, checkpoint
mapping, README table; and a toy family registered here with one call (``toy_family``)."""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vit_jax import flops, models
from vit_jax.checkpoints import mapping
from vit_jax.models import patches, registry
from vit_jax.models.layers import DTYPES, Dense
from vit_jax.train import sharding

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# Parameters at 224 px, 1000 classes (ViT: the original implementation's counts, token classifier;
# the others: timm's models of the same names have the same counts). Every name of
# ``models.names()`` must be here.
PARAM_COUNTS = {
    "ViT-Ti/16": 5_717_416, "ViT-S/16": 22_050_664, "ViT-B/16": 86_567_656, "ViT-B/32": 88_224_232,
    "ViT-B/8": 86_576_872, "ViT-L/16": 304_326_632, "ViT-L/32": 306_535_400, "ViT-H/14": 632_045_800,
    "ViT-g/14": 1_012_611_432,
    "R50+ViT-B/16": 98_659_112, "R50+ViT-L/32": 328_994_856, "R26+ViT-S/32": 36_431_912,
    "R26+ViT-B/32": 101_383_976, "R+ViT-Ti/16": 6_337_704,
    "Mixer-S/16": 18_528_264, "Mixer-B/16": 59_880_472, "Mixer-B/32": 60_293_428,
    "Mixer-L/16": 208_196_168,
    "TNT-S/16": 23_768_584, "TNT-B/16": 65_428_680,
    "BiT-R50x1": 25_549_352, "BiT-R101x1": 44_541_480, "BiT-R50x3": 217_319_080,
    # timm's resnetv2_101x3_bit and resnetv2_152x2_bit (pretrained=False, num_classes=1000) have
    # these counts too: sum(p.numel() for p in model.parameters()), built on the meta device.
    "BiT-R101x3": 387_934_888, "BiT-R152x2": 236_335_208,
    # transformers' YolosForObjectDetection has these counts for the same configurations (those of
    # hustvl/yolos-tiny, -small, -base; BUILD_ARGS), built on the meta device.
    "YOLOS-Ti": 6_488_736, "YOLOS-S": 30_684_768, "YOLOS-B": 127_798_368,
    # transformers' DetrForObjectDetection (timm resnet50/resnet101 backbone, 91 classes; DC5:
    # dilation=True) has these counts: its frozen batch-norm arrays are buffers, not parameters.
    "DETR-R50": 41_524_768, "DETR-R101": 60_464_672,
    "DETR-R50-DC5": 41_524_768, "DETR-R101-DC5": 60_464_672,
}

# Names pinned at another size or class count than 224 px and 1000 classes: name -> keyword
# arguments of ``flops.abstract_model`` (image_size, num_classes, overrides).
BUILD_ARGS: dict[str, dict] = {
    "YOLOS-Ti": dict(num_classes=91, image_size=(800, 1333), layernorm_eps=1e-12),
    "YOLOS-S": dict(num_classes=91, image_size=(512, 864), use_mid_position_embeddings=True),
    "YOLOS-B": dict(num_classes=91, image_size=(800, 1344), use_mid_position_embeddings=True),
    **{name: dict(num_classes=91, image_size=800)
       for name in ("DETR-R50", "DETR-R101", "DETR-R50-DC5", "DETR-R101-DC5")},
}


def abstract(name: str) -> nnx.Module:
  """``name`` at 224 px, 1000 classes, shape only; a family that can stack its layers
  (``scan``) is built stacked: the same parameters, but tracing does not grow with depth."""
  family, _ = registry.resolve(name)
  args = {"image_size": 224, "num_classes": 1000, **BUILD_ARGS.get(name, {})}
  if "scan" in family.options:
    args.setdefault("scan", True)
  return flops.abstract_model(name, **args)


def count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_every_name_is_pinned():
  assert not set(models.names()) - set(PARAM_COUNTS), "pin the parameter count of every new name"


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count_is_exact(name):
  assert count(abstract(name)) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", models.names())
def test_checkpoint_mapping_is_registered(name):
  family, _ = registry.resolve(name)
  model = abstract(name)
  ckpt = mapping.family_of(model)
  assert ckpt.model_type is type(model)
  assert ckpt.name == family.checkpoint_family


def test_every_family_declares_everything():
  for family in registry.families():
    assert family.examples and family.sizes and family.flops is not None, family.name
    assert family.checkpoint_family is not None, family.name
    assert set(family.options) <= set(registry.options()), family.name
    for example in family.examples:
      assert registry.resolve(example)[0] is family
  assert set(registry.options().values()) <= set(registry.OPTION_TYPES)


@pytest.mark.parametrize("family", [f.name for f in registry.families()])
def test_unknown_options_are_refused(family):
  name = next(f for f in registry.families() if f.name == family).examples[0]
  with pytest.raises(ValueError, match=r"unknown .* option\(s\) \['not_an_option'\]"):
    models.create(name, num_classes=10, not_an_option=1)


# --------------------------------------------------------------- FLOPs formula against XLA

# Per family: a small, shallow model whose matmuls and convolutions dominate. XLA counts
# elementwise work too (norms, GELU, softmax), and no convolution taps on zero padding (images
# large enough keep that small); each differs from the formula by less than 1% here.
FLOPS_PROBES = {
    "ViT": ("ViT-B/16", 32, dict(num_layers=2, hidden_size=512, mlp_dim=2048, num_heads=4)),
    "Hybrid": ("R26+ViT-S/32", 128, dict(num_layers=2, hidden_size=512, mlp_dim=2048, num_heads=4,
                                         resnet_layers=(1,), resnet_width=128, patch_size=4)),
    "BiT": ("BiT-R50x1", 256, dict(layers=(1,), width=256)),
    "Mixer": ("Mixer-B/8", 32, dict(num_layers=2, hidden_size=512, tokens_mlp_dim=16,
                                    channels_mlp_dim=2048)),
    "TNT": ("TNT-S/16", 32, dict(num_layers=2, hidden_size=256, inner_size=256, num_heads=4,
                                 inner_heads=4)),
    "YOLOS": ("YOLOS-B", (64, 96), dict(num_layers=2, hidden_size=512, mlp_dim=2048, num_heads=4,
                                        use_mid_position_embeddings=True)),
    "DETR": ("DETR-R50", 256, dict(resnet_layers=(1, 1, 1, 1), resnet_width=16, hidden_size=256,
                                   mlp_dim=1024, num_heads=4, encoder_layers=1, decoder_layers=1,
                                   num_queries=16)),
}


def test_every_family_has_a_flops_probe():
  assert {f.name for f in registry.families()} <= set(FLOPS_PROBES)


@pytest.mark.parametrize("family", [f.name for f in registry.families()])
def test_flops_formula_within_one_percent_of_xla(family):
  name, size, options = FLOPS_PROBES[family]
  assert registry.resolve(name)[0].name == family
  analytic = flops.forward_flops(name, size, 10, **options)
  xla = flops.xla_forward_flops(name, size, 10, **options)
  assert abs(xla / analytic - 1) < 0.01, (analytic, xla)


# ------------------------------------------------------------------------------ README

def readme_table() -> list[tuple[str, int]]:
  """(name, parameters) of each row of the README's model table."""
  with open(README) as f:
    lines = f.read().splitlines()
  start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*family\s*\|\s*names\s*\|", line))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    names = [n.strip() for n in cells[1].split(",")]
    counts = [int(c.strip().replace(",", "")) for c in cells[2].split(";")]
    assert len(names) == len(counts), line
    rows += zip(names, counts)
  return rows


def test_readme_model_table_is_registered_and_pinned():
  rows = readme_table()
  assert len(rows) >= len(registry.families())
  for name, params in rows:
    assert any(f.pattern.fullmatch(name) for f in registry.families()), name
    assert PARAM_COUNTS.get(name) == params, name


# ------------------------------------------------------------------- a family of one file

TOY_SIZES = {"S": dict(patch_size=2)}


@dataclasses.dataclass(frozen=True)
class ToyConfig(patches.PatchConfig):
  num_classes: int
  image_size: int = 8
  patch_size: int = 2
  channels: int = 3
  dtype: str = "float32"


class Toy(nnx.Module):
  """Averages each patch, then one Dense to the classes, over a logical axis of its own."""

  def __init__(self, cfg: ToyConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.head = Dense(cfg.grid ** 2 * cfg.channels, cfg.num_classes, axes=("toy_features", "classes"),
                      rngs=rngs, dtype=DTYPES[cfg.dtype])

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del train, rngs
    patches.check_images(images, self.config.image_size, self.config.channels)
    x = jnp.mean(patches.patchify(images, self.config.patch_size), axis=(3, 4))
    return self.head(x.reshape(x.shape[0], -1)).astype(jnp.float32)


TOY_OPTIONS = registry.config_options(ToyConfig)


def build_toy(match: re.Match, *, num_classes: int, image_size: int, rngs: nnx.Rngs,
              overrides: dict) -> Toy:
  kwargs = {**TOY_SIZES[match["variant"]], **overrides}
  registry.check_options("Toy", kwargs, TOY_OPTIONS)
  return Toy(ToyConfig(num_classes=num_classes, image_size=image_size, **kwargs), rngs=rngs)


def toy_flops(model: Toy) -> int:
  """The one matmul: patch means -> classes."""
  c = model.config
  return 2 * c.grid ** 2 * c.channels * c.num_classes


@pytest.fixture
def toy_family():
  """The toy family, registered for the test (one ``register_family`` call) and removed after."""
  family = registry.register_family(
      "Toy",
      pattern=r"Toy-(?P<variant>S)",
      build=build_toy,
      examples=("Toy-S",),
      help="Toy-S: a linear classifier on patch means",
      sizes=TOY_SIZES,
      flops=toy_flops,
      sharding_rules=(("toy_features", "fsdp"),),
      options=TOY_OPTIONS,
  )
  yield family
  registry.unregister("Toy")


def test_toy_family_is_created_counted_and_sharded(toy_family):
  model = models.create("Toy-S", num_classes=3, image_size=8)
  assert model(jnp.zeros((2, 8, 8, 3))).shape == (2, 3)
  assert "Toy-S" in models.names() and registry.options()["patch_size"] is int
  # The formula is the family's: 2 x (16 patches x 3 channels) x 3 classes, as traced.
  assert flops.forward_flops("Toy-S", 8, 3) == toy_flops(model) == 288
  assert flops.traced_flops(flops.abstract_model("Toy-S", 8, 3), 8) == 288
  rules = sharding.rules_dict([])
  assert rules["toy_features"] == "fsdp" and rules["embed"] == "fsdp"
  mesh = sharding.make_mesh("fsdp")
  assert mesh.shape["fsdp"] == 8
  abstract_model = nnx.eval_shape(lambda: models.create("Toy-S", num_classes=3, image_size=8))
  params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
  shardings = sharding.param_shardings(params, sharding.logical_axes(abstract_model), rules, mesh)
  assert shardings["head"]["kernel"].spec == P("fsdp", None)
  assert shardings["head"]["bias"].spec == P(None)
  # An override of the config's list wins over the family's rule.
  assert sharding.rules_dict([("toy_features", None)])["toy_features"] is None


def test_unregistered_toy_is_gone(toy_family):
  registry.unregister("Toy")
  with pytest.raises(ValueError, match="unknown model name 'Toy-S'"):
    models.create("Toy-S", num_classes=3)
  assert "toy_features" not in sharding.rules_dict([])
  registry.register_family(**_toy_kwargs(toy_family))  # back, for the fixture's teardown


def _toy_kwargs(family: registry.Family, **changes) -> dict:
  kwargs = dict(name=family.name, pattern=family.pattern.pattern, build=family.build,
                examples=family.examples, help=family.help, sizes=family.sizes, flops=family.flops,
                sharding_rules=family.sharding_rules, options=family.options,
                checkpoint_family=family.checkpoint_family)
  return {**kwargs, **changes}


@pytest.mark.parametrize("changes,match", [
    (dict(), "already registered"),
    (dict(name="Toy2", sharding_rules=(("tokens", "fsdp"),)), r"\('tokens', 'fsdp'\) of family Toy2 contradicts"),
    (dict(name="Toy2", options={"channels": str}), "option 'channels' is str in family Toy2 but int"),
    (dict(name="Toy2", options={"width": list}), "option 'width' has type"),
])
def test_conflicting_registrations_are_refused(toy_family, changes, match):
  before = registry.families()
  with pytest.raises(ValueError, match=match):
    registry.register_family(**_toy_kwargs(toy_family, **changes))
  assert registry.families() == before


def test_family_rule_against_a_core_rule_is_an_error(toy_family):
  registry.register_family(**_toy_kwargs(toy_family, name="Toy2", sharding_rules=(("embed", None),)))
  try:
    with pytest.raises(ValueError, match=r"\('embed', None\) contradicts the core rule"):
      sharding.rules_dict([])
  finally:
    registry.unregister("Toy2")
