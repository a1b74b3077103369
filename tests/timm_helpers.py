"""Importing timm offline, for parity tests (reference models built with pretrained=False).

The installed torchvision is a CUDA build whose C ops do not load; timm imports once the two
op schemas it looks up exist. ``import_timm()`` defines them once, then imports timm.
"""

from __future__ import annotations

import numpy as np

_DEFINED = False


def import_timm():
  """Returns the ``timm`` module (and ``torch`` ready to use), importable without torchvision ops."""
  global _DEFINED
  import torch
  if not _DEFINED:
    try:
      lib = torch.library.Library("torchvision", "DEF")
      lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      globals()["_LIB"] = lib  # keep the library (and its definitions) alive
    except RuntimeError:  # already defined by another helper or a real torchvision
      pass
    _DEFINED = True
  import timm
  return timm


def state_dict_numpy(module) -> dict[str, np.ndarray]:
  """A torch module's state dict as float32 numpy arrays."""
  return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def randomize_(module, seed: int = 0, std: float = 0.02) -> None:
  """Fills every parameter with random values (norm scales near 1), so that parity tests do
  not pass on zero-initialised heads or identity norms."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      if p.ndim == 1 and name.endswith("weight"):
        p.copy_(1.0 + noise * 5)
      elif p.ndim == 1:
        p.copy_(noise * 5)
      else:
        p.copy_(p + noise)
