"""The post-softmax attention weights of every layer and head, returned as arrays.

``capture(model, images)`` runs the model once under ``jax.jit`` with a ``recording.Recorder``
active and returns its outputs and ``{name: weights}``: each ``MultiHeadAttention`` named by its
path in the model (``Transformer/blocks/3/MultiHeadDotProductAttention_1``; scanned stacks are
named per layer the same way), weights ``[batch, heads, queries, keys]`` (TNT's inner attention:
``[batch * patches, heads, pixels, pixels]``). The weights are computed explicitly whatever the
model's attention implementation, while its outputs still come from that implementation, so they
equal the outputs without capture. The model itself is not changed: capture names the attention
modules of its own merged copy.

``layout(model, image_hw)`` says where the patch tokens sit in the main encoder's sequence, which
``encoder_layers`` lists, for the rollout and the Figure 7 analyses.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import recording
from vit_jax.models.attention import MultiHeadAttention

# The families with attention, as users name them (for the message to a Mixer or BiT).
FAMILIES_WITH_ATTENTION = ("ViT", "R50+ViT (hybrid)", "TNT", "YOLOS", "DETR")


def _path_name(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def attention_names(model: nnx.Module) -> dict[str, MultiHeadAttention]:
  """Every attention module of ``model`` by the name its weights get (``{layer}`` inside scanned
  stacks). Raises a ValueError for a model without attention (Mixer, BiT)."""
  stacks = {path: node.stacked_layers for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module) and getattr(node, "stacked_layers", None)}
  out = {}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, MultiHeadAttention):
      continue
    parts = [str(p) for p in path]
    for stack in stacks:
      if tuple(path[:len(stack)]) == stack:
        parts.insert(len(stack), recording.LAYER)
    out["/".join(parts)] = node
  if not out:
    raise ValueError(f"{type(model).__name__} has no attention layers to look inside; attention "
                     f"maps exist for {', '.join(FAMILIES_WITH_ATTENTION)}")
  return out


def _forward(model: nnx.Module, images: jax.Array, pixel_mask: jax.Array | None) -> Any:
  if pixel_mask is not None:
    return model(images, pixel_mask=pixel_mask, train=False)
  return model(images, train=False)


@dataclasses.dataclass
class Capture:
  """A forward pass's outputs, every attention layer's weights ``{name: [B, H, Tq, Tk]}`` and,
  with ``keep_inputs``, each layer's query and key inputs ``{name: (queries, keys)}``."""
  outputs: Any
  weights: dict[str, jax.Array]
  inputs: dict[str, tuple[jax.Array, jax.Array]] = dataclasses.field(default_factory=dict)


def _run(graphdef, state, images, pixel_mask, perturbations, keep_inputs=False):
  model = nnx.merge(graphdef, state)
  for name, attn in attention_names(model).items():
    attn.capture_name = name
  with recording.Recorder(perturbations, keep_inputs=keep_inputs) as recorder:
    outputs = _forward(model, images, pixel_mask)
  return outputs, recorder.records


_JITTED: dict[Any, Callable] = {}


def _run_jit(graphdef, *args):
  """``_run`` jitted once per model structure (a graph definition holding a list is unhashable:
  its text is the key then)."""
  try:
    key = hash(graphdef) and graphdef
  except TypeError:
    key = str(graphdef)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(functools.partial(_run, graphdef), static_argnums=4)
  return _JITTED[key](*args)


def capture(model: nnx.Module, images: jax.Array, *, pixel_mask: jax.Array | None = None,
            perturbations: Mapping[str, jax.Array] | None = None,
            keep_inputs: bool = False) -> Capture:
  """Runs ``model`` on ``images`` (jitted) and returns its outputs and attention weights; with
  ``perturbations`` (``{name: array}`` of the weights' shapes) those are added to the weights
  before use (``gradient_rollout`` differentiates through them); with ``keep_inputs`` each
  layer's query and key inputs too."""
  attention_names(model)  # the clear message for a model without attention, before tracing
  graphdef, state = nnx.split(model)
  outputs, records = _run_jit(graphdef, state, images, pixel_mask, dict(perturbations or {}),
                              keep_inputs)
  weights = {k: v for k, v in records.items() if "#" not in k}
  inputs = {k: (records[f"{k}#query"], records[f"{k}#keys"]) for k in weights
            if f"{k}#query" in records}
  return Capture(outputs, weights, inputs)


