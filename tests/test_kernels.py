"""The CPU batched-matmul kernel: same products as einsum, used only where XLA need not partition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.kernels import cpu_matmul
from vit_jax.models import attention


def test_kernel_builds_on_this_machine():
  assert cpu_matmul.available()


@pytest.mark.parametrize("shape_a,shape_b", [((37, 19), (19, 300)), ((2, 3, 45, 17), (2, 3, 17, 29)),
                                              ((300, 8), (8, 5))])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_matches_einsum(shape_a, shape_b, trans_a, trans_b):
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal(shape_a, np.float32), rng.standard_normal(shape_b, np.float32)
  want = a @ b
  a_in = np.swapaxes(a, -1, -2).copy() if trans_a else a
  b_in = np.swapaxes(b, -1, -2).copy() if trans_b else b
  got = jax.jit(lambda x, y: cpu_matmul.matmul(x, y, trans_a=trans_a, trans_b=trans_b))(a_in, b_in)
  assert "custom_call" in jax.jit(lambda x, y: cpu_matmul.matmul(
      x, y, trans_a=trans_a, trans_b=trans_b)).lower(a_in, b_in).as_text()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_vmap_and_bad_shapes():
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((4, 6, 7), np.float32), rng.standard_normal((4, 7, 5), np.float32)
  got = jax.vmap(cpu_matmul.matmul)(a, b)
  np.testing.assert_allclose(np.asarray(got), a @ b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"equal batch axes, got shapes \(4, 6, 7\) and \(3, 7, 5\)"):
    cpu_matmul.matmul(a, b[:3])


def test_einsum_under_a_multi_device_mesh_and_for_bfloat16():
  a = jnp.ones((2, 8, 4))
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    assert "custom_call" not in jax.jit(cpu_matmul.matmul).lower(a, a.swapaxes(1, 2)).as_text()
  b16 = a.astype(jnp.bfloat16)
  assert "custom_call" not in jax.jit(cpu_matmul.matmul).lower(b16, b16.swapaxes(1, 2)).as_text()


def test_attention_gradients_match_autodiff_of_einsums():
  rng = np.random.default_rng(2)
  q, k, v, dy = (jnp.asarray(rng.standard_normal((2, 3, 11, 8), np.float32)) for _ in range(4))

  def reference(q, k, v):
    weights = jax.nn.softmax(jnp.einsum("...qd,...kd->...qk", q, k), axis=-1)
    return jnp.einsum("...qk,...kd->...qd", weights, v)

  out, vjp = jax.vjp(attention.dot_product_attention, q, k, v)
  ref_out, ref_vjp = jax.vjp(reference, q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(dy), ref_vjp(dy)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_einsum_only_block():
  a = jnp.ones((2, 8, 4))
  with cpu_matmul.einsum_only():
    assert "custom_call" not in jax.jit(lambda x, y: cpu_matmul.matmul(x, y)).lower(
        a, a.swapaxes(1, 2)).as_text()
  assert "custom_call" in jax.jit(lambda x, y: cpu_matmul.matmul(x, y)).lower(
      a, a.swapaxes(1, 2)).as_text()
