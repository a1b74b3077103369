"""DETR's set criterion over fixed-shape padded targets, as ``{term: (sum, weight)}``.

Each layer's queries are matched to the targets (``matching``), then:

* ``loss_ce``: cross-entropy over every query, the matched ones against their target's label,
  the others against the no-object class (the last logit), weighted 1 per class and
  ``eos_coef`` for no-object: ``(sum of w * ce, sum of w)``, HF's weighted mean.
* ``loss_bbox``: L1 over the matched (cx, cy, w, h) pairs, ``loss_giou``: ``1 - GIoU`` over
  them; both ``(sum over matched pairs, number of target boxes)``, so the trainer's global
  ``sum / weight`` divides by the target boxes of every device and host (0 when there are none,
  as HF's clamp of the count to 1 gives).
* ``cardinality_error``: |predicted objects - target boxes| per image, a metric (no objective
  coefficient, no gradient).

With ``aux_logits``/``aux_boxes`` in the outputs every decoder layer is matched again and its
terms carry the layer's index: ``loss_ce_0``, ``loss_bbox_0``, ... (HF's names).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.detection import boxes as box_ops
from vit_jax.detection import matching

LossTerms = dict[str, tuple[jax.Array, jax.Array]]
TERMS = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")


@dataclasses.dataclass(frozen=True)
class SetLossConfig:
  """Coefficients of the matching cost and of the loss (DETR's and HF's defaults)."""
  class_cost: float = 1.0
  bbox_cost: float = 5.0
  giou_cost: float = 2.0
  ce_loss_coef: float = 1.0
  bbox_loss_coef: float = 5.0
  giou_loss_coef: float = 2.0
  eos_coef: float = 0.1  # the no-object class's weight in the cross-entropy
  matcher: str = "jax"  # one of matching.METHODS
  aux_loss: bool = True  # add the terms of the decoder's other layers when the model gives them

  def __post_init__(self):
    if self.matcher not in matching.METHODS:
      raise ValueError(f"matcher {self.matcher!r} is not one of {matching.METHODS}")
    if self.class_cost == 0 and self.bbox_cost == 0 and self.giou_cost == 0:
      raise ValueError("class_cost, bbox_cost and giou_cost are all 0: the matching needs a cost")
    if self.eos_coef < 0:
      raise ValueError(f"eos_coef must be >= 0, got {self.eos_coef}")


def objective(config: SetLossConfig, num_aux_layers: int = 0) -> dict[str, float]:
  """The training objective's coefficient per term (the task's ``objective``), with
  ``num_aux_layers`` auxiliary decoder layers (DETR: decoder layers - 1; YOLOS: 0)."""
  coefs = {"loss_ce": config.ce_loss_coef, "loss_bbox": config.bbox_loss_coef,
           "loss_giou": config.giou_loss_coef}
  out = dict(coefs)
  if config.aux_loss:
    for i in range(num_aux_layers):
      out.update({f"{k}_{i}": c for k, c in coefs.items()})
  return out


def check_labels(targets: Mapping[str, object], num_classes: int) -> None:
  """Raises a ValueError if a valid box's label is outside ``[0, num_classes)``. Host side, on
  concrete arrays (numpy or jax): call it on every host batch."""
  labels = np.asarray(targets["labels"])
  mask = np.asarray(targets["box_mask"]).astype(bool)
  if labels.shape != mask.shape:
    raise ValueError(f"targets' labels {labels.shape} and box_mask {mask.shape} differ in shape")
  labels = labels[mask]
  if labels.size and (labels.max() >= num_classes or labels.min() < 0):
    raise ValueError(
        f"target labels must lie in [0, {num_classes}) with num_classes={num_classes} (the "
        f"no-object class {num_classes} is not a target label); found labels from "
        f"{labels.min()} to {labels.max()} (largest id {labels.max()})")


def _is_concrete(*arrays) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _layers(outputs: Mapping[str, jax.Array], config: SetLossConfig) -> tuple[jax.Array, jax.Array]:
  """Logits [L, B, Q, C+1] and boxes [L, B, Q, 4]: the final layer first, then the aux ones."""
  logits, boxes = outputs["logits"][None], outputs["boxes"][None]
  has_aux = "aux_logits" in outputs or "aux_boxes" in outputs
  if has_aux and config.aux_loss:
    if "aux_logits" not in outputs or "aux_boxes" not in outputs:
      raise ValueError("outputs have one of aux_logits and aux_boxes but not the other")
    logits = jnp.concatenate([logits, outputs["aux_logits"]])
    boxes = jnp.concatenate([boxes, outputs["aux_boxes"]])
  return logits.astype(jnp.float32), boxes.astype(jnp.float32)


def match_layers(logits: jax.Array, boxes: jax.Array, targets: Mapping[str, jax.Array],
                 config: SetLossConfig) -> jax.Array:
  """The query matched to each target in every layer: ``logits [L, B, Q, C+1]``,
  ``boxes [L, B, Q, 4]`` -> ``[L, B, M]`` (-1 for padded targets)."""
  num_layers, batch, queries = logits.shape[:3]
  lead = (num_layers,) + targets["labels"].shape
  labels = jnp.broadcast_to(targets["labels"], lead)
  target_boxes = jnp.broadcast_to(targets["boxes"], lead + (4,))
  valid = jnp.broadcast_to(targets["box_mask"].astype(bool), lead)
  cost = matching.matching_cost(logits, boxes, labels, target_boxes, valid,
                                class_cost=config.class_cost, bbox_cost=config.bbox_cost,
                                giou_cost=config.giou_cost)
  flat = lambda x: x.reshape((num_layers * batch,) + x.shape[2:])
  indices = matching.match(flat(cost), flat(valid), config.matcher)
  return indices.reshape(lead)


def set_loss(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
             config: SetLossConfig = SetLossConfig()) -> LossTerms:
  """The set criterion's terms ``{name: (sum, weight)}`` (see the module docstring).

  ``outputs``: ``logits [B, Q, C+1]``, ``boxes [B, Q, 4]`` (cxcywh), optionally ``aux_logits
  [L-1, B, Q, C+1]`` and ``aux_boxes [L-1, B, Q, 4]``; ``targets``: ``labels [B, M]``,
  ``boxes [B, M, 4]``, ``box_mask [B, M]``. Labels are checked when the targets are concrete.
  """
  num_classes = outputs["logits"].shape[-1] - 1
  if _is_concrete(targets["labels"], targets["box_mask"]):
    check_labels(targets, num_classes)
  logits, boxes = _layers(outputs, config)
  queries = logits.shape[2]
  indices = jax.lax.stop_gradient(match_layers(logits, boxes, targets, config))  # [L, B, M]
  valid = targets["box_mask"].astype(bool)
  labels = jnp.clip(targets["labels"].astype(jnp.int32), 0, num_classes)

  # Classification: each query's class is its matched target's label, else no-object.
  assigned = (indices[..., None] == jnp.arange(queries)) & valid[..., None]  # [L, B, M, Q]
  matched = jnp.any(assigned, axis=-2)
  query_label = jnp.sum(jnp.where(assigned, labels[..., None], 0), axis=-2)
  query_class = jnp.where(matched, query_label, num_classes)  # [L, B, Q]
  class_weight = jnp.ones(num_classes + 1, jnp.float32).at[num_classes].set(config.eos_coef)
  weight = class_weight[query_class]
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(log_prob, query_class[..., None], axis=-1)[..., 0]
  ce_sum = jnp.sum(weight * ce, axis=(1, 2))
  ce_weight = jnp.sum(weight, axis=(1, 2))

  # Boxes of the matched pairs, in target order.
  matched_boxes = jnp.take_along_axis(boxes, jnp.maximum(indices, 0)[..., None], axis=2)
  matched_boxes = box_ops.finite_boxes(matched_boxes)
  target_boxes = box_ops.finite_boxes(targets["boxes"].astype(jnp.float32))
  l1 = jnp.sum(jnp.abs(matched_boxes - target_boxes), axis=-1)
  giou = box_ops.paired_generalized_box_iou(box_ops.cxcywh_to_xyxy(matched_boxes),
                                            box_ops.cxcywh_to_xyxy(target_boxes))
  l1_sum = jnp.sum(jnp.where(valid, l1, 0.0), axis=(1, 2))
  giou_sum = jnp.sum(jnp.where(valid, 1.0 - giou, 0.0), axis=(1, 2))
  num_boxes = jnp.sum(valid).astype(jnp.float32)

  predicted_objects = jnp.sum(jnp.argmax(logits, axis=-1) != num_classes, axis=-1)  # [L, B]
  card_sum = jnp.sum(jnp.abs(predicted_objects - jnp.sum(valid, axis=-1)), axis=-1)
  card_sum = jax.lax.stop_gradient(card_sum.astype(jnp.float32))
  batch = jnp.float32(logits.shape[1])

  terms: LossTerms = {}
  for layer in range(logits.shape[0]):
    suffix = "" if layer == 0 else f"_{layer - 1}"
    terms[f"loss_ce{suffix}"] = (ce_sum[layer], jax.lax.stop_gradient(ce_weight[layer]))
    terms[f"loss_bbox{suffix}"] = (l1_sum[layer], num_boxes)
    terms[f"loss_giou{suffix}"] = (giou_sum[layer], num_boxes)
    terms[f"cardinality_error{suffix}"] = (card_sum[layer], batch)
  return terms
