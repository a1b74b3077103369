"""Test set-up, before the first jax import.

* 8 fake CPU devices for the sharding tests.
* XLA's CPU backend compiles without LLVM's optimisations (``TEST_XLA_FLAGS``): the suite's
  programs are tiny and compiled once each, so compiling dominates; this halves it. The
  library's own runs keep XLA's defaults. Subprocesses get the same flag (``subprocess_xla_flags``).
* One XLA compilation cache for the whole session, its subprocesses included, so a program the
  suite compiles again (the same train step in another test, another train.py run) is read
  back instead of recompiled.
"""

import atexit
import os
import shutil
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def subprocess_xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test's subprocess: the test setting, and ``devices`` fake CPU devices."""
  count = f" --xla_force_host_platform_device_count={devices}" if devices else ""
  return TEST_XLA_FLAGS + count


os.environ.setdefault("XLA_FLAGS", subprocess_xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="vit_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture
def image_files(tmp_path):
  """Two random RGB images as files: a 40x50 JPEG and a 32x32 PNG."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  paths = []
  for i, size in enumerate([(40, 50), (32, 32)]):
    path = tmp_path / f"img{i}.{'png' if i else 'jpg'}"
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    paths.append(str(path))
  return paths
