"""Batched float32 matmul on the CPU through BLAS, as an XLA FFI custom call (cpu_matmul.cc).

XLA's CPU backend (its Eigen dots, under the ``cpu`` preset) runs a batched dot such as attention's
[batch * heads, 197, 64] products on one thread; this kernel runs single-threaded OpenBLAS sgemm
calls on XLA's intra-op thread pool, split over the batch. On the 2-core dev box it makes a
ViT-Ti/16 train step at batch 32 about 8% faster and a forward pass at batch 8 about 7% slower
(small batches of small products; ``bench/ablations.py``, docs/benchmarks.md, "Where the speed
comes from").

``matmul(a, b, trans_a=, trans_b=)`` uses it when all of these hold, and otherwise computes the
same product with ``jnp.einsum``:
- JAX's default backend is the CPU and both operands are float32;
- no mesh of more than one device is in context (``jax.set_mesh``): XLA cannot partition a custom
  call, so sharded computations keep the einsum;
- ``VIT_JAX_CPU_MATMUL`` is not ``xla`` and no ``einsum_only()`` block is active;
- the kernel builds: the first use compiles cpu_matmul.cc with ``$CXX`` (default ``c++``) against
  JAX's FFI headers into ``$VIT_JAX_KERNEL_CACHE`` (default ``~/.cache/vit_jax``, about 2 s) and
  loads OpenBLAS from the ``scipy-openblas64`` wheel. If either fails, a warning says why once.

The kernel has no autodiff rule of its own: callers use it inside a ``jax.custom_vjp`` whose
backward pass is made of such products too (``vit_jax.models.attention``).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import glob
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp

TARGET = "vit_jax_cpu_matmul"
SOURCE = Path(__file__).with_name("cpu_matmul.cc")
_EINSUM_ONLY = contextvars.ContextVar("vit_jax_einsum_only", default=False)


@contextlib.contextmanager
def einsum_only() -> Iterator[None]:
  """Within this block ``matmul`` traces to einsums (e.g. for XLA's cost analysis)."""
  token = _EINSUM_ONLY.set(True)
  try:
    yield
  finally:
    _EINSUM_ONLY.reset(token)


def matmul(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """``op(a) @ op(b)`` over the last two axes (leading axes are batch axes, equal in a and b),
  where op transposes the last two axes when ``trans_a`` / ``trans_b``."""
  if a.ndim != b.ndim or a.ndim < 2 or a.shape[:-2] != b.shape[:-2]:
    raise ValueError(f"matmul needs operands of one rank >= 2 with equal batch axes, got shapes "
                     f"{a.shape} and {b.shape}")
  if _use_kernel(a, b):
    m = a.shape[-1] if trans_a else a.shape[-2]
    n = b.shape[-2] if trans_b else b.shape[-1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.float32),
                            vmap_method="broadcast_all")
    return call(a, b, trans_a=trans_a, trans_b=trans_b)
  lhs = "...km" if trans_a else "...mk"
  rhs = "...nk" if trans_b else "...kn"
  return jnp.einsum(f"{lhs},{rhs}->...mn", a, b)


def _use_kernel(a: jax.Array, b: jax.Array) -> bool:
  if a.dtype != jnp.float32 or b.dtype != jnp.float32:
    return False
  if _EINSUM_ONLY.get() or os.environ.get("VIT_JAX_CPU_MATMUL", "").lower() == "xla":
    return False
  if jax.sharding.get_abstract_mesh().size > 1:
    return False
  return jax.default_backend() == "cpu" and available()


@functools.cache
def available() -> bool:
  """Builds and registers the kernel once; False (with a warning) where it cannot."""
  try:
    _register(_build(), _openblas())
    return True
  except Exception as e:  # noqa: BLE001  (any failure means: use XLA's dot)
    logging.warning("vit_jax: the CPU batched-matmul kernel is unavailable (%s); using XLA's dot "
                    "instead (slower attention on the CPU)", e)
    return False


def _build() -> Path:
  include = jax.ffi.include_dir()
  source = SOURCE.read_bytes()
  key = hashlib.sha256(source + include.encode() + jax.__version__.encode()).hexdigest()[:16]
  cache = Path(os.environ.get("VIT_JAX_KERNEL_CACHE", Path.home() / ".cache" / "vit_jax"))
  library = cache / f"cpu_matmul-{key}.so"
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  compiler = os.environ.get("CXX", "c++")
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    out = Path(tmp) / library.name
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}", str(SOURCE),
           "-o", str(out)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
      raise RuntimeError(f"no C++ compiler {compiler!r} (set CXX)") from None
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-1000:]}")
    os.replace(out, library)  # atomic: concurrent builders leave one complete file
  return library


def _openblas() -> ctypes.CDLL:
  try:
    import scipy_openblas64
  except ImportError:
    raise RuntimeError("the scipy-openblas64 package is not installed") from None
  paths = glob.glob(os.path.join(scipy_openblas64.get_lib_dir(), "libscipy_openblas64_*.so*"))
  if not paths:
    raise RuntimeError(f"no libscipy_openblas64_ in {scipy_openblas64.get_lib_dir()}")
  blas = ctypes.CDLL(paths[0])
  blas.scipy_openblas_set_num_threads64_(1)  # the kernel parallelises over XLA's threads instead
  return blas


def _register(library: Path, blas: ctypes.CDLL) -> None:
  lib = ctypes.CDLL(str(library))
  lib.vit_jax_set_sgemm(ctypes.cast(blas.scipy_cblas_sgemm64_, ctypes.c_void_p))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.VitJaxCpuMatmul), platform="cpu")
