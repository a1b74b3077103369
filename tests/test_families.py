"""Hybrid ResNet+ViT, BiT ResNets, MLP-Mixer and TNT: parity with timm on the same weights (small
sizes; the full sizes: bench/parity_full.py), released formats, training, sharding. Exact sizes:
tests/test_registry.py."""

from __future__ import annotations

import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import families as family_configs
from tests import original_npz
from tests.timm_helpers import import_timm, randomize_, state_dict_numpy
from vit_jax import checkpoints, models
from vit_jax.checkpoints import param_tree
from vit_jax.models.attention import MultiHeadAttention
from vit_jax.models.conv import weight_standardize
from vit_jax.models.layers import Mlp
from vit_jax.train import trainer

TOL = 1e-4
TIMM_NUMERICS = dict(ws_style="var", ws_eps=1e-8, gn_eps=1e-5)  # timm's StdConv2dSame, GroupNormAct


# ------------------------------------------------------------------ parity with timm (small sizes)

@pytest.fixture(scope="module")
def timm():
  return import_timm()


def _hybrid(timm, stem_only: bool = False):
  from timm.layers import StdConv2dSame
  from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
  from timm.models.vision_transformer_hybrid import _create_vision_transformer_hybrid
  conv = partial(StdConv2dSame, eps=1e-8)
  vit = dict(img_size=32, embed_dim=64, depth=2, num_heads=2, num_classes=10)
  ours = dict(hidden_size=64, num_layers=2, num_heads=2, mlp_dim=256, resnet_width=32, **TIMM_NUMERICS)
  if stem_only:
    backbone = create_resnetv2_stem(3, 32, stem_type="same", preact=False, conv_layer=conv)
    ref = _create_vision_transformer_hybrid("vit_tiny_r_s16_p8_224", backbone=backbone,
                                            patch_size=8, **vit)
    return ref, "R+ViT-Ti/16", ours
  backbone = ResNetV2(layers=(1, 1), channels=(128, 256), stem_chs=32, num_classes=0,
                      global_pool="", preact=False, stem_type="same", conv_layer=conv)
  ref = _create_vision_transformer_hybrid("vit_small_r26_s32_224", backbone=backbone, **vit)
  return ref, "R26+ViT-S/32", dict(ours, resnet_layers=(1, 1))


def reference(timm, family: str):
  """(timm model with random weights, our name, our options) at 32 px with 10 classes."""
  if family == "hybrid":
    ref, name, ours = _hybrid(timm)
  elif family == "hybrid_stem":
    ref, name, ours = _hybrid(timm, stem_only=True)
  elif family == "bit":
    ref = timm.models.resnetv2._create_resnetv2_bit(
        "resnetv2_50x1_bit", num_classes=10, layers=[1, 1], channels=(128, 256), stem_chs=32)
    name, ours = "BiT-R50x1", dict(layers=(1, 1), width=32)
  elif family == "mixer":
    ref = timm.models.mlp_mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2,
                                         embed_dim=64)
    name, ours = "Mixer-B/8", dict(hidden_size=64, num_layers=2, tokens_mlp_dim=32, channels_mlp_dim=256)
  elif family == "tnt":
    ref = timm.models.tnt.TNT(img_size=32, patch_size=16, embed_dim=64, inner_dim=16, depth=2,
                              num_heads_inner=4, num_heads_outer=2, num_classes=10)
    name, ours = "TNT-S/16", dict(hidden_size=64, inner_size=16, num_layers=2, num_heads=2)
  randomize_(ref, seed=1)
  return ref.eval(), name, ours


def images(size: int = 32, n: int = 2) -> np.ndarray:
  return np.random.default_rng(0).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def timm_logits(ref, x: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def our_logits(model, x: np.ndarray) -> np.ndarray:
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))


def save_safetensors(ref, path) -> str:
  from safetensors.numpy import save_file
  save_file(state_dict_numpy(ref), str(path))
  return str(path)


@pytest.mark.parametrize("family", ["hybrid", "hybrid_stem", "bit", "mixer", "tnt"])
def test_timm_weights_give_timm_logits(tmp_path, timm, family):
  ref, name, options = reference(timm, family)
  path = save_safetensors(ref, tmp_path / "timm.safetensors")
  model = checkpoints.load_pretrained(models.create(name, num_classes=10, image_size=32, **options), path)
  x = images()
  want = timm_logits(ref, x)
  assert np.abs(want).max() > 0.1  # a meaningful comparison, not zeros
  assert np.max(np.abs(our_logits(model, x) - want)) < TOL


@pytest.mark.parametrize("family", ["hybrid", "mixer", "tnt"])
def test_gelu_approximate_matches_timm_with_tanh_gelu(tmp_path, timm, family):
  import torch
  ref, name, options = reference(timm, family)
  for module in ref.modules():
    if isinstance(module, torch.nn.GELU):
      module.approximate = "tanh"
  path = save_safetensors(ref, tmp_path / "timm.safetensors")
  exact = checkpoints.load_pretrained(models.create(name, num_classes=10, image_size=32, **options), path)
  model = checkpoints.load_pretrained(
      models.create(name, num_classes=10, image_size=32, gelu_approximate=True, **options), path)
  assert all(m.gelu_approximate for _, m in nnx.iter_graph(model) if isinstance(m, Mlp))
  x = images()
  want = timm_logits(ref, x)
  error = np.max(np.abs(our_logits(model, x) - want))
  assert error < TOL
  assert np.max(np.abs(our_logits(exact, x) - want)) > 5 * error  # the option changes the function


