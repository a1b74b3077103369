"""Attention rollout (Abnar & Zuidema 2020) and its gradient-weighted variant (Chefer et al. 2021).

Rollout, as the ViT paper's appendix used it: per layer the heads are fused (mean by default;
max or min), optionally the lowest ``discard_ratio`` of the fused weights of each image are set
to 0 (never the class token's own entry), the identity is added for the residual connection and
each row re-normalised to sum to 1 (over the keys: the popular PyTorch script divides column j
by row j's sum instead), and the layers are multiplied from the first up:
``R = Â_L ··· Â_1``. Row i of R says how much each input token contributes to output token i.

Gradient-weighted (Chefer et al. 2021, "Generic attention-model explainability"): with ∇A the
gradient of the target class's logit with respect to a layer's attention weights,
``Ā = mean over heads of max(∇A ⊙ A, 0)``, ``R ← R + Ā·R`` from ``R = I``, first layer first.

The map read from R (``token_map``) depends on how the model pools: the class token's row
(``token``), the mean of the patch rows (``gap``), or, for an attention-probe head (``map``),
the probe's head-fused attention over the final tokens times R (the probe is a new query, not a
residual stream, so no identity is added for it); YOLOS: each det token's row.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.attention_maps import capture as capture_lib

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(weights: jax.Array, how: str = "mean") -> jax.Array:
  """[B, H, T, S] -> [B, T, S]: the heads' mean, max or min."""
  if how not in HEAD_FUSIONS:
    raise ValueError(f"head fusion {how!r} is not one of {HEAD_FUSIONS}")
  return {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[how](weights, axis=1)


def discard_lowest(a: jax.Array, ratio: float, keep_first: bool = True) -> jax.Array:
  """[B, T, T]: the lowest ``int(T*T*ratio)`` entries of each image set to 0 (ties: the earlier
  flat index first); with ``keep_first`` the [0, 0] entry (the class token's own) is never
  among them."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"discard_ratio must lie in [0, 1), got {ratio}")
  b, t, s = a.shape
  count = int(t * s * ratio)
  if count == 0:
    return a
  flat = a.reshape(b, t * s)
  ranked = flat.at[:, 0].set(jnp.inf) if keep_first else flat
  order = jnp.argsort(ranked, axis=-1, stable=True)[:, :count]
  flat = flat.at[jnp.arange(b)[:, None], order].set(0.0)
  return flat.reshape(b, t, s)


def rollout(layers: Sequence[jax.Array], *, head_fusion: str = "mean", discard_ratio: float = 0.0,
            keep_first: bool = True) -> jax.Array:
  """``R = Â_L ··· Â_1`` [B, T, T] from per-layer weights [B, H, T, T] (first layer first)."""
  if not layers:
    raise ValueError("rollout needs at least one layer of attention weights")
  result = None
  for weights in layers:
    a = fuse_heads(jnp.asarray(weights, jnp.float32), head_fusion)
    if discard_ratio:
      a = discard_lowest(a, discard_ratio, keep_first)
    a = a + jnp.eye(a.shape[-1], dtype=a.dtype)
    a = a / jnp.sum(a, axis=-1, keepdims=True)
    result = a if result is None else jnp.einsum("bij,bjk->bik", a, result)
  return result


def gradient_rollout_from(layers: Sequence[jax.Array], grads: Sequence[jax.Array]) -> jax.Array:
  """Chefer et al.'s R [B, T, T] from per-layer weights and their gradients [B, H, T, T]."""
  result = None
  for weights, grad in zip(layers, grads, strict=True):
    a = jnp.mean(jnp.maximum(jnp.asarray(grad, jnp.float32) * jnp.asarray(weights, jnp.float32), 0.0),
                 axis=1)
    if result is None:
      result = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    result = result + jnp.einsum("bij,bjk->bik", a, result)
  return result


def token_map(r: jax.Array, lay: capture_lib.Layout, probe: jax.Array | None = None) -> jax.Array:
  """The map over the patch grid read from R (module docstring): [B, rows, cols]; YOLOS
  (``detection`` pooling): [B, det_tokens, rows, cols]. ``probe``: the MAP head's head-fused
  attention [B, T] (``map`` pooling)."""
  rows, cols = lay.grid
  start, stop = lay.prefix, lay.prefix + rows * cols
  b = r.shape[0]
  if lay.pooling == "token":
    out = r[:, 0, start:stop]
  elif lay.pooling == "gap":
    out = jnp.mean(r[:, start:stop, start:stop], axis=1)
  elif lay.pooling == "map":
    if probe is None:
      raise ValueError("a model with an attention-probe head (classifier='map') needs the probe's "
                       "attention to read its map")
    out = jnp.einsum("bt,bts->bs", probe, r)[:, start:stop]
  elif lay.pooling == "detection":
    if lay.suffix:
      return r[:, stop:, start:stop].reshape(b, lay.suffix, rows, cols)
    return jnp.mean(r[:, start:stop, start:stop], axis=1).reshape(b, rows, cols)
  else:
    raise ValueError(f"unknown pooling {lay.pooling!r}")
  return out.reshape(b, rows, cols)


def probe_attention(weights: dict, head_fusion: str = "mean") -> jax.Array | None:
  """The MAP head's attention [B, T] (head-fused, its one query), if the model has one."""
  name = "MAPHead_0/MultiHeadDotProductAttention_0"
  if name not in weights:
    return None
  return fuse_heads(weights[name], head_fusion)[:, 0]


def attention_rollout(model: nnx.Module, images: jax.Array, *, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> tuple[jax.Array, capture_lib.Capture]:
  """The rollout map [B, rows, cols] (YOLOS: [B, det_tokens, rows, cols]) of ``model`` on
  ``images``, and the capture it came from."""
  lay = capture_lib.layout(model, images.shape[1:3])
  cap = capture_lib.capture(model, images)
  r = rollout(capture_lib.encoder_weights(cap, lay), head_fusion=head_fusion,
              discard_ratio=discard_ratio, keep_first=lay.prefix > 0)
  return token_map(r, lay, probe_attention(cap.weights, head_fusion)), cap


def gradient_rollout(model: nnx.Module, images: jax.Array,
                     target: int | Sequence[int] | None = None) -> tuple[jax.Array, jax.Array]:
  """Chefer et al.'s map [B, rows, cols] for class ``target`` (per image or one for all;
  default: each image's predicted class) of a classifier, and the targets used."""
  lay = capture_lib.layout(model, images.shape[1:3])
  if lay.pooling == "detection":
    raise ValueError("the gradient-weighted rollout explains a classifier's class logit; for "
                     "YOLOS and DETR use the attention maps of their detection tokens and queries")
  run, state = capture_lib.capture_function(model)
  images = jnp.asarray(images)
  outputs, weights = jax.jit(run)(state, images, None, {})
  names = [n for n in weights if n.startswith(lay.layers[0] + "/") and n.endswith("/" + lay.layers[1])]
  probe_name = "MAPHead_0/MultiHeadDotProductAttention_0"
  if probe_name in weights:
    names.append(probe_name)
  zeros = {n: jnp.zeros_like(weights[n]) for n in names}

  @jax.jit
  def grads(perturbations, targets):
    def score(p):
      logits, _ = run(state, images, None, p)
      return jnp.sum(jnp.take_along_axis(logits, targets[:, None], axis=-1))
    return jax.grad(score)(perturbations)

  if target is None:
    targets = jnp.argmax(outputs, axis=-1)
  else:
    targets = jnp.broadcast_to(jnp.asarray(target, jnp.int32), (images.shape[0],))
  g = grads(zeros, targets.astype(jnp.int32))
  layers = capture_lib.encoder_weights(weights, lay)
  layer_grads = capture_lib.encoder_weights(g, lay)
  r = gradient_rollout_from(layers, layer_grads)
  probe = None
  if probe_name in weights:
    probe = jnp.mean(jnp.maximum(g[probe_name] * weights[probe_name], 0.0), axis=1)[:, 0]
  return token_map(r, lay, probe), targets

