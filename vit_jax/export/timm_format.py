"""timm's format: a folder of ``model.safetensors`` (timm's parameter names and layouts) and
timm's ``config.json`` (architecture, ``model_args``, ``pretrained_cfg``, label names)::

    model = timm.create_model("local-dir:" + FOLDER, pretrained=True)
    # or, naming the architecture:
    cfg = json.load(open(f"{FOLDER}/config.json"))
    model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                              pretrained_cfg_overlay=dict(cfg["pretrained_cfg"],
                                                          file=f"{FOLDER}/model.safetensors"))

The weights are the timm formats the loader reads (``checkpoints/timm_names.py``,
``hybrid_names.py``, ``mixer_names.py``, ``tnt_names.py``, ``resnet_names.py``) run backwards:
the same rules, each layout function replaced by its inverse (``_INVERSES``) and checked
against the function itself on every array. The architecture is timm's registered one for the
family and variant, with ``model_args`` giving this model's sizes; a model that timm's classes
cannot express (a pre-logits layer, another norm epsilon, a hybrid ResNet timm has no
architecture for, a detector) is a ValueError naming what timm lacks. Writing needs neither
torch nor timm.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from typing import Any, Callable, NoReturn, Sequence

import numpy as np
from flax import nnx

from vit_jax.checkpoints import hf_export, mapping, param_tree, resnet_names, timm_names, torch_layouts
from vit_jax.export.serving import ServingConfig
from vit_jax.models.layers import Dense

WEIGHTS, CONFIG = "model.safetensors", "config.json"

# timm's registered architectures of the families it shares with this library.
TIMM_VITS = ("vit_tiny_patch16_224", "vit_tiny_patch16_384", "vit_small_patch32_224",
             "vit_small_patch32_384", "vit_small_patch16_224", "vit_small_patch16_384",
             "vit_small_patch8_224", "vit_base_patch32_224", "vit_base_patch32_384",
             "vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch8_224",
             "vit_large_patch32_224", "vit_large_patch32_384", "vit_large_patch16_224",
             "vit_large_patch16_384", "vit_large_patch14_224", "vit_huge_patch14_224",
             "vit_giant_patch14_224")
TIMM_HYBRIDS = ("vit_tiny_r_s16_p8_224", "vit_tiny_r_s16_p8_384", "vit_small_r26_s32_224",
                "vit_small_r26_s32_384", "vit_base_r26_s32_224", "vit_base_r50_s16_224",
                "vit_base_r50_s16_384", "vit_large_r50_s32_224", "vit_large_r50_s32_384")
# The Mixers' and BiTs' architecture functions fix these (create_model cannot change them):
# Mixer patch, blocks and width; BiT stages and width factor.
TIMM_MIXERS = {"mixer_s32_224": (32, 8, 512), "mixer_s16_224": (16, 8, 512),
               "mixer_b32_224": (32, 12, 768), "mixer_b16_224": (16, 12, 768),
               "mixer_l32_224": (32, 24, 1024), "mixer_l16_224": (16, 24, 1024)}
TIMM_TNTS = ("tnt_s_patch16_224", "tnt_b_patch16_224")
TIMM_BITS = {"resnetv2_50x1_bit": ((3, 4, 6, 3), 1), "resnetv2_50x3_bit": ((3, 4, 6, 3), 3),
             "resnetv2_101x1_bit": ((3, 4, 23, 3), 1), "resnetv2_101x3_bit": ((3, 4, 23, 3), 3),
             "resnetv2_152x2_bit": ((3, 8, 36, 3), 2), "resnetv2_152x4_bit": ((3, 8, 36, 3), 4)}
_SIZES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge", "g": "giant"}
# The ResNet stages of timm's hybrids (its architectures fix them; model_args cannot).
_HYBRID_BACKBONES = {(3, 4, 9): "r50_s16", (3, 4, 6, 3): "r50_s32", (2, 2, 2, 2): "r26_s32",
                     (): "r_s16_p8"}


@dataclasses.dataclass(frozen=True)
class TimmArchitecture:
  """A timm architecture and the ``create_model`` arguments that give it this model's sizes."""
  name: str
  model_args: dict[str, Any]
  first_conv: str
  classifier: str = "head"
  fixed_input_size: bool = True
  renames: tuple[tuple[str, str], ...] = ()  # name prefixes this architecture spells otherwise


def _pick(known: tuple[str, ...], wanted: str, *fallbacks: str) -> str:
  """``wanted`` if timm registers it, else the first registered name that contains the first
  fallback fragment found (``model_args`` carry the sizes either way)."""
  if wanted in known:
    return wanted
  return next(k for fragment in fallbacks for k in known if fragment in k)


def _ratio(hidden: int, width: int) -> float:
  """A ratio r with ``int(width * r) == hidden``, as timm computes MLP widths."""
  r = hidden / width
  return r if int(width * r) == hidden else (hidden + 0.5) / width


