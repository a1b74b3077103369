"""Multi-head dot-product attention, the one implementation every family uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.kernels import cpu_matmul
from vit_jax.models.layers import Dense, dropout, xavier_uniform

IMPLEMENTATIONS = ("explicit", "xla", "cudnn")


class MultiHeadAttention(nnx.Module):
  """Self- or cross-attention with the original ViT parameter layout.

  query/key/value kernels are (embed, heads, head_dim) and the output kernel is
  (heads, head_dim, embed), exactly as in the released checkpoints.

  ``implementation``:
    "explicit" (default): the products in the heads-major layout [B, H, T, Dh] with a
        hand-written backward pass (``dot_product_attention`` below); any backend, and on the
        CPU the products run on the batched BLAS kernel (``vit_jax.kernels.cpu_matmul``);
    "xla" / "cudnn": ``jax.nn.dot_product_attention`` with that implementation ("cudnn": fused
        flash attention on NVIDIA GPUs).
  Where the weights themselves are needed (attention dropout in training, ``keep_weights``)
  every implementation computes them explicitly. Setting ``keep_weights`` stores the last
  weights in ``self.weights`` (read by attention-map tools; use outside jit).
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
    self.keep_weights = False
    self.weights = None

  def _heads(self, dense: Dense, x: jax.Array) -> jax.Array:
    """Projects [..., T, D] to the heads-major layout [..., H, T, Dh]."""
    return jnp.swapaxes(dense(x), -2, -3)

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    context = x if context is None else context
    needs_weights = self.keep_weights or (train and self.dropout_rate > 0.0)
    if self.implementation != "explicit" and not needs_weights:
      q, k, v = self.query(x), self.key(context), self.value(context)  # [B, T, H, Dh]
      return self.out(jax.nn.dot_product_attention(q, k, v, implementation=self.implementation))
    q = self._heads(self.query, x) * jnp.asarray(self.head_dim ** -0.5, self.dtype)
    k, v = self._heads(self.key, context), self._heads(self.value, context)
    if needs_weights:
      weights = attention_weights(q, k)
      if self.keep_weights:
        self.weights = nnx.Intermediate(weights)
      weights = dropout(weights, self.dropout_rate, train=train, rngs=rngs)
      y = jnp.einsum("...qk,...kd->...qd", weights, v)
    else:
      y = dot_product_attention(q, k, v)
    return self.out(jnp.swapaxes(y, -2, -3))


def attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
  """softmax(q k^T) over the keys, for [..., T, Dh] queries and keys (softmax in float32)."""
  logits = jnp.einsum("...qd,...kd->...qk", q, k)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)


@jax.custom_vjp
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T) v for [..., T, Dh] operands (q already scaled), with a hand-written backward.

  The products go through ``cpu_matmul.matmul`` (on the CPU a BLAS kernel spread over the cores,
  elsewhere an einsum), which has no autodiff rule of its own. With XLA's dots the backward pass
  written out here is about as fast as autodiff of the einsums (within 3% in a ViT-Ti/16 attention
  block, ``bench/ablations.py``).
  """
  return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
  logits = cpu_matmul.matmul(q, k, trans_b=True)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return cpu_matmul.matmul(weights, v), (q, k, v, weights)


def _attention_bwd(residuals, dy):
  q, k, v, weights = residuals
  dy = dy.astype(weights.dtype)
  dweights = cpu_matmul.matmul(dy, v, trans_b=True).astype(jnp.float32)
  w32 = weights.astype(jnp.float32)
  dlogits = (w32 * (dweights - jnp.sum(dweights * w32, axis=-1, keepdims=True))).astype(q.dtype)
  dq = cpu_matmul.matmul(dlogits, k)
  dk = cpu_matmul.matmul(dlogits, q, trans_a=True)
  dv = cpu_matmul.matmul(weights, dy, trans_a=True)
  return dq, dk, dv


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)
