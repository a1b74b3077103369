"""YOLOS: parity with transformers' YolosForObjectDetection on the same random weights (small
sizes; full size: bench/parity_yolos.py), the HF and original checkpoint formats, the HF folder
export, position-embedding resizing against PyTorch's bicubic, options and sharding. Exact
sizes: tests/test_registry.py."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.timm_helpers import import_timm, randomize_
from vit_jax import checkpoints, models
from vit_jax.checkpoints import yolos_names
from vit_jax.models import yolos
from vit_jax.train import sharding

TOL = 1e-4           # against transformers
RELOAD_TOL = 1e-5    # the same weights through another file format
STORED = (48, 80)    # the training size the position embeddings are stored for: a 6x10 grid
INPUT = (60, 77)     # not a multiple of the patch (8), another grid (7x9)
SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=8, num_det_tokens=12,
             layernorm_eps=1e-12)
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def torch():
  import_timm()  # makes the installed torchvision (which transformers imports) loadable
  import torch
  return torch


def random_yolos(config, seed: int, std: float):
  """transformers' YolosForObjectDetection of ``config`` with every parameter random (std
  ``std``), the position embeddings and tokens at std 0.5 so that their resizing shows."""
  import torch
  from transformers import YolosForObjectDetection
  ref = YolosForObjectDetection(config).eval()
  randomize_(ref, seed=seed, std=std)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "position_embeddings" in name or "token" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
  return ref


def hf_model(torch, mid: bool, seed: int):
  """A random YolosForObjectDetection of SMALL's sizes."""
  from transformers import YolosConfig
  config = YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=list(STORED), patch_size=8, num_detection_tokens=12,
                       num_labels=NUM_CLASSES, use_mid_position_embeddings=mid)
  return random_yolos(config, seed, std=0.2)


@pytest.fixture(scope="module")
def refs(torch):
  return {False: hf_model(torch, False, seed=1), True: hf_model(torch, True, seed=2)}


def images(size=INPUT, n: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (n, *size, 3)).astype(np.float32)


def hf_outputs(ref, x: np.ndarray) -> dict[str, np.ndarray]:
  import torch
  with torch.no_grad():
    out = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  return {"logits": out.logits.numpy(), "boxes": out.pred_boxes.numpy()}


_forward = nnx.jit(lambda m, x, mask: m(x, pixel_mask=mask))


def our_outputs(model, x: np.ndarray, pixel_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in _forward(model, jnp.asarray(x), pixel_mask).items()}


def max_diff(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in ("logits", "boxes"))


def create(mid: bool, image_size=STORED, **kw):
  return models.create("YOLOS-Ti", num_classes=NUM_CLASSES, image_size=image_size,
                       **{**SMALL, "use_mid_position_embeddings": mid, **kw})


def save_hf(ref, path) -> str:
  from safetensors.numpy import save_file
  save_file({k: v.detach().numpy() for k, v in ref.state_dict().items()}, str(path))
  return str(path)


@pytest.fixture(scope="module")
def loaded(refs, tmp_path_factory):
  """Our models (mid PE off and on) loaded from the HF state dicts, by ``load_pretrained``."""
  folder = tmp_path_factory.mktemp("hf")
  return {mid: checkpoints.load_pretrained(create(mid), save_hf(ref, folder / f"{mid}.safetensors"))
          for mid, ref in refs.items()}


# ------------------------------------------------------------------------ parity with HF

@pytest.mark.parametrize("mid", [False, True], ids=["plain", "mid_pe"])
def test_hf_weights_give_hf_outputs(refs, loaded, mid):
  for size in (INPUT, STORED):
    x = images(size)
    want, got = hf_outputs(refs[mid], x), our_outputs(loaded[mid], x)
    assert np.abs(want["logits"]).max() > 1.0  # a meaningful comparison
    assert got["logits"].shape == (2, 12, NUM_CLASSES + 1) and got["boxes"].shape == (2, 12, 4)
    assert got["logits"].dtype == got["boxes"].dtype == np.float32
    assert max_diff(got, want) < TOL, (size, max_diff(got, want))