def test_tnt_inner_and_outer_attention_are_the_shared_one():
  model = nnx.eval_shape(lambda: models.create("TNT-S/16", num_classes=10, num_layers=1))
  block = model.blocks[0]
  assert isinstance(block.attn_in, MultiHeadAttention) and isinstance(block.attn_out, MultiHeadAttention)
  assert block.attn_in.query.bias is None  # no qkv bias in TNT
  hybrid = nnx.eval_shape(lambda: models.create("R+ViT-Ti/16", num_classes=10, num_layers=1))
  assert isinstance(hybrid.Transformer.blocks[0].MultiHeadDotProductAttention_1, MultiHeadAttention)


# ----------------------------------------------------------------- released npz formats, export

def test_hybrid_npz_read_by_timm_and_by_us_and_exported_back(tmp_path, timm):
  from timm.models.vision_transformer import _load_weights
  ref, name, options = reference(timm, "hybrid")
  arrays = original_npz.hybrid_npz(state_dict_numpy(ref), num_heads=2)
  path = str(tmp_path / "hybrid.npz")
  np.savez(path, **arrays)
  x = images()
  want = timm_logits(ref, x)
  again, _, _ = reference(timm, "hybrid")
  randomize_(again, seed=5)
  _load_weights(again, path)  # timm's own reader of the original format
  assert np.max(np.abs(timm_logits(again.eval(), x) - want)) < 1e-6
  model = checkpoints.load_pretrained(models.create(name, num_classes=10, image_size=32, **options), path)
  assert np.max(np.abs(our_logits(model, x) - want)) < TOL
  scanned = checkpoints.load_pretrained(
      models.create(name, num_classes=10, image_size=32, scan=True, **options), path)
  assert np.max(np.abs(our_logits(scanned, x) - want)) < TOL
  exported = dict(np.load(checkpoints.export_npz(scanned, tmp_path / "out.npz")))
  assert exported.keys() == arrays.keys()
  assert all(np.array_equal(exported[k], arrays[k]) for k in arrays)
  spec, _ = checkpoints.infer_model(path)
  assert (spec.num_classes, spec.image_size) == (10, 32)
  inferred = models.create(spec.name, num_classes=spec.num_classes, image_size=spec.image_size,
                           **spec.overrides, **TIMM_NUMERICS)
  checkpoints.load_pretrained(inferred, path)
  assert np.max(np.abs(our_logits(inferred, x) - want)) < TOL


def test_hybrid_default_numerics_are_the_original_code(tmp_path, timm):
  """Default: (w - mean) / (std + 1e-5) and GroupNorm eps 1e-6 (original), not timm's."""
  ref, name, options = reference(timm, "hybrid")
  path = str(tmp_path / "hybrid.npz")
  np.savez(path, **original_npz.hybrid_npz(state_dict_numpy(ref), num_heads=2))
  options = {k: v for k, v in options.items() if k not in TIMM_NUMERICS}
  model = checkpoints.load_pretrained(models.create(name, num_classes=10, image_size=32, **options), path)
  cfg = model.resnet.config
  assert (cfg.ws_style, cfg.ws_eps, cfg.gn_eps, cfg.padding) == ("std", 1e-5, 1e-6, "same")
  diff = np.max(np.abs(our_logits(model, images()) - timm_logits(ref, images())))
  assert 0 < diff < 1e-2  # the same function up to the epsilons
  w = np.random.default_rng(0).standard_normal((3, 3, 4, 8)).astype(np.float32)
  centred = w - w.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(weight_standardize(w, "std", 1e-5),
                             centred / (centred.std(axis=(0, 1, 2)) + 1e-5), rtol=1e-5)
  np.testing.assert_allclose(weight_standardize(w, "var", 1e-8),
                             centred / np.sqrt(centred.var(axis=(0, 1, 2)) + 1e-8), rtol=1e-5)


def test_mixer_npz_read_by_us_matches_timm_and_exports_back(tmp_path, timm):
  ref, name, options = reference(timm, "mixer")
  arrays = original_npz.mixer_npz(state_dict_numpy(ref))
  path = str(tmp_path / "mixer.npz")
  np.savez(path, **arrays)
  model = checkpoints.load_pretrained(models.create(name, num_classes=10, image_size=32, **options), path)
  x = images()
  assert np.max(np.abs(our_logits(model, x) - timm_logits(ref, x))) < TOL
  exported = dict(np.load(checkpoints.export_npz(model, tmp_path / "out.npz")))
  assert exported.keys() == arrays.keys()
  assert all(np.array_equal(exported[k], arrays[k]) for k in arrays)
  spec, _ = checkpoints.infer_model(path)
  assert spec == checkpoints.ModelSpec("Mixer-B/8", 10, 32, options)


