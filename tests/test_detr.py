"""DETR (``vit_jax/models/detr.py``) against transformers' ``DetrForObjectDetection`` and the
original facebookresearch/detr semantics, and its checkpoints: HF files and folders (both name
variants and both backbones), original ``.pth`` files, export to an HF folder, clear errors.

References are built offline from small configs with every parameter and buffer randomised
(HF initialises norms to identity and biases to zero, which would hide mistakes).
"""

from __future__ import annotations

import argparse
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.timm_helpers import import_timm, state_dict_numpy
from vit_jax import checkpoints, models
from vit_jax.checkpoints import detr_names, hf_export
from vit_jax.models import attention, detr
from vit_jax.models.conv import CONV_AXES
from vit_jax.train import checkpointing, sharding
from vit_jax.train.state import TrainState
from vit_jax.train.step import split_model

NUM_CLASSES = 5
# Ours and HF's small config: ResNet units (1, 2, 1, 1) of widths 8..64 (HF: embedding_size 8,
# hidden_sizes = 4x the widths), width 32, 2 encoder and 3 decoder layers.
SMALL = dict(resnet_layers=(1, 2, 1, 1), resnet_width=8, hidden_size=32, num_heads=4,
             encoder_layers=2, decoder_layers=3, mlp_dim=64, num_queries=7)
HF_SMALL = dict(d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=7,
                num_labels=NUM_CLASSES, use_pretrained_backbone=False)


@pytest.fixture(scope="module")
def torch_and_transformers():
  import_timm()  # transformers imports torchvision, whose ops need the same stand-ins
  import torch
  import transformers
  return torch, transformers


def randomize_all(module, seed: int) -> None:
  """Every parameter and buffer random: weights ~ N(0, 1/fan_in), norm scales near 1, biases and
  running means small, running variances in [0.5, 1.5]."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict(keep_vars=True).items():
      if not t.is_floating_point():
        continue
      noise = torch.randn(t.shape, generator=gen)
      if name.endswith("running_var"):
        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
      elif t.ndim == 1:
        t.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
      else:
        t.copy_(noise / math.sqrt(t[0].numel()))


def hf_resnet_to_torchvision(key: str) -> str:
  """HF ResNetBackbone names (after ``...backbone.[conv_encoder.]model.``) -> torchvision's,
  written here independently of ``detr_names``."""
  table = [
      (r"^embedder\.embedder\.convolution\.", lambda m: "conv1."),
      (r"^embedder\.embedder\.normalization\.", lambda m: "bn1."),
      (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
      (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
      (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)\.",
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{'conv' if m[4] == 'convolution' else 'bn'}"
                 f"{int(m[3]) + 1}."),
  ]
  for pattern, repl in table:
    key = re.sub(pattern, repl, key)
  return key


def original_state_dict(hf_sd: dict) -> dict:
  """transformers 5 module names -> facebookresearch/detr's (q, k, v packed in ``in_proj``)."""
  import torch
  out = {}
  for k, v in hf_sd.items():
    if k.startswith("model.backbone.model."):
      out["backbone.0.body." + hf_resnet_to_torchvision(k[len("model.backbone.model."):])] = v
      continue
    m = re.match(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.*)", k)
    if m is None:
      out[{"model.input_projection.weight": "input_proj.weight",
           "model.input_projection.bias": "input_proj.bias",
           "model.query_position_embeddings.weight": "query_embed.weight",
           "model.decoder.layernorm.weight": "transformer.decoder.norm.weight",
           "model.decoder.layernorm.bias": "transformer.decoder.norm.bias"}.get(
               k, k.replace("class_labels_classifier", "class_embed")
               .replace("bbox_predictor", "bbox_embed"))] = v
      continue
    part, i, rest = m.groups()
    prefix = f"transformer.{part}.layers.{i}."
    norms = ({"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"} if part == "encoder" else
             {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2",
              "final_layer_norm": "norm3"})
    attn = re.match(r"(self_attn|encoder_attn)\.([qkvo])_proj\.(weight|bias)", rest)
    if attn:
      name = "self_attn" if attn[1] == "self_attn" else "multihead_attn"
      if attn[2] == "o":
        out[f"{prefix}{name}.out_proj.{attn[3]}"] = v
      elif attn[2] == "q":
        full = f"model.{part}.layers.{i}.{attn[1]}"
        out[f"{prefix}{name}.in_proj_{attn[3]}"] = torch.cat(
            [hf_sd[f"{full}.{p}_proj.{attn[3]}"] for p in "qkv"])
    elif rest.startswith("mlp.fc"):
      out[prefix + rest.replace("mlp.fc", "linear")] = v
    else:
      layer, param = rest.rsplit(".", 1)
      out[f"{prefix}{norms[layer]}.{param}"] = v
  return out


