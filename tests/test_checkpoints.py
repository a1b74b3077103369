"""Released-checkpoint formats: parity with timm on the same weights, round trips, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage
from flax import nnx

from tests import npz_writers
from tests.timm_helpers import import_timm, randomize_
from vit_jax import checkpoints, models
from vit_jax.checkpoints import param_tree, posemb

BLOCKS = ["Transformer/blocks"]
VARIANTS = {  # width, heads, mlp, timm name
    "Ti": (192, 3, 768, "vit_tiny_patch16_224"),
    "S": (384, 6, 1536, "vit_small_patch16_224"),
    "B": (768, 12, 3072, "vit_base_patch16_224"),
}
TOL = 1e-4


@pytest.fixture(scope="module")
def timm():
  return import_timm()


def images(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def timm_logits(model, x: np.ndarray) -> np.ndarray:
  import torch
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


_BUILT: dict = {}


def ours(variant="Ti", *, num_classes=10, image_size=224, depth=2, **kw):
  """A fresh model (a copy of one built once per configuration: building costs seconds)."""
  key = (variant, num_classes, image_size, depth, tuple(sorted(kw.items())))
  if key not in _BUILT:
    _BUILT[key] = models.create(f"ViT-{variant}/16", num_classes=num_classes, image_size=image_size,
                                num_layers=depth, rngs=nnx.Rngs(1), **kw)
  return nnx.clone(_BUILT[key])


def write_original(path, variant="Ti", *, depth=2, num_classes=10, grid=14, **kw) -> str:
  width, heads, mlp, _ = VARIANTS[variant]
  arrays = npz_writers.original_vit_arrays(width=width, depth=depth, heads=heads, mlp=mlp, patch=16,
                                           grid=grid, num_classes=num_classes, **kw)
  return npz_writers.write_npz(path, arrays)


def params(model) -> dict[str, np.ndarray]:
  return param_tree.model_arrays(model, BLOCKS)


def randomized(model, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in params(model).items()}
  param_tree.assign(model, arrays, BLOCKS)
  return model


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ---------------------------------------------------------------- parity with timm, original npz

def test_original_npz_full_depth_ti_matches_timm(tmp_path, timm):
  from timm.models.vision_transformer import _load_weights
  path = write_original(tmp_path / "ti.npz", depth=12)
  reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
  _load_weights(reference, path)
  model = checkpoints.load_pretrained(ours(depth=12), path)
  x = images(224)
  want = timm_logits(reference, x)
  assert np.abs(want).max() > 0.5  # A meaningful comparison, not zeros.
  assert max_diff(model(x), want) < TOL


@pytest.mark.parametrize("variant", ["S", "B"])
def test_original_npz_small_and_base_match_timm(tmp_path, timm, variant):
  from timm.models.vision_transformer import _load_weights
  path = write_original(tmp_path / f"{variant}.npz", variant, depth=2)
  reference = timm.create_model(VARIANTS[variant][3], pretrained=False, num_classes=10, depth=2)
  _load_weights(reference, path)
  model = checkpoints.load_pretrained(ours(variant), path)
  x = images(224)
  assert max_diff(model(x), timm_logits(reference, x)) < TOL


def test_384px_bilinear_resampling_matches_timm_reader(tmp_path, timm):
  """timm's npz reader resamples the grid bilinearly (half-pixel): so does ours on request."""
  from timm.models.vision_transformer import _load_weights
  path = write_original(tmp_path / "ti.npz")
  reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2,
                                img_size=384)
  _load_weights(reference, path)
  model = checkpoints.load_pretrained(ours(image_size=384), path, resample_posemb="bilinear")
  x = images(384, n=1)
  assert max_diff(model(x), timm_logits(reference, x)) < TOL


