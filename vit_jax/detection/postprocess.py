"""Detections from a detector's outputs, as HF's ``post_process_object_detection`` (no NMS)."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.detection import boxes as box_ops


def postprocess(outputs: Mapping[str, jax.Array], image_sizes: jax.Array) -> dict[str, jax.Array]:
  """Every query's best object class, its probability and its box in pixels. Jittable.

  ``outputs``: ``logits [B, Q, C+1]`` (last class: no object), ``boxes [B, Q, 4]`` normalised
  cxcywh; ``image_sizes [B, 2]`` (height, width). Returns ``scores [B, Q]`` (softmax over all
  classes, the best object class's probability), ``labels [B, Q]`` int32 and ``boxes [B, Q, 4]``
  pixel (x0, y0, x1, y1).
  """
  prob = jax.nn.softmax(outputs["logits"].astype(jnp.float32), axis=-1)[..., :-1]
  image_sizes = jnp.asarray(image_sizes, jnp.float32)
  height, width = image_sizes[:, 0], image_sizes[:, 1]
  scale = jnp.stack([width, height, width, height], axis=-1)[:, None, :]
  boxes = box_ops.cxcywh_to_xyxy(outputs["boxes"].astype(jnp.float32)) * scale
  return {"scores": jnp.max(prob, axis=-1), "labels": jnp.argmax(prob, axis=-1).astype(jnp.int32),
          "boxes": boxes}


def select_detections(detections: Mapping[str, object],
                      threshold: float = 0.5) -> list[dict[str, np.ndarray]]:
  """Host side: per image, the detections scoring above ``threshold``, as numpy
  ``{"scores", "labels", "boxes"}`` (HF's list of dicts)."""
  scores = np.asarray(detections["scores"])
  labels, boxes = np.asarray(detections["labels"]), np.asarray(detections["boxes"])
  keep = scores > threshold
  return [{"scores": scores[b][keep[b]], "labels": labels[b][keep[b]], "boxes": boxes[b][keep[b]]}
          for b in range(scores.shape[0])]