def hf_forward(model, images: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """HF's outputs, and the auxiliary ones with the original's semantics.

  HF with ``auxiliary_loss=True`` writes the decoder's final norm back into the residual stream
  after every layer; the original applies it only to a copy of each layer's output. So HF runs
  with ``auxiliary_loss=False`` (the default) here, each decoder layer's output is hooked, and
  the final norm and the heads are applied to it outside the decoder.
  """
  import torch
  states = []
  hooks = [layer.register_forward_hook(lambda mod, args, out: states.append(out))
           for layer in model.model.decoder.layers]
  try:
    with torch.no_grad():
      out = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                  pixel_mask=torch.from_numpy(mask).long())
      normed = model.model.decoder.layernorm(torch.stack(states))
      aux_logits = model.class_labels_classifier(normed)
      aux_boxes = model.bbox_predictor(normed).sigmoid()
  finally:
    for hook in hooks:
      hook.remove()
  return {"logits": out.logits.numpy(), "boxes": out.pred_boxes.numpy(),
          "aux_logits": aux_logits[:-1].numpy(), "aux_boxes": aux_boxes[:-1].numpy(),
          "last_from_hooks": aux_logits[-1].numpy()}


def create(name: str = "DETR-R50", **overrides) -> detr.DETR:
  """``models.create`` of the small DETR, built abstractly and filled with zeros for a checkpoint
  to overwrite (initialising its many small arrays one by one costs seconds of compiling)."""
  kwargs = {"num_classes": NUM_CLASSES, **SMALL, **overrides}
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.create(name, **kwargs)))
  return nnx.merge(graphdef, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), state))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, images, mask):
  return nnx.merge(graphdef, state)(images, pixel_mask=mask)


def run(model: detr.DETR, images: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  graphdef, state = nnx.split(model)
  return {k: np.asarray(v) for k, v in _apply(graphdef, state, images, mask).items()}


def max_diff(a: dict, b: dict, keys=("logits", "boxes", "aux_logits", "aux_boxes")) -> float:
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)


@pytest.fixture(scope="module")
def hf_model(torch_and_transformers):
  _, transformers = torch_and_transformers
  backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[32, 64, 128, 256],
                                       depths=[1, 2, 1, 1], layer_type="bottleneck",
                                       out_features=["stage4"])
  config = transformers.DetrConfig(backbone_config=backbone, use_timm_backbone=False, **HF_SMALL)
  model = transformers.DetrForObjectDetection(config).eval()
  randomize_all(model, seed=0)
  return model


@pytest.fixture(scope="module")
def batch():
  """Two images of odd sizes; the second padded below and right (mask zeros)."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 97, 131, 3)).astype(np.float32)
  mask = np.ones((2, 97, 131), np.float32)
  mask[1, 61:] = 0
  mask[1, :, 83:] = 0
  return images, mask


@pytest.fixture(scope="module")
def reference(hf_model, batch):
  return hf_forward(hf_model, *batch)


@pytest.fixture(scope="module")
def ours(hf_model, tmp_path_factory):
  """Ours loaded from HF's module names (``state_dict()``) as a .safetensors file."""
  path = tmp_path_factory.mktemp("detr") / "detr.safetensors"
  hf_export.write_safetensors(state_dict_numpy(hf_model), path)
  return checkpoints.load_pretrained(create(), path)


@pytest.fixture(scope="module")
def outputs(ours, batch):
  return run(ours, *batch)


