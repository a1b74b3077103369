"""A full disk: checked before each checkpoint is written, and recognised when a write fails.

A save that would not fit is refused before orbax writes anything, so the previous checkpoint
is untouched; a write that fails anyway (the disk filled meanwhile) is reported as one
``DiskFullError`` naming the directory and the last complete checkpoint. orbax's temporary
directory of a failed save is never restored (and is cleared by the next run).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys

import jax
import numpy as np

_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")
# What a save needs beyond the state's bytes: orbax's and our metadata, and room for the logs.
MARGIN_BYTES = 1 << 20


class DiskFullError(RuntimeError):
  """A checkpoint (or a log) could not be written for lack of space."""


def is_disk_full(exc: BaseException | None) -> bool:
  """Whether ``exc`` or anything in its chain is an out-of-space error (tensorstore's
  RESOURCE_EXHAUSTED of a file write included)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in _FULL:
      return True
    if any(t in str(exc) for t in _FULL_TEXT):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def free_bytes(directory: str) -> int | None:
  """Bytes free for this user on the filesystem of ``directory`` (None: not a local path)."""
  if "://" in directory:
    return None
  path = directory
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent
  return shutil.disk_usage(path).free


def _megabytes(n: int) -> str:
  return f"{n / 2**20:,.1f} MB"


def ensure_room(directory: str, needed: int, what: str, fallback: str) -> None:
  """Raises DiskFullError unless ``needed`` + a margin bytes are free where ``directory`` lives.
  Decided by process 0 and shared, so every process of a run agrees."""
  free = free_bytes(directory) if jax.process_index() == 0 else None
  short = free is not None and free < needed + MARGIN_BYTES
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    short = bool(multihost_utils.broadcast_one_to_all(np.int32(short)))
  if short:
    have = _megabytes(free) if free is not None else "too little (process 0 said so)"
    raise DiskFullError(
        f"no space for {what} in {directory}: it needs about {_megabytes(needed + MARGIN_BYTES)}, "
        f"{have} free. {fallback} Free some space (or point --workdir elsewhere) and run the "
        "same command to resume.")


def report_once() -> None:
  """Keeps a failed write's aftermath out of the terminal, so that the run's one error says it:
  library log records about out-of-space writes (orbax logs every failing thread with its
  traceback, asyncio every task it dropped), and the callbacks that tensorstore delivers to
  orbax's event loop after that loop was closed by the failure (tensorstore reports them as
  unraisable exceptions)."""
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(QuietWhenFull())
  previous = sys.unraisablehook

  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)

  sys.unraisablehook = hook


class QuietWhenFull(logging.Filter):
  """Drops library log records about out-of-space writes (orbax logs each failing thread with
  its traceback); the run reports the failure once, as a DiskFullError."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not any(t in text for t in _FULL_TEXT) and not (
        record.exc_info and is_disk_full(record.exc_info[1]))