def _refuse(what: str, reason: str) -> NoReturn:
  raise ValueError(f"the timm format cannot express this {what}: {reason}")


def _common_checks(what: str, cfg, eps: float) -> None:
  if getattr(cfg, "gelu_approximate", False):
    _refuse(what, "timm's models use the exact GELU (this one gelu_approximate=True)")
  if getattr(cfg, "layernorm_eps", eps) != eps:
    _refuse(what, f"timm's {what} uses LayerNorm eps {eps:g} (this one {cfg.layernorm_eps:g})")


def _vit_args(cfg, what: str) -> dict[str, Any]:
  """model_args of timm's VisionTransformer for our ViT config ``cfg`` (a hybrid's ViT part too)."""
  _common_checks(what, cfg, 1e-6)
  if cfg.representation_size:
    _refuse(what, "timm's VisionTransformer has no pre-logits (representation_size) layer")
  if cfg.posemb != "learn":
    _refuse(what, f"timm's VisionTransformer has no fixed {cfg.posemb!r} position embedding")
  pooling = {"token": dict(global_pool="token"),
             "gap": dict(global_pool="avg", class_token=False, fc_norm=False),
             "map": dict(global_pool="map", class_token=False)}[cfg.classifier]
  return dict(patch_size=cfg.patch_size, embed_dim=cfg.hidden_size, depth=cfg.num_layers,
              num_heads=cfg.num_heads, mlp_ratio=_ratio(cfg.mlp_dim, cfg.hidden_size),
              num_classes=cfg.num_classes, **pooling)


def _vit(model, match) -> TimmArchitecture:
  cfg = model.config
  size = _SIZES[match["variant"]]
  name = _pick(TIMM_VITS, f"vit_{size}_patch{cfg.patch_size}_{cfg.image_size}", f"vit_{size}_")
  return TimmArchitecture(name, dict(img_size=cfg.image_size, in_chans=cfg.channels,
                                     **_vit_args(cfg, "ViT")), "patch_embed.proj")


def _hybrid(model, match) -> TimmArchitecture:
  cfg, resnet = model.config, model.resnet.config
  backbone = _HYBRID_BACKBONES.get(tuple(resnet.layers))
  if backbone is None:
    _refuse("hybrid", f"timm has no hybrid with ResNet stages {tuple(resnet.layers)}; its "
                      f"hybrids' stages: {', '.join(str(k) for k in _HYBRID_BACKBONES)}")
  if resnet.width != 64 or resnet.gn_groups != 32 or resnet.padding != "same":
    _refuse("hybrid", "timm's hybrids have a ResNet of width 64, 32 norm groups and 'same' "
                      f"padding (this one {resnet.width}, {resnet.gn_groups}, {resnet.padding!r})")
  if (resnet.ws_style, resnet.ws_eps, resnet.gn_eps) != ("var", 1e-8, 1e-5):
    warnings.warn("timm computes the hybrid's ResNet with ws_style='var', ws_eps=1e-8, "
                  f"gn_eps=1e-5; this model with {resnet.ws_style!r}, {resnet.ws_eps:g}, "
                  f"{resnet.gn_eps:g}: timm's outputs will differ slightly", stacklevel=3)
  size = _SIZES[match["variant"]]
  name = _pick(TIMM_HYBRIDS, f"vit_{size}_{backbone}_{model.image_size}",
               f"vit_{size}_{backbone}_", f"_{backbone}_")
  stem_only = not resnet.layers
  return TimmArchitecture(
      name, dict(img_size=model.image_size, in_chans=resnet.channels, **_vit_args(cfg, "hybrid")),
      "patch_embed.backbone." + ("conv" if stem_only else "stem.conv"),
      # timm's stem-only backbone is the stem itself (conv, norm), not ResNetV2's ``stem.``.
      renames=(("patch_embed.backbone.stem.", "patch_embed.backbone."),) if stem_only else ())


def _mixer(model, match) -> TimmArchitecture:
  cfg = model.config
  _common_checks("Mixer", cfg, 1e-6)
  ours = (cfg.patch_size, cfg.num_layers, cfg.hidden_size)
  name = next((n for n, fixed in TIMM_MIXERS.items() if fixed == ours), None)
  if name is None:
    _refuse("Mixer", f"timm has no Mixer of patch {ours[0]}, {ours[1]} blocks and width "
                     f"{ours[2]}; its Mixers: " + ", ".join(
                         f"{n} {p}/{b}/{w}" for n, (p, b, w) in TIMM_MIXERS.items()))
  return TimmArchitecture(name, dict(
      img_size=cfg.image_size, in_chans=cfg.channels, num_classes=cfg.num_classes,
      mlp_ratio=[_ratio(cfg.tokens_mlp_dim, cfg.hidden_size),
                 _ratio(cfg.channels_mlp_dim, cfg.hidden_size)]), "stem.proj")


