"""FLOPs of one forward pass per image, counted analytically and by XLA.

Definition (the one timm's GMACs and the ViT paper's compute use): FLOPs = 2 × the multiply-adds of
every matrix multiplication and convolution of the forward pass (patch embedding, attention
projections, attention scores and the weighted sum of values, MLPs, pooling heads, classifier).
Normalisation, activations, softmax, residual additions and position embeddings are not counted;
they add a few percent on top (see ``xla_forward_flops``). A training step costs 3× the forward pass
(forward, plus a backward pass twice as expensive), without rematerialisation.

* ``forward_flops(name, image_size, num_classes)``: the analytic count. Each model family gives a
  formula over its config when it registers (``flops=`` of ``registry.register_family``, in the
  family's file); a family registered with ``flops=None`` is counted by ``traced_flops``, which
  walks the jaxpr of the forward pass and sums the matmuls and convolutions from their shapes (a
  scanned body times its length), so every registered model is covered.
* ``xla_forward_flops(name, ...)``: XLA's cost analysis of the compiled, unrolled forward pass. XLA
  also counts elementwise work (layer norms, GELU, softmax, additions), so it sits a few percent
  above the analytic figure (and it leaves out the taps of a convolution that fall on the zero
  padding, which pulls a convolutional model at a small image size below it); for a scanned model
  it would count the layer once, which is why the analytic count is the reference and this one
  always builds the model unrolled.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax import models
from vit_jax.models import registry
from vit_jax.models.patches import ImageSize




def abstract_model(name: str, image_size: ImageSize = 224, num_classes: int = 1000,
                   **overrides: Any) -> nnx.Module:
  """The model ``name`` with shape-only parameters (no memory, no initialisation cost).

  ``image_size`` is ``models.create``'s: an int, or (height, width) for a detector.
  """
  try:
    key = (name, image_size, num_classes, tuple(sorted(overrides.items())))
    hash(key)
  except TypeError:  # an unhashable option value (a list): build it uncached
    return _build_abstract(name, image_size, num_classes, overrides)
  if key not in _ABSTRACT_CACHE:
    _ABSTRACT_CACHE[key] = _build_abstract(name, image_size, num_classes, overrides)
  return _ABSTRACT_CACHE[key]


_ABSTRACT_CACHE: dict[tuple, nnx.Module] = {}


def _build_abstract(name: str, image_size: ImageSize, num_classes: int, overrides: dict) -> nnx.Module:
  return nnx.eval_shape(lambda: models.create(name, num_classes=num_classes, image_size=image_size,
                                              rngs=nnx.Rngs(0), **overrides))


def forward_flops(name: str, image_size: ImageSize = 224, num_classes: int = 1000,
                  **overrides: Any) -> int:
  """Analytic FLOPs (2 × multiply-adds) of one image's forward pass through model ``name``.

  ``overrides`` are ``models.create`` options (e.g. ``representation_size=768``).
  """
  family, _ = registry.resolve(name)
  if family.flops is None:
    return traced_flops(abstract_model(name, image_size, num_classes, **overrides), image_size,
                        overrides.get("channels", 3))
  if "scan" in family.options and "scan" not in overrides:
    # The formula reads the config, which is the same stacked; a deep model builds much faster so.
    overrides = {**overrides, "scan": True}
  return int(family.flops(abstract_model(name, image_size, num_classes, **overrides)))


def train_flops(name: str, image_size: ImageSize = 224, num_classes: int = 1000,
                **overrides: Any) -> int:
  """FLOPs of one image's training step: 3 × the forward pass (no rematerialisation counted)."""
  return 3 * forward_flops(name, image_size, num_classes, **overrides)


def _images(batch: int, image_size: ImageSize, channels: int) -> jax.ShapeDtypeStruct:
  """Images of ``image_size``: an int (squares) or (height, width)."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  return jax.ShapeDtypeStruct((batch, h, w, channels), jnp.float32)


def traced_flops(model: nnx.Module, image_size: ImageSize, channels: int = 3) -> int:
  """FLOPs per image of every ``dot_general`` and convolution in the forward pass's jaxpr.

  ``channels`` is the input's (the ``channels`` option of ``models.create``, 3 by default).
  """
  graphdef, state = nnx.split(model)
  forward = lambda s, x: nnx.merge(graphdef, s)(x)
  return jaxpr_flops(jax.make_jaxpr(forward)(state, _images(1, image_size, channels)).jaxpr)


def jaxpr_flops(jaxpr: Any) -> int:
  """2 × multiply-adds of the matmuls and convolutions in ``jaxpr`` (scan bodies × length)."""
  total = 0
  for eqn in jaxpr.eqns:
    prim = eqn.primitive.name
    if prim == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      k = math.prod(lhs[d] for d in contract)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
    elif prim == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_feature_dim]
    elif prim == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif prim == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      for sub in _sub_jaxprs(eqn.params):
        total += jaxpr_flops(sub)
  return total


def _sub_jaxprs(params: dict) -> list:
  found = []
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, "eqns"):
        found.append(v)
      elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        found.append(v.jaxpr)
  return found


def xla_forward_flops(name: str, image_size: ImageSize = 224, num_classes: int = 1000, *,
                      batch: int = 1, **overrides: Any) -> float:
  """FLOPs per image by XLA's cost analysis of the compiled forward pass, built unrolled.

  Counts elementwise operations too, so it exceeds ``forward_flops`` by a few percent (less the
  convolution taps on zero padding, which XLA does not count).
  """
  probe = abstract_model(name, image_size, num_classes, **overrides)
  if getattr(getattr(probe, "config", None), "scan", False):
    overrides = {**overrides, "scan": False}
    probe = abstract_model(name, image_size, num_classes, **overrides)
  graphdef, state = nnx.split(probe)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  images = _images(batch, image_size, overrides.get("channels", 3))
  compiled = forward.lower(state, images).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"]) / batch