def capture_function(model: nnx.Module):
  """A pure ``(state, images, pixel_mask, perturbations) -> (outputs, weights)`` and the model's
  state, for differentiating or jitting with other code (``gradient_rollout``)."""
  attention_names(model)
  graphdef, state = nnx.split(model)
  return (lambda st, images, pixel_mask, perturbations:
          _run(graphdef, st, images, pixel_mask, perturbations)), state


def _layer_index(name: str, prefix: str) -> int | None:
  m = re.fullmatch(re.escape(prefix) + r"/(\d+)/.*", name)
  return int(m.group(1)) if m else None


def select_layers(weights: Mapping[str, jax.Array], prefix: str, suffix: str) -> list[jax.Array]:
  """The weights named ``{prefix}/{i}/{suffix}`` in layer order ``i = 0, 1, ...``."""
  found = {}
  for name, w in weights.items():
    i = _layer_index(name, prefix)
    if i is not None and name == f"{prefix}/{i}/{suffix}":
      found[i] = w
  if not found:
    raise ValueError(f"no attention named {prefix}/<layer>/{suffix}; captured: "
                     f"{', '.join(sorted(weights)[:6])}{' ...' if len(weights) > 6 else ''}")
  return [found[i] for i in sorted(found)]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the main encoder's patch tokens are: ``prefix`` tokens (class, distillation) first,
  then the ``grid`` (rows, columns) in row-major order, then ``suffix`` tokens (YOLOS's det
  tokens); ``patch_size`` in input pixels per grid cell; ``pooling`` how the classifier reads the
  tokens: ``token`` (the class token), ``gap`` (the mean of the patch tokens), ``map`` (an
  attention probe), ``detection``; ``layers`` (prefix, suffix) naming the encoder's
  self-attention in the captured weights."""
  prefix: int
  grid: tuple[int, int]
  suffix: int
  patch_size: int
  pooling: str
  layers: tuple[str, str]


def layout(model: nnx.Module, image_hw: tuple[int, int]) -> Layout:
  """The main encoder's token layout for inputs of ``image_hw`` (height, width)."""
  from vit_jax.models import detr, tnt, vit, vit_hybrid, yolos  # pylint: disable=g-import-not-at-top
  h, w = image_hw
  vit_layers = ("Transformer/blocks", "MultiHeadDotProductAttention_1")
  if isinstance(model, yolos.YOLOS):
    c = model.config
    return Layout(1, (h // c.patch_size, w // c.patch_size), c.num_det_tokens, c.patch_size,
                  "detection", vit_layers)
  if isinstance(model, detr.DETR):
    n, dilation = len(model.config.resnet_layers), model.config.dilation
    fh, fw = detr.feature_size(h, n, dilation), detr.feature_size(w, n, dilation)
    return Layout(0, (fh, fw), 0, max(round(h / fh), 1), "detection",
                  ("encoder/layers", "self_attn"))
  if isinstance(model, tnt.TNT):
    c = model.config
    return Layout(1, (c.grid, c.grid), 0, c.patch_size, "token", ("blocks", "attn_out"))
  if isinstance(model, vit_hybrid.HybridViT):
    c = model.config
    return Layout(int(c.classifier == "token"), (c.grid, c.grid), 0, max(round(h / c.grid), 1),
                  c.classifier, vit_layers)
  if isinstance(model, vit.VisionTransformer):
    c = model.config
    return Layout(int(c.classifier == "token"), (c.grid, c.grid), 0, c.patch_size, c.classifier,
                  vit_layers)
  attention_names(model)  # raises for families without attention
  raise ValueError(f"no token layout known for {type(model).__name__}")


def encoder_weights(capture_or_weights: Capture | Mapping[str, jax.Array],
                    lay: Layout) -> list[jax.Array]:
  """The main encoder's self-attention weights, one [B, H, T, T] per layer, first layer first."""
  weights = (capture_or_weights.weights if isinstance(capture_or_weights, Capture)
             else capture_or_weights)
  return select_layers(weights, *lay.layers)


def to_numpy(weights: Mapping[str, jax.Array]) -> dict[str, Any]:
  """The captured weights gathered to the host as numpy (from any sharding)."""
  return {k: jax.device_get(jnp.asarray(v)) for k, v in weights.items()}
