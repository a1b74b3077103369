"""Detection preprocessing ops: they move the boxes with the pixels.

They read and write the layout every detection source yields: ``image`` (HWC), ``image/id`` and
``objects`` = {``bbox`` [n, 4] float32 normalised (ymin, xmin, ymax, xmax), ``label`` [n],
``is_crowd`` [n]}. Boxes stay normalised to the image's content (resizing does not move them;
padding does not either: like DETR's and HF's, targets are relative to the unpadded image).
``det_pad_boxes`` ends a spec: it turns the objects into the fixed-shape targets of the set loss.

A typical training spec (DETR's augmentation on COCO, one 800x1344 canvas):

    decode|det_objects|det_flip_lr|det_select(0.5, "det_resize((480, 512, 800), 1333)",
    "det_resize((400, 500, 600))|det_random_size_crop(384, 600)|det_resize((480, 512, 800), 1333)")
    |value_range(-1, 1)|det_pad((800, 1344))|det_pad_boxes(100)
    |keep('image', 'pixel_mask', 'boxes', 'labels', 'box_mask', 'boxes_dropped')

Every op is stateless and seeded like the classification ops (vit_jax/data/preprocess_ops.py).
"""

from __future__ import annotations

from typing import Any

from vit_jax.data.preprocess_ops import (Example, Op, _check_method, _get, _size_hw, parse_call, parse_pp,
                                        register, split_spec)
from vit_jax.data.tf_runtime import import_tf

OBJECTS = "objects"


def _objects(example: Example, op: str) -> dict:
  objects = _get(example, OBJECTS, op)
  if not isinstance(objects, dict) or "bbox" not in objects or "label" not in objects:
    raise ValueError(f"{op}: example['objects'] must hold 'bbox' and 'label' (a detection dataset's "
                     f"objects), got {sorted(objects) if isinstance(objects, dict) else objects!r}")
  return objects


def _with_objects(example: Example, objects: dict, keep: Any = None) -> Example:
  tf = import_tf()
  if keep is not None:
    objects = {k: tf.boolean_mask(v, keep) for k, v in objects.items()}
  return {**example, OBJECTS: objects}


def _image_hw(tf: Any, image: Any) -> tuple[Any, Any]:
  shape = tf.shape(image)
  return shape[0], shape[1]


def _int_between(tf: Any, rng: Any, low: Any, high: Any) -> Any:
  """A uniform int32 in [low, high] (inclusive)."""
  return tf.random.stateless_uniform([], rng, minval=low, maxval=high + 1, dtype=tf.int32)


@register("det_objects")
def det_objects(drop_crowd: bool = True) -> Op:
  """Starts a detection spec: boxes clipped to the image, those of zero area dropped, crowd boxes
  dropped (``drop_crowd``, for training; evaluation keeps them as COCO's ignore regions), and
  ``orig_size`` (height, width) int32 and ``image_id`` int32 added."""

  def apply(example: Example, rng: Any) -> Example:
    del rng
    tf = import_tf()
    objects = dict(_objects(example, "det_objects"))
    box = tf.clip_by_value(tf.cast(objects["bbox"], tf.float32), 0.0, 1.0)
    n = tf.shape(box)[0]
    objects["bbox"] = box
    objects["label"] = tf.cast(objects["label"], tf.int32)
    crowd = objects.get("is_crowd")
    objects["is_crowd"] = tf.zeros([n], tf.bool) if crowd is None else tf.cast(crowd, tf.bool)
    objects = {k: objects[k] for k in ("bbox", "label", "is_crowd")}
    keep = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
    if drop_crowd:
      keep &= tf.logical_not(objects["is_crowd"])
    image = _get(example, "image", "det_objects")
    h, w = _image_hw(tf, image)
    out = {**example, "orig_size": tf.stack([h, w])}
    if "image/id" in example:
      out["image_id"] = tf.cast(example["image/id"], tf.int32)
    return _with_objects(out, objects, keep)

  return apply


@register("det_flip_lr")
def det_flip_lr(probability: float = 0.5) -> Op:
  """Flips the image and its boxes left-right with ``probability``."""

  def apply(example: Example, rng: Any) -> Example:
    tf = import_tf()
    objects = dict(_objects(example, "det_flip_lr"))
    flip = tf.random.stateless_uniform([], rng) < probability
    image = _get(example, "image", "det_flip_lr")
    box = objects["bbox"]
    flipped = tf.stack([box[:, 0], 1.0 - box[:, 3], box[:, 2], 1.0 - box[:, 1]], axis=1)
    objects["bbox"] = tf.where(flip, flipped, box)
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return _with_objects({**example, "image": image}, objects)

  return apply


