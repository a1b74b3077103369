"""DETR (``models/detr.py``) checkpoints in and out.

Formats (``.safetensors`` or torch state dicts; ``load_pretrained`` also reads HF model folders):
  * ``"hf"``: transformers' ``DetrForObjectDetection``: ``model.backbone...``, ``model.encoder``
    and ``model.decoder.layers.{i}...``, ``model.input_projection``,
    ``model.query_position_embeddings``, ``class_labels_classifier``, ``bbox_predictor``. Both
    the files' (hub) names (``model.backbone.conv_encoder.model.``, ``out_proj``, ``fc1``) and
    transformers 5's module names (``model.backbone.model.``, ``o_proj``, ``mlp.fc1``), and both
    backbones: timm's ``resnet50``/``resnet101`` (torchvision's names, ``use_timm_backbone``)
    and HF's ``ResNetBackbone`` (``embedder``, ``encoder.stages.{s}.layers.{u}...``).
    ``prepare`` brings every variant to module names with torchvision's backbone names.
    Written by ``export_hf``.
  * ``"original"``: facebookresearch/detr ``.pth`` files (``{"model": state_dict}``):
    ``backbone.0.body.*`` (torchvision), ``input_proj``, ``query_embed.weight``,
    ``transformer.{encoder,decoder}.layers.{i}...`` with attention's query, key and value packed
    in ``in_proj_weight``/``in_proj_bias``, ``transformer.decoder.norm`` (and
    ``transformer.encoder.norm`` for pre-norm), ``class_embed``, ``bbox_embed.layers.{j}``.

The frozen batch-norm arrays (``weight``, ``bias``, ``running_mean``, ``running_var``) are
model state, not parameters; ``load_pretrained`` fills them too.
"""

from __future__ import annotations

import os
import re
from typing import Collection, Mapping

import numpy as np

from vit_jax.checkpoints import hf_export, loading, mapping, param_tree
from vit_jax.checkpoints.mapping import Arrays, Family, Format, Rule, register_family, register_format, rename
from vit_jax.checkpoints.timm_names import bias, conv, linear, split_bias, split_linear
from vit_jax.checkpoints.torch_layouts import conv1x1_as_dense, dense_both_ways, norm, to_torch_conv
from vit_jax.models.detr import DETR
from vit_jax.models.resnet import DEPTHS

register_family(Family(name="DETR", model_type=DETR, head="class_embed"))

BACKBONES = ("hf", "timm")
# Backbones transformers builds with timm (``use_timm_backbone``): (units per stage) -> name.
TIMM_RESNETS = {DEPTHS[26]: "resnet26", DEPTHS[50]: "resnet50", DEPTHS[101]: "resnet101",
                DEPTHS[152]: "resnet152"}
_HF_BACKBONE = "model.backbone.model."


def _dense_as_conv1x1(arrays):
  return [arrays[0].T[:, :, None, None]]


def _batch_norm(src: str, dst: str) -> tuple[Rule, ...]:
  """A (frozen) torch BatchNorm2d -> our FrozenBatchNorm (model state)."""
  return (rename(f"{src}.weight", f"{dst}/scale"), rename(f"{src}.bias", f"{dst}/bias"),
          rename(f"{src}.running_mean", f"{dst}/mean"), rename(f"{src}.running_var", f"{dst}/var"))


def _conv(src: str, dst: str) -> Rule:
  return Rule(src, dst, load=conv, save=to_torch_conv)


def backbone_rules(prefix: str) -> tuple[Rule, ...]:
  """torchvision's ResNet names under ``prefix`` <-> our ``backbone``."""
  unit, ours = f"{prefix}layer{{s}}.{{u}}.", "backbone/layer{s}/{u}/"
  return (
      _conv(f"{prefix}conv1.weight", "backbone/conv1/kernel"),
      *_batch_norm(f"{prefix}bn1", "backbone/bn1"),
      _conv(f"{unit}conv{{k}}.weight", f"{ours}conv{{k}}/kernel"),
      *_batch_norm(f"{unit}bn{{k}}", f"{ours}bn{{k}}"),
      _conv(f"{unit}downsample.0.weight", f"{ours}downsample/conv/kernel"),
      *_batch_norm(f"{unit}downsample.1", f"{ours}downsample/bn"),
  )


def _hf_attention(src: str, dst: str) -> tuple[Rule, ...]:
  return (*dense_both_ways(f"{src}.q_proj", f"{dst}/query"), *dense_both_ways(f"{src}.k_proj", f"{dst}/key"),
          *dense_both_ways(f"{src}.v_proj", f"{dst}/value"),
          *dense_both_ways(f"{src}.o_proj", f"{dst}/out", n_in=2))


