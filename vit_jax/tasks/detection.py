"""Object detection with set-prediction models (YOLOS, DETR): the set loss, COCO evaluation.

Batches have fixed shapes, so the step compiles once (or once per shape bucket,
``detection.buckets``: vit_jax/data/buckets.py): ``image`` [B, H, W, C] padded to the canvas,
``pixel_mask`` [B, H, W], up to ``detection.max_boxes`` targets per image (``boxes``
normalised cxcywh relative to the unpadded image, ``labels``, ``box_mask``), and for evaluation
each image's ``image_id``, ``orig_size`` and ``is_crowd`` (the preprocessing ops of
vit_jax/data/detection_ops.py make them). The loss is DETR's set criterion
(vit_jax/detection/set_loss.py) with the auxiliary decoder layers' terms where the model has
them; evaluation is COCO's (pycocotools), on the host, every image once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from vit_jax import models
from vit_jax.detection import boxes as box_ops
from vit_jax.detection import coco_eval
from vit_jax.detection.postprocess import postprocess
from vit_jax.detection.set_loss import SetLossConfig, check_labels, objective, set_loss
from vit_jax.models.patches import image_hw
from vit_jax.tasks.base import LossTerms, model_kwargs, register

# Batch entries the model and the loss take; the rest (image ids, sizes) serve evaluation.
TRAIN_KEYS = ("image", "pixel_mask", "boxes", "labels", "box_mask")
EVAL_KEYS = TRAIN_KEYS + ("image_id", "orig_size", "is_crowd")
LOSS_OPTIONS = ("class_cost", "bbox_cost", "giou_cost", "ce_loss_coef", "bbox_loss_coef",
                "giou_loss_coef", "eos_coef", "matcher", "aux_loss")


def canvas(config: Any) -> tuple[int, int]:
  """The (height, width) the model is built for (YOLOS' position embeddings) and, without shape
  buckets, every batch is padded to: ``detection.canvas``, else ``image_size``."""
  return image_hw(tuple(config.detection.canvas) if config.detection.canvas else config.image_size)


def canvases(config: Any) -> list[tuple[int, int]]:
  """Every (height, width) a batch may have: the shape buckets' (``detection.buckets``), else the
  one ``canvas``."""
  return [image_hw(tuple(b)) for b in config.detection.buckets] or [canvas(config)]


def gather_bucket_counts(local: np.ndarray) -> np.ndarray:
  """Every process's bucket counts [local shards, buckets], stacked in process order (its shards'
  order) to [shards, buckets]."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = np.asarray(multihost_utils.process_allgather(np.asarray(local, np.int32)))
  return counts.reshape(-1, counts.shape[-1])


def shape_buckets(config: Any, spec: str) -> Any:
  """The data pipeline's ``Buckets`` for ``detection.buckets`` with preprocessing ``spec`` (its
  ``det_pad`` set to each bucket's canvas), or None without buckets."""
  if not config.detection.buckets:
    return None
  from vit_jax.data import buckets, detection_ops  # pylint: disable=g-import-not-at-top
  sizes = canvases(config)
  return buckets.Buckets(assign=functools.partial(buckets.best_canvas, canvases=sizes),
                         pps=tuple(detection_ops.with_pad_size(spec, size) for size in sizes),
                         gather_counts=gather_bucket_counts if jax.process_count() > 1 else None)


def report_dropped(batches: Iterator[dict], max_boxes: int, num_classes: int) -> Iterator[dict]:
  """Checks each host batch's labels and says (as a warning, with running counts) when images
  held more boxes than ``max_boxes``; yields the batches without ``boxes_dropped``."""
  dropped = images = 0
  for batch in batches:
    batch = dict(batch)
    check_labels(batch, num_classes)
    counts = np.asarray(batch.pop("boxes_dropped", 0))
    if counts.any():
      dropped += int(counts.sum())
      images += int(np.count_nonzero(counts))
      logging.warning("dropped %d boxes beyond max_boxes=%d in %d images so far; raise "
                      "detection.max_boxes to keep them", dropped, max_boxes, images)
    yield batch


