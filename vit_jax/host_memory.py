"""What glibc does with the large blocks of host memory that XLA allocates at every step.

XLA's CPU runtime allocates a computation's temporaries when it starts and frees them when it ends.
glibc serves blocks that large with a fresh ``mmap`` and unmaps them on ``free``, so every step
faults its temporaries in again, one zero-filled 4 KiB page at a time. The policies
(``--host_memory``), each a set of glibc tunables:

  hugepages (default): ``glibc.malloc.hugetlb=1`` (glibc 2.35 and later): malloc asks the kernel
      for transparent huge pages for such blocks, 2 MiB pages, so far fewer page faults; the kernel
      still zero-fills them at every step, and memory goes back to the kernel as before.
  keep: huge pages, and freed memory stays in the process (``glibc.malloc.mmap_max=0``: large
      blocks come from the heap; ``glibc.malloc.trim_threshold``: the heap is never trimmed), so
      from the second step on the temporaries are neither faulted in nor zero-filled: the fastest
      step. The resident set does not shrink after a peak, and with the heap's fragmentation can
      grow past what the other policies hold.
  release: glibc's defaults.

glibc reads its tunables once, at process start, so ``apply`` re-executes the program with them
set; the command-line scripts do so through ``vit_jax.command_line.prepare_process`` before
anything else runs. Where glibc is not there (or is older than 2.35, for huge pages) or the
kernel's transparent huge pages are off, ``hugepages`` does nothing. (measured:
docs/benchmarks.md, "Host memory")
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Mapping

POLICIES = ("hugepages", "keep", "release")
TUNABLE = "glibc.malloc.hugetlb=1"
TUNABLES: dict[str, tuple[str, ...]] = {
    "hugepages": (TUNABLE,),
    "keep": (TUNABLE, "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={1 << 40}"),
    "release": (),
}
_NAMES = {t.split("=")[0] for ts in TUNABLES.values() for t in ts}
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
NOT_GLIBC = "the C library is not glibc"


def policy_env(policy: str, environ: Mapping[str, str]) -> dict[str, str]:
  """``environ`` with the glibc tunables of ``policy`` in place of any the policies set."""
  if policy not in POLICIES:
    raise ValueError(f"host memory policy {policy!r} is not one of {POLICIES}")
  env = dict(environ)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  kept = [t for t in tunables if t.split("=")[0] not in _NAMES]
  tunables = kept + list(TUNABLES[policy])
  if tunables:
    env["GLIBC_TUNABLES"] = ":".join(tunables)
  else:
    env.pop("GLIBC_TUNABLES", None)
  return env


def huge_pages_env(environ: Mapping[str, str]) -> dict[str, str]:
  """``environ`` with the glibc tunable that backs large allocations with huge pages added."""
  return policy_env("hugepages", environ)


def active(policy: str) -> bool:
  """This process was started with ``policy``'s tunables and no other policy's (they take effect
  only at start)."""
  tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
  return {t for t in tunables if t.split("=")[0] in _NAMES} == set(TUNABLES[policy])


def huge_pages_active() -> bool:
  """This process was started with the huge-page tunable."""
  return active("hugepages")


def why_unsupported() -> str | None:
  """None where the tunable can work here; otherwise the reason it cannot."""
  try:
    version = ctypes.CDLL(None).gnu_get_libc_version
    version.restype = ctypes.c_char_p
    major, minor = (int(p) for p in version().decode().split(".")[:2])
  except (OSError, AttributeError, ValueError):
    return NOT_GLIBC
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
  """``apply("hugepages")``."""
  apply("hugepages")


def apply(policy: str) -> None:
  """Re-executes this program with ``policy``'s glibc tunables unless it already runs with them or
  they cannot work here (see the module docstring). Call it before anything else runs: the process
  image is replaced, with the same arguments and environment, the tunables of any other policy
  (inherited from a parent) replaced by ``policy``'s: ``"release"`` only removes them."""
  if policy not in POLICIES:
    raise ValueError(f"host memory policy {policy!r} is not one of {POLICIES}")
  if active(policy):
    return
  why = why_unsupported()
  if why == NOT_GLIBC or (why is not None and policy == "hugepages"):
    return
  argv = [sys.executable, *sys.orig_argv[1:]]
  os.execve(sys.executable, argv, policy_env(policy, os.environ))
