"""Lazy, CPU-only TensorFlow import for the input pipeline.

TensorFlow is only needed by `vit_jax.data` and costs seconds to import, so nothing in this package imports
it at module import time. `import_tf()` imports it on first use and hides every GPU from it, so that TF never
allocates accelerator memory that JAX needs.
"""

from __future__ import annotations

import os
from typing import Any

_TF = None


def import_tf() -> Any:
  """Returns the `tensorflow` module, configured to run on CPU only."""
  global _TF
  if _TF is not None:
    return _TF
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF's devices were already initialised by someone else; nothing to undo.
    pass
  _TF = tf
  return tf