_ENC, _DEC = "model.encoder.layers.{i}", "model.decoder.layers.{i}"
_OURS_ENC, _OURS_DEC = "encoder/layers/{i}", "decoder/layers/{i}"
HF_RULES = (
    *backbone_rules(_HF_BACKBONE),
    Rule("model.input_projection.weight", "input_proj/kernel", load=conv1x1_as_dense,
         save=_dense_as_conv1x1),
    rename("model.input_projection.bias", "input_proj/bias"),
    rename("model.query_position_embeddings.weight", "query_embed"),
    *_hf_attention(f"{_ENC}.self_attn", f"{_OURS_ENC}/self_attn"),
    *norm(f"{_ENC}.self_attn_layer_norm", f"{_OURS_ENC}/norm1"),
    *dense_both_ways(f"{_ENC}.mlp.fc1", f"{_OURS_ENC}/linear1"),
    *dense_both_ways(f"{_ENC}.mlp.fc2", f"{_OURS_ENC}/linear2"),
    *norm(f"{_ENC}.final_layer_norm", f"{_OURS_ENC}/norm2"),
    *_hf_attention(f"{_DEC}.self_attn", f"{_OURS_DEC}/self_attn"),
    *norm(f"{_DEC}.self_attn_layer_norm", f"{_OURS_DEC}/norm1"),
    *_hf_attention(f"{_DEC}.encoder_attn", f"{_OURS_DEC}/multihead_attn"),
    *norm(f"{_DEC}.encoder_attn_layer_norm", f"{_OURS_DEC}/norm2"),
    *dense_both_ways(f"{_DEC}.mlp.fc1", f"{_OURS_DEC}/linear1"),
    *dense_both_ways(f"{_DEC}.mlp.fc2", f"{_OURS_DEC}/linear2"),
    *norm(f"{_DEC}.final_layer_norm", f"{_OURS_DEC}/norm3"),
    *norm("model.decoder.layernorm", "decoder/norm"),
    *dense_both_ways("class_labels_classifier", "class_embed"),
    *dense_both_ways("bbox_predictor.layers.{j}", "bbox_embed/Dense_{j}"),
    Rule("{name:*}", "{name:*}", save=None),  # anything else is reported as unexpected
)


def _packed_attention(src: str, dst: str) -> tuple[Rule, ...]:
  """torch ``nn.MultiheadAttention`` (query, key, value packed in ``in_proj``) -> ours."""
  fused = tuple(f"{dst}/{n}" for n in ("query", "key", "value"))
  return (Rule(f"{src}.in_proj_weight", tuple(f"{f}/kernel" for f in fused), load=split_linear(3),
               save=None),
          Rule(f"{src}.in_proj_bias", tuple(f"{f}/bias" for f in fused), load=split_bias(3),
               save=None),
          *dense_both_ways(f"{src}.out_proj", f"{dst}/out", n_in=2))


_T_ENC, _T_DEC = "transformer.encoder.layers.{i}", "transformer.decoder.layers.{i}"
ORIGINAL_RULES = (
    *backbone_rules("backbone.0.body."),
    Rule("input_proj.weight", "input_proj/kernel", load=conv1x1_as_dense, save=None),
    rename("input_proj.bias", "input_proj/bias"),
    rename("query_embed.weight", "query_embed"),
    *_packed_attention(f"{_T_ENC}.self_attn", f"{_OURS_ENC}/self_attn"),
    *dense_both_ways(f"{_T_ENC}.linear1", f"{_OURS_ENC}/linear1"),
    *dense_both_ways(f"{_T_ENC}.linear2", f"{_OURS_ENC}/linear2"),
    *norm(f"{_T_ENC}.norm1", f"{_OURS_ENC}/norm1"),
    *norm(f"{_T_ENC}.norm2", f"{_OURS_ENC}/norm2"),
    *norm("transformer.encoder.norm", "encoder/norm"),
    *_packed_attention(f"{_T_DEC}.self_attn", f"{_OURS_DEC}/self_attn"),
    *_packed_attention(f"{_T_DEC}.multihead_attn", f"{_OURS_DEC}/multihead_attn"),
    *dense_both_ways(f"{_T_DEC}.linear1", f"{_OURS_DEC}/linear1"),
    *dense_both_ways(f"{_T_DEC}.linear2", f"{_OURS_DEC}/linear2"),
    *norm(f"{_T_DEC}.norm1", f"{_OURS_DEC}/norm1"),
    *norm(f"{_T_DEC}.norm2", f"{_OURS_DEC}/norm2"),
    *norm(f"{_T_DEC}.norm3", f"{_OURS_DEC}/norm3"),
    *norm("transformer.decoder.norm", "decoder/norm"),
    *dense_both_ways("class_embed", "class_embed"),
    *dense_both_ways("bbox_embed.layers.{j}", "bbox_embed/Dense_{j}"),
    Rule("{name:*}", "{name:*}", save=None),
)

