"""The PNGs of visualize.py, drawn with matplotlib (Agg, no display needed) from numpy arrays."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def upsample(grid_map: np.ndarray, height: int, width: int) -> np.ndarray:
  """A [rows, cols] map stretched to [height, width] by nearest cells (no smoothing)."""
  rows, cols = grid_map.shape
  r = np.minimum((np.arange(height) * rows) // max(height, 1), rows - 1)
  c = np.minimum((np.arange(width) * cols) // max(width, 1), cols - 1)
  return grid_map[r][:, c]


def _show_image(ax, image: np.ndarray) -> None:
  if image.ndim == 3 and image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray")
  else:
    ax.imshow(image)
  ax.set_axis_off()


def _overlay(ax, image: np.ndarray, grid_map: np.ndarray, title: str,
             extent: tuple[int, int] | None = None) -> None:
  """``grid_map`` over the part of ``image`` its grid covers (``extent``: height, width)."""
  _show_image(ax, image)
  h, w = extent or image.shape[:2]
  m = grid_map / max(float(grid_map.max()), 1e-12)
  ax.imshow(upsample(m, h, w), cmap="jet", alpha=0.5, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
  ax.set_xlim(-0.5, image.shape[1] - 0.5)
  ax.set_ylim(image.shape[0] - 0.5, -0.5)
  ax.set_title(title, fontsize=8)


def overlays(path: str, image: np.ndarray, maps: Sequence[tuple[str, np.ndarray]],
             extent: tuple[int, int] | None = None) -> None:
  """The image, then each (title, [rows, cols] map) laid over it."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3 * (1 + len(maps)), 3.2))
  axes = np.atleast_1d(axes)
  _show_image(axes[0], image)
  axes[0].set_title("input", fontsize=8)
  for ax, (title, m) in zip(axes[1:], maps):
    _overlay(ax, image, m, title, extent)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def layer_head_grid(path: str, maps: np.ndarray, title: str,
                    row_labels: Sequence[str] | None = None) -> None:
  """[layers, heads, rows, cols] maps as a grid: one row per layer (or per ``row_labels``), one
  column per head."""
  plt = _pyplot()
  layers, heads = maps.shape[:2]
  fig, axes = plt.subplots(layers, heads, figsize=(1.3 * heads + 0.6, 1.3 * layers + 0.6),
                           squeeze=False)
  for i in range(layers):
    for j in range(heads):
      ax = axes[i, j]
      ax.imshow(maps[i, j], cmap="viridis")
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(row_labels[i] if row_labels else f"layer {i}", fontsize=7)
      if i == 0:
        ax.set_title(f"head {j}", fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def filters(path: str, components_rgb: np.ndarray) -> None:
  """[count, p, p, channels] in [0, 1]: Figure 7 (left), 4 rows of 7 for 28."""
  plt = _pyplot()
  count = len(components_rgb)
  cols = 7 if count >= 7 else count
  rows = math.ceil(count / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
  for k, ax in enumerate(axes.ravel()):
    ax.set_axis_off()
    if k < count:
      c = components_rgb[k]
      ax.imshow(c[..., 0] if c.shape[-1] == 1 else c, cmap="gray" if c.shape[-1] == 1 else None)
  fig.suptitle("RGB embedding filters (first principal components)", fontsize=8)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def position_similarity(path: str, similarity: np.ndarray) -> None:
  """[rows, cols, rows, cols]: one tile per patch, its similarity with every position."""
  plt = _pyplot()
  rows, cols = similarity.shape[:2]
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.5 + 0.8, rows * 0.5 + 0.6), squeeze=False)
  for i in range(rows):
    for j in range(cols):
      axes[i, j].imshow(similarity[i, j], cmap="viridis", vmin=-1, vmax=1)
      axes[i, j].set_axis_off()
  fig.suptitle("Position embedding similarity", fontsize=8)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def attention_distance(path: str, distances: np.ndarray) -> None:
  """[layers, heads] mean attention distances in pixels against depth (Figure 7, right)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4, 3.2))
  layers, heads = distances.shape
  for h in range(heads):
    ax.scatter(np.arange(layers), distances[:, h], s=10, label=f"head {h}")
  ax.set_xticks(range(layers))
  ax.set_xlabel("network depth (layer)")
  ax.set_ylabel("mean attention distance (pixels)")
  if heads <= 16:
    ax.legend(fontsize=5, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def query_maps(path: str, image: np.ndarray, maps: Sequence[tuple[str, np.ndarray]],
               boxes: Sequence[np.ndarray | None], extent: tuple[int, int] | None = None) -> None:
  """One panel per query: its map over the image and its box (pixel x0, y0, x1, y1) drawn."""
  plt = _pyplot()
  n = max(len(maps), 1)
  fig, axes = plt.subplots(1, n + 1, figsize=(2.6 * (n + 1), 2.9), squeeze=False)
  _show_image(axes[0, 0], image)
  axes[0, 0].set_title("input", fontsize=8)
  for ax, (title, m), box in zip(axes[0, 1:], maps, boxes):
    _overlay(ax, image, m, title, extent)
    if box is not None:
      x0, y0, x1, y1 = box
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=1.5))
  for ax in axes[0, len(maps) + 1:]:
    ax.set_axis_off()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
