"""What the host allocator does with the memory XLA frees at the end of every step.

XLA's CPU runtime allocates a computation's temporaries when it starts and frees them when it ends:
1.66 GiB for a ViT-Ti/16 train step at batch 32. glibc serves blocks that large with a fresh
``mmap`` and unmaps them on ``free``, so every step faults its temporaries in again, one zero-filled
4 KiB page at a time: about 460,000 page faults and over a second of kernel time per ViT-Ti/16
step on the 2-core dev box, a third of the step's CPU time (docs/benchmarks.md, "Host memory").

``retain_freed_memory()`` makes glibc keep freed memory for the next step instead: one arena for
every thread, no ``mmap`` for large blocks and no trimming of the heap. After the first step no
page is faulted in again. The price is a resident set that stays at its peak, which a training
process reaches at every step anyway. It acts on glibc alone; elsewhere it does nothing and says so.

The same policy as environment variables (``RETAIN_ENV``) reaches processes started from here, such
as the benchmark workers, which gives PyTorch the same allocator as JAX in ``bench/compare_timm.py``.
"""

from __future__ import annotations

import ctypes
import logging

POLICIES = ("retain", "release")

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

# glibc reads these at process start; they set what retain_freed_memory() sets.
RETAIN_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
              "MALLOC_TRIM_THRESHOLD_": str(2**62)}


def retain_freed_memory() -> bool:
  """Keeps freed host memory for reuse (see the module docstring); True where it took effect.

  Call it before the program starts threads (before importing JAX): threads that have already
  allocated keep their own glibc arena, which still returns large blocks to the kernel.
  """
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError where the C library is not glibc)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    logging.info("vit_jax.host_memory: not glibc; host memory is released as the C library decides")
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # glibc takes the trim threshold as a size_t: -1 is the largest, so the heap is never trimmed.
  done = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, -1)]
  return all(done)


def apply(policy: str) -> bool:
  """Applies ``policy`` (one of POLICIES): "retain" calls retain_freed_memory(); "release" keeps
  the C library's defaults. True where memory is now retained."""
  if policy not in POLICIES:
    raise ValueError(f"host memory policy {policy!r} is not one of {POLICIES}")
  return retain_freed_memory() if policy == "retain" else False