# (pattern, replacement) pairs applied in turn to every key.
_HF_FILE_TO_MODULE = (
    (r"^model\.backbone\.conv_encoder\.model\.", _HF_BACKBONE),
    (r"\.out_proj\.", ".o_proj."),
    (r"(\.layers\.\d+)\.fc([12])\.", r"\1.mlp.fc\2."),
)
_HF_MODULE_TO_FILE = (
    (rf"^{re.escape(_HF_BACKBONE)}", "model.backbone.conv_encoder.model."),
    (r"\.o_proj\.", ".out_proj."),
    (r"(\.layers\.\d+)\.mlp\.fc([12])\.", r"\1.fc\2."),
)
# HF's ResNetBackbone names -> torchvision's (stages and units from 0 in HF, layers from 1).
_HF_RESNET_TO_TORCHVISION = (
    (r"^embedder\.embedder\.convolution\.", lambda m: "conv1."),
    (r"^embedder\.embedder\.normalization\.", lambda m: "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
)
_TORCHVISION_TO_HF_RESNET = (
    (r"^conv1\.", lambda m: "embedder.embedder.convolution."),
    (r"^bn1\.", lambda m: "embedder.embedder.normalization."),
    (r"^layer(\d+)\.(\d+)\.conv(\d+)\.",
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution."),
    (r"^layer(\d+)\.(\d+)\.bn(\d+)\.",
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization."),
    (r"^layer(\d+)\.(\d+)\.downsample\.0\.",
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution."),
    (r"^layer(\d+)\.(\d+)\.downsample\.1\.",
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization."),
)


def _substitute(key: str, table) -> str:
  for pattern, replacement in table:
    key = re.sub(pattern, replacement, key)
  return key


def _rename_backbone(key: str, table) -> str:
  if not key.startswith(_HF_BACKBONE):
    return key
  return _HF_BACKBONE + _substitute(key[len(_HF_BACKBONE):], table)


def _drop_counters(arrays: Mapping[str, np.ndarray]) -> Arrays:
  """Without batch norm's ``num_batches_tracked`` (unused by frozen batch norm)."""
  return {k: v for k, v in arrays.items() if not k.endswith(".num_batches_tracked")}


def prepare_hf(arrays: Mapping[str, np.ndarray]) -> Arrays:
  """Any HF variant -> transformers 5's module names with torchvision's backbone names."""
  out = {}
  for k, v in _drop_counters(arrays).items():
    k = _rename_backbone(_substitute(k, _HF_FILE_TO_MODULE), _HF_RESNET_TO_TORCHVISION)
    out[k] = v
  return out


def to_hf_files(arrays: Mapping[str, np.ndarray], backbone: str = "hf") -> Arrays:
  """Module names (as ``prepare_hf`` gives) -> the names HF's files use, with HF's
  ``ResNetBackbone`` names (``backbone="hf"``) or timm's (``"timm"``)."""
  if backbone not in BACKBONES:
    raise ValueError(f"backbone {backbone!r} is not one of {BACKBONES}")
  out = {}
  for k, v in arrays.items():
    if backbone == "hf":
      k = _rename_backbone(k, _TORCHVISION_TO_HF_RESNET)
    out[_substitute(k, _HF_MODULE_TO_FILE)] = v
  return out


def detect_hf(keys: Collection[str]) -> bool:
  return "model.query_position_embeddings.weight" in keys


def detect_original(keys: Collection[str]) -> bool:
  return "query_embed.weight" in keys and "transformer.decoder.norm.weight" in keys


register_format(Format(family="DETR", name="hf", rules=HF_RULES, detect=detect_hf,
                       containers=("safetensors", "torch"), prepare=prepare_hf))
register_format(Format(family="DETR", name="original", rules=ORIGINAL_RULES,
                       detect=detect_original, containers=("safetensors", "torch"),
                       prepare=_drop_counters))


def _check_exportable(model: DETR, backbone: str) -> None:
  if not isinstance(model, DETR):
    raise ValueError(f"export_hf writes DETR models, not a {type(model).__name__}")
  cfg = model.config
  if backbone not in BACKBONES:
    raise ValueError(f"backbone {backbone!r} is not one of {BACKBONES}")
  if cfg.normalize_before:
    raise ValueError("transformers' DETR has no pre-norm layers: a normalize_before=True model "
                     "cannot be written as an HF DetrForObjectDetection")
  if cfg.layernorm_eps != 1e-5:
    raise ValueError(f"transformers' DETR uses LayerNorm eps 1e-5; this model has "
                     f"layernorm_eps={cfg.layernorm_eps}")
  if backbone == "hf" and cfg.dilation:
    raise ValueError("transformers builds a dilated (DC5) backbone only with timm: export with "
                     "backbone='timm'")
  if backbone == "timm" and (cfg.resnet_width != 64 or cfg.resnet_layers not in TIMM_RESNETS):
    raise ValueError(f"no timm ResNet has width {cfg.resnet_width} and units "
                     f"{cfg.resnet_layers}; timm's are width 64 with "
                     f"{', '.join(f'{v} {k}' for k, v in TIMM_RESNETS.items())}: export with "
                     f"backbone='hf'")


def hf_config(model: DETR, id2label: Mapping[int, str] | None = None,
              backbone: str = "hf") -> dict:
  """transformers' ``DetrConfig`` of ``model`` as a dict (``config.json``)."""
  _check_exportable(model, backbone)
  cfg = model.config
  if id2label is None:
    id2label = {i: f"LABEL_{i}" for i in range(cfg.num_classes)}
  if sorted(int(i) for i in id2label) != list(range(cfg.num_classes)):
    raise ValueError(f"id2label must name the classes 0..{cfg.num_classes - 1} of this model, "
                     f"got {len(id2label)} ids from {min(map(int, id2label), default=None)} to "
                     f"{max(map(int, id2label), default=None)}")
  labels = {str(int(i)): str(name)
            for i, name in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
  config = {
      "architectures": ["DetrForObjectDetection"],
      "model_type": "detr",
      "num_channels": cfg.channels,
      "num_queries": cfg.num_queries,
      "d_model": cfg.hidden_size,
      "encoder_layers": cfg.encoder_layers,
      "decoder_layers": cfg.decoder_layers,
      "encoder_attention_heads": cfg.num_heads,
      "decoder_attention_heads": cfg.num_heads,
      "encoder_ffn_dim": cfg.mlp_dim,
      "decoder_ffn_dim": cfg.mlp_dim,
      "activation_function": "relu",
      "dropout": cfg.dropout_rate,
      "activation_dropout": cfg.dropout_rate,
      "attention_dropout": cfg.attention_dropout_rate,
      "position_embedding_type": "sine",
      "auxiliary_loss": False,
      "dilation": cfg.dilation,
      "use_pretrained_backbone": False,
      "is_encoder_decoder": True,
      "id2label": labels,
      "label2id": {name: int(i) for i, name in labels.items()},
      "torch_dtype": "float32",
  }
  if backbone == "timm":
    return {**config, "use_timm_backbone": True, "backbone": TIMM_RESNETS[cfg.resnet_layers],
            "backbone_config": None}
  n = len(cfg.resnet_layers)
  return {**config, "use_timm_backbone": False, "backbone": None, "backbone_config": {
      "model_type": "resnet",
      "num_channels": cfg.channels,
      "embedding_size": cfg.resnet_width,
      "hidden_sizes": [4 * cfg.resnet_width * 2 ** s for s in range(n)],
      "depths": list(cfg.resnet_layers),
      "layer_type": "bottleneck",
      "hidden_act": "relu",
      "downsample_in_first_stage": False,
      "downsample_in_bottleneck": False,
      "out_features": [f"stage{n}"],
  }}


def hf_state_dict(model: DETR, backbone: str = "hf") -> Arrays:
  """``model``'s parameters and frozen batch-norm arrays in the names and layouts of HF's files
  (numpy, float32)."""
  _check_exportable(model, backbone)
  arrays = {**param_tree.model_arrays(model, ()), **loading.state_arrays(model)}
  return to_hf_files(mapping.to_checkpoint_names(HF_RULES, arrays), backbone)


def export_hf(model: DETR, folder: str | os.PathLike, *, id2label: Mapping[int, str] | None = None,
              backbone: str = "hf") -> str:
  """Writes ``model`` as an HF model folder that ``DetrForObjectDetection.from_pretrained``
  reads offline; returns the folder.

  ``id2label``: class names (default ``LABEL_{i}``). ``backbone``: "hf" (HF's own
  ``ResNetBackbone``; needs no timm) or "timm" (timm's ``resnet50``/``resnet101``, as the hub's
  ``facebook/detr-resnet-*``; the only way transformers builds a DC5 backbone).
  """
  return hf_export.write_hf_folder(hf_state_dict(model, backbone),
                                   hf_config(model, id2label, backbone), folder)