def test_checkpoint_of_another_family_is_a_clear_error(tmp_path, timm):
  ref, _, _ = reference(timm, "mixer")
  path = save_safetensors(ref, tmp_path / "mixer.safetensors")
  tnt = nnx.eval_shape(lambda: models.create("TNT-S/16", num_classes=10, image_size=32, num_layers=1))
  with pytest.raises(checkpoints.CheckpointMismatchError, match="not a TNT checkpoint"):
    checkpoints.load_pretrained(tnt, path)


def test_new_head_for_other_classes(tmp_path, timm):
  ref, name, options = reference(timm, "bit")
  path = save_safetensors(ref, tmp_path / "bit.safetensors")
  model = checkpoints.load_pretrained(models.create(name, num_classes=3, image_size=32, **options), path,
                                     init=["head/.*"])
  arrays = param_tree.model_arrays(model, ())
  assert not arrays["head/kernel"].any() and arrays["head/kernel"].shape == (256, 3)
  np.testing.assert_array_equal(arrays["gn_final/scale"], state_dict_numpy(ref)["norm.weight"])


@pytest.mark.parametrize("name,options,match", [
    ("BiT-R50x1", dict(gelu_approximate=True), "unknown BiT option"),
    ("BiT-R50x1", dict(width=40), "not divisible into 32 groups"),
    ("R26+ViT-B/16", {}, "no hybrid backbone R26.*/16"),
    ("R50+ViT-B/16", dict(resnet_depth=3), "unknown hybrid option"),
    ("Mixer-B/16", dict(num_heads=4), "unknown Mixer option"),
    ("TNT-S/16", dict(ws_eps=1e-5), "unknown TNT option"),
    ("BiT-R50x1", dict(ws_style="l2"), "ws_style 'l2' is not one of"),
])
def test_bad_options_are_value_errors(name, options, match):
  with pytest.raises(ValueError, match=match):
    nnx.eval_shape(lambda: models.create(name, num_classes=10, **options))


# -------------------------------------------------------------- training and sharding (8 devices)

def tiny_config(family: str, **changes):
  """configs/families.py:<family> with one layer, a higher learning rate and 50 steps."""
  c = family_configs.get_config(family)
  if c.model.get("num_layers") is not None:
    c.model.num_layers = 1
  settings = dict(batch_size=64, eval_batch_size=80, total_steps=50, lr=5e-3, label_smoothing=0.0,
                  log_every=1, eval_every=50, checkpoint_every=50)
  c.update(**{**settings, **changes})
  c.schedule.warmup_steps = 5
  return c


@pytest.mark.parametrize("family", ["hybrid", "bit", "mixer", "tnt"])
def test_tiny_config_trains_on_the_digits(tmp_path, family):
  # One device: the loop is the same on any mesh (test_sharding compares meshes), and faster here.
  final = trainer.train_and_evaluate(tiny_config(family), str(tmp_path), jax.devices()[:1])
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  assert len(losses) == 50
  assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), losses
  assert final["top1"] > 0.3  # 10 classes: chance is 0.1


# One parameter per family and its spec under the "fsdp" and "tensor_parallel" presets.
EXAMPLE_SPECS = {
    "hybrid": (("resnet", "conv_root", "kernel"), P(None, None, None, "fsdp"), P(None, None, None, None)),
    "bit": (("block2", "unit1", "conv3", "kernel"), P(None, None, None, "fsdp"), P(None, None, None, None)),
    "mixer": (("blocks", 0, "channel_mixing", "Dense_0", "kernel"), P("fsdp", None), P(None, "tensor")),
    "tnt": (("blocks", 0, "attn_out", "query", "kernel"), P("fsdp", None, None), P(None, "tensor", None)),
}


@pytest.mark.parametrize("family", ["hybrid", "bit", "mixer", "tnt"])
def test_shards_with_the_vit_rules_and_presets(family):
  path, fsdp_spec, tensor_spec = EXAMPLE_SPECS[family]
  for mesh, want in (("fsdp", fsdp_spec), ("data=2,fsdp=4,tensor=1", None), ("tensor_parallel", tensor_spec)):
    params = trainer.make_setup(tiny_config(family, mesh=mesh)).shardings.params
    specs = [s.spec for s in jax.tree.leaves(params)]
    assert any("fsdp" in spec for spec in specs) == (mesh != "tensor_parallel"), mesh
    if family != "bit":  # a ReLU ResNet has no heads or MLP width to split
      assert any("tensor" in spec for spec in specs) == (mesh == "tensor_parallel"), mesh
    if want is not None:
      for key in path:
        params = params[key]
      assert params.spec == want, (mesh, params.spec)
  setup = trainer.make_setup(tiny_config(family, mesh="data=2,fsdp=2,tensor=2", batch_size=16))
  state = setup.init_state()
  for leaf, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(setup.shardings.params)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
  rng = np.random.default_rng(0)
  batch = setup.global_batch({"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
                              "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]})
  state, metrics = setup.jit_train_step()(state, batch)
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
  for leaf, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(setup.shardings.params)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
