"""Multi-head dot-product attention, the one implementation every family uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models.layers import Dense, dropout, xavier_uniform

IMPLEMENTATIONS = ("xla", "cudnn", "explicit")


class MultiHeadAttention(nnx.Module):
  """Self- or cross-attention with the original ViT parameter layout.

  query/key/value kernels are (embed, heads, head_dim) and the output kernel is
  (heads, head_dim, embed), exactly as in the released checkpoints.

  ``implementation``: "xla" or "cudnn" go through ``jax.nn.dot_product_attention``;
  "explicit" computes the softmax weights itself (needed for attention dropout and for
  attention maps). Setting ``keep_weights`` stores the last weights in ``self.weights``
  (read by attention-map tools; use outside jit).
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool = True,
               dropout_rate: float = 0.0, dtype=jnp.float32, implementation: str = "xla",
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
    self.keep_weights = False
    self.weights = None

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    context = x if context is None else context
    q, k, v = self.query(x), self.key(context), self.value(context)  # [B, T, H, Dh]
    explicit = (self.implementation == "explicit" or self.keep_weights
                or (train and self.dropout_rate > 0.0))
    if explicit:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q * (self.head_dim ** -0.5), k)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
      if self.keep_weights:
        self.weights = nnx.Intermediate(weights)
      weights = dropout(weights, self.dropout_rate, train=train, rngs=rngs)
      y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      y = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation
                                       if self.implementation == "cudnn" else "xla")
    return self.out(y)