def _tnt(model, match) -> TimmArchitecture:
  cfg = model.config
  _common_checks("TNT", cfg, 1e-5)
  if cfg.inner_mlp_ratio != 4.0:
    _refuse("TNT", f"timm's inner MLP is 4x as wide as the pixel tokens (this one "
                   f"{cfg.inner_mlp_ratio:g}x)")
  name = _pick(TIMM_TNTS, f"tnt_{match['variant'].lower()}_patch16_224", "tnt_s")
  return TimmArchitecture(name, dict(
      img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.channels,
      num_classes=cfg.num_classes, embed_dim=cfg.hidden_size, inner_dim=cfg.inner_size,
      depth=cfg.num_layers, num_heads_outer=cfg.num_heads, num_heads_inner=cfg.inner_heads,
      mlp_ratio=_ratio(int(cfg.hidden_size * cfg.mlp_ratio), cfg.hidden_size),
      qkv_bias=cfg.qkv_bias, first_stride=cfg.pixel_stride), "pixel_embed.proj")


def _bit(model, match) -> TimmArchitecture:
  cfg = model.config
  timm_numerics = dict(preact=True, padding="symmetric", ws_style="var", ws_eps=1e-8,
                       gn_eps=1e-5, gn_groups=32)
  ours = {k: getattr(cfg, k) for k in timm_numerics}
  if ours != timm_numerics:
    _refuse("BiT", f"timm's resnetv2_*_bit computes with {timm_numerics}, this one with {ours}")
  candidates = [(n, f) for n, (layers, f) in TIMM_BITS.items() if layers == tuple(cfg.layers)]
  # The architecture multiplies the widths by its factor and rounds them to multiples of 8.
  fits = [(n, f) for n, f in candidates if cfg.width % (8 * f) == 0]
  if not fits:
    _refuse("BiT", f"timm has no BiT with stages {tuple(cfg.layers)} and root width {cfg.width}; "
                   "its BiTs: " + ", ".join(f"{n} {l}" for n, (l, _) in TIMM_BITS.items())
                   + " (root width 64 x factor, any multiple of 8 x factor)")
  name, factor = next(((n, f) for n, f in fits if 64 * f == cfg.width), fits[0])
  width = cfg.width // factor
  return TimmArchitecture(name, dict(
      stem_chs=width, channels=[4 * width * 2 ** s for s in range(len(cfg.layers))],
      in_chans=cfg.channels, num_classes=cfg.num_classes),
      "stem.conv", classifier="head.fc", fixed_input_size=False)


_ARCHITECTURES: dict[str, Callable[[Any, re.Match], TimmArchitecture]] = {
    "ViT": _vit, "Hybrid": _hybrid, "Mixer": _mixer, "TNT": _tnt, "BiT": _bit}


