"""Named preprocessing ops, composed from a big_vision-style spec string.

A spec is a `|`-separated list of op calls, e.g.

    "decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(1000)|keep('image', 'labels')"

Each call is `name`, `name(args)` or `name(args, kw=value)`; arguments are Python literals. `parse_pp(spec)`
returns `pp(example, rng) -> example`, which runs the ops in order on the tf tensors of ONE example.

Every op factory is registered with `@register("name")` and returns `op(example: dict, rng) -> dict`. `rng` is
a shape-[2] int32/int64 stateless seed; the composer gives the op at position i the seed
`tf.random.experimental.stateless_fold_in(rng, i)`. Random ops use only stateless TF ops, so augmentation is
a pure function of the example and its seed (reproducible under parallel maps and on resume). Ops that are
not random ignore `rng`. Images live under `image` and labels under `label` unless an op's `key` says
otherwise.

Importing this module does not import TensorFlow: factories import it when a spec is parsed.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any, Callable

from vit_jax.data.tf_runtime import import_tf

Example = dict[str, Any]
Op = Callable[[Example, Any], Example]
Pp = Callable[..., Example]

_OPS: dict[str, Callable[..., Op]] = {}


def register(name: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
  """Decorator that registers an op factory under `name`."""

  def decorator(factory: Callable[..., Op]) -> Callable[..., Op]:
    if name in _OPS:
      raise ValueError(f"preprocessing op {name!r} is already registered")
    _OPS[name] = factory
    return factory

  return decorator


def available_ops() -> list[str]:
  """Sorted names of all registered ops."""
  return sorted(_OPS)


def get_op(name: str) -> Callable[..., Op]:
  """The factory registered under `name`; ValueError listing the valid names if there is none."""
  if name not in _OPS:
    raise ValueError(f"unknown preprocessing op {name!r}; valid ops are: {', '.join(available_ops())}")
  return _OPS[name]


def split_spec(spec: str) -> list[str]:
  """Splits a spec at the `|` that are outside brackets and string literals."""
  parts, current, depth, quote = [], [], 0, None
  for ch in spec:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "|" and depth == 0:
      parts.append("".join(current).strip())
      current = []
      continue
    current.append(ch)
  parts.append("".join(current).strip())
  return parts


def parse_call(text: str) -> tuple[str, tuple, dict]:
  """Parses `name`, `name(1, 'a')` or `name(x, key=2)` into (name, args, kwargs)."""
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse preprocessing op {text!r}: {e.msg}") from None
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise ValueError(f"preprocessing op {text!r} must look like `name` or `name(args, kw=value)`")
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except ValueError:
    raise ValueError(f"arguments of preprocessing op {text!r} must be Python literals "
                     "(numbers, strings, tuples, lists, True/False/None)") from None
  if None in kwargs:
    raise ValueError(f"preprocessing op {text!r}: `**kwargs` is not supported")
  return node.func.id, args, kwargs


def build_op(text: str) -> Op:
  """Builds one op from its call text, e.g. `"resize(32)"`."""
  name, args, kwargs = parse_call(text)
  factory = get_op(name)
  try:
    inspect.signature(factory).bind(*args, **kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for preprocessing op {text!r} ({e}); "
                     f"its signature is {name}{inspect.signature(factory)}") from None
  return factory(*args, **kwargs)


def parse_pp(spec: str) -> Pp:
  """Composes the ops of `spec` into `pp(example, rng=None) -> example` (rng None means seed [0, 0])."""
  if not isinstance(spec, str):
    raise ValueError(f"a preprocessing spec must be a string, got {type(spec).__name__}")
  texts = split_spec(spec) if spec.strip() else []
  if any(not t for t in texts):
    raise ValueError(f"preprocessing spec {spec!r} has an empty op (two `|` in a row, or a trailing `|`)")
  ops = [build_op(t) for t in texts]
  tf = import_tf()

  @tf.autograph.experimental.do_not_convert  # Plain graph code: nothing for autograph to convert.
  def pp(example: Example, rng: Any = None) -> Example:
    rng = tf.zeros([2], tf.int64) if rng is None else tf.convert_to_tensor(rng)
    example = dict(example)
    for i, op in enumerate(ops):
      op_rng = tf.random.experimental.stateless_fold_in(rng, tf.constant(i, rng.dtype))
      example = op(example, op_rng)
      if not isinstance(example, dict):
        raise ValueError(f"preprocessing op {texts[i]!r} returned {type(example).__name__}, not a dict")
    return example

  pp.spec = spec
  return pp


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the image ops.


def _size_hw(size: Any, op: str) -> tuple[int, int]:
  """`size` as (height, width): an int means a square."""
  if isinstance(size, int) and not isinstance(size, bool) and size > 0:
    return size, size
  if (isinstance(size, (tuple, list)) and len(size) == 2
      and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
    return int(size[0]), int(size[1])
  raise ValueError(f"{op}: size must be a positive int or a (height, width) pair of them, got {size!r}")


def _get(example: Example, key: str, op: str) -> Any:
  if key not in example:
    raise ValueError(f"{op}: the example has no key {key!r}; its keys are {sorted(example)}")
  return example[key]


def _cast_like(tf: Any, image: Any, dtype: Any) -> Any:
  """Casts a float result back to `dtype`, rounding and clipping for integer types."""
  if dtype.is_integer:
    image = tf.clip_by_value(tf.round(image), dtype.min, dtype.max)
  return tf.cast(image, dtype)


def _resize(tf: Any, image: Any, hw: tuple[int, int], method: str, antialias: bool) -> Any:
  dtype = image.dtype
  out = tf.image.resize(image, hw, method=method, antialias=antialias)
  return _cast_like(tf, out, dtype)


_RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
                   "mitchellcubic")


def _check_method(method: str, op: str) -> None:
  if method not in _RESIZE_METHODS:
    raise ValueError(f"{op}: unknown resize method {method!r}; valid: {', '.join(_RESIZE_METHODS)}")


def _image_op(key: str, op: str, fn: Callable[[Any, Any, Any], Any]) -> Op:
  """An op that replaces `example[key]` by `fn(tf, image, rng)`."""

  def apply(example: Example, rng: Any) -> Example:
    tf = import_tf()
    example = dict(example)
    example[key] = fn(tf, _get(example, key, op), rng)
    return example

  return apply


# ---------------------------------------------------------------------------------------------------------
# Image ops.


@register("decode")
def decode(channels: int | None = None, key: str = "image") -> Op:
  """Decodes encoded image bytes (JPEG, PNG, BMP, GIF) to uint8; leaves decoded images as they are.

  channels=None keeps the stored channels of a decoded image and decodes bytes to 3 channels (RGB);
  channels=1 or 3 also converts decoded images (grey <-> RGB; an alpha channel is dropped).
  """
  if channels not in (None, 1, 3):
    raise ValueError(f"decode: channels must be None, 1 or 3, got {channels!r}")

  def fn(tf, image, rng):
    del rng
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=channels or 3, expand_animations=False)
      image.set_shape([None, None, channels or 3])
      return image
    if channels is None:
      return image
    have = image.shape[-1]
    if have is None:
      raise ValueError("decode: the image's channel count is unknown, so it cannot be converted")
    if have == 4:
      image, have = image[..., :3], 3
    if have == channels:
      return image
    if channels == 3 and have == 1:
      return tf.image.grayscale_to_rgb(image)
    if channels == 1 and have == 3:
      return _cast_like(tf, tf.image.rgb_to_grayscale(tf.cast(image, tf.float32)), image.dtype)
    raise ValueError(f"decode: cannot convert an image with {have} channels to {channels}")

  return _image_op(key, "decode", fn)


@register("resize")
def resize(size: Any, method: str = "bilinear", antialias: bool = True, key: str = "image") -> Op:
  """Resizes to `size` (int: square, or (height, width)); keeps the dtype (rounding for integers)."""
  hw = _size_hw(size, "resize")
  _check_method(method, "resize")
  return _image_op(key, "resize", lambda tf, image, rng: _resize(tf, image, hw, method, antialias))


@register("inception_crop")
def inception_crop(size: Any = None, area_min: float = 5, area_max: float = 100, method: str = "bilinear",
                   antialias: bool = True, key: str = "image") -> Op:
  """Random-resized ("Inception") crop covering area_min..area_max % of the image, then resize to `size`."""
  hw = None if size is None else _size_hw(size, "inception_crop")
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f"inception_crop: need 0 < area_min <= area_max <= 100, got {area_min}, {area_max}")
  _check_method(method, "inception_crop")

  def fn(tf, image, rng):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=rng,
        area_range=(area_min / 100, area_max / 100), min_object_covered=0,
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    crop.set_shape([None, None, image.shape[-1]])
    return crop if hw is None else _resize(tf, crop, hw, method, antialias)

  return _image_op(key, "inception_crop", fn)


@register("random_crop")
def random_crop(size: Any, key: str = "image") -> Op:
  """A crop of `size` at a uniformly random position (the image must be at least that large)."""
  h, w = _size_hw(size, "random_crop")

  def fn(tf, image, rng):
    crop = tf.image.stateless_random_crop(image, tf.stack([h, w, tf.shape(image)[-1]]), seed=rng)
    crop.set_shape([h, w, image.shape[-1]])
    return crop

  return _image_op(key, "random_crop", fn)


@register("central_crop")
def central_crop(size: Any, key: str = "image") -> Op:
  """The central crop of `size` (the image must be at least that large)."""
  h, w = _size_hw(size, "central_crop")

  def fn(tf, image, rng):
    del rng
    shape = tf.shape(image)
    top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
    crop = tf.image.crop_to_bounding_box(image, top, left, h, w)
    crop.set_shape([h, w, image.shape[-1]])
    return crop

  return _image_op(key, "central_crop", fn)


@register("pad")
def pad(pixels: Any, key: str = "image") -> Op:
  """Zero-pads `pixels` (int, or (height, width)) on each side; with random_crop, a shift augmentation."""
  if isinstance(pixels, int) and not isinstance(pixels, bool) and pixels >= 0:
    ph = pw = pixels
  elif (isinstance(pixels, (tuple, list)) and len(pixels) == 2
        and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pixels)):
    ph, pw = pixels
  else:
    raise ValueError(f"pad: pixels must be a non-negative int or (height, width) pair, got {pixels!r}")
  return _image_op(key, "pad", lambda tf, image, rng: tf.pad(image, [[ph, ph], [pw, pw], [0, 0]]))


@register("place_randomly")
def place_randomly(canvas: Any, min_size: int, max_size: int, method: str = "bilinear",
                   key: str = "image") -> Op:
  """Resizes the image to a random square side in [min_size, max_size] (uniform) and pastes it
  at a uniformly random position on a zero canvas of ``canvas`` (int or (height, width)): a
  digit somewhere in a scene, for pre-training a detector's backbone."""
  h, w = _size_hw(canvas, "place_randomly")
  _check_method(method, "place_randomly")
  if not (isinstance(min_size, int) and isinstance(max_size, int)
          and 0 < min_size <= max_size <= min(h, w)):
    raise ValueError(f"place_randomly: need 0 < min_size <= max_size <= the canvas side "
                     f"{min(h, w)}, got {min_size}, {max_size}")

  def fn(tf, image, rng):
    keys = tf.random.experimental.stateless_split(rng, 3)
    side = tf.random.stateless_uniform([], keys[0], min_size, max_size + 1, tf.int32)
    top = tf.random.stateless_uniform([], keys[1], 0, h - side + 1, tf.int32)
    left = tf.random.stateless_uniform([], keys[2], 0, w - side + 1, tf.int32)
    small = _resize(tf, image, tf.stack([side, side]), method, antialias=False)
    out = tf.pad(small, [[top, h - side - top], [left, w - side - left], [0, 0]])
    out.set_shape([h, w, image.shape[-1]])
    return out

  return _image_op(key, "place_randomly", fn)