def test_384px_zoom_resampling_matches_timm_on_the_original_recipe(tmp_path, timm):
  """Default: the original code's zoom(order=1) on the grid, class token kept apart. timm gets
  a file resampled that way by the test itself (so it does not resample)."""
  from timm.models.vision_transformer import _load_weights
  arrays = dict(np.load(write_original(tmp_path / "ti.npz")))
  pe = arrays["Transformer/posembed_input/pos_embedding"]
  grid = scipy.ndimage.zoom(pe[0, 1:].reshape(14, 14, -1), (24 / 14, 24 / 14, 1), order=1)
  resampled = dict(arrays)
  resampled["Transformer/posembed_input/pos_embedding"] = np.concatenate(
      [pe[:, :1], grid.reshape(1, 576, -1)], axis=1)
  path384 = npz_writers.write_npz(tmp_path / "ti384.npz", resampled)
  reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2,
                                img_size=384)
  _load_weights(reference, path384)
  model = checkpoints.load_pretrained(ours(image_size=384), tmp_path / "ti.npz")
  x = images(384, n=1)
  assert max_diff(model(x), timm_logits(reference, x)) < TOL
  got = params(model)["Transformer/posembed_input/pos_embedding"]
  np.testing.assert_array_equal(got[:, 0], pe[:, 0])  # The class token's row is untouched.


@pytest.mark.parametrize("method,mode", [("bilinear", "bilinear"), ("bicubic", "bicubic")])
@pytest.mark.parametrize("old,new", [(7, 12), (12, 7)])
def test_resample_methods_match_pytorch_interpolate(method, mode, old, new):
  import torch
  import torch.nn.functional as F
  grid = np.random.default_rng(0).standard_normal((old, old, 5)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(new, new), mode=mode,
                       align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
  assert max_diff(posemb.resample_grid(grid, new, method), want) < 1e-5


def test_zoom_aligns_corners_and_keeps_the_class_token():
  pe = np.random.default_rng(0).standard_normal((1, 1 + 16, 3)).astype(np.float32)
  out = posemb.resample_posemb(pe, 1 + 64, "zoom")
  grid_in, grid_out = pe[0, 1:].reshape(4, 4, 3), out[0, 1:].reshape(8, 8, 3)
  for (i, j), (k, l) in [((0, 0), (0, 0)), ((0, 3), (0, 7)), ((3, 3), (7, 7))]:
    np.testing.assert_allclose(grid_out[k, l], grid_in[i, j], rtol=1e-6)
  np.testing.assert_array_equal(out[:, 0], pe[:, 0])
  assert posemb.resample_posemb(pe, 64).shape == (1, 64, 3)  # Token dropped for a gap model.


# ---------------------------------------------------------------- timm safetensors / torch files

def _timm_vit(timm, **kw):
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2, **kw)
  randomize_(model, seed=3)
  return model


@pytest.mark.parametrize("container", ["safetensors", "torch"])
def test_timm_state_dict_files_match_timm(tmp_path, timm, container):
  import torch
  reference = _timm_vit(timm)
  if container == "safetensors":
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), str(path))
  else:
    path = tmp_path / "model.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
  model = checkpoints.load_pretrained(ours(), path)
  x = images(224)
  assert max_diff(model(x), timm_logits(reference, x)) < TOL


def test_timm_map_head_safetensors_matches_timm(tmp_path, timm):
  from safetensors.torch import save_file
  reference = _timm_vit(timm, class_token=False, global_pool="map")
  path = tmp_path / "map.safetensors"
  save_file(reference.state_dict(), str(path))
  model = checkpoints.load_pretrained(ours(classifier="map"), path)
  x = images(224)
  assert max_diff(model(x), timm_logits(reference, x)) < TOL


# ---------------------------------------------------------------- big_vision npz

@pytest.mark.parametrize("classifier,scan", [("map", True), ("gap", False)])
def test_big_vision_npz_matches_timm(tmp_path, timm, classifier, scan):
  from timm.models.vision_transformer import _load_weights
  original = dict(np.load(write_original(tmp_path / "o.npz", classifier=classifier)))
  path = npz_writers.write_npz(tmp_path / "bv.npz", npz_writers.big_vision_arrays(original, scan=scan))
  pool = {"map": dict(global_pool="map"), "gap": dict(global_pool="avg", fc_norm=False)}[classifier]
  reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2,
                                class_token=False, **pool)
  _load_weights(reference, path)
  x = images(224)
  want = timm_logits(reference, x)
  for model_scan in (False, True):  # Unrolled and stacked (scan) models read both layouts.
    model = checkpoints.load_pretrained(ours(classifier=classifier, scan=model_scan), path)
    assert max_diff(model(x), want) < TOL


