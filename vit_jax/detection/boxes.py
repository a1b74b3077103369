"""Box formats and overlaps: (cx, cy, w, h) <-> (x0, y0, x1, y1), IoU and generalised IoU.

Unlike DETR's originals these never assert: degenerate boxes (zero or negative size) have area
0, every denominator is kept away from 0, and NaN/inf coordinates are read as 0, so values and
gradients stay finite whatever a diverging model predicts. On proper boxes they agree with the
originals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Smallest union (and enclosing) area divided by; below it boxes are sub-pixel specks anyway.
AREA_EPS = 1e-9


def finite_boxes(boxes: jax.Array) -> jax.Array:
  """``boxes`` with NaN and +-inf coordinates replaced by 0 (the gradient there is 0)."""
  return jnp.where(jnp.isfinite(boxes), boxes, jnp.zeros_like(boxes))


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """(cx, cy, w, h) -> (x0, y0, x1, y1) over the last axis."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """(x0, y0, x1, y1) -> (cx, cy, w, h) over the last axis."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
  """Area of xyxy boxes; 0 for an inverted or empty box."""
  boxes = finite_boxes(boxes)
  return (jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
          * jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0))


def _iou_and_giou(boxes1: jax.Array, boxes2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """IoU and GIoU of xyxy boxes, broadcasting over the leading axes."""
  boxes1, boxes2 = finite_boxes(boxes1), finite_boxes(boxes2)
  area1, area2 = box_area(boxes1), box_area(boxes2)
  overlap = (jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
             - jnp.maximum(boxes1[..., :2], boxes2[..., :2]))
  overlap = jnp.maximum(overlap, 0.0)
  inter = overlap[..., 0] * overlap[..., 1]
  union = area1 + area2 - inter
  iou = inter / jnp.maximum(union, AREA_EPS)
  hull = (jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
          - jnp.minimum(boxes1[..., :2], boxes2[..., :2]))
  hull = jnp.maximum(hull, 0.0)
  enclosing = hull[..., 0] * hull[..., 1]
  giou = iou - (enclosing - union) / jnp.maximum(enclosing, AREA_EPS)
  return iou, giou


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise IoU of xyxy boxes: ``[N, 4] x [M, 4] -> [N, M]``."""
  return _iou_and_giou(boxes1[:, None, :], boxes2[None, :, :])[0]


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise generalised IoU of xyxy boxes: ``[N, 4] x [M, 4] -> [N, M]``, in [-1, 1]."""
  return _iou_and_giou(boxes1[:, None, :], boxes2[None, :, :])[1]


def paired_generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Generalised IoU of corresponding xyxy boxes: ``[..., 4] x [..., 4] -> [...]`` (the
  diagonal of ``generalized_box_iou``, without the pairs)."""
  return _iou_and_giou(boxes1, boxes2)[1]
