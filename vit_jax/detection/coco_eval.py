"""COCO evaluation with pycocotools: the 12 standard AP/AR figures, host side.

``CocoEvaluator`` is fed images and their detections (pixel boxes in the original image), builds
the ground truth as a COCO dataset in memory and runs ``COCOeval`` once at the end. Every image
must come exactly once: a repeated image id is an error (it would count its boxes twice).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np

# COCOeval.stats, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
STAT_LABELS = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def format_table(stats: Mapping[str, float]) -> str:
  """pycocotools' 12-line summary."""
  return "\n".join(f" {label} = {stats[name]:.3f}" for name, label in zip(STAT_NAMES, STAT_LABELS))


class CocoEvaluator:
  """Accumulates ground truth and detections; ``result()`` runs COCOeval (bbox).

  ``class_names[i]`` names label i; ``category_ids[i]`` is its id in results files (default i).
  """

  def __init__(self, class_names: Sequence[str], category_ids: Sequence[int] | None = None):
    self.class_names = list(class_names)
    self.category_ids = list(category_ids) if category_ids is not None else list(
        range(len(self.class_names)))
    if len(self.category_ids) != len(self.class_names):
      raise ValueError(f"{len(self.category_ids)} category ids for {len(self.class_names)} classes")
    self.images: dict[int, dict] = {}
    self.annotations: list[dict] = []
    self.detections: list[dict] = []

  def _category(self, labels: np.ndarray) -> list[int]:
    labels = np.asarray(labels, np.int64).reshape(-1)
    bad = labels[(labels < 0) | (labels >= len(self.class_names))]
    if bad.size:
      raise ValueError(f"label {int(bad[0])} is outside the {len(self.class_names)} classes")
    return [self.category_ids[int(l)] for l in labels]

  def add_image(self, image_id: int, height: float, width: float, boxes: np.ndarray,
                labels: np.ndarray, is_crowd: np.ndarray | None = None) -> None:
    """One image and its ground-truth pixel boxes (x0, y0, x1, y1). Crowd boxes are COCO's
    ignore regions (``iscrowd=1``)."""
    image_id = int(image_id)
    if image_id in self.images:
      raise ValueError(f"image {image_id} was evaluated twice: every image must come exactly once")
    self.images[image_id] = {"id": image_id, "height": float(height), "width": float(width)}
    xywh = xyxy_to_xywh(boxes)
    crowd = np.zeros(len(xywh), bool) if is_crowd is None else np.asarray(is_crowd, bool)
    for box, category, c in zip(xywh, self._category(labels), crowd):
      self.annotations.append({
          "id": len(self.annotations) + 1, "image_id": image_id, "category_id": category,
          "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": int(c)})

  def add_detections(self, image_id: int, boxes: np.ndarray, scores: np.ndarray,
                     labels: np.ndarray) -> None:
    """An image's detections: pixel boxes (x0, y0, x1, y1), scores and labels."""
    for box, score, category in zip(xyxy_to_xywh(boxes), np.asarray(scores).reshape(-1),
                                    self._category(labels)):
      self.detections.append({"image_id": int(image_id), "category_id": category,
                              "bbox": [float(v) for v in box], "score": float(score)})

  def update(self, outputs: Mapping[str, Any]) -> None:
    """A batch of the detection task's eval outputs (numpy, every process's examples):
    ``image_id [B]``, ``orig_size [B, 2]`` (height, width), ``example_mask [B]`` (0: padding),
    ground truth ``gt_boxes [B, M, 4]`` (pixel xyxy in the original image), ``gt_labels [B, M]``,
    ``box_mask [B, M]``, optional ``is_crowd [B, M]``, and the detections ``scores [B, Q]``,
    ``labels [B, Q]``, ``boxes [B, Q, 4]`` (pixel xyxy in the original image)."""
    o = {k: np.asarray(v) for k, v in outputs.items()}
    for b in np.nonzero(o["example_mask"] > 0)[0]:
      valid = o["box_mask"][b] > 0
      crowd = o["is_crowd"][b][valid] if "is_crowd" in o else None
      height, width = o["orig_size"][b]
      self.add_image(o["image_id"][b], height, width, o["gt_boxes"][b][valid],
                     o["gt_labels"][b][valid], crowd)
      self.add_detections(o["image_id"][b], o["boxes"][b], o["scores"][b], o["labels"][b])

  def results_json(self) -> list[dict]:
    """The detections in COCO results format (``image_id``, ``category_id``, ``bbox`` xywh,
    ``score``)."""
    return [dict(d, bbox=list(d["bbox"])) for d in self.detections]

  def ground_truth(self) -> dict:
    """The ground truth as a COCO dataset dict."""
    return {"images": list(self.images.values()), "annotations": list(self.annotations),
            "categories": [{"id": i, "name": n} for i, n in zip(self.category_ids, self.class_names)]}

  def result(self) -> dict[str, float]:
    """The 12 COCOeval figures (``AP`` is AP@[.5:.95]), plus ``images``; -1 where undefined
    (pycocotools' convention, e.g. no ground truth of that size)."""
    from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
    from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top

    if not self.images:
      raise ValueError("the evaluation saw no images")
    with contextlib.redirect_stdout(io.StringIO()):
      gt = COCO()
      gt.dataset = self.ground_truth()
      gt.createIndex()
      if self.detections:
        dt = gt.loadRes(self.results_json())  # a copy: loadRes adds keys to the dicts
        coco_eval = COCOeval(gt, dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        stats = [float(s) for s in coco_eval.stats]
      else:
        stats = [0.0] * len(STAT_NAMES)
    return {**dict(zip(STAT_NAMES, stats)), "images": len(self.images)}
