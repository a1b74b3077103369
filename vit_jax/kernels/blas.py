"""Matrix products through a CPU BLAS library (MKL or numpy's OpenBLAS) instead of XLA's own.

On the CPU, XLA computes ``dot_general`` with Eigen's kernels. Where MKL is installed (the ``mkl``
wheel) its single-threaded sgemm, run on XLA's intra-op threads, is faster at the shapes of a
transformer's training step, weight gradients most of all (measured: docs/benchmarks.md,
"Closing the gap"). With ``select("mkl")`` (or ``"openblas"``) before the step is traced,
``Dense`` layers and attention's two products per head call the custom call ``vit_gemm``
(``cpu_gemm.cc``) forward and backward, attention's straight from and into the projections'
[batch, tokens, heads, head_dim] layout; ``select("xla")`` (the default) leaves them to XLA.

The choice is per process: ``VIT_JAX_CPU_MATMUL`` sets it at import; the scripts set that variable
from their ``--cpu_matmul`` flag (default xla, whatever the environment had; ``vit_jax.command_line``).
MKL runs sequential in the process; numpy's OpenBLAS keeps one thread count per process, so with
``openblas`` numpy's own products run single-threaded too. Exports trace with XLA's products
(a serialized program cannot carry this custom call). It applies to float32 products on a single CPU
device only: anything else (another dtype, another backend, several devices, whose operands XLA
would gather onto every device) keeps XLA's products. The kernel is compiled once with the C++
compiler (``$CXX`` or ``g++``) into ``$VIT_JAX_CACHE`` (default ``~/.cache/vit_jax``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import kernels
from vit_jax.kernels import CPU_MATMUL_CHOICES as CHOICES
from vit_jax.kernels import CPU_MATMUL_ENV as ENV

TARGET = "vit_gemm"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_gemm.cc")
# mkl_service.h: MKL_THREADING_SEQUENTIAL (one thread per call, the calling one), MKL_INTERFACE_LP64.
_MKL_SEQUENTIAL = 1
_MKL_LP64 = 0

_choice = "xla"
_loaded: str | None = None  # the library registered with the custom call
_keep: list = []            # ctypes handles that must outlive the process's computations
_warned: list = []          # the several-devices warning, given once


def select(choice: str) -> None:
  """Chooses who computes float32 matrix products on the CPU: "xla", "mkl" or "openblas".

  Loads (building it if needed) the kernel and the library at once, so a missing compiler or
  library is reported here; functions already traced keep the products they were traced with.
  """
  global _choice
  if choice not in CHOICES:
    raise ValueError(f"CPU matmul {choice!r} is not one of {CHOICES}")
  if choice != "xla":
    _load(choice)
  _choice = choice


def selected() -> str:
  """The current choice (see ``select``)."""
  return _choice


def applies(*arrays: jax.Array) -> bool:
  """Whether products of ``arrays`` go to the BLAS kernel: a BLAS library is selected, they are
  float32 and the computation runs on a single CPU device."""
  if _choice == "xla" or any(a.dtype != jnp.float32 for a in arrays):
    return False
  if jax.default_backend() != "cpu":
    return False
  if jax.device_count() > 1:
    if not _warned:
      _warned.append(True)
      warnings.warn(f"--cpu_matmul {_choice} applies to a single CPU device; with "
                    f"{jax.device_count()} devices the products stay XLA's")
    return False
  return True


def _matrices(x: jax.Array, heads: int) -> tuple[tuple[int, ...], int, int]:
  """(batch dimensions, rows, columns) of operand ``x`` in the plain or heads layout."""
  if heads:
    if x.ndim != 4 or x.shape[2] != heads:
      raise ValueError(f"an operand in the heads layout must be [batch, rows, {heads}, cols], got "
                       f"shape {x.shape}")
    return (x.shape[0], heads), x.shape[1], x.shape[3]
  return x.shape[:-2], x.shape[-2], x.shape[-1]


def gemm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False,
         heads_a: int = 0, heads_b: int = 0, heads_c: int = 0) -> jax.Array:
  """``op(a) @ op(b)`` by the BLAS kernel (``cpu_gemm.cc``), batched over leading dimensions.

  An operand is plain, [..., rows, cols], or with ``heads_x = H`` in attention's layout
  [batch, rows, H, cols], its batch being (batch, H); b may also be one matrix for every batch.
  The result is plain, or [batch, m, H, n] with ``heads_c = H``.
  """
  (a_batch, a0, a1), (b_batch, b0, b1) = _matrices(a, heads_a), _matrices(b, heads_b)
  m, k = (a1, a0) if trans_a else (a0, a1)
  kb, n = (b1, b0) if trans_b else (b0, b1)
  if k != kb or (b_batch and b_batch != a_batch):
    raise ValueError(f"gemm operands of shapes {a.shape} and {b.shape} (trans_a={trans_a}, "
                     f"trans_b={trans_b}, heads {heads_a}, {heads_b}) do not match")
  if heads_c:
    if len(a_batch) != 2 or a_batch[1] != heads_c:
      raise ValueError(f"a result in the heads layout needs operands batched as [batch, {heads_c}]")
    shape = (a_batch[0], m, heads_c, n)
  else:
    shape = a_batch + (m, n)
  if _loaded is None:
    raise RuntimeError("no BLAS library is loaded: call vit_jax.kernels.blas.select('mkl') first")
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(
      a, b, trans_a=np.bool_(trans_a), trans_b=np.bool_(trans_b), heads_a=np.int64(heads_a),
      heads_b=np.int64(heads_b), heads_c=np.int64(heads_c))


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ w`` for x [..., m, k] and one matrix w [k, n], gradients by the same kernel."""
  return gemm(x, w)


