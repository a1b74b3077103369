"""COCO evaluation (vit_jax/detection/coco_eval.py) against pycocotools run directly."""

import contextlib
import io
import json

import numpy as np
import pytest

from vit_jax.detection.coco_eval import STAT_NAMES, CocoEvaluator, format_table

NAMES = ["cat", "dog", "bird"]
IDS = [1, 5, 9]


def random_images(n=12, seed=0):
  """(image_id, height, width, xyxy boxes, labels, crowd) with 0-5 boxes each."""
  rng = np.random.default_rng(seed)
  images = []
  for i in range(n):
    h, w = rng.integers(40, 120, size=2)
    k = int(rng.integers(0, 6))
    x0 = rng.uniform(0, w - 12, k)
    y0 = rng.uniform(0, h - 12, k)
    bw, bh = rng.uniform(4, 12, k), rng.uniform(4, 12, k)
    boxes = np.stack([x0, y0, x0 + bw, y0 + bh], 1) if k else np.zeros((0, 4))
    crowd = rng.random(k) < 0.15
    images.append((100 + i, float(h), float(w), boxes, rng.integers(0, 3, k), crowd))
  return images


def test_ground_truth_as_detections_scores_one():
  ev = CocoEvaluator(NAMES, IDS)
  for image_id, h, w, boxes, labels, _ in random_images():
    ev.add_image(image_id, h, w, boxes, labels)
    ev.add_detections(image_id, boxes, np.ones(len(boxes)), labels)
  r = ev.result()
  assert r["AP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0)
  assert r["AR100"] == pytest.approx(1.0) and r["images"] == 12
  assert "maxDets=100 ] = 1.000" in format_table(r)


def test_shifted_detections_equal_pycocotools_on_the_same_boxes(tmp_path):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  rng = np.random.default_rng(1)
  ev = CocoEvaluator(NAMES, IDS)
  gt = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in
                                                        zip(IDS, NAMES)]}
  results = []
  for image_id, h, w, boxes, labels, crowd in random_images():
    ev.add_image(image_id, h, w, boxes, labels, crowd)
    gt["images"].append({"id": image_id, "height": h, "width": w})
    for b, l, c in zip(boxes, labels, crowd):
      gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                "category_id": IDS[l], "iscrowd": int(c),
                                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                "area": (b[2] - b[0]) * (b[3] - b[1])})
    shifted = boxes + rng.normal(0, 1.5, boxes.shape)
    scores = rng.uniform(0.1, 1.0, len(boxes))
    labels_out = np.where(rng.random(len(boxes)) < 0.2, (labels + 1) % 3, labels)
    ev.add_detections(image_id, shifted, scores, labels_out)
    for b, s, l in zip(shifted, scores, labels_out):
      results.append({"image_id": image_id, "category_id": IDS[l], "score": s,
                      "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
  ours = ev.result()
  gt_file = tmp_path / "gt.json"
  gt_file.write_text(json.dumps(gt, default=float))
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(str(gt_file))
    direct = COCOeval(coco, coco.loadRes(json.loads(json.dumps(results, default=float))), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
  assert [ours[k] for k in STAT_NAMES] == pytest.approx(list(direct.stats), abs=1e-12)
  assert 0.2 < ours["AP50"] < 1.0
  assert ev.results_json()[0]["category_id"] in IDS


def test_an_image_twice_or_an_unknown_label_is_an_error():
  ev = CocoEvaluator(NAMES)
  ev.add_image(1, 10, 10, np.zeros((0, 4)), np.zeros(0))
  with pytest.raises(ValueError, match="image 1 was evaluated twice"):
    ev.add_image(1, 10, 10, np.zeros((0, 4)), np.zeros(0))
  with pytest.raises(ValueError, match="label 3 is outside the 3 classes"):
    ev.add_detections(1, np.ones((1, 4)), np.ones(1), np.array([3]))
  with pytest.raises(ValueError, match="saw no images"):
    CocoEvaluator(NAMES).result()
