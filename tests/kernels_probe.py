"""Run by tests/test_kernels.py in a process with one CPU device (the suite has 8, where the BLAS
kernel leaves products to XLA): with ``VIT_JAX_CPU_MATMUL`` set, the traced products go to
``vit_gemm`` and the values and gradients equal XLA's. Prints one ``ok NAME`` line per check."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax import models
from vit_jax.kernels import blas
from vit_jax.models import attention, layers


def close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol * float(jnp.abs(b).max()))


def products():
  r = np.random.RandomState(0)
  x, w = (jnp.asarray(r.randn(*s).astype(np.float32)) for s in ((130, 24), (24, 40)))
  q, k = (jnp.asarray(r.randn(2, t, 3, 8).astype(np.float32)) for t in (9, 12))  # [B, T, H, D]
  p = jnp.asarray(r.randn(2, 3, 9, 12).astype(np.float32))                         # [B, H, T, S]
  heads = lambda a: jnp.swapaxes(a, 1, 2)
  for ours, ref, args in [
      (layers.matmul_2d, jnp.matmul, (x, w)),
      (blas.attention_logits, lambda q, k: heads(q) @ jnp.swapaxes(heads(k), -1, -2), (q, k)),
      (blas.attention_values, lambda p, v: heads(p @ heads(v)), (p, k))]:
    loss = lambda f: (lambda a, b: jnp.sum(jnp.sin(f(a, b))))
    close(ours(*args), ref(*args))
    for g, g_ref in zip(jax.jit(jax.grad(loss(ours), (0, 1)))(*args), jax.grad(loss(ref), (0, 1))(*args)):
      close(g, g_ref)
  assert "vit_gemm" in jax.jit(jax.grad(loss(layers.matmul_2d), (0, 1))).lower(x, w).as_text()


def vit_loss(num_layers):
  model = models.create("ViT-Ti/16", num_classes=5, image_size=32, num_layers=num_layers,
                        rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  images = jnp.asarray(np.random.RandomState(1).randn(4, 32, 32, 3).astype(np.float32))

  def loss(state):
    return jnp.sum(jax.nn.log_softmax(nnx.merge(graphdef, state)(images))[:, 0])

  return loss, state


def vit_step():
  choice = blas.selected()
  counts = [jax.jit(jax.grad(loss)).lower(state).as_text().count("vit_gemm")
            for loss, state in (vit_loss(1), vit_loss(2))]
  # Each encoder layer: 8 products (query, key, value, out, logits, weighted values, 2 MLP) and
  # the 2 gradients of each.
  assert counts[1] - counts[0] == 24, counts
  loss, state = vit_loss(2)
  value, grads = jax.jit(jax.value_and_grad(loss))(state)
  blas.select("xla")
  with_xla = jax.jit(jax.value_and_grad(loss))
  assert "vit_gemm" not in with_xla.lower(state).as_text()
  value_ref, grads_ref = with_xla(state)
  blas.select(choice)
  close(value, value_ref)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    close(g, g_ref, tol=1e-4)


def other_dtypes():
  x = jnp.ones((4, 8), jnp.bfloat16)
  assert not blas.applies(x, x.T)
  assert "vit_gemm" not in jax.jit(layers.matmul_2d).lower(x, x.T).as_text()
  # bfloat16 attention on float32 inputs: the projections are bfloat16, so XLA's products.
  with nnx.use_eager_sharding(False):
    attn = attention.MultiHeadAttention(16, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = attn(jnp.ones((2, 5, 16), jnp.float32))
  assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())
  # Under vmap the custom call runs once per element.
  xs = jnp.asarray(np.random.RandomState(2).randn(3, 6, 4).astype(np.float32))
  w = jnp.asarray(np.random.RandomState(3).randn(4, 5).astype(np.float32))
  close(jax.vmap(layers.matmul_2d, in_axes=(0, None))(xs, w), xs @ w)


if __name__ == "__main__":
  assert jax.device_count() == 1 and blas.selected() != "xla"
  for check in (products, vit_step, other_dtypes):
    check()
    print("ok", check.__name__, flush=True)