def test_big_vision_token_model_gets_zero_class_posemb(tmp_path):
  original = dict(np.load(write_original(tmp_path / "o.npz")))
  bv = npz_writers.big_vision_arrays(original, scan=False)
  path = npz_writers.write_npz(tmp_path / "bv.npz", bv)
  from_original = checkpoints.load_pretrained(ours(), tmp_path / "o.npz")
  from_bv = checkpoints.load_pretrained(ours(), path)
  pe = params(from_bv)["Transformer/posembed_input/pos_embedding"]
  np.testing.assert_array_equal(pe[:, 0], 0.0)
  x = images(224)
  assert max_diff(from_bv(x), from_original(x)) < TOL


# ---------------------------------------------------------------- round trips

def test_export_vit_round_trip_is_bit_equal_and_timm_reads_it(tmp_path, timm):
  from timm.models.vision_transformer import _load_weights
  model = randomized(ours())
  path = checkpoints.export_npz(model, tmp_path / "export.npz")
  assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in np.load(path).files
  loaded = checkpoints.load_pretrained(ours(), path)
  want = params(model)
  got = params(loaded)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2)
  _load_weights(reference, path)
  x = images(224)
  assert max_diff(timm_logits(reference, x), model(x)) < TOL


@pytest.mark.parametrize("classifier", ["map", "token"])
def test_export_big_vision_round_trip(tmp_path, timm, classifier):
  model = randomized(ours(classifier=classifier))
  path = checkpoints.export_npz(model, tmp_path / "bv.npz", "big_vision", scan=True)
  files = np.load(path).files
  assert "params/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel" in files
  assert np.load(path)["params/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 192, 768)
  loaded = checkpoints.load_pretrained(ours(classifier=classifier), path)
  x = images(224)
  if classifier == "map":
    want, got = params(model), params(loaded)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    from timm.models.vision_transformer import _load_weights
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2,
                                  class_token=False, global_pool="map")
    _load_weights(reference, path)
    assert max_diff(timm_logits(reference, x), model(x)) < TOL
  else:  # The class token's position embedding is folded into cls: same function.
    assert max_diff(loaded(x), model(x)) < 1e-5