def _sizes(sizes: Any, op: str) -> tuple[int, ...]:
  sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
  if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
    raise ValueError(f"{op}: sizes must be a positive int or a tuple of them, got {sizes!r}")
  return sizes


def resized_hw(tf: Any, h: Any, w: Any, size: Any, max_size: int | None) -> tuple[Any, Any]:
  """DETR's ``get_size_with_aspect_ratio``: the shorter side to ``size``, unless the longer one
  would then exceed ``max_size``; sizes truncated to ints as the original does."""
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  size = tf.cast(size, tf.float32)
  short, long = tf.minimum(hf, wf), tf.maximum(hf, wf)
  if max_size is not None:
    size = tf.where(long / short * size > max_size, tf.round(max_size * short / long), size)
  oh = tf.where(hf <= wf, size, tf.floor(size * hf / wf))
  ow = tf.where(hf <= wf, tf.floor(size * wf / hf), size)
  return tf.cast(oh, tf.int32), tf.cast(ow, tf.int32)


@register("det_resize")
def det_resize(sizes: Any, max_size: int | None = None, method: str = "bilinear",
               antialias: bool = False) -> Op:
  """Resizes the shorter side to one of ``sizes`` (chosen uniformly), capping the longer side at
  ``max_size`` (DETR's RandomResize). Normalised boxes do not move."""
  sizes = _sizes(sizes, "det_resize")
  _check_method(method, "det_resize")
  if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
    raise ValueError(f"det_resize: max_size must be a positive int or None, got {max_size!r}")

  def apply(example: Example, rng: Any) -> Example:
    tf = import_tf()
    image = _get(example, "image", "det_resize")
    size = tf.gather(tf.constant(sizes, tf.int32), _int_between(tf, rng, 0, len(sizes) - 1))
    h, w = _image_hw(tf, image)
    oh, ow = resized_hw(tf, h, w, size, max_size)
    dtype = image.dtype
    out = tf.image.resize(image, tf.stack([oh, ow]), method=method, antialias=antialias)
    if dtype.is_integer:
      out = tf.clip_by_value(tf.round(out), dtype.min, dtype.max)
    return {**example, "image": tf.cast(out, dtype)}

  return apply


@register("det_random_size_crop")
def det_random_size_crop(min_size: int, max_size: int) -> Op:
  """DETR's RandomSizeCrop: a crop of random height and width in [min_size, max_size] (at most
  the image's) at a random position; boxes clipped to it, those left with no area dropped."""
  if not (isinstance(min_size, int) and isinstance(max_size, int) and 0 < min_size <= max_size):
    raise ValueError(f"det_random_size_crop: need 0 < min_size <= max_size, got {min_size}, {max_size}")

  def apply(example: Example, rng: Any) -> Example:
    tf = import_tf()
    image = _get(example, "image", "det_random_size_crop")
    objects = dict(_objects(example, "det_random_size_crop"))
    keys = tf.random.experimental.stateless_split(rng, 4)
    h, w = _image_hw(tf, image)
    ch = _int_between(tf, keys[0], tf.minimum(min_size, h), tf.minimum(h, max_size))
    cw = _int_between(tf, keys[1], tf.minimum(min_size, w), tf.minimum(w, max_size))
    top = _int_between(tf, keys[2], 0, h - ch)
    left = _int_between(tf, keys[3], 0, w - cw)
    image = image[top:top + ch, left:left + cw]
    scale = tf.cast(tf.stack([h, w, h, w]), tf.float32)
    offset = tf.cast(tf.stack([top, left, top, left]), tf.float32)
    size = tf.cast(tf.stack([ch, cw, ch, cw]), tf.float32)
    box = tf.clip_by_value(objects["bbox"] * scale - offset, 0.0, size) / size
    objects["bbox"] = box
    keep = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
    return _with_objects({**example, "image": image}, objects, keep)

  return apply


