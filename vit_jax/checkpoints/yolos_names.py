"""YOLOS (``models/yolos.py``) checkpoints in and out.

Formats (both ``.safetensors`` or torch state dicts):
  * ``"hf"``: transformers' ``YolosForObjectDetection`` (``vit.embeddings...``,
    ``vit.encoder.layer.{i}...``, ``class_labels_classifier``, ``bbox_predictor``), from a file or
    an HF model folder; written by ``export_hf``.
  * ``"original"``: hustvl/YOLOS ``.pth`` files (``{"model": state_dict}``): timm names under
    ``backbone.`` with query, key and value packed in ``qkv``, ``det_token``, ``pos_embed``,
    ``mid_pos_embed``, ``class_embed.layers.*``, ``bbox_embed.layers.*``.

``checkpoints.load_pretrained`` reads checkpoints of the model's own grid (files or HF model
folders). ``load_yolos`` also resamples position embeddings stored for another grid (PyTorch
bicubic, YOLOS's own interpolation): a rectangular grid is not recoverable from the array shapes
alone, so it needs the checkpoint's training size (an HF ``config.json``, ``source_image_size``,
or one of the released sizes).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Collection, Mapping, Sequence

import numpy as np

from vit_jax.checkpoints import hf_export, loading, mapping, param_tree, readers
from vit_jax.checkpoints.mapping import (Arrays, Family, Format, ModelSpec, Rule, register_family,
                                         register_format, rename)
from vit_jax.checkpoints.readers import CheckpointError
from vit_jax.checkpoints.timm_names import bias, conv, linear, split_bias, split_linear
from vit_jax.checkpoints.torch_layouts import dense, dense_both_ways, norm, to_torch_conv
from vit_jax.models.yolos import YOLOS, ImageSize, image_hw, resize_positions

BLOCKS = "Transformer/blocks"
POSEMB = "Transformer/posembed_input/pos_embedding"
MID_POSEMB = "Transformer/mid_pos_embedding"
DET_TOKENS = "det_tokens"
# The training sizes of the released checkpoints (YOLOS-Ti; YOLOS-S and S-dWr; YOLOS-B).
RELEASED_SIZES = ((800, 1333), (512, 864), (800, 1344))

register_family(Family(name="YOLOS", model_type=YOLOS, layer_lists=(BLOCKS,), head="class_head"))


_LAYER, _OURS = "vit.encoder.layer.{i}", BLOCKS + "/{i}"
_ATTN = f"{_OURS}/MultiHeadDotProductAttention_1"
HF_RULES = (
    Rule("vit.embeddings.patch_embeddings.projection.weight", "embedding/kernel", load=conv,
         save=to_torch_conv),
    rename("vit.embeddings.patch_embeddings.projection.bias", "embedding/bias"),
    rename("vit.embeddings.cls_token", "cls"),
    rename("vit.embeddings.detection_tokens", DET_TOKENS),
    rename("vit.embeddings.position_embeddings", POSEMB),
    rename("vit.encoder.mid_position_embeddings", MID_POSEMB),  # the hub's name, also written
    Rule("vit.encoder.interpolation.mid_position_embeddings", MID_POSEMB, save=None),  # transformers 5
    *norm(f"{_LAYER}.layernorm_before", f"{_OURS}/LayerNorm_0"),
    *dense_both_ways(f"{_LAYER}.attention.attention.query", f"{_ATTN}/query"),
    *dense_both_ways(f"{_LAYER}.attention.attention.key", f"{_ATTN}/key"),
    *dense_both_ways(f"{_LAYER}.attention.attention.value", f"{_ATTN}/value"),
    *dense_both_ways(f"{_LAYER}.attention.output.dense", f"{_ATTN}/out", n_in=2),
    *norm(f"{_LAYER}.layernorm_after", f"{_OURS}/LayerNorm_2"),
    *dense_both_ways(f"{_LAYER}.intermediate.dense", f"{_OURS}/MlpBlock_3/Dense_0"),
    *dense_both_ways(f"{_LAYER}.output.dense", f"{_OURS}/MlpBlock_3/Dense_1"),
    *norm("vit.layernorm", "Transformer/encoder_norm"),
    *dense_both_ways("class_labels_classifier.layers.{j}", "class_head/Dense_{j}"),
    *dense_both_ways("bbox_predictor.layers.{j}", "box_head/Dense_{j}"),
    Rule("{name:*}", "{name:*}", save=None),  # anything else is reported as unexpected
)

_BLOCK = "backbone.blocks.{i}"
ORIGINAL_RULES = (
    Rule("backbone.patch_embed.proj.weight", "embedding/kernel", load=conv, save=None),
    rename("backbone.patch_embed.proj.bias", "embedding/bias"),
    rename("backbone.cls_token", "cls"),
    rename("backbone.det_token", DET_TOKENS),
    rename("backbone.pos_embed", POSEMB),
    rename("backbone.mid_pos_embed", MID_POSEMB),
    *norm(f"{_BLOCK}.norm1", f"{_OURS}/LayerNorm_0"),
    Rule(f"{_BLOCK}.attn.qkv.weight", tuple(f"{_ATTN}/{n}/kernel" for n in ("query", "key", "value")),
         load=split_linear(3), save=None),
    Rule(f"{_BLOCK}.attn.qkv.bias", tuple(f"{_ATTN}/{n}/bias" for n in ("query", "key", "value")),
         load=split_bias(3), save=None),
    *dense(f"{_BLOCK}.attn.proj", f"{_ATTN}/out"),
    *norm(f"{_BLOCK}.norm2", f"{_OURS}/LayerNorm_2"),
    *dense(f"{_BLOCK}.mlp.fc1", f"{_OURS}/MlpBlock_3/Dense_0"),
    *dense(f"{_BLOCK}.mlp.fc2", f"{_OURS}/MlpBlock_3/Dense_1"),
    *norm("backbone.norm", "Transformer/encoder_norm"),
    *dense("class_embed.layers.{j}", "class_head/Dense_{j}"),
    *dense("bbox_embed.layers.{j}", "box_head/Dense_{j}"),
    Rule("{name:*}", "{name:*}", save=None),
)


def detect_hf(keys: Collection[str]) -> bool:
  return "vit.embeddings.patch_embeddings.projection.weight" in keys


def detect_original(keys: Collection[str]) -> bool:
  return "backbone.patch_embed.proj.weight" in keys and "backbone.det_token" in keys


register_format(Format(family="YOLOS", name="hf", rules=HF_RULES, detect=detect_hf,
                       containers=("safetensors", "torch")))
register_format(Format(family="YOLOS", name="original", rules=ORIGINAL_RULES, detect=detect_original,
                       containers=("safetensors", "torch")))

# Per format: checkpoint names of (position embeddings, mid position embeddings, det tokens).
_POSITION_NAMES = {
    "hf": (("vit.embeddings.position_embeddings", "vit.encoder.mid_position_embeddings",
            "vit.encoder.interpolation.mid_position_embeddings"), "vit.embeddings.detection_tokens"),
    "original": (("backbone.pos_embed", "backbone.mid_pos_embed"), "backbone.det_token"),
}


def _source_grid(patches: int, model_grid: tuple[int, int], patch_size: int,
                 hint: tuple[int, int] | None, name: str) -> tuple[int, int]:
  """The patch grid that ``patches`` stored positions belong to."""
  if hint is not None:
    grid = (hint[0] // patch_size, hint[1] // patch_size)
    if grid[0] * grid[1] != patches:
      raise CheckpointError(f"{name} holds {patches} patch positions, not the {grid[0]}x{grid[1]} "
                            f"grid of a {hint[0]}x{hint[1]} training size with patch {patch_size}")
    return grid
  if model_grid[0] * model_grid[1] == patches:
    return model_grid
  for h, w in RELEASED_SIZES:
    if (h // patch_size) * (w // patch_size) == patches:
      return h // patch_size, w // patch_size
  raise CheckpointError(f"{name} holds {patches} patch positions; the model's grid is "
                        f"{model_grid[0]}x{model_grid[1]}. Pass source_image_size=(height, width), "
                        "the checkpoint's training size, to resample them")


def resample_positions(arrays: Mapping[str, np.ndarray], fmt: str, model: YOLOS,
                       source_image_size: ImageSize | None = None,
                       source_patch_size: int | None = None) -> Arrays:
  """``arrays`` (checkpoint names of format ``fmt``) with their position embeddings resampled
  to ``model``'s grid (PyTorch bicubic; class and detection positions kept)."""
  cfg = model.config
  names, det_name = _POSITION_NAMES.get(fmt, ((POSEMB, MID_POSEMB), DET_TOKENS))
  hint = None if source_image_size is None else image_hw(source_image_size)
  patch_size = source_patch_size or cfg.patch_size
  out = dict(arrays)
  for name in names:
    if name not in out:
      continue
    pe = np.asarray(out[name])
    det = out[det_name].shape[1] if det_name in out else cfg.num_det_tokens
    grid = _source_grid(pe.shape[-2] - 1 - det, cfg.grid, patch_size, hint, name)
    if grid != cfg.grid:
      out[name] = resize_positions(pe, grid, cfg.grid, det)
  return out