def test_scanned_model_loads_and_exports_like_the_unrolled_one(tmp_path):
  path = write_original(tmp_path / "o.npz", depth=3)
  unrolled = checkpoints.load_pretrained(ours(depth=3), path)
  scanned = checkpoints.load_pretrained(ours(depth=3, scan=True), path)
  stacked = dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))
  assert stacked[("Transformer", "blocks", "LayerNorm_0", "scale")].shape == (3, 192)
  x = images(224, n=1)
  assert max_diff(scanned(x), unrolled(x)) < 1e-5
  a = np.load(checkpoints.export_npz(unrolled, tmp_path / "u.npz"))
  b = np.load(checkpoints.export_npz(scanned, tmp_path / "s.npz"))
  assert sorted(a.files) == sorted(b.files) == sorted(np.load(path).files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------- adaptation: head, pre_logits, cls

def test_new_head_for_other_classes_when_init_names_it(tmp_path):
  path = write_original(tmp_path / "o.npz", num_classes=10)
  model = checkpoints.load_pretrained(ours(num_classes=5), path, init=["head/.*"])
  p, src = params(model), np.load(path)
  np.testing.assert_array_equal(p["head/kernel"], np.zeros((192, 5)))  # the model's zero init
  np.testing.assert_array_equal(p["head/bias"], np.zeros(5))
  np.testing.assert_array_equal(p["embedding/kernel"], src["embedding/kernel"])
  # "Initialised" is whatever the model holds: a model with another head keeps it.
  own = randomized(ours(num_classes=5))
  own_head = params(own)["head/kernel"]
  np.testing.assert_array_equal(params(checkpoints.load_pretrained(own, path, init=["head/.*"]))["head/kernel"],
                                own_head)


def test_head_reset_on_request_and_kept_otherwise(tmp_path):
  path = write_original(tmp_path / "o.npz")
  kept = params(checkpoints.load_pretrained(ours(), path))
  np.testing.assert_array_equal(kept["head/kernel"], np.load(path)["head/kernel"])
  reset = params(checkpoints.load_pretrained(ours(), path, init=["head/.*"]))
  assert not reset["head/kernel"].any() and not reset["head/bias"].any()
  np.testing.assert_array_equal(reset["cls"], np.load(path)["cls"])
  # A misfit head is refused, naming the arrays and the option that accepts them.
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    checkpoints.load_pretrained(ours(num_classes=5), path)
  message = str(e.value)
  assert "head/kernel: (192, 10) vs (192, 5)" in message and "head/bias: (10,) vs (5,)" in message
  assert "init=['head/.*']" in message


def test_pre_logits_dropped_only_when_init_names_it(tmp_path):
  path = write_original(tmp_path / "o.npz", representation=192)
  model = checkpoints.load_pretrained(ours(), path, init=["head/.*", "pre_logits/.*"])
  p = params(model)
  assert not any(k.startswith("pre_logits") for k in p)
  assert not p["head/kernel"].any()  # Same shape, but it was trained on top of pre_logits.
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    checkpoints.load_pretrained(ours(), path)
  message = str(e.value)
  assert "unexpected (the model has no such parameter):\n  pre_logits/bias (192,)\n  pre_logits/kernel (192, 192)" in message
  assert "init=['pre_logits/.*']" in message
  with_rep = checkpoints.load_pretrained(ours(representation_size=192), path)
  np.testing.assert_array_equal(params(with_rep)["pre_logits/kernel"], np.load(path)["pre_logits/kernel"])
  plain = write_original(tmp_path / "plain.npz")
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"missing from the checkpoint:\n  pre_logits/bias"):
    checkpoints.load_pretrained(ours(representation_size=192), plain)
  fresh = ours(representation_size=192)
  want = params(fresh)["pre_logits/kernel"]
  new_rep = params(checkpoints.load_pretrained(fresh, plain, init=["pre_logits/.*"]))
  np.testing.assert_array_equal(new_rep["pre_logits/kernel"], want)
  np.testing.assert_array_equal(new_rep["head/kernel"], np.load(plain)["head/kernel"])


def test_token_checkpoint_into_gap_model_drops_cls_and_its_posemb(tmp_path):
  path = write_original(tmp_path / "o.npz")
  model = checkpoints.load_pretrained(ours(classifier="gap"), path, init=["cls"])
  pe = np.load(path)["Transformer/posembed_input/pos_embedding"]
  np.testing.assert_array_equal(params(model)["Transformer/posembed_input/pos_embedding"], pe[:, 1:])
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"(?s)unexpected.*\n  cls \(1, 1, 192\).*init=\['cls'\]"):
    checkpoints.load_pretrained(ours(classifier="gap"), path)


def test_load_patterns_take_only_what_they_name(tmp_path):
  """load= selects parameters; the rest keep the model's values, per layer even when scanned."""
  path = write_original(tmp_path / "o.npz")
  src = np.load(path)
  for scan in (False, True):
    fresh = randomized(ours(scan=scan), seed=4)
    before = params(fresh)
    got = params(checkpoints.load_pretrained(fresh, path, load=["Transformer/.*"],
                                             init=["Transformer/blocks/1/.*"]))
    np.testing.assert_array_equal(got["Transformer/blocks/0/MlpBlock_3/Dense_0/kernel"],
                                  src["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"])
    np.testing.assert_array_equal(got["Transformer/encoder_norm/scale"], src["Transformer/encoder_norm/scale"])
    for k in ("Transformer/blocks/1/MlpBlock_3/Dense_0/kernel", "embedding/kernel", "cls", "head/kernel"):
      np.testing.assert_array_equal(got[k], before[k], err_msg=f"{k} scan={scan}")
  with pytest.raises(ValueError, match=r"init: '\(' is not a valid regex"):
    checkpoints.load_pretrained(ours(), path, init=["("])


