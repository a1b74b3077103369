"""Building blocks shared by every model family.

Parameters carry their logical axis names as ``out_sharding`` metadata (for example
``("embed", "mlp")``); ``vit_jax.train.sharding`` maps those names to mesh axes by config rules.
Models are created without a mesh (``models.create`` turns eager sharding off), so the
annotation is metadata only until the trainer places the state.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.kernels import blas

Initializer = Callable[..., jax.Array]
Axes = tuple[str | None, ...]

lecun_normal = jax.nn.initializers.lecun_normal()
xavier_uniform = jax.nn.initializers.xavier_uniform()
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones

# Compute dtypes by config name; parameters stay float32 whatever the compute dtype.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_dtype(dtype: str) -> None:
  """Raises a ValueError unless ``dtype`` names one of ``DTYPES``."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {tuple(DTYPES)}")


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Axes) -> nnx.Param:
  """A float32 parameter initialised by ``init`` and annotated with logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), out_sharding=tuple(axes))


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """GELU; exact (erf) by default as in PyTorch and timm, tanh form when ``approximate``.

  The exact form is written as PyTorch's ``x / 2 * (1 + erf(x / sqrt(2)))`` rather than with
  ``jax.nn.gelu``'s erfc form, for its speed on the CPU (measured: docs/benchmarks.md).
  """
  if approximate:
    return jax.nn.gelu(x, approximate=True)
  return _gelu_erf(x)


@jax.custom_vjp
def _gelu_erf(x: jax.Array) -> jax.Array:
  # The gradient is written out so that the backward pass is one elementwise pass over x, where
  # autodiff keeps the erf from the forward pass and needs two (measured: docs/benchmarks.md).
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def _gelu_erf_fwd(x):
  return _gelu_erf(x), x


def _gelu_erf_bwd(x, g):
  cdf = 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))
  pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(_INV_SQRT_2PI, x.dtype)
  return (g * (cdf + x * pdf),)


_gelu_erf.defvjp(_gelu_erf_fwd, _gelu_erf_bwd)
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


class Dense(nnx.Module):
  """``y = x @ kernel + bias`` contracting the last ``len(in_shape)`` axes of ``x``.

  ``in_shape`` and ``out_shape`` let attention keep the original ViT kernel layouts such as
  (embed, heads, head_dim), so released checkpoints load without reshaping.
  """

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *,
               axes: Axes, rngs: nnx.Rngs, kernel_init: Initializer = lecun_normal,
               bias_init: Initializer = zeros, use_bias: bool = True, dtype=jnp.float32):
    self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, self.in_shape + self.out_shape, axes)
    self.bias = (param(rngs, bias_init, self.out_shape, axes[len(self.in_shape):])
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    if x.shape[x.ndim - n_in:] != self.in_shape:
      raise ValueError(f"Dense expects inputs ending in {self.in_shape}, got shape {x.shape}")
    lead = x.shape[:x.ndim - n_in]
    # One 2-D matmul over all leading axes: the gradient of the kernel is then a plain
    # [in, rows] x [rows, out] product with no transposed copy of the activations (measured:
    # docs/benchmarks.md).
    y = matmul_2d(x.astype(self.dtype).reshape(-1, math.prod(self.in_shape)),
                  self.kernel[...].astype(self.dtype).reshape(math.prod(self.in_shape), -1))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype).reshape(-1)
    return y.reshape(lead + self.out_shape)


def matmul_2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel`` for 2-D operands (by the CPU BLAS kernel where one is selected:
  ``vit_jax.kernels.blas``)."""
  if blas.applies(x, kernel):
    return blas.matmul(x, kernel)
  return jax.lax.dot_general(x, kernel, (((1,), (0,)), ((), ())))


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32, output in ``dtype``."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs, dtype=jnp.float32,
               use_bias: bool = True, use_scale: bool = True):
    del rngs
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",)) if use_scale else None
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=("norm",)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    return layer_norm(x.astype(jnp.float32), scale, bias, self.eps).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
               eps: float) -> jax.Array:
  """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis (scale, bias optional).

  Its gradient is written out (the usual closed form from the saved mean and 1/std), which
  takes fewer passes over x than autodiff's (measured: docs/benchmarks.md).
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(var + eps)
  y = (x - mean) * rstd
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, res, g):
  del eps
  x, mean, rstd, scale, bias = res
  xhat = (x - mean) * rstd
  gs = g if scale is None else g * scale
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  dscale = None if scale is None else jnp.sum(g * xhat, axis=rows)
  dbias = None if bias is None else jnp.sum(g, axis=rows)
  return dx, dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def dropout(x: jax.Array, rate: float, *, train: bool, rngs: nnx.Rngs | None,
            broadcast_dims: Sequence[int] = ()) -> jax.Array:
  """Inverted dropout; a no-op unless ``train`` and ``rate > 0`` (``rate`` may be traced)."""
  if not train or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  if rngs is None:
    raise ValueError("dropout/stochastic depth in training needs `rngs` with a 'dropout' stream: "
                     "call model(images, train=True, rngs=nnx.Rngs(dropout=key))")
  shape = [1 if i in broadcast_dims else d for i, d in enumerate(x.shape)]
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def drop_path(x: jax.Array, rate: float, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
  """Stochastic depth: drops a residual branch per example."""
  return dropout(x, rate, train=train, rngs=rngs, broadcast_dims=tuple(range(1, x.ndim)))


class Mlp(nnx.Module):
  """The transformer MLP: Dense, GELU, dropout, Dense, dropout (original ViT initialisers)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dropout_rate: float = 0.0,
               gelu_approximate: bool = False, dtype=jnp.float32, out_dim: int | None = None,
               axes: tuple[str, str] = ("embed", "mlp")):
    out_dim = out_dim or dim
    bias_init = jax.nn.initializers.normal(stddev=1e-6)
    self.Dense_0 = Dense(dim, hidden, axes=axes, rngs=rngs, kernel_init=xavier_uniform,
                         bias_init=bias_init, dtype=dtype)
    self.Dense_1 = Dense(hidden, out_dim, axes=axes[::-1], rngs=rngs, kernel_init=xavier_uniform,
                         bias_init=bias_init, dtype=dtype)
    self.dropout_rate = dropout_rate
    self.gelu_approximate = gelu_approximate

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = gelu(self.Dense_0(x), self.gelu_approximate)
    x = dropout(x, self.dropout_rate, train=train, rngs=rngs)
    x = self.Dense_1(x)
    return dropout(x, self.dropout_rate, train=train, rngs=rngs)


def mlp_flops(tokens: int, dim: int, hidden: int) -> int:
  """FLOPs (2 x multiply-adds) of ``Mlp(dim, hidden)`` on ``tokens`` tokens: its two matmuls."""
  return 2 * 2 * tokens * dim * hidden


class MLPHead(nnx.Module):
  """Dense, ReLU, Dense, ReLU, Dense (``Dense_{0,1,2}``): the detection heads of DETR and YOLOS."""

  def __init__(self, dim: int, out_dim: int, out_axis: str | None, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.Dense_0 = Dense(dim, dim, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.Dense_1 = Dense(dim, dim, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.Dense_2 = Dense(dim, out_dim, axes=("embed", out_axis), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.Dense_0(x))
    x = jax.nn.relu(self.Dense_1(x))
    return self.Dense_2(x)
