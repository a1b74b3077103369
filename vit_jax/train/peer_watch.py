"""Watches the other processes of a multi-process run: when one stops, this one says so and exits.

Each process writes a counter to the coordination service's key-value store every
``timeout / 8`` seconds and reads the others'. A process whose counter has not moved for
``timeout / 2`` seconds, or a coordination service that fails or stops answering (process 0 died
or hangs), ends
this process with one ``error:`` line, before JAX's own detector (``timeout`` seconds) would end
it with a native stack dump. A process that finishes normally marks itself done first.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

_PREFIX = "vit_jax/alive/"
_DONE = "done"
EXIT_CODE = 1


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  (JAX keeps the client here)
  return distributed.global_state.client


class PeerWatch:
  """``start()`` after ``jax.distributed.initialize``; ``stop()`` before the process ends."""

  def __init__(self, timeout: float):
    self.timeout = timeout / 2
    self.interval = max(0.25, timeout / 8)
    self.me, self.count = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="peer_watch", daemon=True)
    self._answered = time.time()  # when the coordination service last answered a round
    self._service = threading.Thread(target=self._watch_service, name="peer_watch_service",
                                     daemon=True)

  def start(self) -> "PeerWatch":
    if self.count > 1:
      self._thread.start()
      self._service.start()
    return self

  def stop(self) -> None:
    if self._thread.is_alive():
      self._stop.set()
      self._thread.join()
      self._service.join()
      try:
        _client().key_value_set(f"{_PREFIX}{self.me}", _DONE, allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except  (ending anyway)
        pass

  def _run(self) -> None:
    client, beat = _client(), 0
    seen = {p: (None, time.time()) for p in range(self.count) if p != self.me}
    while not self._stop.wait(self.interval):
      beat += 1
      try:
        client.key_value_set(f"{_PREFIX}{self.me}", str(beat), allow_overwrite=True)
        values = dict(client.key_value_dir_get(_PREFIX))
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set():
          return
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        self._end(f"lost contact with the coordination service on process 0 ({first[:200]}): "
                  "process 0 died or its host is unreachable")
      now = self._answered = time.time()
      for peer, (value, since) in seen.items():
        new = values.get(f"{_PREFIX}{peer}")
        if new == _DONE:
          continue
        if new != value:
          seen[peer] = (new, now)
        elif now - since > self.timeout:
          self._end(f"process {peer} of {self.count} has sent no heartbeat for {now - since:.0f} s: "
                    "it died or hangs")

  def _watch_service(self) -> None:
    """A coordination service that stops answering (process 0 hangs) blocks ``_run`` in a call."""
    while not self._stop.wait(self.interval):
      silent = time.time() - self._answered
      if silent > self.timeout:
        self._end(f"the coordination service on process 0 has not answered for {silent:.0f} s: "
                  "process 0 hangs or its host is unreachable")

  def _end(self, why: str) -> None:
    if not self._stop.is_set():
      end(why)


def end(why: str) -> None:
  """Says why this process stops, in one line, and ends it at once."""
  print(f"error: {why}. Stopping process {jax.process_index()} too (a collective would wait for "
        "it forever). Run the same command on every host again to resume from the last "
        "checkpoint.", file=sys.stderr, flush=True)
  os._exit(EXIT_CODE)  # the main thread may be inside a collective that never returns


def lost_peer(error: BaseException) -> bool:
  """Whether a collective of a multi-process run failed because another process went away
  (on CPUs, gloo's connection to it reset; JAX's service polled a dead task)."""
  text = str(error)
  return jax.process_count() > 1 and any(t in text for t in (
      "Connection reset by peer", "Connection closed by peer", "heartbeat timeout",
      "tasks are unhealthy", "Broken pipe", "Gloo"))