def _matmul_fwd(x, w):
  return gemm(x, w), (x, w)


def _matmul_bwd(res, g):
  x, w = res
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  return gemm(g, w, trans_b=True), gemm(x2, g2, trans_a=True)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """``q · k`` per head: q [B, T, H, D] and k [B, S, H, D] as the projections give them, logits
  [B, H, T, S]."""
  h = q.shape[2]
  return gemm(q, k, trans_b=True, heads_a=h, heads_b=h)


def _logits_fwd(q, k):
  return attention_logits(q, k), (q, k)


def _logits_bwd(res, g):
  q, k = res
  h = q.shape[2]
  return (gemm(g, k, heads_b=h, heads_c=h), gemm(g, q, trans_a=True, heads_b=h, heads_c=h))


attention_logits.defvjp(_logits_fwd, _logits_bwd)


@jax.custom_vjp
def attention_values(weights: jax.Array, v: jax.Array) -> jax.Array:
  """``weights @ v`` per head: weights [B, H, T, S] and v [B, S, H, D], the result [B, T, H, D]
  (the layout the output projection takes)."""
  h = v.shape[2]
  return gemm(weights, v, heads_b=h, heads_c=h)


def _values_fwd(weights, v):
  return attention_values(weights, v), (weights, v)


def _values_bwd(res, g):
  weights, v = res
  h = v.shape[2]
  return (gemm(g, v, trans_b=True, heads_a=h, heads_b=h),
          gemm(weights, g, trans_a=True, heads_b=h, heads_c=h))


attention_values.defvjp(_values_fwd, _values_bwd)


def _load(choice: str) -> None:
  global _loaded
  if _loaded == choice:
    return
  if _loaded is not None:
    raise ValueError(f"the BLAS kernel already uses {_loaded}; one library per process")
  path = kernels.library_path(choice)
  if choice == "mkl":
    os.environ.setdefault("MKL_CBWR", "AUTO")  # the same results from run to run on one CPU
    blas = ctypes.CDLL(path)
    blas.MKL_Set_Interface_Layer(_MKL_LP64)  # cblas_sgemm with 32-bit integers
    blas.MKL_Set_Threading_Layer(_MKL_SEQUENTIAL)
    sgemm, ilp64, local_threads = blas.cblas_sgemm, 0, None
  else:
    blas = ctypes.CDLL(path)
    sgemm, ilp64 = blas.scipy_cblas_sgemm64_, 1
    # This OpenBLAS keeps one thread count for the whole process: numpy's products run
    # single-threaded in a process that selects it.
    local_threads = getattr(blas, "openblas_set_num_threads_local", None)
    if local_threads is None:
      raise ValueError(f"--cpu_matmul openblas: {path} has no openblas_set_num_threads_local "
                       "(OpenBLAS 0.3.27 or later); use --cpu_matmul mkl or xla")
  kernel = ctypes.CDLL(_build())
  kernel.vit_gemm_set_blas(ctypes.cast(sgemm, ctypes.c_void_p), ilp64,
                           None if local_threads is None else ctypes.cast(local_threads, ctypes.c_void_p))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(kernel.VitGemm), platform="cpu")
  _keep.extend([blas, kernel])
  _loaded = choice


def _build() -> str:
  """Compiles ``cpu_gemm.cc`` against this jaxlib's FFI headers once; returns the library path."""
  include = jax.ffi.include_dir()
  with open(SOURCE, "rb") as f:
    key = hashlib.sha256(f.read() + jax.__version__.encode() + include.encode()).hexdigest()[:16]
  cache = os.path.join(os.environ.get("VIT_JAX_CACHE", os.path.expanduser("~/.cache/vit_jax")),
                       "kernels")
  target = os.path.join(cache, f"cpu_gemm-{key}.so")
  if os.path.exists(target):
    return target
  compiler = kernels.compiler()
  os.makedirs(cache, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
  os.close(fd)
  cmd = [compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{include}", SOURCE, "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    os.unlink(tmp)
    raise ValueError(f"building the CPU BLAS kernel failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
  os.replace(tmp, target)  # atomic: concurrent builders leave one complete file
  return target


if os.environ.get(ENV, "xla") not in CHOICES:
  raise ValueError(f"{ENV}={os.environ[ENV]!r} is not one of {CHOICES}")
select(os.environ.get(ENV, "xla"))