class Detection:
  """Set-prediction object detection with any registered detector (YOLOS-*, DETR-*)."""

  def __init__(self, config: Any):
    self.config = config
    d = config.detection
    self.loss_config = SetLossConfig(**{k: d[k] for k in LOSS_OPTIONS})
    abstract = nnx.eval_shape(lambda: self.build_model(nnx.Rngs(0)))
    aux_layers = getattr(abstract.config, "decoder_layers", 1) - 1
    self.objective = objective(self.loss_config, aux_layers)
    queries = getattr(abstract.config, "num_queries", None) or abstract.config.num_det_tokens
    for bucket in d.buckets:
      if not (isinstance(bucket, (tuple, list)) and len(bucket) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in bucket)):
        raise ValueError(f"detection.buckets {d.buckets!r}: each bucket is a (height, width) canvas of "
                         f"positive ints, e.g. ((800, 1088), (1088, 800)); {bucket!r} is not")
    if d.max_boxes > queries:
      raise ValueError(f"detection.max_boxes {d.max_boxes} exceeds the model's {queries} "
                       f"queries: each target box needs a query of its own")

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    c = self.config
    return models.create(c.model.name, num_classes=c.num_classes, image_size=canvas(c),
                         rngs=rngs, **model_kwargs(c))

  def signature(self) -> dict:
    c = self.config
    return {"task": "detection", "model": c.model.name, "num_classes": c.num_classes,
            "canvas": list(canvas(c)), "options": dict(sorted(model_kwargs(c).items()))}

  def load_pretrained(self, model: nnx.Module, path: str, *, format: str = "auto",  # pylint: disable=redefined-builtin
                      resample_posemb: str = "zoom", load=(".*",), init=()) -> None:
    """``config.pretrained`` into the detector: a YOLOS from a YOLOS checkpoint of any grid or
    from a ViT classifier (``yolos_names.load_from_classifier``), a DETR from a DETR checkpoint
    (``checkpoints.load_pretrained``)."""
    from vit_jax import checkpoints  # pylint: disable=g-import-not-at-top
    from vit_jax.checkpoints import yolos_names  # pylint: disable=g-import-not-at-top
    del resample_posemb  # YOLOS resamples with PyTorch's bicubic, as the original does
    if not isinstance(model, yolos_names.YOLOS):
      checkpoints.load_pretrained(model, path, format=format, load=load, init=init)
      return
    classifier = yolos_names.read_classifier(path)
    if classifier:
      yolos_names.load_from_classifier(model, path, classifier)
    else:
      yolos_names.load_yolos(model, path, format=format, load=load, init=init)

  def _forward(self, model: nnx.Module, batch: dict, train: bool, rng: jax.Array | None = None):
    rngs = nnx.Rngs(dropout=rng) if rng is not None else None
    return model(batch["image"], pixel_mask=batch.get("pixel_mask"), train=train, rngs=rngs)

  def loss(self, model: nnx.Module, batch: dict, rng: jax.Array, train: bool) -> LossTerms:
    outputs = self._forward(model, batch, train, rng)
    return set_loss(outputs, {k: batch[k] for k in ("labels", "boxes", "box_mask")},
                    self.loss_config)

  def eval_outputs(self, model: nnx.Module, batch: dict) -> dict:
    """Detections and ground truth in the original image's pixels, with the image ids."""
    return evaluation_outputs(self._forward(model, batch, False), batch)


  @functools.cached_property
  def _classes(self) -> tuple[list[str], list[int] | None]:
    from vit_jax import data
    info = data.dataset_info(self.config.dataset, self.config.data_dir)
    names = info.class_names or [str(i) for i in range(self.config.num_classes)]
    if len(names) != self.config.num_classes:
      raise ValueError(f"dataset {self.config.dataset!r} has {len(names)} classes, the config's "
                       f"num_classes is {self.config.num_classes}")
    return list(names), getattr(info, "category_ids", None)

  def evaluator(self) -> coco_eval.CocoEvaluator:
    names, ids = self._classes
    return coco_eval.CocoEvaluator(names, ids)

  def format_metrics(self, metrics: Mapping[str, Any]) -> str:
    return (f"AP {metrics['AP']:.4f}, AP50 {metrics['AP50']:.4f}, AP75 {metrics['AP75']:.4f} "
            f"on {metrics['images']} images")

  def table(self, metrics: Mapping[str, Any]) -> str:
    """pycocotools' 12-line summary."""
    return coco_eval.format_table(metrics)

  def input_spec(self, batch_size: int) -> dict:
    """The largest batch (of the shape buckets' canvases, the one of most pixels)."""
    return max(self.input_specs(batch_size), key=lambda s: math.prod(s["image"].shape))

  def input_specs(self, batch_size: int) -> list[dict]:
    return [self._input_spec(batch_size, size) for size in canvases(self.config)]

  def data_order(self) -> dict:
    """The shape buckets: they decide which images share a batch."""
    buckets = self.config.detection.buckets
    return {"shape_buckets": [list(b) for b in canvases(self.config)] if buckets else []}

  def _input_spec(self, batch_size: int, size: tuple[int, int]) -> dict:
    c = self.config
    h, w = size
    m = c.detection.max_boxes
    channels = c.model.get("channels") or 3
    f32 = jnp.float32
    return {"image": jax.ShapeDtypeStruct((batch_size, h, w, channels), f32),
            "pixel_mask": jax.ShapeDtypeStruct((batch_size, h, w), f32),
            "boxes": jax.ShapeDtypeStruct((batch_size, m, 4), f32),
            "labels": jax.ShapeDtypeStruct((batch_size, m), jnp.int32),
            "box_mask": jax.ShapeDtypeStruct((batch_size, m), f32)}

  def train_data(self, start_step: int) -> Iterator[dict]:
    from vit_jax import data
    c = self.config
    batches = data.train_batches(dataset=c.dataset, split=c.train_split, pp=c.pp_train,
                                 batch_size=c.batch_size, seed=c.seed, start_step=start_step,
                                 data_dir=c.data_dir, shuffle_buffer=c.shuffle_buffer,
                                 num_shards=c.num_data_shards or None,
                                 buckets=shape_buckets(c, c.pp_train))
    return report_dropped(batches, c.detection.max_boxes, c.num_classes)

  def eval_data(self, split: str | None = None) -> Iterator[dict]:
    from vit_jax import data
    c = self.config
    batches = data.eval_batches(dataset=c.dataset, split=split or c.eval_split, pp=c.pp_eval,
                                batch_size=c.eval_batch_size, data_dir=c.data_dir,
                                num_shards=c.num_data_shards or None,
                                buckets=shape_buckets(c, c.pp_eval))
    return report_dropped(batches, c.detection.max_boxes, c.num_classes)


def evaluation_outputs(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict:
  """What the COCO evaluator takes (``CocoEvaluator.update``) from any detector's ``logits`` and
  ``boxes`` on an evaluation batch: detections and ground truth in the original image's pixels,
  with the image ids. Also serves outputs of other implementations (bench/compare_detection.py)."""
  detections = postprocess(outputs, batch["orig_size"])
  size = jnp.asarray(batch["orig_size"]).astype(jnp.float32)
  scale = jnp.stack([size[:, 1], size[:, 0], size[:, 1], size[:, 0]], axis=-1)[:, None]
  gt = box_ops.cxcywh_to_xyxy(jnp.asarray(batch["boxes"]).astype(jnp.float32)) * scale
  return {**detections, "gt_boxes": gt, "gt_labels": batch["labels"],
          "box_mask": batch["box_mask"], "is_crowd": batch["is_crowd"],
          "image_id": batch["image_id"], "orig_size": batch["orig_size"],
          "example_mask": batch["mask"]}


register("detection", Detection)