def test_matches_transformers_on_a_padded_batch(ours, outputs, reference, batch):
  assert outputs["logits"].shape == (2, 7, NUM_CLASSES + 1) and outputs["boxes"].shape == (2, 7, 4)
  assert outputs["aux_logits"].shape == (2, 2, 7, NUM_CLASSES + 1)
  np.testing.assert_allclose(reference["last_from_hooks"], reference["logits"], atol=1e-6)
  for key in ("logits", "boxes", "aux_logits", "aux_boxes"):
    diff = float(np.max(np.abs(outputs[key] - reference[key])))
    assert diff < 1e-4, (key, diff)
  # The padding is masked: without the mask the padded image's outputs change.
  unmasked = run(ours, batch[0], np.ones_like(batch[1]))
  assert np.max(np.abs(unmasked["logits"][1] - outputs["logits"][1])) > 1e-3
  np.testing.assert_allclose(unmasked["logits"][0], outputs["logits"][0], atol=1e-5)


def test_hf_folder_with_file_names_and_timm_layout(hf_model, ours, outputs, batch, tmp_path):
  """``save_pretrained`` writes the hub's names (``conv_encoder``, ``out_proj``, ``fc1``); the same
  names with timm's (torchvision's) backbone names are the hub's ``facebook/detr-resnet-50``."""
  hf_model.save_pretrained(tmp_path / "folder")
  from_folder = checkpoints.load_pretrained(
      create(), tmp_path / "folder")
  assert max_diff(run(from_folder, *batch), outputs) < 1e-5
  files = hf_export.read_hf_folder(tmp_path / "folder").arrays
  prefix = "model.backbone.conv_encoder.model."
  assert any(k.startswith(prefix) for k in files) and any(".out_proj." in k for k in files)
  timm_layout = {prefix + hf_resnet_to_torchvision(k[len(prefix):]) if k.startswith(prefix) else k: v
                 for k, v in files.items()}
  assert prefix + "layer2.1.bn3.running_var" in timm_layout
  hf_export.write_safetensors(timm_layout, tmp_path / "timm_layout.safetensors")
  from_timm = checkpoints.load_pretrained(
      create(), tmp_path / "timm_layout.safetensors")
  assert max_diff(run(from_timm, *batch), outputs) < 1e-5


def test_original_pth_loads(hf_model, outputs, batch, tmp_path, torch_and_transformers):
  torch, _ = torch_and_transformers
  original = original_state_dict(hf_model.state_dict())
  assert original["transformer.encoder.layers.1.self_attn.in_proj_weight"].shape == (96, 32)
  # As the original's main.py saves it: the training arguments beside the weights.
  args = argparse.Namespace(lr=1e-4, backbone="resnet50", dilation=False, aux_loss=True)
  torch.save({"model": original, "args": args, "epoch": 3}, tmp_path / "detr.pth")
  model = checkpoints.load_pretrained(
      create(), tmp_path / "detr.pth")
  assert max_diff(run(model, *batch), outputs) < 1e-5


def test_trainer_checkpoint_loads_with_the_batch_norm_statistics(ours, outputs, batch, tmp_path):
  """A checkpoint of this library's trainer holds the frozen batch norm in ``model_state``;
  loading it fills those too (not only the parameters)."""
  _, params, model_state = split_model(ours)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
  ckpt.save(7, TrainState(step=np.int32(7), params=params, opt_state={}, model_state=model_state),
            {"signature": {}, "step": 7})
  ckpt.close()
  model = checkpoints.load_pretrained(create(), tmp_path)
  assert max_diff(run(model, *batch), outputs) < 1e-6


def test_export_hf_folder_loads_in_transformers(ours, reference, outputs, batch, tmp_path,
                                                torch_and_transformers):
  _, transformers = torch_and_transformers
  names = {i: f"class {i}" for i in range(NUM_CLASSES)}
  folder = detr_names.export_hf(ours, tmp_path / "export", id2label=names)
  assert hf_export.is_hf_folder(folder)
  exported = transformers.DetrForObjectDetection.from_pretrained(folder).eval()
  assert exported.config.id2label == names
  assert max_diff(hf_forward(exported, *batch), reference) < 1e-5
  # And back: the exported folder loads into ours unchanged.
  back = checkpoints.load_pretrained(
      create(), folder)
  assert max_diff(run(back, *batch), outputs) == 0.0
  with pytest.raises(ValueError, match="no pre-norm"):
    detr_names.export_hf(create(normalize_before=True), tmp_path / "x")
  with pytest.raises(ValueError, match="id2label must name the classes 0..4"):
    detr_names.export_hf(ours, tmp_path / "y", id2label={1: "a"})