def load_yolos(model: YOLOS, path: str | os.PathLike | readers.Checkpoint, *, format: str = "auto",  # pylint: disable=redefined-builtin
               resample_posemb: bool = True, source_image_size: ImageSize | None = None,
               load: Sequence[str] = (".*",), init: Sequence[str] = ()) -> YOLOS:
  """``checkpoints.load_pretrained`` for YOLOS which, with ``resample_posemb``, resamples
  position embeddings of another grid to the model's.

  The checkpoint's grid: ``source_image_size`` (its training size, with the model's patch
  size), else its ``config.json`` (an HF folder), else the model's grid when the counts agree,
  else the released training size of that count (800x1333, 512x864, 800x1344).
  ``format``, ``load`` and ``init`` are ``load_pretrained``'s; so are the errors.
  """
  ckpt = path if isinstance(path, readers.Checkpoint) else loading.read_checkpoint(path)
  fmt, arrays = loading.detect_format(mapping.family_of(model), ckpt, format)
  if resample_posemb:
    config = ckpt.meta.get("config") or {}
    size = source_image_size if source_image_size is not None else config.get("image_size")
    patch = config.get("patch_size") if source_image_size is None else None
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    arrays = resample_positions(arrays, fmt.name, model, size, patch)
  ckpt = readers.Checkpoint(ckpt.path, ckpt.container, arrays, ckpt.meta)
  return loading.load_pretrained(model, ckpt, format=fmt.name, load=load, init=init)


