"""SIGTERM (preemption) handling: finish the current step, checkpoint, exit cleanly."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class PreemptionGuard:
  """Records SIGTERM; ``should_stop`` tells every process the same answer.

  With one process the flag is read every step. With several, processes agree at sync points
  (the logging steps) through an all-gather, so that all of them save the same step.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested.set()

  def should_stop(self, at_sync_point: bool) -> bool:
    if jax.process_count() == 1:
      return self._requested.is_set()
    if not at_sync_point:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array(self._requested.is_set()))
    return bool(np.any(flags))

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
