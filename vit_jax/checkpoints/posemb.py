"""Resampling a learned position-embedding grid to another resolution.

``method``:
  * ``"zoom"`` (default): ``scipy.ndimage.zoom(grid, order=1)``, linear with the corner
    positions aligned, exactly what the original ViT and big_vision code do;
  * ``"bilinear"``: linear with half-pixel centres and no antialiasing, as PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` (timm's npz reader uses this);
  * ``"bicubic"``: cubic convolution (a = -0.75) with half-pixel centres and clamped borders,
    as PyTorch's ``F.interpolate(mode="bicubic", align_corners=False)`` without antialiasing.

Class-token rows (the "prefix" tokens before the grid) are never resampled: they are kept,
dropped when the target has none, or added as zeros when the source had none (a model that
added no position embedding to its class token is the same function with a zero row).
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("zoom", "bilinear", "bicubic")


def split_tokens(num_tokens: int) -> tuple[int, int]:
  """Tokens -> (prefix tokens, grid side): 196 -> (0, 14), 197 -> (1, 14)."""
  for prefix in (0, 1):
    side = math.isqrt(max(num_tokens - prefix, 0))
    if side > 0 and side * side == num_tokens - prefix:
      return prefix, side
  raise ValueError(f"{num_tokens} position embeddings are neither a square grid nor a square "
                   "grid plus one class token")


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
  scale = n_in / n_out
  src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  w = np.zeros((n_out, n_in))
  np.add.at(w, (np.arange(n_out), i0), 1.0 - frac)
  np.add.at(w, (np.arange(n_out), i1), frac)
  return w


def _cubic_weights(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  def kernel(x):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
  scale = n_in / n_out
  src = (np.arange(n_out) + 0.5) * scale - 0.5
  base = np.floor(src).astype(int)
  t = src - base
  w = np.zeros((n_out, n_in))
  for tap in range(-1, 3):
    idx = np.clip(base + tap, 0, n_in - 1)
    np.add.at(w, (np.arange(n_out), idx), kernel(t - tap))
  return w


def resample_grid(grid: np.ndarray, side: int, method: str = "zoom") -> np.ndarray:
  """[old, old, D] -> [side, side, D]."""
  if method not in METHODS:
    raise ValueError(f"resample_posemb {method!r} is not one of {METHODS}")
  old = grid.shape[0]
  if old == side:
    return grid
  if method == "zoom":
    import scipy.ndimage  # pylint: disable=g-import-not-at-top
    return scipy.ndimage.zoom(grid, (side / old, side / old, 1), order=1)
  w = (_linear_weights if method == "bilinear" else _cubic_weights)(old, side)
  out = np.einsum("ij,jkd,lk->ild", w, grid.astype(np.float64), w)
  return out.astype(grid.dtype)


def resample_posemb(posemb: np.ndarray, num_tokens: int, method: str = "zoom") -> np.ndarray:
  """[1, N, D] -> [1, num_tokens, D]: the grid resampled, class-token rows kept apart."""
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"position embeddings must have shape [1, tokens, width], got {posemb.shape}")
  if posemb.shape[1] == num_tokens:
    return posemb
  old_prefix, old_side = split_tokens(posemb.shape[1])
  new_prefix, new_side = split_tokens(num_tokens)
  prefix, grid = posemb[:, :old_prefix], posemb[0, old_prefix:]
  grid = resample_grid(grid.reshape(old_side, old_side, -1), new_side, method)
  grid = grid.reshape(1, new_side * new_side, -1)
  if new_prefix < old_prefix:
    prefix = prefix[:, :new_prefix]
  elif new_prefix > old_prefix:
    prefix = np.concatenate([prefix, np.zeros((1, new_prefix - old_prefix, posemb.shape[2]),
                                              posemb.dtype)], axis=1)
  return np.concatenate([prefix, grid], axis=1)
