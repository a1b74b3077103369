"""Multi-head dot-product attention, the one implementation every family uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.kernels import blas
from vit_jax.models import recording
from vit_jax.models.layers import Dense, dropout, xavier_uniform

IMPLEMENTATIONS = ("explicit", "xla", "cudnn")
# The logit of a masked key (as jax.nn.dot_product_attention's): large, and far enough from
# float32's limit that subtracting the row maximum stays finite.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


class MultiHeadAttention(nnx.Module):
  """Self- or cross-attention with the original ViT parameter layout.

  query/key/value kernels are (embed, heads, head_dim) and the output kernel is
  (heads, head_dim, embed), exactly as in the released checkpoints.

  ``implementation``:
    "explicit" (default): einsums in the heads-major layout [B, H, T, Dh], any backend; on the
        CPU it is faster than "xla" (measured: docs/benchmarks.md);
    "xla" / "cudnn": ``jax.nn.dot_product_attention`` with that implementation ("cudnn": fused
        flash attention on NVIDIA GPUs).
  Where the weights themselves are needed in training (attention dropout) every implementation
  computes them explicitly. While a ``recording.Recorder`` is active and ``capture_name`` is set
  (``vit_jax.attention_maps.capture`` does both), the weights are computed explicitly and
  recorded; the output still comes from the configured implementation (the same output as
  without recording), unless the recorder perturbs the weights, which then feed the output.

  Optional call inputs (DETR): ``value``, the values' input when it differs from the keys'
  (positions added to queries and keys only), and ``mask``, a key-padding mask [B, Tk] (True:
  attend); masked logits are set to a large negative number before the float32 softmax.
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool = True,
               dropout_rate: float = 0.0, dtype=jnp.float32, implementation: str = "explicit",
               out_dim: int | None = None, head_dim: int | None = None):
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if head_dim is None:
      if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
      head_dim = dim // num_heads
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.dropout_rate = dropout_rate
    self.implementation = implementation
    self.dtype = dtype
    qkv = dict(axes=("embed", "heads", "kv"), rngs=rngs, kernel_init=xavier_uniform,
               use_bias=qkv_bias, dtype=dtype)
    self.query = Dense(dim, (num_heads, head_dim), **qkv)
    self.key = Dense(dim, (num_heads, head_dim), **qkv)
    self.value = Dense(dim, (num_heads, head_dim), **qkv)
    self.out = Dense((num_heads, head_dim), out_dim or dim, axes=("heads", "kv", "embed"),
                     rngs=rngs, kernel_init=xavier_uniform, dtype=dtype)
    self.capture_name: str | None = None  # set by attention_maps.capture on its own copy

  def _heads(self, dense: Dense, x: jax.Array) -> jax.Array:
    """Projects [..., T, D] to the heads-major layout [..., H, T, Dh]."""
    return jnp.swapaxes(dense(x), -2, -3)

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               value: jax.Array | None = None, mask: jax.Array | None = None,
               train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Queries from ``x`` [..., Tq, D], keys from ``context`` (default ``x``), values from
    ``value`` (default the keys' input); ``mask`` [..., Tk] bool, True where a key counts."""
    context = x if context is None else context
    value = context if value is None else value
    if mask is not None:
      if tuple(mask.shape) != tuple(context.shape[:-1]):
        raise ValueError(f"key-padding mask of shape {tuple(mask.shape)} does not fit keys of "
                         f"shape {tuple(context.shape)}: expected {tuple(context.shape[:-1])}")
      mask = jnp.asarray(mask, bool)
    recorder = recording.active() if self.capture_name else None
    perturbed = recorder is not None and self.capture_name in recorder.perturbations
    needs_weights = perturbed or (train and self.dropout_rate > 0.0)
    if recorder is not None:
      recorder.record_inputs(self.capture_name, x, context)
    if self.implementation != "explicit" and not needs_weights:
      q, k, v = self.query(x), self.key(context), self.value(value)  # [B, T, H, Dh]
      bias_mask = None if mask is None else mask[..., None, None, :]
      if recorder is not None:
        scale = jnp.asarray(self.head_dim ** -0.5, self.dtype)
        recorder.record(self.capture_name, attention_weights(
            jnp.swapaxes(q, -2, -3) * scale, jnp.swapaxes(k, -2, -3), mask))
      return self.out(jax.nn.dot_product_attention(q, k, v, mask=bias_mask,
                                                   implementation=self.implementation))
    scale = jnp.asarray(self.head_dim ** -0.5, self.dtype)
    # The CPU BLAS kernel reads and writes the projections' [B, T, H, Dh] layout directly.
    use_blas = self.dtype == jnp.float32 and x.ndim == 3 and blas.applies(x, context, value)
    if use_blas:
      q, k, v = self.query(x) * scale, self.key(context), self.value(value)
      weights = _softmax(blas.attention_logits(q, k), mask, q.dtype)
    else:
      q = self._heads(self.query, x) * scale
      k, v = self._heads(self.key, context), self._heads(self.value, value)
      weights = attention_weights(q, k, mask)
    if recorder is not None:
      weights = recorder.record(self.capture_name, weights)
    weights = dropout(weights, self.dropout_rate, train=train, rngs=rngs)
    if use_blas:
      return self.out(blas.attention_values(weights, v))
    y = jnp.einsum("...qk,...kd->...qd", weights, v)
    return self.out(jnp.swapaxes(y, -2, -3))


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T) over the keys, for [..., T, Dh] queries and keys (softmax in float32).

  ``mask``: [B, Tk] bool for [B, H, T, Dh] inputs, False for keys to leave out.
  """
  return _softmax(jnp.einsum("...qd,...kd->...qk", q, k), mask, q.dtype)


def _softmax(logits: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
  if mask is None:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
  logits = jnp.where(mask[..., None, None, :], logits.astype(jnp.float32), MASKED_LOGIT)
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def attention_flops(q_tokens: int, kv_tokens: int, dim: int, heads: int, head_dim: int,
                    out_dim: int | None = None) -> int:
  """FLOPs (2 x multiply-adds) of ``MultiHeadAttention``: the query, key and value projections,
  the scores, the weighted sum of the values and the output projection."""
  inner = heads * head_dim
  macs = (q_tokens * dim * inner + 2 * kv_tokens * dim * inner  # query, key, value
          + 2 * q_tokens * kv_tokens * inner                  # q·k scores, weights·v
          + q_tokens * inner * (out_dim or dim))              # output projection
  return 2 * macs
