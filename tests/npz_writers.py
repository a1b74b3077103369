"""Test helper: random ViT weights written as the original and big_vision ``.npz`` formats.

Written from the formats' published key names and layouts, independently of
``vit_jax.checkpoints`` (no shared code with ``export_npz``), so that tests read files we did not
produce with our own exporter; timm's npz reader reads the same files.
"""

from __future__ import annotations

import numpy as np


def original_vit_arrays(*, width: int, depth: int, heads: int, mlp: int, patch: int, grid: int,
                        num_classes: int, classifier: str = "token", representation: int | None = None,
                        channels: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
  """Random arrays under the original ViT names (``Transformer/encoderblock_{i}/...``).

  Scales keep activations O(1) through the blocks (weights ~ 1/sqrt(fan-in), norm scales near
  1), so logits are far from zero and parity checks mean something.
  """
  rng = np.random.default_rng(seed)

  def normal(shape, fan_in):
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

  def small(shape):
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)

  def norm(prefix, out):
    out[f"{prefix}/scale"] = (1.0 + small((width,))).astype(np.float32)
    out[f"{prefix}/bias"] = small((width,))

  hd = width // heads
  a: dict[str, np.ndarray] = {}
  a["embedding/kernel"] = normal((patch, patch, channels, width), patch * patch * channels)
  a["embedding/bias"] = small((width,))
  tokens = grid * grid
  if classifier == "token":
    a["cls"] = small((1, 1, width))
    tokens += 1
  a["Transformer/posembed_input/pos_embedding"] = small((1, tokens, width))
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}"
    norm(f"{b}/LayerNorm_0", a)
    for name in ("query", "key", "value"):
      a[f"{b}/MultiHeadDotProductAttention_1/{name}/kernel"] = normal((width, heads, hd), width)
      a[f"{b}/MultiHeadDotProductAttention_1/{name}/bias"] = small((heads, hd))
    a[f"{b}/MultiHeadDotProductAttention_1/out/kernel"] = normal((heads, hd, width), width)
    a[f"{b}/MultiHeadDotProductAttention_1/out/bias"] = small((width,))
    norm(f"{b}/LayerNorm_2", a)
    a[f"{b}/MlpBlock_3/Dense_0/kernel"] = normal((width, mlp), width)
    a[f"{b}/MlpBlock_3/Dense_0/bias"] = small((mlp,))
    a[f"{b}/MlpBlock_3/Dense_1/kernel"] = normal((mlp, width), mlp)
    a[f"{b}/MlpBlock_3/Dense_1/bias"] = small((width,))
  norm("Transformer/encoder_norm", a)
  if classifier == "map":
    m = "MAPHead_0"
    a[f"{m}/probe"] = small((1, 1, width))
    for name in ("query", "key", "value"):
      a[f"{m}/MultiHeadDotProductAttention_0/{name}/kernel"] = normal((width, heads, hd), width)
      a[f"{m}/MultiHeadDotProductAttention_0/{name}/bias"] = small((heads, hd))
    a[f"{m}/MultiHeadDotProductAttention_0/out/kernel"] = normal((heads, hd, width), width)
    a[f"{m}/MultiHeadDotProductAttention_0/out/bias"] = small((width,))
    norm(f"{m}/LayerNorm_0", a)
    a[f"{m}/MlpBlock_0/Dense_0/kernel"] = normal((width, mlp), width)
    a[f"{m}/MlpBlock_0/Dense_0/bias"] = small((mlp,))
    a[f"{m}/MlpBlock_0/Dense_1/kernel"] = normal((mlp, width), mlp)
    a[f"{m}/MlpBlock_0/Dense_1/bias"] = small((width,))
  head_in = width
  if representation:
    a["pre_logits/kernel"] = normal((width, representation), width)
    a["pre_logits/bias"] = small((representation,))
    head_in = representation
  a["head/kernel"] = normal((head_in, num_classes), head_in)
  a["head/bias"] = small((num_classes,))
  return a


_BV_BLOCK_NAMES = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
                   "LayerNorm_0": "LayerNorm_0", "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}


def big_vision_arrays(original: dict[str, np.ndarray], *, scan: bool) -> dict[str, np.ndarray]:
  """The same weights in big_vision's layout: ``params/``, Linen block names, a top-level
  ``pos_embedding`` over the patches only (a class token's row is folded into ``cls``, as
  big_vision's ``fix_old_checkpoints`` does), and with ``scan`` one stacked block."""
  out: dict[str, np.ndarray] = {}
  blocks: dict[str, dict[int, np.ndarray]] = {}
  for key, value in original.items():
    parts = key.split("/")
    if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
      i = int(parts[1][len("encoderblock_"):])
      rest = "/".join([_BV_BLOCK_NAMES[parts[2]], *parts[3:]])
      if scan:
        blocks.setdefault(rest, {})[i] = value
      else:
        out[f"Transformer/encoderblock_{i}/{rest}"] = value
    elif key == "Transformer/posembed_input/pos_embedding":
      if "cls" in original:
        out["pos_embedding"] = value[:, 1:]
      else:
        out["pos_embedding"] = value
    elif key == "cls":
      out["cls"] = value + original["Transformer/posembed_input/pos_embedding"][:, :1]
    else:
      out[key] = value
  for rest, layers in blocks.items():
    out[f"Transformer/encoderblock/{rest}"] = np.stack([layers[i] for i in sorted(layers)])
  return {f"params/{k}": v for k, v in out.items()}


def write_npz(path, arrays: dict[str, np.ndarray]) -> str:
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return str(path)