def test_scanned_blocks_with_mid_pe_give_the_same_outputs(refs, loaded, tmp_path):
  path = save_hf(refs[True], tmp_path / "mid.safetensors")
  scanned = checkpoints.load_pretrained(create(True, scan=True, remat="full"), path)
  x = images()
  assert max_diff(our_outputs(scanned, x), our_outputs(loaded[True], x)) < RELOAD_TOL


def test_pixel_mask_is_ignored_and_checked(loaded):
  model, x = loaded[False], images()
  mask = np.zeros(x.shape[:3], np.float32)
  mask[:, :30] = 1
  assert max_diff(our_outputs(model, x, mask), our_outputs(model, x)) == 0
  with pytest.raises(ValueError, match=r"pixel_mask of shape \(2, 60\) does not match"):
    model(jnp.asarray(x), pixel_mask=jnp.ones((2, 60)))


# -------------------------------------------------------------------------- checkpoints

# HF names -> the original hustvl/YOLOS names (``convert_yolos_to_pytorch.py`` run backwards).
ORIGINAL_NAMES = [
    (r"^vit\.embeddings\.cls_token", "backbone.cls_token"),
    (r"^vit\.embeddings\.detection_tokens", "backbone.det_token"),
    (r"^vit\.embeddings\.position_embeddings", "backbone.pos_embed"),
    (r"^vit\.embeddings\.patch_embeddings\.projection", "backbone.patch_embed.proj"),
    (r"^vit\.encoder\.interpolation\.mid_position_embeddings", "backbone.mid_pos_embed"),
    (r"^vit\.encoder\.layer\.", "backbone.blocks."),
    (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."), (r"\.output\.dense\.", ".mlp.fc2."),
    (r"^vit\.layernorm\.", "backbone.norm."),
    (r"^class_labels_classifier\.", "class_embed."), (r"^bbox_predictor\.", "bbox_embed."),
]


def write_original_pth(torch, ref, path) -> str:
  """The original format from HF weights: query, key and value packed into ``qkv``."""
  sd = dict(ref.state_dict())
  out = {}
  for i in range(ref.config.num_hidden_layers):
    for kind in ("weight", "bias"):
      qkv = [sd.pop(f"vit.encoder.layer.{i}.attention.attention.{n}.{kind}") for n in ("query", "key", "value")]
      out[f"backbone.blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv)
  for name, value in sd.items():
    for pattern, new in ORIGINAL_NAMES:
      name = re.sub(pattern, new, name)
    out[name] = value.clone()
  torch.save({"model": out, "epoch": 150}, str(path))
  return str(path)


def test_original_pth_gives_the_same_outputs(torch, refs, loaded, tmp_path):
  path = write_original_pth(torch, refs[True], tmp_path / "yolos_s.pth")
  assert "backbone.blocks.1.attn.qkv.weight" in torch.load(path)["model"]
  x = images()
  want = our_outputs(loaded[True], x)
  for fmt in ("auto", "original"):
    model = checkpoints.load_pretrained(create(True), path, format=fmt)
    assert max_diff(our_outputs(model, x), want) < RELOAD_TOL


def test_exported_hf_folder_loads_in_transformers_and_back(torch, refs, loaded, tmp_path, monkeypatch):
  from transformers import YolosForObjectDetection
  labels = {i: f"thing {i}" for i in range(NUM_CLASSES)}
  folder = yolos_names.export_hf(loaded[True], tmp_path / "export", id2label=labels)
  assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  hf = YolosForObjectDetection.from_pretrained(folder).eval()
  assert hf.config.id2label == labels and hf.config.use_mid_position_embeddings
  x = images()
  assert max_diff(hf_outputs(hf, x), hf_outputs(refs[True], x)) < RELOAD_TOL
  back = checkpoints.load_pretrained(create(True), folder)
  assert max_diff(our_outputs(back, x), our_outputs(loaded[True], x)) < RELOAD_TOL


def torch_bicubic(torch, posemb: np.ndarray, grid, new_grid, det: int) -> np.ndarray:
  """[..., 1 + grid + det, D] resized by F.interpolate (the reference's code path)."""
  t = torch.from_numpy(posemb)
  lead, d = t.shape[:-2], t.shape[-1]
  cells = t[..., 1:-det, :].reshape(-1, *grid, d).permute(0, 3, 1, 2)
  cells = torch.nn.functional.interpolate(cells, size=new_grid, mode="bicubic", align_corners=False)
  cells = cells.permute(0, 2, 3, 1).reshape(*lead, -1, d)
  return torch.cat([t[..., :1, :], cells, t[..., -det:, :]], dim=-2).numpy()


@pytest.mark.parametrize("grid,new_grid", [((6, 10), (7, 9)), ((6, 10), (13, 4)), ((1, 1), (3, 5)),
                                           ((50, 83), (32, 54))])
def test_resize_positions_is_pytorch_bicubic(torch, grid, new_grid):
  pe = np.random.default_rng(0).normal(size=(2, 1, 1 + grid[0] * grid[1] + 3, 4)).astype(np.float32)
  want = torch_bicubic(torch, pe, grid, new_grid, 3)
  assert np.abs(yolos.resize_positions(pe, grid, new_grid, 3) - want).max() < 1e-6
  assert np.abs(np.asarray(yolos.resize_positions(jnp.asarray(pe), grid, new_grid, 3)) - want).max() < 1e-5
  if grid != (1, 1):  # jax.image.resize's "cubic" is another kernel (Keys a = -0.5, no clamping)
    cells = pe[..., 1:-3, :].reshape(2, 1, *grid, 4)
    other = jax.image.resize(cells, (2, 1, *new_grid, 4), "cubic").reshape(2, 1, -1, 4)
    assert np.abs(np.asarray(other) - want[..., 1:-3, :]).max() > 1e-3


def test_position_embeddings_of_another_grid_are_resampled(torch, refs, tmp_path):
  other = (64, 88)  # an 8x11 grid
  folder = yolos_names.export_hf(checkpoints.load_pretrained(create(True), save_hf(
      refs[True], tmp_path / "ref.safetensors")), tmp_path / "hf")
  model = yolos_names.load_yolos(create(True, other), folder)
  sd = {k: v.numpy() for k, v in refs[True].state_dict().items()}
  arrays = checkpoints.param_tree.model_arrays(model, ["Transformer/blocks"])
  for ours, theirs in (("Transformer/posembed_input/pos_embedding", "vit.embeddings.position_embeddings"),
                       ("Transformer/mid_pos_embedding", "vit.encoder.interpolation.mid_position_embeddings")):
    want = torch_bicubic(torch, sd[theirs], (6, 10), (8, 11), 12)
    assert arrays[ours].shape == want.shape and np.abs(arrays[ours] - want).max() < 1e-6
  # A bare file does not say its grid: 60 positions are no released size, so it is asked for.
  path = tmp_path / "ref.safetensors"
  with pytest.raises(checkpoints.CheckpointError, match=r"60 patch positions.*source_image_size"):
    yolos_names.load_yolos(nnx.eval_shape(lambda: create(False, other)), path)
  resampled = yolos_names.load_yolos(create(True, other), path, source_image_size=STORED)
  x = images()
  assert max_diff(our_outputs(resampled, x), our_outputs(model, x)) < RELOAD_TOL
  # load_pretrained itself does not resample a rectangular grid: a clear mismatch.
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"pos_embedding.*\(1, 73, 32\) vs \(1, 101, 32\)"):
    checkpoints.load_pretrained(nnx.eval_shape(lambda: create(False, other)), path)


def test_bad_checkpoints_are_clear_errors(torch, refs, tmp_path):
  path = save_hf(refs[False], tmp_path / "ref.safetensors")
  abstract = lambda **kw: nnx.eval_shape(lambda: create(False, **kw))
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"16 missing .*\n"
                     r"missing from the checkpoint:\n  Transformer/blocks/2/LayerNorm_0/bias \(32,\)"):
    checkpoints.load_pretrained(abstract(num_layers=3), path)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"class_head/Dense_2/kernel \(checkpoint class_labels_classifier.layers.2.weight\)"):
    checkpoints.load_pretrained(nnx.eval_shape(lambda: models.create(
        "YOLOS-Ti", num_classes=7, image_size=STORED, **SMALL)), path)
  with pytest.raises(ValueError, match=r"format 'vit' is not one of \['auto', 'hf', 'original'"):
    checkpoints.load_pretrained(abstract(), path, format="vit")
  from safetensors.numpy import save_file
  save_file({"patch_embed.proj.weight": np.zeros((32, 3, 8, 8), np.float32)}, str(tmp_path / "vit.safetensors"))
  with pytest.raises(checkpoints.CheckpointMismatchError, match="not a YOLOS checkpoint in any known format"):
    checkpoints.load_pretrained(abstract(), tmp_path / "vit.safetensors")
  (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
  with pytest.raises(checkpoints.CheckpointError, match="is not a checkpoint"):
    yolos_names.load_yolos(abstract(), tmp_path / "junk.bin")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text("{}")
  with pytest.raises(checkpoints.CheckpointError, match="holds none of"):
    yolos_names.load_yolos(abstract(), tmp_path / "empty")


# ------------------------------------------------------------------- options and sharding

def test_names_sizes_and_bad_options():
  model = nnx.eval_shape(lambda: models.create("YOLOS-S/8", num_classes=3, image_size=64, num_layers=1))
  assert model.config.patch_size == 8 and model.config.image_size == (64, 64)
  assert model.Transformer.posembed_input.pos_embedding.shape == (1, 1 + 64 + 100, 384)
  bad = [
      (dict(use_mid_position_embeddings=True, image_size=(800, 1333)), "multiple of the patch size 16"),
      (dict(image_size=(8, 800)), "at least one patch"),
      (dict(image_size=(800, 1333, 3)), "neither a positive int nor a \\(height, width\\)"),
      (dict(num_det_tokens=0), "num_det_tokens must be at least 1"),
      (dict(classifier="token"), r"unknown YOLOS option\(s\) \['classifier'\]"),
      (dict(remat="some"), "remat policy 'some' is not one of"),
  ]
  for options, match in bad:
    options = {"image_size": 224, **options}
    with pytest.raises(ValueError, match=match):
      nnx.eval_shape(lambda: models.create("YOLOS-Ti", num_classes=3, num_layers=1, **options))
  small = create(False)
  with pytest.raises(ValueError, match=r"do not fit this model: it takes NHWC batches \(batch, height, width, 3\) "
                                       r"of at least 8 x 8"):
    small(jnp.zeros((1, 7, 40, 3)))


def test_shards_with_the_vit_axis_names():
  model = nnx.eval_shape(lambda: create(True))
  rules = sharding.rules_dict([])
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  specs = sharding.param_shardings(params, sharding.logical_axes(model), rules, sharding.make_mesh("fsdp"))
  assert specs["Transformer"]["mid_pos_embedding"].spec == P(None, None, None, "fsdp")
  assert specs["det_tokens"].spec == P(None, None, "fsdp")
  assert specs["class_head"]["Dense_2"]["kernel"].spec == P("fsdp", None)
  assert specs["box_head"]["Dense_0"]["kernel"].spec == P("fsdp", None)
  tensor = sharding.param_shardings(params, sharding.logical_axes(model), rules,
                                    sharding.make_mesh("tensor_parallel"))
  assert tensor["box_head"]["Dense_0"]["kernel"].spec == P(None, "tensor")
