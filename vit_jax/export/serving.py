"""What an exported model takes and returns, and the checkpoint loading that fills it in.

``load_checkpoint`` reads any checkpoint ``predict.py`` reads (``loading.resolve_model``, then
``models.create`` and ``load_pretrained``) and returns the model with its ``ServingConfig``
(input size and channels, normalisation; the crop and class names are the caller's to add).
``serving_function`` is the function every graph format exports: float images (or uint8 ones
with the preprocessing baked in) to a dict of outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.checkpoints import readers
from vit_jax.export.preprocessing import Preprocessing

# Options that the model name fixes when --model is given (as in predict.py).
SIZE_OPTIONS = ("hidden_size", "num_layers", "num_heads", "mlp_dim")
INPUT_NAMES = ("images", "pixel_mask", "image_sizes")  # a classifier takes the first only
DETECTORS = ("YOLOS", "DETR")  # model families whose outputs are boxes (as in predict.py)
DEFAULT_CANVAS = (800, 1333)   # a released detector's input when the checkpoint records none
NORMALIZATIONS = {
    "minus_one_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # value_range(-1, 1): this trainer's
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclasses.dataclass(frozen=True)
class ServingConfig:
  """What a served model expects: NHWC float32 images of ``image_size`` with ``channels``,
  computed from pixels p in [0, 1] as (p - mean) / std; timm's eval crop (``crop_pct``: the
  image resized to size / crop_pct, then centre-cropped; None: no crop) with
  ``interpolation``. Detectors also take a pixel mask and return boxes."""
  model_name: str
  num_classes: int
  image_size: tuple[int, int]
  channels: int = 3
  mean: tuple[float, ...] = NORMALIZATIONS["minus_one_one"][0]
  std: tuple[float, ...] = NORMALIZATIONS["minus_one_one"][1]
  crop_pct: float | None = None
  interpolation: str = "bilinear"
  class_names: tuple[str, ...] | None = None
  detector: bool = False

  @property
  def value_range(self) -> tuple[float, float] | None:
    """The model input's range for pixels in [0, 1], if the same for every channel."""
    ranges = {(-m / s, (1.0 - m) / s) for m, s in zip(self.mean, self.std)}
    return ranges.pop() if len(ranges) == 1 else None

  def preprocessing(self, input_size: tuple[int, int] | None = None) -> Preprocessing:
    """The preprocessing that takes uint8 images of ``input_size`` (default: the model's size /
    crop_pct) to this model's input."""
    if self.detector:
      raise ValueError(f"{self.model_name} is a detector: baking in the preprocessing (fit to the "
                       "canvas, pad, pixel mask) is not supported; export without it")
    return Preprocessing.for_model(self.image_size, self.crop_pct, self.interpolation,
                                   self.mean, self.std, input_size)

  def to_json(self) -> dict[str, Any]:
    return {"model": self.model_name, "num_classes": self.num_classes,
            "image_size": list(self.image_size), "channels": self.channels,
            "mean": list(self.mean), "std": list(self.std),
            "value_range": list(self.value_range) if self.value_range else None,
            "crop_pct": self.crop_pct, "interpolation": self.interpolation,
            "class_names": list(self.class_names) if self.class_names else None,
            "task": "detection" if self.detector else "classification"}


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
  return (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)


def load_checkpoint(checkpoint: str, model_name: str | None = None, *,
                    image_size: int | tuple[int, int] | None = None,
                    num_classes: int | None = None, normalize: str | None = None,
                    dtype: str | None = None,
                    ) -> tuple[nnx.Module, ServingConfig, readers.Checkpoint]:
  """The model a checkpoint holds with its weights, its ``ServingConfig``, and the checkpoint
  read (whose ``meta`` names a trainer checkpoint's dataset).

  ``checkpoint``: whatever predict.py reads (a workdir or ``DIR/checkpoints/<step>`` of this
  trainer, a released ``.npz``, a timm ``.safetensors`` / torch file). The model name, classes
  and size come from the checkpoint when it records them; ``model_name``, ``num_classes`` and
  ``image_size`` override. ``normalize``: one of ``NORMALIZATIONS`` (default: [-1, 1], as this
  library trains and predict.py feeds every classifier). ``dtype``: the compute dtype
  (float32 | bfloat16; default: the checkpoint's, the parameters stay float32).
  """
  from vit_jax import checkpoints, models  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import loading  # pylint: disable=g-import-not-at-top
  normalize = normalize or "minus_one_one"
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize {normalize!r} is not one of {sorted(NORMALIZATIONS)}")
  spec, ckpt = loading.resolve_model(checkpoint, model_name, num_classes, SIZE_OPTIONS)
  detector = spec.task == "detection" or models.resolve(spec.name)[0].name in DETECTORS
  if not detector and not spec.num_classes:
    raise ValueError(f"{ckpt.path!r} has no classification head: nothing to export")
  if image_size is not None:
    size = _pair(image_size)
  elif detector:
    size = _pair(spec.image_size) if isinstance(spec.image_size, tuple) else DEFAULT_CANVAS
  else:
    size = _pair(spec.image_size)
  if not detector and size[0] != size[1]:
    raise ValueError(f"image size {size[0]}x{size[1]}: {spec.name} classifiers take squares")
  overrides = dict(spec.overrides, **({"dtype": dtype} if dtype else {}))
  model = models.create(spec.name, num_classes=spec.num_classes,
                        image_size=size if detector else size[0], **overrides)
  checkpoints.load_pretrained(model, ckpt)
  channels = int(spec.overrides.get("channels", 3))
  mean, std = NORMALIZATIONS[normalize]
  serving = ServingConfig(
      model_name=spec.name, num_classes=spec.num_classes, image_size=size, channels=channels,
      mean=mean[:channels], std=std[:channels], detector=detector)
  return model, serving, ckpt


