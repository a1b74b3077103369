"""Export a model to the formats that serve it (``export.py`` is the command line)::

    model, serving = load_checkpoint(PATH)                 # any checkpoint predict.py reads
    export(model, serving, "stablehlo", "model.shlo")      # + model.shlo.json
    export(model, serving, "savedmodel", "saved/")         # TF SavedModel, serving_default
    export(model, serving, "onnx", "model.onnx")           # + model.onnx.json
    export(model, serving, "timm", "timm_folder/")         # model.safetensors + config.json

* ``stablehlo`` (``stablehlo.py``): ``jax.export``, the parameters baked in, called with
  ``jax.export.deserialize(bytes).call(images)`` by any compatible JAX, no vit_jax needed.
* ``savedmodel`` (``savedmodel.py``): ``jax2tf`` native serialisation; TensorFlow is imported
  only to write it.
* ``onnx`` (``onnx_graph.py``): the model's jaxpr written as ONNX operators, one rule per JAX
  primitive, for onnxruntime; needs the ``onnx`` package.
* ``timm`` (``timm_format.py``): the ViT, hybrid, Mixer, TNT and BiT families in timm's names,
  layouts and config, for ``timm.create_model(..., pretrained=True)``.

The graph formats take NHWC float32 images normalised as ``serving`` says (a symbolic batch by
default), or with ``preprocess=True`` uint8 images of one size that the artifact resizes,
centre-crops and normalises itself (``preprocessing.py``). They return ``{"logits": ...}``;
YOLOS and DETR also take ``pixel_mask`` and ``image_sizes`` and return HF's raw ``logits`` and
``pred_boxes`` and the post-processed ``scores``, ``labels`` and pixel ``boxes`` per query.
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from vit_jax.export.preprocessing import Preprocessing
from vit_jax.export.serving import NORMALIZATIONS, ServingConfig, load_checkpoint

FORMATS = ("stablehlo", "savedmodel", "onnx", "timm")


def export(model: nnx.Module, serving: ServingConfig, format: str, out: str, *,  # pylint: disable=redefined-builtin
           batch: int | None = None, preprocess: bool = False,
           input_size: tuple[int, int] | None = None,
           platforms: Sequence[str] | None = None) -> list[str]:
  """Writes ``model`` in ``format`` to ``out``; returns the paths written.

  ``batch``: a fixed batch size (None: any, a symbolic dimension). ``preprocess``: bake timm's
  eval transform into the artifact, which then takes uint8 images of ``input_size`` (default:
  the model's size / crop_pct). ``platforms``: backends to lower for (default: this one).
  """
  if format not in FORMATS:
    raise ValueError(f"format {format!r} is not one of {', '.join(FORMATS)}")
  if format == "timm":
    if preprocess or input_size is not None:
      raise ValueError("the timm format does not bake in preprocessing: timm builds its own from "
                       "config.json's pretrained_cfg (export without --with_preprocessing)")
    if batch is not None or platforms:
      raise ValueError("the timm format has no batch size or platforms (a state dict)")
    from vit_jax.export import timm_format  # pylint: disable=g-import-not-at-top
    return timm_format.export_timm(model, serving, out)
  if input_size is not None and not preprocess:
    raise ValueError("an input size is for the baked-in preprocessing: give it with "
                     "--with_preprocessing, or give the model's size with --image_size")
  preprocessing = serving.preprocessing(input_size) if preprocess else None
  if format == "stablehlo":
    from vit_jax.export import stablehlo  # pylint: disable=g-import-not-at-top
    return stablehlo.export_stablehlo(model, serving, out, batch=batch,
                                      preprocessing=preprocessing, platforms=platforms)
  if format == "onnx":
    if platforms:
      raise ValueError("the onnx format has no platforms: onnxruntime picks its execution "
                       "provider when it loads the graph")
    try:
      from vit_jax.export import onnx_graph  # pylint: disable=g-import-not-at-top
      import onnx  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise ValueError("the onnx format needs the onnx package: pip install onnx "
                       "(and onnxruntime to run the result)") from None
    return onnx_graph.export_onnx(model, serving, out, batch=batch, preprocessing=preprocessing)
  from vit_jax.export import savedmodel  # pylint: disable=g-import-not-at-top
  return savedmodel.export_savedmodel(model, serving, out, batch=batch,
                                      preprocessing=preprocessing, platforms=platforms)


__all__ = ["FORMATS", "NORMALIZATIONS", "Preprocessing", "ServingConfig", "export", "load_checkpoint"]