def original_transformer(sd: dict, src, mask, pos, layers: tuple[int, int], heads: int,
                         pre_norm: bool):
  """facebookresearch/detr ``models/transformer.py`` (``forward_post``/``forward_pre``) and the
  heads of ``models/detr.py``, written functionally on its original-format state dict with
  torch's own multi-head attention. src, pos: [S, B, D]; mask: [B, S] True on padding.
  Returns (logits, boxes) of every decoder layer, [L, B, Q, ...]."""
  import torch
  F = torch.nn.functional
  d = src.shape[-1]
  ln = lambda p, x: F.layer_norm(x, (d,), sd[f"{p}.weight"], sd[f"{p}.bias"])
  lin = lambda p, x: F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])
  ffn = lambda p, x: lin(f"{p}.linear2", F.relu(lin(f"{p}.linear1", x)))

  def mha(p, q, k, v, key_padding_mask=None):
    return F.multi_head_attention_forward(
        q, k, v, d, heads, sd[f"{p}.in_proj_weight"], sd[f"{p}.in_proj_bias"], None, None, False,
        0.0, sd[f"{p}.out_proj.weight"], sd[f"{p}.out_proj.bias"], training=False,
        key_padding_mask=key_padding_mask, need_weights=False)[0]

  for i in range(layers[0]):
    p = f"transformer.encoder.layers.{i}"
    if pre_norm:
      s2 = ln(f"{p}.norm1", src)
      src = src + mha(f"{p}.self_attn", s2 + pos, s2 + pos, s2, mask)
      src = src + ffn(p, ln(f"{p}.norm2", src))
    else:
      src = ln(f"{p}.norm1", src + mha(f"{p}.self_attn", src + pos, src + pos, src, mask))
      src = ln(f"{p}.norm2", src + ffn(p, src))
  memory = ln("transformer.encoder.norm", src) if pre_norm else src
  query_pos = sd["query_embed.weight"][:, None].repeat(1, src.shape[1], 1)
  tgt, intermediate = torch.zeros_like(query_pos), []
  for i in range(layers[1]):
    p = f"transformer.decoder.layers.{i}"
    if pre_norm:
      t2 = ln(f"{p}.norm1", tgt)
      tgt = tgt + mha(f"{p}.self_attn", t2 + query_pos, t2 + query_pos, t2)
      t2 = ln(f"{p}.norm2", tgt)
      tgt = tgt + mha(f"{p}.multihead_attn", t2 + query_pos, memory + pos, memory, mask)
      tgt = tgt + ffn(p, ln(f"{p}.norm3", tgt))
    else:
      tgt = ln(f"{p}.norm1", tgt + mha(f"{p}.self_attn", tgt + query_pos, tgt + query_pos, tgt))
      tgt = ln(f"{p}.norm2", tgt + mha(f"{p}.multihead_attn", tgt + query_pos, memory + pos,
                                       memory, mask))
      tgt = ln(f"{p}.norm3", tgt + ffn(p, tgt))
    intermediate.append(ln("transformer.decoder.norm", tgt))
  hs = torch.stack(intermediate).transpose(1, 2)
  boxes = F.relu(lin("bbox_embed.layers.0", hs))
  boxes = lin("bbox_embed.layers.2", F.relu(lin("bbox_embed.layers.1", boxes))).sigmoid()
  return lin("class_embed", hs).numpy(), boxes.numpy()


def test_pre_norm_and_aux_outputs_match_the_original_code(hf_model, reference, batch, tmp_path,
                                                          torch_and_transformers):
  """The original's transformer (both norms) on HF's backbone features and positions; pre-norm
  loaded from an original-format .pth with the extra final encoder norm."""
  torch, _ = torch_and_transformers
  sd = original_state_dict(hf_model.state_dict())
  gen = torch.Generator().manual_seed(1)
  sd["transformer.encoder.norm.weight"] = 1 + 0.2 * torch.randn(32, generator=gen)
  sd["transformer.encoder.norm.bias"] = 0.2 * torch.randn(32, generator=gen)
  images, mask = batch
  with torch.no_grad():
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    features, feature_mask = hf_model.model.backbone(pixels, torch.from_numpy(mask).long())[-1]
    src = hf_model.model.input_projection(features).flatten(2).permute(2, 0, 1)
    pos = hf_model.model.position_embedding(features.shape, "cpu", torch.float32, mask=feature_mask)
    pos, pad = pos.flatten(2).permute(2, 0, 1), ~feature_mask.flatten(1)
    logits, boxes = original_transformer(sd, src, pad, pos, (2, 3), 4, pre_norm=False)
    np.testing.assert_allclose(logits[-1], reference["logits"], atol=1e-5)
    np.testing.assert_allclose(logits[:-1], reference["aux_logits"], atol=1e-5)
    np.testing.assert_allclose(boxes[:-1], reference["aux_boxes"], atol=1e-5)
    logits, boxes = original_transformer(sd, src, pad, pos, (2, 3), 4, pre_norm=True)
  torch.save({"model": sd}, tmp_path / "pre_norm.pth")
  model = checkpoints.load_pretrained(
      create(normalize_before=True),
      tmp_path / "pre_norm.pth")
  ours = run(model, images, mask)
  assert max_diff(ours, {"logits": logits[-1], "boxes": boxes[-1], "aux_logits": logits[:-1],
                         "aux_boxes": boxes[:-1]}) < 1e-4


