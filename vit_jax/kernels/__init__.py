"""Kernels outside XLA's own: ``blas``, float32 matrix products by a CPU BLAS library.

This module itself imports no JAX, so the command line can check a choice before JAX starts.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

CPU_MATMUL_CHOICES = ("xla", "mkl", "openblas")
CPU_MATMUL_ENV = "VIT_JAX_CPU_MATMUL"


def library_path(choice: str) -> str:
  """The shared library of BLAS ``choice`` ("mkl" or "openblas"), or a ValueError saying where it
  was looked for and how to get it."""
  if choice == "mkl":  # the mkl wheel installs into <prefix>/lib
    dirs = sorted({os.path.normpath(os.path.join(p, *[".."] * 3, "lib"))
                   for p in sys.path if p.endswith("site-packages")} |
                  {os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib")})
    found = sorted(f for d in dirs for f in glob.glob(os.path.join(d, "libmkl_rt.so*")))
    if found:
      return found[0]
    raise ValueError(f"--cpu_matmul mkl: no libmkl_rt.so in {', '.join(dirs)}; install MKL with "
                     "`pip install mkl` (x86-64) or use --cpu_matmul openblas or xla")
  if choice == "openblas":
    import numpy as np  # pylint: disable=g-import-not-at-top  (its wheel bundles OpenBLAS)
    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    found = sorted(glob.glob(os.path.join(libs, "libscipy_openblas64_*.so")))
    if found:
      return found[0]
    raise ValueError(f"--cpu_matmul openblas: numpy's bundled OpenBLAS (libscipy_openblas64_*.so) "
                     f"is not in {libs} (a numpy built against another BLAS); use --cpu_matmul mkl "
                     "or xla")
  raise ValueError(f"CPU BLAS {choice!r} is not one of {CPU_MATMUL_CHOICES[1:]}")


def compiler() -> str:
  """The C++ compiler that builds the kernel (``$CXX``, else g++ or c++), or a ValueError."""
  found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if found is None:
    raise ValueError("the CPU BLAS kernel is built once with a C++ compiler: none found ($CXX, g++, "
                     "c++); install one (Debian/Ubuntu: apt-get install g++) or use --cpu_matmul xla")
  return found


def cpu_matmul_problem(choice: str) -> str | None:
  """Why ``--cpu_matmul choice`` cannot work here, or None."""
  if choice not in CPU_MATMUL_CHOICES:
    return f"--cpu_matmul {choice!r} is not one of {list(CPU_MATMUL_CHOICES)}"
  if choice == "xla":
    return None
  try:
    library_path(choice)
    compiler()
  except ValueError as e:
    return str(e)
  return None