@register("det_pad")
def det_pad(size: Any, method: str = "bilinear") -> Op:
  """Pads the image at the bottom and right to ``size`` (int or (height, width)) with zeros and
  adds ``pixel_mask`` [height, width] float32 (1 on the image). An image larger than ``size`` is
  first shrunk to fit, keeping its aspect ratio."""
  th, tw = _size_hw(size, "det_pad")
  _check_method(method, "det_pad")

  def apply(example: Example, rng: Any) -> Example:
    del rng
    tf = import_tf()
    image = _get(example, "image", "det_pad")
    h, w = _image_hw(tf, image)
    scale = tf.minimum(1.0, tf.minimum(th / tf.cast(h, tf.float32), tw / tf.cast(w, tf.float32)))

    def shrink():
      nh = tf.minimum(th, tf.cast(tf.floor(tf.cast(h, tf.float32) * scale), tf.int32))
      nw = tf.minimum(tw, tf.cast(tf.floor(tf.cast(w, tf.float32) * scale), tf.int32))
      out = tf.image.resize(image, tf.stack([tf.maximum(nh, 1), tf.maximum(nw, 1)]), method=method)
      return tf.cast(tf.clip_by_value(tf.round(out), image.dtype.min, image.dtype.max)
                     if image.dtype.is_integer else out, image.dtype)

    image = tf.cond(scale < 1.0, shrink, lambda: image)
    h, w = _image_hw(tf, image)
    mask = tf.pad(tf.ones([h, w], tf.float32), [[0, th - h], [0, tw - w]])
    image = tf.pad(image, [[0, th - h], [0, tw - w], [0, 0]])
    image.set_shape([th, tw, image.shape[-1]])
    mask.set_shape([th, tw])
    return {**example, "image": image, "pixel_mask": mask}

  return apply


def with_pad_size(spec: str, size: tuple[int, int]) -> str:
  """``spec`` with the size of its one top-level ``det_pad`` set to ``size`` (a shape bucket's canvas)."""
  texts = split_spec(spec)
  at = [i for i, t in enumerate(texts) if t and parse_call(t)[0] == "det_pad"]
  if len(at) != 1:
    raise ValueError(f"shape buckets pad each image to its bucket's canvas with the preprocessing's "
                     f"det_pad, so it must hold exactly one det_pad op outside det_select; {spec!r} holds "
                     f"{len(at)}")
  _, args, kwargs = parse_call(texts[at[0]])
  kwargs.pop("size", None)
  args = (tuple(size),) + tuple(args[1:])
  arguments = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
  texts[at[0]] = f"det_pad({', '.join(arguments)})"
  return "|".join(texts)


@register("det_pad_boxes")
def det_pad_boxes(max_boxes: int) -> Op:
  """Ends a detection spec: the objects become ``boxes`` [max_boxes, 4] float32 normalised
  (cx, cy, w, h), ``labels`` [max_boxes] int32, ``box_mask`` [max_boxes] float32 (1: a box) and
  ``is_crowd`` [max_boxes] bool; ``boxes_dropped`` int32 counts the boxes beyond ``max_boxes``,
  which are dropped (the detection task reports them)."""
  if not isinstance(max_boxes, int) or max_boxes < 1:
    raise ValueError(f"det_pad_boxes: max_boxes must be a positive int, got {max_boxes!r}")

  def apply(example: Example, rng: Any) -> Example:
    del rng
    tf = import_tf()
    objects = _objects(example, "det_pad_boxes")
    box = objects["bbox"][:max_boxes]
    n = tf.shape(objects["bbox"])[0]
    kept = tf.shape(box)[0]
    cxcywh = tf.stack([(box[:, 1] + box[:, 3]) / 2, (box[:, 0] + box[:, 2]) / 2,
                       box[:, 3] - box[:, 1], box[:, 2] - box[:, 0]], axis=1)
    pad = lambda x, value=0: tf.pad(x, [[0, max_boxes - kept]] + [[0, 0]] * (x.shape.rank - 1),
                                    constant_values=value)
    out = {k: v for k, v in example.items() if k != OBJECTS}
    out["boxes"] = tf.ensure_shape(pad(cxcywh), [max_boxes, 4])
    out["labels"] = tf.ensure_shape(pad(tf.cast(objects["label"][:max_boxes], tf.int32)), [max_boxes])
    out["box_mask"] = tf.ensure_shape(pad(tf.ones([kept], tf.float32)), [max_boxes])
    crowd = objects.get("is_crowd", tf.zeros([n], tf.bool))[:max_boxes]
    out["is_crowd"] = tf.ensure_shape(pad(tf.cast(crowd, tf.bool), False), [max_boxes])
    out["boxes_dropped"] = tf.maximum(n - max_boxes, 0)
    return out

  return apply


@register("det_select")
def det_select(probability: float, spec_a: str, spec_b: str) -> Op:
  """Runs the ops of ``spec_a`` with ``probability``, else those of ``spec_b`` (DETR's
  RandomSelect). Both must give the same keys and dtypes."""
  if not 0.0 <= probability <= 1.0:
    raise ValueError(f"det_select: probability must lie in [0, 1], got {probability}")
  pp_a, pp_b = parse_pp(spec_a), parse_pp(spec_b)

  def apply(example: Example, rng: Any) -> Example:
    tf = import_tf()
    keys = tf.random.experimental.stateless_split(rng, 3)
    take_a = tf.random.stateless_uniform([], keys[0]) < probability
    return tf.cond(take_a, lambda: pp_a(example, keys[1]), lambda: pp_b(example, keys[2]))

  return apply