def test_dc5_backbone_matches_timm(hf_model, tmp_path, torch_and_transformers):
  """DC5: the last stage's stride replaced by dilation 2, its first unit keeping dilation 1
  (torchvision's ``replace_stride_with_dilation``; timm's ``output_stride=16``, which transformers
  builds for ``dilation=True``), loaded from an original-format .pth with timm's weights."""
  torch, _ = torch_and_transformers
  from timm.models.resnet import Bottleneck, ResNet
  reference = ResNet(Bottleneck, (1, 1, 1, 2), output_stride=16, num_classes=0).eval()
  randomize_all(reference, seed=2)
  sd = {k: v for k, v in original_state_dict(hf_model.state_dict()).items()
        if not k.startswith("backbone.")}
  sd.update({f"backbone.0.body.{k}": v for k, v in reference.state_dict().items()})
  sd["input_proj.weight"] = torch.randn(32, 2048, 1, 1)
  torch.save({"model": sd}, tmp_path / "dc5.pth")
  model = checkpoints.load_pretrained(
      create("DETR-R50-DC5", resnet_layers=(1, 1, 1, 2), resnet_width=64), tmp_path / "dc5.pth")
  layer4 = model.backbone.layer4
  assert (layer4[0].conv2.stride, layer4[0].conv2.dilation, layer4[1].conv2.dilation) == (1, 1, 2)
  images = np.random.default_rng(1).normal(size=(2, 75, 89, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
  graphdef, state = nnx.split(model.backbone)
  features = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images)
  assert features.shape == (2, 5, 6, 2048)  # stride 16
  np.testing.assert_allclose(features, expected.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_bad_checkpoints_give_clear_errors(hf_model, tmp_path, torch_and_transformers):
  torch, _ = torch_and_transformers
  original = original_state_dict(hf_model.state_dict())
  del original["backbone.0.body.layer2.1.bn3.running_var"]
  torch.save({"model": original}, tmp_path / "no_var.pth")
  build = create
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"missing from the checkpoint:\n  backbone/layer2/1/bn3/var \(64,\)"):
    checkpoints.load_pretrained(build(), tmp_path / "no_var.pth")
  hf_export.write_safetensors(state_dict_numpy(hf_model), tmp_path / "hf.safetensors")
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"class_embed/kernel \(checkpoint class_labels_classifier.weight\): "
                           r"\(32, 6\) vs \(32, 4\)(.|\n)*init=\['class_embed/\.\*'\]"):
    checkpoints.load_pretrained(build(num_classes=3), tmp_path / "hf.safetensors")
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"encoder/norm/scale \(32,\)"):
    checkpoints.load_pretrained(build(normalize_before=True), tmp_path / "hf.safetensors")
  hf_export.write_safetensors({"blocks.0.attn.qkv.weight": np.zeros((6, 2), np.float32)},
                              tmp_path / "vit.safetensors")
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"not a DETR checkpoint in any known format \(hf, original"):
    checkpoints.load_pretrained(build(), tmp_path / "vit.safetensors")
  # A new head for other classes keeps the model's own.
  model = checkpoints.load_pretrained(build(num_classes=3), tmp_path / "hf.safetensors",
                                      init=["class_embed/.*"])
  assert model.class_embed.kernel.shape == (32, 4)


