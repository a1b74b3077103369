"""Checkpoint formats of the hybrid, BiT, Mixer and TNT families, by model type.

``timm_rules(model)`` and ``npz_rules(model)`` give the name rules (``name_rules.Rule``) of a
model; ``load_timm``/``load_npz`` write a foreign checkpoint into a model; ``export_npz`` writes
the original npz format (hybrids and Mixer) back.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np
from flax import nnx

from vit_jax.checkpoints import name_rules
from vit_jax.checkpoints.hybrid_names import hybrid_npz_rules, hybrid_timm_rules
from vit_jax.checkpoints.mixer_names import mixer_npz_rules, mixer_timm_rules
from vit_jax.checkpoints.resnet_names import bit_timm_rules
from vit_jax.checkpoints.tnt_names import tnt_timm_rules
from vit_jax.models.mixer import MlpMixer
from vit_jax.models.resnet import ResNet
from vit_jax.models.tnt import TNT
from vit_jax.models.vit_hybrid import HybridViT

# Prefixes under which the original code saved its parameters.
NPZ_PREFIXES = ("opt/target/", "params/")


def family_of(model: nnx.Module) -> str | None:
  """"hybrid", "bit", "mixer", "tnt", or None for a model of another family."""
  if isinstance(model, HybridViT):  # before ViT: a hybrid is a VisionTransformer
    return "hybrid"
  if isinstance(model, ResNet) and model.config.num_classes:
    return "bit"
  if isinstance(model, MlpMixer):
    return "mixer"
  if isinstance(model, TNT):
    return "tnt"
  return None


def timm_rules(model: nnx.Module) -> list[name_rules.Rule]:
  fns = {"hybrid": hybrid_timm_rules, "bit": bit_timm_rules, "mixer": mixer_timm_rules,
         "tnt": tnt_timm_rules}
  family = family_of(model)
  if family not in fns:
    raise ValueError(f"no timm names for a {type(model).__name__}; families: {sorted(fns)}")
  return fns[family](model)


def npz_rules(model: nnx.Module) -> list[name_rules.Rule]:
  fns = {"hybrid": hybrid_npz_rules, "mixer": mixer_npz_rules}
  family = family_of(model)
  if family not in fns:
    raise ValueError(f"no original npz format for a {type(model).__name__}; families with one: "
                     f"{sorted(fns)} (use timm weights for the others)")
  return fns[family](model)


def strip_npz_prefix(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Drops a leading "opt/target/" or "params/" shared by every key."""
  for prefix in NPZ_PREFIXES:
    if flat and all(k.startswith(prefix) for k in flat):
      return {k[len(prefix):]: np.asarray(v) for k, v in flat.items()}
  return {k: np.asarray(v) for k, v in flat.items()}


def load_npz(model: nnx.Module, source: str | os.PathLike | Mapping[str, Any], *,
             keep: Iterable[str] = ()) -> None:
  """Loads an original npz checkpoint (path or dict) into ``model`` in place."""
  if isinstance(source, Mapping):
    flat = dict(source)
  else:
    with np.load(source) as f:
      flat = {k: f[k] for k in f.files}
  params = name_rules.import_params(model, npz_rules(model), strip_npz_prefix(flat),
                                    what=f"npz checkpoint {source if not isinstance(source, Mapping) else ''}".strip(),
                                    keep=keep)
  name_rules.load_into(model, params)


def load_timm(model: nnx.Module, state_dict: Mapping[str, Any], *, keep: Iterable[str] = ()) -> None:
  """Loads a timm state dict ({name: array or torch tensor}) into ``model`` in place."""
  flat = {k: _numpy(v) for k, v in state_dict.items()}
  params = name_rules.import_params(model, timm_rules(model), flat, what="timm state dict", keep=keep)
  name_rules.load_into(model, params)


def export_npz(model: nnx.Module, path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
  """The model's parameters in the original npz format; also saved to ``path`` if given."""
  flat = name_rules.export_params(model, npz_rules(model))
  if path is not None:
    np.savez(path, **flat)
  return flat


def export_timm(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as a timm state dict of numpy arrays (``torch.from_numpy`` each)."""
  return name_rules.export_params(model, timm_rules(model))


def _numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor, without importing torch here
    v = v.detach().float().cpu().numpy()
  return np.asarray(v)