def hf_config(model: YOLOS, id2label: Mapping[int, str] | None = None) -> dict:
  """transformers' ``YolosConfig`` of ``model`` as a dict (``config.json``)."""
  cfg = model.config
  if id2label is None:
    id2label = {i: f"LABEL_{i}" for i in range(cfg.num_classes)}
  if sorted(int(i) for i in id2label) != list(range(cfg.num_classes)):
    raise ValueError(f"id2label must name the classes 0..{cfg.num_classes - 1} of this model, "
                     f"got ids {sorted(id2label)[:5]}... ({len(id2label)} in all)")
  labels = {str(int(i)): str(name) for i, name in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
  return {
      "architectures": ["YolosForObjectDetection"],
      "model_type": "yolos",
      "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.mlp_dim,
      "hidden_act": "gelu_pytorch_tanh" if cfg.gelu_approximate else "gelu",
      "hidden_dropout_prob": cfg.dropout_rate,
      "attention_probs_dropout_prob": cfg.attention_dropout_rate,
      "layer_norm_eps": cfg.layernorm_eps,
      "image_size": list(cfg.image_size),
      "patch_size": cfg.patch_size,
      "num_channels": cfg.channels,
      "qkv_bias": True,
      "num_detection_tokens": cfg.num_det_tokens,
      "use_mid_position_embeddings": cfg.use_mid_position_embeddings,
      "id2label": labels,
      "label2id": {name: int(i) for i, name in labels.items()},
      "torch_dtype": "float32",
  }


def export_hf(model: YOLOS, folder: str | os.PathLike, *,
              id2label: Mapping[int, str] | None = None) -> str:
  """Writes ``model`` as an HF model folder that ``YolosForObjectDetection.from_pretrained``
  reads offline (``id2label``: class names, default ``LABEL_{i}``); returns the folder."""
  if not isinstance(model, YOLOS):
    raise ValueError(f"export_hf writes YOLOS models, not a {type(model).__name__}")
  return hf_export.write_hf_folder(hf_state_dict(model), hf_config(model, id2label), folder)


def hf_state_dict(model: YOLOS) -> Arrays:
  """``model``'s parameters in HF's names and layouts (numpy, float32)."""
  return mapping.to_checkpoint_names(HF_RULES, param_tree.model_arrays(model, (BLOCKS,)))


def read_classifier(path: str | os.PathLike) -> tuple[ModelSpec, readers.Checkpoint] | None:
  """The ViT classifier ``path`` holds (its model and the read checkpoint), or None when it
  holds anything else (a YOLOS, a file no family recognises)."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  try:
    ckpt = readers.read(os.fspath(path))
    if is_distilled_deit(ckpt.arrays):
      ckpt = dataclasses.replace(ckpt, arrays=distilled_as_yolos_start(ckpt.arrays))
    spec, ckpt = loading.infer_checkpoint(ckpt)
  except (CheckpointError, ValueError):
    return None
  return (spec, ckpt) if models.resolve(spec.name)[0].name == "ViT" else None


def is_distilled_deit(arrays) -> bool:
  """A distilled DeiT in timm's names (``dist_token`` beside the class token)."""
  return "dist_token" in arrays and "patch_embed.proj.weight" in arrays


def distilled_as_yolos_start(arrays) -> dict:
  """A distilled DeiT's arrays as YOLOS starts from them (hustvl/YOLOS ``finetune_det``): the
  class token is kept, the distillation token and its head are dropped, and of the position
  embeddings the first (the class token's) is dropped, so the distillation token's position
  becomes the class position; what remains is a plain timm ViT."""
  out = {k: v for k, v in arrays.items()
         if k != "dist_token" and not k.startswith("head_dist.")}
  out["pos_embed"] = np.asarray(arrays["pos_embed"])[:, 1:]
  return out


def load_from_classifier(model: YOLOS, path: str | os.PathLike,
                         classifier: tuple[ModelSpec, readers.Checkpoint] | None = None
                         ) -> YOLOS:
  """Starts ``model`` as YOLOS starts from ImageNet: the encoder (patch embedding, class token,
  blocks, final norm) from a ViT classifier checkpoint of any format ``load_pretrained`` reads
  (released .npz, timm, this trainer's; a distilled DeiT as ``distilled_as_yolos_start``), its
  position embeddings resampled to the model's grid (PyTorch bicubic); the detection tokens,
  their positions and the heads keep their initialisation. The ViT must have the model's patch
  size, width and depth (a timm file's heads are taken to be the model's). ``classifier``:
  ``read_classifier(path)`` when the caller has it already."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  classifier = classifier or read_classifier(path)
  if classifier is None:
    raise CheckpointError(f"{os.fspath(path)!r} holds no ViT classifier")
  spec, ckpt = classifier
  overrides = dict(spec.overrides)
  if ckpt.container in ("safetensors", "torch"):
    # timm's fused qkv does not say how many heads it splits into: take the detector's.
    overrides["num_heads"] = model.config.num_heads
  vit = models.create(spec.name, num_classes=spec.num_classes, image_size=spec.image_size,
                      **overrides)
  loading.load_pretrained(vit, ckpt)
  cfg, vcfg = model.config, vit.config
  mine = {k: getattr(cfg, k) for k in ("patch_size", "hidden_size", "num_layers", "channels")}
  theirs = {k: getattr(vcfg, k) for k in mine}
  if mine != theirs or vcfg.classifier != "token":
    raise CheckpointError(f"the ViT in {os.fspath(path)!r} ({theirs}, classifier "
                          f"{vcfg.classifier!r}) cannot start this YOLOS ({mine}): they must agree, "
                          "and the ViT must have a class token")
  flat = param_tree.model_arrays(vit, ("Transformer/blocks",))
  own = param_tree.model_arrays(model, (BLOCKS,))
  side = vcfg.image_size // vcfg.patch_size
  det_rows = own[POSEMB][:, own[POSEMB].shape[1] - cfg.num_det_tokens:]
  stacked = np.concatenate([flat.pop(POSEMB), det_rows], axis=1)
  taken = {POSEMB: resize_positions(stacked, (side, side), cfg.grid, cfg.num_det_tokens)}
  taken.update({n: v for n, v in flat.items() if not n.startswith(("head/", "pre_logits/"))})
  wrong = [n for n, v in taken.items() if n not in own or own[n].shape != v.shape]
  if wrong:
    raise CheckpointError(f"the ViT's {wrong[:5]} have no same-shaped place in this YOLOS")
  param_tree.assign(model, {**own, **taken}, (BLOCKS,))
  return model
