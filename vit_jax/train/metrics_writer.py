"""Metrics to a JSON-lines file, TensorBoard event files and a terminal progress bar.

Only process 0 writes, so N processes produce one set of files and lines.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax

# Records' ``wall_s`` counts from here (the process's start, near enough): a command that trains
# a pre-training stage first reports its second stage's times from the command's start.
PROCESS_START = time.time()


class MetricsWriter:
  def __init__(self, workdir: str, *, total_steps: int, batch_size: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.tty = sys.stdout.isatty()
    self._file = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_partial_last_line(path)
      self._file = open(path, "a")
      self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
    self._t0 = PROCESS_START
    self._last = (None, None)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": step, "wall_s": round(time.time() - self._t0, 1), **metrics}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for k, v in metrics.items():
      if isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def progress(self, step: int, loss: float) -> dict[str, float]:
    """Prints step, loss, img/s and ETA; returns the throughput figures."""
    now = time.time()
    last_step, last_time = self._last
    self._last = (step, now)
    if last_step is None or step == last_step:
      return {}
    img_s = (step - last_step) * self.batch_size / (now - last_time)
    eta = (self.total_steps - step) * (now - last_time) / (step - last_step)
    if self.enabled:
      pct = step / self.total_steps
      bar = "#" * int(30 * pct) + "-" * (30 - int(30 * pct))
      line = (f"[{bar}] {step}/{self.total_steps} loss {loss:.4f} {img_s:,.0f} img/s "
              f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
      print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)
    return {"img_per_sec": img_s}

  def start_clock(self, step: int) -> None:
    self._last = (step, time.time())

  def log(self, message: str) -> None:
    if self.enabled:
      print(("\n" if self.tty else "") + message, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    if self.tty:
      print()
    errors = []
    for close in (self._file.close, self._close_tensorboard):
      try:
        close()
      except OSError as e:  # a full disk: the caller reports it
        errors.append(e)
    if errors:
      raise errors[0]

  def _close_tensorboard(self) -> None:
    try:
      self._tb.close()
    except OSError:
      # Its writer thread is stopped and the files marked closed, or tensorboardX would close
      # them again at exit and print the same error with a traceback.
      for file_writer in (self._tb.all_writers or {}).values():
        events = file_writer.event_writer
        if getattr(events, "_worker", None) is not None:
          events._worker.stop()  # pylint: disable=protected-access
        events._closed = True  # pylint: disable=protected-access
      raise


def _drop_partial_last_line(path: str) -> None:
  """Cuts a record a killed run or a full disk left half-written, so that the file stays one
  JSON record per line."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def _summary_writer_class() -> type:
  """tensorboardX's ``SummaryWriter``, imported without PyTorch: tensorboardX imports torch when
  it is installed (seconds at every start) only to accept torch tensors, and scalars need none.
  A process that already imported torch keeps it."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # makes ``import torch`` fail fast inside tensorboardX
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter
