"""FLOPs of one forward pass per image, counted analytically and by XLA.

Definition (the one timm's GMACs and the ViT paper's compute use): FLOPs = 2 × the multiply-adds of
every matrix multiplication and convolution of the forward pass (patch embedding, attention
projections, attention scores and the weighted sum of values, MLPs, pooling heads, classifier).
Normalisation, activations, softmax, residual additions and position embeddings are not counted;
they add a few percent on top (see ``xla_forward_flops``). A training step costs 3× the forward pass
(forward, plus a backward pass twice as expensive), without rematerialisation.

* ``forward_flops(name, image_size, num_classes)``: the analytic count. Each model family registers
  a formula over its config (``register_counter``); a family without one is counted by
  ``traced_flops``, which walks the jaxpr of the forward pass and sums the matmuls and convolutions
  from their shapes (a scanned body times its length), so every registered model is covered.
* ``xla_forward_flops(name, ...)``: XLA's cost analysis of the compiled, unrolled forward pass. XLA
  also counts elementwise work (layer norms, GELU, softmax, additions), so it sits a few percent
  above the analytic figure; for a scanned model it would count the layer once, which is why the
  analytic count is the reference and this one always builds the model unrolled.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax import models
from vit_jax.models import registry

Counter = Callable[[Any], int]
_COUNTERS: dict[str, Counter] = {}


def register_counter(family: str, counter: Counter) -> None:
  """Registers ``counter(model) -> FLOPs per image`` for the registry family called ``family``.

  ``model`` is an abstract instance (from ``nnx.eval_shape``): read its config, not its values.
  """
  _COUNTERS[family] = counter


def abstract_model(name: str, image_size: int = 224, num_classes: int = 1000,
                   **overrides: Any) -> nnx.Module:
  """The model ``name`` with shape-only parameters (no memory, no initialisation cost)."""
  try:
    key = (name, image_size, num_classes, tuple(sorted(overrides.items())))
    hash(key)
  except TypeError:  # an unhashable option value (a list): build it uncached
    return _build_abstract(name, image_size, num_classes, overrides)
  if key not in _ABSTRACT_CACHE:
    _ABSTRACT_CACHE[key] = _build_abstract(name, image_size, num_classes, overrides)
  return _ABSTRACT_CACHE[key]


_ABSTRACT_CACHE: dict[tuple, nnx.Module] = {}


def _build_abstract(name: str, image_size: int, num_classes: int, overrides: dict) -> nnx.Module:
  return nnx.eval_shape(lambda: models.create(name, num_classes=num_classes, image_size=image_size,
                                              rngs=nnx.Rngs(0), **overrides))


def forward_flops(name: str, image_size: int = 224, num_classes: int = 1000, **overrides: Any) -> int:
  """Analytic FLOPs (2 × multiply-adds) of one image's forward pass through model ``name``.

  ``overrides`` are ``models.create`` options (e.g. ``representation_size=768``).
  """
  family, _ = registry.resolve(name)
  model = abstract_model(name, image_size, num_classes, **overrides)
  counter = _COUNTERS.get(family.name)
  if counter is None:
    return traced_flops(model, image_size, overrides.get("channels", 3))
  return int(counter(model))


def train_flops(name: str, image_size: int = 224, num_classes: int = 1000, **overrides: Any) -> int:
  """FLOPs of one image's training step: 3 × the forward pass (no rematerialisation counted)."""
  return 3 * forward_flops(name, image_size, num_classes, **overrides)


def _images(batch: int, image_size: int, channels: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, image_size, image_size, channels), jnp.float32)


def traced_flops(model: nnx.Module, image_size: int, channels: int = 3) -> int:
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


