"""The detection papers' attention figures, from captured weights.

* DETR (Carion et al. 2020, Fig. 6): the last decoder layer's cross-attention of each query over
  the encoder's feature grid (head mean), shown for the confident queries with their boxes;
  and (Fig. 3) the last encoder layer's self-attention of the cell under a reference pixel.
* YOLOS (Fang et al. 2021, Fig. 6): the last layer's attention of each det token over the
  patches, per head and head mean.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.attention_maps import capture as capture_lib


def _last(weights: Mapping[str, Any], prefix: str, suffix: str) -> Any:
  return capture_lib.select_layers(weights, prefix, suffix)[-1]


def detr_cross_attention(weights: Mapping[str, Any], lay: capture_lib.Layout) -> np.ndarray:
  """[B, queries, rows, cols]: the last decoder layer's cross-attention (head mean)."""
  w = np.asarray(_last(weights, "decoder/layers", "multihead_attn"), np.float64).mean(axis=1)
  return w.reshape(w.shape[0], w.shape[1], *lay.grid)


def detr_encoder_attention(weights: Mapping[str, Any], lay: capture_lib.Layout,
                           pixel: tuple[int, int]) -> np.ndarray:
  """[B, rows, cols]: the last encoder layer's self-attention (head mean) of the feature cell
  under ``pixel`` (y, x) of the input."""
  rows, cols = lay.grid
  y, x = pixel
  r, c = int(y) // lay.patch_size, int(x) // lay.patch_size
  if not (0 <= r < rows and 0 <= c < cols):
    raise ValueError(f"reference pixel {pixel} lies outside the {rows * lay.patch_size} x "
                     f"{cols * lay.patch_size} pixels the feature grid covers")
  w = np.asarray(_last(weights, *lay.layers), np.float64).mean(axis=1)
  return w[:, r * cols + c].reshape(w.shape[0], rows, cols)


def yolos_det_attention(weights: Mapping[str, Any], lay: capture_lib.Layout) -> np.ndarray:
  """[B, heads, det_tokens, rows, cols]: the last layer's attention of each det token over the
  patches (take ``.mean(axis=1)`` for the head mean)."""
  w = np.asarray(_last(weights, *lay.layers), np.float64)
  rows, cols = lay.grid
  start = lay.prefix + rows * cols
  det = w[:, :, start:start + lay.suffix, lay.prefix:start]
  return det.reshape(w.shape[0], w.shape[1], lay.suffix, rows, cols)


def confident_queries(outputs: Mapping[str, Any], threshold: float = 0.5) -> list[np.ndarray]:
  """Per image, the indices of the queries whose best object class scores above ``threshold``
  (softmax over the classes and "no object", as the post-processing)."""
  prob = jax.nn.softmax(jnp.asarray(outputs["logits"], jnp.float32), axis=-1)[..., :-1]
  best = np.asarray(jnp.max(prob, axis=-1))
  return [np.nonzero(best[b] > threshold)[0] for b in range(best.shape[0])]