def outputs(net: nnx.Module, serving: ServingConfig, preprocessing: Preprocessing | None,
            images: jax.Array, pixel_mask: jax.Array | None = None,
            image_sizes: jax.Array | None = None) -> dict[str, jax.Array]:
  """What an exported model returns (inference mode; with ``preprocessing``, ``images`` are
  uint8 of its input size): a classifier ``{"logits"}``; a detector, given also the pixel mask
  and each image's original (height, width), HF's raw outputs ``logits`` [b, q, classes + 1]
  and ``pred_boxes`` [b, q, 4] (normalised cxcywh) and, as HF's
  ``post_process_object_detection``, each query's ``scores``, ``labels`` and ``boxes`` (pixel
  x0, y0, x1, y1 in the original image; vit_jax.detection.postprocess)."""
  x = preprocessing(images) if preprocessing is not None else images
  if serving.detector:
    from vit_jax.detection.postprocess import postprocess  # pylint: disable=g-import-not-at-top
    out = net(x, pixel_mask=pixel_mask)
    return {"logits": out["logits"], "pred_boxes": out["boxes"], **postprocess(out, image_sizes)}
  return {"logits": net(x)}


def serving_function(model: nnx.Module, serving: ServingConfig,
                     preprocessing: Preprocessing | None = None) -> Callable[..., dict[str, jax.Array]]:
  """``fn(images[, pixel_mask, image_sizes])`` -> ``outputs(...)``, the model's parameters
  closed over (constants of the traced module)."""
  graphdef, state = nnx.split(model)
  return lambda *inputs: outputs(nnx.merge(graphdef, state), serving, preprocessing, *inputs)


def input_specs(serving: ServingConfig, batch: int | None,
                preprocessing: Preprocessing | None = None) -> list[jax.ShapeDtypeStruct]:
  """The exported function's inputs (named ``INPUT_NAMES``): images [b, H, W, C] (float32, or
  uint8 with the preprocessing), and a detector's pixel mask [b, H, W] (float32, 1 on the image,
  0 on padding) and image sizes [b, 2] (int32 original height and width, which the boxes are
  scaled to); ``batch=None``: a symbolic ``b``."""
  if batch is not None and batch < 1:
    raise ValueError(f"batch {batch}: give a positive batch size or None (any)")
  b = jax.export.symbolic_shape("b")[0] if batch is None else int(batch)
  h, w = preprocessing.input_size if preprocessing is not None else serving.image_size
  dtype = jnp.uint8 if preprocessing is not None else jnp.float32
  specs = [jax.ShapeDtypeStruct((b, h, w, serving.channels), dtype)]
  if serving.detector:
    specs.append(jax.ShapeDtypeStruct((b, h, w), jnp.float32))
    specs.append(jax.ShapeDtypeStruct((b, 2), jnp.int32))
  return specs


def describe(serving: ServingConfig, fmt: str, in_specs: list[jax.ShapeDtypeStruct],
             out_specs: dict[str, jax.ShapeDtypeStruct], preprocessing: Preprocessing | None
             ) -> dict[str, Any]:
  """The JSON sidecar: the inputs and outputs (a symbolic batch as "b") and ``serving``."""
  def shape(s):
    return [d if isinstance(d, int) else str(d) for d in s.shape]
  names = INPUT_NAMES
  return {"format": fmt,
          "inputs": [{"name": n, "shape": shape(s), "dtype": str(np.dtype(s.dtype))}
                     for n, s in zip(names, in_specs)],
          "outputs": [{"name": n, "shape": shape(s), "dtype": str(np.dtype(s.dtype))}
                      for n, s in out_specs.items()],
          "preprocessing": preprocessing.to_json() if preprocessing is not None else None,
          **serving.to_json()}
