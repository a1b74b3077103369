"""The ViT paper's Figure 7 analyses (Dosovitskiy et al. 2021), from a ViT's weights and attention.

* ``embedding_components``: the principal components of the patch-embedding filters (each of
  the ``hidden`` filters is one sample of ``patch * patch * channels`` values, centred; the
  right singular vectors of that matrix, largest first), each as a [patch, patch, channels]
  image; Figure 7 (left) shows the first 28 as RGB.
* ``position_similarity``: the cosine similarity of each patch's position embedding with every
  other patch's, [rows, cols, rows, cols] (Figure 7, centre: one tile per patch on the grid).
* ``mean_attention_distance``: per head, the distance in input pixels between query and key
  patch centres, weighted by the attention (re-normalised over the patch keys once the class and
  other non-patch tokens are left out), averaged over the query patches and the images
  (Figure 7, right: one dot per head against depth).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def embedding_components(kernel: Any, count: int = 28) -> np.ndarray:
  """[count, patch, patch, channels]: the first ``count`` principal components of the
  patch-embedding filters ``kernel`` [patch, patch, channels, hidden] (sign as the SVD gives)."""
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 4:
    raise ValueError(f"a patch-embedding kernel is [patch, patch, channels, hidden], got shape "
                     f"{kernel.shape}")
  ph, pw, c, d = kernel.shape
  filters = kernel.reshape(ph * pw * c, d).T  # [hidden, patch*patch*channels]
  filters = filters - filters.mean(axis=0, keepdims=True)
  _, _, vt = np.linalg.svd(filters, full_matrices=False)
  count = min(count, vt.shape[0])
  return vt[:count].reshape(count, ph, pw, c)


def as_rgb(components: np.ndarray) -> np.ndarray:
  """Each component scaled to [0, 1] on its own (min to 0, max to 1), for display."""
  lo = components.min(axis=tuple(range(1, components.ndim)), keepdims=True)
  hi = components.max(axis=tuple(range(1, components.ndim)), keepdims=True)
  return (components - lo) / np.maximum(hi - lo, 1e-12)


def position_similarity(posemb: Any, grid: tuple[int, int], prefix: int = 1) -> np.ndarray:
  """[rows, cols, rows, cols] cosine similarities of the grid's position embeddings; ``posemb``
  [(1,) prefix + rows*cols (+ more), hidden], the patch positions after ``prefix`` tokens."""
  posemb = np.asarray(posemb, np.float64)
  if posemb.ndim == 3:
    posemb = posemb[0]
  rows, cols = grid
  if posemb.shape[0] < prefix + rows * cols:
    raise ValueError(f"position embeddings of {posemb.shape[0]} tokens do not hold {prefix} "
                     f"prefix tokens and a {rows}x{cols} grid")
  cells = posemb[prefix:prefix + rows * cols]
  unit = cells / np.maximum(np.linalg.norm(cells, axis=-1, keepdims=True), 1e-12)
  return (unit @ unit.T).reshape(rows, cols, rows, cols)


def patch_distances(grid: tuple[int, int], patch_size: float) -> np.ndarray:
  """[rows*cols, rows*cols] Euclidean distances in pixels between patch centres."""
  rows, cols = grid
  yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  centres = np.stack([yy.ravel(), xx.ravel()], axis=-1).astype(np.float64) * patch_size
  return np.linalg.norm(centres[:, None] - centres[None], axis=-1)


def mean_attention_distance(weights: Any, grid: tuple[int, int], patch_size: float,
                            prefix: int = 1) -> np.ndarray:
  """[heads]: one layer's mean attention distance in pixels; ``weights`` [B, H, T, T] with the
  patch tokens at ``prefix : prefix + rows*cols`` (the rest left out)."""
  w = np.asarray(weights, np.float64)
  rows, cols = grid
  n = rows * cols
  w = w[:, :, prefix:prefix + n, prefix:prefix + n]
  if w.shape[-1] != n or w.shape[-2] != n:
    raise ValueError(f"attention over {weights.shape[-1]} tokens does not hold {prefix} prefix "
                     f"tokens and a {rows}x{cols} grid")
  w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-12)
  per_query = np.einsum("bhqk,qk->bhq", w, patch_distances(grid, patch_size))
  return per_query.mean(axis=(0, 2))


def attention_distances(layers: Sequence[Any], grid: tuple[int, int], patch_size: float,
                        prefix: int = 1) -> np.ndarray:
  """[layers, heads] mean attention distances (``mean_attention_distance`` per layer)."""
  return np.stack([mean_attention_distance(w, grid, patch_size, prefix) for w in layers])
