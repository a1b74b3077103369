"""Transparent huge pages for the large blocks of host memory that XLA allocates at every step.

XLA's CPU runtime allocates a computation's temporaries when it starts and frees them when it ends.
glibc serves blocks that large with a fresh ``mmap`` and unmaps them on ``free``, so every step
faults its temporaries in again, one zero-filled 4 KiB page at a time.

With glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc 2.35 and later) malloc asks the kernel for
transparent huge pages for such blocks: 2 MiB pages, so far fewer page faults (the kernel still
zero-fills them). Memory goes back to the kernel as before. glibc reads its tunables once, at
process start, so ``use_huge_pages()`` re-executes the program with the tunable set; the
command-line scripts do so through ``vit_jax.command_line.prepare_process`` (``--host_memory
hugepages``, the default) before anything else runs. Where glibc is older or the kernel's
transparent huge pages are off, it does nothing. (measured: docs/benchmarks.md, "Host memory")

Rejected: keeping the freed memory in glibc's heap (one arena, no ``mmap``, no trimming) avoids the
faults altogether, but in a real training run (input pipeline, evaluation, checkpoints) the heap
fragmented and the resident set grew well past that of glibc's defaults. (measured:
docs/benchmarks.md, "Host memory")
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Mapping

POLICIES = ("hugepages", "release")
TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_env(environ: Mapping[str, str]) -> dict[str, str]:
  """``environ`` with the glibc tunable that backs large allocations with huge pages added."""
  env = dict(environ)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  if TUNABLE not in tunables:
    tunables = [t for t in tunables if not t.startswith("glibc.malloc.hugetlb=")] + [TUNABLE]
  env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def huge_pages_active() -> bool:
  """This process was started with the tunable (it takes effect only at start)."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def why_unsupported() -> str | None:
  """None where the tunable can work here; otherwise the reason it cannot."""
  try:
    version = ctypes.CDLL(None).gnu_get_libc_version
    version.restype = ctypes.c_char_p
    major, minor = (int(p) for p in version().decode().split(".")[:2])
  except (OSError, AttributeError, ValueError):
    return "the C library is not glibc"
  if (major, minor) < (2, 35):
    return f"glibc {major}.{minor} has no glibc.malloc.hugetlb tunable (2.35+)"
  try:
    with open(THP_SETTING) as f:
      if "[never]" in f.read():
        return f"transparent huge pages are off ({THP_SETTING} is 'never')"
  except OSError:
    return f"the kernel has no transparent huge pages ({THP_SETTING} is missing)"
  return None


def use_huge_pages() -> None:
  """Re-executes this program with huge pages for large allocations, unless it already runs with
  them or they cannot work here (see the module docstring). Call it before anything else runs:
  the process image is replaced, with the same arguments and environment plus the tunable."""
  if huge_pages_active() or why_unsupported() is not None:
    return
  argv = [sys.executable, *sys.orig_argv[1:]]
  os.execve(sys.executable, argv, huge_pages_env(os.environ))


def apply(policy: str) -> None:
  """``"hugepages"``: ``use_huge_pages()``; ``"release"``: glibc's defaults (nothing to do)."""
  if policy not in POLICIES:
    raise ValueError(f"host memory policy {policy!r} is not one of {POLICIES}")
  if policy == "hugepages":
    use_huge_pages()