def test_frozen_batch_norm_is_model_state_and_counts_match(ours, hf_model, batch):
  graphdef, params, model_state = split_model(ours)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(params) == sum(p.numel() for p in hf_model.parameters())
  assert count(model_state) == sum(b.numel() for b in hf_model.buffers())
  assert set(model_state["backbone"]["bn1"]) == {"scale", "bias", "mean", "var"}
  assert "bn1" not in params["backbone"] and "downsample" in params["backbone"]["layer1"][0]
  axes = sharding.logical_axes(ours)
  assert axes["backbone"]["layer2"][1]["conv2"]["kernel"] == CONV_AXES
  assert axes["encoder"]["layers"][0]["self_attn"]["query"]["kernel"] == ("embed", "heads", "kv")
  assert axes["decoder"]["layers"][0]["linear1"]["kernel"] == ("embed", "mlp")
  assert sharding.logical_axes(ours, nnx.Not(nnx.Param))["backbone"]["bn1"]["var"] == ("norm",)
  # Training mode: dropout (residual, feed-forward and attention weights) from the rngs.
  images, mask = batch
  train = jax.jit(lambda s, rng: nnx.merge(graphdef, s, model_state)(
      images, pixel_mask=mask, train=True, rngs=nnx.Rngs(dropout=rng))["logits"])
  a, b = train(params, jax.random.key(0)), train(params, jax.random.key(1))
  assert bool(jnp.all(jnp.isfinite(a))) and not jnp.allclose(a, b)
  assert jnp.array_equal(a, train(params, jax.random.key(0)))


def test_names_options_and_inputs():
  assert {"DETR-R50", "DETR-R101", "DETR-R50-DC5", "DETR-R101-DC5"} <= set(models.names())
  with pytest.raises(ValueError, match="depth 34 is not one of"):
    models.create("DETR-R34", num_classes=3)
  with pytest.raises(ValueError, match="unknown DETR option"):
    models.create("DETR-R50", num_classes=3, patch_size=16)
  model = create(image_size=(64, 96))
  assert model.config.image_size == (64, 96) and not model.config.dilation
  with pytest.raises(ValueError, match="pixel_mask of shape"):
    model(jnp.zeros((1, 64, 96, 3)), pixel_mask=jnp.ones((1, 64, 95)))
  with pytest.raises(ValueError, match="NHWC batches with 3 channels"):
    model(jnp.zeros((1, 64, 96)))


@pytest.mark.parametrize("in_size,out_size", [(97, 4), (131, 5), (75, 5), (13, 26), (8, 4), (5, 5)])
def test_mask_downsampling_is_torch_nearest(in_size, out_size, torch_and_transformers):
  torch, _ = torch_and_transformers
  x = torch.arange(in_size, dtype=torch.float32)[None, None, :, None]
  expected = torch.nn.functional.interpolate(x, size=(out_size, 1))[0, 0, :, 0].long().numpy()
  np.testing.assert_array_equal(detr.nearest_indices(in_size, out_size), expected)


def test_attention_key_mask_and_separate_values():
  with nnx.use_eager_sharding(False):
    attn = attention.MultiHeadAttention(16, 4, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x, kv, v = (jnp.asarray(rng.normal(size=(2, n, 16)), jnp.float32) for n in (3, 6, 6))
  mask = jnp.asarray([[True] * 6, [True] * 4 + [False] * 2])
  plain = attn(x, kv)
  assert jnp.array_equal(attn(x, kv, mask=jnp.ones((2, 6), bool)), plain)
  assert jnp.array_equal(attn(x, kv, value=kv), plain)
  masked = attn(x, kv, value=v, mask=mask)
  changed = kv.at[1, 4:].set(100.0)
  changed_v = v.at[1, 4:].set(-100.0)
  np.testing.assert_allclose(attn(x, changed, value=changed_v, mask=mask), masked, atol=1e-6)
  # Only the second example's last keys are masked: its output changes, the first's does not.
  unmasked = attn(x, kv, value=v)
  assert jnp.array_equal(unmasked[0], masked[0]) and not jnp.allclose(unmasked[1], masked[1])
  attn.implementation = "xla"
  np.testing.assert_allclose(attn(x, kv, value=v, mask=mask), masked, atol=1e-6)
  with pytest.raises(ValueError, match=r"key-padding mask of shape \(2, 5\)"):
    attn(x, kv, mask=jnp.ones((2, 5), bool))