def xla_forward_flops(name: str, image_size: int = 224, num_classes: int = 1000, *, batch: int = 1,
                      **overrides: Any) -> float:
  """FLOPs per image by XLA's cost analysis of the compiled forward pass, built unrolled.

  Counts elementwise operations too, so it exceeds ``forward_flops`` by a few percent.
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


# ---------------------------------------------------------------------------------------------
# Formulas per family. Each is 2 × multiply-adds, per image.


def _attention_flops(q_tokens: int, kv_tokens: int, dim: int, heads: int, head_dim: int,
                     out_dim: int | None = None) -> int:
  """Multi-head attention: q/k/v projections, scores, weighted values, output projection."""
  inner = heads * head_dim
  macs = (q_tokens * dim * inner + 2 * kv_tokens * dim * inner  # query, key, value
          + 2 * q_tokens * kv_tokens * inner                  # q·k scores, weights·v
          + q_tokens * inner * (out_dim or dim))              # output projection
  return 2 * macs


def _mlp_flops(tokens: int, dim: int, hidden: int) -> int:
  return 2 * 2 * tokens * dim * hidden


def vit_flops(model: Any) -> int:
  """ViT: patch embedding, encoder blocks, pooling (token, gap or MAP head), pre-logits, head."""
  c = model.config
  patches = c.grid ** 2
  tokens = patches + (1 if c.classifier == "token" else 0)
  d, head_dim = c.hidden_size, c.hidden_size // c.num_heads
  flops = 2 * patches * c.patch_size ** 2 * c.channels * d
  block = _attention_flops(tokens, tokens, d, c.num_heads, head_dim) + _mlp_flops(tokens, d, c.mlp_dim)
  flops += c.num_layers * block
  if c.classifier == "map":
    flops += _attention_flops(1, tokens, d, c.num_heads, head_dim) + _mlp_flops(1, d, c.mlp_dim)
  width = d
  if c.representation_size:
    flops += 2 * d * c.representation_size
    width = c.representation_size
  return flops + 2 * width * c.num_classes


register_counter("ViT", vit_flops)


def _conv_out(size: int, kernel: int, stride: int, padding: str) -> int:
  if padding == "same":  # TensorFlow SAME
    return -(-size // stride)
  return (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1


def resnet_flops(c: Any) -> int:
  """Bottleneck ResNet (BiT or a hybrid's stem) from its ``ResNetConfig``: convs, then the head."""
  size = _conv_out(c.image_size, 7, 2, c.padding)
  flops = 2 * size * size * 49 * c.channels * c.width
  size = _conv_out(size, 3, 2, c.padding)  # max pool
  cin = c.width
  for s, units in enumerate(c.layers):
    f = c.width * 2 ** s
    for u in range(units):
      stride = 2 if (s > 0 and u == 0) else 1
      out = _conv_out(size, 3, stride, c.padding)
      flops += 2 * (size * size * cin * f + out * out * 9 * f * f + out * out * f * 4 * f)
      if cin != 4 * f or stride != 1:
        flops += 2 * out * out * cin * 4 * f
      size, cin = out, 4 * f
  return flops + (2 * cin * c.num_classes if c.num_classes else 0)


def bit_flops(model: Any) -> int:
  return resnet_flops(model.config)


def hybrid_flops(model: Any) -> int:
  """ResNet stem, then a ViT on its feature map (``model.config`` is the ViT part's)."""
  return resnet_flops(model.resnet.config) + vit_flops(model)


def mixer_flops(model: Any) -> int:
  """MLP-Mixer: patch embedding, token-mixing and channel-mixing MLPs, head."""
  c = model.config
  n, d = c.grid ** 2, c.hidden_size
  block = _mlp_flops(d, n, c.tokens_mlp_dim) + _mlp_flops(n, d, c.channels_mlp_dim)
  return 2 * n * c.patch_size ** 2 * c.channels * d + c.num_layers * block + 2 * d * c.num_classes


def tnt_flops(model: Any) -> int:
  """TNT: per-patch pixel conv, pixel->patch projections, inner and outer transformers, head."""
  c = model.config
  n, p, d_in, d = c.grid ** 2, c.num_pixels, c.inner_size, c.hidden_size
  tokens = n + 1
  flops = 2 * n * p * 49 * c.channels * d_in + 2 * n * p * d_in * d  # pixel embed, first proj
  inner = n * (_attention_flops(p, p, d_in, c.inner_heads, d_in // c.inner_heads)
               + _mlp_flops(p, d_in, int(d_in * c.inner_mlp_ratio)))
  outer = (_attention_flops(tokens, tokens, d, c.num_heads, d // c.num_heads)
           + _mlp_flops(tokens, d, int(d * c.mlp_ratio)))
  flops += c.num_layers * (inner + 2 * n * p * d_in * d + outer)
  return flops + 2 * d * c.num_classes


for _family, _counter in (("BiT", bit_flops), ("Hybrid", hybrid_flops), ("Mixer", mixer_flops),
                          ("TNT", tnt_flops)):
  register_counter(_family, _counter)