def test_pre_linen_opt_target_prefix_is_stripped(tmp_path):
  arrays = dict(np.load(write_original(tmp_path / "o.npz")))
  path = npz_writers.write_npz(tmp_path / "old.npz", {f"opt/target/{k}": v for k, v in arrays.items()})
  p = params(checkpoints.load_pretrained(ours(), path))
  np.testing.assert_array_equal(p["Transformer/blocks/1/MlpBlock_3/Dense_1/kernel"],
                                arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"])


def test_bfloat16_npz_loads_as_float32(tmp_path):
  import ml_dtypes
  arrays = dict(np.load(write_original(tmp_path / "o.npz")))
  as_void = {k: v.astype(ml_dtypes.bfloat16).view("V2") for k, v in arrays.items()}
  path = npz_writers.write_npz(tmp_path / "bf16.npz", as_void)
  p = params(checkpoints.load_pretrained(ours(), path))
  want = arrays["embedding/kernel"].astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(p["embedding/kernel"], want)


# ---------------------------------------------------------------- errors

def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoints.CheckpointNotFoundError, match="does not exist") as e:
    checkpoints.load_pretrained(ours(), tmp_path / "nope.npz")
  assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_a_file_that_is_not_a_checkpoint(tmp_path):
  path = tmp_path / "notes.npz"
  path.write_text("this is text, not weights\n")
  with pytest.raises(checkpoints.CheckpointError, match="is not a checkpoint"):
    checkpoints.load_pretrained(ours(), path)
  empty = tmp_path / "other.npz"
  npz_writers.write_npz(empty, {"w": np.zeros(3, np.float32)})
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"not a ViT checkpoint.*w \(3,\)"):
    checkpoints.load_pretrained(ours(), empty)


def test_other_architecture_names_the_first_mismatching_paths(tmp_path):
  path = write_original(tmp_path / "s.npz", "S")
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    checkpoints.load_pretrained(ours("Ti"), path)
  lines = str(e.value).splitlines()
  assert "misshaped" in lines[0]
  assert lines[2].startswith("  Transformer/blocks/0/LayerNorm_0/bias (checkpoint Transformer/encoderblock_0/LayerNorm_0/bias): (384,) vs (192,)")
  assert any("embedding/kernel: (16, 16, 3, 384) vs (16, 16, 3, 192)" in l for l in lines)
  deeper = write_original(tmp_path / "deep.npz", depth=3)
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"unexpected.*\n  Transformer/blocks/2/LayerNorm_0/bias"):
    checkpoints.load_pretrained(ours(), deeper)


def test_bad_options_are_rejected(tmp_path):
  path = write_original(tmp_path / "o.npz")
  with pytest.raises(ValueError, match="resample_posemb 'nearest' is not one of"):
    checkpoints.load_pretrained(ours(), path, resample_posemb="nearest")
  with pytest.raises(ValueError, match="format 'keras' is not one of"):
    checkpoints.load_pretrained(ours(), path, format="keras")
  with pytest.raises(ValueError, match="format 'timm' is read from safetensors, torch files"):
    checkpoints.load_pretrained(ours(), path, format="timm")


def test_loading_never_imports_tensorflow(tmp_path):
  path = write_original(tmp_path / "o.npz", depth=1)
  code = ("import sys; from vit_jax import models, checkpoints; "
          "m = models.create('ViT-Ti/16', num_classes=10, num_layers=1); "
          f"checkpoints.load_pretrained(m, {str(path)!r}); "
          f"checkpoints.export_npz(m, {str(tmp_path / 'x.npz')!r}); "
          "assert 'tensorflow' not in sys.modules and 'torch' not in sys.modules, 'imported'")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_infer_model_reads_the_architecture(tmp_path):
  path = write_original(tmp_path / "o.npz", "S", depth=12, num_classes=7, grid=24, representation=384)
  spec, _ = checkpoints.infer_model(path)
  assert (spec.name, spec.num_classes, spec.image_size) == ("ViT-S/16", 7, 384)
  assert spec.overrides == {"representation_size": 384}