@register("flip_lr")
def flip_lr(key: str = "image") -> Op:
  """Flips left-right with probability 1/2."""
  return _image_op(key, "flip_lr",
                   lambda tf, image, rng: tf.image.stateless_random_flip_left_right(image, seed=rng))


@register("value_range")
def value_range(vmin: float, vmax: float, in_min: float = 0, in_max: float = 255, clip_values: bool = False,
                key: str = "image") -> Op:
  """Maps values linearly from [in_min, in_max] to [vmin, vmax], as float32."""
  if in_max == in_min:
    raise ValueError(f"value_range: in_min and in_max must differ, both are {in_min}")

  def fn(tf, image, rng):
    del rng
    x = (tf.cast(image, tf.float32) - in_min) / (in_max - in_min)
    x = vmin + x * (vmax - vmin)
    return tf.clip_by_value(x, min(vmin, vmax), max(vmin, vmax)) if clip_values else x

  return _image_op(key, "value_range", fn)


# ---------------------------------------------------------------------------------------------------------
# Label and bookkeeping ops.


@register("onehot")
def onehot(num_classes: int, key: str = "label", key_result: str = "labels", on: float = 1.0,
           off: float = 0.0) -> Op:
  """One-hot float32 labels [num_classes] from an int label (a vector of labels gives a multi-hot)."""
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"onehot: num_classes must be a positive int, got {num_classes!r}")

  def apply(example, rng):
    del rng
    tf = import_tf()
    label = _get(example, key, "onehot")
    hot = tf.one_hot(label, num_classes, on_value=on, off_value=off, dtype=tf.float32)
    if hot.shape.rank == 2:
      hot = tf.reduce_max(hot, axis=0)
    return {**example, key_result: hot}

  return apply


