"""The CPU BLAS kernel (vit_jax/kernels): products, gradients and a model step equal XLA's; the
written-out gradients of GELU and LayerNorm equal autodiff's; bad choices are clear errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import subprocess_xla_flags
from vit_jax import kernels
from vit_jax.kernels import blas
from vit_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


NO_MKL = kernels.cpu_matmul_problem("mkl")  # e.g. not x86-64 Linux, where requirements.txt has no mkl


@pytest.fixture(scope="module")
def mkl():
  """MKL selected for this module's tests, XLA's products again afterwards."""
  if NO_MKL:
    pytest.skip(NO_MKL)
  blas.select("mkl")
  yield
  blas.select("xla")


def _close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol * float(jnp.abs(b).max()))


# Row blocks (300 rows on 2 threads), column blocks (20 rows, 300 columns), blocks too small to
# split, and batches of products.
@pytest.mark.parametrize("lead,m,k,n", [((), 300, 33, 40), ((), 20, 17, 300), ((), 7, 5, 9),
                                        ((5,), 70, 16, 90), ((2, 3), 11, 64, 13)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_equals_xla(mkl, lead, m, k, n, trans_a, trans_b):
  r = np.random.RandomState(m + n)
  x = jnp.asarray(r.randn(*lead, m, k).astype(np.float32))
  w = jnp.asarray(r.randn(*lead, k, n).astype(np.float32))
  a = jnp.swapaxes(x, -1, -2) if trans_a else x
  b = jnp.swapaxes(w, -1, -2) if trans_b else w
  _close(jax.jit(lambda a, b: blas.gemm(a, b, trans_a=trans_a, trans_b=trans_b))(a, b), x @ w)
  if lead == ():  # one matrix b for every batch of a
    xs = jnp.stack([x, 2 * x])
    _close(blas.gemm(xs, w), xs @ w)


@pytest.mark.parametrize("choice", ["mkl", "openblas"])
def test_models_use_the_kernel_on_one_device(choice):
  """tests/kernels_probe.py: products, their gradients and a ViT's loss and gradients equal XLA's."""
  if kernels.cpu_matmul_problem(choice):
    pytest.skip(kernels.cpu_matmul_problem(choice))
  env = {**os.environ, kernels.CPU_MATMUL_ENV: choice, "XLA_FLAGS": subprocess_xla_flags()}
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kernels_probe.py")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split("\n")[:-1] == ["ok products", "ok vit_step", "ok other_dtypes"]


def test_several_devices_keep_xla(mkl, monkeypatch):
  assert jax.device_count() == 8
  monkeypatch.setattr(blas, "_warned", [])
  x = jnp.ones((4, 8), jnp.float32)
  with pytest.warns(UserWarning, match="--cpu_matmul mkl applies to a single CPU device; with 8 "
                                       "devices the products stay XLA's"):
    assert not blas.applies(x, x.T)
  assert "vit_gemm" not in jax.jit(layers.matmul_2d).lower(x, x.T).as_text()


def _plain_layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + 1e-6)
  return y * (1 if scale is None else scale) + (0 if bias is None else bias)


@pytest.mark.parametrize("with_scale,with_bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_gradient_equals_autodiff(with_scale, with_bias):
  r = np.random.RandomState(0)
  x, g = (jnp.asarray(r.randn(3, 7, 33).astype(np.float32)) for _ in range(2))
  scale = jnp.asarray(r.randn(33).astype(np.float32)) if with_scale else None
  bias = jnp.asarray(r.randn(33).astype(np.float32)) if with_bias else None
  y, vjp = jax.vjp(lambda *a: layers.layer_norm(*a, 1e-6), x, scale, bias)
  y_ref, vjp_ref = jax.vjp(_plain_layer_norm, x, scale, bias)
  _close(y, y_ref)
  for d, d_ref in zip(vjp(g), vjp_ref(g)):
    assert (d is None) == (d_ref is None)
    if d is not None:
      _close(d, d_ref)


def test_gelu_gradient_equals_autodiff():
  x = jnp.linspace(-6.0, 6.0, 1001)
  g = jax.grad(lambda x: jnp.sum(layers.gelu(x)))(x)
  g_ref = jax.grad(lambda x: jnp.sum(0.5 * x * (1.0 + jax.lax.erf(x / jnp.sqrt(2.0)))))(x)
  _close(g, g_ref, tol=1e-6)


def test_bad_choices_are_clear_errors(monkeypatch):
  with pytest.raises(ValueError, match=r"CPU matmul 'blis' is not one of \('xla', 'mkl', 'openblas'\)"):
    blas.select("blis")
  with pytest.raises(ValueError, match=r"gemm operands of shapes \(3, 4\) and \(5, 6\) .* do not match"):
    blas.gemm(jnp.ones((3, 4)), jnp.ones((5, 6)))
  with pytest.raises(ValueError, match=r"the heads layout must be \[batch, rows, 3, cols\], got shape \(2, 5, 4, 8\)"):
    blas.gemm(jnp.ones((2, 5, 4, 8)), jnp.ones((2, 5, 4, 8)), trans_b=True, heads_a=3, heads_b=3)
  monkeypatch.setattr(sys, "path", [])
  monkeypatch.setattr(sys, "prefix", "/nonexistent")
  monkeypatch.setattr(sys, "base_prefix", "/nonexistent")
  assert kernels.cpu_matmul_problem("mkl") == (
      "--cpu_matmul mkl: no libmkl_rt.so in /nonexistent/lib; install MKL with `pip install mkl` "
      "(x86-64) or use --cpu_matmul openblas or xla")
  monkeypatch.setenv("CXX", "")
  monkeypatch.setenv("PATH", "/nonexistent")
  assert "built once with a C++ compiler: none found" in kernels.cpu_matmul_problem("openblas")