def architecture(model: nnx.Module, model_name: str) -> TimmArchitecture:
  """timm's architecture for ``model`` (called ``model_name`` here), or a ValueError saying
  what timm lacks."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  family = mapping.family_of(model).name
  if family not in _ARCHITECTURES:
    raise ValueError(f"the timm format cannot express {model_name}: timm has no {family} "
                     f"models (it has {', '.join(_ARCHITECTURES)}); export it as stablehlo or "
                     "savedmodel")
  return _ARCHITECTURES[family](model, models.resolve(model_name)[1])


# ------------------------------------------------------------------------- weights

def _torch_linear(kernel: np.ndarray, n_in: int) -> np.ndarray:
  """Our Dense kernel (its first ``n_in`` axes the inputs) -> a torch Linear weight [out, in]."""
  return kernel.reshape(math.prod(kernel.shape[:n_in]), -1).T


# The inverse of each layout function the timm formats load with, by code object (closures of
# one factory share it): (model arrays, input axes of a Dense kernel) -> checkpoint arrays.
_INVERSES: dict[Any, Callable[[list[np.ndarray], int], list[np.ndarray]]] = {
    mapping.rename("a", "b").load.__code__: lambda a, n: list(a),
    timm_names.linear.__code__: lambda a, n: [_torch_linear(a[0], n)],
    timm_names.bias.__code__: lambda a, n: [a[0].reshape(-1)],
    timm_names.conv.__code__: lambda a, n: [a[0].transpose(3, 2, 0, 1)],
    timm_names.split_linear(1).__code__:
        lambda a, n: [np.concatenate([_torch_linear(k, n) for k in a])],
    timm_names.split_bias(1).__code__: lambda a, n: [np.concatenate([b.reshape(-1) for b in a])],
    torch_layouts.conv1x1_as_dense.__code__:
        lambda a, n: [_torch_linear(a[0], n)[:, :, None, None]],
    torch_layouts.channels_last.__code__: lambda a, n: [np.moveaxis(a[0], -1, 1)],
}
_STAGE = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")
# The inverse of each format's ``prepare`` (a whole-checkpoint renaming).
_UNPREPARE: dict[Any, Callable[[dict], dict]] = {
    dict: dict,
    resnet_names.renumber_stages: lambda arrays: {
        _STAGE.sub(lambda m: f"stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.", k): v
        for k, v in arrays.items()},
}


def _writing(rule: mapping.Rule, n_in: int) -> mapping.Rule:
  """``rule`` with a ``save`` that inverts its ``load`` (checked by loading back)."""
  inverse = _INVERSES.get(rule.load.__code__)
  if inverse is None:
    return dataclasses.replace(rule, save=None)

  def save(arrays):
    written = inverse(list(arrays), n_in)
    back = rule.load(written, [a.shape for a in arrays])
    if not all(np.array_equal(a, b) for a, b in zip(arrays, back)):
      raise AssertionError(f"the inverse of {rule.load.__qualname__} for {rule.model} does not "
                           "load back to the model's arrays")
    return written
  return dataclasses.replace(rule, save=save)


def _input_axes(model: nnx.Module) -> dict[str, int]:
  """Per-layer-agnostic kernel name (layer indices dropped) -> input axes of its Dense."""
  return {_unindexed("/".join(str(p) for p in path) + "/kernel"): len(module.in_shape)
          for path, module in nnx.iter_modules(model) if isinstance(module, Dense)}


def _unindexed(name: str) -> str:
  return re.sub(r"/\d+(?=/)", "", name)


def state_dict(model: nnx.Module, renames: Sequence[tuple[str, str]] = ()) -> dict[str, np.ndarray]:
  """``model``'s parameters in timm's names and layouts (float32), name prefixes replaced as
  ``renames`` say (``TimmArchitecture.renames``)."""
  family = mapping.family_of(model)
  fmt = next((f for f in mapping.formats_for(family.name) if f.name == "timm"), None)
  if fmt is None or fmt.prepare not in _UNPREPARE:
    raise ValueError(f"no timm format to write for {family.name} models")
  # The catch-all rule keeps unknown names as they are: when writing, those are errors. Read
  # backwards, ``conv{k}`` also matches ``conv_proj``: the most specific templates go first.
  rules = sorted((r for r in fmt.rules if r.model_templates != ("{name:*}",)),
                 key=lambda r: -len(re.sub(r"\{[^}]*\}", "", r.model_templates[0])))
  axes = _input_axes(model)
  groups: dict[int, dict[str, np.ndarray]] = {}
  for key, value in param_tree.model_arrays(model, family.layer_lists).items():
    groups.setdefault(axes.get(_unindexed(key), 1), {})[key] = value
  out: dict[str, np.ndarray] = {}
  for n_in, arrays in groups.items():  # fused companions (q, k, v) always share n_in
    try:
      out.update(mapping.to_checkpoint_names([_writing(r, n_in) for r in rules], arrays))
    except ValueError as e:
      raise ValueError(f"the timm format cannot express this {family.name}: {e}") from None
  out = _UNPREPARE[fmt.prepare](out)
  for old, new in renames:
    out = {(new + k[len(old):]) if k.startswith(old) else k: v for k, v in out.items()}
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def export_timm(model: nnx.Module, serving: ServingConfig, out: str) -> list[str]:
  """Writes ``out/model.safetensors`` and ``out/config.json``; returns their paths."""
  if serving.detector:
    raise ValueError(f"the timm format cannot express {serving.model_name}: timm has no "
                     "detectors; export it as stablehlo, savedmodel or onnx")
  arch = architecture(model, serving.model_name)
  weights = state_dict(model, arch.renames)
  channels, (h, w) = serving.channels, serving.image_size
  config: dict[str, Any] = {
      "architecture": arch.name,
      "num_classes": serving.num_classes,
      "model_args": arch.model_args,
      "pretrained_cfg": {
          "tag": "vit_jax", "custom_load": False, "input_size": [channels, h, w],
          "fixed_input_size": arch.fixed_input_size, "interpolation": serving.interpolation,
          "crop_pct": serving.crop_pct or 1.0, "crop_mode": "center",
          "mean": list(serving.mean), "std": list(serving.std),
          "num_classes": serving.num_classes, "first_conv": arch.first_conv,
          "classifier": arch.classifier},
  }
  if serving.class_names:
    config["label_names"] = list(serving.class_names)
  out = os.fspath(out)
  os.makedirs(out, exist_ok=True)
  weights_path = hf_export.write_safetensors(weights, os.path.join(out, WEIGHTS), {"format": "pt"})
  config_path = os.path.join(out, CONFIG)
  with open(config_path, "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
  return [weights_path, config_path]