@register("keep")
def keep(*keys: str) -> Op:
  """Keeps only `keys` (each must be present)."""
  if not keys:
    raise ValueError("keep: name at least one key, e.g. keep('image', 'labels')")

  def apply(example, rng):
    del rng
    missing = [k for k in keys if k not in example]
    if missing:
      raise ValueError(f"keep: keys {missing} are not in the example; its keys are {sorted(example)}")
    return {k: example[k] for k in keys}

  return apply


@register("drop")
def drop(*keys: str) -> Op:
  """Removes `keys` (absent keys are ignored)."""

  def apply(example, rng):
    del rng
    return {k: v for k, v in example.items() if k not in keys}

  return apply


@register("copy")
def copy(inkey: str, outkey: str) -> Op:
  """Copies `example[inkey]` to `example[outkey]`."""

  def apply(example, rng):
    del rng
    return {**example, outkey: _get(example, inkey, "copy")}

  return apply


@register("rename")
def rename(inkey: str, outkey: str) -> Op:
  """Moves `example[inkey]` to `example[outkey]`."""

  def apply(example, rng):
    del rng
    value = _get(example, inkey, "rename")
    example = {k: v for k, v in example.items() if k != inkey}
    example[outkey] = value
    return example

  return apply


# The detection ops (det_*) register themselves in the same registry.
from vit_jax.data import detection_ops  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
